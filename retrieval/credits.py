"""The credit record and the item references read back from it (or typed by a user).

:func:`attribution` is what Retrieve outputs and CPR writes into saved images;
:func:`parse_refs` reads that record, a JSON list or typed ids / hashes back into references,
and :func:`check_ref` validates one before a store resolves it. Backend-neutral: no database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .items import Hit, Item, StoreError

if TYPE_CHECKING:
    from .store import ImageStore


def parse_refs(text: str) -> list[int | str]:
    """Item references from user text: a JSON attribution record (``{"items": [{"id":..}]}``,
    what Retrieve outputs), a JSON list, or ids / sha256 hashes separated by commas or spaces."""
    text = (text or "").strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"ids look like JSON but do not parse: {exc}.", "", "ids") from exc
        if isinstance(data, dict):
            data = data.get("items", data.get("ids", []))
        out: list[int | str] = []
        for entry in data if isinstance(data, list) else [data]:
            if isinstance(entry, dict):
                entry = entry.get("id", entry.get("sha256"))
            if isinstance(entry, bool) or not isinstance(entry, (int, str)):
                raise StoreError(f"cannot read an item reference from {entry!r}.", "", "ids")
            out.append(entry)
        return out
    return [int(t) if t.isdigit() else t for t in text.replace(",", " ").split()]


def check_ref(ref: int | str, field_name: str) -> int | str:
    """An id (int) or a lower-case sha256 prefix (str, 8+ hex); anything else is an error."""
    if isinstance(ref, (int, np.integer)) or (isinstance(ref, str) and ref.strip().isdigit()):
        return int(ref)
    ref = str(ref).strip().lower()
    if len(ref) < 8 or len(ref) > 64 or any(c not in "0123456789abcdef" for c in ref):
        raise StoreError(f"'{ref}' is neither an id nor a sha256 (hex, 8+ characters).",
                         "give numeric ids or sha256 hashes (see List Image Store).", field_name)
    return ref


def attribution(hits: Sequence[Item], store: ImageStore | None = None) -> dict:
    """The credit record for a set of retrieved items (what CPR writes into saved images)."""
    out: dict = {"items": [{"id": h.id, "sha256": h.sha256, "owner": h.owner, "visibility": h.visibility,
                            **({"score": round(h.score, 6)} if isinstance(h, Hit) else {})} for h in hits]}
    if store is not None:
        out["store"] = store.path.name
        out["model"] = store.config["model"]["name"]
    return out

"""What an image store hands out and raises, whatever its backend.

Kept apart from :mod:`.store` (the SQLite + faiss backend) so that the credit record
(:mod:`.credits`) and a second backend can use these types without importing SQLite's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CompartmentsError

VISIBILITIES = ("private", "public")
FILTERS = ("private", "public", "all")

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each embedding batch; raising from it cancels the add."""


class StoreError(CompartmentsError):
    """A user-facing store problem. ``field`` names the argument at fault, ``fix`` what to do."""


@dataclass(frozen=True)
class Item:
    """One stored image (metadata only)."""

    id: int
    sha256: str
    path: str
    owner: str
    visibility: str
    added: float
    width: int
    height: int
    file: str


@dataclass(frozen=True)
class Hit(Item):
    """A query result: the item and its cosine similarity to the query."""

    score: float = 0.0


@dataclass
class AddReport:
    """What an add did: ids added (in input order) and every skipped file with its reason."""

    added: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}

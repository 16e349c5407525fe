"""The soup manifest: who is in the soup, with what weight, and what the file promises.

It lives as JSON under the ``compartments.soup`` key of the safetensors metadata, so a soup
can be audited with any safetensors tool and travels with the weights.

Exactness. With ``sum_stored`` the soup keeps, for every souped tensor ``k``, the running sum
``S_k = sum_i w_i * theta_i[k]``, and the souped tensor is ``(S_k / W).to(dtype)`` with
``W = sum_i w_i``. ``exact`` is true when every stored sum equals the real-number sum: then
removing member j computes ``S - w_j * theta_j`` without rounding, which is bit for bit the
sum a rebuild from the remaining members stores, and the output tensor (a fixed function of
S and W) is bitwise the rebuilt one. Without a stored sum, add/remove reconstruct
``S = soup * W`` from the output tensors, so results match a rebuild only to the output
dtype's rounding; the manifest then says ``exact: false``.

Where the sums live. Format 2 (``exact_data``): in a sidecar file beside the soup, as the
residual ``S - W * soup`` (``exact.py``), so the file ComfyUI loads is the size of one member;
``exact_data`` names its uid, sha256 and size. Format 1 (still read, never written): inside
the soup file, as ``compartments.soup_sum.<k>`` (float32 where that holds S exactly).

Member ids (``MEMBER_ID``): sha256 over the souped tensors in sorted key order, each fed as
``key|dtype|[shape]|`` then its bytes, keys under their checkpoint names; unchanged since
format 1, so old manifests still verify.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fractions import Fraction

META_KEY = "compartments.soup"
SUM_PREFIX = "compartments.soup_sum."
UNET_PREFIX = "model.diffusion_model."
FORMAT = "compartments.soup/2"
FORMATS = ("compartments.soup/1", FORMAT)  # what from_json reads
MEMBER_ID = ("sha256 over the souped tensors in sorted key order, each as 'key|dtype|[shape]|' then its "
             "bytes, keys under their checkpoint names (model.diffusion_model.*)")


@dataclass
class Member:
    id: str          # sha256 of the souped tensors (sorted keys; name, dtype, shape, bytes)
    name: str        # file name it was read from (informative; identity is the id)
    weight: float    # as given; normalised weight is weight / sum(weights)


@dataclass
class Manifest:
    members: list[Member]
    base: dict                      # {"name", "id"}: where the un-souped components came from
    components: str                 # "unet" (model.diffusion_model.*) or "all" (every float tensor)
    dtype: str                      # output dtype of souped tensors ("same" = as in the base)
    sum_stored: bool
    exact: bool
    souped_keys: int
    history: list[dict] = field(default_factory=list)
    member_dtypes: list[str] = field(default_factory=list)  # storage dtypes seen in souped tensors
    format: str = FORMAT
    exact_data: dict | None = None  # format 2: the sidecar {"uid", "sha256", "bytes", "encoding", "file"}
    member_id: str = MEMBER_ID       # how member and base ids are computed

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def total_weight(self) -> float:
        return float(sum((Fraction(m.weight) for m in self.members), Fraction(0)))

    @property
    def uniform(self) -> bool:
        return len({m.weight for m in self.members}) <= 1

    def to_json(self) -> str:
        d = asdict(self)
        d["n"] = self.n
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("format") not in FORMATS:
            raise ValueError(f"unknown soup manifest format {d.get('format')!r} (this version reads {', '.join(FORMATS)})")
        d.pop("n", None)
        d["members"] = [Member(**m) for m in d["members"]]
        return cls(**d)

    def describe(self) -> str:
        """A human-readable summary for the Inspect node and ``soup-info``."""
        total = Fraction(0)
        for m in self.members:
            total += Fraction(m.weight)
        lines = [
            f"soup of {self.n} member(s), {'uniform' if self.uniform else 'weighted'}; "
            f"components souped: {self.components}; {self.souped_keys} tensors; dtype: {self.dtype}",
            f"running sum stored: {self.sum_stored}"
            + (f" (sidecar {self.exact_data.get('file')}, {self.exact_data.get('bytes', 0) / 1e6:.1f} MB)"
               if self.exact_data else " (in the soup file, format 1)" if self.sum_stored else "")
            + f"; exact add/remove: {self.exact}",
            f"base (text encoder, VAE, other un-souped tensors): {self.base.get('name')} {self.base.get('id', '')[:16]}",
        ]
        for m in self.members:
            share = float(Fraction(m.weight) / total) if total else float("nan")
            lines.append(f"  {m.id[:16]}  w={m.weight:g} ({share:.4f})  {m.name}")
        for h in self.history:
            lines.append(f"  history: {h.get('op')} {h.get('name', '')} {h.get('id', '')[:16]}")
        return "\n".join(lines)

"""The exact-sum data of a soup: what makes add/remove bitwise exact, stored beside the soup.

A soup file holds what ComfyUI loads, ``O = (S / W).to(dtype)``, and so is the size of one
member. Exact add/remove need the running sum ``S`` itself (float64, exact). Storing S
(the previous format) tripled the file; here the sidecar stores only what ``O`` does not
already say about it, the residual ``D = S - W * O`` in units of ``O``'s own rounding step:

    t = D / u,   u = ulp(O) * 2^-GUARD   (ulp in the soup's dtype, a power of two per element)

For members fine-tuned from one base, ``|D| <= W * ulp(O) / 2``, so ``t`` is a small integer
and fits an int8 (half a float16 member, a quarter of a float32 one). Every element is
checked while it is encoded: ``W * O + t * u`` must give back ``S`` bit for bit in float64;
an element that does not (members that straddle a binade, large weights, cancellation near
zero) is stored as an exception, its exact ``S`` by index. A tensor with too many
exceptions keeps its whole sum instead. Decoding repeats the very same float64 operations,
so it returns ``S`` exactly, and a rebuild of the same members writes the same sidecar.

The sidecar is a safetensors file named ``<soup file>.<uid>.exact`` (so ComfyUI's model
lists never show it); ``uid`` is new for every written soup and is recorded in both files'
metadata with the sidecar's sha256, so a missing, truncated, changed or foreign sidecar is
refused by name before anything is written.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .st import DTYPES
from .sums import CHUNK, MANTISSA, chunks

ENCODING = "int8-residual/1"
META_KEY = "compartments.soup_exact"
SUFFIX = ".exact"
T_MAX = 127  # t in [-127, 127]; -128 marks an exception
ESCAPE = -128
# a tensor keeps its whole sum when more than 1/16 of its elements are exceptions (each costs
# 8 bytes more), so the sidecar is never larger than the float64 sum it replaces
MAX_EXCEPTIONS = 1 / 16
# smallest normal value of each soup dtype: below it the ulp stops shrinking (subnormals)
MIN_NORMAL_EXP = {"F16": -14, "BF16": -126, "F32": -126, "F64": -1022, "F8_E4M3": -6, "F8_E5M2": -14}
_EXP_BITS = 0x7FF0000000000000


def sidecar_path(soup: str | os.PathLike, uid: str) -> Path:
    """Where the exact-sum data of ``soup`` (written with ``uid``) lives: beside it."""
    p = Path(soup)
    return p.with_name(f"{p.name}.{uid[:16]}{SUFFIX}")


def new_uid() -> str:
    return secrets.token_hex(16)


def stale_sidecars(soup: str | os.PathLike, keep: str | None) -> list[Path]:
    """Sidecars of ``soup`` other than the one of uid ``keep`` (left by an earlier version of it)."""
    p = Path(soup)
    keep_name = sidecar_path(p, keep).name if keep else None
    try:
        names = os.listdir(p.parent)
    except OSError:
        return []
    return [p.with_name(n) for n in names
            if n.startswith(p.name + ".") and n.endswith(SUFFIX) and n != keep_name
            and len(n) == len(p.name) + 1 + 16 + len(SUFFIX)]


@dataclass(frozen=True)
class Scale:
    """The per-tensor constants of the encoding for a soup dtype."""

    dtype: str   # the soup tensor's dtype code (F16, BF16, ...)
    total: float  # W, the sum of member weights the soup divides by
    guard: int    # t counts ulp / 2^guard: see guard_for

    @property
    def min_normal(self) -> float:
        return 2.0 ** MIN_NORMAL_EXP[self.dtype]

    @property
    def step(self) -> float:
        """u / 2^floor(log2|O|): one ulp of the dtype, divided by 2^guard."""
        return 2.0 ** -(MANTISSA[self.dtype] - 1 + self.guard)


def guard_for(total: float) -> int:
    """The finest unit whose residuals still fit an int8: |D| <= W ulp / 2, so 2^guard <= 254 / W.

    A finer unit encodes members up to ``guard`` binades below the soup value (measured on
    fine-tune-like fp16 members: 1% exceptions at guard 2, none at 5 for N = 4).
    """
    g = 0
    while g < 8 and total * 2 ** (g + 1) <= 2 * T_MAX:
        g += 1
    return g


class Scratch:
    """Chunk-sized work buffers, allocated once per soup (no allocation per chunk)."""

    def __init__(self) -> None:
        self.o = torch.empty(CHUNK, dtype=torch.float64)
        self.u = torch.empty(CHUNK, dtype=torch.float64)
        self.t = torch.empty(CHUNK, dtype=torch.float64)
        self.q = torch.empty(CHUNK, dtype=torch.float64)
        self.f = torch.empty(CHUNK, dtype=torch.float32)
        self.bad = torch.empty(CHUNK, dtype=torch.bool)


def _widen(o: torch.Tensor, w: Scratch) -> torch.Tensor:
    """O as float64 (through float32: two vectorised casts beat one f16->f64 cast on CPUs)."""
    n = o.numel()
    if o.dtype in (torch.float32, torch.float64):
        return w.o[:n].copy_(o)
    return w.o[:n].copy_(w.f[:n].copy_(o))


def _unit(o64: torch.Tensor, sc: Scale, out: torch.Tensor) -> torch.Tensor:
    """u = 2^floor(log2|O|) (clamped at the dtype's smallest normal) * step, per element."""
    torch.bitwise_and(o64.view(torch.int64), _EXP_BITS, out=out.view(torch.int64))
    out.clamp_(min=sc.min_normal)
    return out.mul_(sc.step)


def encode_chunk(s: torch.Tensor, o: torch.Tensor, sc: Scale, t8: torch.Tensor, w: Scratch) -> torch.Tensor | None:
    """Residual of one chunk into ``t8`` (int8); returns the exact S of its exceptions, in order.

    ``s`` is the float64 sum, ``o`` the soup chunk already rounded to the soup's dtype. Both
    products below (W * O: few significant bits; t * u: a small integer times a power of two)
    are exact, so fused or not, every step rounds once, the same way :func:`decode_chunk` does.
    """
    n = s.numel()
    u, t = w.u[:n], w.t[:n]
    o64 = _widen(o, w)
    _unit(o64, sc, u)
    torch.add(s, o64, alpha=-sc.total, out=t)  # D = S - W * O
    t.div_(u).round_().clamp_(-T_MAX, T_MAX)  # t = round(D / u)
    t8.copy_(t)
    t.mul_(u).add_(o64, alpha=sc.total)       # what decoding gives back: W * O + t * u
    if torch.equal(t, s):
        return None
    bad = torch.ne(t, s, out=w.bad[:n])
    t8.masked_fill_(bad, ESCAPE)
    return s.masked_select(bad)


def decode_chunk(o: torch.Tensor, parts: dict[str, torch.Tensor], start: int, escapes: int, sc: Scale,
                 out: torch.Tensor, w: Scratch) -> int:
    """S of the chunk at ``start`` into ``out``: W * O + t * u (the float64 operations of
    :func:`encode_chunk`, in the same order), exceptions and whole sums as stored.

    ``escapes`` counts the exception values used by earlier chunks; returns the new count.
    """
    n = o.numel()
    if "s" in parts:
        out.copy_(parts["s"][start:start + n])
        return escapes
    t8 = parts["t"][start:start + n]
    u = w.u[:n]
    o64 = _widen(o, w)
    _unit(o64, sc, u)
    out.copy_(t8)
    out.mul_(u).add_(o64, alpha=sc.total)
    if "v" in parts:
        bad = torch.eq(t8, ESCAPE, out=w.bad[:n])
        k = int(bad.sum())
        if k:
            out.masked_scatter_(bad, parts["v"][escapes:escapes + k])
            escapes += k
    return escapes


class Encoder:
    """Rounds a float64 sum into the soup's dtype chunk by chunk while encoding its residual."""

    def __init__(self, dtype: str, total: float) -> None:
        self.sc = Scale(dtype, total, guard_for(total))
        self.w = Scratch()
        self.values: list[torch.Tensor] = []

    def soup_chunks(self, sums: Iterable[torch.Tensor], t8: torch.Tensor) -> Iterator[torch.Tensor]:
        """``(S / W).to(dtype)`` for each chunk of S in ``sums``, for the writer; ``t8`` (int8, one
        per element) fills with the residual as they go, exceptions gather in ``values``."""
        self.values = []
        dtype = DTYPES[self.sc.dtype]
        i = 0
        for s in sums:
            o = torch.div(s, self.sc.total, out=self.w.q[: s.numel()]).to(dtype)
            v = encode_chunk(s, o, self.sc, t8[i:i + s.numel()], self.w)
            if v is not None:
                self.values.append(v)
            i += s.numel()
            yield o

    def too_many_exceptions(self, numel: int) -> bool:
        """Then the tensor keeps its whole sum: the residual would not be smaller."""
        return sum(v.numel() for v in self.values) > MAX_EXCEPTIONS * numel


def decode(o: torch.Tensor, parts: dict[str, torch.Tensor], sc: Scale, out: torch.Tensor, w: Scratch) -> None:
    """S into ``out`` (flat float64) from the soup tensor ``o`` (flat) and its stored parts:
    ``s`` (the whole sum) or ``t`` (int8 residual) with ``v`` (exception values)."""
    escapes = 0
    for i in chunks(out.numel()):
        escapes = decode_chunk(o[i:i + CHUNK], parts, i, escapes, sc, out[i:i + CHUNK], w)


def sidecar_meta(uid: str, total: float, guard: int) -> dict[str, str]:
    return {META_KEY: json.dumps({"encoding": ENCODING, "uid": uid, "total": total, "guard": guard},
                                 sort_keys=True)}

"""Running sums for the soup: the chunked kernels, and the rules for when a sum is exact.

Plain torch on flat tensors: no files, no threads. The merge method (``engine.WeightedSum``)
is written with these; see ``manifest.py`` for what "exact" promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch

# significand bits (with the implicit one) of each storage dtype
MANTISSA = {"F16": 11, "BF16": 8, "F32": 24, "F64": 53, "F8_E4M3": 4, "F8_E5M2": 3}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
NARROW = (torch.float16, torch.bfloat16, *FP8)
CHUNK = 1 << 17  # elements per step: a float64 chunk (1 MiB) stays in cache; mixed-dtype ops run ~2x faster


def weights_exact(weights: Sequence[float], dtypes: set[str]) -> bool:
    """Products w*theta are exact in float64 and W is representable (float weights are dyadic)."""
    mant = max(MANTISSA[d] for d in dtypes) if dtypes else 53
    fr = [Fraction(w) for w in weights]
    if any(f.numerator.bit_length() + mant > 53 for f in fr):
        return False
    total = sum(fr, Fraction(0))
    return Fraction(float(total)) == total


def fp16_static(weights: Sequence[float], dtypes: set[str]) -> bool:
    """fp16 values lie on a 2^-24 grid below 2^16: sums stay exact in float64 if sum|P_i| < 2^13."""
    if dtypes != {"F16"}:
        return False
    fr = [Fraction(w) for w in weights]
    q = max(f.denominator for f in fr)
    return sum(abs(f * q) for f in fr) < 2 ** 13


def add_checked(acc: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """acc + x, and whether that addition was exact (Knuth's TwoSum error is zero, all finite)."""
    s = acc + x
    bb = s - acc
    err = (acc - (s - bb)) + (x - bb)
    return s, not bool(err.any()) and bool(torch.isfinite(s).all())


def chunks(n: int) -> range:
    return range(0, n, CHUNK)


def _staged(x: torch.Tensor, i: int, a: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Chunk i of x, widened to float32 first when x is half precision or fp8.

    Two cheap vectorised casts (f16->f32, then f32->f64 inside add) beat one direct
    f16->f64 cast on CPUs; float32 holds every fp16/bf16/fp8 value exactly, so nothing changes.
    fp8 must be widened in any case: torch does not promote float8 in arithmetic.
    """
    c = x[i:i + CHUNK]
    if c.dtype in NARROW and (a.dtype == torch.float64 or c.dtype in FP8):
        st = stage[: c.numel()]
        st.copy_(c)
        return st
    return c


def fill(a: torch.Tensor, x: torch.Tensor, weight: float, stage: torch.Tensor) -> None:
    """a = weight * x, chunk by chunk (x may be any float dtype; a is the accumulator)."""
    for i in chunks(a.numel()):
        a[i:i + CHUNK].copy_(_staged(x, i, a, stage))
    if weight != 1.0:
        a.mul_(weight)


def axpy(a: torch.Tensor, x: torch.Tensor, weight: float, stage: torch.Tensor) -> None:
    """a += weight * x in place, chunk by chunk."""
    for i in chunks(a.numel()):
        a[i:i + CHUNK].add_(_staged(x, i, a, stage), alpha=weight)


def fits_f32(a: torch.Tensor) -> bool:
    """True when a float64 tensor survives a round trip through float32 unchanged."""
    return all(torch.equal(a[i:i + CHUNK].to(torch.float32).to(torch.float64), a[i:i + CHUNK])
               for i in chunks(a.numel()))

"""Streaming Diffusion Soup: build, add a shard, remove a shard, read the manifest.

Diffusion Soup (arXiv 2406.08431) averages the weights of models fine-tuned from one base
on separate data shards; adding or removing (unlearning) a shard is a re-average with no
training. Here that is done key by key: for each tensor the engine reads that one tensor
from every member, accumulates, writes the result and moves on, so memory holds one output
tensor (plus one read buffer per member) however large or many the checkpoints are.

Rules (see ``manifest.py`` for the exactness promise):
soup = sum_i w_i theta_i / sum_i w_i; add: S' = S + w theta_new; remove j: S' = S - w_j theta_j,
W' = W - w_j (weighted soups renormalise). Sums are accumulated in float64 when the running
sum is stored (exactness), else in float32.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ..errors import CompartmentsError
from .manifest import META_KEY, SUM_PREFIX, UNET_PREFIX, Manifest, Member
from .st import DTYPES, FLOATS, NAMES, Planned, Reader, SharedBuffer, atomic_writer

Progress = Callable[[int, int], None] | None
MANTISSA = {"F16": 11, "BF16": 8, "F32": 24, "F64": 53}
OUT_DTYPES = {"same": None, "float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class SoupError(CompartmentsError):
    """A user-facing soup problem (incompatible members, not a member, last member...)."""


@dataclass(frozen=True)
class Shard:
    """A member to soup: a safetensors path and its (unnormalised) weight."""

    path: Path
    weight: float = 1.0


# A sane range for member weights: ratios beyond 10^12 are no style mix, and inside it every
# product w*theta of a float16/bfloat16/float32 weight stays a normal float64 (the exactness
# proof of _weights_exact needs that), and no sum of weights can overflow.
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6


def check_weight(weight: float, what: str, allow_zero: bool = False) -> float:
    """``weight`` when it is finite and in [MIN_WEIGHT, MAX_WEIGHT] (or 0 with ``allow_zero``)."""
    ok = isinstance(weight, (int, float)) and math.isfinite(weight) and (
        MIN_WEIGHT <= weight <= MAX_WEIGHT or (allow_zero and weight == 0))
    if not ok:
        raise SoupError(f"{what}: weight {weight!r} must be a finite number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}"
                        + (" (or 0)" if allow_zero else ""))
    return float(weight)


def refuse_overwriting(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], what: str = "input") -> None:
    """Refuse an output that is one of the inputs (the same file by path, symlink or hard link)."""
    o = Path(out)
    if not o.exists():
        return
    for p in inputs:
        try:
            same = os.path.samefile(o, p)
        except OSError:
            continue
        if same:
            raise SoupError(f"the output {o} is the {what} {Path(p).name}: writing it would destroy that "
                            "file. Write the soup to a new file name.")


def parse_members(spec: str) -> list[tuple[str, float]]:
    """``"a.safetensors\\nb.safetensors, 2"`` -> [(name, weight)]; '#' starts a comment."""
    out = []
    for raw in spec.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, w = line.rpartition(",") if "," in line else (line, "", "")
        name = name.strip() if "," in line else line
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError as e:
            raise SoupError(f"member line '{raw.strip()}': weight '{w.strip()}' is not a number") from e
        check_weight(weight, f"member line '{raw.strip()}'")
        out.append((name, weight))
    return out


def parse_weights(spec: str, count: int) -> list[float]:
    """``"2, 1, 1"`` -> one weight per model (``""``: all 1); each >= 0, not all 0."""
    if not spec.strip():
        return [1.0] * count
    try:
        weights = [float(w) for w in spec.replace(";", ",").split(",") if w.strip()]
    except ValueError as e:
        raise SoupError(f"'{spec}' is not a comma-separated list of numbers") from e
    if len(weights) != count:
        raise SoupError(f"{len(weights)} weight(s) for {count} connected model(s)")
    for i, w in enumerate(weights):
        check_weight(w, f"weight {i + 1} of '{spec}'", allow_zero=True)
    if not sum(weights) > 0:
        raise SoupError("all weights are 0")
    return weights


def souped(key: str, dtype: str, components: str) -> bool:
    if key.startswith(SUM_PREFIX) or dtype not in FLOATS:
        return False
    return components == "all" or key.startswith(UNET_PREFIX)


def check_compatible(ref: Reader, other: Reader, keys: Sequence[str] | None = None) -> None:
    """Raise a SoupError naming the first key (sorted) whose presence or shape differs."""
    a = {k: e for k, e in ref.entries.items() if not k.startswith(SUM_PREFIX)}
    b = {k: e for k, e in other.entries.items() if not k.startswith(SUM_PREFIX)}
    wanted = sorted(keys) if keys is not None else sorted(set(a) | set(b))
    for k in wanted:
        ea, eb = a.get(k), b.get(k)
        if ea is None or eb is None or ea.shape != eb.shape:
            sa = list(ea.shape) if ea else "missing"
            sb = list(eb.shape) if eb else "missing"
            raise SoupError(
                f"members do not share one architecture: first differing key '{k}': "
                f"{sa} in {ref.path.name} vs {sb} in {other.path.name}. "
                "Soup only checkpoints fine-tuned from the same base model.")


def _hash_header(h, key: str, dtype: str, shape: tuple[int, ...]) -> None:
    h.update(f"{key}|{dtype}|{list(shape)}|".encode())


def _hash_update(h, key: str, dtype: str, shape: tuple[int, ...], raw: memoryview) -> None:
    _hash_header(h, key, dtype, shape)
    h.update(raw)


def _weights_exact(weights: Sequence[float], dtypes: set[str]) -> bool:
    """Products w*theta are exact in float64 and W is representable (float weights are dyadic)."""
    mant = max(MANTISSA[d] for d in dtypes) if dtypes else 53
    fr = [Fraction(w) for w in weights]
    if any(f.numerator.bit_length() + mant > 53 for f in fr):
        return False
    total = sum(fr, Fraction(0))
    return Fraction(float(total)) == total


def _fp16_static(weights: Sequence[float], dtypes: set[str]) -> bool:
    """fp16 values lie on a 2^-24 grid below 2^16: sums stay exact in float64 if sum|P_i| < 2^13."""
    if dtypes != {"F16"}:
        return False
    fr = [Fraction(w) for w in weights]
    q = max(f.denominator for f in fr)
    return sum(abs(f * q) for f in fr) < 2 ** 13


def _add(acc: torch.Tensor | None, x: torch.Tensor, check: bool) -> tuple[torch.Tensor, bool]:
    """acc + x; with ``check``, Knuth's TwoSum tells whether the addition rounded."""
    if acc is None:
        return x.clone() if x.dtype == torch.float64 else x.to(torch.float64), True
    s = acc + x
    if not check:
        return s, True
    bb = s - acc
    err = (acc - (s - bb)) + (x - bb)
    return s, not bool(err.any()) and bool(torch.isfinite(s).all())


CHUNK = 1 << 17  # elements per step: a float64 chunk (1 MiB) stays in cache; mixed-dtype ops run ~2x faster


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


class _Workspace:
    """One flat accumulator reused for every key: no fresh (page-faulting) allocation per tensor."""

    def __init__(self, dtype: torch.dtype, numel: int):
        self.buf = torch.empty(numel, dtype=dtype)
        self.stage = torch.empty(CHUNK, dtype=torch.float32)  # per soup: safe if two soups run at once

    def take(self, n: int) -> torch.Tensor:
        return self.buf[:n]


def _staged(x: torch.Tensor, i: int, a: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Chunk i of x, widened to float32 first when a is float64 and x half precision.

    Two cheap vectorised casts (f16->f32, then f32->f64 inside add) beat one direct
    f16->f64 cast on CPUs; float32 holds every fp16/bf16 value exactly, so nothing changes.
    """
    c = x[i:i + CHUNK]
    if a.dtype == torch.float64 and c.dtype in (torch.float16, torch.bfloat16):
        st = stage[: c.numel()]
        st.copy_(c)
        return st
    return c


def _fill(a: torch.Tensor, x: torch.Tensor, weight: float, stage: torch.Tensor) -> None:
    """a = weight * x, chunk by chunk (x may be any float dtype; a is the accumulator)."""
    for i in _chunks(a.numel()):
        a[i:i + CHUNK].copy_(_staged(x, i, a, stage))
    if weight != 1.0:
        a.mul_(weight)


def _axpy(a: torch.Tensor, x: torch.Tensor, weight: float, stage: torch.Tensor) -> None:
    """a += weight * x in place, chunk by chunk."""
    for i in _chunks(a.numel()):
        a[i:i + CHUNK].add_(_staged(x, i, a, stage), alpha=weight)


def _fits_f32(a: torch.Tensor) -> bool:
    """True when a float64 tensor survives a round trip through float32 unchanged."""
    return all(torch.equal(a[i:i + CHUNK].to(torch.float32).to(torch.float64), a[i:i + CHUNK])
               for i in _chunks(a.numel()))


def _emit(w, key: str, a: torch.Tensor, total: float, dtype: str, keep_sum: bool) -> None:
    """Write the running sum (if kept: float32 when exact, else float64), then sum/W in ``dtype``.

    ``a`` is the flat accumulator; it is divided in place. Conversion and writing go chunk
    by chunk so no second full-size tensor exists.
    """
    if keep_sum:
        if a.dtype == torch.float64 and _fits_f32(a):
            w.write_parts(SUM_PREFIX + key, "F32", (a[i:i + CHUNK].to(torch.float32) for i in _chunks(a.numel())))
        else:
            w.write_parts(SUM_PREFIX + key, NAMES[a.dtype], (a[i:i + CHUNK] for i in _chunks(a.numel())))
    a.div_(total)
    if a.numel() and not bool(torch.isfinite(a.sum())):  # one reduction: any inf/NaN makes the sum non-finite
        raise SoupError(f"tensor {key}: the soup would hold inf/NaN values (a member holds them, or the weights "
                        "overflow its dtype); nothing was written. Check the members with soup-info.")
    out = DTYPES[dtype]
    w.write_parts(key, dtype, (a[i:i + CHUNK].to(out) for i in _chunks(a.numel())))


def read_manifest(path: str | os.PathLike) -> Manifest:
    with Reader(path) as r:
        text = r.metadata.get(META_KEY)
    if text is None:
        raise SoupError(f"{Path(path).name} is not a Compartments soup (no '{META_KEY}' manifest in its metadata).")
    return Manifest.from_json(text)


def content_id(path: str | os.PathLike, components: str = "unet") -> str:
    """The member id: sha256 over the tensors that would be souped (sorted key order)."""
    h = hashlib.sha256()
    with Reader(path) as r:
        for k in sorted(r.entries):
            e = r.entries[k]
            if souped(k, e.dtype, components):
                _hash_update(h, k, e.dtype, e.shape, r.raw(k))
    return h.hexdigest()


def _soup_threads(fn):
    """Run ``fn`` with torch using the cores the reader and hasher threads leave free.

    The soup keeps one thread reading the next member and one hashing; giving torch every
    core as well made the float64 accumulation several times slower on small machines
    (measured: 0.46 -> 0.33 GiB/s on 2 cores). torch's setting is restored afterwards.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 2)))
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


@_soup_threads
def build_soup(shards: Sequence[Shard | str | os.PathLike], out: str | os.PathLike, *,
               base: str | os.PathLike | None = None, components: str = "unet", dtype: str = "same",
               keep_sum: bool = True, progress: Progress = None) -> Manifest:
    """Stream-average ``shards`` into ``out`` (atomic). Returns the manifest written.

    ``base`` supplies every tensor that is not souped (text encoder, VAE, int buffers);
    default: the first shard. ``dtype`` "same" keeps each tensor's dtype from the base.
    """
    items = [Shard(Path(s.path), s.weight) if isinstance(s, Shard) else Shard(Path(s)) for s in shards]
    if not items:
        raise SoupError("a soup needs at least one member.")
    for s in items:
        check_weight(s.weight, f"member {s.path.name}")
    refuse_overwriting(out, [s.path for s in items] + ([base] if base is not None else []), "member")
    if components not in ("unet", "all"):
        raise SoupError(f"components must be 'unet' or 'all', not {components!r}.")
    if dtype not in OUT_DTYPES:
        raise SoupError(f"dtype must be one of {sorted(OUT_DTYPES)}, not {dtype!r}.")
    base_path = Path(base) if base is not None else items[0].path
    readers: list[Reader] = []
    try:
        shared = SharedBuffer()
        readers = [Reader(s.path, shared) for s in items]
        base_r = Reader(base_path, shared)
        readers.append(base_r)
        keys = sorted(k for k in base_r.entries if not k.startswith(SUM_PREFIX))
        for r in readers[:-1]:
            check_compatible(base_r, r)
        sk = [k for k in keys if souped(k, base_r.entries[k].dtype, components)]
        if not sk:
            raise SoupError(f"{base_path.name} has no tensors to soup under '{UNET_PREFIX}' "
                            "(is it a full checkpoint? try components='all').")
        member_dtypes = {r.entries[k].dtype for r in readers[:-1] for k in sk}
        weights = [s.weight for s in items]
        exact_possible = keep_sum and _weights_exact(weights, member_dtypes)
        static = _fp16_static(weights, member_dtypes)
        total = float(sum((Fraction(w) for w in weights), Fraction(0)))
        plan, shrink = _plan(base_r, keys, set(sk), dtype, keep_sum)
        hashes = [hashlib.sha256() for _ in items]
        base_hash = hashlib.sha256()
        exact = exact_possible
        acc_dtype = torch.float64 if keep_sum else torch.float32
        manifest = Manifest(
            members=[], base={"name": base_path.name}, components=components, dtype=dtype,
            sum_stored=keep_sum, exact=False, souped_keys=len(sk), member_dtypes=sorted(member_dtypes))
        skset = set(sk)
        reserve = 2048 + sum(300 + 2 * len(s.path.name) for s in items) + 2 * len(base_path.name)
        out_dtype = {p.key: p.dtype for p in plan}
        ws = _Workspace(acc_dtype, max(math.prod(base_r.entries[k].shape) for k in sk))
        bufs = [shared, SharedBuffer()]
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as io, \
                atomic_writer(out, plan, _meta(base_r, manifest), shrink, reserve) as w:
            for i, k in enumerate(keys):
                if k in skset:
                    numel = math.prod(base_r.entries[k].shape)
                    a = ws.take(numel)
                    first = True
                    nxt = io.submit(readers[0].raw, k, bufs[0])
                    for m, (r, s, h) in enumerate(zip(readers[:-1], items, hashes, strict=True)):
                        e = r.entries[k]
                        raw = nxt.result()
                        if m + 1 < len(items):  # read the next member while this one is added
                            nxt = io.submit(readers[m + 1].raw, k, bufs[(m + 1) % 2])
                        _hash_header(h, k, e.dtype, e.shape)
                        job = pool.submit(h.update, raw)  # hashing overlaps the arithmetic (both drop the GIL)
                        x = torch.frombuffer(raw, dtype=DTYPES[e.dtype]) if numel else torch.empty(0)
                        if first:
                            _fill(a, x, s.weight, ws.stage)
                            first = False
                        elif static or not exact:
                            _axpy(a, x, s.weight, ws.stage)
                        else:
                            y = x.to(acc_dtype) * s.weight if s.weight != 1.0 else x.to(acc_dtype)
                            summed, ok = _add(a, y, True)
                            a.copy_(summed)
                            del summed, y
                            exact = exact and ok
                        job.result()
                    _emit(w, k, a, total, out_dtype[k], keep_sum)
                else:
                    e = base_r.entries[k]
                    raw = base_r.raw(k)
                    _hash_update(base_hash, k, e.dtype, e.shape, raw)
                    w.write(k, raw)
                if progress:
                    progress(i + 1, len(keys))
            manifest.members = [Member(h.hexdigest(), s.path.name, s.weight) for h, s in zip(hashes, items, strict=True)]
            manifest.base["id"] = base_hash.hexdigest()
            manifest.exact = bool(exact)
            manifest.history.append({"op": "build", "n": len(items), "time": time.time()})
            w.set_metadata(_meta(base_r, manifest))
        return manifest
    finally:
        for r in readers:
            r.close()


def _plan(src: Reader, keys: list[str], sk: set[str], dtype: str, keep_sum: bool) -> tuple[list[Planned], frozenset[str]]:
    plan, shrink = [], set()
    for k in keys:
        e = src.entries[k]
        if k in sk:
            out = OUT_DTYPES.get(dtype) or e.dtype
            if keep_sum:  # the sum goes first: the tensor is then computed in place from it
                plan.append(Planned(SUM_PREFIX + k, "F64", e.shape))
                shrink.add(SUM_PREFIX + k)
            plan.append(Planned(k, out, e.shape))
        else:
            plan.append(Planned(k, e.dtype, e.shape))
    return plan, frozenset(shrink)


def _meta(src: Reader, manifest: Manifest) -> dict[str, str]:
    meta = {k: v for k, v in src.metadata.items() if k != META_KEY}
    meta[META_KEY] = manifest.to_json()
    return meta


def add_shard(soup: str | os.PathLike, shard: str | os.PathLike, out: str | os.PathLike | None = None, *,
              weight: float = 1.0, progress: Progress = None) -> Manifest:
    """theta' = (W theta + w theta_new) / (W + w), reading only the soup and the new shard."""
    check_weight(weight, f"added shard {Path(shard).name}")
    return _update(Path(soup), Path(shard), Path(out) if out else Path(soup), +1, weight, progress)


def remove_shard(soup: str | os.PathLike, shard: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 progress: Progress = None) -> Manifest:
    """Unlearn ``shard``: theta' = (W theta - w_j theta_j) / (W - w_j), exact when the manifest says so.

    The shard file is identified by content hash, not by name. A non-member or the last
    member is refused before anything is written; a hash mismatch found while streaming
    aborts the write, so every file stays as it was.
    """
    return _update(Path(soup), Path(shard), Path(out) if out else Path(soup), -1, None, progress)


@_soup_threads
def _update(soup: Path, shard: Path, out: Path, sign: int, weight: float | None, progress: Progress) -> Manifest:
    man = read_manifest(soup)
    refuse_overwriting(out, [shard], "shard")  # replacing the soup itself is what add/remove do by default
    for m in man.members:  # an edited manifest must not turn into an inf or wrong soup
        check_weight(m.weight, f"the manifest of {soup.name} (member {m.name}; was it edited? rebuild the soup)")
    readers: list[Reader] = []
    try:
        shared = SharedBuffer()
        sr = Reader(soup)
        readers.append(sr)
        hr = Reader(shard, shared)
        readers.append(hr)
        keys = sorted(k for k in sr.entries if not k.startswith(SUM_PREFIX))
        sk = [k for k in keys if souped(k, sr.entries[k].dtype, man.components)]
        check_compatible(sr, hr, sk)
        member_index: int | None = None
        if sign < 0:
            if man.n <= 1:
                raise SoupError(f"cannot remove the last member of {soup.name}: a soup of zero models "
                                "is undefined. Delete the file or add another shard first.")
            member_index = _find_member(man, hr, shard)
            weight = man.members[member_index].weight
        assert weight is not None
        shard_dtypes = {hr.entries[k].dtype for k in sk}
        exact = man.exact and man.sum_stored and _weights_exact([weight], shard_dtypes)
        new_weights = [m.weight for m in man.members]
        if sign < 0:
            assert member_index is not None
            del new_weights[member_index]
        else:
            new_weights.append(weight)
        fr_total = sum((Fraction(w) for w in new_weights), Fraction(0))
        total = float(fr_total)
        old_total = man.total_weight
        exact = exact and Fraction(total) == fr_total
        plan = [Planned(k, e.dtype, e.shape) for k, e in sr.entries.items()]
        shrink = frozenset(SUM_PREFIX + k for k in sk) if man.sum_stored else frozenset()
        plan = [Planned(p.key, "F64", p.shape) if p.key in shrink else p for p in plan]
        # sorted keys, each sum right before its tensor, as build writes them
        skset = set(sk)
        order = []
        for k in keys:
            if man.sum_stored and k in skset:
                order.append(SUM_PREFIX + k)
            order.append(k)
        by_key = {p.key: p for p in plan}
        plan = [by_key[k] for k in order]
        static = exact and _fp16_static(new_weights + [weight], set(man.member_dtypes) | shard_dtypes)
        h = hashlib.sha256()
        new_man = Manifest.from_json(man.to_json())
        reserve = 2048 + 300 + 2 * len(shard.name) + 200
        ws = _Workspace(torch.float64, max(math.prod(sr.entries[k].shape) for k in sk))
        # what each souped key reads from the soup: its exact running sum, else the averaged tensor
        src_key = {k: SUM_PREFIX + k if man.sum_stored else k for k in sk}
        bufs = [(SharedBuffer(), shared), (SharedBuffer(), SharedBuffer())]

        def fetch(j: int) -> tuple[memoryview, memoryview]:
            sb, hb = bufs[j % 2]
            return sr.raw(src_key[sk[j]], sb), hr.raw(sk[j], hb)

        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as io, \
                atomic_writer(out, plan, _meta(sr, new_man), shrink, reserve) as w:
            nxt = io.submit(fetch, 0) if sk else None
            j = 0
            for i, k in enumerate(keys):
                if k in skset:
                    sraw, raw = nxt.result()
                    j += 1
                    if j < len(sk):  # the next key's sum and shard tensor load while this one is updated
                        nxt = io.submit(fetch, j)
                    e = hr.entries[k]
                    _hash_header(h, k, e.dtype, e.shape)
                    job = pool.submit(h.update, raw)
                    numel = math.prod(e.shape)
                    a = ws.take(numel)
                    if numel:
                        src = torch.frombuffer(sraw, dtype=DTYPES[sr.entries[src_key[k]].dtype])
                        _fill(a, src, 1.0 if man.sum_stored else old_total, ws.stage)
                    x = torch.frombuffer(raw, dtype=DTYPES[e.dtype]) if numel else torch.empty(0)
                    if static or not exact:
                        _axpy(a, x, sign * weight, ws.stage)  # exact by the fp16 grid bound, or not promised
                    else:
                        summed, ok = _add(a, x.to(torch.float64) * (sign * weight), True)
                        a.copy_(summed)
                        del summed
                        exact = exact and ok
                    job.result()
                    _emit(w, k, a, total, sr.entries[k].dtype, man.sum_stored)
                else:
                    w.write(k, sr.raw(k))
                if progress:
                    progress(i + 1, len(keys))
            digest = h.hexdigest()
            if sign < 0:
                gone_index = _verify_member(man, digest, weight, shard, soup)
                gone = new_man.members.pop(gone_index)
                new_man.history.append({"op": "remove", "id": gone.id, "name": gone.name, "time": time.time()})
            else:
                new_man.members.append(Member(digest, shard.name, weight))
                new_man.member_dtypes = sorted(set(new_man.member_dtypes) | shard_dtypes)
                new_man.history.append({"op": "add", "id": digest, "name": shard.name, "time": time.time()})
            new_man.exact = bool(exact)
            w.set_metadata(_meta(sr, new_man))
        return new_man
    finally:
        for r in readers:
            r.close()


def _find_member(man: Manifest, hr: Reader, shard: Path) -> int:
    """Which member the shard file is, before streaming (its weight decides the update).

    A name match or a uniform soup needs no extra read: the content hash computed while
    streaming is checked by :func:`_verify_member` before the file is committed. A weighted
    soup and an unknown name cost one extra read of the shard to hash it first.
    """
    by_name = [i for i, m in enumerate(man.members) if m.name == shard.name]
    if by_name:
        return by_name[0]
    if man.uniform:
        return 0
    digest = content_id(shard, man.components)
    ids = [i for i, m in enumerate(man.members) if m.id == digest]
    if not ids:
        raise SoupError(f"{shard.name} is not a member of the soup: its content hash {digest[:16]} "
                        "matches no member id (see soup-info). Nothing was written.")
    return ids[0]


def _verify_member(man: Manifest, digest: str, weight: float, shard: Path, soup: Path) -> int:
    """Index of the member with this content hash and weight, or a SoupError (aborts the write)."""
    ids = [i for i, m in enumerate(man.members) if m.id == digest]
    if not ids:
        raise SoupError(f"{shard.name} is not a member of {soup.name}: its content hash {digest[:16]} "
                        "matches no member id (see soup-info). Nothing was written.")
    same = [i for i in ids if man.members[i].weight == weight]
    if not same:
        m = man.members[ids[0]]
        raise SoupError(f"{shard.name} has the content of member {m.name} (weight {m.weight:g}) but its "
                        f"file name matches another member; rename it to {m.name} and retry. Nothing was written.")
    return same[0]

"""Streaming Diffusion Soup: build, add a shard, remove a shard, read the manifest.

Diffusion Soup (arXiv 2406.08431) averages the weights of models fine-tuned from one base
on separate data shards; adding or removing (unlearning) a shard is a re-average with no
training. Here that is done key by key: for each tensor the engine reads that one tensor
from every member, accumulates, writes the result and moves on, so memory holds one output
tensor (plus two read buffers per file read at once) however large or many the checkpoints are.

Rules (see ``manifest.py`` for the exactness promise):
soup = sum_i w_i theta_i / sum_i w_i; add: S' = S + w theta_new; remove j: S' = S - w_j theta_j,
W' = W - w_j (weighted soups renormalise). Sums are accumulated in float64 when the running
sum is stored (exactness), else in float32.

Layout: every operation is one merge method, :class:`WeightedSum` (S = sum_i c_i x_i, written
as S / W), over a plan saying which tensors each output key reads; ``pipeline.py`` streams
any plan (threads, buffers, hashing, the atomic write), ``sums.py`` holds the arithmetic.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from ..errors import CompartmentsError
from .layout import WHOLE, KeyLayout, layout_of
from .manifest import META_KEY, SUM_PREFIX, Manifest, Member
from .pipeline import Output, Parts, Plan, Progress, Source, hash_header, stream
from .st import DTYPES, FLOATS, NAMES, Planned, Reader
from .sums import CHUNK, add_checked, axpy, chunks, fill, fits_f32, fp16_static, weights_exact

OUT_DTYPES = {"same": None, "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float8_e4m3fn": "F8_E4M3",
              "float8_e5m2": "F8_E5M2"}


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


def souped(key: str, dtype: str, layout: KeyLayout) -> bool:
    """Is ``key`` averaged: a float tensor of the diffusion model where ``layout`` keeps it (any float
    tensor for ``components='all'``, whose layout is :data:`layout.WHOLE`)."""
    return not key.startswith(SUM_PREFIX) and dtype in FLOATS and layout.is_diffusion(key)


def check_compatible(ref: Reader, other: Reader, keys: Sequence[str] | None = None,
                     layouts: tuple[KeyLayout, KeyLayout] = (WHOLE, WHOLE)) -> None:
    """Raise a SoupError naming the first key (sorted) whose presence or shape differs.

    Keys are compared under their checkpoint names (``layouts``: where each file keeps its
    diffusion model), over the part each layout covers: the diffusion model, or every key.
    """
    def part(r: Reader, lay: KeyLayout) -> dict:
        return {lay.canonical(k): e for k, e in r.entries.items()
                if not k.startswith(SUM_PREFIX) and (lay.whole or lay.is_diffusion(k))}

    a, b = part(ref, layouts[0]), part(other, layouts[1])
    wanted = sorted(layouts[0].canonical(k) for k in keys) if keys is not None else sorted(set(a) | set(b))
    for k in wanted:
        ea, eb = a.get(k), b.get(k)
        if ea is None or eb is None or ea.shape != eb.shape:
            sa = list(ea.shape) if ea else "missing"
            sb = list(eb.shape) if eb else "missing"
            raise SoupError(
                f"members do not share one architecture: first differing key '{k}': "
                f"{sa} in {ref.path.name} vs {sb} in {other.path.name}. "
                "Soup only models fine-tuned from the same base model.")


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
        lay = layout_of(r.entries, r.path.name, components)
        for k in sorted(r.entries):
            e = r.entries[k]
            if souped(k, e.dtype, lay):
                hash_header(h, lay.canonical(k), e.dtype, e.shape)  # as the pipeline hashes members while streaming
                h.update(r.raw(k))
    return h.hexdigest()


# --- the merge method -------------------------------------------------------------------


@dataclass
class WeightedSum:
    """The one merge method: per key S = sum_i c_i x_i, written as S / ``total``.

    ``coeffs`` holds one coefficient per tensor an output reads: build, the member weights;
    add, 1 on the soup's running sum (or W on its averaged tensor) then +w; remove, the same
    then -w_j. ``exact`` starts as what the weights allow and drops at the first addition that
    rounds (TwoSum check), unless ``static`` proved them all exact up front (the fp16 grid).
    """

    coeffs: list[float]
    total: float
    keep_sum: bool  # write S (float32 when it holds S exactly) before the tensor
    exact: bool
    static: bool = False
    acc_dtype: torch.dtype = torch.float64
    stage: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stage = torch.empty(CHUNK, dtype=torch.float32)  # per soup: safe if two soups run at once

    def __call__(self, out: Output, a: torch.Tensor, xs: Iterator[torch.Tensor]) -> Iterator[Parts]:
        for i, (x, c) in enumerate(zip(xs, self.coeffs, strict=True)):
            if i == 0:
                fill(a, x, c, self.stage)
            elif self.static or not self.exact:
                axpy(a, x, c, self.stage)  # exact by the fp16 grid bound, or not promised
            else:
                y = x.to(a.dtype) * c if c != 1.0 else x.to(a.dtype)
                summed, ok = add_checked(a, y)
                a.copy_(summed)
                del summed, y
                self.exact = self.exact and ok
        yield from self._emit(out, a)

    def _emit(self, out: Output, a: torch.Tensor) -> Iterator[Parts]:
        """The running sum if kept (float32 when exact, else float64), then S / total in ``out``'s dtype.

        ``a`` is divided in place, after the sum is written (the writer drains each part
        first), and conversion goes chunk by chunk, so no second full-size tensor exists.
        """
        n = a.numel()
        if self.keep_sum:
            if a.dtype == torch.float64 and fits_f32(a):
                yield SUM_PREFIX + out.key, "F32", (a[i:i + CHUNK].to(torch.float32) for i in chunks(n))
            else:
                yield SUM_PREFIX + out.key, NAMES[a.dtype], (a[i:i + CHUNK] for i in chunks(n))
        a.div_(self.total)
        if n and not bool(torch.isfinite(a.sum())):  # one reduction: any inf/NaN makes the sum non-finite
            raise SoupError(f"tensor {out.key}: the soup would hold inf/NaN values (a member holds them, or the weights "
                            "overflow its dtype); nothing was written. Check the members with soup-info.")
        dtype = out.writes[-1].dtype
        yield out.key, dtype, (a[i:i + CHUNK].to(DTYPES[dtype]) for i in chunks(n))


# --- plans: what each output key reads --------------------------------------------------


def _souped(key: str, reads: tuple[tuple[Source, ...], ...], dtype: str, shape: tuple[int, ...],
            keep_sum: bool) -> Output:
    # the sum goes first, planned float64 (it may shrink to float32): the tensor is then computed in place from it
    sum_first = (Planned(SUM_PREFIX + key, "F64", shape),) if keep_sum else ()
    return Output(key, reads, (*sum_first, Planned(key, dtype, shape)))


def _plan(outputs: list[Output], metadata: dict[str, str], reserve: int) -> Plan:
    shrink = frozenset(p.key for o in outputs for p in o.writes if p.key.startswith(SUM_PREFIX))
    return Plan(outputs, metadata, reserve, shrink)


def _meta(src: Reader, manifest: Manifest) -> dict[str, str]:
    meta = {k: v for k, v in src.metadata.items() if k != META_KEY}
    meta[META_KEY] = manifest.to_json()
    return meta


def _total(weights: Sequence[float]) -> Fraction:
    return sum((Fraction(w) for w in weights), Fraction(0))


# --- the operations ---------------------------------------------------------------------


def build_soup(shards: Sequence[Shard | str | os.PathLike], out: str | os.PathLike, *,
               base: str | os.PathLike | None = None, components: str = "unet", dtype: str = "same",
               keep_sum: bool = True, progress: Progress = None) -> Manifest:
    """Stream-average ``shards`` into ``out`` (atomic). Returns the manifest written.

    ``base`` supplies every tensor that is not souped (text encoder, VAE, int buffers);
    default: the first shard. ``dtype`` "same" keeps each tensor's dtype from the base.
    """
    items = _checked_shards(shards, out, base, components, dtype)
    base_path = Path(base) if base is not None else items[0].path
    with ExitStack() as opened:
        readers = [opened.enter_context(Reader(s.path)) for s in items]
        base_r = opened.enter_context(Reader(base_path))
        keys = sorted(k for k in base_r.entries if not k.startswith(SUM_PREFIX))
        base_lay = layout_of(base_r.entries, base_path.name, components)
        lays = [layout_of(r.entries, r.path.name, components) for r in readers]
        for r, lay in zip(readers, lays, strict=True):
            check_compatible(base_r, r, layouts=(base_lay, lay))
        sk = {k for k in keys if souped(k, base_r.entries[k].dtype, base_lay)}
        if not sk:
            raise SoupError(f"{base_path.name} has no float tensors to soup in its diffusion model "
                            "(try components='all').")
        # each member's name for a key of the base (the two may be a checkpoint and a diffusion-model-only file)
        names = [{k: lay.key(base_lay.relative(k)) for k in sk} for lay in lays]
        member_dtypes = {r.entries[n[k]].dtype for r, n in zip(readers, names, strict=True) for k in sk}
        weights = [s.weight for s in items]
        method = WeightedSum(weights, float(_total(weights)), keep_sum,
                             exact=keep_sum and weights_exact(weights, member_dtypes),
                             static=fp16_static(weights, member_dtypes),
                             acc_dtype=torch.float64 if keep_sum else torch.float32)
        hashes = [hashlib.sha256() for _ in items]
        base_hash = hashlib.sha256()
        outputs = [_souped(k, tuple((Source(r, n[k], h, base_lay.canonical(k)),)
                                    for r, n, h in zip(readers, names, hashes, strict=True)),
                           OUT_DTYPES[dtype] or base_r.entries[k].dtype, base_r.entries[k].shape, keep_sum)
                   if k in sk else Output.copied(Source(base_r, k, base_hash)) for k in keys]
        manifest = Manifest(
            members=[], base={"name": base_path.name}, components=components, dtype=dtype,
            sum_stored=keep_sum, exact=False, souped_keys=len(sk), member_dtypes=sorted(member_dtypes))
        reserve = 2048 + sum(300 + 2 * len(s.path.name) for s in items) + 2 * len(base_path.name)

        def seal() -> dict[str, str]:
            manifest.members = [Member(h.hexdigest(), s.path.name, s.weight) for h, s in zip(hashes, items, strict=True)]
            manifest.base["id"] = base_hash.hexdigest()
            manifest.exact = bool(method.exact)
            manifest.history.append({"op": "build", "n": len(items), "time": time.time()})
            return _meta(base_r, manifest)

        stream(out, _plan(outputs, _meta(base_r, manifest), reserve), method, seal, progress)
        return manifest


def _checked_shards(shards: Sequence[Shard | str | os.PathLike], out: str | os.PathLike,
                    base: str | os.PathLike | None, components: str, dtype: str) -> list[Shard]:
    """build_soup's arguments refused before any file is opened; the members as Shards."""
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
    return items


def add_shard(soup: str | os.PathLike, shard: str | os.PathLike, out: str | os.PathLike | None = None, *,
              weight: float = 1.0, progress: Progress = None) -> Manifest:
    """theta' = (W theta + w theta_new) / (W + w), reading only the soup and the new shard."""
    check_weight(weight, f"added shard {Path(shard).name}")
    with _Update.open(soup, shard, out) as up:

        def edit(man: Manifest, digest: str) -> None:
            man.members.append(Member(digest, up.shard.name, weight))
            man.member_dtypes = sorted(set(man.member_dtypes) | up.shard_dtypes)
            man.history.append({"op": "add", "id": digest, "name": up.shard.name, "time": time.time()})

        return up.apply(weight, [m.weight for m in up.man.members] + [weight], edit, progress)


def remove_shard(soup: str | os.PathLike, shard: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 progress: Progress = None) -> Manifest:
    """Unlearn ``shard``: theta' = (W theta - w_j theta_j) / (W - w_j), exact when the manifest says so.

    The shard file is identified by content hash, not by name. A non-member or the last
    member is refused before anything is written; a hash mismatch found while streaming
    aborts the write, so every file stays as it was.
    """
    with _Update.open(soup, shard, out) as up:
        if up.man.n <= 1:
            raise SoupError(f"cannot remove the last member of {up.soup.name}: a soup of zero models "
                            "is undefined. Delete the file or add another shard first.")
        j = _find_member(up.man, up.hr, up.shard)
        weight = up.man.members[j].weight

        def edit(man: Manifest, digest: str) -> None:
            gone = man.members.pop(_verify_member(up.man, digest, weight, up.shard, up.soup))
            man.history.append({"op": "remove", "id": gone.id, "name": gone.name, "time": time.time()})

        return up.apply(-weight, [m.weight for i, m in enumerate(up.man.members) if i != j], edit, progress)


class _Update:
    """What add and remove share: the soup and one shard, opened and checked, streamed key by key.

    Each souped key reads the soup's running sum (or, with no sum stored, its averaged tensor,
    scaled back by W) together with the shard's tensor, which is hashed into the shard's id;
    every other key is copied from the soup.
    """

    def __init__(self, soup: str | os.PathLike, shard: str | os.PathLike, out: str | os.PathLike | None,
                 opened: ExitStack):
        self.soup, self.shard = Path(soup), Path(shard)
        self.out = Path(out) if out else self.soup
        self.man = read_manifest(self.soup)
        refuse_overwriting(self.out, [self.shard], "shard")  # replacing the soup itself is what add/remove do by default
        for m in self.man.members:  # an edited manifest must not turn into an inf or wrong soup
            check_weight(m.weight, f"the manifest of {self.soup.name} (member {m.name}; was it edited? rebuild the soup)")
        self.sr = opened.enter_context(Reader(self.soup))
        self.hr = opened.enter_context(Reader(self.shard))
        self.keys = sorted(k for k in self.sr.entries if not k.startswith(SUM_PREFIX))
        self.lay = layout_of((k for k in self.sr.entries if not k.startswith(SUM_PREFIX)), self.soup.name,
                             self.man.components)
        shard_lay = layout_of(self.hr.entries, self.shard.name, self.man.components)
        self.sk = {k for k in self.keys if souped(k, self.sr.entries[k].dtype, self.lay)}
        check_compatible(self.sr, self.hr, self.sk, layouts=(self.lay, shard_lay))
        self.names = {k: shard_lay.key(self.lay.relative(k)) for k in self.sk}  # the shard's name for each key
        self.shard_dtypes = {self.hr.entries[self.names[k]].dtype for k in self.sk}
        self.digest = hashlib.sha256()

    @classmethod
    @contextmanager
    def open(cls, soup: str | os.PathLike, shard: str | os.PathLike,
             out: str | os.PathLike | None) -> Iterator[_Update]:
        with ExitStack() as opened:
            yield cls(soup, shard, out, opened)

    def apply(self, coeff: float, weights: list[float], edit: Callable[[Manifest, str], None],
              progress: Progress) -> Manifest:
        """S' = S + coeff * shard, averaged over ``weights`` (the members after the update).

        ``edit`` records the change in the new manifest once the shard's hash is known; it
        may refuse (a SoupError), and then nothing is written.
        """
        man, sr = self.man, self.sr
        weight = abs(coeff)
        fr_total = _total(weights)
        exact = (man.exact and man.sum_stored and weights_exact([weight], self.shard_dtypes)
                 and Fraction(float(fr_total)) == fr_total)
        static = exact and fp16_static(weights + [weight], set(man.member_dtypes) | self.shard_dtypes)
        method = WeightedSum([1.0 if man.sum_stored else man.total_weight, coeff], float(fr_total),
                             man.sum_stored, exact=exact, static=static)
        src = SUM_PREFIX if man.sum_stored else ""  # the soup's exact running sum, else the averaged tensor
        outputs = [_souped(k, ((Source(sr, src + k), Source(self.hr, self.names[k], self.digest, self.lay.canonical(k))),),
                           sr.entries[k].dtype, sr.entries[k].shape, man.sum_stored)
                   if k in self.sk else Output.copied(Source(sr, k)) for k in self.keys]
        new_man = Manifest.from_json(man.to_json())
        reserve = 2048 + 300 + 2 * len(self.shard.name) + 200

        def seal() -> dict[str, str]:
            edit(new_man, self.digest.hexdigest())
            new_man.exact = bool(method.exact)
            return _meta(sr, new_man)

        stream(self.out, _plan(outputs, _meta(sr, new_man), reserve), method, seal, progress)
        return new_man


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

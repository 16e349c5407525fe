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
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from ..atomic import link_or_copy, replacing
from ..errors import CompartmentsError
from . import exact, idcache
from .layout import WHOLE, KeyLayout, layout_of
from .manifest import FORMAT, META_KEY, SUM_PREFIX, Manifest, Member
from .pipeline import Output, Parts, Plan, Progress, Side, SideParts, Source, hash_header, stream
from .st import DTYPES, FLOATS, NAMES, Planned, Reader, SafetensorsError
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


def copy_soup(src: str | os.PathLike, target: str | os.PathLike, check: Callable[[], None] | None = None) -> Manifest:
    """Copy a soup and its exact-sum sidecar to ``target`` (each atomic; the sidecar first, so the
    new soup never lacks it), then drop ``target``'s older sidecars. ``check`` runs between the
    two copies (an interrupt check: raising there leaves ``target`` as it was)."""
    src, target = Path(src), Path(target)
    man = read_manifest(src)
    if man.exact_data:
        side = exact.sidecar_path(src, man.exact_data["uid"])
        if not side.exists():
            raise SoupError(f"the exact-sum data of {src.name} is missing: {side.name} is not beside it; "
                            "nothing was copied. Rebuild the soup from its members.")
        with replacing(exact.sidecar_path(target, man.exact_data["uid"]), suffix=".partial") as tmp:
            link_or_copy(side, tmp)
    if check:
        check()
    with replacing(target, suffix=".partial") as tmp:
        link_or_copy(src, tmp)
    _drop_stale_sidecars(target, man)
    return man


def read_sums(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every stored running sum S of a soup, float64 and shaped like its tensor (an audit: the
    exact-sum data decoded, from its sidecar (format 2) or the soup file (format 1)).

    Loads all of them at once: meant for tests and small soups, not for streaming.
    """
    path = Path(path)
    man = read_manifest(path)
    if not man.sum_stored:
        raise SoupError(f"{path.name} stores no running sum (it was built with keep_sum=false).")
    with ExitStack() as opened:
        sr = opened.enter_context(Reader(path))
        keys = sorted(k for k in sr.entries if not k.startswith(SUM_PREFIX))
        lay = layout_of(keys, path.name, man.components)
        sk = [k for k in keys if souped(k, sr.entries[k].dtype, lay)]
        if not man.exact_data:
            return {k: sr.tensor(SUM_PREFIX + k).double().clone() for k in sk}
        side, total, guard = _open_sidecar(man, path, set(sk), opened)
        out, w = {}, exact.Scratch()
        for k in sk:
            e = sr.entries[k]
            o = sr.tensor(k).reshape(-1).clone()
            parts = {n: side.tensor(f"{n}:{k}").clone() for n in ("t", "v", "s") if f"{n}:{k}" in side.entries}
            s = torch.empty(o.numel(), dtype=torch.float64)
            exact.decode(o, parts, exact.Scale(e.dtype, total, guard), s, w)
            out[k] = s.reshape(e.shape)
        return out


def content_id(path: str | os.PathLike, components: str = "unet") -> str:
    """The member id: sha256 over the tensors that would be souped (sorted key order); cached
    per file version (``idcache``)."""
    cid = idcache.CachedId(path, f"member:{components}")
    if cid.known:
        return cid.known
    h = cid.hasher
    with Reader(path) as r:
        lay = layout_of(r.entries, r.path.name, components)
        for k in sorted(r.entries):
            e = r.entries[k]
            if souped(k, e.dtype, lay):
                hash_header(h, lay.canonical(k), e.dtype, e.shape)  # as the pipeline hashes members while streaming
                h.update(r.raw(k))
    cid.remember()
    return cid.digest()


# --- the merge method -------------------------------------------------------------------


@dataclass
class WeightedSum:
    """The one merge method: per key S = sum_i c_i x_i, written as S / ``total``.

    ``coeffs`` holds one coefficient per tensor an output reads: build, the member weights;
    add, 1 on the soup's running sum (or W on its averaged tensor) then +w; remove, the same
    then -w_j. ``exact`` starts as what the weights allow and drops at the first addition that
    rounds (TwoSum check), unless ``static`` proved them all exact up front (the fp16 grid).

    ``stored`` says how an update's first read gives S: ``None`` (build; or the running sum
    itself, format 1; or the averaged tensor, no sum kept), or per key the names of the
    sidecar parts read after the soup tensor (``exact.decode``), with the soup's ``scales``.
    """

    coeffs: list[float]
    total: float
    keep_sum: bool  # write S's exact data to the sidecar beside the soup tensor
    exact: bool
    static: bool = False
    acc_dtype: torch.dtype = torch.float64
    stored: dict[str, tuple[str, ...]] | None = None
    scales: dict[str, exact.Scale] = field(default_factory=dict)
    stage: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stage = torch.empty(CHUNK, dtype=torch.float32)  # per soup: safe if two soups run at once
        self.scratch = exact.Scratch()
        self.encoders: dict[str, exact.Encoder] = {}
        self.t8 = torch.empty(0, dtype=torch.int8)

    def __call__(self, out: Output, a: torch.Tensor, xs: Iterator[torch.Tensor]) -> Iterator[Parts | SideParts]:
        """``a`` is a chunk-sized work buffer: S is summed chunk by chunk over all inputs at once,
        so each chunk stays in cache from its first addition to its last use."""
        got = list(xs)  # one read job: every member's tensor (or the soup, its sidecar parts, the shard)
        first, parts = None, {}
        if self.stored is not None:
            first = got.pop(0)
            parts = {name: got.pop(0) for name in self.stored[out.key]}
            coeffs = self.coeffs[1:]
        else:
            coeffs = self.coeffs
        n, dtype = out.numel, out.writes[-1].dtype
        sums = self._sums(out, a, first, parts, got, coeffs)
        if not self.keep_sum:
            yield out.key, dtype, ((c / self.total).to(DTYPES[dtype]) for c in sums)
            return
        enc = self.encoders.get(dtype) or self.encoders.setdefault(dtype, exact.Encoder(dtype, self.total))
        if self.t8.numel() < n:
            self.t8 = torch.empty(0, dtype=torch.int8)
            self.t8 = torch.empty(n, dtype=torch.int8)
        t8 = self.t8[:n]
        yield out.key, dtype, enc.soup_chunks(sums, t8)
        if enc.too_many_exceptions(n):  # keep the whole sum: computed again from the inputs still in hand
            whole = [c.clone() for c in self._sums(out, a, first, parts, got, coeffs)]
            f32 = all(fits_f32(c) for c in whole)
            yield "s:" + out.key, torch.cat([c.to(torch.float32) if f32 else c for c in whole])
            return
        yield "t:" + out.key, t8
        if enc.values:
            yield "v:" + out.key, torch.cat(enc.values)

    def _sums(self, out: Output, a: torch.Tensor, first: torch.Tensor | None, parts: dict[str, torch.Tensor],
              members: list[torch.Tensor], coeffs: list[float]) -> Iterator[torch.Tensor]:
        """S chunk by chunk (a view on ``a``, valid until the next one), checked finite and in range."""
        n, dtype = out.numel, out.writes[-1].dtype
        limit = torch.finfo(DTYPES[dtype]).max * self.total
        escapes = 0
        for i in chunks(n):
            m = min(CHUNK, n - i)
            s = a[:m]
            if first is not None:  # the soup tensor and its sidecar parts give S exactly
                escapes = exact.decode_chunk(first[i:i + m], parts, i, escapes, self.scales[NAMES[first.dtype]], s,
                                             self.scratch)
                rest = zip(members, coeffs, strict=True)
            else:
                fill(s, members[0][i:i + m], coeffs[0], self.stage)
                rest = zip(members[1:], coeffs[1:], strict=True)
            for x, c in rest:
                xi = x[i:i + m]
                if self.static or not self.exact:
                    axpy(s, xi, c, self.stage)  # exact by the fp16 grid bound, or not promised
                else:
                    y = xi.to(s.dtype) * c if c != 1.0 else xi.to(s.dtype)
                    summed, ok = add_checked(s, y)
                    s.copy_(summed)
                    self.exact = self.exact and ok
            lo, hi = (float(v) for v in torch.aminmax(s))  # inf/NaN propagate into the bounds
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise SoupError(f"tensor {out.key}: the soup would hold inf/NaN values (a member holds them, or the "
                                "weights overflow its dtype); nothing was written. Check the members with soup-info.")
            if max(-lo, hi) > limit:
                raise SoupError(f"tensor {out.key}: the soup's values reach {max(-lo, hi) / self.total:.4g}, beyond "
                                f"what its dtype {dtype} holds ({torch.finfo(DTYPES[dtype]).max:g}); nothing was "
                                "written. Choose a wider soup dtype (float16 or bfloat16).")
            yield s


# --- plans: what each output key reads --------------------------------------------------


def _souped(key: str, reads: tuple[tuple[Source, ...], ...], dtype: str, shape: tuple[int, ...]) -> Output:
    return Output(key, reads, (Planned(key, dtype, shape),))


def _side(out: Path, uid: str, total: float, souped_keys: Sequence[str]) -> Side:
    """The sidecar plan for a soup written to ``out``: header room for three parts per key."""
    reserve = 1024 + sum(3 * (len(k) + 120) for k in souped_keys)
    return Side(exact.sidecar_path(out, uid), exact.sidecar_meta(uid, total, exact.guard_for(total)), reserve,
                hashlib.sha256())


def _exact_data(side: Side, uid: str, size: int) -> dict:
    return {"uid": uid, "sha256": side.digest.hexdigest(), "bytes": size, "encoding": exact.ENCODING,
            "file": Path(side.path).name}


def _drop_stale_sidecars(out: Path, man: Manifest) -> None:
    """After a soup is committed: sidecars of earlier versions of ``out`` are garbage."""
    for p in exact.stale_sidecars(out, man.exact_data["uid"] if man.exact_data else None):
        p.unlink(missing_ok=True)


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
        # member ids: from the id cache when this file version was hashed before, else while streaming
        member_ids = [idcache.CachedId(s.path, f"member:{components}") for s in items]
        hashes = [c.hasher for c in member_ids]
        base_id = idcache.CachedId(base_path, f"base:{components}")
        base_hash = base_id.hasher
        outputs = [_souped(k, (tuple(Source(r, n[k], h, base_lay.canonical(k))
                                     for r, n, h in zip(readers, names, hashes, strict=True)),),
                           OUT_DTYPES[dtype] or base_r.entries[k].dtype, base_r.entries[k].shape)
                   if k in sk else Output.copied(Source(base_r, k, base_hash)) for k in keys]
        manifest = Manifest(
            members=[], base={"name": base_path.name}, components=components, dtype=dtype,
            sum_stored=keep_sum, exact=False, souped_keys=len(sk), member_dtypes=sorted(member_dtypes))
        reserve = 2048 + sum(300 + 2 * len(s.path.name) for s in items) + 2 * len(base_path.name)
        uid = exact.new_uid()
        side = _side(Path(out), uid, method.total, sorted(sk)) if keep_sum else None

        def seal(side_bytes: int | None) -> dict[str, str]:
            manifest.members = [Member(c.digest(), s.path.name, s.weight) for c, s in zip(member_ids, items, strict=True)]
            manifest.base["id"] = base_id.digest()
            manifest.exact = bool(method.exact)
            manifest.history.append({"op": "build", "n": len(items), "time": time.time()})
            if side is not None:
                manifest.exact_data = _exact_data(side, uid, side_bytes)
            return _meta(base_r, manifest)

        stream(out, Plan(outputs, _meta(base_r, manifest), reserve, side), method, seal, progress)
        for c in (*member_ids, base_id):
            c.remember()
    _drop_stale_sidecars(Path(out), manifest)
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


def _open_sidecar(man: Manifest, soup: Path, souped_keys: set[str], opened: ExitStack) -> tuple[Reader, float, int]:
    """The exact-sum sidecar of ``soup``, checked against its manifest before anything is read:
    its reader, and the W and guard it was encoded with."""
    data = man.exact_data
    path = exact.sidecar_path(soup, str(data.get("uid", "")))
    fix = ("Nothing was written. Put the soup's own sidecar back beside it (copy both files together; "
           "Save Soup and the command line do), or rebuild the soup from its members.")
    if not path.exists():
        raise SoupError(f"the exact-sum data of {soup.name} is missing: {path.name} is not beside it. {fix}")
    size = path.stat().st_size
    if size != data.get("bytes"):
        raise SoupError(f"the exact-sum data {path.name} of {soup.name} is {size} bytes, its manifest says "
                        f"{data.get('bytes')} (truncated or replaced). {fix}")
    try:
        r = opened.enter_context(Reader(path))
    except SafetensorsError as e:
        raise SoupError(f"the exact-sum data of {soup.name} is unreadable: {e}. {fix}") from None
    try:
        meta = json.loads(r.metadata.get(exact.META_KEY, "{}"))
    except ValueError:
        meta = {}
    if meta.get("uid") != data.get("uid") or meta.get("encoding") != exact.ENCODING:
        raise SoupError(f"{path.name} is not the exact-sum data of {soup.name} (it belongs to another soup "
                        f"or version: uid {str(meta.get('uid'))[:16]} vs {str(data.get('uid'))[:16]}). {fix}")
    for k in sorted(souped_keys):
        if "t:" + k not in r.entries and "s:" + k not in r.entries:
            raise SoupError(f"{path.name} holds no exact sum for tensor {k} of {soup.name}. {fix}")
    return r, float(meta.get("total", 0.0)), int(meta.get("guard", 0))


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
        self.what = f"member:{self.man.components}"
        self.shard_id = idcache.CachedId(self.shard, self.what)
        self.digest = self.shard_id.hasher
        self.side, self.side_total, self.side_guard = (
            _open_sidecar(self.man, self.soup, self.sk, opened) if self.man.exact_data else (None, 0.0, 0))

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
        is_exact = (man.exact and man.sum_stored and weights_exact([weight], self.shard_dtypes)
                    and Fraction(float(fr_total)) == fr_total)
        static = is_exact and fp16_static(weights + [weight], set(man.member_dtypes) | self.shard_dtypes)
        method = WeightedSum([1.0 if man.sum_stored else man.total_weight, coeff], float(fr_total),
                             man.sum_stored, exact=is_exact, static=static)
        side_digest = hashlib.sha256()
        if self.side is not None:  # format 2: the soup tensor, then its residual (and exceptions) or whole sum
            side = self.side
            parts = {k: tuple(n for n in ("t", "v", "s") if f"{n}:{k}" in side.entries) for k in self.sk}
            method.stored = parts
            method.scales = {d: exact.Scale(d, self.side_total, self.side_guard) for d in {sr.entries[k].dtype for k in self.sk}}
            first = {k: (Source(sr, k), *(Source(side, f"{n}:{k}", side_digest) for n in parts[k])) for k in self.sk}
        else:  # format 1: the running sum inside the soup file; no sum: the averaged tensor
            src = SUM_PREFIX if man.sum_stored else ""
            first = {k: (Source(sr, src + k),) for k in self.sk}
        outputs = [_souped(k, ((*first[k], Source(self.hr, self.names[k], self.digest, self.lay.canonical(k))),),
                           sr.entries[k].dtype, sr.entries[k].shape)
                   if k in self.sk else Output.copied(Source(sr, k)) for k in self.keys]
        new_man = Manifest.from_json(man.to_json())
        new_man.format = FORMAT
        reserve = 2048 + 300 + 2 * len(self.shard.name) + 200
        uid = exact.new_uid()
        out_side = _side(self.out, uid, method.total, sorted(self.sk)) if man.sum_stored else None

        def seal(side_bytes: int | None) -> dict[str, str]:
            if self.side is not None and side_digest.hexdigest() != man.exact_data.get("sha256"):
                raise SoupError(f"the exact-sum data {Path(self.side.path).name} of {self.soup.name} does not match "
                                "its manifest (sha256): it was changed or belongs to another soup. Nothing was "
                                "written; rebuild the soup from its members.")
            edit(new_man, self.shard_id.digest())
            new_man.exact = bool(method.exact)
            new_man.exact_data = _exact_data(out_side, uid, side_bytes) if out_side else None
            return _meta(sr, new_man)

        stream(self.out, Plan(outputs, _meta(sr, new_man), reserve, out_side), method, seal, progress)
        self.shard_id.remember()
        _drop_stale_sidecars(self.out, new_man)
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

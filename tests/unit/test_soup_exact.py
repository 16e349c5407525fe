"""Tier 1: the soup's exact-sum sidecar (format 2), the previous format, and the member-id cache."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compartments.soup import (
    SUM_PREFIX,
    SoupError,
    add_shard,
    build_soup,
    copy_soup,
    exact,
    idcache,
    pipeline,
    read_manifest,
    read_sums,
    remove_shard,
)
from compartments.soup.st import AppendWriter

U = "model.diffusion_model."
V1 = Path(__file__).resolve().parent.parent / "data" / "soup_v1"


def finetune(path: Path, seed: int, n: int = 300_000, dtype: torch.dtype = torch.float16,
             spread: float = 0.001) -> Path:
    """One base plus a small per-member delta (as fine-tunes are), a VAE tensor and an int buffer."""
    g, d = torch.Generator().manual_seed(0), torch.Generator().manual_seed(100 + seed)
    sd = {}
    for k, shape in ((f"{U}input_blocks.1.0.weight", (n,)), (f"{U}out.2.weight", (4, 32, 3, 3)),
                     (f"{U}time_embed.0.weight", (64, 32))):
        base = torch.randn(shape, generator=g) * 0.02
        sd[k] = (base + torch.randn(shape, generator=d) * spread).to(dtype)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g).to(dtype)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(7).unsqueeze(0)
    save_file(sd, str(path))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


def sidecar(soup: Path) -> Path:
    return exact.sidecar_path(soup, read_manifest(soup).exact_data["uid"])


def assert_same_soup(a: Path, b: Path) -> None:
    """Bitwise the same soup tensors and the same exact sums (and so the same sidecar data)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    sa, sb = read_sums(a), read_sums(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    xa, xb = load_file(str(sidecar(a))), load_file(str(sidecar(b)))
    assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)


@pytest.fixture
def members(tmp_path: Path) -> list[Path]:
    return [finetune(tmp_path / f"m{i}.safetensors", i) for i in range(5)]


# --- the file sizes the format promises ----------------------------------------------------


def test_soup_file_is_a_members_size_and_the_sidecar_at_most_three_quarters(members, tmp_path):
    for n in (2, 4):
        out = tmp_path / f"soup{n}.safetensors"
        man = build_soup(members[:n], out)
        member = members[0].stat().st_size
        assert man.exact and man.format == "compartments.soup/2"
        assert not any(k.startswith(SUM_PREFIX) for k in load_file(str(out)))  # nothing ComfyUI would load twice
        assert abs(out.stat().st_size - member) < 16_384  # the same tensors; only the header (manifest) differs
        side = sidecar(out)
        assert side.stat().st_size == man.exact_data["bytes"] and side.stat().st_size <= 0.75 * member
        assert man.exact_data["sha256"] and man.exact_data["file"] == side.name
        assert [p.name for p in tmp_path.glob(f"soup{n}.safetensors.*")] == [side.name]  # one sidecar


def test_stored_sums_are_the_exact_real_sums(members, tmp_path):
    out = tmp_path / "s.safetensors"
    build_soup(members[:3], out)
    srcs = [load_file(str(p)) for p in members[:3]]
    for k, s in read_sums(out).items():
        ref = sum(m[k].double() for m in srcs)  # float64 sums of 3 float16 values are exact
        assert torch.equal(s, ref), k
        assert torch.equal(load_file(str(out))[k], (ref / 3).to(torch.float16)), k


@pytest.mark.parametrize("out_dtype", ["F16", "BF16", "F32", "F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("total", [2.0, 3.0, 8.0, 5.5, 200.0])
def test_residual_round_trip_is_bitwise_for_every_soup_dtype(out_dtype, total):
    """Decode(encode(S)) == S bit for bit, whatever the data: zeros, subnormals, values that
    straddle binades, cancellation near zero (exceptions), sums too wide for an int8 (whole)."""
    g = torch.Generator().manual_seed(int(total * 10))
    n = 3 * exact.CHUNK + 17
    base = torch.randn(n, generator=g) * 0.02
    s = sum((base + torch.randn(n, generator=g) * 0.002).to(torch.float16).double() for _ in range(int(total)))
    s[:100] = 0.0
    s[100:200] = 2.0 ** -30  # subnormal in fp16 once divided
    s[200:300] = torch.randn(100, generator=g, dtype=torch.float64) * 50  # far outside the int8 range
    enc = exact.Encoder(out_dtype, total)
    t8 = torch.empty(n, dtype=torch.int8)
    soup = torch.cat(list(enc.soup_chunks((s[i:i + exact.CHUNK] for i in range(0, n, exact.CHUNK)), t8)))
    assert torch.equal(soup, (s / total).to(soup.dtype))
    parts = {"t": t8, **({"v": torch.cat(enc.values)} if enc.values else {})}
    back = torch.empty(n, dtype=torch.float64)
    exact.decode(soup, parts, enc.sc, back, exact.Scratch())
    assert torch.equal(back, s)


def test_a_wide_soup_keeps_whole_sums_and_stays_exact(tmp_path):
    """Sums whose residual does not fit an int8 (here: members spread wider than the soup's
    rounding step can say) are stored whole for that tensor; add/remove stay bitwise."""
    ms = [finetune(tmp_path / f"w{i}.safetensors", i, n=20_000, spread=0.05) for i in range(4)]
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    build_soup(ms, full)
    kinds = {k.split(":")[0] for k in load_file(str(sidecar(full)))}
    assert "t" in kinds  # most tensors still encode
    remove_shard(full, ms[3])
    build_soup(ms[:3], rest)
    assert_same_soup(full, rest)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_remove_and_add_equal_a_rebuild_bitwise_per_member_dtype(tmp_path, dtype):
    ms = [finetune(tmp_path / f"d{i}.safetensors", i, n=40_000, dtype=dtype,
                   spread=0.001 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 0.01) for i in range(4)]
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    man = build_soup(ms[:3], full)
    assert man.exact, dtype
    removed = remove_shard(full, ms[2])
    build_soup(ms[:2], rest)
    assert removed.exact
    assert_same_soup(full, rest)
    add_shard(full, ms[3])
    build_soup([ms[0], ms[1], ms[3]], rest)
    assert_same_soup(full, rest)
    assert len(list(tmp_path.glob("full.safetensors.*.exact"))) == 1  # earlier versions' sidecars are gone


def test_weighted_soup_sums_stay_exact_through_remove(members, tmp_path):
    from compartments.soup import Shard

    weights = [1.0, 2.0, 0.5, 1.5]
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    build_soup([Shard(p, w) for p, w in zip(members[:4], weights, strict=True)], full)
    remove_shard(full, members[1])
    build_soup([Shard(p, w) for p, w in zip(members[:4], weights, strict=True) if p != members[1]], rest)
    assert_same_soup(full, rest)
    srcs = [load_file(str(p)) for p in members[:4]]
    k = f"{U}out.2.weight"
    want = [sum(Fraction(w) * Fraction(float(s[k].flatten()[j])) for w, s in zip(weights, srcs, strict=True)
                if s is not srcs[1]) for j in range(8)]
    got = read_sums(full)[k].flatten()
    assert [Fraction(float(got[j])) for j in range(8)] == want


# --- the previous format -------------------------------------------------------------------


def test_a_format_1_soup_still_loads_adds_and_removes_exactly(tmp_path):
    """soup-v1 was written by the engine before this format (sums inside the soup file)."""
    for p in V1.glob("*.safetensors"):
        shutil.copy(p, tmp_path / p.name)
    old = tmp_path / "soup-v1.safetensors"
    man = read_manifest(old)
    assert man.format == "compartments.soup/1" and man.exact and man.exact_data is None
    ms = [tmp_path / f"m{i}.safetensors" for i in range(4)]
    srcs = [load_file(str(p)) for p in ms[:3]]
    for k, s in read_sums(old).items():  # its in-file sums are the exact sums
        assert torch.equal(s, sum(m[k].double() for m in srcs)), k
    ref = tmp_path / "ref.safetensors"
    removed = tmp_path / "removed.safetensors"
    man = remove_shard(old, ms[2], removed)
    assert man.exact and man.format == "compartments.soup/2" and [m.name for m in man.members] == ["m0.safetensors",
                                                                                                     "m1.safetensors"]
    build_soup(ms[:2], ref)
    assert_same_soup(removed, ref)
    added = tmp_path / "added.safetensors"
    add_shard(old, ms[3], added)
    build_soup(ms, ref)
    assert_same_soup(added, ref)
    assert files(V1) == {p.name: sha(p) for p in sorted(V1.iterdir())}  # fixture untouched (a read-only check)


# --- bad exact-sum data: refused by name, nothing written ------------------------------------


def _broken(members: list[Path], tmp_path: Path, how: str) -> tuple[Path, str]:
    soup = tmp_path / "soup.safetensors"
    build_soup(members[:3], soup)
    side = sidecar(soup)
    if how == "missing":
        side.unlink()
        return soup, "is missing"
    if how == "truncated":
        side.write_bytes(side.read_bytes()[:-1000])
        return soup, "truncated or replaced"
    if how == "changed":
        data = bytearray(side.read_bytes())
        data[-10] ^= 1
        side.write_bytes(bytes(data))
        return soup, "does not match its manifest"
    other = tmp_path / "other.safetensors"  # another soup's sidecar under this soup's name
    build_soup(members[1:4], other)
    shutil.copy(sidecar(other), side)
    return soup, "truncated or replaced|belongs to another soup|does not match"


@pytest.mark.parametrize("how", ["missing", "truncated", "changed", "foreign"])
@pytest.mark.parametrize("op", ["remove", "add"])
def test_bad_exact_data_is_refused_and_nothing_is_written(members, tmp_path, how, op):
    soup, message = _broken(members, tmp_path, how)
    before = files(tmp_path)
    with pytest.raises(SoupError, match=message) as err:
        if op == "remove":
            remove_shard(soup, members[2])
        else:
            add_shard(soup, members[4])
    assert "soup.safetensors" in str(err.value) and "Nothing was written" in str(err.value)
    assert files(tmp_path) == before


def test_a_disk_that_fills_mid_write_leaves_the_soup_and_its_sidecar_untouched(members, tmp_path, monkeypatch):
    soup = tmp_path / "soup.safetensors"
    build_soup(members[:3], soup)
    before = files(tmp_path)
    calls = {"n": 0}
    real = AppendWriter.write

    def full_disk(self, key, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(AppendWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        remove_shard(soup, members[2])
    assert files(tmp_path) == before  # no partial file, the soup and its sidecar as they were
    monkeypatch.undo()
    remove_shard(soup, members[2])  # and the soup still works
    assert read_manifest(soup).n == 2


def test_copy_soup_takes_the_sidecar_along(members, tmp_path):
    soup = tmp_path / "a" / "soup.safetensors"
    soup.parent.mkdir()
    build_soup(members[:3], soup)
    kept = tmp_path / "b" / "kept.safetensors"
    copy_soup(soup, kept)
    remove_shard(kept, members[2])
    ref = tmp_path / "ref.safetensors"
    build_soup(members[:2], ref)
    assert_same_soup(kept, ref)
    assert sorted(p.name for p in kept.parent.iterdir()) == sorted([kept.name, sidecar(kept).name])



def test_copy_soup_links_on_one_filesystem_and_copies_across(members, tmp_path, monkeypatch):
    """Save Soup of a multi-GB soup is a hard link where it can be (no second copy written); a
    later rewrite of the source (always by rename) leaves the saved soup as it was."""
    soup = tmp_path / "soup.safetensors"
    build_soup(members[:3], soup)
    saved = tmp_path / "saved" / "soup.safetensors"
    copy_soup(soup, saved)
    assert saved.stat().st_ino == soup.stat().st_ino and sidecar(saved).stat().st_ino == sidecar(soup).stat().st_ino
    before = saved.read_bytes()
    remove_shard(soup, members[2])  # rewrites the source in place (a rename)
    assert saved.read_bytes() == before and read_manifest(saved).n == 3
    assert read_manifest(soup).n == 2

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    other = tmp_path / "other" / "soup.safetensors"
    copy_soup(saved, other)
    assert other.stat().st_ino != saved.stat().st_ino and other.read_bytes() == saved.read_bytes()
    remove_shard(other, members[2])
    assert read_manifest(other).n == 2 and read_manifest(saved).n == 3

# --- member ids are hashed once per file version ---------------------------------------------


def _hashed_keys(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = pipeline._hash_tensor

    def spy(h, key, *rest):
        seen.append(key)
        return real(h, key, *rest)

    monkeypatch.setattr(pipeline, "_hash_tensor", spy)
    return seen


def test_a_second_soup_over_the_same_members_does_not_rehash(members, tmp_path, monkeypatch):
    seen = _hashed_keys(monkeypatch)
    first = build_soup(members[:3], tmp_path / "a.safetensors")
    member_hashes = [k for k in seen if k.startswith(U)]
    assert len(member_hashes) == 3 * 3  # three members, three souped tensors each
    seen.clear()
    second = build_soup(members[:3], tmp_path / "b.safetensors")
    assert [k for k in seen if k.startswith(U)] == []  # ids from the cache
    assert [m.id for m in second.members] == [m.id for m in first.members]
    seen.clear()
    remove_shard(tmp_path / "b.safetensors", members[2])
    assert [k for k in seen if k.startswith(U)] == []  # the shard's id is cached too


def test_a_member_changed_since_it_was_hashed_is_hashed_again(members, tmp_path):
    soup = tmp_path / "s.safetensors"
    man = build_soup(members[:3], soup)
    assert idcache.lookup(members[2], "member:unet") == man.members[2].id
    finetune(members[2], 99)  # rewritten in place: new bytes, new mtime
    assert idcache.lookup(members[2], "member:unet") is None
    before = files(tmp_path)
    with pytest.raises(SoupError, match="is not a member"):
        remove_shard(soup, members[2])
    assert files(tmp_path) == before


def test_the_id_cache_is_best_effort(members, tmp_path, monkeypatch):
    bad = tmp_path / "ids.json"
    bad.write_text("{not json")
    monkeypatch.setenv("COMPARTMENTS_ID_CACHE", str(bad))
    man = build_soup(members[:2], tmp_path / "s.safetensors")  # a corrupt cache is ignored and rewritten
    assert idcache.lookup(members[0], "member:unet") == man.members[0].id
    monkeypatch.setenv("COMPARTMENTS_ID_CACHE", "off")
    assert idcache.lookup(members[0], "member:unet") is None

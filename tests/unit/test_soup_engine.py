"""Tier 1: the streaming soup engine on tiny state dicts in the SD1.5 key layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compartments.soup import (
    SUM_PREFIX,
    Shard,
    SoupError,
    add_shard,
    build_soup,
    content_id,
    parse_members,
    read_manifest,
    read_sums,
    remove_shard,
)

U = "model.diffusion_model."


def base_sd(dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{U}input_blocks.0.0.weight": (torch.randn(8, 4, 3, 3, generator=g) * 0.2).to(dtype),
        f"{U}input_blocks.0.0.bias": torch.zeros(8).to(dtype),
        f"{U}out.2.weight": (torch.randn(4, 8, 3, 3, generator=g) * 3).to(dtype),
        f"{U}time_embed.0.weight": (torch.randn(16, 8, generator=g) * 1e-3).to(dtype),
        f"{U}middle_block.big.weight": (torch.randn(3, 100_003, generator=g) * 0.1).to(dtype),  # > 2 chunks
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(7).unsqueeze(0),
    }


def make_member(tmp: Path, name: str, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    """A 'fine-tune' of the base: UNet perturbed, VAE perturbed too (to see 'all' vs 'unet')."""
    g = torch.Generator().manual_seed(100 + seed)
    sd = {}
    for k, v in base_sd(dtype).items():
        if v.is_floating_point():
            v = (v.double() + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
        sd[k] = v
    path = tmp / name
    save_file(sd, str(path), metadata={"note": name})
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def members(tmp_path: Path) -> list[Path]:
    return [make_member(tmp_path, f"m{i}.safetensors", i) for i in range(4)]


def model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(SUM_PREFIX)}


def test_uniform_soup_is_the_mean_and_keeps_base_components(members, tmp_path):
    out = tmp_path / "soup.safetensors"
    man = build_soup(members[:3], out)
    sd = load_file(str(out))  # the reference reader accepts the streamed file
    srcs = [load_file(str(p)) for p in members[:3]]
    for k, v in model_keys(sd).items():
        if k.startswith(U):
            ref = (sum(s[k].double() for s in srcs) / 3).to(torch.float16)
            assert torch.equal(v, ref), k
        else:
            assert torch.equal(v, srcs[0][k]), f"{k} must come from the base, untouched"
    assert man.n == 3 and man.exact and man.sum_stored and man.components == "unet"
    assert [m.id for m in man.members] == [content_id(p) for p in members[:3]]
    assert read_manifest(out).to_json() == man.to_json()
    assert load_file(str(out)).keys() == sd.keys()


def test_remove_equals_rebuild_bitwise(members, tmp_path):
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    build_soup(members[:3], full)
    build_soup(members[:2], rest)
    man = remove_shard(full, members[2])
    assert man.exact and [m.name for m in man.members] == ["m0.safetensors", "m1.safetensors"]
    a, b = load_file(str(full)), load_file(str(rest))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_add_equals_rebuild_bitwise(members, tmp_path):
    soup, ref = tmp_path / "s.safetensors", tmp_path / "ref.safetensors"
    build_soup(members[:2], soup)
    add_shard(soup, members[2])
    build_soup(members[:3], ref)
    a, b = load_file(str(soup)), load_file(str(ref))
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert read_manifest(soup).exact


def test_weighted_remove_renormalises_exactly(members, tmp_path):
    weights = [1.0, 2.0, 0.5, 1.5]
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    build_soup([Shard(p, w) for p, w in zip(members, weights, strict=True)], full)
    remove_shard(full, members[1])
    man = build_soup([Shard(p, w) for p, w in zip(members, weights, strict=True) if p != members[1]], rest)
    assert man.exact and not man.uniform
    a, b = load_file(str(full)), load_file(str(rest))
    for k in b:
        assert torch.equal(a[k], b[k]), k
    srcs = [load_file(str(p)) for p in members]
    k = f"{U}out.2.weight"
    ref = (srcs[0][k].double() + 0.5 * srcs[2][k].double() + 1.5 * srcs[3][k].double()) / 3.0
    assert torch.equal(a[k], ref.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_dtypes_remove_matches_rebuild(tmp_path, dtype):
    ms = [make_member(tmp_path, f"d{i}.safetensors", i, dtype) for i in range(3)]
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    build_soup(ms, full)
    man = remove_shard(full, ms[0])
    ref = build_soup(ms[1:], rest, base=ms[0])  # un-souped tensors keep coming from the original base
    a, b = load_file(str(full)), load_file(str(rest))
    if man.exact and ref.exact:
        for k in b:
            assert torch.equal(a[k], b[k]), k
    for k in b:
        if b[k].is_floating_point():
            tol = 4 * torch.finfo(torch.float32).eps * float(b[k].abs().max().float()) + 1e-30
            assert float((a[k].double() - b[k].double()).abs().max()) <= max(tol, 0.0), k


def test_inexact_weights_are_reported_and_close(members, tmp_path):
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    ws = [0.3, 0.7, 0.1]
    man = build_soup([Shard(p, w) for p, w in zip(members[:3], ws, strict=True)], full, dtype="float32")
    assert not man.exact  # 0.3 has a 52-bit mantissa: w*theta rounds in float64
    remove_shard(full, members[2])
    build_soup([Shard(p, w) for p, w in zip(members[:2], ws[:2], strict=True)], rest, dtype="float32")
    a, b = load_file(str(full)), load_file(str(rest))
    for k in model_keys(b):
        if k.startswith(U):
            eps = torch.finfo(torch.float32).eps
            assert float((a[k] - b[k]).abs().max()) <= 2 * eps * float(b[k].abs().max()), k


def test_without_sum_float32_soup_matches_to_float32_rounding(members, tmp_path):
    full, rest = tmp_path / "full.safetensors", tmp_path / "rest.safetensors"
    man = build_soup(members[:3], full, keep_sum=False, dtype="float32")
    assert not man.sum_stored and not man.exact
    assert not any(k.startswith(SUM_PREFIX) for k in load_file(str(full)))
    remove_shard(full, members[1])
    build_soup([members[0], members[2]], rest, keep_sum=False, dtype="float32")
    a, b = load_file(str(full)), load_file(str(rest))
    for k in b:
        if k.startswith(U):
            eps = torch.finfo(torch.float32).eps
            assert float((a[k] - b[k]).abs().max()) <= 4 * eps * float(b[k].abs().max()), k


def test_components_all_soups_vae_but_not_int_buffers(members, tmp_path):
    out = tmp_path / "all.safetensors"
    man = build_soup(members[:2], out, components="all")
    sd = load_file(str(out))
    srcs = [load_file(str(p)) for p in members[:2]]
    k = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(sd[k], ((srcs[0][k].double() + srcs[1][k].double()) / 2).to(torch.float16))
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert torch.equal(sd[pid], srcs[0][pid])
    assert man.souped_keys == 6


def test_remove_non_member_and_last_member_leave_files_untouched(members, tmp_path):
    soup = tmp_path / "s.safetensors"
    build_soup(members[:2], soup)
    before = {p: digest(p) for p in [soup, *members]}
    with pytest.raises(SoupError, match="not a member"):
        remove_shard(soup, members[3])
    renamed = tmp_path / "m0-copy.safetensors"
    renamed.write_bytes(members[2].read_bytes())
    with pytest.raises(SoupError, match="not a member"):
        remove_shard(soup, renamed)
    single = tmp_path / "one.safetensors"
    build_soup(members[:1], single)
    one_before = digest(single)
    with pytest.raises(SoupError, match="last member"):
        remove_shard(single, members[0])
    assert digest(single) == one_before
    assert {p: digest(p) for p in before} == before
    assert not list(tmp_path.glob(".*partial"))


def test_remove_renamed_member_by_content(members, tmp_path):
    soup = tmp_path / "s.safetensors"
    build_soup(members[:3], soup)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(members[1].read_bytes())
    man = remove_shard(soup, renamed)
    assert [m.name for m in man.members] == ["m0.safetensors", "m2.safetensors"]


def test_mismatch_names_first_differing_key_and_shapes(members, tmp_path):
    sd = load_file(str(members[1]))
    sd[f"{U}out.2.weight"] = torch.zeros(4, 8, 1, 1, dtype=torch.float16)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(SoupError, match=r"out\.2\.weight.*\[4, 8, 3, 3\].*\[4, 8, 1, 1\]"):
        build_soup([members[0], bad], tmp_path / "x.safetensors")
    del sd[f"{U}out.2.weight"]
    save_file(sd, str(bad))
    with pytest.raises(SoupError, match=r"out\.2\.weight.*missing"):
        build_soup([members[0], bad], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_interrupted_build_leaves_no_partial_file_and_keeps_target(members, tmp_path):
    out = tmp_path / "soup.safetensors"
    build_soup(members[:2], out)
    before = digest(out)

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        build_soup(members[:3], out, progress=progress)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_progress_counts_every_key(members, tmp_path):
    seen: list[tuple[int, int]] = []
    build_soup(members[:2], tmp_path / "s.safetensors", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (7, 7) and [d for d, _ in seen] == list(range(1, 8))


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), 1e308, 5e-324, 1e7, 1e-7])
def test_bad_weights_are_refused(members, tmp_path, weight):
    """Overflowing, underflowing and non-finite weights are refused before anything is written
    (1e308 made an inf soup; 5e-324 a wrong soup whose manifest claimed exact)."""
    with pytest.raises(SoupError, match="must be a finite number from 1e-06 to 1e\\+06"):
        build_soup([Shard(members[0], 1.0), Shard(members[1], weight)], tmp_path / "x.safetensors")
    soup = tmp_path / "s.safetensors"
    build_soup(members[:2], soup)
    before = digest(soup)
    with pytest.raises(SoupError, match="must be a finite number"):
        add_shard(soup, members[2], weight=weight)
    assert not (tmp_path / "x.safetensors").exists() and digest(soup) == before
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in files if not n.endswith(".exact")] == sorted(["s.safetensors"] + [m.name for m in members])
    assert [n for n in files if n.endswith(".exact")] == [read_manifest(soup).exact_data["file"]]  # its one sidecar


def test_exact_is_never_claimed_falsely_at_the_weight_extremes(tmp_path):
    """At the edges of the weight range the manifest's 'exact' must hold: the stored running sum
    equals sum_i w_i * theta_i computed with rationals, element by element."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(5)
    key = f"{U}input_blocks.0.0.weight"
    paths, weights = [], [1e6, 1e-6, 3.0, 2.0 ** -19]
    for i, dtype in enumerate((torch.float32, torch.float32, torch.float32, torch.float32)):
        t = (torch.randn(6, generator=g) * 10 ** (i - 2)).to(dtype)
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({key: t, "first_stage_model.x": torch.zeros(2)}, str(paths[-1]))
    for ws in (weights, [1e6, 1e6, 1e6, 1e6], [1e-6, 1e-6, 1.0, 1e-6]):
        out = tmp_path / "soup.safetensors"
        man = build_soup([Shard(p, w) for p, w in zip(paths, ws, strict=True)], out)
        stored = read_sums(out)[key]
        members = [load_file(str(p))[key].double() for p in paths]
        exact_sum = [sum((Fraction(w) * Fraction(float(m[j])) for w, m in zip(ws, members, strict=True)), Fraction(0))
                     for j in range(stored.numel())]
        matches = all(Fraction(float(stored[j])) == exact_sum[j] for j in range(stored.numel()))
        assert matches or not man.exact, f"manifest claims exact for weights {ws} but the sum is rounded"
        mean = load_file(str(out))[key].double()
        assert torch.isfinite(mean).all()
        out.unlink()


def test_inf_member_gives_no_soup(members, tmp_path):
    bad = tmp_path / "inf.safetensors"
    sd = load_file(str(members[1]))
    sd[f"{U}out.2.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, str(bad))
    with pytest.raises(SoupError, match="inf/NaN.*nothing was written"):
        build_soup([members[0], bad], tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("*x.safetensors*")) and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
def test_output_that_is_an_input_is_refused(members, tmp_path, link):
    """`soup a b -o b` and `soup-remove S b -o b` would destroy b: refused, b untouched."""
    import os

    target = {"same path": members[1], "symlink": tmp_path / "alias.safetensors",
              "hard link": tmp_path / "hard.safetensors"}[link]
    if link == "symlink":
        os.symlink(members[1], target)
    elif link == "hard link":
        os.link(members[1], target)
    before = digest(members[1])
    with pytest.raises(SoupError, match="is the member m1.safetensors"):
        build_soup(members[:2], target)
    soup = tmp_path / "s.safetensors"
    build_soup(members[:3], soup)
    with pytest.raises(SoupError, match="is the shard m1.safetensors"):
        remove_shard(soup, members[1], target)
    with pytest.raises(SoupError, match="is the shard m1.safetensors"):
        add_shard(soup, members[1], target)
    assert digest(members[1]) == before


def test_edited_manifest_weight_is_refused(members, tmp_path):
    import json

    from safetensors import safe_open

    from compartments.soup import META_KEY

    soup = tmp_path / "s.safetensors"
    build_soup(members[:3], soup)
    with safe_open(str(soup), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    man = json.loads(meta[META_KEY])
    man["members"][0]["weight"] = 1e308
    meta[META_KEY] = json.dumps(man)
    save_file(tensors, str(soup), metadata=meta)
    before = digest(soup)
    with pytest.raises(SoupError, match="was it edited"):
        remove_shard(soup, members[2])
    assert digest(soup) == before


def test_parse_members():
    assert parse_members("a.safetensors\n# note\n b.safetensors , 2.5 \n\n") == [("a.safetensors", 1.0), ("b.safetensors", 2.5)]
    with pytest.raises(SoupError):
        parse_members("a.safetensors, x")
    for bad in ("0", "1e308", "nan", "-2"):
        with pytest.raises(SoupError):
            parse_members(f"a.safetensors, {bad}")


def test_reader_rejects_broken_files(tmp_path):
    from compartments.soup.st import Reader, SafetensorsError

    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        Reader(short)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((20).to_bytes(8, "little") + b"not json at all!!!!!")
    with pytest.raises(SafetensorsError, match="unreadable safetensors header"):
        Reader(junk)
    with pytest.raises(SoupError, match="not a Compartments soup"):
        save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
        read_manifest(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("positional", [True, False], ids=["preadv", "no-preadv (Windows)"])
def test_reader_reads_tensors_from_two_threads(members, tmp_path, monkeypatch, positional):
    """remove prefetches the next sum on a thread while the main thread copies other tensors."""
    from concurrent.futures import ThreadPoolExecutor

    from compartments.soup import st

    if not positional:
        monkeypatch.delattr(st.os, "preadv", raising=False)
    ref = load_file(str(members[0]))
    r = st.Reader(members[0])
    jobs = list(ref) * 3
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: bytes(r.raw(k, st.SharedBuffer())), jobs))
    r.close()
    for k, data in zip(jobs, got, strict=True):
        assert data == ref[k].contiguous().view(torch.uint8).numpy().tobytes(), k


def test_parse_weights():
    from compartments.soup import SoupError, parse_weights

    assert parse_weights("", 3) == [1.0, 1.0, 1.0]
    assert parse_weights(" 2, 1;0.5 ", 3) == [2.0, 1.0, 0.5]
    assert parse_weights("0, 1", 2) == [0.0, 1.0]
    for bad, n in (("1, 1", 3), ("x", 1), ("0, 0", 2), ("1, -1", 2), ("nan, 1", 2), ("inf, 1", 2)):
        with pytest.raises(SoupError):
            parse_weights(bad, n)

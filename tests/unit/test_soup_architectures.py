"""Soups of any architecture ComfyUI loads, in both file layouts and every storage dtype.

Members here are fine-tune-like (one base plus small per-member deltas) in the key layouts of a
Flux-class DiT (diffusion-model-only files, unprefixed) and of a checkpoint
(``model.diffusion_model.`` beside a text encoder and a VAE). The identities: the same weights
give the same member id in either layout; a soup over mixed layouts equals the soup over one;
wherever the manifest says ``exact``, removing a member is bitwise the rebuild without it, per
storage dtype (fp16, bf16, fp32, fp8 e4m3 / e5m2) and per weight set.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from compartments.soup import Shard, SoupError, build_soup, content_id, remove_shard
from compartments.soup.layout import LayoutError

pytestmark = pytest.mark.unit

# A Flux-class diffusion model's key layout (two double blocks, one single block), small widths.
FLUX_SHAPES = {
    "img_in.weight": (32, 64), "img_in.bias": (32,), "txt_in.weight": (32, 48), "txt_in.bias": (32,),
    "time_in.in_layer.weight": (32, 256), "guidance_in.in_layer.weight": (32, 256),
    "vector_in.in_layer.weight": (32, 24),
    **{f"double_blocks.{i}.{part}.weight": (96, 32) for i in range(2) for part in ("img_attn.qkv", "txt_attn.qkv")},
    **{f"double_blocks.{i}.img_mlp.0.weight": (128, 32) for i in range(2)},
    "single_blocks.0.linear1.weight": (224, 32), "single_blocks.0.linear2.weight": (32, 160),
    "final_layer.linear.weight": (64, 32),
}
OTHER = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (24,),
         "vae.decoder.conv_in.weight": (8, 16, 3, 3)}
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _weights(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Base + a small per-member delta, stored in ``dtype`` (as fine-tunes of one base are)."""
    base, delta = torch.Generator().manual_seed(0), torch.Generator().manual_seed(100 + seed)
    return {k: (torch.randn(s, generator=base) * 0.5 + torch.randn(s, generator=delta) * 0.05).to(dtype)
            for k, s in FLUX_SHAPES.items()}


def _dmo(path, seed: int, dtype: torch.dtype = torch.bfloat16):
    save_file(_weights(seed, dtype), str(path))
    return path


def _checkpoint(path, seed: int, dtype: torch.dtype = torch.bfloat16):
    sd = {f"model.diffusion_model.{k}": v for k, v in _weights(seed, dtype).items()}
    sd.update({k: torch.ones(s) for k, s in OTHER.items()})
    save_file(sd, str(path))
    return path


def _old_content_id(path) -> str:
    """The member id as it was computed before diffusion-model-only files (checkpoints only)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            if k.startswith("model.diffusion_model.") and f.get_slice(k).get_dtype() in ("F16", "BF16", "F32", "F64"):
                t = f.get_tensor(k)
                dt = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype]
                h.update(f"{k}|{dt}|{list(t.shape)}|".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_same_weights_have_one_id_in_either_layout_and_old_ids_still_verify(tmp_path):
    ckpt, dmo = _checkpoint(tmp_path / "a.safetensors", 1), _dmo(tmp_path / "a-dmo.safetensors", 1)
    assert content_id(ckpt) == content_id(dmo) == _old_content_id(ckpt)


def test_diffusion_model_only_soup_keeps_its_layout_and_remove_equals_rebuild(tmp_path):
    members = [_dmo(tmp_path / f"m{i}.safetensors", i) for i in range(4)]
    full = build_soup(members, tmp_path / "soup.safetensors")
    assert full.exact and full.souped_keys == len(FLUX_SHAPES)
    out = load_file(str(tmp_path / "soup.safetensors"))
    assert {k for k in out if not k.startswith("compartments.")} == set(FLUX_SHAPES)
    remove_shard(tmp_path / "soup.safetensors", members[2], tmp_path / "removed.safetensors")
    build_soup([members[i] for i in (0, 1, 3)], tmp_path / "rebuilt.safetensors")
    a, b = load_file(str(tmp_path / "removed.safetensors")), load_file(str(tmp_path / "rebuilt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_members_may_mix_checkpoints_and_diffusion_model_only_files(tmp_path):
    """Base a checkpoint (its text encoder and VAE are kept), members in either layout."""
    ckpts = [_checkpoint(tmp_path / f"c{i}.safetensors", i) for i in range(3)]
    mixed = [ckpts[0], _dmo(tmp_path / "d1.safetensors", 1), _dmo(tmp_path / "d2.safetensors", 2)]
    m1 = build_soup(ckpts, tmp_path / "ckpt-soup.safetensors")
    m2 = build_soup(mixed, tmp_path / "mixed-soup.safetensors")
    assert [m.id for m in m1.members] == [m.id for m in m2.members]
    a, b = load_file(str(tmp_path / "ckpt-soup.safetensors")), load_file(str(tmp_path / "mixed-soup.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(OTHER) <= set(b)
    # a checkpoint shard removed from a soup built from its diffusion-model-only twin: identified by content
    remove_shard(tmp_path / "mixed-soup.safetensors", ckpts[2], tmp_path / "mixed-removed.safetensors")
    build_soup(ckpts[:2], tmp_path / "two.safetensors")
    a, b = load_file(str(tmp_path / "mixed-removed.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("code", list(DTYPES))
@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (2, 1, 1, 4), (0.1, 0.7, 1.3, 2)], ids=["uniform", "dyadic", "decimal"])
def test_exact_promise_per_dtype_and_weight_set(tmp_path, code, weights):
    """Where the manifest says exact, remove is bitwise the rebuild; where it does not, it says so
    and remove is still the rebuild to the storage dtype's rounding."""
    dtype = DTYPES[code]
    members = [Shard(_dmo(tmp_path / f"m{i}.safetensors", i, dtype), w) for i, w in enumerate(weights)]
    man = build_soup(members, tmp_path / "soup.safetensors")
    assert man.member_dtypes == [code]
    out = load_file(str(tmp_path / "soup.safetensors"))
    assert out["img_in.weight"].dtype == dtype  # dtype "same": stored as the members are
    removed = remove_shard(tmp_path / "soup.safetensors", members[1].path, tmp_path / "removed.safetensors")
    build_soup([members[i] for i in (0, 2, 3)], tmp_path / "rebuilt.safetensors")
    a, b = load_file(str(tmp_path / "removed.safetensors")), load_file(str(tmp_path / "rebuilt.safetensors"))
    if man.exact and removed.exact:
        assert all(torch.equal(a[k], b[k]) for k in a), code
    else:
        assert weights == (0.1, 0.7, 1.3, 2), "only non-dyadic weights may lose exactness"
        for k in FLUX_SHAPES:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=0.13, atol=0.02), (code, k)
    if weights != (0.1, 0.7, 1.3, 2):
        assert man.exact, (code, weights)


def test_mixed_member_dtypes_follow_the_stated_rule(tmp_path):
    """Every storage dtype is exact in float64: members may mix them; the soup is stored in the
    base's dtype (or the dtype asked for), and the manifest lists the member dtypes."""
    members = [_dmo(tmp_path / "a.safetensors", 0, torch.float8_e4m3fn), _dmo(tmp_path / "b.safetensors", 1,
                                                                            torch.bfloat16)]
    man = build_soup(members, tmp_path / "soup.safetensors")
    assert man.member_dtypes == ["BF16", "F8_E4M3"] and man.exact
    assert load_file(str(tmp_path / "soup.safetensors"))["img_in.weight"].dtype == torch.float8_e4m3fn
    # fp8 members, a float16 soup: still exact (the stored sums are exact; float16 only rounds the mean),
    # so removing a member equals souping the rest into float16, bit for bit
    third = _dmo(tmp_path / "c.safetensors", 2, torch.float8_e4m3fn)
    man16 = build_soup([*members, third], tmp_path / "soup16.safetensors", dtype="float16")
    assert man16.exact and load_file(str(tmp_path / "soup16.safetensors"))["img_in.weight"].dtype == torch.float16
    remove_shard(tmp_path / "soup16.safetensors", third, tmp_path / "soup16-removed.safetensors")
    build_soup(members, tmp_path / "soup16-rebuilt.safetensors", dtype="float16")
    a = load_file(str(tmp_path / "soup16-removed.safetensors"))
    b = load_file(str(tmp_path / "soup16-rebuilt.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    build_soup(members, tmp_path / "soup8.safetensors", dtype="float8_e5m2", base=members[1])
    assert load_file(str(tmp_path / "soup8.safetensors"))["img_in.weight"].dtype == torch.float8_e5m2


def test_other_architectures_and_files_without_a_diffusion_model_are_refused(tmp_path):
    flux = _dmo(tmp_path / "flux.safetensors", 0)
    unet = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.0.transformer.x": torch.zeros(2)}, str(unet))
    with pytest.raises(SoupError, match="first differing key 'model.diffusion_model.") as err:
        build_soup([unet, flux], tmp_path / "x.safetensors")
    assert "sdxl.safetensors" in str(err.value) and "flux.safetensors" in str(err.value)
    te = tmp_path / "te.safetensors"
    save_file({"text_encoders.t5xxl.transformer.shared.weight": torch.zeros(4, 4)}, str(te))
    with pytest.raises(LayoutError, match="no diffusion model"):
        build_soup([te, te], tmp_path / "y.safetensors")
    # components='all' compares every key as it is: layouts may not mix there
    ckpt = _checkpoint(tmp_path / "c.safetensors", 1)
    with pytest.raises(SoupError, match="first differing key"):
        build_soup([ckpt, flux], tmp_path / "z.safetensors", components="all")
    assert not list(tmp_path.glob("[xyz].safetensors*")), "nothing written"


@pytest.mark.parametrize("components", ["unet", "all"])
def test_scalar_tensors_are_souped_and_removed_like_any_other(tmp_path, components):
    """SDXL checkpoints carry 0-d tensors (OpenCLIP bigG's ``logit_scale``): they are written, souped
    (components='all') and removed exactly like the rest."""
    paths = []
    for i in range(3):
        sd = {"model.diffusion_model.out.2.weight": torch.randn(4, 8, generator=torch.Generator().manual_seed(i)).half(),
              "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6 + i / 8, dtype=torch.float16)}
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    man = build_soup(paths, tmp_path / "soup.safetensors", components=components)
    soup = load_file(str(tmp_path / "soup.safetensors"))
    assert soup["conditioner.embedders.1.model.logit_scale"].shape == () and man.exact
    remove_shard(tmp_path / "soup.safetensors", paths[2], tmp_path / "removed.safetensors")
    build_soup(paths[:2], tmp_path / "rebuilt.safetensors", components=components)
    a, b = load_file(str(tmp_path / "removed.safetensors")), load_file(str(tmp_path / "rebuilt.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_writer_takes_0d_tensors(tmp_path):
    from compartments.soup.st import Planned, atomic_writer

    with atomic_writer(tmp_path / "s.safetensors", [Planned("s", "F16", ())], {}) as w:
        w.write("s", torch.tensor(4.6, dtype=torch.float16))
    assert load_file(str(tmp_path / "s.safetensors"))["s"] == torch.tensor(4.6, dtype=torch.float16)

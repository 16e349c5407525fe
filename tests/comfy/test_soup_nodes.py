"""Tier 2: the soup nodes inside a real, in-process ComfyUI, side by side with core merging."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MEMBERS = "soup-member-a.safetensors\nsoup-member-b.safetensors\nsoup-member-c.safetensors"


@pytest.fixture(scope="module")
def prepared(comfy):
    from compartments.tiny import soup as tiny_soup

    return tiny_soup.prepare(comfy.models_dir, comfy.input_dir)


def _build(comfy, members: str = MEMBERS, **kw):
    args = {"members": members, "base": "first member", "components": "unet", "dtype": "same", "keep_sum": True}
    args.update(kw)
    return comfy.run("CompartmentsSoupBuild", **args)


def _unet_weights(model) -> dict[str, torch.Tensor]:
    """The weights the sampler will use: patches applied by core's own loader path."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    sd = {k: v.detach().float().cpu().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    model.unpatch_model()
    return sd


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full(comfy, prepared):
    """Uniform float32 soup of the three members, built once through the node."""
    return _build(comfy, dtype="float32")


def test_uniform_soup_equals_core_model_merge_simple_chain(comfy, full):
    import comfy.sd as comfy_sd

    ckpts = [comfy.models_dir / "checkpoints" / n for n in MEMBERS.splitlines()]
    models = [comfy_sd.load_checkpoint_guess_config(str(p), output_vae=False, output_clip=False)[0] for p in ckpts]
    (m12,) = comfy.run("ModelMergeSimple", model1=models[0], model2=models[1], ratio=1 / 2)
    (m123,) = comfy.run("ModelMergeSimple", model1=m12, model2=models[2], ratio=2 / 3)
    core = _unet_weights(m123)

    soup, model, clip, vae, text = full
    ours = _unet_weights(model)
    assert ours.keys() == core.keys()
    eps = torch.finfo(torch.float32).eps
    for k in core:
        tol = 4 * eps * float(core[k].abs().max()) + 1e-12
        assert float((ours[k] - core[k]).abs().max()) <= tol, k
    # and the in-graph lazy soup is literally the same chain of patches
    (lazy,) = comfy.run("CompartmentsSoupModels", model_1=models[0], model_2=models[1], model_3=models[2])
    lazy_w = _unet_weights(lazy)
    assert all(torch.equal(lazy_w[k], core[k]) for k in core)
    assert "soup of 3 member(s), uniform" in text and soup.manifest.exact


def test_remove_and_add_shard_nodes_equal_rebuild_bitwise_and_sample(comfy, full):
    removed, model, clip, vae, text = comfy.run("CompartmentsSoupRemoveShard", soup=full[0],
                                                checkpoint="soup-member-b.safetensors")
    rebuilt = _build(comfy, members="soup-member-a.safetensors\nsoup-member-c.safetensors", dtype="float32")[0]
    a, b = load_file(removed.path), load_file(rebuilt.path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert removed.manifest.exact and [m.name for m in removed.manifest.members] == [
        "soup-member-a.safetensors", "soup-member-c.safetensors"]
    assert "history: remove soup-member-b.safetensors" in text

    # adding b back (in another order) gives the three-member soup bit for bit: the sum is exact
    added = comfy.run("CompartmentsSoupAddShard", soup=rebuilt, checkpoint="soup-member-b.safetensors", weight=1.0)[0]
    c, d = load_file(added.path), load_file(full[0].path)
    assert all(torch.equal(c[k], d[k]) for k in d)

    # the souped MODEL samples with core KSampler
    (cond,) = comfy.run("CLIPTextEncode", text="a soup", clip=clip)
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = comfy.run("KSampler", model=model, seed=0, steps=2, cfg=2.0, sampler_name="euler",
                       scheduler="normal", positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()


def test_save_load_inspect_roundtrip(comfy, full):
    import folder_paths

    soup = full[0]
    (name,) = comfy.run("CompartmentsSoupSave", soup=soup, filename="three", overwrite=False)
    target = comfy.models_dir / "soups" / "three.safetensors"
    assert name == "three.safetensors" and target.is_file()
    assert _digest(target) == _digest(Path(soup.path))
    assert not list(target.parent.glob(".*partial"))
    with pytest.raises(ValueError, match="Save Soup: input 'filename'.*already exists"):
        comfy.run("CompartmentsSoupSave", soup=soup, filename="three", overwrite=False)
    assert "three.safetensors" in folder_paths.get_filename_list("soups")
    # the exact-sum sidecar travels with it, under the saved name, and is never offered as a soup
    uid = soup.manifest.exact_data["uid"]
    side = target.with_name(f"three.safetensors.{uid[:16]}.exact")
    assert side.is_file() and _digest(side) == _digest(Path(f"{soup.path}.{uid[:16]}.exact"))
    assert not [n for n in folder_paths.get_filename_list("soups") if not n.endswith(".safetensors")]
    loaded, model, clip, vae, text = comfy.run("CompartmentsSoupLoad", soup_name="three.safetensors")
    assert type(model.model.model_config).__name__ == "SD15"
    (info,) = comfy.run("CompartmentsSoupInspect", soup=loaded, as_json=False)
    assert "uniform" in info and "w=1 (0.3333)" in info
    for m in soup.manifest.members:
        assert m.id[:16] in info
    (js,) = comfy.run("CompartmentsSoupInspect", soup=loaded, as_json=True)
    assert json.loads(js)["n"] == 3
    # the loaded soup still removes exactly: its sidecar was found beside it in models/soups
    removed = comfy.run("CompartmentsSoupRemoveShard", soup=loaded, checkpoint="soup-member-c.safetensors")[0]
    rebuilt = _build(comfy, members="soup-member-a.safetensors\nsoup-member-b.safetensors", dtype="float32")[0]
    a, b = load_file(removed.path), load_file(rebuilt.path)
    assert removed.manifest.exact and all(torch.equal(a[k], b[k]) for k in b)


def test_remove_non_member_is_a_clear_error_and_touches_nothing(comfy, full):
    import shutil

    soup = full[0]
    before = _digest(Path(soup.path))
    from compartments.tiny import sd15 as tiny_sd15

    stranger = comfy.models_dir / "checkpoints" / "soup-stranger.safetensors"
    shutil.copyfile(tiny_sd15.checkpoint(0), stranger)  # the base itself: same layout, not a member
    temp = Path(soup.path).parent
    files_before = sorted(p.name for p in temp.iterdir())
    with pytest.raises(ValueError, match="Soup Remove Shard: input 'checkpoint'.*not a member"):
        comfy.run("CompartmentsSoupRemoveShard", soup=soup, checkpoint="soup-stranger.safetensors")
    assert _digest(Path(soup.path)) == before
    assert sorted(p.name for p in temp.iterdir()) == files_before
    with pytest.raises(ValueError, match="Soup Checkpoints: input 'members'.*not in models/checkpoints"):
        _build(comfy, members="soup-member-a.safetensors\nnope.safetensors")


def test_cancel_leaves_no_partial_file(comfy, prepared):
    import comfy.model_management as mm

    temp_files = set()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _build(comfy)
    finally:
        mm.interrupt_current_processing(False)
    import folder_paths

    folder = Path(folder_paths.get_temp_directory()) / "compartments_soup"
    temp_files = [p.name for p in folder.iterdir() if p.name.endswith(".partial")]
    assert temp_files == []


def test_swept_scratch_soup_reruns_the_cached_node_and_errors_clearly(comfy, prepared):
    """ComfyUI caches a soup wire by inputs; if its temp file is swept, the node must run again."""
    build = comfy.node("CompartmentsSoupBuild")
    add = comfy.node("CompartmentsSoupAddShard")
    members = "soup-member-a.safetensors\nsoup-member-b.safetensors"
    args = {"members": members, "base": "first member", "components": "unet", "dtype": "same", "keep_sum": False}
    soup = _build(comfy, **args)[0]
    first = build.fingerprint_inputs(**args)
    assert build.fingerprint_inputs(**args) == first  # nothing changed: the cached soup stays valid
    add_first = add.fingerprint_inputs(checkpoint="soup-member-c.safetensors", weight=1.0)
    Path(soup.path).unlink()  # what emptying ComfyUI's temp folder does to a cached wire
    assert build.fingerprint_inputs(**args) != first
    assert add.fingerprint_inputs(checkpoint="soup-member-c.safetensors", weight=1.0) != add_first
    with pytest.raises(ValueError, match="Inspect Soup: input 'soup'.*is gone.*queue the workflow again"):
        comfy.run("CompartmentsSoupInspect", soup=soup, as_json=False)
    with pytest.raises(ValueError, match="Soup Add Shard: input 'soup'.*is gone"):
        comfy.run("CompartmentsSoupAddShard", soup=soup, checkpoint="soup-member-c.safetensors", weight=1.0)
    assert "nope.safetensors" in build.fingerprint_inputs(**{**args, "members": "nope.safetensors"})


def test_soup_models_any_number_is_the_four_input_node_with_autogrow(comfy, prepared):
    """Soup Models (any number) is served exactly where the release has io.Autogrow, and gives the
    same patched weights as the four-input node for the same weights; bad weights name the input."""
    import comfy.sd as comfy_sd
    from comfy_api.latest import io

    import nodes as comfy_nodes
    from compartments.nodes import NEEDS_NEWER_V3

    node = "CompartmentsSoupModelsAny"
    has_autogrow = hasattr(io, NEEDS_NEWER_V3[node])
    assert (node in comfy_nodes.NODE_CLASS_MAPPINGS) == has_autogrow
    if not has_autogrow:
        pytest.skip(f"ComfyUI {comfy.version} has no io.Autogrow: the node is not served (Soup Models (in graph) is)")
    ckpts = [comfy.models_dir / "checkpoints" / n for n in MEMBERS.splitlines()]
    models = [comfy_sd.load_checkpoint_guess_config(str(p), output_vae=False, output_clip=False)[0] for p in ckpts]
    # the executor hands an Autogrow input to execute as one dict, slots keyed by name
    (grown,) = comfy.run(node, models={"model0": models[0], "model2": models[2], "model1": models[1]},
                         weights="2, 1, 1")
    (four,) = comfy.run("CompartmentsSoupModels", model_1=models[0], model_2=models[1], model_3=models[2],
                        weight_1=2.0, weight_2=1.0, weight_3=1.0)
    a, b = _unet_weights(grown), _unet_weights(four)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from compartments.nodes._host import InputError

    for weights, problem in (("1, 1", "2 weight(s) for 3 connected"), ("a, b, c", "not a comma-separated"),
                             ("0, 0, 0", "all weights are 0"), ("1, -1, 1", "from 1e-06 to 1e+06 (or 0)")):
        with pytest.raises(InputError, match=r"Soup Models \(any number\): input .weights.: .*" + re.escape(problem)):
            comfy.run(node, models=dict(zip(("model0", "model1", "model2"), models, strict=True)), weights=weights)
    with pytest.raises(InputError, match="input 'models': 1 model"):
        comfy.run(node, models={"model0": models[0], "model1": None}, weights="")


def test_superseded_scratch_soups_are_evicted(comfy, prepared):
    """Each soup node run writes a scratch soup into ComfyUI's temp folder; only the newest
    SCRATCH_KEEP stay (they filled disks), and a wire to an evicted one asks to re-run."""
    import folder_paths

    from compartments.nodes import soup as soup_nodes

    folder = Path(folder_paths.get_temp_directory()) / "compartments_soup"
    refs = [_build(comfy, members="soup-member-a.safetensors\nsoup-member-b.safetensors")[0]
            for _ in range(soup_nodes.SCRATCH_KEEP + 2)]
    left = sorted(folder.glob("soup-*.safetensors"))
    assert len(left) == soup_nodes.SCRATCH_KEEP
    assert len(list(folder.glob("soup-*.exact"))) == soup_nodes.SCRATCH_KEEP  # sidecars go with their soups
    assert {Path(r.path) for r in refs[-soup_nodes.SCRATCH_KEEP:]} == set(left)
    from compartments.nodes._host import InputError

    with pytest.raises(InputError, match="Inspect Soup: input 'soup': the soup file .* is gone"):
        comfy.run("CompartmentsSoupInspect", soup=refs[0], as_json=True)

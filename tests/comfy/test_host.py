"""Tier 2: the pack inside a real, in-process ComfyUI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_lists_every_node(comfy):
    """Every node of node_list.json (ComfyUI-Manager's map), less those built on a V3 name this
    release lacks (NEEDS_NEWER_V3), which are left out rather than failing the whole pack."""
    from comfy_api.latest import ComfyExtension, io

    import compartments
    from compartments.nodes import NEEDS_NEWER_V3

    ext = asyncio.run(compartments.comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    ids = [n.GET_SCHEMA().node_id for n in asyncio.run(ext.get_node_list())]
    assert ids and all(i.startswith("Compartments") for i in ids)
    assert len(set(ids)) == len(ids)
    listed = set(json.loads((ROOT / "node_list.json").read_text()))
    absent = {n for n, feature in NEEDS_NEWER_V3.items() if not hasattr(io, feature)}
    assert absent <= listed
    assert listed - absent == set(ids), f"node_list.json is stale: {sorted((listed - absent) ^ set(ids))}"


def test_tiny_checkpoint_is_detected_as_sd15_and_samples(comfy, sd15):
    model, clip, vae = sd15
    assert type(model.model.model_config).__name__ == "SD15"
    (cond,) = comfy.run("CLIPTextEncode", text="a red square", clip=clip)
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = comfy.run("KSampler", model=model, seed=0, steps=2, cfg=2.0, sampler_name="euler", scheduler="normal",
                       positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    (image,) = comfy.run("VAEDecode", samples=out, vae=vae)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_core_nodes_the_workflows_use_are_loaded(comfy):
    """Core extras our workflows rely on imported cleanly in-process (torch/torchaudio pairing)."""
    for node_id in ("SaveAnimatedWEBP", "PreviewAny", "SamplerCustomAdvanced", "ModelMergeSimple", "unCLIPConditioning"):
        assert comfy.node(node_id)


def test_harness_runs_the_release_under_test(comfy):
    """The in-process ComfyUI is the checkout COMFYUI_PATH names, a release the pack supports."""
    import comfyui_version  # ComfyUI's own module, on sys.path from the checkout

    from compartments.cli.client import comfyui_version as read_version
    from compartments.cli.client import is_supported

    assert comfy.version == read_version(comfy.path) == comfyui_version.__version__
    assert is_supported(comfy.version)


def test_overrides_and_wrappers_pass_extra_keywords_on(comfy, sd15):
    """Releases add keyword arguments to the calls core makes into a pack (0.8 added
    ``latent_shapes`` to ``outer_sample``): each callback accepts them and hands them on."""
    from comfy.patcher_extension import WrappersMP

    from compartments.nodes.cpr import CPRGuider
    from compartments.nodes.temporal import WRAPPER_KEY
    from compartments.tiny import temporal as tiny_temporal

    model, clip, _ = sd15
    tiny_temporal.prepare(comfy.models_dir, comfy.input_dir)
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    (video,) = comfy.run("CompartmentsApplyTemporalLayers", model=model, temporal_layers=layers, frame_count=6,
                         context_length=4, context_overlap=1, context_blend="pyramid", alpha=-1.0, alpha_overrides="")
    (wrapper,) = video.get_wrappers(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    seen = {}

    def executor(noise, *args, **kwargs):
        seen.update(kwargs, args=args)
        return "sampled"

    noise = torch.zeros(6, 4, 8, 8)
    assert wrapper(executor, noise, "latent", latent_shapes=[noise.shape], option_of_a_later_release=1) == "sampled"
    assert seen == {"args": ("latent",), "latent_shapes": [noise.shape], "option_of_a_later_release": 1}

    # The context handler is core's own object; its set_step wrapper steps on the first sigma
    # of a batch of frames (core 0.3.x compared the whole vector) and passes every argument on.
    handler = video.model_options["context_handler"]
    sigmas = torch.tensor([14.6, 3.0, 0.0])
    handler.set_step(torch.full((6,), 3.0), {"transformer_options": {"sample_sigmas": sigmas}})
    assert handler._step == 1

    # A later release passing a new keyword to predict_noise: inject one through core's own
    # PREDICT_NOISE wrapper and sample the CPR guider with core SamplerCustomAdvanced.
    (cond,) = comfy.run("CLIPTextEncode", text="a red square", clip=clip)
    received = []

    def later_release(executor, *args, **kwargs):
        return executor(*args, option_of_a_later_release=1, **kwargs)

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_later_release", later_release)
    original = CPRGuider.predict_noise

    def spy(self, *args, **kwargs):
        received.append(sorted(kwargs))
        return original(self, *args, **kwargs)

    (private, _) = comfy.run("CompartmentsCPRPromptConditioning", conditioning=cond, ids="[]")
    (guider,) = comfy.run("CompartmentsCPRKLGuider", model=wrapped, public=cond, private=private, negative=cond,
                          cfg=1.0, lambda_=0.5)
    guider.predict_noise = spy.__get__(guider)
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    assert torch.isfinite(comfy.sample(wrapped, guider, latent, steps=1)).all()
    assert received and all("option_of_a_later_release" in kw for kw in received), received


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e9])
def test_every_float_input_refuses_nan_infinity_and_out_of_range(comfy, bad):
    """ComfyUI's min/max check lets NaN through (and API prompts can carry Infinity): every FLOAT
    input of every pack node refuses it first, naming the node and the input."""
    import nodes as comfy_nodes
    from compartments.nodes._host import InputError

    checked = []
    for node_id, cls in sorted(comfy_nodes.NODE_CLASS_MAPPINGS.items()):
        if not node_id.startswith("Compartments"):
            continue
        schema = cls.GET_SCHEMA()
        floats = [i for i in schema.inputs if i.get_io_type() == "FLOAT"]
        for spec in floats:
            inputs = {i.id: None for i in schema.inputs}
            inputs[spec.id] = bad
            with pytest.raises(InputError) as err:
                cls.execute(**inputs)
            label = spec.display_name or spec.id
            assert f"{schema.display_name}: input '{label}'" in str(err.value), (node_id, str(err.value))
            checked.append(f"{node_id}.{spec.id}")
    assert len(checked) >= 14, checked


def test_room_errors_become_node_errors_and_bugs_say_so(comfy, tmp_path):
    """A room's CompartmentsError that a node does not translate itself still reaches the user as
    'node: input: problem. Fix: ...'; anything else (not Cancel, not out-of-memory) is a bug."""
    from safetensors.torch import save_file

    from compartments.nodes._host import InputError
    from compartments.nodes.soup import SoupRef

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match=r"^Inspect Soup: input .*not a Compartments soup"):
        comfy.run("CompartmentsSoupInspect", soup=SoupRef(str(plain), None), as_json=True)
    with pytest.raises(RuntimeError, match=r"^Inspect Soup: internal error in Compartments \(a bug, not your input\)"):
        comfy.run("CompartmentsSoupInspect", soup=None, as_json=True)
    import comfy.model_management as mm

    from compartments.tiny import soup as tiny_soup

    tiny_soup.prepare(comfy.models_dir, comfy.input_dir)
    mm.interrupt_current_processing(True)  # Cancel passes through as ComfyUI's own exception
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run("CompartmentsSoupBuild", members="soup-member-a.safetensors", base="first member",
                      components="unet", dtype="same", keep_sum=True)
    finally:
        mm.interrupt_current_processing(False)


@pytest.mark.parametrize("bad", ["a\0b", "x" * 300], ids=["NUL", "over-long"])
def test_names_with_nul_or_over_long_parts_are_input_errors(comfy, bad):
    from compartments.nodes._host import InputError

    cases = [("CompartmentsSoupLoad", {"soup_name": bad}, "soup_name"),
             ("CompartmentsM3IDLoadVLM", {"model_folder": bad, "dtype": "auto"}, "model_folder"),
             ("CompartmentsLoadTemporalLayers", {"temporal_layers": bad}, "temporal_layers"),
             ("CompartmentsRetrievalBuildStore", {"store_name": bad, "folder": "x", "weights": "w.safetensors"},
              "store_name")]
    for node, inputs, name in cases:
        with pytest.raises(InputError, match=f"input '{name}'"):
            comfy.run(node, **inputs)

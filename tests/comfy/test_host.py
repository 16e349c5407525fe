"""Tier 2: the pack inside a real, in-process ComfyUI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_lists_every_node(comfy):
    from comfy_api.latest import ComfyExtension

    import compartments

    ext = asyncio.run(compartments.comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    ids = [n.GET_SCHEMA().node_id for n in asyncio.run(ext.get_node_list())]
    assert ids and all(i.startswith("Compartments") for i in ids)
    assert len(set(ids)) == len(ids)
    listed = json.loads((ROOT / "node_list.json").read_text())
    assert set(listed) == set(ids), f"node_list.json is stale: {sorted(set(listed) ^ set(ids))}"


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

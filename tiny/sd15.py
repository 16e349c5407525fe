"""A tiny Stable Diffusion 1.5 checkpoint in the original single-file (LDM) key layout.

The UNet keeps SD1.5's detection signature (model_channels 320, context_dim 768, no linear
projections in the transformers, no ADM input) but has two levels and one res block per
level, so ComfyUI's ``CheckpointLoaderSimple`` detects it as SD15 while it samples on a
CPU in seconds. The VAE and the CLIP-L text encoder have their full SD1.5 shapes because
ComfyUI builds those from fixed configs. Weights are seeded random, scaled 1/sqrt(fan_in),
so activations stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cached, link_into

UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "context_dim": 768,
    "time_embed_dim": 1280,
    "attention": [True, True],
}
VAE_CONFIG = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4}
CLIP_CONFIG = {"width": 768, "layers": 12, "mlp": 3072, "vocab": 49408, "positions": 77}

Shapes = Iterator[tuple[str, tuple[int, ...]]]


def _norm(prefix: str, ch: int) -> Shapes:
    yield f"{prefix}.weight", (ch,)
    yield f"{prefix}.bias", (ch,)


def _conv(prefix: str, cin: int, cout: int, k: int = 3) -> Shapes:
    yield f"{prefix}.weight", (cout, cin, k, k)
    yield f"{prefix}.bias", (cout,)


def _linear(prefix: str, cin: int, cout: int, bias: bool = True) -> Shapes:
    yield f"{prefix}.weight", (cout, cin)
    if bias:
        yield f"{prefix}.bias", (cout,)


# --- UNet (openaimodel layout) -------------------------------------------------------------
def _resblock(p: str, cin: int, cout: int, emb: int) -> Shapes:
    yield from _norm(f"{p}.in_layers.0", cin)
    yield from _conv(f"{p}.in_layers.2", cin, cout)
    yield from _linear(f"{p}.emb_layers.1", emb, cout)
    yield from _norm(f"{p}.out_layers.0", cout)
    yield from _conv(f"{p}.out_layers.3", cout, cout)
    if cin != cout:
        yield from _conv(f"{p}.skip_connection", cin, cout, 1)


def _transformer(p: str, ch: int, ctx: int, depth: int = 1, linear: bool = False) -> Shapes:
    """A SpatialTransformer: 1x1-conv projections (SD1.x) or linear ones (SDXL), ``depth`` blocks."""
    proj = _linear if linear else (lambda name, cin, cout: _conv(name, cin, cout, 1))
    yield from _norm(f"{p}.norm", ch)
    yield from proj(f"{p}.proj_in", ch, ch)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", ch), ("attn2", ctx)):
            yield from _linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
            yield from _linear(f"{b}.{attn}.to_k", kv, ch, bias=False)
            yield from _linear(f"{b}.{attn}.to_v", kv, ch, bias=False)
            yield from _linear(f"{b}.{attn}.to_out.0", ch, ch)
        yield from _linear(f"{b}.ff.net.0.proj", ch, ch * 8)
        yield from _linear(f"{b}.ff.net.2", ch * 4, ch)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{b}.{n}", ch)
    yield from proj(f"{p}.proj_out", ch, ch)


def unet_shapes(cfg: dict = UNET_CONFIG, prefix: str = "model.diffusion_model.") -> Shapes:
    """openaimodel UNet keys. SD1.x: ``attention`` per level, one transformer block each. SDXL-family:
    ``transformer_depth`` (per input block), ``transformer_depth_output``, ``transformer_depth_middle``,
    linear projections and the ADM ``label_emb`` (``adm_in_channels``)."""
    mc, emb, ctx = cfg["model_channels"], cfg["time_embed_dim"], cfg["context_dim"]
    mult, nres = cfg["channel_mult"], cfg["num_res_blocks"]
    linear = "transformer_depth" in cfg
    per_level = [int(a) for a in cfg.get("attention", [])]
    depth_in = iter(cfg.get("transformer_depth") or [d for d in per_level for _ in range(nres)])
    # ComfyUI's transformer_depth_output lists the output blocks last to first (openaimodel pops it)
    depth_out = iter(list(reversed(cfg["transformer_depth_output"])) if cfg.get("transformer_depth_output")
                     else [d for d in reversed(per_level) for _ in range(nres + 1)])
    P = prefix
    yield from _linear(f"{P}time_embed.0", mc, emb)
    yield from _linear(f"{P}time_embed.2", emb, emb)
    if linear and cfg.get("adm_in_channels"):  # SDXL-style configs; unCLIP's adds its own after the blocks
        yield from _linear(f"{P}label_emb.0.0", cfg["adm_in_channels"], emb)
        yield from _linear(f"{P}label_emb.0.2", emb, emb)
    yield from _conv(f"{P}input_blocks.0.0", cfg.get("in_channels", 4), mc)
    chans, ch, idx = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            yield from _resblock(f"{P}input_blocks.{idx}.0", ch, m * mc, emb)
            ch = m * mc
            depth = next(depth_in)
            if depth:
                yield from _transformer(f"{P}input_blocks.{idx}.1", ch, ctx, depth, linear)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            yield from _conv(f"{P}input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            idx += 1
    yield from _resblock(f"{P}middle_block.0", ch, ch, emb)
    yield from _transformer(f"{P}middle_block.1", ch, ctx, cfg.get("transformer_depth_middle", 1), linear)
    yield from _resblock(f"{P}middle_block.2", ch, ch, emb)
    idx = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nres + 1):
            skip = chans.pop()
            yield from _resblock(f"{P}output_blocks.{idx}.0", ch + skip, m * mc, emb)
            ch = m * mc
            sub = 1
            depth = next(depth_out)
            if depth:
                yield from _transformer(f"{P}output_blocks.{idx}.1", ch, ctx, depth, linear)
                sub = 2
            if level and i == nres:
                yield from _conv(f"{P}output_blocks.{idx}.{sub}.conv", ch, ch)
            idx += 1
    yield from _norm(f"{P}out.0", ch)
    yield from _conv(f"{P}out.2", ch, cfg.get("out_channels", 4))


# --- VAE (ldm AutoencoderKL layout) ----------------------------------------------------------
def _vae_res(p: str, cin: int, cout: int) -> Shapes:
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv(f"{p}.conv1", cin, cout)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv(f"{p}.conv2", cout, cout)
    if cin != cout:
        yield from _conv(f"{p}.nin_shortcut", cin, cout, 1)


def _vae_mid(p: str, ch: int) -> Shapes:
    yield from _vae_res(f"{p}.mid.block_1", ch, ch)
    yield from _norm(f"{p}.mid.attn_1.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.mid.attn_1.{n}", ch, ch, 1)
    yield from _vae_res(f"{p}.mid.block_2", ch, ch)


def vae_shapes(cfg: dict = VAE_CONFIG, prefix: str = "first_stage_model.") -> Shapes:
    ch, mult, nres, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    e, d = f"{prefix}encoder", f"{prefix}decoder"
    yield from _conv(f"{e}.conv_in", 3, ch)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            yield from _vae_res(f"{e}.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            yield from _conv(f"{e}.down.{i}.downsample.conv", cin, cin)
    yield from _vae_mid(e, cin)
    yield from _norm(f"{e}.norm_out", cin)
    yield from _conv(f"{e}.conv_out", cin, 2 * z)
    yield from _conv(f"{prefix}quant_conv", 2 * z, 2 * z, 1)
    yield from _conv(f"{prefix}post_quant_conv", z, z, 1)
    cin = ch * mult[-1]
    yield from _conv(f"{d}.conv_in", z, cin)
    yield from _vae_mid(d, cin)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            yield from _vae_res(f"{d}.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            yield from _conv(f"{d}.up.{i}.upsample.conv", cin, cin)
    yield from _norm(f"{d}.norm_out", cin)
    yield from _conv(f"{d}.conv_out", cin, 3)


# --- CLIP-L text encoder (transformers CLIPTextModel layout) ---------------------------------
def clip_shapes(cfg: dict = CLIP_CONFIG, prefix: str = "cond_stage_model.transformer.text_model.") -> Shapes:
    w = cfg["width"]
    yield f"{prefix}embeddings.token_embedding.weight", (cfg["vocab"], w)
    yield f"{prefix}embeddings.position_embedding.weight", (cfg["positions"], w)
    for i in range(cfg["layers"]):
        yield from encoder_layer_shapes(f"{prefix}encoder.layers.{i}", w, cfg["mlp"])
    yield from _norm(f"{prefix}final_layer_norm", w)


def encoder_layer_shapes(p: str, w: int, mlp: int) -> Shapes:
    """One transformers CLIP/SigLIP encoder layer (the text towers and the SigLIP vision tower share it)."""
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        yield from _linear(f"{p}.self_attn.{n}", w, w)
    yield from _norm(f"{p}.layer_norm1", w)
    yield from _linear(f"{p}.mlp.fc1", w, mlp)
    yield from _linear(f"{p}.mlp.fc2", mlp, w)
    yield from _norm(f"{p}.layer_norm2", w)


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded init that keeps a random network numerically tame."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("norm", "in_layers.0", "out_layers.0", "out.0", "layer_norm"))
    if leaf == "bias":
        return torch.zeros(shape)
    if is_norm and len(shape) == 1:
        return torch.ones(shape)
    if "embedding" in name:
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def build_state_dict(seed: int = 0, unet: dict = UNET_CONFIG, components: tuple[str, ...] = ("unet", "vae", "clip"),
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if "unet" in components:
        shapes += list(unet_shapes(unet))
    if "vae" in components:
        shapes += list(vae_shapes())
    if "clip" in components:
        shapes += list(clip_shapes())
    sd = {name: random_tensor(name, shape, gen).to(dtype) for name, shape in shapes}
    if "clip" in components:
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def checkpoint(seed: int = 0, dtype: str = "float16") -> Path:
    """Path of the cached tiny SD1.5 checkpoint for ``seed`` (built on first use)."""
    cfg = {"kind": "sd15", "seed": seed, "dtype": dtype, "unet": UNET_CONFIG, "v": 1}

    def build(path: Path) -> None:
        sd = build_state_dict(seed, dtype=getattr(torch, dtype))
        save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-v1", "compartments.tiny": "sd15"})

    return cached(f"tiny-sd15-s{seed}.safetensors", cfg, build)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    ckpt = link_into(checkpoint(0), models_dir / "checkpoints" / "tiny-sd15.safetensors")
    return {"checkpoints": [ckpt.name]}

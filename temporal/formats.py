"""Read and write temporal-layer weights: AnimateDiff motion modules and the project's own format.

Formats, detected from the keys (never from the file name):

* ``animatediff``: the original AnimateDiff layout
  (``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight``,
  ``...pos_encoder.pe``) as in ``mm_sd_v15_v2``, ``v3_sd15_mm`` and ``mm_sdxl_v10_beta``.
* ``animatediff-diffusers``: diffusers ``MotionAdapter`` (``...motion_modules.0.transformer_blocks.0.attn1.to_q.weight``,
  ``norm1/norm2/norm3``), the inverse of diffusers' ``convert_animatediff_checkpoint_to_diffusers``.
* ``hotshotxl``: Hotshot-XL's ``hsxl_temporal_layers`` (``down_blocks.0.temporal_attentions.0.transformer_blocks.0
  .attention_blocks.0.to_q.weight``, ``...pos_encoder.positional_encoding``): the same temporal transformer as
  AnimateDiff (8 heads, two self-attentions, GEGLU, per-frame GroupNorm) under other container names, for
  SDXL's three levels with no mid block and a 24-frame position table.
* ``compartments``: Video-LDM-style layers saved by :func:`save_layers`; safetensors metadata
  carries ``compartments.format=temporal-layers``, base architecture, frame count and alphas.

Versions follow diffusers' own single-file detection: a mid block means v2; a 24-long
position table means v1; three down levels (last up level 320 channels) mean SDXL; else v3.
Hotshot-XL files are ``hotshotxl`` whatever their table length. The base architecture comes
from the channel widths (``sd15``: 320/640/1280/1280, ``sdxl``: 320/640/1280).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import replacing
from ..errors import CompartmentsError
from ..safetensors_header import HeaderError, check_file
from .layers import Layout, MotionModule, make_layout

FORMAT_TAG = "temporal-layers"
_SLOT = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.motion_modules\.(\d+)\.")
_HOTSHOT = re.compile(r"^((?:down|up)_blocks\.\d+)\.temporal_attentions\.(\d+)\.")
_HOTSHOT_PE = ".pos_encoder.positional_encoding"


class FormatError(CompartmentsError):
    """The weights are not a motion module this loader understands (message says why)."""


@dataclass(frozen=True)
class MotionInfo:
    """What a file holds, from its keys (and metadata for the project format)."""

    format: str  # animatediff | animatediff-diffusers | hotshotxl | compartments
    version: str  # v1 | v2 | v3 | sdxl-beta | hotshotxl | compartments
    base: str  # sd15 | sdxl | tiny-sd15 | custom
    block_channels: tuple[int, ...]
    num_res_blocks: int
    mid: bool
    max_frames: int
    num_layers: int
    kinds: tuple[str, ...] = ("attention",)

    def layout(self) -> Layout:
        mc = self.block_channels[0]
        return make_layout(self.base, mc, tuple(c // mc for c in self.block_channels), self.num_res_blocks, self.mid)


# --- key layouts ------------------------------------------------------------------------------------


def key_format(keys: list[str] | set[str], metadata: dict[str, str] | None = None) -> str:
    """``animatediff`` | ``animatediff-diffusers`` | ``hotshotxl`` | ``compartments``; :class:`FormatError` otherwise."""
    keys = list(keys)
    if (metadata or {}).get("compartments.format") == FORMAT_TAG or any(k.endswith(".blender.mix_factor") for k in keys):
        return "compartments"
    if any(_HOTSHOT.match(k) for k in keys):
        return "hotshotxl"
    slot_keys = [k for k in keys if _SLOT.match(k)]
    if not slot_keys:
        sample = ", ".join(sorted(keys)[:3]) or "(no tensors)"
        raise FormatError(
            "unknown key layout: no 'down_blocks.N.motion_modules.M.' keys (first keys: " + sample + "). "
            "Expected an AnimateDiff motion module (original or diffusers MotionAdapter layout), "
            "Hotshot-XL temporal layers or Compartments temporal layers.")
    if any(".temporal_transformer." in k for k in slot_keys):
        return "animatediff"
    if any(".transformer_blocks." in k and (".attn1." in k or ".norm1." in k) for k in slot_keys):
        return "animatediff-diffusers"
    raise FormatError("unknown key layout: motion_modules keys without 'temporal_transformer' (original AnimateDiff) "
                      "or 'attn1' (diffusers MotionAdapter), e.g. " + slot_keys[0])


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers MotionAdapter state dict to the original AnimateDiff layout."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _SLOT.match(k)
        if not m:
            if k.startswith("conv_in."):
                raise FormatError("this MotionAdapter has a conv_in (SparseCtrl/in-channel adapter); not supported")
            continue
        head, rest = k[:m.end()], k[m.end():]
        rest = ("." + rest).replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
        rest = rest.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
        rest = rest[1:]
        if rest.endswith(".pos_embed.pe"):
            base = rest[: -len("pos_embed.pe")]
            for a in (0, 1):
                out[f"{head}temporal_transformer.{base}attention_blocks.{a}.pos_encoder.pe"] = v
            continue
        out[f"{head}temporal_transformer.{rest}"] = v
    return out


def original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse (what diffusers' ``convert_animatediff_checkpoint_to_diffusers`` does; drops ``pe``)."""
    out = {}
    for k, v in sd.items():
        if "pos_encoder" in k or not _SLOT.match(k) or ".temporal_transformer." not in k:
            continue  # diffusers recomputes pe; blender/conv are not AnimateDiff
        out[k.replace(".norms.0", ".norm1").replace(".norms.1", ".norm2").replace(".ff_norm", ".norm3")
             .replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
             .replace(".temporal_transformer", "")] = v
    return out


def hotshot_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hotshot-XL temporal layers to the original AnimateDiff layout (weights untouched).

    ``X.temporal_attentions.j.*`` -> ``X.motion_modules.j.temporal_transformer.*`` and the
    position buffer ``positional_encoding`` -> ``pe``. A file with other keys (a whole
    Hotshot-XL UNet, say) is refused: only its temporal layers are a motion module.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _HOTSHOT.match(k)
        if not m:
            raise FormatError(f"a Hotshot-XL file with a key outside its temporal layers ({k}); load "
                              "hsxl_temporal_layers.safetensors, not the whole Hotshot-XL UNet")
        rest = k[m.end():]
        if rest.endswith(_HOTSHOT_PE[1:]):
            rest = rest[: -len("positional_encoding")] + "pe"
        out[f"{m.group(1)}.motion_modules.{m.group(2)}.temporal_transformer.{rest}"] = v
    return out


def original_to_hotshot(sd: dict[str, torch.Tensor], max_frames: int = 24) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hotshot_to_original`; the position table is cut to Hotshot-XL's ``max_frames``."""
    out = {}
    for k, v in sd.items():
        m = _SLOT.match(k)
        if not m or ".temporal_transformer." not in k or k.startswith("mid_block."):
            continue  # Hotshot-XL has no mid block; blender/conv are not Hotshot-XL
        rest = k[m.end():].replace("temporal_transformer.", "", 1)
        if rest.endswith("pos_encoder.pe"):
            rest, v = rest[: -len("pe")] + "positional_encoding", v[:, :max_frames]
        out[f"{m.group(1)}.temporal_attentions.{m.group(4)}.{rest}"] = v.contiguous()
    return out


def _base_for(channels: tuple[int, ...], nres: int) -> str:
    return {((320, 640, 1280, 1280), 2): "sd15", ((320, 640, 1280), 2): "sdxl",
            ((320, 640), 1): "tiny-sd15"}.get((channels, nres), "custom")


def inspect_original(sd: dict[str, torch.Tensor], fmt: str = "animatediff") -> MotionInfo:
    """Structure of an original-layout state dict: levels, channels, mid block, frames, version."""
    down: dict[int, set[int]] = {}
    chans: dict[int, int] = {}
    layers = 0
    max_frames = 0
    for k, v in sd.items():
        m = _SLOT.match(k)
        if not m:
            continue
        if m.group(2) is not None:
            level = int(m.group(2))
            down.setdefault(level, set()).add(int(m.group(4)))
            if k.endswith("temporal_transformer.norm.weight"):
                chans[level] = int(v.shape[0])
        tb = re.search(r"\.transformer_blocks\.(\d+)\.", k)
        if tb:
            layers = max(layers, int(tb.group(1)) + 1)
        if k.endswith("pos_encoder.pe"):
            max_frames = max(max_frames, int(v.shape[1]))
    if not down or sorted(down) != list(range(len(down))) or set(chans) != set(down):
        raise FormatError("motion module has no complete down_blocks.N.motion_modules.M.temporal_transformer.norm keys")
    channels = tuple(chans[i] for i in range(len(down)))
    nres = len(down[0])
    mid = any(k.startswith("mid_block.") for k in sd)
    base = _base_for(channels, nres)
    if fmt == "hotshotxl":
        version = "hotshotxl"
    elif mid:
        version = "v2"
    elif max_frames == 24:
        version = "v1"
    elif base == "sdxl":
        version = "sdxl-beta"
    else:
        version = "v3"
    return MotionInfo(fmt, version, base, channels, nres, mid, max_frames or 32, max(layers, 1))


# --- loading --------------------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = str(path)
    if not path.endswith(".safetensors"):
        raise FormatError(f"{os.path.basename(path)}: only .safetensors files are loaded (no pickle)")
    try:
        check_file(path)  # a lying header is refused before anything is allocated
    except (HeaderError, OSError) as exc:
        raise FormatError(f"{os.path.basename(path)}: {exc}") from None
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(path), metadata


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> MotionInfo:
    """Detect format, version and base architecture of a motion-module state dict."""
    fmt = key_format(set(sd), metadata)
    if fmt == "compartments":
        return _info_from_metadata(metadata or {}, sd)
    return inspect_original(_to_original(sd, fmt), fmt)


def _to_original(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "animatediff-diffusers":
        return diffusers_to_original(sd)
    if fmt == "hotshotxl":
        return hotshot_to_original(sd)
    return dict(sd)


def build_animatediff(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      norm: str = "frame") -> tuple[MotionModule, MotionInfo]:
    """An AnimateDiff motion module (any layout, Hotshot-XL's included) as a :class:`MotionModule` with alpha fixed at 0."""
    fmt = key_format(set(sd), metadata)
    if fmt == "compartments":
        raise FormatError("this file holds Compartments temporal layers; use load_layers")
    original = _to_original(sd, fmt)
    info = inspect_original(original, fmt)
    module = MotionModule(info.layout(), ("attention",), max_frames=info.max_frames, num_layers=info.num_layers,
                          norm=norm, alpha=0.5)
    own = module.state_dict()
    for k, v in own.items():  # blender (not in AnimateDiff) and pe (diffusers drops it) keep their defaults
        if k.endswith(".blender.mix_factor") or k.endswith("pos_encoder.pe"):
            original.setdefault(k, v)
    _load_strict(module, original, info)
    for layer in module.layers().values():
        layer.blender.override_default = 0.0  # AnimateDiff adds its full temporal residual
    return module, info


def _load_strict(module: MotionModule, sd: dict[str, torch.Tensor], info: MotionInfo) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise FormatError(f"{info.format} ({info.base}) weights do not match the expected structure: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise FormatError(f"shape mismatch at {k}: file {tuple(sd[k].shape)} vs expected {tuple(own[k].shape)}")
    # load_state_dict copies (and casts) into the module's own fp32 parameters one tensor at a
    # time; casting the whole dict first would hold a second fp32 copy of the module at peak.
    module.load_state_dict(sd)


def load_motion_module(path: str | Path, norm: str = "frame") -> tuple[MotionModule, MotionInfo]:
    """Load any supported file (AnimateDiff original/diffusers, Hotshot-XL, or Compartments layers)."""
    sd, metadata = read_safetensors(path)
    if key_format(set(sd), metadata) == "compartments":
        return _build_layers(sd, metadata)
    return build_animatediff(sd, metadata, norm)


# --- the project's own format ------------------------------------------------------------------------


def save_layers(module: MotionModule, path: str | Path, frames: int, base: str | None = None,
                extra: dict[str, str] | None = None) -> Path:
    """Write ``module`` as Compartments temporal layers (safetensors, atomic temp + rename).

    Metadata: ``compartments.format``, ``base``, ``layout`` (channels, levels, res blocks,
    mid), ``frames`` (the clip length trained on), ``max_frames``, ``kinds``, ``num_layers``,
    ``norm``, ``alphas`` (JSON, per layer).
    """
    path = Path(path)
    layout = module.layout
    first = next(iter(module.layers().values()))
    norm = first.temporal_transformer.norm_mode if first.temporal_transformer is not None else "frame"
    num_layers = len(first.temporal_transformer.transformer_blocks) if first.temporal_transformer is not None else 0
    meta = {
        "compartments.format": FORMAT_TAG,
        "compartments.version": "1",
        "base": base or layout.name,
        "layout": json.dumps({"model_channels": layout.model_channels, "channel_mult": list(layout.channel_mult),
                              "num_res_blocks": layout.num_res_blocks, "mid": layout.mid}),
        "frames": str(int(frames)),
        "max_frames": str(module.max_frames),
        "kinds": ",".join(module.kinds),
        "num_layers": str(num_layers),
        "norm": norm,
        "alphas": json.dumps(module.alphas()),
    }
    meta.update(extra or {})
    sd = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with replacing(path, fsync=False) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def _info_from_metadata(metadata: dict[str, str], sd: dict[str, torch.Tensor]) -> MotionInfo:
    try:
        lay = json.loads(metadata["layout"])
        mc = int(lay["model_channels"])
        return MotionInfo("compartments", "compartments", metadata.get("base", "custom"),
                          tuple(mc * int(m) for m in lay["channel_mult"]), int(lay["num_res_blocks"]), bool(lay["mid"]),
                          int(metadata.get("max_frames", 32)), int(metadata.get("num_layers", 1)),
                          tuple(metadata.get("kinds", "attention").split(",")))
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"Compartments temporal layers without a valid metadata header ({exc!r})") from exc


def _build_layers(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[MotionModule, MotionInfo]:
    info = _info_from_metadata(metadata, sd)
    module = MotionModule(info.layout(), info.kinds, num_layers=max(info.num_layers, 1), max_frames=info.max_frames,
                          norm=metadata.get("norm", "frame"))
    _load_strict(module, sd, info)
    return module, info


def load_layers(path: str | Path) -> tuple[MotionModule, MotionInfo, dict[str, str]]:
    """Load Compartments temporal layers; returns the module, its info and the raw metadata."""
    sd, metadata = read_safetensors(path)
    if key_format(set(sd), metadata) != "compartments":
        raise FormatError(f"{os.path.basename(str(path))} is not Compartments temporal layers (no metadata header)")
    module, info = _build_layers(sd, metadata)
    return module, info, metadata

"""Temporal layers that turn an image UNet into a video UNet (Video LDM, arXiv 2304.08818).

Frames travel through the image UNet as a batch ``(b t) c h w``. After a spatial block a
:class:`TemporalLayer` mixes its input ``z_spatial`` with the output of temporal blocks,
``z = alpha * z_spatial + (1 - alpha) * z_temporal`` where ``alpha = sigmoid(mix_factor)``
(:class:`AlphaBlender`). ``alpha = 1`` skips the temporal path, so the image model is
reproduced bit for bit.

Two temporal blocks:

* :class:`TemporalAttentionBlock`: self-attention over the frame axis
  (``(b t) c h w -> (b h w) t c``) with sinusoidal frame positions. Its parameter names
  follow the original AnimateDiff motion-module layout (``norm``, ``proj_in``,
  ``transformer_blocks.N.attention_blocks.{0,1}``, ``norms``, ``ff``, ``ff_norm``,
  ``proj_out``), so AnimateDiff weights load without renaming.
* :class:`TemporalConvBlock`: a 3D-convolution residual block over ``b c t h w``
  (kernel ``(k, 1, 1)``), Video LDM's second temporal layer type.

:class:`MotionModule` holds one :class:`TemporalLayer` per UNet slot for a :class:`Layout`
(SD1.5, SDXL, the tiny SD1.5 of ``tiny/sd15.py``) and uses AnimateDiff's container names
(``down_blocks.i.motion_modules.j``, ``mid_block.motion_modules.0``,
``up_blocks.i.motion_modules.j``).

Normalisation: original AnimateDiff (and AnimateDiff-Evolved) apply the block's GroupNorm
per frame; diffusers' ``AnimateDiffTransformer3D`` pools GroupNorm statistics across all
frames of a video. ``norm="frame"`` (default) follows the original, ``norm="video"``
follows diffusers (the parity test uses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# --- positions -------------------------------------------------------------------------------


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``(1, length, dim)`` sin/cos table, identical to AnimateDiff's and diffusers' ``pe``."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    """Adds ``pe[:, :t]`` to a ``(n, t, c)`` sequence; ``pe`` is a saved buffer as in AnimateDiff."""

    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))

    @property
    def max_len(self) -> int:
        return int(self.pe.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(
                f"temporal layer got {t} frames but its position table holds {self.max_len}; "
                "use context windows of at most that length"
            )
        return x + self.pe[:, :t].to(dtype=x.dtype, device=x.device)


# --- attention over frames -------------------------------------------------------------------

_BACKEND = {"name": "sdpa"}


def attention_backends() -> list[str]:
    """``sdpa`` always; ``xformers`` when the package imports."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return ["sdpa"]
    return ["sdpa", "xformers"]


def set_attention_backend(name: str) -> None:
    """Choose how temporal attention runs: torch SDPA (default) or xformers' memory-efficient kernel."""
    if name not in attention_backends():
        raise ValueError(f"attention backend {name!r} is not available here; have {attention_backends()}")
    _BACKEND["name"] = name


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(n, heads, t, d)`` attention through the selected backend."""
    if _BACKEND["name"] == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)



class TemporalSelfAttention(nn.Module):
    """Multi-head self-attention over frames (torch SDPA, or xformers: :func:`set_attention_backend`)."""

    def __init__(self, dim: int, heads: int, max_len: int, use_positions: bool = True):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(dim, max_len) if use_positions else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        n, t, c = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, h, c // h).transpose(1, 2)

        out = _attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        out = out.transpose(1, 2).reshape(n, t, c)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TemporalTransformerLayer(nn.Module):
    """Two temporal self-attentions and a GEGLU feed-forward, each pre-norm residual (AnimateDiff)."""

    def __init__(self, dim: int, heads: int, max_len: int, n_attn: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalSelfAttention(dim, heads, max_len) for _ in range(n_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attn)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalAttentionBlock(nn.Module):
    """Attention over frames for a ``(b t) c h w`` batch; returns ``x + temporal(x)``.

    ``num_frames`` splits the batch into videos. ``norm="frame"`` normalises every frame on
    its own (original AnimateDiff), ``norm="video"`` pools statistics over the frames of a
    video (diffusers).
    """

    def __init__(self, channels: int, heads: int = 8, num_layers: int = 1, max_frames: int = 32,
                 norm_groups: int = 32, norm: str = "frame"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        if norm not in ("frame", "video"):
            raise ValueError(f"norm must be 'frame' or 'video', got {norm!r}")
        self.norm_mode = norm
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerLayer(channels, heads, max_frames) for _ in range(num_layers)])
        self.proj_out = nn.Linear(channels, channels)
        # AnimateDiff's zero_initialize: a fresh block adds nothing, training starts at the image model.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def max_frames(self) -> int:
        return self.transformer_blocks[0].attention_blocks[0].pos_encoder.max_len

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, hh, ww = x.shape
        b = bt // num_frames
        if self.norm_mode == "frame":
            y = self.norm(x)
        else:
            y = x.view(b, num_frames, c, hh, ww).transpose(1, 2)
            y = self.norm(y).transpose(1, 2).reshape(bt, c, hh, ww)
        # (b t) c h w -> (b h w) t c
        y = y.view(b, num_frames, c, hh * ww).permute(0, 3, 1, 2).reshape(b * hh * ww, num_frames, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y)
        y = y.view(b, hh * ww, num_frames, c).permute(0, 2, 3, 1).reshape(bt, c, hh, ww)
        return x + y


# --- 3D convolution over frames ----------------------------------------------------------------


class TemporalConvBlock(nn.Module):
    """Video LDM's 3D-conv residual block over ``b c t h w`` (kernel ``(k, 1, 1)``: time only).

    The last convolution starts at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, kernel: int = 3, norm_groups: int = 32):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError("temporal kernel must be odd")
        pad = (kernel // 2, 0, 0)
        self.in_layers = nn.Sequential(nn.GroupNorm(norm_groups, channels), nn.SiLU(),
                                       nn.Conv3d(channels, channels, (kernel, 1, 1), padding=pad))
        self.out_layers = nn.Sequential(nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv3d(channels, channels, (kernel, 1, 1), padding=pad))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, hh, ww = x.shape
        b = bt // num_frames
        v = x.view(b, num_frames, c, hh, ww).transpose(1, 2)  # b c t h w
        v = v + self.out_layers(self.in_layers(v))
        return v.transpose(1, 2).reshape(bt, c, hh, ww)


# --- alpha blending -----------------------------------------------------------------------------


def logit(alpha: float) -> float:
    alpha = min(max(float(alpha), 1e-6), 1 - 1e-6)
    return math.log(alpha / (1 - alpha))


class AlphaBlender(nn.Module):
    """``z = alpha * z_spatial + (1 - alpha) * z_temporal``, ``alpha = sigmoid(mix_factor)``.

    ``override`` (0..1, not saved) replaces the learned alpha at inference; exactly 0 and 1
    are honoured exactly (``sigmoid`` never reaches them). AnimateDiff modules have no
    blender, i.e. alpha 0: loaders set ``override_default`` to 0.
    """

    def __init__(self, alpha: float = 0.5, learned: bool = True):
        super().__init__()
        value = torch.tensor([logit(alpha)])
        if learned:
            self.mix_factor = nn.Parameter(value)
        else:
            self.register_buffer("mix_factor", value)
        self.override: float | None = None
        self.override_default: float | None = None

    def alpha(self) -> torch.Tensor | float:
        for value in (self.override, self.override_default):
            if value is not None:
                return float(value)
        return torch.sigmoid(self.mix_factor)

    def forward(self, z_spatial: torch.Tensor, z_temporal: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        a = self.alpha() if alpha is None else float(alpha)
        if isinstance(a, float):
            if a >= 1.0:
                return z_spatial
            if a <= 0.0:
                return z_temporal
            return a * z_spatial + (1 - a) * z_temporal
        a = a.to(dtype=z_spatial.dtype, device=z_spatial.device)
        return a * z_spatial + (1 - a) * z_temporal


# The layer kinds a user can train, by the name the node's combo and the command line show
# (the command line also takes them without spaces: ``attention+conv``).
LAYER_KINDS: dict[str, tuple[str, ...]] = {"attention + conv": ("attention", "conv"), "attention": ("attention",),
                                           "conv": ("conv",)}


def layer_kinds(name: str) -> tuple[str, ...]:
    """The kinds for a :data:`LAYER_KINDS` name, spaces ignored; ValueError naming the choices."""
    by_plain = {k.replace(" ", ""): v for k, v in LAYER_KINDS.items()}
    try:
        return by_plain[name.replace(" ", "")]
    except KeyError:
        raise ValueError(f"unknown layer kinds '{name}'; use one of {list(LAYER_KINDS)}") from None


class TemporalLayer(nn.Module):
    """One slot after a spatial block: temporal attention and/or 3D conv, then the alpha blend.

    Attribute names give AnimateDiff's keys: ``temporal_transformer.*``; Video LDM's conv is
    ``temporal_conv.*``; the blend is ``blender.mix_factor``.
    """

    def __init__(self, channels: int, kinds: tuple[str, ...] = ("attention",), heads: int = 8,
                 num_layers: int = 1, max_frames: int = 32, norm: str = "frame", alpha: float = 0.5,
                 norm_groups: int = 32):
        super().__init__()
        bad = set(kinds) - {"attention", "conv"}
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of ('attention', 'conv'), got {kinds}")
        self.channels = channels
        self.temporal_transformer = (TemporalAttentionBlock(channels, heads, num_layers, max_frames, norm_groups, norm)
                                     if "attention" in kinds else None)
        self.temporal_conv = TemporalConvBlock(channels, norm_groups=norm_groups) if "conv" in kinds else None
        self.blender = AlphaBlender(alpha)

    def forward(self, x: torch.Tensor, num_frames: int, alpha: float | None = None) -> torch.Tensor:
        """``alpha`` (0..1) overrides the layer's own for this call (the node's per-layer override)."""
        if num_frames < 1 or x.shape[0] % num_frames:
            raise ValueError(f"batch {x.shape[0]} is not a whole number of videos of {num_frames} frames")
        if x.shape[1] != self.channels:
            raise ValueError(f"temporal layer for {self.channels} channels got {x.shape[1]}")
        a = self.blender.alpha() if alpha is None else float(alpha)
        if isinstance(a, float) and a >= 1.0:
            return x  # exact image model, and no temporal compute
        z = x
        if self.temporal_conv is not None:
            z = self.temporal_conv(z, num_frames)
        if self.temporal_transformer is not None:
            z = self.temporal_transformer(z, num_frames)
        return self.blender(x, z, alpha)


# --- UNet layouts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where a temporal layer sits: after the spatial layers of ComfyUI block ``block``.

    ``block`` is ``("input", i)``, ``("middle", 0)`` or ``("output", i)`` as in
    ``transformer_options["block"]``; ``key`` is the AnimateDiff container prefix.
    """

    key: str
    block: tuple[str, int]
    channels: int


@dataclass(frozen=True)
class Layout:
    """A UNet's channel layout (openaimodel / LDM), enough to place temporal layers."""

    name: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    mid: bool = True
    slots: tuple[Slot, ...] = field(default=(), compare=False)

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)


def make_layout(name: str, model_channels: int, channel_mult: tuple[int, ...] | list[int],
                num_res_blocks: int, mid: bool = True) -> Layout:
    """Layout with slots after every res(+attention) block of the input, middle and output paths.

    Input block index for level ``l``, res ``j`` is ``1 + l*(nres+1) + j`` (block 0 is
    conv_in, a downsample follows each level but the last); output block index for up
    level ``u`` (0 = deepest), res ``j`` is ``u*(nres+1) + j``; each up level has nres+1.
    """
    mult = tuple(int(m) for m in channel_mult)
    nres = int(num_res_blocks)
    slots: list[Slot] = []
    for level, m in enumerate(mult):
        for j in range(nres):
            slots.append(Slot(f"down_blocks.{level}.motion_modules.{j}", ("input", 1 + level * (nres + 1) + j),
                              model_channels * m))
    if mid:
        slots.append(Slot("mid_block.motion_modules.0", ("middle", 0), model_channels * mult[-1]))
    for u, m in enumerate(reversed(mult)):
        for j in range(nres + 1):
            slots.append(Slot(f"up_blocks.{u}.motion_modules.{j}", ("output", u * (nres + 1) + j), model_channels * m))
    return Layout(name, model_channels, mult, nres, mid, tuple(slots))


SD15 = make_layout("sd15", 320, (1, 2, 4, 4), 2, mid=True)
SD15_NO_MID = make_layout("sd15", 320, (1, 2, 4, 4), 2, mid=False)
SDXL = make_layout("sdxl", 320, (1, 2, 4), 2, mid=False)
TINY_SD15 = make_layout("tiny-sd15", 320, (1, 2), 1, mid=True)
LAYOUTS = {"sd15": SD15, "sdxl": SDXL, "tiny-sd15": TINY_SD15}


def layout_of_unet(model_channels: int, channel_mult: list[int] | tuple[int, ...], num_res_blocks: int | list[int],
                   mid: bool = True) -> Layout:
    """Layout of a concrete UNet (e.g. ComfyUI's ``diffusion_model``); named after the known base it matches."""
    nres = num_res_blocks[0] if isinstance(num_res_blocks, (list, tuple)) else num_res_blocks
    key = (int(model_channels), tuple(int(m) for m in channel_mult), int(nres))
    for layout in LAYOUTS.values():
        if (layout.model_channels, layout.channel_mult, layout.num_res_blocks) == key:
            return make_layout(layout.name, *key, mid=mid)
    return make_layout("custom", *key, mid=mid)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.motion_modules = nn.ModuleList()


class MotionModule(nn.Module):
    """All temporal layers for a :class:`Layout`, in AnimateDiff's container layout.

    ``kinds=("attention",)`` with ``alpha=0`` fixed is an AnimateDiff motion module;
    ``kinds=("attention", "conv")`` with a learned alpha is a Video-LDM stack.
    ``layer(slot_key)`` and ``layer_for_block(block)`` find a slot's layer.
    """

    def __init__(self, layout: Layout, kinds: tuple[str, ...] = ("attention",), heads: int = 8,
                 num_layers: int = 1, max_frames: int = 32, norm: str = "frame", alpha: float = 0.5,
                 norm_groups: int = 32):
        super().__init__()
        self.layout = layout
        self.kinds = tuple(kinds)
        self.max_frames = int(max_frames)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.mid_block = _Block() if layout.mid else None
        self._by_block: dict[tuple[str, int], str] = {}
        for slot in layout.slots:
            parts = slot.key.split(".")
            if parts[0] == "mid_block":
                container = self.mid_block
            else:
                blocks = self.down_blocks if parts[0] == "down_blocks" else self.up_blocks
                while len(blocks) <= int(parts[1]):
                    blocks.append(_Block())
                container = blocks[int(parts[1])]
            container.motion_modules.append(
                TemporalLayer(slot.channels, self.kinds, heads, num_layers, max_frames, norm, alpha, norm_groups))
            self._by_block[slot.block] = slot.key

    def layer(self, key: str) -> TemporalLayer:
        module = self.get_submodule(key)
        assert isinstance(module, TemporalLayer)
        return module

    def layer_for_block(self, block: tuple[str, int]) -> TemporalLayer | None:
        key = self._by_block.get((block[0], int(block[1])))
        return None if key is None else self.layer(key)

    def layers(self) -> dict[str, TemporalLayer]:
        return {slot.key: self.layer(slot.key) for slot in self.layout.slots}

    def alphas(self) -> dict[str, float]:
        """Effective alpha per slot (override, else default, else sigmoid(mix_factor))."""
        out = {}
        for key, layer in self.layers().items():
            a = layer.blender.alpha()
            out[key] = float(a) if isinstance(a, float) else float(a.detach().float().item())
        return out

    def set_alpha_override(self, overrides: dict[str, float] | float | None) -> None:
        """Per-layer alpha override (0..1); a float applies to all layers, None clears."""
        layers = self.layers()
        if overrides is None or isinstance(overrides, (int, float)):
            for layer in layers.values():
                layer.blender.override = None if overrides is None else _check_alpha(overrides, "alpha")
            return
        unknown = sorted(set(overrides) - set(layers))
        if unknown:
            raise ValueError(f"alpha override names unknown layers {unknown}; known: {sorted(layers)}")
        for key, value in overrides.items():
            layers[key].blender.override = _check_alpha(value, key)

    def set_norm_mode(self, norm: str) -> None:
        for layer in self.layers().values():
            if layer.temporal_transformer is not None:
                layer.temporal_transformer.norm_mode = norm

    def temporal_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (all of them are temporal; the UNet is not in here)."""
        return [p for p in self.parameters() if p.requires_grad]


def _check_alpha(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha for {name} must be within 0..1, got {value}")
    return value

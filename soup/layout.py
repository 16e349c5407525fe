"""Where a file keeps its diffusion model: the key layout of checkpoints and diffusion-model-only files.

ComfyUI loads two layouts of the same weights, for every architecture it detects (SD1.x,
SDXL and its variants, SD3, Flux, Wan, ...):

* a full checkpoint (``models/checkpoints``): the diffusion model under ``model.diffusion_model.``,
  beside the text encoders and the VAE under their own prefixes;
* a diffusion-model-only file (``models/diffusion_models``, Flux and most DiTs ship this way):
  the same tensors with no prefix at all, and nothing else.

The soup works on the diffusion model's keys *relative* to that prefix, so members may mix the two
layouts; the output keeps the base's layout. A member's id hashes each tensor under its
checkpoint name (``model.diffusion_model.<key>``), so the same weights have the same id in
either file, and ids written before this module existed still verify.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CompartmentsError
from .manifest import UNET_PREFIX

# What a checkpoint keeps beside its diffusion model (text encoders, VAE, EMA copies, CLIP vision):
# a file with any of these but no UNET_PREFIX key holds no diffusion model.
OTHER_PREFIXES = ("cond_stage_model.", "first_stage_model.", "conditioner.", "text_encoders.", "vae.",
                  "clip_vision.", "embedder.", "model_ema.", "denoiser.")


@dataclass(frozen=True)
class KeyLayout:
    """``prefix`` is where the diffusion model's keys start: ``model.diffusion_model.`` or "" (only a
    diffusion model). ``whole``: every key as it is (``components='all'``: members must share one layout)."""

    prefix: str
    whole: bool = False

    @property
    def diffusion_only(self) -> bool:
        return self.prefix == "" and not self.whole

    def is_diffusion(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def relative(self, key: str) -> str:
        return key[len(self.prefix):]

    def key(self, relative: str) -> str:
        return self.prefix + relative

    def canonical(self, key: str) -> str:
        """The name a member id hashes: the checkpoint name of a diffusion-model key, other keys as they are."""
        return key if self.whole or not self.is_diffusion(key) else UNET_PREFIX + self.relative(key)


class LayoutError(CompartmentsError):
    """A file that holds no diffusion model where one is needed."""


WHOLE = KeyLayout("", whole=True)


def layout_of(keys: Iterable[str], name: str, components: str = "unet") -> KeyLayout:
    """The layout of a file with these tensor keys; LayoutError when it holds no diffusion model."""
    if components == "all":
        return WHOLE
    keys = list(keys)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return KeyLayout(UNET_PREFIX)
    others = sorted({p for k in keys for p in OTHER_PREFIXES if k.startswith(p)})
    if others:
        raise LayoutError(f"{name} holds {', '.join(p + '*' for p in others)} but no diffusion model "
                          f"(no '{UNET_PREFIX}*' keys).",
                          "soup full checkpoints (models/checkpoints) or diffusion-model-only files "
                          "(models/diffusion_models), or use components='all' for other files.")
    return KeyLayout("")

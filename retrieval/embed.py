"""open_clip image and text embeddings from a local safetensors file, nothing downloaded.

The store ranks images by cosine similarity of CLIP embeddings, so text and image queries
share one space. The model architecture comes from an open_clip config: a built-in name
(``ViT-B-32``...), or ``auto``, which reads the config the weights carry (safetensors
metadata ``open_clip_config`` or an ``open_clip_config.json`` next to the file, the layout
open_clip's own Hub repos use). Weights must be in open_clip's key layout
(``visual.*``, ``transformer.*``, ``token_embedding.weight``...).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CompartmentsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_KEY = "open_clip_config"


class EmbedderError(CompartmentsError):
    """The weights or config cannot make an open_clip model; the message says what to do."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_embedded_config(weights: Path) -> dict | None:
    from safetensors import safe_open

    from ..safetensors_header import HeaderError, check_file

    try:
        check_file(weights)  # a lying header is refused before anything is allocated
    except (HeaderError, OSError) as exc:
        raise EmbedderError(f"open_clip weights {weights.name}: {exc}") from None
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
    if CONFIG_KEY in meta:
        return json.loads(meta[CONFIG_KEY])
    side = [weights.with_suffix(".json"), weights.parent / "open_clip_config.json"]
    for cand in side:
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


def resolve_config(weights: Path, model_name: str = "auto") -> tuple[str, dict, dict]:
    """Return (name, model_cfg, preprocess_cfg) for ``weights`` and a config name or ``auto``."""
    import open_clip

    if model_name in ("", "auto"):
        full = _read_embedded_config(weights)
        if full is None:
            raise EmbedderError(
                f"'{weights.name}' carries no open_clip config (no '{CONFIG_KEY}' metadata, no "
                "open_clip_config.json beside it). Pick the architecture by name (e.g. ViT-B-32).")
        model_cfg = full.get("model_cfg", full)
        name = full.get("name", f"custom:{weights.stem}")
        return name, model_cfg, dict(full.get("preprocess_cfg", {}))
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise EmbedderError(f"'{model_name}' is not an open_clip model config; use one of "
                            f"open_clip.list_models() or 'auto'.")
    return model_name, cfg, {}


class Embedder:
    """An open_clip model with its tokenizer and preprocessing; yields unit-norm float32 vectors."""

    def __init__(self, weights: str | Path, model_name: str = "auto", device: str | torch.device = "cpu"):
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        self.weights = Path(weights)
        if self.weights.suffix != ".safetensors":
            raise EmbedderError(f"'{self.weights.name}' is not a .safetensors file; only safetensors are loaded.")
        self.name, cfg, pre = resolve_config(self.weights, model_name)
        self.model_cfg = json.loads(json.dumps(cfg))
        cfg = dict(cfg)
        text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
        if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "timm_model_name" in vision_cfg:
            raise EmbedderError(f"config '{self.name}' needs Hugging Face / timm towers, which would download; "
                                "use an open_clip config with built-in towers (ViT-*, RN*).")
        custom = cfg.pop("custom_text", False)
        cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
        model = cls(**cfg)
        try:
            open_clip.load_checkpoint(model, str(self.weights), strict=True)
        except (RuntimeError, AssertionError, KeyError, ValueError) as exc:  # open_clip's shape checks vary
            raise EmbedderError(f"'{self.weights.name}' does not match open_clip config '{self.name}' "
                                f"(or is not in open_clip's key layout): {str(exc)[:300]}") from exc
        self.model = model.eval().requires_grad_(False)
        size = vision_cfg.get("image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.mean = tuple(pre.get("mean", OPENAI_MEAN))
        self.std = tuple(pre.get("std", OPENAI_STD))
        self.context_length = int(text_cfg.get("context_length", 77))
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.dim = int(cfg["embed_dim"])
        self.device = torch.device(device)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """Content hash of the weights: a store refuses vectors from any other model."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights)
        return self._sha256

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights.name, "weights_sha256": self.sha256,
                "dim": self.dim, "model_cfg": self.model_cfg}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] float 0..1 (ComfyUI IMAGE layout) -> normalised [B, 3, S, S]: shortest-side
        bicubic resize then centre crop, open_clip's inference transform done on tensors."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().clamp(0, 1)
        th, tw = self.image_size
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[:, :, top:top + th, left:left + tw]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def embed_images(self, images: Sequence[torch.Tensor] | torch.Tensor, batch_size: int = 16,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Unit-norm image embeddings [N, dim] float32; each image [H, W, 3] 0..1, sizes may differ."""
        if isinstance(images, torch.Tensor):
            images = list(images if images.ndim == 4 else images[None])
        out = []
        total = len(images)
        for start in range(0, total, batch_size):
            chunk = torch.cat([self.preprocess(im) for im in images[start:start + batch_size]])
            feats = self.model.encode_image(chunk.to(self.device, self._dtype()))
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, total), total)
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        feats = self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

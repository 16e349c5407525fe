"""Loading local vision-language model folders for M3ID and building both branches' inputs.

M3ID needs, per image, the conditioned input (prompt + image, as the family's processor
builds it) and the image-free input (the *same* chat prompt with the image entry removed).
This module knows the supported transformers families, refuses the rest with a message
that names the folder, and never touches the network (``local_files_only=True``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CompartmentsError
from ..safetensors_header import HeaderError, check_file, read_header

# family -> (auto class name used for loading, needs a chat template)
FAMILIES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
}
REFUSED: dict[str, str] = {
    "florence2": (
        "Florence-2 is an encoder-decoder model whose task prompt is fused with the image inside "
        "the encoder, so there is no image-free branch with the same prompt and prefix that M3ID "
        "contrasts against; it is refused rather than run with a made-up branch."
    ),
}
FALLBACK_TEMPLATES: dict[str, tuple[str, str]] = {
    # (conditioned, image-free) prompt formats for folders that ship no chat template
    "llava": ("USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:"),
    "llava_next": ("USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:"),
    "qwen2_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
                 "<|im_start|>assistant\n", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
}
FALLBACK_TEMPLATES["qwen2_5_vl"] = FALLBACK_TEMPLATES["qwen2_vl"]


class VLMFolderError(CompartmentsError):
    """The folder is not a VLM this module can run; the message names the folder and why."""


def ensure_transformers_importable() -> None:
    """Keep transformers' processors importable when the installed torchaudio is broken.

    ``transformers.audio_utils`` imports torchaudio whenever the package is installed; a
    torchaudio built for another CUDA version raises at import and takes every image
    processor down with it. Captioning needs no audio, so transformers is told torchaudio
    is unavailable in that case (only then; a working torchaudio is left alone).
    """
    try:
        import torchaudio  # noqa: F401
    except Exception:  # noqa: BLE001 - any import-time failure means "unusable"
        import transformers.utils as tu
        import transformers.utils.import_utils as iu

        iu.is_torchaudio_available = lambda: False
        tu.is_torchaudio_available = lambda: False


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise VLMFolderError(f"'{folder}' has no config.json: it is not a transformers model folder.")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VLMFolderError(f"'{folder}/config.json' is not valid JSON ({exc}).") from exc
    if not isinstance(cfg, dict):
        raise VLMFolderError(f"'{folder}/config.json' is not a JSON object: it is not a transformers config.")
    return cfg


def detect_family(folder: str | os.PathLike) -> str:
    """The supported family of ``folder``, or a VLMFolderError that says what it is instead."""
    cfg = read_config(folder)
    model_type = str(cfg.get("model_type", ""))
    if model_type in FAMILIES:
        if not any(Path(folder).glob("*.safetensors")):
            raise VLMFolderError(f"'{folder}' has no .safetensors weights (pickle checkpoints are not loaded).")
        return model_type
    if model_type in REFUSED:
        raise VLMFolderError(f"'{folder}' is a {model_type} model: {REFUSED[model_type]}")
    if "vision_config" not in cfg and "text_config" not in cfg:
        raise VLMFolderError(
            f"'{folder}' is a text-only model (model_type '{model_type}'): M3ID contrasts captions with "
            "and without an image, which needs a vision-language model."
        )
    raise VLMFolderError(
        f"'{folder}' is a '{model_type}' model, which M3ID does not support; supported: {sorted(FAMILIES)}."
    )


@dataclass
class VLM:
    """A loaded model with its processor and the family-specific prompt rules."""

    model: Any
    processor: Any
    family: str
    folder: str
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def _check_size(folder: str | os.PathLike, cls: Any, transformers: Any) -> None:
    """Refuse a folder whose config describes a far bigger model than its weights hold.

    ``from_pretrained`` allocates every parameter the config asks for and initialises the ones
    the files lack, so a config.json of a 7B model beside a few kilobytes of weights would take
    tens of GB. The model is built on the meta device (no memory) to count what the config needs.
    """
    present = 0
    for weights in Path(folder).glob("*.safetensors"):
        with open(weights, "rb") as f:
            present += sum(end - start for _, _, start, end in read_header(f, weights)[1].values())
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            skeleton = cls(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VLMFolderError(f"'{folder}': its config.json does not describe a model transformers can build "
                             f"({type(exc).__name__}: {str(exc)[:300]}).") from None
    needed = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    del skeleton
    if needed > 2 * present + (64 << 20):
        raise VLMFolderError(f"'{folder}': config.json describes a model of {needed / 2**30:.2f} GiB but the "
                             f"weights hold {present / 2**30:.2f} GiB: the weights are incomplete or belong to "
                             "another model. Download the whole model folder again.")


def load_vlm(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VLM:
    """Load ``folder`` with ``from_pretrained(local_files_only=True)`` (never downloads)."""
    family = detect_family(folder)
    for weights in sorted(Path(folder).glob("*.safetensors")):
        try:  # a lying header is refused before transformers allocates anything
            check_file(weights)
        except (HeaderError, OSError) as exc:
            raise VLMFolderError(f"'{folder}': {exc}") from None
    ensure_transformers_importable()
    import transformers

    cls = getattr(transformers, FAMILIES[family])
    _check_size(folder, cls, transformers)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype, use_safetensors=True)
        model.to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VLMFolderError(f"'{folder}': transformers cannot load it as a {family} model "
                             f"({type(exc).__name__}: {str(exc)[:300]}). Is the folder complete (config, weights, "
                             "tokenizer and processor files from the same model)?") from None
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else processor.tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return VLM(model, processor, family, str(folder), eos_ids, int(pad))


def _chat_texts(vlm: VLM, prompt: str) -> tuple[str, str]:
    proc = vlm.processor
    if getattr(proc, "chat_template", None):
        with_img = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        without = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return (proc.apply_chat_template(with_img, add_generation_prompt=True, tokenize=False),
                proc.apply_chat_template(without, add_generation_prompt=True, tokenize=False))
    cond, uncond = FALLBACK_TEMPLATES[vlm.family]
    return cond.format(prompt=prompt), uncond.format(prompt=prompt)


def build_inputs(vlm: VLM, images: list, prompt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Conditioned inputs for a batch of PIL images and the image-free inputs for the same prompt.

    The image-free branch is the same chat prompt with the image entry removed (for
    PaliGemma, which has no chat template: ``<bos>prompt\\n`` without the image tokens), so
    the two branches differ only by the image.
    """
    proc = vlm.processor
    n = len(images)
    if vlm.family == "paligemma":
        cond = proc(text=[proc.image_token + prompt] * n, images=images, return_tensors="pt")
        cond.pop("labels", None)
        tok = vlm.tokenizer
        ids = tok([tok.bos_token + prompt + "\n"] * n, add_special_tokens=False, return_tensors="pt")
        uncond = {"input_ids": ids["input_ids"], "token_type_ids": torch.zeros_like(ids["input_ids"])}
        return dict(cond), uncond
    c_text, u_text = _chat_texts(vlm, prompt)
    cond = proc(text=[c_text] * n, images=images, return_tensors="pt")
    ids = vlm.tokenizer([u_text] * n, return_tensors="pt")  # same defaults as the processor
    return dict(cond), {"input_ids": ids["input_ids"]}

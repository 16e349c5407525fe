"""Loading local vision-language model folders for M3ID and building both branches' inputs.

M3ID needs, per image, the conditioned input (prompt + image) and the image-free input (the
*same* chat messages with the image entry removed). Both come from transformers' generic
path: ``AutoModelForImageTextToText``, ``AutoProcessor`` and the model's own chat template
(``processor.apply_chat_template``), so a family transformers can run needs no code here
unless it has a genuine quirk (:data:`QUIRKS`, each with the reason). Nothing touches the
network (``local_files_only=True``); only safetensors weights are loaded.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import CompartmentsError
from ..safetensors_header import HeaderError, check_file, read_header

# Model types with the tier-1 checks of tests/unit/test_m3id_decoding.py (tiny random models in
# the real layouts): lambda = 0 equals generate, cached image-free logits equal recomputation,
# fused equals separate, seeded sampling reproducible.
TESTED: tuple[str, ...] = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "gemma4",
    "glm4v", "smolvlm", "idefics3", "internvl", "mistral3", "mllama", "paligemma",
)

# Image-text-to-text types transformers lists that M3ID cannot contrast honestly.
_ENC_DEC = ("an encoder-decoder model: the prompt is fused with the image inside the encoder, so there is no "
            "image-free branch with the same prompt and prefix to contrast against")
REFUSED: dict[str, str] = {
    "florence2": "Florence-2 is " + _ENC_DEC + "; it is refused rather than run with a made-up branch.",
    "pix2struct": "Pix2Struct is " + _ENC_DEC + " (the text is rendered into the image).",
    "udop": "UDOP is " + _ENC_DEC + ".",
    "t5gemma2": "T5Gemma 2 is " + _ENC_DEC + ".",
    "vision-encoder-decoder": "a VisionEncoderDecoderModel is " + _ENC_DEC + ".",
    "pp_formulanet": "PP-FormulaNet is " + _ENC_DEC + ".",
    "blip": ("BLIP's captioner is a text decoder cross-attending to the image with no prompt of its own "
             "(the 'prompt' is a caption prefix), so there is no image-free language model to contrast with."),
    "diffusion_gemma": "DiffusionGemma decodes by block diffusion, not token by token; M3ID is a per-token rule.",
    "evolla": "Evolla is a protein-text model, not a vision-language model.",
    "idefics": ("IDEFICS (v1) reads the image through gated cross-attention with a per-token image mask; its "
                "image-free branch is not built or tested here. Idefics2 / Idefics3 / SmolVLM are supported."),
    "pi0": "PI0 is a robot-action model; it does not generate captions.",
}


@dataclass(frozen=True)
class Quirk:
    """What a family needs beyond the generic path (the reason is in :data:`QUIRKS`' comments)."""

    fused: bool = True  # both branches in one batch (False: the image-free branch keeps its own cache)
    drop: tuple[str, ...] = ()  # inputs removed for the image-free branch besides the image itself
    no_template: str | None = None  # (conditioned) prompt format when the family has no chat template
    free_prefix: str | None = None  # image-free prompt format for that case
    generated_type: int = 0  # token type of generated tokens in the separate image-free branch
    free_from_cond: bool = False  # image-free ids = the conditioned ids without the image token


QUIRKS: dict[str, Quirk] = {
    # PaliGemma has no chat template: its processor builds "<image>*n <bos>prompt\n" itself and marks
    # the prompt as prefix with token_type_ids; the image-free branch is "<bos>prompt\n" with zeros.
    # Generated tokens are its suffix (token type 1).
    "paligemma": Quirk(no_template="{image}{prompt}", free_prefix="{bos}{prompt}\n", generated_type=1),
    # Llama 3.2 Vision reads the image through cross-attention layers, not image tokens: the image-free
    # branch is the same text without <|image|> and with the cross-attention inputs dropped, which
    # cannot share a batch with rows that have them (a row with an all-zero cross-attention mask still
    # attends evenly to the vision tokens), so it keeps its own KV cache. Its chat template adds a system
    # turn (knowledge cutoff, today's date) only when no image is present, so rendering the image-free
    # messages would change more than the image: the image-free ids are the conditioned ids minus <|image|>.
    "mllama": Quirk(fused=False, free_from_cond=True,
                    drop=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")),
}

# (conditioned, image-free) prompts for LLaVA-style folders that ship no chat template
FALLBACK_TEMPLATES: dict[str, tuple[str, str]] = {
    "llava": ("USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:"),
    "llava_next": ("USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:"),
}


class VLMFolderError(CompartmentsError):
    """The folder is not a VLM this module can run; the message names the folder and why."""


class PromptError(CompartmentsError):
    """The prompt does not fit the model (too long for its context); never a per-image failure."""


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


@cache
def _image_text_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def families() -> list[tuple[str, str]]:
    """Every model type accepted, as (model_type, 'tested' | 'untested'), sorted by name."""
    return [(t, "tested" if t in TESTED else "untested") for t in sorted(_image_text_types()) if t not in REFUSED]


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
    """The model type of ``folder`` if M3ID can run it, else a VLMFolderError saying what it is instead."""
    cfg = read_config(folder)
    model_type = str(cfg.get("model_type", ""))
    if model_type in REFUSED:
        raise VLMFolderError(f"'{folder}' is a {model_type} model: {REFUSED[model_type]}")
    if cfg.get("is_encoder_decoder"):
        raise VLMFolderError(f"'{folder}' ({model_type}) is {_ENC_DEC}.")
    if model_type in _image_text_types():
        if not any(Path(folder).glob("*.safetensors")):
            raise VLMFolderError(f"'{folder}' has no .safetensors weights (pickle checkpoints are not loaded).")
        return model_type
    if "vision_config" not in cfg and "text_config" not in cfg:
        raise VLMFolderError(
            f"'{folder}' is a text-only model (model_type '{model_type}'): M3ID contrasts captions with "
            "and without an image, which needs a vision-language model."
        )
    raise VLMFolderError(
        f"'{folder}' is a '{model_type}' model, which the installed transformers does not list as an "
        "image-text-to-text model; `python -m compartments vlm-families` prints the accepted types "
        "(a newer transformers may know it)."
    )


@dataclass
class VLM:
    """A loaded model with its processor and the family's quirks."""

    model: Any
    processor: Any
    family: str
    folder: str
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def quirk(self) -> Quirk:
        return QUIRKS.get(self.family, Quirk())

    @property
    def context_length(self) -> int | None:
        """The text model's position limit (None when the config does not say)."""
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None


def _check_size(folder: str | os.PathLike, transformers: Any) -> None:
    """Refuse a folder whose config describes a far bigger model than its weights hold.

    ``from_pretrained`` allocates every parameter the config asks for and initialises the ones
    the files lack, so a config.json of a 7B model beside a few kilobytes of weights would take
    tens of GB. The model is built on the meta device (no memory) to count what the config needs.
    """
    if "quantization_config" in read_config(folder):  # 4-bit / fp8 weights: a float skeleton says nothing
        return
    present = 0
    for weights in Path(folder).glob("*.safetensors"):
        with open(weights, "rb") as f:
            present += sum(end - start for _, _, start, end in read_header(f, weights)[1].values())
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise VLMFolderError(f"'{folder}': its config.json does not describe a model transformers can build "
                             f"({type(exc).__name__}: {str(exc)[:300]}).") from None
    needed = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    del skeleton
    if needed > 2 * present + (64 << 20):
        raise VLMFolderError(f"'{folder}': config.json describes a model of {needed / 2**30:.2f} GiB but the "
                             f"weights hold {present / 2**30:.2f} GiB: the weights are incomplete or belong to "
                             "another model. Download the whole model folder again.")


def load_vlm(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VLM:
    """Load ``folder`` with the Auto classes and ``local_files_only=True`` (never downloads)."""
    family = detect_family(folder)
    for weights in sorted(Path(folder).glob("*.safetensors")):
        try:  # a lying header is refused before transformers allocates anything
            check_file(weights)
        except (HeaderError, OSError) as exc:
            raise VLMFolderError(f"'{folder}': {exc}") from None
    ensure_transformers_importable()
    import transformers

    _check_size(folder, transformers)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, use_safetensors=True)
        model.to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except ImportError as exc:  # a processor's optional dependency (SmolVLM: num2words)
        raise VLMFolderError(f"'{folder}': loading its processor needs a package that is not installed "
                             f"({exc}). Install it into ComfyUI's Python (pip install <name>).") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise VLMFolderError(f"'{folder}': transformers cannot load it as a {family} model "
                             f"({type(exc).__name__}: {str(exc)[:300]}). Is the folder complete (config, weights, "
                             "tokenizer and processor files from the same model)?") from None
    tok = getattr(processor, "tokenizer", None)
    if tok is None:
        raise VLMFolderError(f"'{folder}': its processor has no tokenizer; it is not a text-generating model.")
    tok.padding_side = "left"  # generate continues every row from its last position
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return VLM(model, processor, family, str(folder), eos_ids, int(pad))


def _messages(prompt: str, image: Any | None) -> list[dict]:
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}]


def _template(vlm: VLM, images: list, prompt: str) -> tuple[dict, dict]:
    proc = vlm.processor
    kw: dict[str, Any] = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if "processor_kwargs" in inspect.signature(proc.apply_chat_template).parameters:
        kw["processor_kwargs"] = {"padding": True}  # transformers 5
    else:
        kw["padding"] = True  # transformers 4 passes it on to the processor
    if "enable_thinking" in str(proc.chat_template):
        # templates with a reasoning mode (Qwen3.5, Gemma 4...) then open the answer with an empty, closed
        # thinking block, so the caption is the answer (passed only to templates that read it: transformers
        # hands variables a template does not use to the processor)
        kw["enable_thinking"] = False
    cond = proc.apply_chat_template([_messages(prompt, im) for im in images], **kw)
    if vlm.quirk.free_from_cond:
        ids = cond["input_ids"]
        keep = ids != proc.image_token_id
        if "attention_mask" in cond:
            keep &= cond["attention_mask"].bool()
        counts = keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"{vlm.family}: the prompts differ in length without their image token.")
        return dict(cond), {"input_ids": ids[keep].view(ids.shape[0], -1)}
    free = proc.apply_chat_template([_messages(prompt, None) for _ in images], **kw)
    return dict(cond), dict(free)


def _fallback(vlm: VLM, images: list, prompt: str) -> tuple[dict, dict]:
    proc, tok, q = vlm.processor, vlm.tokenizer, vlm.quirk
    n = len(images)
    if q.no_template is not None:
        text = q.no_template.format(image=getattr(proc, "image_token", ""), prompt=prompt)
        cond = dict(proc(text=[text] * n, images=images, return_tensors="pt", padding=True))
        cond.pop("labels", None)
        ids = tok([q.free_prefix.format(bos=tok.bos_token or "", prompt=prompt)] * n, add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        free = {"input_ids": ids}
        if "token_type_ids" in cond:  # the prompt is the prefix (0); generated tokens are the suffix
            free["token_type_ids"] = torch.zeros_like(ids)
        return cond, free
    if vlm.family not in FALLBACK_TEMPLATES:
        raise VLMFolderError(f"'{vlm.folder}' ({vlm.family}) has no chat template (chat_template.jinja or the "
                             "processor's chat_template): M3ID builds both branches with the model's own prompt "
                             "format. If the model's repository has one, copy it into the folder; models without "
                             "any (plain captioners) are not supported.")
    c_text, u_text = FALLBACK_TEMPLATES[vlm.family]
    cond = dict(proc(text=[c_text.format(prompt=prompt)] * n, images=images, return_tensors="pt", padding=True))
    ids = tok([u_text.format(prompt=prompt)] * n, return_tensors="pt")["input_ids"]
    return cond, {"input_ids": ids}


def build_inputs(vlm: VLM, images: list, prompt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Conditioned inputs for a batch of PIL images and the image-free inputs for the same prompt.

    The image-free branch is the same chat messages with the image entry removed, rendered by
    the same template (for most families the prompts then differ only by the image tokens; a
    template may format a turn with an image slightly differently, e.g. SmolVLM's "User:" before
    an image and "User: " before text, as the model saw in training). Rows are left-padded.
    """
    if getattr(vlm.processor, "chat_template", None) and vlm.quirk.no_template is None:
        cond, free = _template(vlm, images, prompt)
    else:
        cond, free = _fallback(vlm, images, prompt)
    cond.pop("labels", None)
    for key in ("attention_mask",):  # the image-free rows are unpadded (identical prompts)
        free.pop(key, None)
    free = {k: v for k, v in free.items() if k not in vlm.quirk.drop and torch.is_tensor(v)}
    check_length(vlm, cond["input_ids"].shape[1], 0, "the prompt with the image")
    return cond, free


def check_length(vlm: VLM, prompt_tokens: int, new_tokens: int, what: str = "the prompt") -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit the model's context."""
    limit = vlm.context_length
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise PromptError(f"{what} is {prompt_tokens} tokens and {new_tokens} more are to be generated, but the "
                          f"model's context is {limit} tokens.", "shorten the prompt or lower max_tokens.", "prompt")


def check_prompt(vlm: VLM, prompt: str, new_tokens: int) -> None:
    """The cheap up-front check (text only, before any image is decoded)."""
    check_length(vlm, len(vlm.tokenizer(prompt)["input_ids"]), new_tokens)

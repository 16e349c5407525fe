"""Tiny random vision-language models, in real transformers folder layouts, for M3ID.

Each builder writes a complete model folder the way ``save_pretrained`` does (config.json,
model.safetensors, tokenizer and processor files), so the loader exercises the real
``from_pretrained(local_files_only=True)`` path. Tokenizers are built locally with the
``tokenizers`` library (a word-level vocabulary that includes the COCO object names, so
a random model's captions mention objects and CHAIR has something to count). Weights are
seeded random; captions are meaningless but deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from . import cached

COCO_OBJECTS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "kite",
    "skateboard", "surfboard", "bottle", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "cake", "chair", "couch", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "toothbrush",
]
WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "there", "two", "three",
    "sitting", "standing", "next", "to", "near", "photo", "image", "picture", "describe", "this",
    "what", "shown", "man", "woman", "table", "street", "room", "field", "water", "large", "small",
    "red", "blue", "green", "white", "black", "caption", "briefly", "detail", ".", ",", ":", "?",
    "USER", "ASSISTANT", "user", "assistant", "system",
]
SPECIALS = [
    "<unk>", "<pad>", "<s>", "</s>", "<bos>", "<eos>", "<image>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|endoftext|>",
]
# every family with a tiny builder (= vlm.models.TESTED)
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3",
            "gemma4", "glm4v", "smolvlm", "idefics3", "internvl", "mistral3", "mllama", "paligemma")

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def vocab(extra: tuple[str, ...] = ()) -> dict[str, int]:
    """The shared word list; ``extra`` (a family's own special tokens) goes at the end, so the
    families built before it keep their ids (and their cached folders)."""
    words = SPECIALS + WORDS + COCO_OBJECTS + [w for w in extra if w not in SPECIALS]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(bos: str, eos: str, pad: str = "<pad>", extra: tuple[str, ...] = ()):
    """A word-level fast tokenizer built locally (no download), with the specials (and ``extra``) added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab(extra), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>")
    specials = [s for s in SPECIALS + [w for w in extra if w not in SPECIALS] if s not in {bos, eos, pad, "<unk>"}]
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def _text_kw(seed: int, width: int = 32, layers: int = 2) -> dict:
    return dict(vocab_size=len(vocab()), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _clip_vision(width: int = 32, image_size: int = 32) -> dict:
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=8, projection_dim=width)


def _save(model, processor, path: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def _build_llava(path: Path, seed: int, width: int = 32, layers: int = 2, image_size: int = 32) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tokenizer("<s>", "</s>")
    v = vocab()
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_clip_vision(width, image_size)).to_dict(),
                      text_config=LlamaConfig(**_text_kw(seed, width, layers), bos_token_id=v["<s>"], eos_token_id=v["</s>"],
                                              pad_token_id=v["<pad>"]).to_dict(),
                      image_token_id=v["<image>"], vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    _eos_config(model, v["</s>"], v["<pad>"])
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    _save(model, proc, path, seed)


def _build_llava_next(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tokenizer("<s>", "</s>")
    v = vocab()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**_clip_vision()).to_dict(),
                          text_config=LlamaConfig(**_text_kw(seed), bos_token_id=v["<s>"], eos_token_id=v["</s>"],
                                                  pad_token_id=v["<pad>"]).to_dict(),
                          image_token_id=v["<image>"], image_grid_pinpoints=pinpoints, vision_feature_layer=-2)
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    _eos_config(model, v["</s>"], v["<pad>"])
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                              num_additional_image_tokens=1)
    _save(model, proc, path, seed)


def _build_qwen(path: Path, seed: int, v25: bool, width: int = 32, layers: int = 2) -> None:
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer("<|endoftext|>", "<|im_end|>")
    v = vocab()
    text = dict(vocab_size=len(v), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [width // 16, width // 32, width // 32]},
                eos_token_id=v["<|im_end|>"], pad_token_id=v["<pad>"], bos_token_id=v["<|endoftext|>"])
    ids = dict(image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
               vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=width,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=width, mlp_ratio=2, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2VLForConditionalGeneration
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = cls(cfg)
    _eos_config(model, v["<|im_end|>"], v["<pad>"])
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    vp = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    _save(model, proc, path, seed)


def _build_paligemma(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tok = build_tokenizer("<bos>", "<eos>")
    v = vocab()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=32)
    text = GemmaConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       bos_token_id=v["<bos>"], eos_token_id=v["<eos>"], pad_token_id=v["<pad>"])
    cfg = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=v["<image>"],
                          projection_dim=32, hidden_size=32)
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg)
    _eos_config(model, v["<eos>"], v["<pad>"])
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    tok.image_token = "<image>"
    tok.image_token_id = v["<image>"]
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    _save(model, proc, path, seed)


def _build_text_only(path: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer("<s>", "</s>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_kw(seed)))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _eos_config(model, eos: int, pad: int) -> None:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None


_BUILDERS = {
    "llava": _build_llava,
    # compute-bound rather than call-overhead-bound: for CPU timing of the M3ID overhead
    "llava_small": lambda p, s: _build_llava(p, s, width=256, layers=4, image_size=64),
    "llava_next": _build_llava_next,
    "qwen2_vl": lambda p, s: _build_qwen(p, s, v25=False),
    "qwen2_5_vl": lambda p, s: _build_qwen(p, s, v25=True),
    # a mid-sized Qwen2.5-VL text model (128 wide, 4 layers) for the benchmark's size spread
    "qwen2_5_vl_small": lambda p, s: _build_qwen(p, s, v25=True, width=128, layers=4),
    "paligemma": _build_paligemma,
    "text_only": _build_text_only,
}
from .m3id_families import BUILDERS as _NEWER  # noqa: E402 - they use the helpers above

_BUILDERS.update(_NEWER)


def vlm(family: str = "llava", seed: int = 0) -> Path:
    """Path of a cached tiny model folder of ``family`` (built on first use, a few seconds)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(_BUILDERS)}")
    from ..vlm.models import ensure_transformers_importable

    ensure_transformers_importable()
    import transformers

    config = {"family": family, "seed": seed, "v": 3, "transformers": transformers.__version__.split(".")[0]}
    return cached(f"m3id-{family}", config, lambda p: _BUILDERS[family](p, seed))


def image(seed: int, size: int = 64) -> Image.Image:
    """A deterministic RGB test image (coloured blocks)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
    return Image.fromarray(arr, "RGB")


def coco_set(root: Path, n: int = 4, seed: int = 0) -> tuple[Path, Path, Path]:
    """A tiny COCO-style set: images/, captions.json and instances.json (returns their paths)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(COCO_OBJECTS)]
    images, anns, caps = [], [], []
    for i in range(n):
        name = f"{i:012d}.png"
        image(seed * 100 + i).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
        picked = rng.choice(len(cats), size=3, replace=False)
        for c in picked:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0})
        words = " and ".join(COCO_OBJECTS[int(c)] for c in picked[:2])
        caps.append({"id": i + 1, "image_id": i + 1, "caption": f"a {words} on a table"})
    captions = root / "captions.json"
    instances = root / "instances.json"
    captions.write_text(json.dumps({"images": images, "annotations": caps}))
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return captions, instances, img_dir


# the shipped workflows' model folders under models/vlm -> tiny family
PLACED = {"m3id-tiny-llava": "llava", "m3id-tiny-qwen3-vl": "qwen3_vl", "m3id-tiny-gemma3": "gemma3"}
DATASET = "m3id-dataset"  # input/<DATASET>: a small captioning folder (one image in a subfolder)


def _place_copy(src: Path, folder: Path) -> None:
    # copied, not linked: _host.resolve_dir refuses folders whose real path leaves models/vlm
    if folder.exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, folder)


def _place_image(target: Path, seed: int) -> None:
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.png")
        image(seed).save(tmp)
        tmp.replace(target)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the workflows' tiny VLMs under models/vlm, three input images and a dataset folder."""
    for name, family in PLACED.items():
        _place_copy(vlm(family), Path(models_dir) / "vlm" / name)
    input_dir = Path(input_dir)
    placed = []
    for i in range(3):
        _place_image(input_dir / f"m3id-example-{i}.png", 1000 + i)
        placed.append(f"m3id-example-{i}.png")
    for rel, seed in (("a.png", 1100), ("b.png", 1101), ("c.png", 1102), ("more/d.png", 1103)):
        _place_image(input_dir / DATASET / rel, seed)
    return {"vlm": "m3id-tiny-llava", "vlms": sorted(PLACED), "images": placed, "dataset": DATASET}

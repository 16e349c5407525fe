"""Tiny random vision-language models of the newer families, in their real folder layouts.

One builder per model type (the real config, model, processor and image processor classes of
transformers, a short chat template in the family's own turn format), registered in
:mod:`compartments.tiny.m3id`'s table; the shared word-level tokenizer, ``_save`` and
``_eos_config`` come from there. Sizes: width 32, 2 layers, images of 32-64 px (each folder < 1 MB).
"""

from __future__ import annotations

from pathlib import Path

from .m3id import COCO_OBJECTS, SPECIALS, WORDS, _eos_config, _save, build_tokenizer, vocab

# --- qwen3_vl: Tiny random Qwen3-VL (model_type ``qwen3_vl``) in the real folder layout, for the M3ID tests.
#
# Real classes: Qwen3VLConfig (Qwen3VLVisionConfig + Qwen3VLTextConfig), Qwen3VLForConditionalGeneration,
# Qwen3VLProcessor with Qwen2VLImageProcessor (what AutoImageProcessor maps qwen3_vl to) and
# Qwen3VLVideoProcessor. Vision: patch 16, merge 2, DeepStack on layer 0; text: interleaved M-RoPE
# (mrope_section sums to head_dim / 2). Images are resized to 64x64 pixels -> 4x4 patches -> 4 image tokens.
# Qwen3-VL-Instruct's turn format: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n"
# and the generation prompt "<|im_start|>assistant\n" (a string content is rendered as is).
_QWEN3_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN3_VL_PIXELS = 64 * 64  # min = max: every image becomes 64x64 (a 4x4 grid of 16 px patches, 2x2 after merging)


def _build_qwen3_vl(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = build_tokenizer("<|endoftext|>", "<|im_end|>")
    v = vocab()
    text = dict(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True},
                bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"], pad_token_id=v["<pad>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=v["<|image_pad|>"],
                        video_token_id=v["<|video_pad|>"], vision_start_token_id=v["<|vision_start|>"],
                        vision_end_token_id=v["<|vision_end|>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    _eos_config(model, v["<|im_end|>"], v["<pad>"])
    ip = Qwen2VLImageProcessor(size={"shortest_edge": _QWEN3_VL_PIXELS, "longest_edge": _QWEN3_VL_PIXELS}, patch_size=16,
                               temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                               image_std=[0.5, 0.5, 0.5])
    vp = Qwen3VLVideoProcessor(size={"shortest_edge": _QWEN3_VL_PIXELS, "longest_edge": 4 * _QWEN3_VL_PIXELS}, patch_size=16,
                               temporal_patch_size=2, merge_size=2, min_frames=2, max_frames=4)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=_QWEN3_VL_TEMPLATE)
    _save(model, proc, path, seed)


# --- qwen3_5: Tiny random Qwen3.5 (model_type ``qwen3_5``) in the real folder layout, for the M3ID tests.
#
# Real classes: Qwen3_5Config (Qwen3_5VisionConfig + Qwen3_5TextConfig), Qwen3_5ForConditionalGeneration,
# Qwen3VLProcessor (what AutoProcessor maps qwen3_5 to) with Qwen2VLImageProcessor and Qwen3VLVideoProcessor.
# Text: the hybrid stack of Qwen3.5, one gated-delta-net (linear attention) layer then one gated full
# attention layer (the real models repeat 3 linear + 1 full); the linear layers run transformers' torch
# fallbacks (causal_conv1d_fn / _update, torch_chunk_ / torch_recurrent_gated_delta_rule) when the CUDA
# kernels (causal-conv1d, flash-linear-attention) are absent. Partial interleaved M-RoPE as in the real
# config (partial_rotary_factor 0.25 of head_dim 32 = 8 rotary dims, mrope_section [2, 1, 1]).
# Vision: patch 16, merge 2, no DeepStack. Images are resized to 64x64 pixels -> 4x4 patches -> 4 image tokens.
#
# Tokenizer: transformers forces Qwen3_5Tokenizer for this model type (qwen3_5 is in
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which rebuilds a byte-level BPE from tokenizer.json's vocab and
# merges whatever tokenizer_class says; the shared word-level tokenizer (build_tokenizer) would come back as a
# BPE without merges that drops every word but "a". So this builder trains a small byte-level BPE locally
# (tokenizers' BpeTrainer on the shared word list, with and without a leading space) so that each word is one
# token, in the real tokenizer class, with the shared special tokens added after it as in the real vocabulary.
# Qwen3.5's thinking markers (added tokens of the real tokenizer) ride along in `extra`.
_QWEN3_5_EXTRA = ("<think>", "</think>")

# Qwen3.5's turn format, shortened from the real template: a user turn is
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n"; the generation prompt is
# "<|im_start|>assistant\n<think>\n" (thinking, the default) or, with enable_thinking=False,
# "<|im_start|>assistant\n<think>\n\n</think>\n\n" (an empty, closed thinking block).
_QWEN3_5_TEMPLATE = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- '<think>\n' -}}{%- endif -%}{%- endif -%}"
)

_QWEN3_5_PIXELS = 64 * 64  # min = max: every image becomes 64x64 (a 4x4 grid of 16 px patches, 2x2 after merging)


def _tokenizer():
    """Qwen3_5Tokenizer over a locally trained byte-level BPE (the shared words are single tokens)."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen3_5Tokenizer
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # the same split as Qwen3_5Tokenizer's
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    words = WORDS + COCO_OBJECTS
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(words + [" " + w for w in words] + ["\n", "\n\n"], trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen3_5Tokenizer(vocab=bpe.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<pad>",
                           unk_token=None)
    specials = [s for s in SPECIALS + list(_QWEN3_5_EXTRA) if s not in ("<|im_end|>", "<pad>")]
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _build_qwen3_5(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _tokenizer()
    v = tok.get_vocab()
    text = dict(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                layer_types=["linear_attention", "full_attention"],
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=v["<|im_end|>"], pad_token_id=v["<pad>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=v["<|image_pad|>"],
                        video_token_id=v["<|video_pad|>"], vision_start_token_id=v["<|vision_start|>"],
                        vision_end_token_id=v["<|vision_end|>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(cfg)
    _eos_config(model, v["<|im_end|>"], v["<pad>"])
    ip = Qwen2VLImageProcessor(size={"shortest_edge": _QWEN3_5_PIXELS, "longest_edge": _QWEN3_5_PIXELS}, patch_size=16,
                               temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                               image_std=[0.5, 0.5, 0.5])
    vp = Qwen3VLVideoProcessor(size={"shortest_edge": _QWEN3_5_PIXELS, "longest_edge": 4 * _QWEN3_5_PIXELS}, patch_size=16,
                               temporal_patch_size=2, merge_size=2, min_frames=2, max_frames=4)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=_QWEN3_5_TEMPLATE)
    _save(model, proc, path, seed)


# --- llava_onevision: Tiny random LLaVA-OneVision (model_type ``llava_onevision``) in the real folder layout, for the M3ID tests.
#
# Real classes: LlavaOnevisionConfig with a SigLIP vision tower (no head, feature layer -1, "full" features:
# SigLIP has no CLS token) and a Qwen2 text model, as llava-hf/llava-onevision-qwen2-*-ov-hf;
# LlavaOnevisionProcessor with LlavaOnevisionImageProcessor (anyres, tiny pinpoints) and
# LlavaOnevisionVideoProcessor. A 32 px tile has 4x4 patches of 8 px = 16 tokens; a 64x64 image picks the
# 64x64 pinpoint: 16 base + 8x8 unpadded + 8 newline = 88 image tokens.
_LLAVA_ONEVISION_EXTRA = ("<video>",)
# llava-onevision-qwen2's turn format: "<|im_start|>user " then all images, then "\n" + each text, then
# "<|im_end|>"; the generation prompt is "<|im_start|>assistant\n".
_LLAVA_ONEVISION_ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ '\n' + m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}<image>{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'video' %}<video>{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TILE, PATCH = 32, 8


def _build_llava_onevision(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = build_tokenizer("<|endoftext|>", "<|im_end|>", extra=_LLAVA_ONEVISION_EXTRA)
    v = vocab(_LLAVA_ONEVISION_EXTRA)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"], pad_token_id=v["<pad>"])
    cfg = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=v["<image>"], video_token_index=v["<video>"],
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9")
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    _eos_config(model, v["<|im_end|>"], v["<pad>"])
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ip = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS,
                                      do_pad=True, **norm)
    vp = LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}, **norm)
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                   num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full",
                                   chat_template=_LLAVA_ONEVISION_ONEVISION_TEMPLATE, vision_aspect_ratio="anyres_max_9")
    _save(model, proc, path, seed)


# --- gemma3: Tiny random Gemma 3 (gemma3) folder: Gemma3Config (Gemma3TextConfig + SiglipVisionConfig),
# Gemma3Processor + Gemma3ImageProcessor, the real Gemma 3 turn format.
# The family's own tokens. "model" is the assistant role word of Gemma's turn format; the shared
# word list lacks it, so it rides along in `extra` (hence it is a special token here, a plain
# word in the real tokenizer: it only disappears from skip_special_tokens decodes).
_GEMMA3_EXTRA = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>", "model")
_GEMMA3_MM_TOKENS = 4  # image tokens per image: 32 px / 8 px patches = 4x4, average-pooled 2x2 -> 4

# The real Gemma 3 template, shortened: '<bos>', a system message folded into the first user turn,
# 'assistant' renamed 'model', an image item rendered as '<start_of_image>' (the processor expands it
# to '\n\n<start_of_image><image_soft_token>*n<end_of_image>\n\n'), text items trimmed.
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _build_gemma3(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    # Gemma 3's eos is <end_of_turn> for chat (generation_config lists [<eos>, <end_of_turn>]); the
    # tokenizer's eos stays <eos> as in the real tokenizer.
    tok = build_tokenizer("<bos>", "<eos>", extra=_GEMMA3_EXTRA)
    tok._set_model_specific_special_tokens({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                            "image_token": "<image_soft_token>"})
    v = vocab(_GEMMA3_EXTRA)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, vision_use_head=False)
    # one sliding and one full attention layer, as Gemma 3 interleaves them (window > any test prompt)
    text = Gemma3TextConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                            max_position_embeddings=512, sliding_window=128,
                            layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=v["<bos>"], eos_token_id=[v["<eos>"], v["<end_of_turn>"]],
                            pad_token_id=v["<pad>"])
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=_GEMMA3_MM_TOKENS,
                       boi_token_index=v["<start_of_image>"], eoi_token_index=v["<end_of_image>"],
                       image_token_index=v["<image_soft_token>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    # Gemma 3 initialises the image projection to zeros (a trained model's is not): seeded random
    # here, so that the two images give different image tokens and the image changes the logits
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.05)
    _eos_config(model, v["<end_of_turn>"], v["<pad>"])
    model.generation_config.eos_token_id = [v["<eos>"], v["<end_of_turn>"]]
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=_GEMMA3_TEMPLATE,
                           image_seq_length=_GEMMA3_MM_TOKENS)
    _save(model, proc, path, seed)


# --- gemma4: Tiny random Gemma 4 (gemma4) folder shaped like gemma-4-E2B-it: Gemma4Config (Gemma4TextConfig with
# per-layer embeddings, KV sharing, double-wide MLP of the shared layers, logit soft-capping and sliding /
# full attention; Gemma4VisionConfig; a tiny Gemma4AudioConfig), Gemma4ForConditionalGeneration, and
# Gemma4Processor with Gemma4ImageProcessor, Gemma4VideoProcessor and Gemma4AudioFeatureExtractor (the
# processor class requires all three), in the real Gemma 4 turn format.
#
# Images: 4 px patches, 2x2 pooling, at most 70 soft tokens -> a 64x64 image stays 64x64, 16x16 patches
# (padded to 280), 8x8 = 64 image tokens.
# The family's own tokens (Gemma 4's control tokens). "model" (the assistant role word) and "thought"
# (the thinking channel's name) are plain words in the real tokenizer; the shared word list lacks them,
# so they ride along in `extra` (special here: they vanish from skip_special_tokens decodes).
_GEMMA4_EXTRA = ("<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>",
         "<|video|>", "<|channel>", "<channel|>", "<|think|>", "model", "thought")
_GEMMA4_PATCH = 4  # vision patch size in pixels
_GEMMA4_POOL = 2  # pooling kernel: 2x2 patches -> one soft token
_GEMMA4_MAX_SOFT_TOKENS = 70  # the smallest budget the image processor accepts (70, 140, 280, 560, 1120)
_GEMMA4_MM_TOKENS = 64  # soft tokens of a 64x64 image: (64 / 4 / 2) ** 2
_GEMMA4_MEL_BINS = 16  # audio feature extractor's mel bins; the audio tower's first conv has as many channels

# The real Gemma 4 template, shortened (no tools): '<bos>', a system turn when there is a system message
# or thinking is on ('<|think|>' first), 'assistant' renamed 'model', an image item rendered as '<|image|>'
# (the processor expands it to '<|image>' + '<|image|>' * n + '<image|>'), text items trimmed, each turn
# '<|turn>ROLE\n...<turn|>\n'; the generation prompt '<|turn>model\n' plus an empty thinking channel
# when thinking is off.
_GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set loop_messages = messages -%}"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] == 'system' -%}"
    "{{ '<|turn>system\n' }}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{ '<|think|>\n' }}{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{{ messages[0]['content'] | trim }}"
    "{%- else -%}{%- for item in messages[0]['content'] -%}{{ item['text'] | trim }}{%- endfor -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'audio' -%}{{ '<|audio|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|video|>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}"
    "{%- if not enable_thinking | default(false) -%}{{ '<|channel>thought\n<channel|>' }}{%- endif -%}"
    "{%- endif -%}"
)


def _build_gemma4(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Gemma4AudioConfig,
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VideoProcessor,
        Gemma4VisionConfig,
    )

    # the chat eos is <turn|> (generation_config lists [<eos>, <turn|>]); the tokenizer's eos stays <eos>
    tok = build_tokenizer("<bos>", "<eos>", extra=_GEMMA4_EXTRA)
    tok._set_model_specific_special_tokens({
        "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
        "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"})
    v = vocab(_GEMMA4_EXTRA)
    # E2B's layout in 4 layers: sliding / full attention interleaved (the last layer is full), the last two
    # layers reuse the KV of the last unshared layer of their type (num_kv_shared_layers) and have a
    # double-wide MLP; per-layer input embeddings (PLE) of 8 per layer; full-attention layers use a wider
    # global head (16) with proportional RoPE on a quarter of it. The 32-token window is shorter than the
    # prompt with an image (about 80 tokens), so the sliding-window cache is exercised.
    text = Gemma4TextConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                            max_position_embeddings=512, sliding_window=32,
                            layer_types=["sliding_attention", "full_attention"] * 2,
                            num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(v),
                            bos_token_id=v["<bos>"], eos_token_id=[v["<eos>"], v["<turn|>"]],
                            pad_token_id=v["<pad>"])
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=8, patch_size=_GEMMA4_PATCH, pooling_kernel_size=_GEMMA4_POOL,
                                position_embedding_size=64)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              subsampling_conv_channels=[_GEMMA4_MEL_BINS, 8], output_proj_dims=32)
    cfg = Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict(),
                       boi_token_id=v["<|image>"], eoi_token_id=v["<image|>"], image_token_id=v["<|image|>"],
                       video_token_id=v["<|video|>"], boa_token_id=v["<|audio>"], eoa_token_index=v["<audio|>"],
                       audio_token_id=v["<|audio|>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(cfg)
    # Gemma 4 initialises the patch position table to ones (every patch the same position): seeded random
    # here, as a trained model's is, so that where a colour block sits changes the image tokens
    with torch.no_grad():
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 0.5)
    _eos_config(model, v["<turn|>"], v["<pad>"])
    model.generation_config.eos_token_id = [v["<eos>"], v["<turn|>"]]
    ip = Gemma4ImageProcessor(patch_size=_GEMMA4_PATCH, max_soft_tokens=_GEMMA4_MAX_SOFT_TOKENS, pooling_kernel_size=_GEMMA4_POOL)
    vp = Gemma4VideoProcessor(patch_size=_GEMMA4_PATCH, max_soft_tokens=_GEMMA4_MAX_SOFT_TOKENS, pooling_kernel_size=_GEMMA4_POOL,
                              num_frames=2)
    fe = Gemma4AudioFeatureExtractor(feature_size=_GEMMA4_MEL_BINS)
    proc = Gemma4Processor(feature_extractor=fe, image_processor=ip, tokenizer=tok, video_processor=vp,
                           chat_template=_GEMMA4_TEMPLATE, image_seq_length=_GEMMA4_MM_TOKENS, audio_seq_length=64)
    _save(model, proc, path, seed)


# --- glm4v: Tiny random GLM-4.1V (model_type ``glm4v``) in the real folder layout, for the M3ID tests.
#
# Real classes: Glm4vConfig (Glm4vVisionConfig + Glm4vTextConfig), Glm4vForConditionalGeneration,
# Glm4vProcessor with Glm4vImageProcessor and Glm4vVideoProcessor (what the Auto classes map glm4v to).
# Vision: patch 14, merge 2 (a strided conv), temporal patch 2, a 4x4 position-embedding grid (image_size 56)
# interpolated to each image's grid. Text: M-RoPE on half of each head (partial_rotary_factor 0.5 as in the
# real config), 64 wide so that head_dim 16 -> 8 rotary dims -> mrope_section [2, 1, 1] (the real one is
# [8, 12, 12] of 128-wide heads). Images are resized to 56x56 pixels -> 4x4 patches -> 4 image tokens.
# GLM's own special tokens: the prompt prefix, the turn markers, and the image / video markers the
# processor looks up by name (<|begin_of_video|> / <|end_of_video|> must exist: it marks video spans).
_GLM4V_EXTRA = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
         "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
         "<|video|>")

# GLM-4.1V's template, shortened: "[gMASK]<sop>" once, then per user turn "<|user|>\n" + its items
# (an image item is "<|begin_of_image|><|image|><|end_of_image|>", which the processor expands to one
# <|image|> per merged patch; text items as is), an assistant turn "<|assistant|>\n" + its text, and the
# generation prompt "<|assistant|>\n". Turns end at the next role marker (there is no end-of-turn token:
# generation stops at <|user|> / <|observation|> / <|endoftext|>).
_GLM4V_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '<|system|>\n' + m['content'] -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|user|>\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'video' -%}{{- '<|begin_of_video|><|video|><|end_of_video|>' -}}"
    "{%- elif c['type'] == 'image' -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant|>\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for c in m['content'] -%}{{- c['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_GLM4V_PIXELS = 56 * 56  # min pixels; max = 2 frames of 56x56 (smart_resize counts the temporal patch): every image is 56x56


def _build_glm4v(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tok = build_tokenizer("<|endoftext|>", "<|endoftext|>", extra=_GLM4V_EXTRA)
    v = vocab(_GLM4V_EXTRA)
    eos = [v["<|endoftext|>"], v["<|user|>"], v["<|observation|>"]]  # the real generation_config's eos list
    text = dict(vocab_size=len(v), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1]},
                pad_token_id=v["<pad>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=v["<|image|>"],
                      video_token_id=v["<|video|>"], image_start_token_id=v["<|begin_of_image|>"],
                      image_end_token_id=v["<|end_of_image|>"], video_start_token_id=v["<|begin_of_video|>"],
                      video_end_token_id=v["<|end_of_video|>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg)
    _eos_config(model, eos[0], v["<pad>"])
    model.generation_config.eos_token_id = eos
    ip = Glm4vImageProcessor(size={"shortest_edge": _GLM4V_PIXELS, "longest_edge": 2 * _GLM4V_PIXELS}, patch_size=14,
                             temporal_patch_size=2, merge_size=2)
    vp = Glm4vVideoProcessor(size={"shortest_edge": _GLM4V_PIXELS, "longest_edge": 8 * _GLM4V_PIXELS},
                             max_image_size={"longest_edge": 8 * _GLM4V_PIXELS}, patch_size=14, temporal_patch_size=2,
                             merge_size=2, num_frames=4, fps=2)
    proc = Glm4vProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=_GLM4V_TEMPLATE)
    _save(model, proc, path, seed)


# --- mistral3: Tiny random Mistral Small 3.1 (mistral3) folder: Mistral3Config (PixtralVisionConfig + MistralConfig),
# PixtralProcessor + PixtralImageProcessor, the real Mistral [INST] ... [/INST] turn format.
_MISTRAL3_EXTRA = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
_MISTRAL3_PATCH = 4  # vision patch size (px)
_MISTRAL3_MERGE = 2  # spatial merge: 2x2 patches -> one image token, so one token per 8 px
_MISTRAL3_IMAGE = 32  # longest edge: a 64 px test image becomes 32x32 -> 4x4 [IMG] tokens, 4 [IMG_BREAK]/[IMG_END]

# The real Mistral Small 3.1 template, shortened (no default system prompt, no tool calls): '<s>',
# an optional '[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]', user turns '[INST]' + blocks + '[/INST]' with an
# image block rendered as '[IMG]' (the processor expands it into rows of [IMG] closed by [IMG_BREAK],
# the last by [IMG_END]), assistant turns content + '</s>'. The real template ignores
# add_generation_prompt: the answer follows '[/INST]' directly.
_MISTRAL3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{%- for block in message['content'] %}{{- block['text'] }}{%- endfor %}{{- eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)


def _build_mistral3(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tok = build_tokenizer("<s>", "</s>", extra=_MISTRAL3_EXTRA)
    v = vocab(_MISTRAL3_EXTRA)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 head_dim=8, image_size=_MISTRAL3_IMAGE, patch_size=_MISTRAL3_PATCH)
    text = MistralConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         sliding_window=None, bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["<pad>"])
    cfg = Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=v["[IMG]"],
                         spatial_merge_size=_MISTRAL3_MERGE, vision_feature_layer=-1, multimodal_projector_bias=False)
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(cfg)
    _eos_config(model, v["</s>"], v["<pad>"])
    ip = PixtralImageProcessor(size={"longest_edge": _MISTRAL3_IMAGE}, patch_size={"height": _MISTRAL3_PATCH, "width": _MISTRAL3_PATCH})
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=_MISTRAL3_PATCH, spatial_merge_size=_MISTRAL3_MERGE,
                            chat_template=_MISTRAL3_TEMPLATE)
    _save(model, proc, path, seed)


def _user_assistant_template(start: str) -> str:
    """The Idefics3 / SmolVLM chat template (their chat_template.json), after its start token:
    "<start>User:<image>Describe this image.<end_of_utterance>\nAssistant:"."""
    return (
        start + "{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


# the grid markers both processors insert around image tiles, and the plain words of their turn
# format (not special: a caption may use them), added after the vocabulary
_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
_TURN_WORDS = ("User", "Assistant", "Describe")


# --- smolvlm: Tiny random SmolVLM (HuggingFaceTB/SmolVLM-Instruct / SmolVLM2 layout) for the M3ID tests.
#
# SigLIP-style vision tower (64 px, patch 8 -> 8x8 patches) + pixel-shuffle connector with
# scale_factor 4 as in the small real SmolVLMs (-> 4 tokens per image) + a 2-layer Llama text
# model. Image splitting is off (``do_image_splitting=False``): each image is resized to 64x64 and
# rendered as <fake_token_around_image><global-img><image>*4<fake_token_around_image>.
# ``SPLIT = True`` gives a 2x2 grid of 64 px tiles from a 128 px resize (5 x 4 <image> tokens).
#
# Note: ``SmolVLMProcessor.__init__`` raises ImportError without the ``num2words`` package (it is
# used for video prompts only, but required always), so loading any SmolVLM folder needs it.
_SMOLVLM_SPLIT = False
_SMOLVLM_IMAGE = 64  # vision encoder input (= max_image_size longest edge)
_SMOLVLM_PATCH = 8
_SMOLVLM_SCALE = 4
_SMOLVLM_SEQ_LEN = (_SMOLVLM_IMAGE // _SMOLVLM_PATCH) ** 2 // _SMOLVLM_SCALE**2  # <image> tokens per (sub-)image: 4

_SMOLVLM_EXTRA = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<video>") + _ROW_COL
_SMOLVLM_WORDS = _TURN_WORDS

# The real SmolVLM template (SmolVLM-Instruct's chat_template.json):
# "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
_SMOLVLM_TEMPLATE = _user_assistant_template("<|im_start|>")


def _build_smolvlm(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    bos, eos, pad = "<|im_start|>", "<end_of_utterance>", "<pad>"
    tok = build_tokenizer(bos, eos, pad, extra=_SMOLVLM_EXTRA)
    tok.add_tokens(list(_SMOLVLM_WORDS))  # normal (non-special) added tokens, ids after vocab(_SMOLVLM_EXTRA)
    v = tok.get_vocab()
    assert len(v) == len(vocab(_SMOLVLM_EXTRA)) + len(_SMOLVLM_WORDS), len(v)
    text = LlamaConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=v[bos], eos_token_id=v[eos], pad_token_id=v[pad],
                       tie_word_embeddings=False)
    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=_SMOLVLM_IMAGE, patch_size=_SMOLVLM_PATCH)
    cfg = SmolVLMConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=v["<image>"],
                        scale_factor=_SMOLVLM_SCALE, pad_token_id=v[pad], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(cfg)
    _eos_config(model, v[eos], v[pad])
    ip = SmolVLMImageProcessor(size={"longest_edge": 2 * _SMOLVLM_IMAGE if _SMOLVLM_SPLIT else _SMOLVLM_IMAGE},
                               max_image_size={"longest_edge": _SMOLVLM_IMAGE}, do_image_splitting=_SMOLVLM_SPLIT)
    vp = SmolVLMVideoProcessor(size={"longest_edge": _SMOLVLM_IMAGE}, max_image_size={"longest_edge": _SMOLVLM_IMAGE},
                               video_sampling={"fps": 1, "max_frames": 4, "video_size": {"longest_edge": _SMOLVLM_IMAGE}})
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=_SMOLVLM_SEQ_LEN,
                            chat_template=_SMOLVLM_TEMPLATE)
    _save(model, proc, path, seed)


# --- idefics3: Tiny random Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3 layout) for the M3ID tests.
#
# SigLIP-style vision tower (32 px, patch 8 -> 4x4 patches) + pixel-shuffle connector
# (scale_factor 2 -> 4 tokens per sub-image) + a 2-layer Llama text model. Image splitting is on
# at a tiny grid: ``size`` longest edge 64, ``max_image_size`` 32, so a 64 px test image becomes a
# 2x2 grid of 32 px tiles plus the global image (5 x 4 = 20 <image> tokens, with the
# <fake_token_around_image>, <row_i_col_j> and <global-img> markers the processor inserts).
# ``SPLIT = False`` gives the single-image layout (<fake><global-img><image>*4<fake>).
_IDEFICS3_SPLIT = True
_IDEFICS3_IMAGE = 32  # vision encoder input (= max_image_size longest edge)
_IDEFICS3_PATCH = 8
_IDEFICS3_SCALE = 2
_IDEFICS3_SEQ_LEN = (_IDEFICS3_IMAGE // _IDEFICS3_PATCH) ** 2 // _IDEFICS3_SCALE**2  # <image> tokens per (sub-)image: 4

_IDEFICS3_EXTRA = ("<|begin_of_text|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>") + _ROW_COL
_IDEFICS3_WORDS = _TURN_WORDS

# The real Idefics3-8B-Llama3 template (its chat_template.json), verbatim in structure:
# "<|begin_of_text|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
_IDEFICS3_TEMPLATE = _user_assistant_template("<|begin_of_text|>")


def _build_idefics3(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    bos, eos, pad = "<|begin_of_text|>", "<end_of_utterance>", "<pad>"
    tok = build_tokenizer(bos, eos, pad, extra=_IDEFICS3_EXTRA)
    tok.add_tokens(list(_IDEFICS3_WORDS))  # normal (non-special) added tokens, ids after vocab(_IDEFICS3_EXTRA)
    v = tok.get_vocab()
    assert len(v) == len(vocab(_IDEFICS3_EXTRA)) + len(_IDEFICS3_WORDS), len(v)
    text = LlamaConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=v[bos], eos_token_id=v[eos], pad_token_id=v[pad],
                       tie_word_embeddings=False)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=_IDEFICS3_IMAGE, patch_size=_IDEFICS3_PATCH)
    cfg = Idefics3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=v["<image>"],
                         scale_factor=_IDEFICS3_SCALE, pad_token_id=v[pad], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    _eos_config(model, v[eos], v[pad])
    ip = Idefics3ImageProcessor(size={"longest_edge": 2 * _IDEFICS3_IMAGE if _IDEFICS3_SPLIT else _IDEFICS3_IMAGE},
                                max_image_size={"longest_edge": _IDEFICS3_IMAGE}, do_image_splitting=_IDEFICS3_SPLIT)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=_IDEFICS3_SEQ_LEN, chat_template=_IDEFICS3_TEMPLATE)
    _save(model, proc, path, seed)


# --- internvl: Tiny random InternVL (InternVL3-hf layout: InternViT vision tower + Qwen2 text model) for M3ID tests.

_INTERNVL_EXTRA = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")

# InternVL3-hf's turn format (Qwen2 ChatML); an image item renders as <IMG_CONTEXT>, which the processor
# expands to <img><IMG_CONTEXT>*image_seq_length</img>. (The real template puts "\n" after each role and
# after the image; the word-level tokenizer drops whitespace, so spaces stand in for them.)
_INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT> {% elif c['type'] == 'video' %}<video> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def _build_internvl(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    v = vocab(_INTERNVL_EXTRA)
    tok = build_tokenizer("<|endoftext|>", "<|im_end|>", extra=_INTERNVL_EXTRA)
    # the names InternVLProcessor reads off the tokenizer (saved as tokenizer_config's extra_special_tokens)
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok._set_model_specific_special_tokens(special_tokens=named)

    image_size, patch = 32, 8
    seq = (image_size // patch) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5: 16 patches -> 4 tokens
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=image_size, patch_size=patch)
    text = Qwen2Config(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"], pad_token_id=v["<pad>"],
                       tie_word_embeddings=True)
    cfg = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_id=v["<IMG_CONTEXT>"], image_seq_length=seq, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    _eos_config(model, v["<|im_end|>"], v["<pad>"])
    size = {"height": image_size, "width": image_size}
    ip = GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=1)
    vp = InternVLVideoProcessor(size=size)
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=seq,
                             chat_template=_INTERNVL_TEMPLATE)
    _save(model, proc, path, seed)


# --- mllama: Tiny random Llama 3.2 Vision (mllama: tiled vision encoder + cross-attention layers) for M3ID tests.

_MLLAMA_EXTRA = ("<|image|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|python_tag|>")

# Llama-3.2-11B-Vision-Instruct's turn format, shortened. Like the real template, a conversation with no
# image gets a system turn ("Cutting Knowledge Date ... Today Date ...") that one with an image does not
# (the real one raises if an image comes with a system message, and puts today's date in; here the date
# is fixed so the folder renders the same every day). Whitespace ("\n\n" after each header) is dropped by
# the word-level tokenizer, so spaces stand in for it.
_MLLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(has_images=false) %}"
    "{%- for m in messages %}{%- if m['content'] is not string %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if not ns.has_images %}<|start_header_id|>system<|end_header_id|> "
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 <|eot_id|>{%- endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> "
    "{%- if m['content'] is string %}{{ m['content'] }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}<|image|>{%- elif c['type'] == 'text' %}{{ c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}"
)


def _build_mllama(path: Path, seed: int) -> None:
    import torch
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    v = vocab(_MLLAMA_EXTRA)
    tok = build_tokenizer("<|begin_of_text|>", "<|eot_id|>", extra=_MLLAMA_EXTRA)
    tile, tiles = 32, 2
    # the aspect ratios MllamaImageProcessor allows for max_image_tiles=2, in its order (ids are 1-based)
    ratios = [[1, 1], [1, 2], [2, 1]]
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=4, image_size=tile, patch_size=8, max_num_tiles=tiles,
                                supported_aspect_ratios=ratios, intermediate_layers_indices=[0, 1],
                                vision_output_dim=32 * 3)  # last hidden state + the 2 intermediate layers
    # 3 layers: 2 self-attention layers and one cross-attention layer (index 1) in between
    text = MllamaTextConfig(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                            max_position_embeddings=512, bos_token_id=v["<|begin_of_text|>"],
                            eos_token_id=v["<|eot_id|>"], pad_token_id=v["<pad>"])
    cfg = MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=v["<|image|>"])
    cfg.pad_token_id = v["<pad>"]
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers initialises the tanh gates to 0 (image ignored); open them
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
    _eos_config(model, v["<|eot_id|>"], v["<pad>"])
    ip = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=tiles)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=_MLLAMA_TEMPLATE)
    _save(model, proc, path, seed)


BUILDERS = {
    "qwen3_vl": _build_qwen3_vl,
    "qwen3_5": _build_qwen3_5,
    "llava_onevision": _build_llava_onevision,
    "gemma3": _build_gemma3,
    "gemma4": _build_gemma4,
    "glm4v": _build_glm4v,
    "mistral3": _build_mistral3,
    "smolvlm": _build_smolvlm,
    "idefics3": _build_idefics3,
    "internvl": _build_internvl,
    "mllama": _build_mllama,
}

"""Caption a list of images with M3ID: chunking, per-image failure isolation, OOM back-off.

The rule (:mod:`compartments.samplers.m3id`) is model-agnostic tensor math; this module
drives a loaded :class:`~compartments.vlm.models.VLM` with it, so the node and the benchmark
share one loop.
"""

from __future__ import annotations

from typing import Any

import torch

from ..samplers.m3id import CaptionResult, M3IDSettings, Progress, generate_m3id, split_results
from .models import PromptError, build_inputs, check_length, check_prompt


def caption_images(vlm: Any, images: list, prompt: str, settings: M3IDSettings, chunk_size: int = 4,
                   progress: Progress = None, fatal: tuple[type[BaseException], ...] = (),
                   fused: bool = True) -> list[CaptionResult]:
    """Caption every image (PIL) in chunks; a failing chunk is retried per image, a failing
    image yields a result with ``error`` set and the others survive. Out-of-memory halves
    the chunk. Exceptions in ``fatal`` (e.g. the host's interrupt) propagate.
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; write what the caption should answer, e.g. 'Describe this image.'")
    settings.validate()
    check_prompt(vlm, prompt, settings.max_new_tokens)
    fatal = (*fatal, PromptError)
    results: list[CaptionResult | None] = [None] * len(images)
    total = len(images) * settings.max_new_tokens
    need_branch = settings.contrast or settings.pdm

    def run(idx: list[int]) -> None:
        cond, uncond = build_inputs(vlm, [images[i] for i in idx], prompt)
        # with the image tokens and the caption to come (the up-front check saw the bare prompt only)
        check_length(vlm, cond["input_ids"].shape[1], settings.max_new_tokens, "the prompt with the image")
        new, proc = generate_m3id(vlm.model, cond, uncond if need_branch else None, settings, vlm.eos_token_ids,
                                  vlm.pad_token_id, progress, idx[0] * settings.max_new_tokens, total,
                                  fused=fused and vlm.quirk.fused, generated_type=vlm.quirk.generated_type)
        for i, res in zip(idx, split_results(new, proc, vlm.tokenizer, vlm.eos_token_ids), strict=True):
            results[i] = res

    start, size = 0, max(1, int(chunk_size))
    while start < len(images):
        idx = list(range(start, min(start + size, len(images))))
        try:
            run(idx)
        except fatal:
            raise
        except torch.OutOfMemoryError:
            if size > 1:
                size = max(1, size // 2)
                continue
            results[idx[0]] = CaptionResult("", [], error="out of memory even for a single image")
        except Exception:  # noqa: BLE001 - one bad chunk must not lose the others
            for i in idx:
                try:
                    run([i])
                except fatal:
                    raise
                except Exception as exc:  # noqa: BLE001
                    results[i] = CaptionResult("", [], error=f"{type(exc).__name__}: {exc}")
        start = idx[-1] + 1
        if progress is not None:
            progress(start * settings.max_new_tokens, total)
    return [r if r is not None else CaptionResult("", [], error="not captioned") for r in results]

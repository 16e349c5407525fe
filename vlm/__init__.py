"""Vision-language models for M3ID captioning: loading (transformers), prompts, captioning, the PDM report.

Plain transformers / torch code, no ComfyUI. The decoding rule itself is in
:mod:`compartments.samplers.m3id`.
"""

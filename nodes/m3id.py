"""M3ID captioning nodes: load a local VLM, caption every image of a batch with M3ID or plainly.

VLM folders live in ``models/vlm`` (a dropdown; transformers ``save_pretrained`` folders,
safetensors only, loaded with ``local_files_only``). The model is wrapped in a
``ModelPatcher`` so ComfyUI's memory manager moves it to its device and offloads it when
another model needs the memory. The decoding itself is in ``samplers/m3id.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.model_patcher
import numpy as np
import torch
from comfy_api.latest import io

from ..samplers.m3id import CaptionResult, M3IDSettings
from ..vlm.caption import caption_images
from ..vlm.folder import FolderError, caption_folder, check_folders, find_images
from ..vlm.models import VLM, VLMFolderError, detect_family, load_vlm
from ..vlm.report import pdm_json, pdm_plot
from . import _host

VLM_FOLDER = "vlm"
CATEGORY = "Compartments/M3ID"
_host.register_model_folder(VLM_FOLDER, is_dir=True)

VLMType = io.Custom("COMPARTMENTS_VLM")
DTYPES = ["auto", "float32", "float16", "bfloat16"]


@dataclass
class VLMHandle:
    """What flows from the loader to the caption nodes: the model folder, its dtype, and (while
    loaded) the model with its ModelPatcher. A released handle loads the folder again on use, so
    a workflow cached by ComfyUI still runs after "unload after" freed the model."""

    path: str
    dtype: torch.dtype
    vlm: VLM | None = None
    patcher: comfy.model_patcher.ModelPatcher | None = None

    def load(self) -> VLM:
        """Read the folder into RAM (ComfyUI's offload device) if it is not there."""
        if self.vlm is None:
            offload = comfy.model_management.text_encoder_offload_device()
            self.vlm = load_vlm(self.path, dtype=self.dtype, device=offload)
            self.patcher = comfy.model_patcher.ModelPatcher(
                _Holder(self.vlm.model), load_device=comfy.model_management.get_torch_device(), offload_device=offload)
        return self.vlm

    def ready(self) -> VLM:
        """Have ComfyUI load the model onto its device (fully: HF modules have no lowvram casts)."""
        self.load()
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.vlm

    def release(self) -> None:
        """Unload from ComfyUI's device and drop the weights from RAM (the memory manager's own unload)."""
        loaded = comfy.model_management.current_loaded_models
        for i in range(len(loaded) - 1, -1, -1):
            if loaded[i].model is self.patcher:
                loaded[i].model_unload()
                loaded.pop(i)
        self.vlm = self.patcher = None
        for key in [k for k, v in _CACHE.items() if v is self]:
            del _CACHE[key]
        comfy.model_management.soft_empty_cache()


_CACHE: dict[tuple, VLMHandle] = {}


class _Holder(torch.nn.Module):
    """Plain module around the transformers model for ModelPatcher.

    ModelPatcher records its state on the module it manages (``device``, memory counters);
    transformers models expose ``device`` as a read-only property, so they sit one level down.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.vlm = model


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    if comfy.model_management.should_use_fp16(device):
        return torch.float16
    return torch.float32


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


class LoadVLM(io.ComfyNode):
    """Load any decoder-only vision-language model folder transformers can run, for captioning."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsM3IDLoadVLM",
            display_name="Load Captioning Model (VLM)",
            category=CATEGORY,
            description="Loads a transformers vision-language model folder from models/vlm (local files only, "
                        "safetensors) through ComfyUI's memory manager.",
            inputs=[
                io.Combo.Input("model_folder", options=_host.list_dirs(VLM_FOLDER),
                               tooltip="A save_pretrained folder under models/vlm."),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="auto: bf16/fp16 where ComfyUI's device supports it, else fp32."),
            ],
            outputs=[VLMType.Output(display_name="vlm")],
        )

    @classmethod
    def execute(cls, model_folder: str, dtype: str = "auto") -> io.NodeOutput:
        path = _host.resolve_dir(VLM_FOLDER, model_folder, "model_folder")
        try:
            detect_family(path)
        except VLMFolderError as exc:
            raise _host.BadInput("model_folder", str(exc),
                                 "pick a decoder-only vision-language model folder (LLaVA, Qwen-VL, Gemma 3, "
                                 "SmolVLM, InternVL, Llama 3.2 Vision, Mistral 3...; `python -m compartments "
                                 "vlm-families` lists them).") from exc
        torch_dtype = _dtype(dtype, comfy.model_management.get_torch_device())
        key = (path, os.stat(os.path.join(path, "config.json")).st_mtime_ns, str(torch_dtype))
        if key not in _CACHE:
            handle = VLMHandle(path, torch_dtype)
            with _host.blame("model_folder"):
                handle.load()
            _CACHE.clear()
            _CACHE[key] = handle
        return io.NodeOutput(_CACHE[key])


def _check_handle(handle: Any) -> VLMHandle:
    if not isinstance(handle, VLMHandle):
        raise _host.BadInput("vlm", "is not a loaded captioning model.", "connect Load Captioning Model.")
    return handle


def _caption(handle: VLMHandle, images: torch.Tensor, prompt: str, settings: M3IDSettings,
             chunk_size: int) -> list[CaptionResult]:
    _check_handle(handle)
    if not prompt or not prompt.strip():
        raise _host.BadInput("prompt", "is empty.", "write what the caption should answer, "
                             "e.g. 'Describe this image in detail.'")
    if settings.max_new_tokens < 1:
        raise _host.BadInput("max_tokens", f"is {settings.max_new_tokens}.", "use at least 1.")
    if settings.lam < 0:
        raise _host.BadInput("lambda", f"is {settings.lam}; it must be >= 0.", "0 is plain decoding.")
    if not 0 <= settings.alpha <= 1:
        raise _host.BadInput("alpha", f"is {settings.alpha}; it must be in [0, 1].")
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise _host.BadInput("images", "is not a non-empty IMAGE batch.")
    vlm = handle.ready()
    total = images.shape[0] * settings.max_new_tokens
    with _host.blame("prompt"):
        return caption_images(vlm, _to_pil(images), prompt, settings, chunk_size=chunk_size,
                              progress=_host.progress(total),
                              fatal=(comfy.model_management.InterruptProcessingException,))


def _outputs(results: list[CaptionResult], handle: VLMHandle, settings: M3IDSettings, unload: bool) -> io.NodeOutput:
    vlm = handle.load()
    captions = [r.text if r.error is None else f"[caption failed: {r.error}]" for r in results]
    doc = pdm_json(results, vlm.tokenizer, {k: v for k, v in asdict(settings).items()})
    plot = torch.from_numpy(np.stack([pdm_plot(r) for r in results])).to(
        comfy.model_management.intermediate_device())
    if unload:
        handle.release()
    return io.NodeOutput(captions, doc, plot)


UNLOAD = io.Boolean.Input("unload_after", default=False, optional=True,
                          tooltip="Free the model from the GPU and RAM when this node is done (it is read "
                                  "again from disk on the next run).")


def _common_inputs(default_prompt: str = "Describe this image in detail.") -> list:
    return [
        VLMType.Input("vlm", tooltip="From Load Captioning Model (VLM)."),
        io.Image.Input("images", tooltip="Every image of the batch is captioned."),
        io.String.Input("prompt", default=default_prompt, multiline=True,
                        tooltip="What the caption answers, e.g. 'Describe this image in detail.'"),
        *_decoding_inputs(),
    ]


def _decoding_inputs() -> list:
    """Caption length, greedy / seeded sampling, batch size: the same on every caption node."""
    return [
        io.Int.Input("max_tokens", default=64, min=1, max=1024, tooltip="Maximum caption length in tokens."),
        io.Combo.Input("decoding", options=["greedy", "sample"], default="greedy",
                       tooltip="greedy: the most likely token each step; sample: seeded sampling."),
        # The editor gives every INT named seed a "control after generate" widget; declaring it keeps
        # the saved widget values of UI-format workflows in the order the editor reads them.
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Used when decoding is 'sample'."),
        io.Int.Input("chunk_size", default=4, min=1, max=64,
                     tooltip="Images captioned together; halved automatically when memory runs out."),
    ]


_OUTPUTS = [
    io.String.Output(display_name="captions", is_output_list=True),
    io.String.Output(display_name="pdm_json"),
    io.Image.Output(display_name="pdm_plot"),
]


class CaptionM3ID(io.ComfyNode):
    """Caption with M3ID: contrast each token with the image-free prediction, more as the caption grows."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsM3IDCaption",
            display_name="Caption Images (M3ID)",
            category=CATEGORY,
            description="Grounded captions: per token, amplifies what the image adds over the image-free "
                        "prediction (M3ID, arXiv 2403.14003). lambda=0 is plain decoding.",
            inputs=[
                *_common_inputs(),
                io.Float.Input("lambda_", display_name="lambda", default=0.02, min=0.0, max=1.0, step=0.005,
                               tooltip="Growth of the image weight with the token index (gamma_t = exp(-lambda t))."),
                io.Float.Input("alpha", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Contrast only tokens where the top probability is below alpha."),
                io.Float.Input("weight_cap", default=10.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Upper bound of the contrast weight for long captions."),
                UNLOAD,
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, vlm, images, prompt, max_tokens, decoding, seed, chunk_size, lambda_, alpha,
                weight_cap, unload_after: bool = False) -> io.NodeOutput:
        _host.check_numbers(cls, lambda_=lambda_, alpha=alpha, weight_cap=weight_cap)
        settings = M3IDSettings(lam=float(lambda_), alpha=float(alpha), weight_cap=float(weight_cap),
                                max_new_tokens=int(max_tokens), greedy=decoding == "greedy", seed=int(seed))
        try:
            results = _caption(vlm, images, prompt, settings, chunk_size)
        except BaseException:
            if unload_after and isinstance(vlm, VLMHandle):  # Cancel or an error: free the memory anyway
                vlm.release()
            raise
        return _outputs(results, vlm, settings, unload_after)


class CaptionPlain(io.ComfyNode):
    """Plain decoding (no contrast) through the same code path, for side-by-side comparison with M3ID."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsM3IDCaptionPlain",
            display_name="Caption Images (Plain Decoding)",
            category=CATEGORY,
            description="Plain greedy or sampled captions, with the PDM still measured (optional) so they "
                        "can be compared with M3ID.",
            inputs=[
                *_common_inputs(),
                io.Boolean.Input("measure_pdm", default=True,
                                 tooltip="Also run the image-free branch to report PDM (about 2x the time)."),
                UNLOAD,
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, vlm, images, prompt, max_tokens, decoding, seed, chunk_size, measure_pdm,
                unload_after: bool = False) -> io.NodeOutput:
        settings = M3IDSettings(lam=0.0, max_new_tokens=int(max_tokens), greedy=decoding == "greedy",
                                seed=int(seed), contrast=False, pdm=bool(measure_pdm))
        try:
            results = _caption(vlm, images, prompt, settings, chunk_size)
        except BaseException:
            if unload_after and isinstance(vlm, VLMHandle):  # Cancel or an error: free the memory anyway
                vlm.release()
            raise
        return _outputs(results, vlm, settings, unload_after)


class CaptionFolder(io.ComfyNode):
    """Caption a training folder: name.txt beside each image (or in an output folder) and captions.jsonl."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsM3IDCaptionFolder",
            display_name="Caption Folder (M3ID)",
            category=CATEGORY,
            description="Captions every image of a folder under ComfyUI's input directory for a LoRA or "
                        "fine-tune dataset: name.txt per image (written atomically), captions.jsonl with each "
                        "caption's PDM summary and the settings. Images that already have a caption are "
                        "skipped (an interrupted run resumes); unreadable images are listed, never fatal.",
            is_output_node=True,
            inputs=[
                VLMType.Input("vlm", tooltip="From Load Captioning Model (VLM)."),
                io.String.Input("folder", default="datasets/my_lora",
                                tooltip="A folder under ComfyUI's input directory holding the images."),
                io.String.Input("prompt", default="Describe this image in detail.", multiline=True,
                                tooltip="What each caption answers."),
                io.Combo.Input("method", options=["M3ID", "plain"], default="M3ID",
                               tooltip="M3ID: grounded decoding; plain: the model's own greedy/sampled captions."),
                io.String.Input("prefix", default="",
                                tooltip="Put before every caption, e.g. a trigger word: 'ohwx, '."),
                io.String.Input("output_folder", default="",
                                tooltip="Empty: name.txt beside each image. Else a folder under ComfyUI's output "
                                        "directory (subfolders mirrored); never inside the input folder."),
                io.Boolean.Input("recursive", default=False, tooltip="Also caption images in subfolders."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Caption images that already have a .txt again (off: resume)."),
                *_decoding_inputs(),
                io.Float.Input("lambda_", display_name="lambda", default=0.02, min=0.0, max=1.0, step=0.005,
                               tooltip="M3ID only: growth of the image weight with the token index."),
                io.Float.Input("alpha", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="M3ID only: contrast only tokens whose top probability is below alpha."),
                UNLOAD,
            ],
            outputs=[io.String.Output(display_name="report_json"), io.String.Output(display_name="captions",
                                                                                     is_output_list=True)],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, output_folder="", recursive=False, **kwargs):
        """The folder's images and caption files (names, sizes, times): re-queueing after adding images
        or deleting captions runs the node again; an unchanged folder is ComfyUI's cached result."""
        try:
            src = Path(_host.io_subfolder("input", folder, "folder"))
            out = Path(_host.io_subfolder("output", output_folder, "output_folder", must_exist=False)) \
                if output_folder.strip() else src
        except _host.BadInput:
            return None
        sig = []
        for root in {src, out}:
            if root.is_dir():
                files = root.rglob("*") if recursive else root.glob("*")
                sig += sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
        return json.dumps(sig)

    @classmethod
    def execute(cls, vlm, folder, prompt, method, prefix, output_folder, recursive, overwrite, max_tokens,
                decoding, seed, chunk_size, lambda_, alpha, unload_after: bool = False) -> io.NodeOutput:
        _host.check_numbers(cls, lambda_=lambda_, alpha=alpha)
        handle = _check_handle(vlm)
        src = Path(_host.io_subfolder("input", folder, "folder"))
        out = Path(_host.io_subfolder("output", output_folder, "output_folder", must_exist=False)) \
            if output_folder.strip() else None
        plain = method == "plain"
        settings = M3IDSettings(lam=0.0 if plain else float(lambda_), alpha=float(alpha),
                                max_new_tokens=int(max_tokens), greedy=decoding == "greedy", seed=int(seed),
                                contrast=not plain)
        try:
            try:
                check_folders(src, out)  # before the model is loaded: a bad folder costs nothing
            except FolderError as exc:
                exc.field = {"output": "output_folder"}.get(exc.field, exc.field)
                raise
            model = handle.ready()
            n_images = len(find_images(src, recursive, exclude=out))
            bar = _host.progress(max(1, n_images * settings.max_new_tokens))
            with _host.blame("folder"):
                report = caption_folder(model, src, prompt, settings, output=out, recursive=bool(recursive),
                                        overwrite=bool(overwrite), prefix=prefix, chunk_size=int(chunk_size),
                                        progress=lambda _d, _n, tok, total: bar(tok, total),
                                        fatal=(comfy.model_management.InterruptProcessingException,),
                                        model_name=os.path.basename(handle.path))
        finally:
            if unload_after:  # also after Cancel or an error: the memory is what the option is for
                handle.release()
        captions = [Path(p).read_text(encoding="utf-8").rstrip("\n") for p in report.captioned_txt]
        d = report.to_dict()
        summary = (f"captioned {d['n_captioned']}, skipped {d['n_skipped']} (already captioned), "
                   f"failed {d['n_failed']}; records in {report.jsonl}")
        return io.NodeOutput(json.dumps(d, indent=1), captions, ui={"text": [summary]})


NODES = [LoadVLM, CaptionM3ID, CaptionPlain, CaptionFolder]

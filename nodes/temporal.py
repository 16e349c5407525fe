"""Temporal layers in ComfyUI: load AnimateDiff motion modules or Compartments layers, apply them to a MODEL.

Injection uses ModelPatcher hooks only, on a clone: one ``add_object_patch`` per UNet block
that gets a temporal layer (a copy of the block's ``TimestepEmbedSequential`` that keeps the
original children under their original names, so LoRA/soup weight patches still find their
keys, plus a ``MotionSlot`` before any upsampler), one ``forward_timestep_embed_patch`` that
runs the slots, an ``outer_sample`` wrapper that checks the frame count before sampling, and
core's ``IndexListContextHandler`` (driven by ``temporal.context``) for sliding windows.
Object patches are undone when ComfyUI unpatches the model, so unloading removes the layers.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import comfy.context_windows
import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, Upsample
from comfy_api.latest import io

from ..temporal.context import BLENDS, blend_weights, fuse, windows
from ..temporal.formats import FormatError, MotionInfo, load_layers, load_motion_module
from ..temporal.inject import InjectionError, MotionSlot, check_injection, timestep_embed_handler
from ..temporal.layers import Layout, MotionModule, layout_of_unet
from . import _host
from ._host import BadInput

ANIMATEDIFF_FOLDER = "animatediff_models"
LAYERS_FOLDER = "temporal_layers"
_host.register_model_folder(ANIMATEDIFF_FOLDER)
_host.register_model_folder(LAYERS_FOLDER)

MotionType = io.Custom("COMPARTMENTS_TEMPORAL")
CATEGORY = "Compartments/Temporal"
WRAPPER_KEY = "compartments_temporal"


@dataclass
class LoadedTemporal:
    """What flows on a COMPARTMENTS_TEMPORAL wire: the layers, what they are, where from."""

    module: MotionModule
    info: MotionInfo
    name: str
    frames: int | None = None


def _files(folder: str) -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list(folder) if f.endswith(".safetensors")]


def _load(folder: str, name: str, input_name: str) -> LoadedTemporal:
    path = _host.resolve_file(folder, name, input_name)
    try:
        if folder == LAYERS_FOLDER:
            module, info, meta = load_layers(path)
            frames = int(meta.get("frames", 0)) or None
        else:
            module, info = load_motion_module(path)
            frames = None
    except FormatError as exc:
        raise BadInput(input_name, f"'{name}': {exc}",
                       "pick an AnimateDiff motion module (SD1.5 v1/v2/v3, SDXL beta), Hotshot-XL temporal layers "
                       "or Compartments layers.") from exc
    module.eval().requires_grad_(False)
    return LoadedTemporal(module, info, name, frames)


class LoadMotionModule(io.ComfyNode):
    """AnimateDiff or Hotshot-XL motion module from models/animatediff_models (layout detected from the keys)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsLoadMotionModule",
            display_name="Load Motion Module (AnimateDiff)",
            category=CATEGORY,
            description="Loads an AnimateDiff motion module (SD1.5 v1/v2/v3 or SDXL beta, original or diffusers "
                        "MotionAdapter keys) or Hotshot-XL's temporal layers (SDXL), detected from the file, "
                        "as temporal layers.",
            inputs=[io.Combo.Input("motion_module", options=_files(ANIMATEDIFF_FOLDER),
                                   tooltip="A .safetensors file in models/animatediff_models.")],
            outputs=[MotionType.Output(display_name="temporal_layers")],
        )

    @classmethod
    def execute(cls, motion_module: str) -> io.NodeOutput:
        return io.NodeOutput(_load(ANIMATEDIFF_FOLDER, motion_module, "motion_module"))


class LoadTemporalLayers(io.ComfyNode):
    """Compartments (Video LDM style) temporal layers from models/temporal_layers."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsLoadTemporalLayers",
            display_name="Load Temporal Layers",
            category=CATEGORY,
            description="Loads temporal layers saved by Compartments (attention and 3D-conv blocks with learned "
                        "alphas; the header names the base model and frame count).",
            inputs=[io.Combo.Input("temporal_layers", options=_files(LAYERS_FOLDER),
                                   tooltip="A .safetensors file in models/temporal_layers.")],
            outputs=[MotionType.Output(display_name="temporal_layers")],
        )

    @classmethod
    def execute(cls, temporal_layers: str) -> io.NodeOutput:
        return io.NodeOutput(_load(LAYERS_FOLDER, temporal_layers, "temporal_layers"))


# --- injection --------------------------------------------------------------------------------------------


def model_layout(model: Any, mid: bool) -> Layout:
    """The UNet layout of a ComfyUI MODEL; BadInput('model') naming the architecture when it is not a UNet."""
    dm = model.get_model_object("diffusion_model")
    needed = ("model_channels", "channel_mult", "num_res_blocks", "input_blocks", "output_blocks")
    if not all(hasattr(dm, a) for a in needed):
        raise BadInput("model", f"the model is {_host.architecture(model)}, a diffusion transformer without UNet "
                       "blocks; motion modules and temporal layers attach after the blocks of an SD1.5- or "
                       "SDXL-family UNet.",
                       "use an SD1.5 or SDXL-family checkpoint with its matching motion module.")
    return layout_of_unet(dm.model_channels, list(dm.channel_mult), list(dm.num_res_blocks), mid=mid)


def _block_path(block: tuple[str, int]) -> str:
    kind, i = block
    return "diffusion_model.middle_block" if kind == "middle" else f"diffusion_model.{kind}_blocks.{i}"


def _with_slot(block: Any, slot: MotionSlot, middle: bool) -> TimestepEmbedSequential:
    """A copy of ``block`` whose original children keep their names, with ``slot`` inserted.

    Input/output blocks: after the spatial layers, before an upsampler (diffusers order).
    Middle block: after the transformer, before the second res block.
    """
    children = [(n, c) for n, c in block.named_children() if not isinstance(c, MotionSlot)]
    if middle:
        at = 2 if len(children) > 2 else len(children)
    else:
        at = next((i for i, (_, c) in enumerate(children) if isinstance(c, Upsample)), len(children))
    children.insert(at, ("temporal", slot))
    return TimestepEmbedSequential(OrderedDict(children))


def frame_context_handler(**options: Any) -> Any:
    """Core's ``IndexListContextHandler`` over the latent batch (dim 0), stepping on the first sigma.

    Core's ``set_step`` (0.3.x) compares ``sample_sigmas`` with the whole per-sample timestep
    vector, which only broadcasts when the batch is 1 (video models with a time dim); with
    frames as the batch every frame carries the same sigma, so the first one identifies the
    step. The handler is core's own object (no subclass: its constructor grew arguments
    between releases); only ``set_step`` is wrapped, on the instance, as a bound method so a
    deep-copied model_options rebinds it to the copy, and it passes on any new arguments.
    """
    handler = comfy.context_windows.IndexListContextHandler(**options)
    core_set_step = type(handler).set_step

    def set_step(self: Any, timestep: Any, model_options: dict, *args: Any, **kwargs: Any) -> Any:
        return core_set_step(self, timestep[:1], model_options, *args, **kwargs)

    handler.set_step = types.MethodType(set_step, handler)
    return handler


def _schedule(num_frames: int, handler: Any, model_options: dict, **_: Any) -> list[list[int]]:
    return windows(num_frames, handler.context_length, handler.context_overlap)


def _fuse_for(method: str):
    def weights(length: int, full_length: int, idxs: list[int], handler: Any, **_: Any) -> list[float]:
        return blend_weights(length, method, handler.context_overlap, first=min(idxs) == 0,
                             last=max(idxs) == full_length - 1)

    return weights


def patch_layers(model: Any, module: MotionModule, alphas: dict[str, float | None] | None = None) -> Any:
    """A clone of ``model`` with ``module``'s layers after their spatial blocks (official hooks only).

    The one placement for applying and for training: same block paths, same position in each
    block, spatial children keep their names (LoRA and soup patches still resolve). The layers
    are shared, not copied, so training ``module`` changes what the clone computes. ``alphas``
    overrides a layer's own alpha by key (None: the layer's).
    """
    m = model.clone()
    layers = module.layers()
    for slot in module.layout.slots:
        path = _block_path(slot.block)
        motion = MotionSlot(layers[slot.key], slot.key, (alphas or {}).get(slot.key))
        m.add_object_patch(path, _with_slot(m.get_model_object(path), motion, slot.block[0] == "middle"))
    existing = m.model_options.get("transformer_options", {}).get("patches", {}).get("forward_timestep_embed_patch", [])
    if not any(cls is MotionSlot for cls, _ in existing):
        m.set_model_forward_timestep_embed_patch((MotionSlot, timestep_embed_handler))
    return m


def inject(model: Any, loaded: LoadedTemporal, frame_count: int, context_length: int = 0, context_overlap: int = 4,
           context_blend: str = "pyramid", alpha: float = -1.0, alpha_overrides: str = "") -> Any:
    """Check (the room's :func:`check_injection`) -> patch -> frame check and context handler."""
    module = loaded.module
    alphas = check_injection(module, model_layout(model, module.layout.mid), frame_count, context_length,
                             context_overlap, context_blend, alpha, alpha_overrides)
    m = patch_layers(model, module, alphas)

    def check_batch(executor: Any, noise: Any, *args: Any, **kwargs: Any) -> Any:
        frames = int(noise.shape[0])
        if frames != frame_count:  # runs inside core's sampler, after Apply Temporal Layers returned
            raise _host.node_error(ApplyTemporalLayers, InjectionError(
                f"is {frame_count} but the latent batch holds {frames} frames.",
                "frames are the latent batch: set the empty latent's batch_size to frame_count.", "frame_count"))
        return executor(noise, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, check_batch)
    if 0 < context_length < frame_count:
        m.model_options["context_handler"] = frame_context_handler(
            context_schedule=comfy.context_windows.ContextSchedule("compartments_uniform", _schedule),
            fuse_method=comfy.context_windows.ContextFuseMethod(f"compartments_{context_blend}",
                                                                _fuse_for(context_blend)),
            context_length=context_length, context_overlap=context_overlap, dim=0)
        comfy.context_windows.create_prepare_sampling_wrapper(m)
    return m


class ApplyTemporalLayers(io.ComfyNode):
    """Turn an image MODEL into a video MODEL: temporal layers after its spatial blocks."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsApplyTemporalLayers",
            display_name="Apply Temporal Layers",
            category=CATEGORY,
            description="Inserts temporal layers (motion module) into the model; the latent batch is the frames. "
                        "Sliding context windows let videos run longer than the layers' native frame count.",
            inputs=[
                io.Model.Input("model",
                               tooltip="The image model (an SD1.5 or SDXL UNet) that gets the temporal layers."),
                MotionType.Input("temporal_layers",
                                 tooltip="From Load Motion Module (AnimateDiff) or Load Temporal Layers."),
                io.Int.Input("frame_count", default=16, min=1, max=4096,
                             tooltip="Frames in the video = the latent batch size."),
                io.Int.Input("context_length", default=0, min=0, max=64,
                             tooltip="Frames per sliding window; 0 = off (the whole video in one pass)."),
                io.Int.Input("context_overlap", default=4, min=0, max=63,
                             tooltip="Frames shared by neighbouring windows (smaller than context_length)."),
                io.Combo.Input("context_blend", options=list(BLENDS), default="pyramid",
                               tooltip="How overlapping windows are averaged."),
                io.Float.Input("alpha", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Mix of image path vs temporal path for every layer: 1 = image model, "
                                       "0 = full temporal; -1 = the layers' own (0 for AnimateDiff)."),
                io.String.Input("alpha_overrides", default="", multiline=True,
                                tooltip="Per-layer alphas, e.g. 'down_blocks=0.5, mid_block=1'."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model: Any, temporal_layers: LoadedTemporal, frame_count: int, context_length: int,
                context_overlap: int, context_blend: str, alpha: float, alpha_overrides: str) -> io.NodeOutput:
        _host.check_numbers(cls, alpha=alpha)
        return io.NodeOutput(inject(model, temporal_layers, frame_count, context_length, context_overlap,
                                    context_blend, alpha, alpha_overrides))


# --- decoding ------------------------------------------------------------------------------------------------


def has_temporal_decoder(vae: Any) -> bool:
    """True for VAEs whose decoder mixes frames (SVD's ``VideoDecoder``: 3D convs + learned alpha)."""
    decoder = getattr(getattr(vae, "first_stage_model", None), "decoder", None)
    return type(decoder).__name__ == "VideoDecoder"


def decode_video(vae: Any, latent: Any, frames_per_pass: int = 0, overlap: int = 2) -> tuple[Any, str]:
    """Decode frames; temporally when the VAE can, in whole windows blended over ``overlap`` frames.

    Core ``VAEDecode`` splits the batch by free memory, which cuts a temporal decoder's frame
    mixing at arbitrary frames; here every window is one decoder call. Other VAEs decode per
    frame (exactly core's ``VAEDecode``). Returns the images and the mode used.
    """
    import comfy.model_management

    frames = int(latent.shape[0])
    if not has_temporal_decoder(vae):
        return vae.decode(latent), "per-frame"
    length = frames if frames_per_pass in (0, None) else int(frames_per_pass)
    if length > frames:
        raise BadInput("frames_per_pass", f"the video has {frames} frames, fewer than {length}.",
                       "use at most the frame count, or 0 for the whole video in one pass.")
    if length < frames and overlap >= length:
        raise BadInput("overlap", f"{overlap} must be smaller than frames_per_pass ({length}).")
    comfy.model_management.load_models_gpu([vae.patcher])
    idx = windows(frames, length, min(overlap, length - 1) if length < frames else 0)
    outs = []
    for window in idx:
        _host.check_interrupt()
        z = latent[window].to(vae.vae_dtype).to(vae.device)
        with torch.no_grad():
            out = vae.first_stage_model.decode(z)  # the temporal blocks take the whole batch as one clip
        outs.append(vae.process_output(out.to(vae.output_device).float()))
    images = outs[0] if len(outs) == 1 else fuse(outs, idx, frames, "linear", overlap)
    return images.movedim(1, -1), "temporal"


class VAEDecodeVideo(io.ComfyNode):
    """Decode a video latent: temporally with a temporal VAE decoder (SVD's), per frame otherwise."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsVAEDecodeVideo",
            display_name="VAE Decode Video",
            category=CATEGORY,
            description="With a VAE that has temporal decoder layers (SVD's), decodes whole windows of frames "
                        "together and blends overlaps; with any other VAE it is the same as VAE Decode.",
            inputs=[
                io.Latent.Input("samples", tooltip="The video latent: its batch holds the frames."),
                io.Vae.Input("vae",
                             tooltip="The VAE; one with a temporal decoder (SVD's) decodes whole windows of frames together."),
                io.Int.Input("frames_per_pass", default=0, min=0, max=4096,
                             tooltip="Frames per decoder call for a temporal decoder; 0 = the whole video."),
                io.Int.Input("overlap", default=2, min=0, max=64,
                             tooltip="Frames shared by neighbouring passes."),
            ],
            outputs=[io.Image.Output(), io.String.Output(display_name="mode")],
        )

    @classmethod
    def execute(cls, samples: dict, vae: Any, frames_per_pass: int, overlap: int) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 4:
            raise BadInput("samples", f"expected frames x 4 x h x w, got {tuple(latent.shape)}.",
                           "pass an image-model latent whose batch holds the frames.")
        images, mode = decode_video(vae, latent, frames_per_pass, overlap)
        return io.NodeOutput(images, mode)


NODES = [LoadMotionModule, LoadTemporalLayers, ApplyTemporalLayers, VAEDecodeVideo]

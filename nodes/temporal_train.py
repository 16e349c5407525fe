"""Train temporal layers on a clip inside ComfyUI (Video LDM: image layers frozen).

The node translates ComfyUI objects for :mod:`compartments.temporal.train`: it encodes the
frames with the VAE, builds fresh Video-LDM layers for the MODEL's UNet layout (or resumes a
saved pair), applies them to a clone of the MODEL through ``forward_timestep_embed_patch``
and object patches, and runs the room's loop from inside a core guider, so the loss sees
exactly what sampling sees: ``model_sampling`` (sigma table, ``noise_scaling``,
``calculate_input`` / ``calculate_denoised``), the conditioning and every other patch on
the MODEL (LoRAs, a soup). :func:`train_headless` is the same path for
``python -m compartments train-temporal``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy_extras.nodes_custom_sampler
import torch
from comfy_api.latest import io

from ..temporal import formats
from ..temporal.inject import LayoutMismatch, check_compatible
from ..temporal.layers import LAYER_KINDS, MotionModule
from ..temporal.train import (
    TrainConfig,
    TrainError,
    TrainResult,
    check_layers_path,
    loss_curve_image,
    loss_report,
    train_temporal,
    video_ldm_io,
)
from . import _host
from . import temporal as temporal_nodes

FOLDER = "temporal_layers"

_host.register_model_folder(FOLDER)
log = logging.getLogger("compartments.temporal_train")


# --- MODEL plumbing -------------------------------------------------------------------------------
def model_layout(model):
    """The temporal :class:`Layout` for a MODEL's UNet (openaimodel UNets only), with a mid-block slot."""
    return temporal_nodes.model_layout(model, True)


def _as_normal_tensor(weight: torch.Tensor) -> torch.Tensor:
    # Checkpoints loaded while ComfyUI executes are inference tensors, which autograd cannot
    # save for backward; the cast path copies them (normal tensors) when a wrapper is present.
    return weight.clone() if weight.is_inference() else weight


def _autograd_ready(mp):
    """Clone whose inference-mode spatial weights reach autograd as normal copies (weight wrappers)."""
    if not any(p.is_inference() for p in mp.model.parameters()):
        return mp
    mp = mp.clone()
    for name, m in mp.model.named_modules():
        if not hasattr(m, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                mp.add_weight_wrapper(f"{name}.{attr}", _as_normal_tensor)
    return mp


def prediction_of(model_sampling) -> tuple[str, float]:
    """The room's name for the model's parameterisation, and ``sigma_data``."""
    ms = comfy.model_sampling
    for cls, name in ((ms.X0, "x0"), (ms.EDM, "edm"), (ms.V_PREDICTION, "v"), (ms.EPS, "eps"), (ms.CONST, "flow")):
        if isinstance(model_sampling, cls):
            return name, float(getattr(model_sampling, "sigma_data", 1.0))
    raise _host.BadInput("model", f"model sampling {type(model_sampling).__name__} is not supported "
                         "(eps, v, x0, EDM or flow models only).")


def empty_conditioning(model) -> list:
    """A zero text conditioning of the UNet's context width, for training without a prompt."""
    unet = model.model.model_config.unet_config
    dim = int(unet.get("context_dim") or 768)
    return [[torch.zeros(1, 77, dim), {}]]


class _TrainSampler(comfy.samplers.Sampler):
    """A core Sampler whose ``sample`` is the training loop (the guider supplies the denoiser)."""

    def __init__(self, run: Callable):
        self.run = run
        self.result: TrainResult | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False, **kwargs):
        model_sampling = model_wrap.inner_model.model_sampling

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return model_wrap(x, sigma, **extra_args)

        def noise_scaling(sigma: torch.Tensor, n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return model_sampling.noise_scaling(sigma, n, x, False)

        self.result = self.run(denoise, latent_image.detach().clone(), model_sampling, noise_scaling)
        return latent_image


def train_on_model(model, latents: torch.Tensor, positive: list | None, config: TrainConfig, kinds: tuple[str, ...],
                   save_to: str | None, resume: bool, progress: Callable[[int, int], None] | None,
                   log_fn: Callable[[str], None] | None = None):
    """Train temporal layers for ``model`` on raw VAE latents ``[T, C, h, w]``.

    Returns (MODEL with the trained layers, the layers, :class:`TrainResult`). The input
    MODEL is not modified (its parameters' ``requires_grad`` flags are restored).
    """
    layout = model_layout(model)
    with torch.inference_mode(False), torch.enable_grad():
        if resume and save_to and os.path.exists(save_to):
            try:
                module, info, _ = formats.load_layers(save_to)
                check_compatible(info.layout(), layout)
            except (formats.FormatError, LayoutMismatch) as exc:
                raise _host.BadInput("resume", f"cannot resume from '{os.path.basename(save_to)}': {exc}",
                                     "turn resume off to start new layers, or pick another save name.") from exc
        else:
            module = MotionModule(layout, kinds, max_frames=max(32, config.frames_per_clip))
        module.to(comfy.model_management.get_torch_device())
        latents = latents.detach().clone().float()
        base_params = list(model.model.parameters())
        flags = [p.requires_grad for p in base_params]
        trained = temporal_nodes.patch_layers(model, module)
        working = _autograd_ready(trained)
        save_layers, load_layers = video_ldm_io(config.frames_per_clip, base=layout.name)

        def run(denoise, lat, model_sampling, noise_scaling) -> TrainResult:
            config.prediction, config.sigma_data = prediction_of(model_sampling)
            sigmas = model_sampling.sigmas.detach().float().cpu()
            return train_temporal(denoise, module, lat, sigmas, config, noise_scaling=noise_scaling,
                                  spatial=base_params, checkpoint=save_to, resume=resume and bool(save_to)
                                  and os.path.exists(save_to), progress=progress, save_layers=save_layers,
                                  load_layers=load_layers, log=log_fn)

        sampler = _TrainSampler(run)
        guider = comfy_extras.nodes_custom_sampler.Guider_Basic(working)
        guider.set_conds(positive or empty_conditioning(model))
        sigma_max = float(working.get_model_object("model_sampling").sigma_max)
        try:
            guider.sample(torch.zeros_like(latents), latents, sampler, torch.tensor([sigma_max, 0.0]),
                          seed=config.seed, disable_pbar=True)
        finally:
            module.requires_grad_(False)
    # Outside inference_mode(False): weights loaded in inference mode (as ComfyUI loads them)
    # only take their requires_grad flag back from within inference mode, where we now are.
    for p, f in zip(base_params, flags, strict=True):
        if p.requires_grad != f and (torch.is_inference_mode_enabled() or not p.is_inference()):
            p.requires_grad_(f)
    return trained, module, sampler.result


def encode_frames(vae, images: torch.Tensor | None, latent: dict | None) -> torch.Tensor:
    """Raw latents ``[T, C, h, w]`` from a LATENT batch or from IMAGE frames + VAE."""
    if latent is not None:
        samples = latent["samples"]
        if samples.ndim != 4:
            raise _host.BadInput("latent", f"expected a batch of image latents [frames, C, h, w], "
                                 f"got shape {tuple(samples.shape)}.", "encode the frames with an image VAE.")
        return samples
    if images is None:
        raise _host.BadInput("images", "no frames: connect IMAGE frames (with a VAE) or a LATENT batch.",
                             "load a video, an animated WEBP/GIF or a folder of frames as an IMAGE batch.")
    if vae is None:
        raise _host.BadInput("vae", "IMAGE frames need a VAE to encode them.",
                             "connect the checkpoint's VAE (or give a LATENT batch instead).")
    return vae.encode(images[:, :, :, :3])


class TrainTemporalLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsTemporalTrain",
            display_name="Train Temporal Layers",
            category="Compartments/Temporal",
            description="Fit Video-LDM temporal layers (attention over frames, 3D conv, learned alpha) on one clip "
                        "with the image model frozen; saves layers + optimizer state to models/temporal_layers.",
            inputs=[
                io.Model.Input("model", tooltip="The image model; its weights stay frozen."),
                io.Int.Input("steps", default=200, min=0, max=1_000_000,
                             tooltip="Total optimizer steps. With resume on, training continues up to this count."),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("frames_per_clip", default=8, min=1, max=128,
                             tooltip="Frames per training clip (a window drawn from the video each step)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the training noise, timesteps and clip windows."),
                io.String.Input("save_name", default="temporal_train/my_layers",
                                tooltip="File under models/temporal_layers (.safetensors added); the optimizer "
                                        "state goes beside it as .optim.safetensors. Overwritten unless resume."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from save_name and its optimizer state (same step count and "
                                         "result as an uninterrupted run)."),
                io.Image.Input("images", optional=True,
                               tooltip="The clip's frames as an IMAGE batch, in order."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the IMAGE frames."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Already encoded frames (instead of images + vae)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Caption of the clip; empty (zero) conditioning when not connected."),
                io.Combo.Input("layers", options=list(LAYER_KINDS), default="attention + conv", optional=True,
                               tooltip="Temporal layer types for new layers."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Also checkpoint every N steps (0: at the end and on Cancel only)."),
                io.Int.Input("eval_draws", default=4, min=0, max=64, optional=True,
                             tooltip="Fixed (noise, sigma) draws scored before and after training for an honest "
                                     "loss comparison; each costs one forward pass."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.String.Output(display_name="report"),
                io.Image.Output(display_name="loss_curve"),
            ],
        )

    @classmethod
    def execute(cls, model, steps: int, lr: float, frames_per_clip: int, seed: int, save_name: str, resume: bool,
                images=None, vae=None, latent=None, positive=None, layers: str = "attention + conv",
                save_every: int = 0, eval_draws: int = 4) -> io.NodeOutput:
        _host.check_numbers(cls, lr=lr)
        if not save_name.strip():
            raise _host.BadInput("save_name", "is empty.", "give a name such as temporal_train/my_layers.")
        save_to = _host.save_path(FOLDER, save_name.strip(), "save_name")
        with _host.blame("save_name"):
            check_layers_path(save_to)
        if resume and not os.path.exists(save_to):
            raise _host.BadInput("resume", f"nothing to resume: '{save_name}' is not in models/{FOLDER}.",
                                 "turn resume off for the first run.")
        with torch.no_grad():  # the VAE is not trained; its weights may be inference tensors
            latents = encode_frames(vae, images, latent)
        if latents.shape[0] < frames_per_clip:
            raise _host.BadInput("frames_per_clip", f"the clip has {latents.shape[0]} frames, fewer than "
                                 f"frames_per_clip={frames_per_clip}.", "give more frames or lower frames_per_clip.")
        config = TrainConfig(steps=steps, lr=lr, frames_per_clip=frames_per_clip, seed=seed, save_every=save_every,
                             eval_draws=eval_draws)
        with _host.blame("model"):
            trained, _, result = train_on_model(model, latents, positive, config, LAYER_KINDS[layers], save_to, resume,
                                                _host.progress(steps), log.info)
        curve = loss_curve_image(result.losses, result.eval_curve).to(comfy.model_management.intermediate_device())
        return io.NodeOutput(trained, loss_report(result), curve)


NODES = [TrainTemporalLayers]


# --- command line ---------------------------------------------------------------------------------
def train_headless(checkpoint: str, frames: torch.Tensor, out: str, config: TrainConfig, prompt: str = "",
                   kinds: tuple[str, ...] = ("attention", "conv"), resume: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """``python -m compartments train-temporal``: load a checkpoint with ComfyUI and train, no server."""
    import comfy.sd

    ckpt = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=bool(prompt))
    model, clip, vae = ckpt[0], ckpt[1], ckpt[2]
    if model is None or vae is None:
        raise TrainError(f"'{checkpoint}' has no diffusion model or no VAE; give a full checkpoint.")
    positive = None
    if prompt:
        tokens = clip.tokenize(prompt)
        positive = clip.encode_from_tokens_scheduled(tokens)
    with torch.no_grad():
        latents = vae.encode(frames[:, :, :, :3])
    if latents.shape[0] < config.frames_per_clip:
        raise TrainError(f"the clip has {latents.shape[0]} frames, fewer than frames_per_clip={config.frames_per_clip}.")
    _, _, result = train_on_model(model, latents, positive, config, kinds, out, resume, progress)
    return result

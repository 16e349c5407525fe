"""Fit temporal layers on a clip with the image (spatial) weights frozen (Video LDM, sec. 3.1).

The loop is plain torch. It needs only:

* ``denoise(x_noisy, sigma) -> denoised``: the video model (image UNet + temporal layers) as a
  k-diffusion style denoiser, frames as the batch. In ComfyUI this is the sampler's
  ``model_wrap`` (so ``model_sampling``'s ``calculate_input`` / ``calculate_denoised``, the
  conditioning and every ModelPatcher hook are applied exactly as when sampling);
* ``temporal``: the ``nn.Module`` whose parameters are the temporal layers used by ``denoise``;
* ``sigmas``: the model's discrete noise levels (``model_sampling.sigmas``) to draw from;
* ``noise_scaling(sigma, noise, latent)``: how the model noises a clean latent
  (``model_sampling.noise_scaling``; EPS/V: ``x + sigma*n``, flow: ``sigma*n + (1-sigma)*x``).

Loss. Video LDM trains with the image model's own denoising objective, so the loss is the
squared error in the model's native parameterisation: with ComfyUI's
``denoised = c_skip*x + c_out*F(x)``, the error of ``F`` is ``(denoised - x0) / c_out``.
For eps-prediction ``c_out = -sigma`` (the loss is ``|eps_hat - eps|^2``), for
v-prediction ``c_out = -sigma*sd/sqrt(sigma^2+sd^2)``, for flow ``c_out = -sigma``, for x0 ``1``.
One sigma is drawn per clip (every frame of a clip shares the noise level) uniformly over the
model's discrete timesteps, as in SD's training.

Reproducibility. Step ``k`` draws its clip start, sigma and noise from a generator seeded with
``(seed, k)``, on the CPU, so a run resumed from a checkpoint at step ``k`` is bitwise the same
as an uninterrupted run (the checkpoint holds the exact weights and AdamW moments).

Checkpoints are two safetensors files written atomically (temp file + ``os.replace``): the
layers (``save_layers``, the project's Video-LDM-style format once ``temporal.formats`` is
used) and ``<name>.optim.safetensors`` with AdamW's moments plus JSON metadata (step, losses,
config, param names and the SHA-256 of the layers file it belongs to). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CompartmentsError
from ..safetensors_header import HeaderError, check_file

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SaveLayers = Callable[[nn.Module, str, dict], None]
LoadLayers = Callable[[nn.Module, str], dict]
Progress = Callable[[int, int], None]

PREDICTIONS = ("eps", "v", "edm", "flow", "x0")
OPTIM_FORMAT = "compartments.temporal.optim/1"
RAW_LAYERS_FORMAT = "compartments.temporal.raw/1"
EVAL_SALT = 0x5EED_E7A1


class TrainError(CompartmentsError):
    """Bad training input: names the input and the fix."""


@dataclass
class TrainConfig:
    """Hyper-parameters; ``steps`` is the total target, so a resumed run stops at the same step."""

    steps: int = 100
    lr: float = 1e-4
    frames_per_clip: int = 8
    seed: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    save_every: int = 0
    prediction: str = "eps"
    sigma_data: float = 1.0
    eval_draws: int = 4
    eval_every: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise TrainError(f"steps must be >= 0, got {self.steps}.")
        if self.frames_per_clip < 1:
            raise TrainError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr must be a positive number, got {self.lr}.")
        if self.prediction not in PREDICTIONS:
            raise TrainError(f"prediction must be one of {PREDICTIONS}, got '{self.prediction}'.")


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    layers_path: str | None = None
    optim_path: str | None = None
    resumed_from: int = 0

    @property
    def eval_first(self) -> float | None:
        return self.eval_curve[0][1] if self.eval_curve else None

    @property
    def eval_last(self) -> float | None:
        return self.eval_curve[-1][1] if self.eval_curve else None


# --- loss -------------------------------------------------------------------------------------
def output_scale(prediction: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """``c_out`` of ComfyUI's ``calculate_denoised`` for each parameterisation (see module doc)."""
    if prediction in ("eps", "flow"):
        return -sigma
    if prediction in ("v", "edm"):
        scale = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
        return -scale if prediction == "v" else scale
    if prediction == "x0":
        return torch.ones_like(sigma)
    raise TrainError(f"prediction must be one of {PREDICTIONS}, got '{prediction}'.")


def native_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, prediction: str,
                sigma_data: float = 1.0) -> torch.Tensor:
    """Mean squared error of the network output in its own parameterisation (a scalar)."""
    c_out = output_scale(prediction, sigma.to(denoised), sigma_data).view(-1, *([1] * (denoised.ndim - 1)))
    return (((denoised.float() - x0.float()) / c_out.float()) ** 2).mean()


def eps_noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's EPS / V_PREDICTION ``noise_scaling``: ``x + sigma * n``."""
    return latent + noise * sigma.view(-1, *([1] * (noise.ndim - 1)))


def flow_noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's CONST (rectified flow) ``noise_scaling``: ``sigma * n + (1 - sigma) * x``."""
    s = sigma.view(-1, *([1] * (noise.ndim - 1)))
    return s * noise + (1.0 - s) * latent


# --- draws ------------------------------------------------------------------------------------
def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return g


def draw(latents: torch.Tensor, sigmas: torch.Tensor, frames: int, seed: int, step: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (clip, sigma per frame, noise) of training step ``step``; CPU-drawn, device-independent."""
    g = _generator(seed, step)
    start = int(torch.randint(0, latents.shape[0] - frames + 1, (1,), generator=g))
    idx = int(torch.randint(0, sigmas.shape[0], (1,), generator=g))
    clip = latents[start:start + frames]
    noise = torch.randn(clip.shape, generator=g, dtype=torch.float32).to(clip)
    sigma = sigmas[idx].float().expand(frames).to(clip.device)
    return clip, sigma, noise


def eval_draws(latents: torch.Tensor, sigmas: torch.Tensor, frames: int, seed: int, count: int
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``count`` noise levels evenly spread over the table, fixed noise and starts."""
    g = _generator(seed ^ EVAL_SALT, 0)
    n = sigmas.shape[0]
    out = []
    for i in range(count):
        idx = min(n - 1, int(round((i + 0.5) * n / count)))
        start = int(torch.randint(0, latents.shape[0] - frames + 1, (1,), generator=g))
        clip = latents[start:start + frames]
        noise = torch.randn(clip.shape, generator=g, dtype=torch.float32).to(clip)
        out.append((clip, sigmas[idx].float().expand(frames).to(clip.device), noise))
    return out


@torch.no_grad()
def evaluate(denoise: Denoiser, draws: list, noise_scaling: NoiseScaling, prediction: str,
             sigma_data: float = 1.0) -> float:
    """Mean native loss over a fixed draw set (no gradients, no parameter change)."""
    total = 0.0
    for clip, sigma, noise in draws:
        x = noise_scaling(sigma, noise, clip)
        total += float(native_loss(denoise(x, sigma), clip, sigma, prediction, sigma_data))
    return total / max(len(draws), 1)


# --- checkpoints ------------------------------------------------------------------------------
def raw_save_layers(module: nn.Module, path: str, metadata: dict) -> None:
    """Fallback layers writer: the module's state dict with string metadata."""
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(sd, path, metadata={"format": RAW_LAYERS_FORMAT, **{k: str(v) for k, v in metadata.items()}})


def _checked(path: str | Path, what: str) -> None:
    """A lying or broken safetensors header is a TrainError before anything is allocated."""
    try:
        check_file(path)
    except (HeaderError, OSError) as exc:
        raise TrainError(f"{what}: {exc}. Fix: use a file saved by Train Temporal Layers, or train afresh.") from None


def raw_load_layers(module: nn.Module, path: str) -> dict:
    """Fallback layers reader for :func:`raw_save_layers` files; returns the metadata."""
    _checked(path, "layers")
    module.load_state_dict(load_file(path), strict=True)
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def video_ldm_io(frames: int, base: str | None = None) -> tuple[SaveLayers, LoadLayers]:
    """Layers writer/reader in the project's Video-LDM-style format (:mod:`temporal.formats`).

    The writer records ``frames`` (the clip length trained on) and the training metadata;
    the reader loads the weights into an existing :class:`MotionModule` (strict).
    """
    from . import formats

    def save(module: nn.Module, path: str, metadata: dict) -> None:
        formats.save_layers(module, path, frames=frames, base=base, extra={k: str(v) for k, v in metadata.items()})

    def load(module: nn.Module, path: str) -> dict:
        sd, meta = formats.read_safetensors(path)
        module.load_state_dict(sd, strict=True)
        return meta

    return save, load


def check_layers_path(layers_path: str | Path) -> None:
    """Refuse a layers file name that is another run's optimizer state (``x.optim`` after ``x``
    would overwrite x's), the one collision the naming scheme allows."""
    name = Path(layers_path).name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    if stem.endswith(".optim"):
        raise TrainError(f"'{name}' is the optimizer-state name of the run '{stem[:-len('.optim')]}': saving layers "
                         "there would overwrite that run's optimizer state. Fix: pick a name that does not end "
                         "in '.optim'.")


def optim_path_for(layers_path: str | Path) -> Path:
    p = Path(layers_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(f"{stem}.optim.safetensors")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _named_trainable(temporal: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(temporal.named_parameters())


def save_checkpoint(layers_path: str | Path, temporal: nn.Module, optimizer: torch.optim.Optimizer,
                    result: TrainResult, config: TrainConfig, save_layers: SaveLayers = raw_save_layers,
                    layers_metadata: dict | None = None) -> tuple[Path, Path]:
    """Write layers + optimizer state atomically; the optimizer file records the layers file's hash."""
    layers_path = Path(layers_path)
    layers_path.parent.mkdir(parents=True, exist_ok=True)
    optim_path = optim_path_for(layers_path)
    tmp_layers, tmp_optim = _tmp(layers_path), _tmp(optim_path)
    try:
        meta = {"train_step": str(result.step), "train_seed": str(config.seed), **(layers_metadata or {})}
        save_layers(temporal, str(tmp_layers), meta)
        names = [n for n, _ in _named_trainable(temporal)]
        sd = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict] = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[key] = val
        metadata = {
            "format": OPTIM_FORMAT,
            "step": str(result.step),
            "param_names": json.dumps(names),
            "param_groups": json.dumps(sd["param_groups"]),
            "scalar_state": json.dumps(scalars),
            "config": json.dumps(asdict(config)),
            "losses": json.dumps(result.losses),
            "eval_curve": json.dumps(result.eval_curve),
            "layers_sha256": _sha256(tmp_layers),
        }
        save_file(tensors, str(tmp_optim), metadata=metadata)
        # Optimizer first: a crash between the two replaces leaves a hash mismatch that
        # load_checkpoint reports, never a silently mismatched pair.
        os.replace(tmp_optim, optim_path)
        os.replace(tmp_layers, layers_path)
    finally:
        for t in (tmp_layers, tmp_optim):
            if t.exists():
                t.unlink()
    return layers_path, optim_path


def load_checkpoint(layers_path: str | Path, temporal: nn.Module, optimizer: torch.optim.Optimizer,
                    load_layers: LoadLayers = raw_load_layers) -> TrainResult:
    """Restore layers + AdamW state written by :func:`save_checkpoint`; returns the saved progress."""
    layers_path = Path(layers_path)
    optim_path = optim_path_for(layers_path)
    if not layers_path.exists():
        raise TrainError(f"resume: no layers checkpoint at '{layers_path}'. Fix: turn resume off for a first run.")
    if not optim_path.exists():
        raise TrainError(f"resume: '{optim_path.name}' (optimizer state) is missing beside '{layers_path.name}'. "
                         "Fix: turn resume off, or load the layers as a start and train afresh.")
    _checked(optim_path, "resume")
    with safe_open(str(optim_path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != OPTIM_FORMAT:
        raise TrainError(f"resume: '{optim_path.name}' is not a Compartments optimizer state ({meta.get('format')}).")
    if meta.get("layers_sha256") != _sha256(layers_path):
        raise TrainError(f"resume: '{optim_path.name}' belongs to another version of '{layers_path.name}' "
                         "(the save was cut between its two files). Fix: delete the .optim file and train "
                         "afresh from the layers, or restore both files from a backup.")
    names = json.loads(meta["param_names"])
    own = [n for n, _ in _named_trainable(temporal)]
    if names != own:
        raise TrainError(f"resume: the checkpoint has {len(names)} temporal parameters, these layers have "
                         f"{len(own)} (or other names). Fix: resume with the same layer layout.")
    load_layers(temporal, str(layers_path))
    scalars = json.loads(meta["scalar_state"])
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for idx, vals in scalars.items():
        state.setdefault(int(idx), {}).update(vals)
    device = next((p.device for p in temporal.parameters()), torch.device("cpu"))
    for st in state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return TrainResult(step=int(meta["step"]), losses=json.loads(meta["losses"]),
                       eval_curve=[tuple(e) for e in json.loads(meta["eval_curve"])],
                       resumed_from=int(meta["step"]))


# --- the loop ---------------------------------------------------------------------------------
def freeze(spatial: Iterable[nn.Parameter], temporal: nn.Module) -> list[nn.Parameter]:
    """Freeze the spatial weights, unfreeze the temporal ones; refuse if the two overlap."""
    trainable = list(temporal.parameters())
    ids = {id(p) for p in trainable}
    for p in spatial:
        if id(p) in ids:
            raise TrainError("a temporal parameter is also listed as spatial; only temporal layers may train.")
        if p.requires_grad:
            p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise TrainError("the temporal layers have no parameters to train.")
    return trainable


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    # foreach=False keeps the update order identical across runs and resumes.
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                             foreach=False)


def train_temporal(denoise: Denoiser, temporal: nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
                   config: TrainConfig, *, noise_scaling: NoiseScaling = eps_noise_scaling,
                   spatial: Iterable[nn.Parameter] = (), checkpoint: str | Path | None = None,
                   resume: bool = False, progress: Progress | None = None,
                   save_layers: SaveLayers = raw_save_layers, load_layers: LoadLayers = raw_load_layers,
                   layers_metadata: dict | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``temporal`` (used inside ``denoise``) on ``latents`` [T, C, H, W] (frames = batch).

    Returns the losses per step and the fixed-set evaluation curve (first entry before any
    update of this run's first step when starting afresh, last entry at the final step).
    On any exception (Cancel, Ctrl-C, an error) the last completed step is checkpointed, unless
    the exception hit inside the optimizer update, in which case the last save point stands.
    """
    config.check()
    if latents.ndim != 4:
        raise TrainError(f"latents must be [frames, channels, height, width], got shape {tuple(latents.shape)}.")
    if latents.shape[0] < config.frames_per_clip:
        raise TrainError(f"the clip has {latents.shape[0]} frames, fewer than frames_per_clip="
                         f"{config.frames_per_clip}. Fix: give more frames or lower frames_per_clip.")
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise TrainError("sigmas must be a non-empty 1-D table of the model's noise levels.")
    trainable = freeze(spatial, temporal)
    optimizer = make_optimizer(trainable, config)
    result = TrainResult(step=0)
    if resume:
        if checkpoint is None:
            raise TrainError("resume needs a checkpoint path. Fix: give a save name.")
        result = load_checkpoint(checkpoint, temporal, optimizer, load_layers)
        result.layers_path, result.optim_path = str(checkpoint), str(optim_path_for(checkpoint))
        if log:
            log(f"resumed at step {result.step}")
    draws = eval_draws(latents, sigmas, config.frames_per_clip, config.seed, config.eval_draws)

    def run_eval() -> None:
        if config.eval_draws > 0 and (not result.eval_curve or result.eval_curve[-1][0] != result.step):
            result.eval_curve.append((result.step, evaluate(denoise, draws, noise_scaling, config.prediction,
                                                            config.sigma_data)))

    def save() -> None:
        if checkpoint is not None:
            result.layers_path, result.optim_path = map(str, save_checkpoint(
                checkpoint, temporal, optimizer, result, config, save_layers, layers_metadata))

    if not result.eval_curve:
        run_eval()
    in_update = False
    saved_at = result.step if resume else -1
    try:
        for step in range(result.step, config.steps):
            clip, sigma, noise = draw(latents, sigmas, config.frames_per_clip, config.seed, step)
            x = noise_scaling(sigma, noise, clip)
            with torch.enable_grad():
                loss = native_loss(denoise(x, sigma), clip, sigma, config.prediction, config.sigma_data)
                if not loss.requires_grad:
                    raise TrainError("the loss does not depend on the temporal layers: they are not in the "
                                     "model's forward path (were they applied to this MODEL?).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if all(p.grad is None for p in trainable):
                raise TrainError("no temporal parameter received a gradient; the layers are not in the forward path.")
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            in_update = True
            optimizer.step()
            in_update = False
            result.step = step + 1
            result.losses.append(float(loss.detach()))
            if config.eval_every and result.step % config.eval_every == 0:
                run_eval()
            if config.save_every and result.step % config.save_every == 0:
                save()
                saved_at = result.step
            if log:
                log(f"step {result.step}/{config.steps} loss {result.losses[-1]:.4f}")
            if progress:
                progress(result.step, config.steps)
    except BaseException:
        if not in_update and result.step > max(saved_at, 0):
            save()
        raise
    run_eval()
    if result.step != saved_at:
        save()
    return result


# --- reporting --------------------------------------------------------------------------------
def loss_report(result: TrainResult) -> str:
    """A short human-readable summary plus the curve as JSON (for a STRING output or a log)."""
    lines = [f"steps: {result.step} (resumed from {result.resumed_from})" if result.resumed_from
             else f"steps: {result.step}"]
    if result.losses:
        k = max(1, min(10, len(result.losses) // 2))
        first = sum(result.losses[:k]) / k
        last = sum(result.losses[-k:]) / k
        lines.append(f"train loss: first {k} mean {first:.4f}, last {k} mean {last:.4f}")
    if result.eval_curve:
        lines.append(f"fixed-set eval loss: {result.eval_first:.4f} -> {result.eval_last:.4f}")
    if result.layers_path:
        lines.append(f"saved: {result.layers_path}")
    lines.append(json.dumps({"losses": [round(v, 6) for v in result.losses],
                             "eval": [[s, round(v, 6)] for s, v in result.eval_curve]}))
    return "\n".join(lines)


def loss_curve_image(losses: list[float], eval_curve: list[tuple[int, float]] | None = None,
                     width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss curve drawn with PIL as a ComfyUI IMAGE ``[1, H, W, 3]`` (train grey, eval orange)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(im)
    pad = 28
    values = list(losses) + [v for _, v in (eval_curve or [])]
    d.rectangle([pad, 8, width - 8, height - pad], outline=(180, 180, 180))
    if values:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        n = max(len(losses), max((s for s, _ in (eval_curve or [])), default=0), 1)

        def xy(i: float, v: float) -> tuple[float, float]:
            return (pad + (width - 8 - pad) * i / n, height - pad - (height - pad - 8) * (v - lo) / (hi - lo))

        if len(losses) > 1:
            d.line([xy(i + 1, v) for i, v in enumerate(losses)], fill=(120, 120, 120), width=1)
        if eval_curve and len(eval_curve) > 1:
            d.line([xy(s, v) for s, v in eval_curve], fill=(230, 120, 20), width=2)
        d.text((pad, height - pad + 6), f"steps 0..{n}   loss {lo:.3g}..{hi:.3g}", fill=(40, 40, 40))
    else:
        d.text((pad, height // 2), "no steps trained", fill=(40, 40, 40))
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]

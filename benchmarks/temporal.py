"""Benchmark: temporal layers on the tiny model, frames per second and peak memory.

Figures (one JSON line each):

* ``temporal_layers``: every temporal layer of the tiny AnimateDiff module at its real
  resolution for 64x64 latents (320 ch at 64x64, 640 ch at 32x32), one video of 16 / 32
  frames, per attention backend (torch SDPA; xformers when installed). frames/s and
  peak memory (CUDA: max allocated; CPU: peak RSS of a fresh child process).
* ``unet_step``: one full tiny-UNet call (ComfyUI's model, temporal layers injected through
  the node) on a video of F frames, with and without the layers, when ComfyUI is found;
  latent size ``--unet-latent`` (default 8 = 64x64 px: the full UNet at 64x64 latents takes
  minutes per call on a shared 2-core CPU).
* ``animatediff_evolved``: the same graph through AnimateDiff-Evolved when it sits beside
  ComfyUI (custom_nodes/ComfyUI-AnimateDiff-Evolved or ~/ComfyUI-AnimateDiff-Evolved);
  otherwise a line saying it is not available.

``--quick``: 16 frames only, fewer repeats. Run: ``python -m compartments.benchmarks.temporal``
or ``python benchmarks/temporal.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def emit(figure: str, value: float | None, unit: str, **params) -> None:
    print(json.dumps({"benchmark": "temporal", "figure": figure, "value": value, "unit": unit, **params}), flush=True)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 ** 2) if platform.system() != "Darwin" else kb / (1024 ** 3)


def layers_child(frames: int, latent: int, backend: str, repeats: int) -> dict:
    """Run in a fresh process: time all temporal layers once per repeat; report fps and peak memory."""
    sys.path.insert(0, str(ROOT.parent))
    from compartments.temporal.formats import build_animatediff
    from compartments.temporal.layers import set_attention_backend
    from compartments.tiny.temporal import motion_state_dict

    set_attention_backend(backend)
    dev = _device()
    module, _ = build_animatediff(motion_state_dict(seed=0))
    module = module.to(dev).eval()
    shapes = {}
    for slot in module.layout.slots:
        level = module.layout.block_channels.index(slot.channels)
        shapes[slot.key] = (frames, slot.channels, latent >> level, latent >> level)
    inputs = {k: torch.randn(s, device=dev) for k, s in shapes.items()}
    base_rss = _peak_rss_gb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for key, x in inputs.items():
                module.layer(key)(x, frames)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    best = min(times[1:]) if len(times) > 1 else times[0]
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if dev.type == "cuda" else _peak_rss_gb()
    return {"seconds": best, "fps": frames / best, "peak_gb": peak, "baseline_rss_gb": base_rss, "device": dev.type}


def run_layers(frames: int, latent: int, backend: str, repeats: int) -> None:
    cmd = [sys.executable, __file__, "--child", str(frames), str(latent), backend, str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    if out.returncode:
        emit("temporal_layers_fps", None, "frames/s", frames=frames, latent=latent, attention=backend,
             error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
        return
    r = json.loads(out.stdout.strip().splitlines()[-1])
    common = {"frames": frames, "latent": f"{latent}x{latent}", "attention": backend, "device": r["device"],
              "model": "tiny-sd15 + tiny AnimateDiff module (7 layers)", "threads": torch.get_num_threads()}
    emit("temporal_layers_fps", round(r["fps"], 2), "frames/s", seconds=round(r["seconds"], 3), **common)
    emit("temporal_layers_peak_memory", round(r["peak_gb"], 3), "GB",
         measure="cuda max allocated" if r["device"] == "cuda" else "peak RSS of the child process", **common)


def _find_comfyui() -> Path | None:
    for cand in (os.environ.get("COMFYUI_PATH"), str(Path.home() / "ComfyUI")):
        if cand and (Path(cand) / "comfy" / "model_patcher.py").exists():
            return Path(cand)
    return None


def run_unet(frames_list: list[int], latent: int, repeats: int) -> None:
    comfy_dir = _find_comfyui()
    if comfy_dir is None:
        emit("unet_step_fps", None, "frames/s", note="ComfyUI not found (set COMFYUI_PATH)")
        return
    sys.path.insert(0, str(comfy_dir))
    sys.path.insert(0, str(ROOT.parent))
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.sd

    from compartments.nodes.temporal import LoadedTemporal, inject
    from compartments.temporal.formats import build_animatediff
    from compartments.tiny import sd15
    from compartments.tiny.temporal import motion_state_dict

    model = comfy.sd.load_checkpoint_guess_config(str(sd15.checkpoint()), output_vae=False, output_clip=False)[0]
    module, info = build_animatediff(motion_state_dict(seed=0))
    loaded = LoadedTemporal(module.eval().requires_grad_(False), info, "tiny")
    dev = mm.get_torch_device()
    for frames in frames_list:
        for label, patcher in (("image model", model), ("with temporal layers", inject(model, loaded, frames))):
            mm.load_models_gpu([patcher])
            x = torch.randn(frames, 4, latent, latent, device=dev)
            t = torch.full((frames,), 500.0, device=dev)
            c = torch.randn(frames, 77, 768, device=dev)
            opts = {"transformer_options": patcher.model_options["transformer_options"]}
            times = []
            with torch.no_grad():
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    patcher.model.apply_model(x, t, c_crossattn=c, transformer_options={
                        **opts["transformer_options"], "cond_or_uncond": [0]})
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            emit("unet_step_fps", round(frames / min(times), 3), "frames/s", frames=frames, variant=label,
                 latent=f"{latent}x{latent}", device=dev.type, attention="sdpa", seconds=round(min(times), 3))


def run_animatediff_evolved() -> None:
    comfy_dir = _find_comfyui()
    places = [Path.home() / "ComfyUI-AnimateDiff-Evolved"]
    if comfy_dir is not None:
        places.insert(0, comfy_dir / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved")
    found = [p for p in places if (p / "animatediff").is_dir()]
    if not found:
        emit("animatediff_evolved", None, "frames/s",
             note="not available here: AnimateDiff-Evolved is not installed beside ComfyUI "
                  "(and it accepts only full SD1.5/SDXL channel layouts, not the tiny module)")
        return
    emit("animatediff_evolved", None, "frames/s", path=str(found[0]),
         note="found, but not run: it accepts only full SD1.5/SDXL channel layouts (320/640/1280[/1280]), "
              "so the tiny module cannot go through it; compare with full-size weights on a GPU")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        frames, latent, backend, repeats = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        print(json.dumps(layers_child(frames, latent, backend, repeats)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 frames only, one repeat")
    ap.add_argument("--latent", type=int, default=64, help="latent side for the temporal-layer figures")
    ap.add_argument("--unet-latent", type=int, default=8, help="latent side for the full-UNet figure")
    ap.add_argument("--no-unet", action="store_true", help="skip the full-UNet figure")
    ns = ap.parse_args(argv)
    from compartments.temporal.layers import attention_backends

    frames_list = [16] if ns.quick else [16, 32]
    repeats = 1 if ns.quick else 3
    for backend in ("sdpa", "xformers"):
        if backend not in attention_backends():
            emit("temporal_layers_fps", None, "frames/s", attention=backend, note="xformers not installed")
            continue
        for frames in frames_list:
            run_layers(frames, ns.latent, backend, repeats)
    if not ns.no_unet:
        run_unet(frames_list, ns.unet_latent, 1)
    run_animatediff_evolved()
    if not torch.cuda.is_available():
        emit("gpu_real_weights", None, "frames/s", note="not measured: no GPU lent")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT.parent))
    raise SystemExit(main())

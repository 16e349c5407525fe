"""Benchmark: temporal layers on the tiny model, frames per second and peak memory.

Figures (one JSON line each):

* ``temporal_layers``: every temporal layer of the tiny AnimateDiff module at its real
  resolution for 64x64 latents (320 ch at 64x64, 640 ch at 32x32), one video of 16 / 32
  frames, per attention backend (torch SDPA; xformers when installed). frames/s and
  peak memory (CUDA: max allocated; CPU: peak RSS of a fresh child process).
  ``--layout sdxl``: the full-size AnimateDiff-SDXL beta module instead (15 layers, 320 ch at
  the latent side, 640 at half, 1280 at a quarter).
* ``unet_step``: one full tiny-UNet call (ComfyUI's model, temporal layers injected through
  the node) on a video of F frames, with and without the layers, when ComfyUI is found;
  latent size ``--unet-latent`` (default 8 = 64x64 px: the full UNet at 64x64 latents takes
  minutes per call on a shared 2-core CPU).
* ``side_by_side_*``: the same ComfyUI graph (CheckpointLoaderSimple -> motion module -> KSampler,
  cfg 2, euler, 1 step, 64x64 px = 8x8 latents, 16 and 32 frames) through Compartments
  (``CompartmentsLoadMotionModule`` + ``CompartmentsApplyTemporalLayers``) and through
  AnimateDiff-Evolved (``ADE_AnimateDiffLoaderGen1``, beta schedule "use existing"), each in its own
  process, on a full-size SD1.5 checkpoint and AnimateDiff SD1.5 v3 motion module with seeded random
  weights (``tiny/temporal_full.py``; ADE accepts only real SD1.5/SDXL layouts): frames/s, peak memory,
  and the max abs difference of the two first denoised latents. AnimateDiff-Evolved is looked up
  with ``--ade PATH``, in ``COMFYUI_PATH/custom_nodes`` or at ``~/ComfyUI-AnimateDiff-Evolved``;
  without it the figure says "not available".

``--quick``: 16 frames only, no full-size side-by-side run. ``--figures layers,unet,ade`` picks groups. Run: ``python benchmarks/temporal.py``
or ``python benchmarks/temporal.py``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
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


LAYOUT_LABELS = {"tiny-sd15": "tiny-sd15 + tiny AnimateDiff module (7 layers)",
                 "sdxl": "full-size AnimateDiff-SDXL beta module (15 layers, 236 M parameters)"}


def layers_child(frames: int, latent: int, backend: str, repeats: int, layout: str = "tiny-sd15") -> dict:
    """Run in a fresh process: time all temporal layers once per repeat; report fps and peak memory."""
    sys.path.insert(0, str(ROOT.parent))
    from compartments.temporal.formats import build_animatediff
    from compartments.temporal.layers import SDXL, set_attention_backend
    from compartments.tiny.temporal import motion_state_dict

    set_attention_backend(backend)
    dev = _device()
    sd = motion_state_dict(SDXL, seed=5) if layout == "sdxl" else motion_state_dict(seed=0)
    module, _ = build_animatediff(sd)
    del sd
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


def run_layers(frames: int, latent: int, backend: str, repeats: int, layout: str = "tiny-sd15") -> None:
    cmd = [sys.executable, __file__, "--child", str(frames), str(latent), backend, str(repeats), layout]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    if out.returncode:
        emit("temporal_layers_fps", None, "frames/s", frames=frames, latent=latent, attention=backend,
             error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
        return
    r = json.loads(out.stdout.strip().splitlines()[-1])
    common = {"frames": frames, "latent": f"{latent}x{latent}", "attention": backend, "device": r["device"],
              "model": LAYOUT_LABELS[layout], "threads": torch.get_num_threads()}
    emit("temporal_layers_fps", round(r["fps"], 2), "frames/s", seconds=round(r["seconds"], 3), **common)
    emit("temporal_layers_peak_memory", round(r["peak_gb"], 3), "GB",
         measure="cuda max allocated" if r["device"] == "cuda" else "peak RSS of the child process", **common)


def _find_comfyui() -> Path | None:
    sys.path.insert(0, str(ROOT.parent))
    from compartments.nodes._inprocess import default_checkout

    return default_checkout()


def run_unet(frames_list: list[int], latent: int, repeats: int) -> None:
    comfy_dir = _find_comfyui()
    if comfy_dir is None:
        emit("unet_step_fps", None, "frames/s", note="ComfyUI not found (set COMFYUI_PATH)")
        return
    import tempfile

    from compartments.nodes._inprocess import boot

    base = tempfile.mkdtemp(prefix="compartments-bench-")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    boot(comfy_dir, base, core_nodes=False)
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


ADE_DIR = "ComfyUI-AnimateDiff-Evolved"
PROMPT, NEGATIVE = "a cat walking on a beach, video", "blurry"


def find_ade(explicit: str | None) -> Path | None:
    """AnimateDiff-Evolved: ``--ade PATH``, else ``COMFYUI_PATH/custom_nodes``, else ``~/ComfyUI-AnimateDiff-Evolved``."""
    places: list[Path] = [Path(explicit).expanduser()] if explicit else []
    comfy_dir = _find_comfyui()
    if comfy_dir is not None:
        places.append(comfy_dir / "custom_nodes" / ADE_DIR)
    places.append(Path.home() / ADE_DIR)
    return next((p.resolve() for p in places if (p / "animatediff" / "nodes_gen1.py").is_file()), None)


def graph_child(impl: str, frames: int, steps: int, ckpt: str, motion: str, ade: str | None, out: str,
                with_image: bool) -> dict:
    """In a fresh process: a real ComfyUI (in-process, --cpu unless CUDA, temp base dir) runs
    CheckpointLoaderSimple -> motion module -> KSampler with ``impl`` = "compartments" or "ade".

    The KSampler runs three times (the first call also loads the model); the best of the other two is
    timed. The first
    output (``steps=1``: exactly the first denoised latent) is saved to ``out`` for the comparison.
    """
    import asyncio

    from safetensors.torch import save_file

    comfy_dir = _find_comfyui()
    assert comfy_dir is not None
    base = Path(out).parent / f"base-{impl}-{frames}"  # removed with the parent's work folder
    for sub in ("models/checkpoints", "models/animatediff_models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True)
    os.symlink(ckpt, base / "models/checkpoints/temporal-full-sd15.safetensors")
    os.symlink(motion, base / "models/animatediff_models/temporal-full-mm-sd15-v3.safetensors")
    from compartments.nodes._inprocess import boot

    host = boot(comfy_dir, base)
    import comfy.model_management as mm

    import nodes

    if impl == "ade" and not asyncio.run(nodes.load_custom_node(str(ade))):
        raise RuntimeError(f"AnimateDiff-Evolved at {ade} failed to import into this ComfyUI")
    N = nodes.NODE_CLASS_MAPPINGS
    _run_node = host.run
    t0 = time.perf_counter()
    model, clip, _vae = _run_node(N["CheckpointLoaderSimple"], ckpt_name="temporal-full-sd15.safetensors")[:3]
    pos = _run_node(N["CLIPTextEncode"], clip=clip, text=PROMPT)[0]
    neg = _run_node(N["CLIPTextEncode"], clip=clip, text=NEGATIVE)[0]
    mm_name = "temporal-full-mm-sd15-v3.safetensors"
    if impl == "ade":
        # "use existing": keep ComfyUI's SD1.5 noise schedule, as the Compartments graph does
        video = _run_node(N["ADE_AnimateDiffLoaderGen1"], model=model, model_name=mm_name,
                          beta_schedule="use existing")[0]
    else:
        layers = _run_node(N["CompartmentsLoadMotionModule"], motion_module=mm_name)[0]
        video = _run_node(N["CompartmentsApplyTemporalLayers"], model=model, temporal_layers=layers,
                          frame_count=frames, context_length=0, context_overlap=4, context_blend="pyramid",
                          alpha=-1.0, alpha_overrides="")[0]
    load_s = time.perf_counter() - t0
    latent = _run_node(N["EmptyLatentImage"], width=64, height=64, batch_size=frames)[0]

    def sample(m) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        res = _run_node(N["KSampler"], model=m, seed=0, steps=steps, cfg=2.0, sampler_name="euler",
                        scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
        return res["samples"].float().cpu(), time.perf_counter() - t

    first, cold_s = sample(video)
    warm_s = min(sample(video)[1] for _ in range(2))  # shared CPU: best of two warm calls
    tensors = {"video": first.contiguous()}
    if with_image:
        tensors["image"] = sample(model)[0].contiguous()
    save_file(tensors, out)
    dev = mm.get_torch_device()
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if dev.type == "cuda" else _peak_rss_gb()
    return {"impl": impl, "frames": frames, "steps": steps, "load_s": load_s, "cold_s": cold_s, "seconds": warm_s,
            "fps": frames / warm_s, "peak_gb": peak, "device": dev.type, "threads": torch.get_num_threads(),
            "finite": bool(torch.isfinite(first).all())}


def _child(args: list[str], env: dict[str, str]) -> tuple[dict | None, str]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:]), ""
    tail = (proc.stderr.strip() or proc.stdout.strip() or "failed").splitlines()[-3:]
    return None, " | ".join(tail)


def run_side_by_side(frames_list: list[int], ade_arg: str | None, steps: int) -> None:
    """The same graph through Compartments and AnimateDiff-Evolved, full-size SD1.5 + v3 module, 8x8 latents."""
    ade = find_ade(ade_arg)
    comfy_dir = _find_comfyui()
    if comfy_dir is None or ade is None:
        emit("side_by_side_fps", None, "frames/s",
             note="not available: " + ("ComfyUI not found (set COMFYUI_PATH)" if comfy_dir is None else
                                       f"AnimateDiff-Evolved not found (COMFYUI_PATH/custom_nodes/{ADE_DIR}, "
                                       f"~/{ADE_DIR}, or --ade PATH)"))
        return
    import tempfile

    from safetensors.torch import load_file

    from compartments.tiny.temporal_full import motion_module_v3, sd15_checkpoint

    ckpt, motion = sd15_checkpoint(0), motion_module_v3(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent), "COMFYUI_PATH": str(comfy_dir)}
    common = {"model": "full-size SD1.5 UNet + AnimateDiff SD1.5 v3 module (random seeded weights)",
              "latent": "8x8", "pixels": "64x64", "steps": steps, "cfg": 2.0, "sampler": "euler"}
    work = Path(tempfile.mkdtemp(prefix="temporal-side-by-side-"))
    for frames in frames_list:
        results: dict[str, dict] = {}
        for impl in ("compartments", "ade"):
            out = work / f"{impl}-{frames}.safetensors"
            r, err = _child(["--graph-child", impl, str(frames), str(steps), str(ckpt), str(motion), str(ade), str(out),
                             "1" if impl == "compartments" and frames == frames_list[0] else "0"], env)
            label = "Compartments" if impl == "compartments" else f"AnimateDiff-Evolved ({ade.name})"
            if r is None:
                emit("side_by_side_fps", None, "frames/s", implementation=label, frames=frames, error=err, **common)
                continue
            results[impl] = r
            params = {"implementation": label, "frames": frames, "device": r["device"], "threads": r["threads"],
                      **common}
            emit("side_by_side_fps", round(r["fps"], 3), "frames/s", seconds=round(r["seconds"], 2),
                 first_call_seconds=round(r["cold_s"], 2), load_seconds=round(r["load_s"], 2), **params)
            emit("side_by_side_peak_memory", round(r["peak_gb"], 2), "GB",
                 measure="cuda max allocated" if r["device"] == "cuda" else "peak RSS of the process (incl. loading)",
                 **params)
        if len(results) == 2:
            a = load_file(str(work / f"compartments-{frames}.safetensors"))
            b = load_file(str(work / f"ade-{frames}.safetensors"))
            diff = (a["video"] - b["video"]).abs()
            extra = {}
            if "image" in a:
                extra["temporal_effect_max_abs"] = round(float((a["video"] - a["image"]).abs().max()), 5)
            emit("side_by_side_max_abs_diff", float(diff.max()), "latent units", frames=frames,
                 mean_abs=float(diff.mean()), latent_std=round(float(a["video"].std()), 4),
                 compared="first denoised latent (KSampler output at steps=1)" if steps == 1 else
                 f"KSampler output after {steps} steps", **extra, **common)
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        frames, latent, backend, repeats = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        print(json.dumps(layers_child(frames, latent, backend, repeats, argv[5] if len(argv) > 5 else "tiny-sd15")))
        return 0
    if argv and argv[0] == "--graph-child":
        impl, frames, steps, ckpt, motion, ade, out, with_image = argv[1:9]
        r = graph_child(impl, int(frames), int(steps), ckpt, motion, ade, out, with_image == "1")
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="16 frames only, one repeat, no full-size side-by-side run")
    ap.add_argument("--latent", type=int, default=64, help="latent side for the temporal-layer figures")
    ap.add_argument("--layout", choices=sorted(LAYOUT_LABELS), default="tiny-sd15",
                    help="motion module of the temporal-layer figures: the tiny SD1.5 one or the full-size SDXL one")
    ap.add_argument("--unet-latent", type=int, default=8, help="latent side for the full-UNet figure")
    ap.add_argument("--no-unet", action="store_true", help="skip the tiny full-UNet figure")
    ap.add_argument("--figures", default="layers,unet,ade",
                    help="comma list of figure groups to run: layers, unet, ade (default: all)")
    ap.add_argument("--ade", default=None, help="path of ComfyUI-AnimateDiff-Evolved (else found beside ComfyUI)")
    ap.add_argument("--steps", type=int, default=1,
                    help="KSampler steps in the side-by-side graph (1: the output is the first denoised latent)")
    ns = ap.parse_args(argv)
    from compartments.temporal.layers import attention_backends

    groups = {g.strip() for g in ns.figures.split(",") if g.strip()}
    frames_list = [16] if ns.quick else [16, 32]
    repeats = 1
    if "layers" in groups:
        for backend in ("sdpa", "xformers"):
            if backend not in attention_backends():
                emit("temporal_layers_fps", None, "frames/s", attention=backend, note="xformers not installed")
                continue
            for frames in frames_list:
                run_layers(frames, ns.latent, backend, repeats, ns.layout)
    if "unet" in groups and not ns.no_unet:
        run_unet(frames_list, ns.unet_latent, 1)
    if "ade" in groups:
        if ns.quick:
            emit("side_by_side_fps", None, "frames/s",
                 note="skipped in --quick (full-size SD1.5 + motion module: ~2.5 GB of files, minutes of CPU)")
        else:
            run_side_by_side(frames_list, ns.ade, ns.steps)
    if not torch.cuda.is_available():
        emit("gpu_real_weights", None, "frames/s", note="not measured: no GPU lent")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT.parent))
    raise SystemExit(main())

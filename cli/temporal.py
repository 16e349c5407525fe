"""``python -m compartments train-temporal``: fit temporal layers on a clip without a ComfyUI server.

The image UNet, its model sampling and the VAE are ComfyUI's, so this command imports
ComfyUI from ``--comfyui PATH`` (default: the ComfyUI the pack is installed in, then
``$COMFYUI_PATH``, then ``~/ComfyUI``) in-process, through the pack's one in-process harness
(``nodes/_inprocess.py``, temporary base directory), to load the checkpoint; no server is
started and nothing is downloaded. The ComfyUI part lives in ``nodes/temporal_train.py`` (the
same code path as the node); this module only parses arguments and reads the frames, and
imports no ComfyUI module itself.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..temporal.data import FramesError, load_frames
from ..temporal.layers import LAYER_KINDS, layer_kinds
from ..temporal.train import TrainConfig, TrainError, check_layers_path, optim_path_for
from .client import ComfyError, find_comfyui

HELP = ("Train Video-LDM temporal layers on a video or image sequence with the image model frozen. "
        "Imports ComfyUI from --comfyui PATH to load the checkpoint, VAE and model sampling "
        "(the UNet is ComfyUI's); runs without a server. Ctrl-C saves the last completed step.")
# The node's LAYER_KINDS names without spaces (one word on a command line).
KIND_CHOICES = [name.replace(" ", "") for name in LAYER_KINDS]


def register(sub) -> None:
    p = sub.add_parser("train-temporal", help=HELP.split(". ")[0], description=HELP)
    p.add_argument("--checkpoint", required=True, help="image model checkpoint (.safetensors, SD1.x/SDXL single file)")
    p.add_argument("--frames", required=True,
                   help="a folder of frames (sorted by name), an animated WEBP/GIF, or a video file (needs PyAV)")
    p.add_argument("--out", required=True,
                   help="layers file to write (.safetensors); the optimizer state goes beside it as .optim.safetensors")
    p.add_argument("--comfyui", help="ComfyUI checkout to import (default: the one the pack is installed in, "
                   "else $COMFYUI_PATH, else ~/ComfyUI)")
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (a resumed run stops at this count)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--frames-per-clip", type=int, default=8, help="frames per training window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="caption of the clip (default: zero conditioning)")
    p.add_argument("--layers", choices=KIND_CHOICES, default=KIND_CHOICES[0], help="temporal layer types")
    p.add_argument("--width", type=int, help="resize frames to this width (with --height)")
    p.add_argument("--height", type=int, help="resize frames to this height (with --width)")
    p.add_argument("--max-frames", type=int, help="use at most this many frames")
    p.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--eval-draws", type=int, default=4,
                   help="fixed (noise, sigma) draws scored before and after training (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from --out and its optimizer state")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.set_defaults(func=cmd_train_temporal)


def _comfyui(path: str | None) -> Path:
    try:
        found = find_comfyui(path)
    except ComfyError as exc:
        raise TrainError(f"{exc}. Fix: pass --comfyui PATH of a checkout.") from None
    if found is None:
        raise TrainError("--comfyui: no ComfyUI found (the one the pack is installed in, COMFYUI_PATH, ~/ComfyUI). "
                         "Fix: pass --comfyui PATH of a checkout.")
    print(f"using ComfyUI at {found[0]} ({found[1]})", file=sys.stderr)
    return found[0]


def cmd_train_temporal(args: argparse.Namespace) -> int:
    try:
        if not Path(args.checkpoint).is_file():
            raise TrainError(f"--checkpoint: '{args.checkpoint}' does not exist.")
        if not args.out.endswith(".safetensors"):
            raise TrainError(f"--out: '{args.out}' must end in .safetensors (no pickle).")
        check_layers_path(args.out)
        if args.resume and not (Path(args.out).exists() and optim_path_for(args.out).exists()):
            raise TrainError(f"--resume: '{args.out}' or its .optim.safetensors is missing. Fix: drop --resume.")
        if (args.width is None) != (args.height is None):
            raise TrainError("--width and --height go together.")
        size = (args.width, args.height) if args.width else None
        frames = load_frames(args.frames, size=size, max_frames=args.max_frames, stride=args.stride)
        if frames.shape[0] < args.frames_per_clip:
            raise TrainError(f"--frames: {frames.shape[0]} frames, fewer than --frames-per-clip "
                             f"{args.frames_per_clip}. Fix: give more frames or lower --frames-per-clip.")
        config = TrainConfig(steps=args.steps, lr=args.lr, frames_per_clip=args.frames_per_clip, seed=args.seed,
                             save_every=args.save_every, eval_draws=args.eval_draws)
        config.check()
        root = _comfyui(args.comfyui)
    except (TrainError, FramesError) as exc:
        print(f"compartments train-temporal: {exc}", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="compartments-train-")
    try:
        return _train(args, root, base, frames, config)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _train(args: argparse.Namespace, root: Path, base: str, frames, config: TrainConfig) -> int:
    from ..nodes._inprocess import boot

    boot(root, base, cpu=True if args.cpu else None, core_nodes=False, any_base=True)
    from tqdm import tqdm

    from ..nodes import temporal_train as face

    bar = tqdm(total=args.steps, desc="train-temporal", unit="step", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    try:
        result = face.train_headless(args.checkpoint, frames, args.out, config, prompt=args.prompt,
                                     kinds=layer_kinds(args.layers), resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: the last completed step is saved in {args.out} (resume with --resume)", file=sys.stderr)
        return 130
    except (TrainError, FramesError, ValueError) as exc:
        bar.close()
        print(f"compartments train-temporal: {exc}", file=sys.stderr)
        return 2
    bar.close()
    from ..temporal.train import loss_report

    print(loss_report(result))
    return 0

"""``python -m compartments caption FOLDER`` and ``vlm-families``: M3ID captioning without a server.

    caption FOLDER --vlm MODEL_DIR [--output DIR] [--recursive] [--overwrite] [--prefix "ohwx, "]
            [--plain] [--lambda 0.02] [--alpha 0.3] [--max-tokens 64] [--chunk-size 4]
    vlm-families        every accepted model type, one per line: model_type<TAB>tested|untested

The command loads the model folder itself (``--device``, ``--dtype``; default: CUDA with bf16 or
fp16 when there is a GPU, else the CPU in float32) and shares the node's code (``vlm/folder.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..samplers.m3id import M3IDSettings
from ..vlm.folder import caption_folder, check_folders
from ..vlm.models import families, load_vlm

PROMPT = "Describe this image in detail."


def register(sub) -> None:
    p = sub.add_parser("caption", help="caption every image of a folder (M3ID), writing name.txt beside each",
                       description="Caption a dataset folder with M3ID (or plain decoding): name.txt per image, "
                                   "captions.jsonl with the PDM summary; resumable (captioned images are skipped).")
    p.add_argument("folder", help="folder of images")
    p.add_argument("--vlm", required=True, help="a transformers save_pretrained folder (safetensors)")
    p.add_argument("--output", help="write the .txt files here (mirroring subfolders) instead of beside the images")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a .txt again")
    p.add_argument("--prefix", default="", help="put this before every caption (a trigger word, e.g. 'ohwx, ')")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--plain", action="store_true", help="plain decoding (no contrast; PDM still measured)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.02, help="M3ID lambda (0: plain decoding)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--weight-cap", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=4, help="images per batch (halved when memory runs out)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.set_defaults(func=cmd_caption)
    p = sub.add_parser("vlm-families", help="print every model type M3ID accepts (tested or untested)")
    p.set_defaults(func=cmd_families)


def _device_dtype(device: str | None, dtype: str):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def cmd_caption(args: argparse.Namespace) -> int:
    settings = M3IDSettings(lam=0.0 if args.plain else args.lam, alpha=args.alpha, weight_cap=args.weight_cap,
                            max_new_tokens=args.max_tokens, greedy=not args.sample, seed=args.seed,
                            contrast=not args.plain)
    settings.validate()
    check_folders(Path(args.folder), Path(args.output) if args.output else None)  # before a multi-GB load
    device, dtype = _device_dtype(args.device, args.dtype)
    vlm = load_vlm(args.vlm, dtype=dtype, device=device)
    print(f"captioning with {vlm.family} ({args.vlm}) on {device} in {str(dtype).removeprefix('torch.')}",
          file=sys.stderr)

    def progress(done: int, n: int, tok: int, total: int) -> None:
        end = "\n" if done >= n else ""
        print(f"\rimages {done}/{n}  tokens {tok}/{total}", end=end, file=sys.stderr, flush=True)

    report = caption_folder(vlm, Path(args.folder), args.prompt, settings,
                            output=Path(args.output) if args.output else None, recursive=args.recursive,
                            overwrite=args.overwrite, prefix=args.prefix, chunk_size=args.chunk_size,
                            progress=progress, model_name=Path(args.vlm).name)
    d = report.to_dict()
    print(json.dumps({k: d[k] for k in ("n_captioned", "n_skipped", "n_failed", "failed", "jsonl", "seconds")},
                     indent=1))
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    for model_type, status in families():
        print(f"{model_type}\t{status}")
    return 0

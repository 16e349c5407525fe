"""``python -m compartments soup | soup-add | soup-remove | soup-info``: soups with no ComfyUI.

A server that stores the fine-tunes can build and audit soups directly; output files are
written atomically, so a failed or interrupted command never leaves a partial model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..soup.engine import OUT_DTYPES, Shard, SoupError, add_shard, build_soup, read_manifest, remove_shard


def _bar(label: str):
    """A plain progress line on stderr (tqdm would be fine too; this keeps logs clean)."""
    def update(done: int, total: int) -> None:
        if done == total or done % max(total // 20, 1) == 0:
            print(f"\r{label}: {done}/{total} tensors", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return update


def _member(text: str) -> Shard:
    path, sep, w = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
    try:
        return Shard(Path(path), float(w) if sep else 1.0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"'{text}': weight after ':' must be a number") from e


def _soup(args: argparse.Namespace) -> int:
    man = build_soup(args.members, args.out, base=args.base, components=args.components, dtype=args.dtype,
                     keep_sum=not args.no_sum, progress=None if args.quiet else _bar("soup"))
    print(man.describe())
    return 0


def _add(args: argparse.Namespace) -> int:
    man = add_shard(args.soup, args.shard, args.out, weight=args.weight, progress=None if args.quiet else _bar("add"))
    print(man.describe())
    return 0


def _remove(args: argparse.Namespace) -> int:
    man = remove_shard(args.soup, args.shard, args.out, progress=None if args.quiet else _bar("remove"))
    print(man.describe())
    return 0


def _info(args: argparse.Namespace) -> int:
    man = read_manifest(args.soup)
    print(man.to_json() if args.json else man.describe())
    return 0


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (SoupError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def register(sub) -> None:
    """Add the soup subcommands to the pack's argparse subparsers."""
    p = sub.add_parser("soup", help="stream-average checkpoints into a soup (Diffusion Soup)")
    p.add_argument("members", nargs="+", type=_member, help="member files; 'path:weight' for a weighted soup")
    p.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--base", type=Path, help="file for the un-souped tensors (default: first member)")
    p.add_argument("--components", choices=["unet", "all"], default="unet")
    p.add_argument("--dtype", choices=list(OUT_DTYPES), default="same")
    p.add_argument("--no-sum", action="store_true", help="do not store the running sum (smaller; add/remove approximate)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_guard(_soup))

    p = sub.add_parser("soup-add", help="add a shard to a soup (reads only the soup and the shard)")
    p.add_argument("soup", type=Path)
    p.add_argument("shard", type=Path)
    p.add_argument("-o", "--out", type=Path, help="write here instead of replacing the soup")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_guard(_add))

    p = sub.add_parser("soup-remove", help="remove (unlearn) a member shard, exactly when the manifest says so")
    p.add_argument("soup", type=Path)
    p.add_argument("shard", type=Path, help="the member's checkpoint file (identified by content hash)")
    p.add_argument("-o", "--out", type=Path, help="write here instead of replacing the soup")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_guard(_remove))

    p = sub.add_parser("soup-info", help="print a soup's manifest")
    p.add_argument("soup", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(_info))

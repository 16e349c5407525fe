"""``python -m compartments validate cpr [--quick]``: the exact-answer experiments behind the docs' figures."""

from __future__ import annotations

import argparse
import json


def _cpr(args: argparse.Namespace) -> int:
    import torch

    from ..validation.cpr_toy import validate

    torch.set_num_threads(1)
    for row in validate(args.quick):
        print(json.dumps({"benchmark": "cpr_validation", **row}), flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="run a validation experiment with exact answers (prints JSON lines)")
    which = p.add_subparsers(dest="experiment", required=True)
    q = which.add_parser("cpr", help="CPR-KL / CPR-Choose on 2-D Gaussian toys with closed-form laws")
    q.add_argument("--quick", action="store_true", help="4k samples instead of 20k")
    q.set_defaults(func=_cpr)

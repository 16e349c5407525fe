"""Bring ComfyUI up in-process for ``python -m compartments train-temporal`` (no server).

Kept apart from ``temporal_train`` because ComfyUI's device choice is made when
``comfy.model_management`` is first imported: ``--cpu`` must be set on ComfyUI's own
argument object before that, and importing the node module imports it.
"""

from __future__ import annotations

from types import ModuleType


def boot(cpu: bool = False) -> ModuleType:
    """Configure ComfyUI's args, register the pack's model folder, return ``nodes.temporal_train``."""
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    args.disable_auto_launch = True
    from . import temporal_train

    return temporal_train

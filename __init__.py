"""Compartments: a ComfyUI node pack.

ComfyUI imports this file from ``custom_nodes/`` and calls :func:`comfy_entrypoint`.
Nothing from ComfyUI is imported at module level, so ``import compartments`` (and every
room below it: ``soup``, ``samplers``, ``retrieval``, ``temporal``, ``tiny``) also works as
a plain library with no ComfyUI on the path.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Served by ComfyUI at /extensions/<pack folder>/: docs/<NodeId>.md is each node's page in the
# editor's node help panel (written by ``python -m compartments node-docs``). No JavaScript.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: return the extension that lists every Compartments node."""
    from .nodes import extension

    return extension()

"""The ComfyUI face of the pack: one module per capability, each exporting ``NODES``.

Every module in this package whose name does not start with ``_`` is imported and its
``NODES`` list collected. An import error is not swallowed: ComfyUI then logs it against
the pack, which is what a user needs to see.
"""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def all_nodes() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", []))
    ids = [n.GET_SCHEMA().node_id for n in found]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise RuntimeError(f"Compartments: duplicate node ids {sorted(dupes)}")
    bad = [i for i in ids if not i.startswith("Compartments")]
    if bad:
        raise RuntimeError(f"Compartments: node ids must start with 'Compartments': {bad}")
    return found


class CompartmentsExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()

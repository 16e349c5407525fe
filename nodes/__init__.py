"""The ComfyUI face of the pack: one module per capability, each exporting ``NODES``.

Every module in this package whose name does not start with ``_`` is imported and its
``NODES`` list collected. An import error is not swallowed: ComfyUI then logs it against
the pack, which is what a user needs to see.

Importing this package imports nothing from ComfyUI (the node modules are imported by
:func:`all_nodes`), so ``compartments.nodes._inprocess`` can configure ComfyUI's arguments
before the first ``comfy`` import fixes the device.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any

# Nodes built on a V3 feature that only newer releases have (their V3_FEATURES): node id -> the
# ``io`` name they need, for the tests and docs that must know without importing ComfyUI. Each is
# served only where the running ComfyUI has that name; an older-input node does the same
# operation everywhere (Soup Models (in graph) for the Autogrow one).
NEEDS_NEWER_V3 = {"CompartmentsSoupModelsAny": "Autogrow"}


def all_nodes() -> list[type]:
    """Every node class the running ComfyUI can serve, checked for unique, prefixed ids."""
    from comfy_api.latest import io

    found: list[type] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", []))
    # A node declares the newer V3 names it is built on (V3_FEATURES); it is served only where they exist.
    found = [n for n in found if all(hasattr(io, f) for f in getattr(n, "V3_FEATURES", ()))]
    ids = [n.GET_SCHEMA().node_id for n in found]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise RuntimeError(f"Compartments: duplicate node ids {sorted(dupes)}")
    bad = [i for i in ids if not i.startswith("Compartments")]
    if bad:
        raise RuntimeError(f"Compartments: node ids must start with 'Compartments': {bad}")
    return [_guarded(n) for n in found]


def _passes_through(exc: BaseException) -> bool:
    """The user's input errors, Cancel and out-of-memory go to ComfyUI as they are."""
    from comfy.model_management import InterruptProcessingException

    from ._host import InputError

    return isinstance(exc, (InputError, InterruptProcessingException, MemoryError)) or \
        type(exc).__name__ == "OutOfMemoryError"


def _guarded(cls: type) -> type:
    """Wrap ``cls.execute`` (once): a room's CompartmentsError becomes ComfyUI's error naming the node
    and the input; any other exception that is not Cancel or out-of-memory is reported as a bug."""
    if cls.__dict__.get("_compartments_guarded"):
        return cls
    from ..errors import CompartmentsError
    from ._host import internal_error, translated

    original = cls.__dict__["execute"].__func__
    node = cls.GET_SCHEMA().display_name

    def reraise(exc: Exception) -> None:
        if isinstance(exc, CompartmentsError):
            raise translated(node, exc) from exc
        if _passes_through(exc):
            raise exc
        raise internal_error(node, exc) from exc

    if inspect.iscoroutinefunction(original):
        async def execute(klass, *args, **kwargs):
            try:
                return await original(klass, *args, **kwargs)
            except Exception as exc:
                reraise(exc)
    else:
        def execute(klass, *args, **kwargs):
            try:
                return original(klass, *args, **kwargs)
            except Exception as exc:
                reraise(exc)

    cls.execute = classmethod(functools.wraps(original)(execute))
    cls._compartments_guarded = True
    return cls


def extension() -> Any:
    """The ``ComfyExtension`` that ComfyUI's V3 loader receives from ``comfy_entrypoint``."""
    from comfy_api.latest import ComfyExtension

    class CompartmentsExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return all_nodes()

    return CompartmentsExtension()

"""Small bridges between ComfyUI and the rooms, shared by every node module.

The rooms (soup/, samplers/, retrieval/, temporal/) take plain paths, tensors and a
``progress(done, total)`` callback; this module makes those from ComfyUI's objects so that
the node classes stay declarative.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths

from ..errors import CompartmentsError

SAFETENSORS = {".safetensors"}


class InputError(ValueError):
    """A user-facing error: names the node, the input and the fix (what ComfyUI shows)."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        msg = f"{node}: input '{input_name}': {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)


def register_model_folder(name: str, extensions: Iterable[str] = SAFETENSORS, is_dir: bool = False) -> None:
    """Register ``models/<name>`` with folder_paths (idempotent), keeping any user-added paths.

    Folder-type entries (a VLM directory, a retrieval store) use the ``folder`` extension
    marker the way core's ``diffusers`` entry does and are listed with :func:`list_dirs`.
    """
    default = os.path.join(folder_paths.models_dir, name)
    exts = {"folder"} if is_dir else set(extensions)
    if name in folder_paths.folder_names_and_paths:
        paths, old_exts = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | exts)
    else:
        folder_paths.folder_names_and_paths[name] = ([default], exts)
    os.makedirs(default, exist_ok=True)


def folder_dirs(name: str) -> list[str]:
    return folder_paths.get_folder_paths(name)


def list_dirs(name: str) -> list[str]:
    """Sub-directories of every path registered for ``name`` (for folder-type models)."""
    out: set[str] = set()
    for base in folder_dirs(name):
        if os.path.isdir(base):
            # hidden folders are the pack's work in progress (".NAME.PID.building"), never a choice
            out.update(d for d in os.listdir(base) if not d.startswith(".") and os.path.isdir(os.path.join(base, d)))
    return sorted(out)


def check_name(value: str, node: str, input_name: str) -> str:
    """Refuse a file or folder name no file system takes: NUL bytes, a part over 255 bytes."""
    if not isinstance(value, str) or "\0" in value:
        raise InputError(node, input_name, "the name contains a NUL byte.", "type a plain file name.")
    if any(len(part.encode()) > 255 for part in value.replace("\\", "/").split("/")):
        raise InputError(node, input_name, "a part of the name is longer than 255 bytes.", "use a shorter name.")
    return value


def resolve_dir(name: str, sub: str, node: str, input_name: str) -> str:
    """Absolute path of a folder-type model, refusing anything outside the registered folders."""
    check_name(sub, node, input_name)
    for base in folder_dirs(name):
        # Containment is checked on the normalised name, not the resolved one: a folder the
        # user symlinked into models/ is theirs to use, a '..' escaping it is not.
        root = os.path.abspath(base)
        cand = os.path.abspath(os.path.join(root, sub))
        if os.path.commonpath([cand, root]) == root and cand != root and os.path.isdir(cand):
            return cand
    raise InputError(node, input_name, f"'{sub}' is not a folder under models/{name}.",
                     f"put it in {folder_dirs(name)[0]} and refresh the page.")


def resolve_file(name: str, filename: str, node: str, input_name: str) -> str:
    """Absolute path of a model file; folder_paths already refuses paths that escape the folder."""
    check_name(filename, node, input_name)
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise InputError(node, input_name, f"'{filename}' is not in models/{name}.",
                         f"put the file in {folder_dirs(name)[0]} and refresh the page.")
    if not path.endswith(".safetensors"):
        raise InputError(node, input_name, f"'{filename}' is not a .safetensors file.",
                         "Compartments loads safetensors only (no pickle); convert the file first.")
    return path


def save_path(name: str, filename: str, node: str, input_name: str) -> str:
    """Target path for a new model file inside the first registered folder of ``name``."""
    check_name(filename, node, input_name)
    base = os.path.abspath(folder_dirs(name)[0])
    if not filename.endswith(".safetensors"):
        filename += ".safetensors"
    path = os.path.abspath(os.path.join(base, filename))
    if os.path.commonpath([path, base]) != base:
        raise InputError(node, input_name, f"'{filename}' points outside models/{name}.",
                         "use a plain name or a sub-folder path without '..'.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def progress(total: int, node_id: str | None = None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for the rooms: drives ComfyUI's bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id)

    def update(done: int, total_now: int | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total_now)

    return update


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def check_numbers(cls: Any, **values: Any) -> None:
    """Refuse NaN, infinity and out-of-range values of a node's FLOAT inputs before anything runs.

    ComfyUI's own min/max check lets NaN through (every comparison with NaN is false), and an
    API-format prompt may carry ``Infinity``; a NaN cfg or alpha gives a black image, a NaN
    weight a broken model. The bounds are the ones the schema declares.
    """
    # define_schema, not GET_SCHEMA: inside execute, ``cls`` is the executor's locked per-run clone,
    # on which GET_SCHEMA's caching of SCHEMA raises
    schema = cls.define_schema()
    floats = {i.id: i for i in schema.inputs if getattr(i, "get_io_type", lambda: "")() == "FLOAT"}
    for name, value in values.items():
        spec = floats.get(name)
        if spec is None or value is None:
            continue
        label = getattr(spec, "display_name", None) or name
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InputError(schema.display_name, label, f"{value!r} is not a number.") from None
        lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
        if not math.isfinite(v):
            raise InputError(schema.display_name, label, f"{value!r} is not a finite number.",
                             f"give a number{f' from {lo:g} to {hi:g}' if lo is not None and hi is not None else ''}.")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise InputError(schema.display_name, label, f"{v:g} is outside {lo:g}..{hi:g}.",
                             f"give a number from {lo:g} to {hi:g}.")


def translated(node: str, exc: CompartmentsError, default_input: str = "") -> InputError:
    """The one translation of a room's error into ComfyUI's: node, input, problem, fix."""
    return InputError(node, exc.field or default_input or "(see message)", exc.problem, exc.fix)


def internal_error(node: str, exc: BaseException) -> RuntimeError:
    """What a user sees for an exception that is neither their input nor the host's: a bug."""
    return RuntimeError(f"{node}: internal error in Compartments (a bug, not your input): {type(exc).__name__}: "
                        f"{str(exc)[:500]}. The full traceback is in ComfyUI's console and log (comfyui.log in its "
                        "user folder); please report it with that traceback.")

"""Small bridges between ComfyUI and the rooms, shared by every node module.

The rooms (soup/, samplers/, retrieval/, temporal/) take plain paths, tensors and a
``progress(done, total)`` callback; this module makes those from ComfyUI's objects so that
the node classes stay declarative.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths

from ..errors import CompartmentsError

SAFETENSORS = {".safetensors"}


class InputError(ValueError):
    """What ComfyUI shows for a user's mistake: ``<node>: input '<input>': <problem> Fix: <fix>``.

    Built in one place, :func:`translated`, from a :class:`CompartmentsError`; the node's name
    always comes from its schema (the execute guard in ``nodes/__init__.py``, or
    :func:`node_error` for checks that run later, inside core's sampler).
    """

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        msg = f"{node}: input '{input_name}': {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)


class BadInput(CompartmentsError):
    """A node's own check of one input (the rooms' errors are the same type, without the node)."""

    def __init__(self, input_name: str, problem: str, fix: str = ""):
        super().__init__(problem, fix, input_name)


@contextmanager
def blame(input_name: str, by_type: dict[type, str] | None = None) -> Iterator[None]:
    """Attribute a room error that names no input to ``input_name`` (the one the call was about),
    or to ``by_type[type(error)]`` (e.g. an embedder's error is about the weights)."""
    try:
        yield
    except CompartmentsError as exc:
        default = next((name for kind, name in (by_type or {}).items() if isinstance(exc, kind)), input_name)
        exc.field = exc.field or default
        raise


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


def check_name(value: str, input_name: str) -> str:
    """Refuse a file or folder name no file system takes: NUL bytes, a part over 255 bytes."""
    if not isinstance(value, str) or "\0" in value:
        raise BadInput(input_name, "the name contains a NUL byte.", "type a plain file name.")
    if any(len(part.encode()) > 255 for part in value.replace("\\", "/").split("/")):
        raise BadInput(input_name, "a part of the name is longer than 255 bytes.", "use a shorter name.")
    return value


def resolve_dir(name: str, sub: str, input_name: str) -> str:
    """Absolute path of a folder-type model, refusing anything outside the registered folders."""
    check_name(sub, input_name)
    for base in folder_dirs(name):
        # Containment is checked on the normalised name, not the resolved one: a folder the
        # user symlinked into models/ is theirs to use, a '..' escaping it is not.
        root = os.path.abspath(base)
        cand = os.path.abspath(os.path.join(root, sub))
        if os.path.commonpath([cand, root]) == root and cand != root and os.path.isdir(cand):
            return cand
    raise BadInput(input_name, f"'{sub}' is not a folder under models/{name}.",
                   f"put it in {folder_dirs(name)[0]} and refresh the page.")


def io_subfolder(kind: str, sub: str, input_name: str, must_exist: bool = True) -> str:
    """A folder under ComfyUI's ``input`` or ``output`` directory (``kind``), never outside it."""
    check_name(sub, input_name)
    # containment on the normalised name (as resolve_dir): a dataset the user symlinked into input/ is
    # theirs to use, a '..' or an absolute path leaving the folder is not
    base = os.path.abspath(folder_paths.get_input_directory() if kind == "input"
                           else folder_paths.get_output_directory())
    cand = os.path.abspath(os.path.join(base, sub.strip()))
    try:
        inside = os.path.commonpath([cand, base]) == base
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside or cand == base or (must_exist and not os.path.isdir(cand)):
        raise BadInput(input_name, f"'{sub}' is not a folder under ComfyUI's {kind} directory.",
                       f"give a folder inside {base}, e.g. 'datasets/my_lora'.")
    return cand


def resolve_file(name: str, filename: str, input_name: str) -> str:
    """Absolute path of a model file; folder_paths already refuses paths that escape the folder."""
    check_name(filename, input_name)
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise BadInput(input_name, f"'{filename}' is not in models/{name}.",
                       f"put the file in {folder_dirs(name)[0]} and refresh the page.")
    if not path.endswith(".safetensors"):
        raise BadInput(input_name, f"'{filename}' is not a .safetensors file.",
                       "Compartments loads safetensors only (no pickle); convert the file first.")
    return path


def save_path(name: str, filename: str, input_name: str) -> str:
    """Target path for a new model file inside the first registered folder of ``name``."""
    check_name(filename, input_name)
    base = os.path.abspath(folder_dirs(name)[0])
    if not filename.endswith(".safetensors"):
        filename += ".safetensors"
    path = os.path.abspath(os.path.join(base, filename))
    if os.path.commonpath([path, base]) != base:
        raise BadInput(input_name, f"'{filename}' points outside models/{name}.",
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
            raise BadInput(label, f"{value!r} is not a number.") from None
        lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
        if not math.isfinite(v):
            raise BadInput(label, f"{value!r} is not a finite number.",
                           f"give a number{f' from {lo:g} to {hi:g}' if lo is not None and hi is not None else ''}.")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise BadInput(label, f"{v:g} is outside {lo:g}..{hi:g}.",
                           f"give a number from {lo:g} to {hi:g}.")


#: text-conditioning widths of the common encoders, to name what a wrong conditioning came from
TEXT_WIDTHS = {768: "SD1.5 (CLIP-L)", 1024: "SD2.x (OpenCLIP-H)", 2048: "SDXL family (CLIP-L + bigG)",
               4096: "Flux / SD3 (T5-XXL)"}


def architecture(model: Any) -> str:
    """The model's family as ComfyUI detected it (``supported_models`` class name: SD15, SDXL, Flux...)."""
    return type(model.model.model_config).__name__


def context_width(model: Any) -> int | None:
    """Width of the text conditioning the diffusion model reads (UNets: context_dim; Flux: context_in_dim)."""
    unet = model.model.model_config.unet_config
    width = unet.get("context_dim") or unet.get("context_in_dim")
    return int(width) if width else None


def check_conditioning_width(model: Any, input_name: str, conditioning: list) -> None:
    """Refuse a conditioning encoded for another family before sampling (it would fail deep in the model)."""
    width = context_width(model)
    for t, _ in conditioning or []:
        got = int(t.shape[-1])
        if width and got != width:
            found = TEXT_WIDTHS.get(got, "another model family")
            raise BadInput(input_name, f"the conditioning is {got} wide, as {found} text encoders give, but this "
                           f"{architecture(model)} model reads {width}-wide text conditioning.",
                           "encode the prompt with the text encoder of this model's family (its checkpoint's "
                           "CLIP, or the matching DualCLIPLoader type).")


def translated(node: str, exc: CompartmentsError) -> InputError:
    """The one translation of a pack error into ComfyUI's: node, input, problem, fix."""
    return InputError(node, exc.field or "(see message)", exc.problem, exc.fix)


def node_name(cls: type) -> str:
    """A node's display name, from its schema (``define_schema``: ``cls`` may be the executor's locked clone)."""
    return cls.define_schema().display_name


def node_error(cls: type, exc: CompartmentsError) -> InputError:
    """:func:`translated` for a check that runs after ``execute`` returned (a wrapper inside core's sampler)."""
    return translated(node_name(cls), exc)


def internal_error(node: str, exc: BaseException) -> RuntimeError:
    """What a user sees for an exception that is neither their input nor the host's: a bug."""
    return RuntimeError(f"{node}: internal error in Compartments (a bug, not your input): {type(exc).__name__}: "
                        f"{str(exc)[:500]}. The full traceback is in ComfyUI's console and log (comfyui.log in its "
                        "user folder); please report it with that traceback.")

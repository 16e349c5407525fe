"""A real ComfyUI inside this process, and a way to run one node of it: the tier-2 harness.

One module for the tier-2 tests, the benchmarks and ``python -m compartments train-temporal``,
so that the way ComfyUI is brought up exists once. It uses only what every supported
release offers in the same form:

- ComfyUI's own argument object (``comfy.cli_args.args``), set *before* ``comfy`` picks its
  device, and ``--base-directory`` semantics, so every folder lives in one temp base;
- ``nodes.init_extra_nodes`` for the core extras, and the pack's public V3 entry point
  (``comfy_entrypoint`` -> ``ComfyExtension.get_node_list``) for its own nodes, the way
  ComfyUI's loader registers any V3 pack;
- a node runs through its public entry point: a V3 node's ``execute`` classmethod (with
  ``io.HiddenHolder`` values when a test asks for hidden inputs), a V1 node's ``FUNCTION``.

Nothing here imports ``comfy_api.internal`` or calls an executor method whose signature
moved between releases (``PREPARE_CLASS_CLONE`` takes a dict of hidden inputs in 0.3.x and
a ``V3Data`` in 0.8). Importing this module imports nothing from ComfyUI.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli.client import comfyui_version

BASE_FOLDERS = ("models", "input", "output", "temp", "user", "custom_nodes")


@dataclass
class InProcessComfy:
    """A ComfyUI imported in this process with its base directory (``--base-directory``)."""

    path: Path
    base_dir: Path
    version: str
    cpu: bool

    # ComfyUI's folders under the base directory
    models_dir = property(lambda self: self.base_dir / "models")
    input_dir = property(lambda self: self.base_dir / "input")
    output_dir = property(lambda self: self.base_dir / "output")
    temp_dir = property(lambda self: self.base_dir / "temp")

    def node(self, node_id: str) -> type:
        import nodes

        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            raise KeyError(f"no node '{node_id}' in ComfyUI {self.version} (core or Compartments)")
        return nodes.NODE_CLASS_MAPPINGS[node_id]

    def sample(self, model: Any, guider: Any, latent: dict, steps: int = 2, seed: int = 0, sampler: str = "euler",
               scheduler: str = "normal") -> Any:
        """Core SamplerCustomAdvanced with ``guider`` (RandomNoise, KSamplerSelect, BasicScheduler on
        ``model``): the path every GUIDER takes in a user's graph. Returns the sampled latent tensor."""
        (noise,) = self.run("RandomNoise", noise_seed=seed)
        (chosen,) = self.run("KSamplerSelect", sampler_name=sampler)
        (sigmas,) = self.run("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)
        out, _ = self.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=chosen, sigmas=sigmas,
                          latent_image=latent)
        return out["samples"]

    def run(self, node: str | type, hidden: dict[str, Any] | None = None, **inputs: Any) -> tuple:
        """Run one node with ``inputs`` and return its outputs as a tuple (UI-only nodes: ``()``)."""
        return tuple(self.run_full(node, hidden, **inputs)[0])

    def run_full(self, node: str | type, hidden: dict[str, Any] | None = None, **inputs: Any) -> tuple[tuple, Any]:
        """Run one node; return ``(outputs, ui)`` where ``ui`` is what it shows in the editor."""
        cls = self.node(node) if isinstance(node, str) else node
        from comfy_api.latest import io

        if isinstance(cls, type) and issubclass(cls, io.ComfyNode):
            # The executor runs a V3 node on a per-run clone of its class that carries the hidden
            # inputs and refuses attribute writes; a subclass made with a locking metaclass is that,
            # through public names only (a node that writes to ``cls`` fails here as in ComfyUI).
            holder = io.HiddenHolder.from_dict({io.Hidden(k.upper()): v for k, v in (hidden or {}).items()})
            cls.GET_SCHEMA()  # what the executor has done before (the schema is cached on the class)
            cls = _locked(cls)(f"{cls.__name__}Clone", (cls,), {"hidden": holder})
            out = _await(cls.execute(**inputs))
            if isinstance(out, io.NodeOutput):
                return tuple(out.result or ()), out.ui
            if isinstance(out, dict):
                return tuple(out.get("result", ())), out.get("ui")
            return tuple(out or ()), None
        obj = cls()
        kwargs = dict(inputs)
        for name, kind in (getattr(cls, "INPUT_TYPES", dict)().get("hidden") or {}).items():
            key = {"UNIQUE_ID": "unique_id", "PROMPT": "prompt", "EXTRA_PNGINFO": "extra_pnginfo"}.get(kind)
            if key and hidden and key in hidden:
                kwargs[name] = hidden[key]
        out = _await(getattr(obj, cls.FUNCTION)(**kwargs))
        if isinstance(out, dict):
            return tuple(out.get("result", ())), out.get("ui")
        return tuple(out or ()), None


def _locked(cls: type) -> type:
    """A metaclass deriving from ``cls``'s that refuses class attribute writes after creation."""

    class Locked(type(cls)):
        def __setattr__(self, name: str, value: Any) -> None:
            raise AttributeError(f"Cannot modify class attribute '{name}' on locked class '{self.__name__}'")

    return Locked


def _await(value: Any) -> Any:
    return asyncio.run(value) if inspect.iscoroutine(value) else value


_BOOTED: InProcessComfy | None = None


def boot(path: str | Path, base_dir: str | Path, *, cpu: bool | None = None, core_nodes: bool = True,
         any_base: bool = False) -> InProcessComfy:
    """Import the ComfyUI at ``path`` with every folder under ``base_dir``; register the pack's nodes.

    ``cpu=None`` runs on the CPU when torch sees no CUDA device. ComfyUI's modules are
    process-wide, so a second call returns the first ComfyUI and refuses a different one
    (with ``any_base``, a caller that names its files itself accepts the first base directory).
    """
    global _BOOTED
    path, base = Path(path).expanduser().resolve(), Path(base_dir).resolve()
    if _BOOTED is not None:
        if _BOOTED.path != path or (_BOOTED.base_dir != base and not any_base):
            raise RuntimeError(f"ComfyUI {_BOOTED.path} (base {_BOOTED.base_dir}) is already imported in this "
                               f"process; cannot also import {path} (base {base}): use a new process")
        return _BOOTED
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise FileNotFoundError(f"{path} is not a ComfyUI checkout (no main.py and comfy/): set COMFYUI_PATH to one")
    for sub in BASE_FOLDERS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    if "folder_paths" in sys.modules or "comfy.model_management" in sys.modules:
        raise RuntimeError("ComfyUI's folder_paths or model_management was imported before boot(): "
                           "call boot() first, it must set --cpu and --base-directory before they load")
    args.cpu = bool(cpu)
    args.base_directory = str(base)
    args.disable_auto_launch = True
    import folder_paths

    assert Path(folder_paths.models_dir).resolve() == base / "models", folder_paths.models_dir
    # As main.py does, import ComfyUI's utils package before nodes: nodes.py puts comfy/ first on
    # sys.path, after which 'utils' would resolve to comfy/utils.py and the image nodes would not import.
    import utils.install_util  # noqa: F401

    import nodes

    if core_nodes:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _register_pack(nodes)
    _BOOTED = InProcessComfy(path=path, base_dir=base, version=comfyui_version(path), cpu=bool(cpu))
    return _BOOTED


def _register_pack(nodes_module: Any) -> None:
    """Register the pack's nodes through its V3 entry point, as ComfyUI's custom-node loader does."""
    import compartments

    ext = asyncio.run(compartments.comfy_entrypoint())
    for cls in asyncio.run(ext.get_node_list()):
        schema = cls.GET_SCHEMA()
        nodes_module.NODE_CLASS_MAPPINGS[schema.node_id] = cls
        nodes_module.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name


def default_checkout() -> Path | None:
    """The ComfyUI a benchmark imports when none is named: :func:`client.find_comfyui` (the one the
    pack is installed in, ``COMFYUI_PATH``, ``~/ComfyUI``), else the newest release under
    ``../shared/comfyui`` beside the pack (used in place: the base directory takes every write)."""
    from ..cli.client import find_comfyui, version_tuple

    found = find_comfyui()
    if found is not None:
        return found[0]
    shared = Path(__file__).resolve().parents[2] / "shared" / "comfyui"
    releases = [p for p in shared.glob("*") if (p / "main.py").is_file()] if shared.is_dir() else []
    return max(releases, key=lambda p: version_tuple(comfyui_version(p)), default=None)

"""Shared test plumbing: tier markers by folder, and the real-ComfyUI fixtures of tiers 2-3.

Tier 1 (tests/unit) never imports ComfyUI. Tiers 2-3 find ComfyUI through ``COMFYUI_PATH``
(else ``~/ComfyUI``) and skip, with the reason in the summary, when there is none; they
never fake it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIERS = {"unit": "unit", "comfy": "comfy", "e2e": "e2e"}


def comfyui_path() -> Path | None:
    """COMFYUI_PATH, else ~/ComfyUI; None when neither holds a ComfyUI checkout."""
    cand = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    path = Path(cand)
    return path if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = TIERS.get(parts[0]) if len(parts) > 1 else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_report_header(config):
    path = comfyui_path()
    return f"compartments: ComfyUI for tiers 2-3: {path or 'NOT FOUND (tiers 2-3 will be skipped)'}"


def _require_comfyui() -> Path:
    path = comfyui_path()
    if path is None:
        pytest.skip("no ComfyUI found: set COMFYUI_PATH (or put a checkout at ~/ComfyUI) to run tiers 2-3")
    return path


def _own_files(base: Path) -> set[Path]:
    """Regular files under ``base``, not following links (the cached tiny models are links)."""
    found = set()
    for root, _dirs, files in os.walk(base):
        found.update(p for p in (Path(root, f) for f in files) if not p.is_symlink())
    return found


@pytest.fixture(autouse=True)
def _base_left_as_found(request):
    """Delete what a test wrote into the shared ComfyUI bases, so a full run needs half the disk.

    Tier 2 calls nodes directly (no cache): everything a test wrote goes. The tier-3 server
    caches node outputs across prompts, as ComfyUI does for users, so there only its temp
    folder is swept (ComfyUI itself treats it as disposable); the soup nodes then re-run
    instead of handing out a vanished scratch soup.
    """
    sweep = []
    if "comfy" in request.fixturenames:
        sweep.append(request.getfixturevalue("comfy").base_dir)
    if "comfy_server" in request.fixturenames and not os.environ.get("COMPARTMENTS_KEEP_E2E"):
        sweep.append(request.getfixturevalue("comfy_server").base_dir / "temp")
    before = {d: _own_files(d) for d in sweep}
    yield
    for d in sweep:
        for path in _own_files(d) - before[d]:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- tier 2: in-process ComfyUI
class InProcessComfy(SimpleNamespace):
    """A real ComfyUI imported in this process (``--cpu``, temp base directory)."""

    def node(self, node_id: str):
        import nodes

        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            raise KeyError(f"no node '{node_id}' in ComfyUI (core or Compartments)")
        return nodes.NODE_CLASS_MAPPINGS[node_id]

    def run(self, node, hidden: dict | None = None, **inputs) -> tuple:
        """Execute one node the way ComfyUI's executor does (V3 class clone or V1 instance)."""
        from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

        cls = self.node(node) if isinstance(node, str) else node
        if issubclass(cls, _ComfyNodeInternal):
            cls.VALIDATE_CLASS()
            clone = cls.PREPARE_CLASS_CLONE(hidden or {})
            is_async = inspect.iscoroutinefunction(cls.execute)
            func = make_locked_method_func(cls, "EXECUTE_NORMALIZED_ASYNC" if is_async else "EXECUTE_NORMALIZED", clone)
            out = func(**inputs)
            if inspect.iscoroutine(out):
                out = asyncio.run(out)
            return tuple(out.result or ())
        obj = cls()
        out = getattr(obj, cls.FUNCTION)(**inputs)
        if inspect.iscoroutine(out):
            out = asyncio.run(out)
        if isinstance(out, dict):
            out = out.get("result", ())
        return tuple(out)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> InProcessComfy:
    path = _require_comfyui()
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    args.disable_auto_launch = True
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    if Path(folder_paths.models_dir).resolve() != (base / "models").resolve():
        # folder_paths was imported before this fixture ran: re-point every model folder.
        old = folder_paths.models_dir
        for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
            new = [p.replace(old, str(base / "models")) for p in paths]
            folder_paths.folder_names_and_paths[name] = (new, exts)
        folder_paths.models_dir = str(base / "models")
    # As main.py does, import ComfyUI's utils package before nodes: nodes.py puts comfy/ first on
    # sys.path, after which 'utils' would resolve to comfy/utils.py and nodes_images would not import.
    import utils.install_util  # noqa: F401

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from compartments.nodes import all_nodes

    for cls in all_nodes():
        schema = cls.GET_SCHEMA()
        nodes.NODE_CLASS_MAPPINGS[schema.node_id] = cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
    return InProcessComfy(
        path=path,
        base_dir=base,
        models_dir=base / "models",
        input_dir=base / "input",
        output_dir=base / "output",
    )


@pytest.fixture(scope="session")
def sd15(comfy):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by core CheckpointLoaderSimple."""
    from compartments.tiny import sd15 as tiny_sd15

    tiny_sd15.prepare(comfy.models_dir, comfy.input_dir)
    model, clip, vae = comfy.run("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    return model, clip, vae


# ---------------------------------------------------------------- tier 3: a real server
@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    path = _require_comfyui()
    from compartments.client import ComfyServer
    from compartments.tiny import prepare_all

    base = tmp_path_factory.mktemp("comfy_server")
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir()
    prepare_all(base / "models", base / "input")
    os.symlink(ROOT, base / "custom_nodes" / "compartments", target_is_directory=True)
    log = base / "server.log"
    server = ComfyServer.start(path, base, log_file=log, python=sys.executable)
    try:
        yield SimpleNamespace(
            url=server.url, client=server.client, base_dir=base, output_dir=base / "output",
            log=log, run=lambda wf, **kw: server.client.run(wf, **kw),
        )
    finally:
        server.stop()
        if os.environ.get("COMPARTMENTS_KEEP_E2E"):
            kept = Path(tempfile.gettempdir()) / "compartments-e2e-last"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(base / "output", kept)

"""Shared test plumbing: tier markers by folder, and the real-ComfyUI fixtures of tiers 2-3.

Tier 1 (tests/unit) never imports ComfyUI. Tiers 2-3 run against the ComfyUI checkout that
``COMFYUI_PATH`` names; ``scripts/test.py`` (the README's test command) sets it once per
release under ``../shared/comfyui`` in that release's own virtualenv. Without it they skip,
with the reason in the summary; they never fake ComfyUI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIERS = {"unit": "unit", "comfy": "comfy", "e2e": "e2e", "browser": "browser"}


def comfyui_path() -> Path | None:
    """The checkout COMFYUI_PATH names; None when it is unset or not a ComfyUI checkout."""
    cand = os.environ.get("COMFYUI_PATH")
    if not cand:
        return None
    path = Path(cand).expanduser()
    return path if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = TIERS.get(parts[0]) if len(parts) > 1 else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_report_header(config):
    path = comfyui_path()
    if path is None:
        return "compartments: ComfyUI for tiers 2-3: none (COMFYUI_PATH unset): tiers 2-3 will be skipped"
    from compartments.cli.client import comfyui_version

    return f"compartments: ComfyUI {comfyui_version(path)} for tiers 2-3 at {path}"


def _require_comfyui() -> Path:
    path = comfyui_path()
    if path is None:
        pytest.skip("no ComfyUI found: run scripts/test.py (every release in ../shared/comfyui) "
                    "or set COMFYUI_PATH to a checkout to run tiers 2-3")
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


# ---------------------------------------------------------------- PostgreSQL for the store tests
@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real PostgreSQL 16 + pgvector server (``pgserver``, a pip package) in this run's temp folder,
    stopped and deleted at the end. Skipped, with the reason, only if it cannot start here."""
    try:
        import pgserver
    except ImportError as exc:
        pytest.skip(f"PostgreSQL store tests need the pgserver package (pip install pgserver): {exc}")
    data = tmp_path_factory.mktemp("pg")
    try:
        server = pgserver.get_server(str(data), cleanup_mode="stop")
    except Exception as exc:  # noqa: BLE001 - any start failure is a reason to skip, printed
        pytest.skip(f"PostgreSQL (pgserver) could not start in {data}: {type(exc).__name__}: {exc}")
    yield SimpleNamespace(url=server.get_uri(), data=data, server=server)
    server.cleanup()
    shutil.rmtree(data, ignore_errors=True)


# ---------------------------------------------------------------- tier 2: in-process ComfyUI
@pytest.fixture(scope="session", autouse=True)
def _member_id_cache(tmp_path_factory):
    """The soup's member-id cache (soup/idcache.py) lives in this run's temp folder, not ~/.cache,
    so a run never reads ids an earlier run stored; servers started by the tests inherit it."""
    before = os.environ.get("COMPARTMENTS_ID_CACHE")
    os.environ["COMPARTMENTS_ID_CACHE"] = str(tmp_path_factory.mktemp("ids") / "member-ids.json")
    yield
    if before is None:
        os.environ.pop("COMPARTMENTS_ID_CACHE", None)
    else:
        os.environ["COMPARTMENTS_ID_CACHE"] = before


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The ComfyUI of this run imported in-process (``--cpu``, temp base directory), through the
    pack's one harness (``compartments.nodes._inprocess``), which benchmarks and the CLI share."""
    path = _require_comfyui()
    from compartments.nodes._inprocess import boot

    return boot(path, tmp_path_factory.mktemp("comfy_base"), cpu=True)


@pytest.fixture(scope="session")
def sd15(comfy):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by core CheckpointLoaderSimple."""
    from compartments.tiny import sd15 as tiny_sd15

    tiny_sd15.prepare(comfy.models_dir, comfy.input_dir)
    model, clip, vae = comfy.run("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    return model, clip, vae


# ---------------------------------------------------------------- tier 3: a real server
@contextlib.contextmanager
def running_server(base: Path):
    """A real ComfyUI server (``--cpu``, ``base`` as its base folder, the tiny models, the pack linked
    into its custom_nodes as ``compartments``), stopped on exit."""
    path = _require_comfyui()
    from compartments.cli.client import ComfyServer
    from compartments.tiny import prepare_all

    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(exist_ok=True)
    prepare_all(base / "models", base / "input")
    os.symlink(ROOT, base / "custom_nodes" / "compartments", target_is_directory=True)
    log = base / "server.log"
    server = ComfyServer.start(path, base, log_file=log, python=sys.executable)
    try:
        yield SimpleNamespace(
            url=server.url, client=server.client, base_dir=base, output_dir=base / "output", pack=ROOT,
            log=log, run=lambda wf, **kw: server.client.run(wf, **kw),
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_server")
    with running_server(base) as server:
        yield server
    if os.environ.get("COMPARTMENTS_KEEP_E2E"):
        kept = Path(tempfile.gettempdir()) / "compartments-e2e-last"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(base / "output", kept)


@pytest.fixture(scope="session")
def start_server():
    """:func:`running_server`, for a tier that needs a server of its own (the browser tier)."""
    return running_server


@pytest.fixture(scope="session")
def comfyui_release() -> str:
    path = _require_comfyui()
    from compartments.cli.client import comfyui_version

    return comfyui_version(path)


#: Shipped workflows that load model files no test can build here: workflow -> (the loaders of those
#: files, why). Tiers 3 and 3b post them all the same: ComfyUI's validation must fail on exactly those
#: loaders' file names and on nothing else (every other node, input, link and type is right).
UNBUILDABLE_WORKFLOWS = {
    "cpr_flux_redux_kl": ({"DualCLIPLoader", "VAELoader"},
                          "Flux's text encoders (T5-XXL is 4.7 B parameters at the size ComfyUI's config fixes) "
                          "and VAE; the Redux path itself runs at tier 2 (tests/comfy/test_cpr_flux.py)"),
}
#: Shipped workflows the editor tier runs to the end, one per capability (the editor draws their
#: results). Every other one tier 3 (tests/e2e/test_workflows.py) runs to the end already: the editor
#: tier proves the prompt it queues is exactly the API file's, then cancels it mid-run (which must leave
#: nothing behind), instead of running it a second time.
FINISHED_IN_EDITOR = {"soup_three_shards", "cpr_retrieve_kl", "retrieval_build_retrieve", "m3id_caption_batch",
                      "m3id_caption_folder",
                      "temporal_own_layers_video"}


@pytest.fixture(scope="session")
def unbuildable_workflows() -> dict:
    return UNBUILDABLE_WORKFLOWS


@pytest.fixture(scope="session")
def finished_in_editor() -> set:
    return FINISHED_IN_EDITOR


def assert_fails_only_on(node_errors: dict, loaders: set) -> None:
    """ComfyUI's validation errors name exactly ``loaders``, each for a file it does not have."""
    assert {e["class_type"] for e in node_errors.values()} == loaders, node_errors
    assert all(err["type"] == "value_not_in_list" for e in node_errors.values() for err in e["errors"]), node_errors


@pytest.fixture(scope="session")
def fails_only_on():
    return assert_fails_only_on

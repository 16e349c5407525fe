"""The layout rule of design.md: only __init__.py and nodes/ touch ComfyUI."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "node_helpers",
                "latent_preview", "server", "execution", "comfy_config"}
ROOMS = ("soup", "samplers", "retrieval", "temporal", "tiny")
PLAIN_MODULES = ("atomic", "client", "cli", "workflow_ui", "safetensors_header", "errors")


def _room_files() -> list[Path]:
    files = [ROOT / f"{m}.py" for m in PLAIN_MODULES]
    for room in ROOMS:
        files += sorted((ROOT / room).rglob("*.py"))
    return files


def test_rooms_do_not_import_the_host():
    offenders = []
    for path in _room_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert not offenders, "rooms must not import ComfyUI:\n" + "\n".join(offenders)


def test_every_room_module_imports_without_comfyui():
    """Import every room module in a fresh interpreter where ComfyUI cannot be found."""
    modules = ["compartments"]
    for path in _room_files():
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name in ("__main__",):
            continue
        parts = [p for p in rel.parts if p != "__init__"]
        modules.append(".".join(["compartments", *parts]))
    code = (
        "import sys\n"
        "sys.path = [p for p in sys.path if 'ComfyUI' not in p]\n"
        "import importlib\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {sorted(HOST_MODULES)!r})\n"
        "assert not bad, bad\n"
        "print(len(mods))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip()) == len(modules)


def test_layout_and_metadata():
    for item in ("__init__.py", "nodes", "samplers", "soup", "retrieval", "temporal", "workflows", "workflows/api",
                 "tests", "benchmarks", "scripts/setup.sh", "pyproject.toml", "requirements.txt", "README.md", ".ci/run", "node_list.json"):
        assert (ROOT / item).exists(), item
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "compartments"
    major, minor, patch = project["version"].split(".")
    assert all(x.isdigit() for x in (major, minor, patch))
    deps = " ".join(project["dependencies"]).lower()
    assert "torch" not in deps.replace("open_clip_torch", ""), "torch must never be a dependency of the pack"
    for dep in ("diffusers", "safetensors", "einops", "numpy", "open_clip_torch", "transformers"):
        assert dep in deps
    assert all("==" not in d for d in project["dependencies"]), "dependency ranges stay loose"
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key]
    assert "test" in project["optional-dependencies"]


def test_package_imports_as_compartments():
    mod = importlib.import_module("compartments")
    assert Path(mod.__file__).resolve().parent == ROOT
    assert callable(mod.comfy_entrypoint)

"""The layout rule of docs/design.md: only __init__.py and nodes/ touch ComfyUI, and no room imports nodes/."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "node_helpers",
                "latent_preview", "server", "execution", "comfy_config", "utils", "app", "middleware", "protocol"}
# Each capability's pure code, the validation experiments and the tiny-model fixtures.
ROOMS = ("soup", "samplers", "retrieval", "temporal", "vlm", "validation", "tiny")
# The tooling package (command line, HTTP client, workflow format): plain Python too; it may
# reach the in-process harness in nodes/ (train-temporal runs ComfyUI's UNet), rooms may not.
TOOLING = ("cli",)
PLAIN_MODULES = ("atomic", "safetensors_header", "errors")
NODES_MAP = {"soup": "soup", "retrieval": "retrieval", "cpr": "samplers", "m3id": "vlm", "temporal": "temporal",
             "temporal_train": "temporal"}


def _room_files(groups: tuple[str, ...] = ROOMS + TOOLING) -> list[Path]:
    files = [ROOT / f"{m}.py" for m in PLAIN_MODULES]
    for room in groups:
        files += sorted((ROOT / room).rglob("*.py"))
    return files


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (function bodies too), relative ones resolved."""
    return _imports_of(ast.parse(path.read_text(), filename=str(path)), path)


def _imports_of(tree: ast.AST, path: Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["compartments", *rel.parts[:-1]]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(node.module or "")
                continue
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found += [target] if node.module else [f"{target}.{a.name}" for a in node.names]
    return found


def test_no_room_imports_nodes_or_the_tooling():
    offenders = []
    for path in _room_files(ROOMS):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "compartments" and len(parts) > 1 and parts[1] in ("nodes", *TOOLING):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, "rooms must not import nodes/ or cli/:\n" + "\n".join(offenders)


def test_tooling_reaches_nodes_only_after_booting_comfyui():
    """cli/ imports nodes/ only inside the functions that boot ComfyUI first, never at module level."""
    offenders = []
    for path in _room_files(TOOLING):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        module = ast.Module(body=top, type_ignores=[])
        tmp = {"compartments.nodes" in n or n.startswith("compartments.nodes") for n in _imports_of(module, path)}
        if True in tmp:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, "cli/ must not import nodes/ at module level:\n" + "\n".join(offenders)


def test_each_node_module_maps_onto_one_room():
    """nodes/<capability>.py imports its own room (plus the shared ones: retrieval's store, samplers' rules)."""
    shared = {"errors", "atomic", "safetensors_header", "nodes", "cli", "tiny"}
    for module, room in NODES_MAP.items():
        path = ROOT / "nodes" / f"{module}.py"
        rooms = {n.split(".")[1] for n in _imports(path) if n.startswith("compartments.") and n.count(".") >= 1}
        assert room in rooms, (module, rooms)
        assert not rooms - shared - {room, "retrieval", "samplers"}, (module, rooms)
    listed = {p.stem for p in (ROOT / "nodes").glob("*.py") if not p.stem.startswith("_")}
    assert listed == set(NODES_MAP), listed


def test_rooms_do_not_import_the_host():
    offenders = []
    for path in _room_files():
        names = [n for n in _imports(path) if not n.startswith("compartments")]
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
    for item in ("__init__.py", "nodes", "samplers", "soup", "retrieval", "temporal", "vlm", "validation", "cli",
                 "workflows", "workflows/api", "docs/design.md",
                 "tests", "benchmarks", "scripts/setup.sh", "pyproject.toml", "requirements.txt", "README.md", ".ci/run", "node_list.json"):
        assert (ROOT / item).exists(), item
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "compartments"
    major, minor, patch = project["version"].split(".")
    assert all(x.isdigit() for x in (major, minor, patch))
    deps = " ".join(project["dependencies"]).lower()
    assert "torch" not in deps.replace("open_clip_torch", ""), "torch must never be a dependency of the pack"
    for dep in ("safetensors", "numpy", "open_clip_torch", "transformers", "faiss-cpu", "pillow"):
        assert dep in deps
    assert "diffusers" not in deps and "einops" not in deps, "test-only packages belong in the test extra"
    assert any(d.startswith("diffusers") for d in project["optional-dependencies"]["test"])
    assert all("==" not in d for d in project["dependencies"]), "dependency ranges stay loose"
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key]
    assert "test" in project["optional-dependencies"]


def test_package_imports_as_compartments():
    mod = importlib.import_module("compartments")
    assert Path(mod.__file__).resolve().parent == ROOT
    assert callable(mod.comfy_entrypoint)


# Import name -> distribution, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "faiss": "faiss-cpu", "open_clip": "open_clip_torch", "websocket": "websocket-client"}
# Provided by the host (torch and its siblings come with ComfyUI), or optional and imported
# behind a guard (a faster attention kernel, video decoding, the Windows/POSIX lock call).
NOT_DEPENDENCIES = {"torch", "torchvision", "torchaudio", "xformers", "av", "tokenizers", "msvcrt", "fcntl"}
# Declared, but imported by a dependency rather than by the pack: transformers' SmolVLM processor
# imports num2words whenever a SmolVLM folder is loaded, and transformers does not require it.
INDIRECT = {"num2words"}
# Imported only where an optional feature is used, and declared as an extra: the PostgreSQL store.
OPTIONAL = {"psycopg"}


def test_runtime_dependencies_are_what_the_pack_imports():
    """pyproject's dependencies are exactly the third-party packages the product code imports."""
    product = [p for p in _room_files(ROOMS + TOOLING) if p.parts[len(ROOT.parts)] not in ("validation",)]
    product += sorted((ROOT / "nodes").rglob("*.py")) + [ROOT / "__init__.py"]
    imported = set()
    for path in product:
        for name in _imports(path):
            top = name.split(".")[0]
            if top and top != "compartments" and top not in sys.stdlib_module_names and top not in HOST_MODULES:
                imported.add(DISTRIBUTIONS.get(top, top).lower())
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in meta["project"]["dependencies"]}
    assert imported - NOT_DEPENDENCIES - OPTIONAL == declared - INDIRECT, (sorted(imported - NOT_DEPENDENCIES),
                                                                          sorted(declared))
    extras = {d.split("[")[0].split(">")[0].strip().lower() for d in meta["project"]["optional-dependencies"]["postgres"]}
    assert OPTIONAL <= extras
    reqs = {line.split(">")[0].strip().lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert reqs == declared


def test_only_the_translation_names_nodes_in_errors():
    """nodes/ builds ComfyUI's InputError in one place (_host.translated, from the node's schema);
    node modules raise the pack's one error type (BadInput or a room's CompartmentsError) without
    a hand-written node name."""
    builders = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "InputError":
                    builders.append(f"{path.name}:{node.lineno}")
    assert builders == [next(b for b in builders if b.startswith("_host.py"))], builders


def test_no_node_module_spells_a_node_name_outside_its_schema():
    """A node's id and display name are written once, in define_schema; messages take them from there."""
    names, literals = set(), []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        in_schema = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Schema":
                for kw in node.keywords:
                    if kw.arg in ("node_id", "display_name") and isinstance(kw.value, ast.Constant):
                        names.add(kw.value.value)
                        in_schema.add(id(kw.value))
        literals += [(path.name, n.lineno, n.value) for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in in_schema]
    assert len(names) > 20
    # nodes/__init__.py's NEEDS_NEWER_V3 is a registry keyed by node id (read without ComfyUI), not a message
    offenders = [f"{f}:{line}: {v!r}" for f, line, v in literals if v in names and f != "__init__.py"]
    assert not offenders, offenders

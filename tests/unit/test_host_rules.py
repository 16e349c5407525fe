"""Forward-compatibility rules of docs/design.md, checked over the source of the pack, its tests,
benchmarks and scripts (the runtime half of each rule is proved in tests/comfy/test_host.py):

- only ``comfy_api.latest`` public names are imported (never ``comfy_api.internal``, a private
  ``_io`` module, or the removed ``comfy_io`` alias);
- nothing subclasses ``ModelPatcher``;
- every method a core class calls back on the pack's subclasses, and every wrapper or patch
  handed to a ModelPatcher hook, accepts extra keyword arguments (releases add them, e.g.
  ``latent_shapes`` on ``outer_sample``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

from compartments.cli.client import MIN_COMFYUI, comfyui_version, find_comfyui, is_supported, version_tuple

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("", "nodes", "soup", "samplers", "retrieval", "temporal", "tiny", "tests",
                             "benchmarks", "scripts")
                 for p in (ROOT / d).glob("*.py" if d == "" else "**/*.py"))
# Methods core calls on a subclass of one of its classes (CFGGuider, Sampler, context handlers).
CORE_CALLBACKS = {"predict_noise", "sample", "outer_sample", "inner_sample", "set_step", "execute", "__call__"}
HOOKS = {"add_wrapper", "add_wrapper_with_key", "add_callback", "add_callback_with_key",
         "set_model_unet_function_wrapper", "set_model_forward_timestep_embed_patch", "set_model_sampler_cfg_function",
         "set_model_sampler_post_cfg_function", "set_model_sampler_pre_cfg_function"}


def _trees():
    for path in SOURCES:
        yield path, ast.parse(path.read_text(), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"nodes/cpr.py", "nodes/_inprocess.py", "tests/conftest.py", "benchmarks/temporal.py",
            "scripts/hosts.py"} <= names


def test_only_public_comfy_api_latest_is_imported():
    bad = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
                if node.module.startswith("comfy_api"):
                    bad += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") or a.name == "comfy_io"]
            for m in mods:
                if m.startswith("comfy_api") and m != "comfy_api.latest":
                    bad.append(f"{path.relative_to(ROOT)}: import {m}")
            if isinstance(node, ast.Attribute) and node.attr == "comfy_io":
                bad.append(f"{path.relative_to(ROOT)}: .comfy_io")
    assert not bad, "only comfy_api.latest public names:\n" + "\n".join(bad)


def test_nothing_subclasses_model_patcher():
    bad = [f"{p.relative_to(ROOT)}: class {n.name}" for p, t in _trees() for n in ast.walk(t)
           if isinstance(n, ast.ClassDef) and any(_dotted(b).endswith("ModelPatcher") for b in n.bases)]
    assert not bad, bad


def _takes_kwargs(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> bool:
    return fn.args.kwarg is not None


def test_core_callbacks_and_hooks_accept_extra_keywords():
    checked, bad = [], []
    paths = sorted((ROOT / "nodes").glob("*.py")) + sorted((ROOT / "temporal").glob("*.py"))
    trees = {p: ast.parse(p.read_text()) for p in paths}
    # Hooks get functions defined in the node module or imported from its room: look in both.
    functions = {n.name: n for t in trees.values() for n in ast.walk(t)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for path, tree in trees.items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if not any(_dotted(b).startswith("comfy.") for b in cls.bases):
                continue
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in CORE_CALLBACKS:
                    checked.append(f"{cls.name}.{fn.name}")
                    if not _takes_kwargs(fn):
                        bad.append(f"{path.name}: {cls.name}.{fn.name}")
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if not (isinstance(call.func, ast.Attribute) and call.func.attr in HOOKS):
                continue
            for arg in ast.walk(ast.Tuple(elts=list(call.args), ctx=ast.Load())):
                if isinstance(arg, ast.Name) and arg.id in functions:
                    checked.append(f"{call.func.attr}({arg.id})")
                    if not _takes_kwargs(functions[arg.id]):
                        bad.append(f"{path.name}: {arg.id} given to {call.func.attr}")
    # The context handler is core's own object with set_step wrapped on the instance (no subclass).
    checked.append("set_step")
    if not _takes_kwargs(functions["set_step"]):
        bad.append("nodes/temporal.py: set_step")
    assert {"CPRGuider.predict_noise", "CPRGuider.sample", "_TrainSampler.sample", "add_wrapper_with_key(check_batch)",
            "set_model_forward_timestep_embed_patch(timestep_embed_handler)", "set_step"} <= set(checked), checked
    assert not bad, "must accept **kwargs and pass them on:\n" + "\n".join(bad)


def test_oldest_supported_release_is_stated_once():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["tool"]["comfy"]["requires-comfyui"] == f">={MIN_COMFYUI}"
    assert is_supported(MIN_COMFYUI) and is_supported("0.8.0") and is_supported("1.0")
    assert not is_supported("0.3.63") and not is_supported("unknown")
    assert version_tuple("0.3.64") < version_tuple("0.8.0") < version_tuple("0.10.1")


def test_readme_has_a_tested_with_table():
    text = (ROOT / "README.md").read_text()
    assert "## Tested with" in text
    table = text.split("## Tested with", 1)[1].split("\n## ", 1)[0]
    for release in ("0.3.64", "0.8.0"):
        assert f"| {release} |" in table, release


def _checkout(root: Path, version: str = "0.8.0") -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return root


def test_find_comfyui_order(tmp_path, monkeypatch):
    """--comfyui, then the ComfyUI the pack is installed in, then COMFYUI_PATH, then ~/ComfyUI."""
    import compartments.cli.client as client

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_comfyui() is None
    home = _checkout(tmp_path / "home" / "ComfyUI", "0.3.64")
    assert find_comfyui() == (home.resolve(), "~/ComfyUI")
    env = _checkout(tmp_path / "env")
    monkeypatch.setenv("COMFYUI_PATH", str(env))
    assert find_comfyui() == (env.resolve(), "COMFYUI_PATH")
    installed = _checkout(tmp_path / "installed")
    (installed / "custom_nodes" / "compartments").mkdir(parents=True)
    monkeypatch.setattr(client, "PACK", installed / "custom_nodes" / "compartments")
    assert find_comfyui() == (installed.resolve(), "the ComfyUI this pack is installed in")
    explicit = _checkout(tmp_path / "explicit")
    assert find_comfyui(str(explicit)) == (explicit.resolve(), "--comfyui")
    assert comfyui_version(explicit) == "0.8.0" and comfyui_version(tmp_path) == "unknown"


def test_find_comfyui_names_a_bad_path(tmp_path, monkeypatch):
    import pytest

    from compartments.cli.client import ComfyError

    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nope"))
    with pytest.raises(ComfyError, match=r"COMFYUI_PATH=.*nope is not a ComfyUI checkout"):
        find_comfyui()
    with pytest.raises(ComfyError, match=r"--comfyui .*elsewhere is not a ComfyUI checkout"):
        find_comfyui(str(tmp_path / "elsewhere"))


def test_harness_imports_before_comfyui():
    """The in-process harness must load without ComfyUI: it sets --cpu and the base directory
    before the first ``comfy`` import fixes the device."""
    import subprocess
    import sys

    code = ("import sys; import compartments.nodes, compartments.nodes._inprocess; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]


def test_ui_format_lays_out_autogrow_slots_as_the_editor_does():
    """An Autogrow input becomes slots ``<id>.<prefix><i>``: the first ``min``, every connected one,
    and one empty slot after the last (what frontend 1.35 shows and saves)."""
    from compartments.cli.workflow_ui import api_to_ui, ui_to_api_links

    grow = ["COMFY_AUTOGROW_V3", {"template": {"input": {"required": {"model": ["MODEL", {}]}}, "prefix": "model",
                                                "min": 2, "max": 16}}]
    info = {"Loader": {"input": {"required": {}}, "output": ["MODEL"], "output_name": ["MODEL"]},
            "Soup": {"input": {"required": {"models": grow, "weights": ["STRING", {"default": ""}]}},
                     "input_order": {"required": ["models", "weights"]}, "output": ["MODEL"]}}
    api = {"1": {"class_type": "Loader", "inputs": {}}, "2": {"class_type": "Loader", "inputs": {}},
           "3": {"class_type": "Soup", "inputs": {"models.model0": ["1", 0], "models.model2": ["2", 0],
                                                  "weights": "1, 3"}}}
    ui = api_to_ui(api, info)
    soup = next(n for n in ui["nodes"] if n["type"] == "Soup")
    assert [(i["name"], i["link"] is not None) for i in soup["inputs"]] == [
        ("models.model0", True), ("models.model1", False), ("models.model2", True), ("models.model3", False)]
    assert soup["widgets_values"] == ["1, 3"]
    assert ui_to_api_links(ui) == {(1, 0, 3, "models.model0"), (2, 0, 3, "models.model2")}

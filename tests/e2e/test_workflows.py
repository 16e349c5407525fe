"""Tier 3: a real ComfyUI server, the pack in custom_nodes, every shipped workflow posted."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from compartments.cli.client import ComfyClient, ComfyError
from compartments.cli.workflow_ui import api_to_ui, ui_to_api_links
from compartments.nodes import NEEDS_NEWER_V3

ROOT = Path(__file__).resolve().parents[2]
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))


# The io type a release's /object_info shows for each newer V3 name of nodes.NEEDS_NEWER_V3.
FEATURE_IO_TYPES = {"Autogrow": "COMFY_AUTOGROW_V3"}


def _all_node_ids() -> set[str]:
    """Node ids declared in nodes/*.py, read from node_list.json (kept in sync by a test)."""
    return set(json.loads((ROOT / "node_list.json").read_text()))


def _served_io_types(info: dict) -> set[str]:
    return {spec[0] for node in info.values() for sec in ("required", "optional")
            for spec in (node.get("input", {}).get(sec) or {}).values() if isinstance(spec[0], str)}


def _missing_features(server) -> dict[str, str]:
    """Our nodes this release cannot serve (it has no core node with that V3 input type): id -> feature."""
    served = _served_io_types(_object_info(server))
    return {n: f for n, f in NEEDS_NEWER_V3.items() if FEATURE_IO_TYPES[f] not in served}


def _our_node_ids(server) -> set[str]:
    return _all_node_ids() - set(_missing_features(server))


def _skip_if_release_lacks_a_feature(server, wf: dict, name: str) -> None:
    lacking = {n: f for n, f in _missing_features(server).items() if n in {v["class_type"] for v in wf.values()}}
    if lacking:
        pytest.skip(f"{name} uses {sorted(lacking)}, built on io.{', io.'.join(sorted(set(lacking.values())))}, "
                    "which this ComfyUI release does not have")


def test_pack_loads_without_import_error(comfy_server):
    log = comfy_server.log.read_text(errors="replace")
    assert "IMPORT FAILED" not in log or "compartments" not in log.split("IMPORT FAILED", 1)[1].splitlines()[0], log[-4000:]
    assert "Cannot import" not in log or "compartments" not in log, log[-4000:]
    info = comfy_server.client.object_info()
    ours = {k for k in info if k.startswith("Compartments")}
    expected = _our_node_ids(comfy_server)
    assert ours == expected, f"object_info vs node_list.json: {sorted(ours ^ expected)}"


def test_start_up_log_has_no_warning_from_the_pack(comfy_server):
    """What a user sees when ComfyUI starts: nothing from the pack but its load line (no
    deprecation warning, traceback or error naming a file of the pack)."""
    log = comfy_server.log.read_text(errors="replace").splitlines()
    pack_dir = str(ROOT)
    noisy = [ln for ln in log if ("compartments" in ln.lower() or pack_dir in ln)
             and any(w in ln.lower() for w in ("deprecat", "warning", "error", "traceback", "failed"))]
    assert not noisy, "\n".join(noisy)
    loaded = [ln for ln in log if "compartments" in ln.lower() and "seconds" in ln]
    assert loaded, "ComfyUI did not list the pack among its custom nodes:\n" + "\n".join(log[-40:])


def _reference_inputs() -> dict[str, list[tuple[str, str, bool]]]:
    """The README node reference: node id -> [(input, type, optional)]."""
    rows = {}
    text = (ROOT / "README.md").read_text().split("## Node reference", 1)[1].split("\n## ", 1)[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].startswith("`Compartments"):
            continue
        node = cells[0].split("`")[1]
        inputs = []
        for item in filter(None, (x.strip() for x in cells[2].split(","))):
            name, _, kind = item.partition(":")
            inputs.append((name.strip().rstrip("?"), kind.strip(), name.strip().endswith("?")))
        rows[node] = inputs
    return rows


def test_object_info_lists_every_node_with_its_inputs(comfy_server):
    """/object_info, as this release serves it to the editor, matches the README node reference."""
    info = _object_info(comfy_server)
    reference = _reference_inputs()
    assert set(reference) == _all_node_ids(), sorted(set(reference) ^ _all_node_ids())
    for node, expected in reference.items():
        if node in _missing_features(comfy_server):
            assert node not in info
            continue
        spec = info[node]["input"]
        served = []
        for section, optional in (("required", False), ("optional", True)):
            for name, decl in (spec.get(section) or {}).items():
                kind = decl[0] if isinstance(decl[0], str) else "COMBO"
                kind = {"COMFY_AUTOGROW_V3": "AUTOGROW"}.get(kind, kind)
                served.append((name, kind, optional))
        assert sorted(served) == sorted(expected), f"{node}: served {served}, README {expected}"
        assert info[node]["display_name"] and info[node]["category"].startswith("Compartments"), node


def _post(server, wf: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url.rstrip("/") + "/prompt", data=json.dumps({"prompt": wf}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("name", ["cpr_flux_redux_kl"])
def test_workflow_needing_unbuildable_files_fails_validation_only_on_them(comfy_server, name, unbuildable_workflows,
                                                                          fails_only_on):
    wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    code, payload = _post(comfy_server, wf)
    assert code == 400, payload
    fails_only_on(payload.get("node_errors", {}), unbuildable_workflows[name][0])


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=[p.stem for p in API_WORKFLOWS])
def test_workflow_runs(comfy_server, path, unbuildable_workflows):
    wf = json.loads(path.read_text())
    _skip_if_release_lacks_a_feature(comfy_server, wf, path.name)
    if path.stem in unbuildable_workflows:
        pytest.skip(f"{path.name} needs {unbuildable_workflows[path.stem][1]}; validated instead")
    outputs = comfy_server.run(wf, timeout=900)
    output_nodes = {nid for nid, n in wf.items() if n["class_type"] in _output_node_types(comfy_server)}
    assert output_nodes, f"{path.name} has no output node"
    missing = output_nodes - set(outputs)
    assert not missing, f"{path.name}: output nodes {missing} produced nothing; got {list(outputs)}"
    for nid in output_nodes:
        node_out = outputs[nid]
        produced = [v for v in node_out.values() if isinstance(v, list) and v]
        assert produced, f"{path.name}: node {nid} output is empty: {node_out}"
        for items in produced:
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    sub = comfy_server.base_dir / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
                    assert sub.is_file() and sub.stat().st_size > 0, sub


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=[p.stem for p in API_WORKFLOWS])
def test_ui_twin_matches_api(comfy_server, path):
    """workflows/<name>.json is the UI-format twin of workflows/api/<name>.json."""
    twin = ROOT / "workflows" / path.name
    assert twin.is_file(), f"missing UI-format twin {twin.relative_to(ROOT)}"
    ui = json.loads(twin.read_text())
    api = json.loads(path.read_text())
    _skip_if_release_lacks_a_feature(comfy_server, api, path.name)
    expected = api_to_ui(api, _object_info(comfy_server))
    assert {(n["id"], n["type"]) for n in ui["nodes"]} == {(n["id"], n["type"]) for n in expected["nodes"]}
    assert ui_to_api_links(ui) == ui_to_api_links(expected)
    assert {n["id"]: n["widgets_values"] for n in ui["nodes"]} == {n["id"]: n["widgets_values"] for n in expected["nodes"]}


_INFO: dict = {}


def _object_info(server) -> dict:
    if not _INFO:
        _INFO.update(server.client.object_info())
    return _INFO


def _output_node_types(server) -> set[str]:
    return {k for k, v in _object_info(server).items() if v.get("output_node")}


# ---------------------------------------------------------------- bad input
def test_missing_model_file_is_a_validation_error_naming_the_node(comfy_server):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no-such-model.safetensors"}},
          "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(ComfyError) as err:
        comfy_server.run(wf)
    assert "CheckpointLoaderSimple" in str(err.value) and "no-such-model" in str(err.value)


def test_unknown_node_is_rejected(comfy_server):
    wf = {"1": {"class_type": "CompartmentsNoSuchNode", "inputs": {}}}
    with pytest.raises(ComfyError) as err:
        comfy_server.run(wf)
    assert "CompartmentsNoSuchNode" in str(err.value)


def test_wrong_type_is_rejected(comfy_server):
    wf = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["1", 0]}},
          "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(ComfyError) as err:
        comfy_server.run(wf)
    assert "VAEDecode" in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compartments", *args], capture_output=True, text=True, timeout=600)


def test_cli_run_against_running_server(comfy_server, tmp_path):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
          "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red square", "clip": ["1", 1]}},
          "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                     "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
          "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
          "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "cli"}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    res = _cli("run", str(path), "--url", comfy_server.url, "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((tmp_path / "out" / "wf").glob("cli_*.png"))


def test_cli_reports_node_errors(comfy_server, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
                                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}))
    res = _cli("run", str(path), "--url", comfy_server.url, "--out", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "CheckpointLoaderSimple" in res.stderr and "Traceback" not in res.stderr


def test_cli_missing_file_and_unreachable_server(tmp_path):
    res = _cli("run", str(tmp_path / "missing.json"), "--url", "http://127.0.0.1:9")
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"1": {"class_type": "EmptyLatentImage", "inputs": {}}}))
    res = _cli("run", str(good), "--url", "http://127.0.0.1:9")
    assert res.returncode == 2 and "cannot reach ComfyUI" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_client_object_info_lists_core_nodes(comfy_server):
    info = ComfyClient(comfy_server.url).object_info()
    assert "KSampler" in info and "SamplerCustomAdvanced" in info

"""scripts/hosts.py, the release matrix behind the README's test command: which hosts run, and
one clear line for each one that cannot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def hosts(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("compartments_hosts_script", ROOT / "scripts" / "hosts.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("COMPARTMENTS_RELEASES", str(tmp_path / "releases"))
    monkeypatch.setattr(mod, "HOST_VENVS", tmp_path / "venvs")
    return mod


def _release(root: Path, version: str, requirements: str = "") -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    (root / "requirements.txt").write_text(requirements)
    return root


def test_every_release_folder_is_a_host(hosts, tmp_path):
    _release(tmp_path / "releases" / "v0.8.0", "0.8.0")
    _release(tmp_path / "releases" / "v0.3.64", "0.3.64")
    found = hosts.hosts()
    assert [(h.name, h.version, h.shared, h.problem) for h in found] == [
        ("v0.3.64", "0.3.64", True, ""), ("v0.8.0", "0.8.0", True, "")]


def test_unsupported_and_broken_releases_are_named(hosts, tmp_path):
    _release(tmp_path / "releases" / "old", "0.3.10")
    (tmp_path / "releases" / "junk").mkdir()
    _release(tmp_path / "releases" / "v0.8.0", "0.8.0")
    found = {h.name: h for h in hosts.hosts()}
    assert found["old"].unsupported and "0.3.10" in found["old"].problem and "0.3.64" in found["old"].problem
    assert not found["junk"].unsupported and "is not a ComfyUI checkout" in found["junk"].problem
    assert found["v0.8.0"].problem == ""


def test_comfyui_path_selects_one_checkout(hosts, tmp_path, monkeypatch):
    _release(tmp_path / "releases" / "v0.8.0", "0.8.0")
    mine = _release(tmp_path / "mine", "0.8.0")
    monkeypatch.setenv("COMFYUI_PATH", str(mine))
    assert [(h.name, h.shared) for h in hosts.hosts()] == [("path-mine", False)]


def test_a_bad_comfyui_path_is_named_and_the_releases_still_run(hosts, tmp_path, monkeypatch):
    _release(tmp_path / "releases" / "v0.8.0", "0.8.0")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "typo"))
    found = hosts.hosts()
    assert "COMFYUI_PATH=" in found[0].problem and "typo" in found[0].problem
    assert [h.name for h in found[1:]] == ["v0.8.0"] and not found[1].problem


def test_failed_requirements_are_one_line_and_the_next_release_still_builds(hosts, tmp_path, capsys, monkeypatch):
    """A requirement that cannot install (a local path that does not exist: fails without the network)."""
    _release(tmp_path / "releases" / "a-broken", "0.8.0", f"{tmp_path / 'no-such-package'}\n")
    _release(tmp_path / "releases" / "b-good", "0.8.0", "")
    assert hosts.setup() == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("hosts:")]
    broken = [ln for ln in lines if "a-broken" in ln]
    assert len(broken) == 1 and "requirements failed to install" in broken[0] and "rerun scripts/setup.sh" in broken[0]
    assert any("b-good" in ln and "ready" in ln for ln in lines), lines
    status = {h.name: hosts._status(h) for h in hosts.hosts()}
    assert status["a-broken"]["ok"] is False and status["b-good"]["ok"] is True
    good = next(h for h in hosts.hosts() if h.name == "b-good")
    # the host venv sees the base venv's pack and pytest through its .pth line, and runs as its own prefix
    out = subprocess.run([str(good.python), "-c", "import sys, compartments, pytest; print(sys.prefix)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(good.venv), out.stderr


def test_summary_is_red_naming_the_failing_release(hosts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPARTMENTS_TEST_SUMMARY", str(tmp_path / "summary.json"))
    R = hosts.Result
    code = hosts._summary([R("tier 1 (no ComfyUI)", "unit", {"passed": 5, "failed": 0, "skipped": 1}),
                           R("ComfyUI 0.3.64 (v0.3.64)", "comfy, e2e", {"passed": 3, "failed": 1, "skipped": 0}),
                           R("ComfyUI 0.8.0 (v0.8.0)", "comfy, e2e", {"passed": 4, "failed": 0, "skipped": 0})], 12.0)
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "RED: ComfyUI 0.3.64 (v0.3.64)" in out
    assert out[-1] == "total: 12 passed, 1 failed, 1 skipped"
    assert hosts._summary([R("tier 1 (no ComfyUI)", "unit", {"passed": 0, "failed": 0, "skipped": 0})], 1.0) == 1


def test_unsupported_release_leaves_the_run_green(hosts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPARTMENTS_TEST_SUMMARY", str(tmp_path / "summary.json"))
    R = hosts.Result
    code = hosts._summary([R("tier 1 (no ComfyUI)", "unit", {"passed": 5, "failed": 0, "skipped": 0}),
                           R("ComfyUI 0.3.10 (old)", "comfy, e2e", note="UNSUPPORTED, skipped")], 1.0)
    assert code == 0 and "UNSUPPORTED" in capsys.readouterr().out


def test_junit_counts(hosts, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert hosts._junit_counts(xml) == {"passed": 3, "failed": 2, "skipped": 2}
    assert hosts._junit_counts(tmp_path / "missing.xml") == {}


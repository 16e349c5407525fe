"""The command line: every error a room raises is one line on stderr with exit code 2; a bug
(an exception that is no user error) says it is one and where its traceback was written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compartments import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compartments", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content", [b"", b"not a model", b"\xff" * 8 + b"{}"], ids=["empty", "text", "lying"])
def test_malformed_member_is_one_line_exit_2(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    res = _run("soup", str(bad), str(bad), "-o", str(tmp_path / "out.safetensors"))
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "bad.safetensors" in res.stderr and not (tmp_path / "out.safetensors").exists()


def test_damaged_store_is_one_line_exit_2(tmp_path):
    store = tmp_path / "store"
    (store / "images").mkdir(parents=True)
    (store / "meta.sqlite").write_bytes(b"garbage" * 50)
    res = _run("store", "list", str(store))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "damaged" in res.stderr and "Traceback" not in res.stderr


def test_weights_out_of_range_are_one_line(tmp_path):
    res = _run("soup", f"{tmp_path / 'a.safetensors'}:1e308", "-o", str(tmp_path / "o.safetensors"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_bug_is_reported_as_one_with_its_traceback(tmp_path, monkeypatch, capsys):
    """Fault injection: the soup engine raising an unexpected exception."""
    import compartments.cli.soup as soup_cli

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(soup_cli, "read_manifest", broken)
    assert cli.main(["soup-info", str(tmp_path / "x.safetensors")]) == 70
    err = capsys.readouterr().err.strip()
    assert err.startswith("compartments: internal error (a bug in Compartments, not your input): KeyError")
    log = Path(err.rsplit("Traceback: ", 1)[1])
    assert "KeyError: 'boom'" in log.read_text()
    log.unlink()

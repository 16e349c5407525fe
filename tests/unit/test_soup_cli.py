"""Tier 1: the soup subcommands of ``python -m compartments`` (no ComfyUI anywhere)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compartments.cli import main

U = "model.diffusion_model."


def _member(tmp: Path, i: int) -> Path:
    g = torch.Generator().manual_seed(i)
    sd = {f"{U}a.weight": torch.randn(6, 5, generator=g).half(), f"{U}b.bias": torch.randn(5, generator=g).half(),
          "first_stage_model.x.weight": torch.ones(3, 3).half()}
    p = tmp / f"m{i}.safetensors"
    save_file(sd, str(p))
    return p


def test_soup_add_remove_info_roundtrip(tmp_path, capsys):
    ms = [_member(tmp_path, i) for i in range(3)]
    soup = tmp_path / "soup.safetensors"
    assert main(["soup", str(ms[0]), str(ms[1]), "-o", str(soup), "-q"]) == 0
    assert main(["soup-add", str(soup), str(ms[2]), "-q"]) == 0
    assert main(["soup-remove", str(soup), str(ms[1]), "-q"]) == 0
    ref = tmp_path / "ref.safetensors"
    assert main(["soup", str(ms[0]), str(ms[2]), "-o", str(ref), "-q"]) == 0
    a, b = load_file(str(soup)), load_file(str(ref))
    assert all(torch.equal(a[k], b[k]) for k in b)
    capsys.readouterr()
    assert main(["soup-info", str(soup), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 2 and info["exact"] and [h["op"] for h in info["history"]] == ["build", "add", "remove"]


def test_weighted_members_and_errors_exit_2(tmp_path, capsys):
    ms = [_member(tmp_path, i) for i in range(3)]
    soup = tmp_path / "w.safetensors"
    assert main(["soup", f"{ms[0]}:3", f"{ms[1]}:1", "-o", str(soup), "-q"]) == 0
    sd0, sd1, out = load_file(str(ms[0])), load_file(str(ms[1])), load_file(str(soup))
    k = f"{U}a.weight"
    assert torch.equal(out[k], ((3 * sd0[k].double() + sd1[k].double()) / 4).half())
    before = hashlib.sha256(soup.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["soup-remove", str(soup), str(ms[2]), "-q"]) == 2
    assert "not a member" in capsys.readouterr().err
    assert hashlib.sha256(soup.read_bytes()).hexdigest() == before
    assert main(["soup-info", str(ms[0])]) == 2
    assert "not a Compartments soup" in capsys.readouterr().err

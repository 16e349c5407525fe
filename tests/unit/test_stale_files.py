"""What a killed process leaves behind is removed by the next run (and a live one's is not).

A soup and a store build are killed with SIGKILL in the middle of writing; the next soup into
that folder, and the next build beside that store, remove the dead process's partial file or
building folder (which held copies of private images).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compartments.atomic import pid_alive, sweep_stale

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern))
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before writing: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {pattern} appeared in {folder}")


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not pid_alive(proc.pid)


def test_killed_soup_leaves_a_partial_that_the_next_soup_removes(tmp_path):
    import torch
    from safetensors.torch import save_file

    members = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({f"model.diffusion_model.b{j}.weight": torch.full((256, 256), float(i + j)) for j in range(40)},
                  str(path))
        members.append(path)
    out = tmp_path / "soup.safetensors"
    proc = _child(f"""
        import time
        from compartments.soup import build_soup
        build_soup({[str(m) for m in members]!r}, {str(out)!r},
                   progress=lambda done, total: time.sleep(0.5) if done > 2 else None)
    """)
    _wait_for(".soup.safetensors.*.partial", tmp_path, proc)
    time.sleep(0.3)
    _kill(proc)
    partials = list(tmp_path.glob(".soup.safetensors.*.partial"))  # the soup's and its sidecar's
    assert len(partials) == 2 and not out.exists()
    # a live process's partial is never touched
    live = tmp_path / f".other.safetensors.{os.getpid()}.partial"
    live.write_bytes(b"in flight")
    from compartments.soup import build_soup

    man = build_soup(members, out)
    assert out.is_file() and not any(p.exists() for p in partials) and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, out.name, man.exact_data["file"]]
                                                                + [m.name for m in members])


def test_killed_store_build_leaves_a_building_folder_that_the_next_build_removes(tmp_path):
    from compartments.tiny import retrieval as tiny_retrieval

    weights, folder = tiny_retrieval.clip_weights(), tiny_retrieval.images_folder()
    stores = tmp_path / "stores"
    stores.mkdir()
    # the child pauses right after the image copies are written, before its commit: killed there
    proc = _child(f"""
        import time
        from compartments.retrieval import store as S
        from compartments.retrieval.embed import Embedder
        insert = S.ImageStore._insert
        S.ImageStore._insert = lambda self, *a: (time.sleep(60), insert(self, *a))[1]
        S.build_or_update({str(stores / "mine")!r}, Embedder({str(weights)!r}), {str(folder)!r}, owner="me")
    """)
    (building,) = _wait_for(".mine.*.building", stores, proc)
    _wait_for("*", building / "images", proc)  # copies of the images are in it
    _kill(proc)
    assert building.is_dir()
    from compartments.retrieval.embed import Embedder
    from compartments.retrieval.store import build_or_update

    store, _, created = build_or_update(stores / "other", Embedder(weights), folder, owner="you")
    store.close()
    assert created and not building.exists()
    assert sorted(p.name for p in stores.iterdir()) == ["other"]


def test_sweep_keeps_what_is_not_its_own(tmp_path):
    names = [".a.safetensors.1.partial.bak", "a.safetensors.99999999.partial", ".b.notapid.partial", "plain.txt"]
    for n in names:
        (tmp_path / n).write_text("x")
    dead = tmp_path / ".c.safetensors.99999999.partial"
    dead.write_text("x")
    assert sweep_stale(tmp_path, ".partial") == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

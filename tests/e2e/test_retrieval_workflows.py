"""Tier 3: the shipped retrieval workflows on a real server, checking what they retrieve."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _text(outputs: dict, node: str) -> dict:
    return json.loads(outputs[node]["text"][0])


def test_forget_workflow_removes_the_image_for_good(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "retrieval_forget.json").read_text())
    forgotten: set[int] = set()
    for _ in range(2):  # the second run re-builds from the same folder: the forgotten image stays out
        out = comfy_server.run(wf, timeout=600)
        (top,) = _text(out, "3")["items"]
        assert top["id"] not in forgotten
        report = _text(out, "5")
        assert [f["id"] for f in report["forgotten"]] == [top["id"]]
        forgotten.add(top["id"])
        after = {it["id"] for it in _text(out, "7")["items"]}
        assert len(after) == 3 and not after & forgotten


def test_build_retrieve_workflow_finds_the_query_image(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "retrieval_build_retrieve.json").read_text())
    out = comfy_server.run(wf, timeout=600)
    build = _text(out, "2")
    assert {s["file"] for s in build["skipped"]} >= {"broken.png", "notes.txt"}
    by_image = _text(out, "9")["items"]
    assert by_image[0]["score"] > 0.999  # retrieval-query.png is a copy of a stored image
    public = {it["id"] for it in _text(out, "12")["items"]}
    assert {it["id"] for it in by_image} <= public
    assert out["4"]["images"] and out["8"]["images"]

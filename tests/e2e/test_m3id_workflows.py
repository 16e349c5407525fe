"""Tier 3: the M3ID workflows on a real server caption every image and report PDM per caption."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _texts(outputs: dict, node: str) -> list[str]:
    return [t for t in outputs[node].get("text", []) if isinstance(t, str)]


def test_batch_workflow_captions_every_image(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "m3id_caption_batch.json").read_text())
    outputs = comfy_server.run(wf, timeout=600)
    captions = _texts(outputs, "8")
    assert len(captions) == 3 and all(c and not c.startswith("[caption failed") for c in captions)
    doc = json.loads(_texts(outputs, "9")[0])
    assert [c["caption"] for c in doc["captions"]] == captions
    assert all(len(c["pdm"]) == len(c["tokens"]) > 0 for c in doc["captions"])
    assert len(outputs["10"]["images"]) == 3


def test_generate_then_caption_side_by_side(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "m3id_generate_and_caption.json").read_text())
    outputs = comfy_server.run(wf, timeout=600)
    m3id, plain = _texts(outputs, "11"), _texts(outputs, "12")
    assert len(m3id) == len(plain) == 2 and all(m3id) and all(plain)

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


def test_caption_folder_workflow_writes_a_caption_per_image(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "m3id_caption_folder.json").read_text())
    outputs = comfy_server.run(wf, timeout=600)
    report = json.loads(_texts(outputs, "3")[0])
    dataset = comfy_server.base_dir / "input" / "m3id-dataset"
    images = sorted(p.relative_to(dataset) for p in dataset.rglob("*.png"))
    assert len(images) == 4 and report["n_failed"] == 0
    assert report["n_captioned"] + report["n_skipped"] == 4
    for rel in images:
        assert (dataset / rel).with_suffix(".txt").read_text().strip()
    records = [json.loads(line) for line in (dataset / "captions.jsonl").read_text().splitlines()]
    assert {r["image"] for r in records} == {str(p) for p in images}
    assert all(r["family"] == "llava" and "mean" in r["pdm"] for r in records)


def test_qwen_and_gemma_side_by_side(comfy_server):
    wf = json.loads((ROOT / "workflows" / "api" / "m3id_qwen_gemma_side_by_side.json").read_text())
    outputs = comfy_server.run(wf, timeout=600)
    lists = [_texts(outputs, node) for node in ("14", "15", "16", "17")]
    assert all(len(c) == 2 and all(c) and not any(t.startswith("[caption failed") for t in c) for c in lists)

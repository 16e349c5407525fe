"""What the editor serves from the pack's files: help pages and template thumbnails (tier 1 checks
the files; tier 3 checks that the server serves them and that the pages match the live schema)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

import compartments

ROOT = Path(__file__).resolve().parents[2]


def test_every_node_has_a_help_page_in_the_web_directory():
    web = ROOT / compartments.WEB_DIRECTORY
    nodes = set(json.loads((ROOT / "node_list.json").read_text()))
    pages = {p.stem for p in (web / "docs").glob("*.md")}
    assert pages == nodes, sorted(pages ^ nodes)
    for node_id in nodes:
        text = (web / "docs" / f"{node_id}.md").read_text()
        assert text.startswith("# "), node_id
        for section in ("## Inputs", "## Outputs", "## Example", "## Paper"):
            assert section in text, (node_id, section)
        assert "arxiv.org/abs/" in text, node_id
    assert not list(web.rglob("*.js")), "the pack ships no frontend code"


def test_every_shipped_workflow_has_a_template_thumbnail():
    """ComfyUI's template browser shows workflows/<name>.jpg beside workflows/<name>.json."""
    workflows = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    thumbs = {p.stem for p in (ROOT / "workflows").glob("*.jpg")}
    assert workflows == thumbs, sorted(workflows ^ thumbs)
    for name in thumbs:
        with Image.open(ROOT / "workflows" / f"{name}.jpg") as img:
            assert img.format == "JPEG" and img.width == 640 and 200 < img.height < 640, (name, img.size)
    assert not (ROOT / "example_workflows").exists(), (
        "a second template folder makes ComfyUI list every workflow twice (it globs both)")


def test_the_editor_strings_cover_every_node():
    """locales/en/nodeDefs.json (served at /i18n) labels every node's inputs; frontends before 1.3x
    draw widget labels from it, so a keyword-safe id such as lambda_ still shows as 'lambda'."""
    strings = json.loads((ROOT / "locales" / "en" / "nodeDefs.json").read_text())
    assert set(strings) == set(json.loads((ROOT / "node_list.json").read_text()))
    labels = [e["name"] for node in strings.values() for e in node["inputs"].values()]
    assert labels and not [x for x in labels if x.endswith("_")]
    assert strings["CompartmentsCPRKLGuider"]["inputs"]["lambda_"]["name"] == "lambda"

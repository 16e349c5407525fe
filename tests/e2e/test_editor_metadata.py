"""Tier 3: what the editor shows for the pack's nodes, read from a live server.

Names, tooltips and descriptions come from /object_info (what the node library, the widgets
and the hover tips show); help pages from ``/extensions/compartments/docs/<NodeId>.md`` (what
the node documentation panel fetches).
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from compartments.cli.node_docs import load_workflows, node_defs, render

pytestmark = pytest.mark.e2e


def _ours(comfy_server) -> dict[str, dict]:
    info = comfy_server.client.object_info()
    return {k: v for k, v in info.items() if k.startswith("Compartments")}


def _inputs(info: dict):
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            yield name, (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def test_every_node_reads_well_in_the_library(comfy_server):
    """Plain display names in a Compartments/<capability> category, a description each."""
    ours = _ours(comfy_server)
    assert len(ours) >= 27
    for node_id, info in ours.items():
        name = info["display_name"]
        assert name and name != node_id and "_" not in name and not name.startswith("Compartments"), node_id
        assert info["category"].startswith("Compartments/") and info["category"].count("/") == 1, node_id
        assert len(info.get("description") or "") >= 40, (node_id, info.get("description"))


def test_every_input_shows_a_plain_name_and_a_tooltip(comfy_server):
    bad = []
    for node_id, info in _ours(comfy_server).items():
        for name, options in _inputs(info):
            label = options.get("display_name") or name
            if label.endswith("_") or label.startswith("_"):
                bad.append(f"{node_id}.{name}: shown as '{label}'")
            if len((options.get("tooltip") or "").strip()) < 8:
                bad.append(f"{node_id}.{name}: no tooltip")
    assert not bad, "\n".join(bad)


def test_renamed_labels_keep_the_input_ids_saved_workflows_use(comfy_server):
    """The editor shows 'lambda'; the input id stays 'lambda_', which every saved workflow holds."""
    ours = _ours(comfy_server)
    for node_id in ("CompartmentsCPRKLGuider", "CompartmentsCPRChooseGuider", "CompartmentsM3IDCaption"):
        options = dict(_inputs(ours[node_id]))
        assert options["lambda_"]["display_name"] == "lambda", node_id
    uses = [name for name, wf in load_workflows().items()
            if any("lambda_" in v.get("inputs", {}) for v in wf.values())]
    assert uses, "a shipped workflow sets lambda_ (and the e2e tier runs it)"


def test_every_node_has_a_help_page_the_server_serves_and_it_is_current(comfy_server):
    """The panel fetches /extensions/<pack>/docs/<NodeId>.md; the page is the one node-docs renders
    from this server's /object_info (regenerate: python -m compartments node-docs --url URL)."""
    workflows = load_workflows()
    stale = []
    for node_id, info in _ours(comfy_server).items():
        url = f"{comfy_server.url}/extensions/compartments/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200, url
            served = resp.read().decode()
        for part in ("## Inputs", "## Outputs", "## Example", "## Paper", info["display_name"]):
            assert part in served, (node_id, part)
        for name, options in _inputs(info):
            assert f"**{options.get('display_name') or name}**" in served, (node_id, name)
        if served != render(node_id, info, workflows):
            stale.append(node_id)
    assert not stale, f"help pages out of date with the schema: {stale}"


def test_the_editor_strings_are_served_and_current(comfy_server):
    """/i18n carries the pack's locales/en/nodeDefs.json: the labels older frontends draw on widgets
    (frontend 1.27, ComfyUI 0.3.64, ignores the V3 display_name there) and the tooltips."""
    with urllib.request.urlopen(f"{comfy_server.url}/i18n", timeout=30) as resp:
        served = json.loads(resp.read())["en"]["nodeDefs"]
    expected = node_defs(comfy_server.client.object_info())
    assert {k: served.get(k) for k in expected} == expected
    assert served["CompartmentsCPRKLGuider"]["inputs"]["lambda_"]["name"] == "lambda"


def test_shipped_workflows_are_templates_under_the_pack_name(comfy_server):
    """The template browser lists every UI-format workflow once under the pack's name, with its
    thumbnail, and ComfyUI prints no rename hint at its default log level (docs/editor.md)."""
    with urllib.request.urlopen(f"{comfy_server.url}/workflow_templates", timeout=30) as resp:
        listed = json.loads(resp.read())
    names = listed.get("compartments")
    expected = sorted(p.stem for p in (comfy_server.pack / "workflows").glob("*.json"))
    assert names is not None and sorted(names) == expected, (names, expected)
    for name in expected:
        for ext in ("json", "jpg"):
            with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/compartments/{name}.{ext}",
                                        timeout=30) as resp:
                assert resp.status == 200 and resp.read(), (name, ext)
    assert "consider renaming it to 'example_workflows'" not in comfy_server.log.read_text(errors="replace")

"""Tier 3b: every shipped UI-format workflow in the real ComfyUI frontend, in headless Chromium.

A real server (the pack in its custom_nodes, the tiny models) serves the frontend its release
pins (``comfyui-frontend-package``); Chromium is Debian's, driven through its chromedriver by
Selenium, so nothing downloads a browser. For each workflow the test drops the file on the
canvas the way a user's drag-and-drop does, checks that every node type is known and the
console shows no error, queues it from the UI (the frontend's own ``queuePrompt``, what the Run
button calls), and waits for the server's history to report success: for one workflow per capability
(``FINISHED_IN_EDITOR`` in tests/conftest.py). The others tier 3 runs to the end already: the test
checks that the server received exactly the API file's prompt, then cancels it; workflows needing
files no test can build: validation must refuse only those. It saves a screenshot of
the finished graph under ``$TMPDIR/compartments-browser/<release>/`` (the CI artifact; the
template thumbnails in ``workflows/`` are made from them with ``python -m compartments
thumbnails``). Where Chromium cannot start, the tier skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# What a fresh, offline user folder legitimately fails to fetch: the release check on
# api.comfy.org (no network here), and files a new user does not have yet (404).
EXPECTED_CONSOLE = ("api.comfy.org", "/user.css", "favicon.ico", "/api/userdata", "the server responded with a "
                    "status of 404")


def _find(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


@pytest.fixture(scope="module")
def shots(comfyui_release) -> Path:
    release = comfyui_release
    folder = Path(os.environ.get("COMPARTMENTS_SHOTS") or Path(tempfile.gettempdir()) / "compartments-browser") / release
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def editor(tmp_path_factory, start_server):
    """A server for this module only (stopped before the next tier starts its own)."""
    base = tmp_path_factory.mktemp("editor_server")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # a returning user: no first-run template browser over the canvas
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    with start_server(base) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    chromium = _find(("chromium", "chromium-browser", "google-chrome"), "COMPARTMENTS_CHROMIUM")
    driver_path = _find(("chromedriver",), "COMPARTMENTS_CHROMEDRIVER")
    if not chromium or not driver_path:
        reason = ("no Chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
                  "scripts/setup.sh does it where it may)")
        print(f"browser tier skipped: {reason}")
        pytest.skip(reason)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.skip(f"selenium is not installed ({exc}); it is in the test extra")
    profile = tempfile.mkdtemp(prefix="compartments-chromium-")  # removed after: Chromium leaves it in /tmp
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    opts.add_argument(f"--user-data-dir={profile}")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as exc:  # noqa: BLE001 - any start failure is a reason to skip, printed
        shutil.rmtree(profile, ignore_errors=True)
        reason = f"Chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"browser tier skipped: {reason}")
        pytest.skip(reason)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _open_editor(browser, url: str) -> None:
    browser.get(url)
    _wait(lambda: browser.execute_script(
        "return !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)"), 120, "the editor")
    browser.get_log("browser")  # start each workflow with an empty console


DROP = """
const dt = new DataTransfer();
dt.items.add(new File([arguments[0]], arguments[1], {type: 'application/json'}));
const target = document.querySelector('#graph-canvas') || document.querySelector('canvas') || document;
for (const kind of ['dragenter', 'dragover', 'drop']) {
  target.dispatchEvent(new DragEvent(kind, {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""

GRAPH = """
const g = window.app.graph; const nodes = g._nodes || g.nodes || [];
return {count: nodes.length, title: document.title,
        types: nodes.map(n => n.type),
        missing: nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
        labels: nodes.filter(n => String(n.type).startsWith('Compartments'))
                     .flatMap(n => (n.widgets || []).map(w => [n.type, w.name, w.label || w.name]))};
"""


# Frame the graph: its top-left corner in view, zoomed out to fit but not below the scale at which
# the editor still draws widget text (a thumbnail should be readable).
FRAME = """
const c = window.app.canvas, nodes = window.app.graph._nodes || window.app.graph.nodes || [];
if (!nodes.length || !c.ds) return;
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of nodes) {
  x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
}
const el = c.canvas, w = el.clientWidth || el.width, h = el.clientHeight || el.height;
const scale = Math.max(0.65, Math.min(1.0, (w - 120) / (x1 - x0), (h - 140) / (y1 - y0)));
c.ds.scale = scale;
c.ds.offset = [-x0 + 80 / scale, -y0 + 100 / scale];
c.setDirty(true, true);
"""


def _history(server) -> dict:
    return server.client._request("/history")


def _known_prompts(server) -> set[str]:
    """Ids of every prompt the server has: finished (history), running or waiting (queue)."""
    queue = server.client._request("/queue")
    ids = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
    return ids | set(_history(server))


QUEUE = """
window.__compartmentsQueued = null;
Promise.resolve(window.app.queuePrompt(0, 1))
  .then(r => { window.__compartmentsQueued = {done: true, errors: window.app.lastNodeErrors || null}; })
  .catch(e => { window.__compartmentsQueued = {done: true, exception: String(e)}; });
"""


def _console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and not any(s in e["message"] for s in EXPECTED_CONSOLE)]


def _missing_features(server, wf_ui: dict) -> list[str]:
    from compartments.nodes import NEEDS_NEWER_V3

    info = server.client.object_info()
    used = {n.get("type") for n in wf_ui.get("nodes", [])}
    return sorted(n for n in NEEDS_NEWER_V3 if n in used and n not in info)


def _same_prompt(sent: dict, api: dict) -> list[str]:
    """Differences between the prompt the server received and an API-format workflow: node ids, classes, and
    every input the API file sets (the frontend adds its own display-only values, e.g. PreviewAny's)."""
    diffs = [f"nodes {sorted(set(sent) ^ set(api))}"] if set(sent) != set(api) else []
    for nid in sorted(set(sent) & set(api)):
        if sent[nid]["class_type"] != api[nid]["class_type"]:
            diffs.append(f"{nid}: editor {sent[nid]['class_type']}, API file {api[nid]['class_type']}")
        got = {k: sent[nid]["inputs"].get(k) for k in api[nid]["inputs"]}
        if got != api[nid]["inputs"]:
            diffs.append(f"{nid}.inputs: editor {got!r}, API file {api[nid]['inputs']!r}")
    return diffs


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_workflow_loads_queues_and_finishes_in_the_editor(editor, browser, shots, path, unbuildable_workflows,
                                                          finished_in_editor, fails_only_on):
    wf = json.loads(path.read_text())
    lacking = _missing_features(editor, wf)
    if lacking:
        pytest.skip(f"{path.stem} uses {lacking}, which this ComfyUI release cannot serve (newer V3 inputs)")
    _open_editor(browser, editor.url)
    browser.execute_script(DROP, path.read_text(), path.name)
    graph = _wait(lambda: (g := browser.execute_script(GRAPH))["count"] == len(wf["nodes"]) and g, 30,
                  f"{path.name} to load ({len(wf['nodes'])} nodes)")
    assert graph["missing"] == [], f"missing node types in the editor: {graph['missing']}"
    assert sorted(graph["types"]) == sorted(n["type"] for n in wf["nodes"])
    raw = [f"{node}.{name} shown as '{label}'" for node, name, label in graph["labels"] if label.endswith("_")]
    assert not raw, f"widgets showing an input id instead of its name: {raw}"
    errors = _console_errors(browser)
    assert not errors, f"console errors after loading {path.name}:\n" + "\n".join(errors)

    before = _known_prompts(editor)
    browser.execute_script(QUEUE)
    queued = _wait(lambda: browser.execute_script("return window.__compartmentsQueued"), 60, "the editor to queue")
    if path.stem in unbuildable_workflows:  # validation refuses exactly the files no test can build
        assert not queued.get("exception"), queued
        fails_only_on(queued.get("errors") or {}, unbuildable_workflows[path.stem][0])
        browser.save_screenshot(str(shots / f"{path.stem}.png"))
        return
    assert not queued.get("exception") and not queued.get("errors"), f"the editor could not queue: {queued}"
    new = _wait(lambda: _known_prompts(editor) - before, 60, "the prompt to reach the server")
    prompt_id = next(iter(new))
    cancel = path.stem not in finished_in_editor
    if cancel:
        _wait(lambda: prompt_id in _history(editor) or any(
            item[1] == prompt_id for item in editor.client._request("/queue").get("queue_running", [])),
            60, "the prompt to start")
        editor.client._request("/interrupt", {})

    def finished():
        entry = _history(editor).get(prompt_id, {})
        status = entry.get("status", {})
        return status if status.get("completed") or status.get("status_str") == "error" else None

    status = _wait(finished, 900, f"{path.stem} to finish")
    if cancel:  # the editor's prompt is the one tier 3 runs to the end
        api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
        diffs = _same_prompt(_history(editor)[prompt_id]["prompt"][2], api)
        assert not diffs, "\n".join(diffs)
    else:
        assert status.get("status_str") == "success", json.dumps(status)[:3000]
    time.sleep(1.0)  # let the editor draw the results (previews, text) before the picture
    browser.execute_script(FRAME)
    time.sleep(1.0)
    shot = shots / f"{path.stem}.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    errors = _console_errors(browser)
    assert not errors, f"console errors while running {path.name}:\n" + "\n".join(errors)
    print(f"screenshot: {shot}")

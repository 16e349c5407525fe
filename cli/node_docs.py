"""``python -m compartments node-docs``: the help page of every node, for the editor's documentation panel.

ComfyUI's frontend fetches ``/extensions/<pack>/docs/<NodeId>.md`` (the pack's ``WEB_DIRECTORY``
is ``web/``) when a user opens a node's help. Each page is rendered from what the server says
about the node (``/object_info``: description, inputs with types, defaults and tooltips,
outputs), the paper of its capability, and its use in a shipped workflow, so the page cannot
drift from the node: the e2e tier renders the pages from the live server and compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..atomic import write_text
from .client import PACK, ComfyClient

DOCS = PACK / "web" / "docs"
# The editor's English strings for the nodes (ComfyUI serves a pack's locales/<lang>/nodeDefs.json
# at /i18n). Frontends before 1.3x label widgets from here, not from the V3 display_name.
LOCALE = PACK / "locales" / "en" / "nodeDefs.json"
WORKFLOWS = PACK / "workflows" / "api"

# The paper behind each category (the capability), and the pack's guide for it.
PAPERS = {
    "Compartments/Soup": ("Diffusion Soup: Model Merging for Text-to-Image Diffusion Models", "2406.08431", "soup"),
    "Compartments/Retrieval": ("CPR: Retrieval Augmented Generation for Copyright Protection", "2403.18920",
                               "retrieval"),
    "Compartments/CPR": ("CPR: Retrieval Augmented Generation for Copyright Protection", "2403.18920", "cpr"),
    "Compartments/M3ID": ("Multi-Modal Hallucination Control by Visual Information Grounding (M3ID)", "2403.14003",
                          "m3id"),
    "Compartments/Temporal": ("Align your Latents: High-Resolution Video Synthesis with Latent Diffusion Models "
                              "(Video LDM); Stable Video Diffusion", "2304.08818, 2311.15127", "temporal"),
}


# Inputs whose choices are the user's own files or folders (models/..., input/...): the page says
# where they come from instead of listing what one server happens to hold.
USER_FILES = {"motion_module": "models/animatediff_models", "temporal_layers": "models/temporal_layers",
              "model_folder": "models/vlm", "folder": "a folder in ComfyUI's input directory",
              "weights": "models/open_clip or models/clip_vision", "store": "models/retrieval_stores",
              "checkpoint": "models/checkpoints", "base": "models/checkpoints", "soup_name": "models/soups"}


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(spec: dict) -> str:
    if "default" not in spec:
        return ""
    value = spec["default"]
    if isinstance(value, str):
        return f"`{value!r}`" if "\n" not in value else "(multi-line text)"
    return f"`{json.dumps(value)}`"


def _inputs(info: dict) -> list[tuple[str, str, dict, bool]]:
    """(id, type, options, optional) for every input, in the editor's order."""
    rows = []
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            if name not in specs:
                continue
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            type_name = "COMBO" if isinstance(kind, list) else str(kind)
            if isinstance(kind, list):
                options = {**options, "options": kind}
            rows.append((name, type_name, options or {}, section == "optional"))
    return rows


def _example(node_id: str, workflows: dict[str, dict]) -> tuple[str, dict] | None:
    """The first shipped workflow (by name) that uses the node, and the node's entry in it."""
    for name in sorted(workflows):
        for entry in workflows[name].values():
            if entry.get("class_type") == node_id:
                return name, entry
    return None


def render(node_id: str, info: dict, workflows: dict[str, dict]) -> str:
    """The Markdown help page of one node from its /object_info entry."""
    title = info.get("display_name") or node_id
    category = info.get("category", "")
    lines = [f"# {title}", "", _cell(info.get("description") or ""), "",
             f"Node id `{node_id}`, category **{category}**.", "", "## Inputs", ""]
    rows = _inputs(info)
    if rows:
        lines += ["| input | type | default | what it is |", "| --- | --- | --- | --- |"]
        for name, kind, options, optional in rows:
            label = options.get("display_name") or name
            shown = f"**{label}**" + (f" (id `{name}`)" if label != name else "") + (" *optional*" if optional else "")
            if kind == "COMBO" and name in USER_FILES:
                kind += f": a choice from {USER_FILES[name]}"
                options = {k: v for k, v in options.items() if k != "default"}
            elif "options" in options and isinstance(options["options"], list):
                kind += ": " + ", ".join(f"`{o}`" for o in options["options"][:8]) + (
                    " ..." if len(options["options"]) > 8 else "")
            rng = f" ({options['min']:g} to {options['max']:g})" if isinstance(options.get("min"), int | float) \
                and isinstance(options.get("max"), int | float) else ""
            lines.append(f"| {shown} | {_cell(kind)}{rng} | {_default(options)} | {_cell(options.get('tooltip', ''))} |")
    else:
        lines.append("None.")
    lines += ["", "## Outputs", ""]
    names = info.get("output_name") or info.get("output") or []
    if names:
        lines += ["| output | type | what it is |", "| --- | --- | --- |"]
        tips = info.get("output_tooltips") or [None] * len(names)
        for name, kind, tip in zip(names, info.get("output") or [], tips, strict=False):
            lines.append(f"| **{_cell(name)}** | {_cell(kind)} | {_cell(tip or '')} |")
    else:
        lines.append("None: the node shows its result in the editor.")
    lines += ["", "## Example", ""]
    found = _example(node_id, workflows)
    if found:
        name, entry = found
        lines += [f"From the shipped workflow `{name}` (`workflows/{name}.json` in the editor, "
                  f"`workflows/api/{name}.json` headless). Inputs shown as `[node, output]` come from other nodes:",
                  "", "```json", json.dumps({"class_type": node_id, "inputs": entry.get("inputs", {})}, indent=2),
                  "```"]
    else:
        lines.append("Not used by a shipped workflow yet; connect it as the table above says.")
    paper = PAPERS.get(category)
    lines += ["", "## Paper", ""]
    if paper:
        title_, arxiv, guide = paper
        links = ", ".join(f"[arXiv {a}](https://arxiv.org/abs/{a})" for a in arxiv.split(", "))
        lines.append(f"{title_} ({links}). How the pack implements and validates it: `docs/{guide}.md` in the pack.")
    else:
        lines.append("See the pack's README.")
    return "\n".join(lines) + "\n"


def load_workflows(folder: Path = WORKFLOWS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def render_all(object_info: dict) -> dict[str, str]:
    """Every Compartments node's page, keyed by file name (``<NodeId>.md``)."""
    workflows = load_workflows()
    return {f"{nid}.md": render(nid, info, workflows) for nid, info in sorted(object_info.items())
            if nid.startswith("Compartments")}


def node_defs(object_info: dict) -> dict:
    """``nodeDefs.json`` for every Compartments node: display name, description, input labels and
    tooltips, output names, in the frontend's i18n layout."""
    out = {}
    for node_id, info in sorted(object_info.items()):
        if not node_id.startswith("Compartments"):
            continue
        inputs = {}
        for name, _kind, options, _optional in _inputs(info):
            entry = {"name": options.get("display_name") or name}
            if options.get("tooltip"):
                entry["tooltip"] = options["tooltip"]
            inputs[name] = entry
        outputs = {str(i): {"name": n} for i, n in enumerate(info.get("output_name") or [])}
        out[node_id] = {"display_name": info.get("display_name") or node_id,
                        "description": info.get("description") or "", "inputs": inputs, "outputs": outputs}
    return out


def render_locale(object_info: dict) -> str:
    return json.dumps(node_defs(object_info), indent=2, ensure_ascii=False) + "\n"


def _cmd(args: argparse.Namespace) -> int:
    info = json.loads(Path(args.object_info).read_text()) if args.object_info else ComfyClient(args.url).object_info()
    pages = render_all(info)
    out = Path(args.out_dir) if args.out_dir else DOCS
    for name, text in pages.items():
        write_text(out / name, text)
    locale = (out.parent.parent / "locales" / "en" / "nodeDefs.json") if args.out_dir else LOCALE
    write_text(locale, render_locale(info))
    print(f"wrote {len(pages)} help pages to {out} and the editor's strings to {locale}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node-docs", help="write web/docs/<NodeId>.md (the editor's help page of every node) "
                       "and locales/en/nodeDefs.json (its labels and tooltips)")
    p.add_argument("--url", default="http://127.0.0.1:8188", help="server to read /object_info from")
    p.add_argument("--object-info", help="a saved /object_info JSON instead of --url")
    p.add_argument("--out-dir", help="default: the pack's web/docs/")
    p.set_defaults(func=_cmd)

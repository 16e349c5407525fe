"""Turn an API-format workflow into the editor's (UI, litegraph) format.

The API format is what runs headless; the UI format is what people open in the editor.
The shipped UI files are generated from the API ones with the server's ``/object_info``
(which says which inputs are widgets and in what order), so the two never drift apart.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _spec_type(spec: list) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


AUTOGROW = "COMFY_AUTOGROW_V3"


def _ordered_inputs(info: dict, present: dict | None = None) -> list[tuple[str, list]]:
    """The node's inputs in the editor's order; an Autogrow input becomes the slots it shows."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items() if k != "hidden"}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is not None and spec[0] == AUTOGROW:
                out += _autogrow_slots(name, spec, present or {})
            elif spec is not None:
                out.append((name, spec))
    return out


def _autogrow_slots(name: str, spec: list, present: dict) -> list[tuple[str, list]]:
    """Slots ``name.<prefix><i>`` (or ``name.<names[i]>``) as the editor lays them out: the first
    ``min``, every one the workflow connects, and one empty slot after the last connected one."""
    template = spec[1]["template"]
    slot_spec = next(v for sec in template["input"].values() for v in sec.values())
    names = template.get("names") or [f"{template['prefix']}{i}" for i in range(template.get("max", 10))]
    full = [f"{name}.{n}" for n in names]
    used = [i for i, n in enumerate(full) if n in present]
    shown = max([template.get("min", 1)] + [i + 2 for i in used])
    return [(n, slot_spec) for n in full[:shown]]


def _default(spec: list) -> Any:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if opts.get("options"):
        return opts["options"][0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(_spec_type(spec))


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str, seen: frozenset = frozenset()) -> int:
        if nid in depth:
            return depth[nid]
        ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and str(v[0]) in api]
        d = 0 if not ups else 1 + max(visit(str(u), seen | {nid}) for u in ups if str(u) not in seen)
        depth[nid] = d
        return d

    for nid in api:
        visit(nid)
    return depth


def _height(info: dict) -> int:
    """Roughly the height the editor gives the node, so that columns do not overlap."""
    slots, widgets = 0, 0
    for _name, spec in _ordered_inputs(info):
        typ = _spec_type(spec)
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if typ not in WIDGET_TYPES:
            slots += 1
        elif typ == "STRING" and opts.get("multiline"):
            widgets += 5
        else:
            widgets += 1 + bool(opts.get("control_after_generate"))
    return 36 + 22 * max(slots, len(info.get("output", []))) + 26 * widgets


def api_to_ui(api: dict, object_info: dict) -> dict:
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if missing:
        raise ValueError(f"node types unknown to this server: {missing}")
    depth = _depths(api)
    order = sorted(api, key=lambda n: (depth[n], int(n) if n.isdigit() else n))
    nodes: dict[str, dict] = {}
    links: list[list] = []
    next_y: dict[int, int] = {}
    for i, nid in enumerate(order):
        node = api[nid]
        info = object_info[node["class_type"]]
        col = depth[nid]
        height = _height(info)
        y = next_y.get(col, 40)
        next_y[col] = y + height + 60
        outputs = [
            {"name": name, "type": typ, "links": [], "slot_index": s}
            for s, (typ, name) in enumerate(zip(info.get("output", []), info.get("output_name", []) or info.get("output", []), strict=False))
        ]
        nodes[nid] = {
            "id": int(nid), "type": node["class_type"], "pos": [40 + 380 * col, y],
            "size": [340, height],
            "flags": {}, "order": i, "mode": 0, "inputs": [], "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": [],
        }
        if node.get("_meta", {}).get("title"):
            nodes[nid]["title"] = node["_meta"]["title"]
    for nid in order:
        node, ui = api[nid], nodes[nid]
        for name, spec in _ordered_inputs(object_info[node["class_type"]], node["inputs"]):
            typ = _spec_type(spec)
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes
            is_widget = typ in WIDGET_TYPES
            if linked:
                src, slot = str(value[0]), int(value[1])
                link_id = len(links) + 1
                out_type = nodes[src]["outputs"][slot]["type"] if slot < len(nodes[src]["outputs"]) else typ
                links.append([link_id, int(src), slot, int(nid), len(ui["inputs"]), out_type])
                nodes[src]["outputs"][slot]["links"].append(link_id)
                entry = {"name": name, "type": "COMBO" if typ == "COMBO" else typ, "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                ui["inputs"].append(entry)
            elif not is_widget:
                ui["inputs"].append({"name": name, "type": typ, "link": None})
            if is_widget:
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                ui["widgets_values"].append(_default(spec) if linked or value is None else value)
                if opts.get("control_after_generate"):
                    ui["widgets_values"].append("fixed")
                if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                    ui["widgets_values"].append("image")
    return {
        "last_node_id": max((int(n) for n in nodes), default=0),
        "last_link_id": len(links),
        "nodes": [nodes[n] for n in order],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "compartments": "generated from workflows/api"},
        "version": 0.4,
    }


def ui_to_api_links(ui: dict) -> set[tuple[int, int, int, str]]:
    """(source node, source slot, target node, target input name) for every link of a UI workflow."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    out = set()
    for link_id, src, slot, dst, dst_slot, _typ in ui["links"]:
        name = by_id[dst]["inputs"][dst_slot]["name"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        out.add((src, slot, dst, name))
    return out

"""ComfyUI's two graph formats, without the browser.

- UI format: what the frontend saves and loads (nodes with positions, sockets,
  `widgets_values` in widget order, and a `links` table). The shipped
  `example_workflows/*.json` are in this format.
- API format: what POST /prompt takes ({node id: {"class_type", "inputs"}}).

`ui_to_api` does what the frontend's graphToPrompt does for plain graphs (no
groups, subgraphs or reroutes): widget values are matched to input names in the
order of the node's definition (object_info), skipping the extra
"control_after_generate" value a seed widget carries. `build_ui_workflow` writes
UI-format JSON from a short description, with widget values ordered the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _spec_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of a node's inputs in definition order."""
    out = []
    for group, optional in (("required", False), ("optional", True)):
        for name, spec in info["input"].get(group, {}).items():
            out.append((name, spec, optional))
    return out


def is_widget(spec) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' widget value after these INTs."""
    options = (spec[1] if len(spec) > 1 else {}) or {}
    if spec[0] != "INT":
        return False
    control = options.get("control_after_generate")
    return bool(control) if control is not None else name in ("seed", "noise_seed")


def widget_default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (muted/bypassed nodes dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, _ in _spec_inputs(info):
            if is_widget(spec):
                value = values.pop(0) if values else widget_default(spec)
                if has_control_widget(name, spec) and values:
                    values.pop(0)
                inputs[name] = value
            if name in linked:
                _, origin, slot, *_ = linked[name]
                inputs[name] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


@dataclass
class Node:
    """One node of a workflow description: `inputs` maps names to widget values or to
    (node key, output slot) links."""
    key: str
    type: str
    inputs: dict = field(default_factory=dict)
    col: int = 0
    title: str | None = None


# Room below the widgets for what the frontend draws there: the pack's loss chart and A/B
# widget, and image previews. Without it a node grows over the node below after a run.
EXTRA_HEIGHT = {"Dev2ProTrainLoRA": 280, "Dev2ProCompareGrid": 360, "Dev2ProLossChart": 300,
                "SaveImage": 300, "PreviewImage": 300}


def build_ui_workflow(nodes: list[Node], object_info: dict, *, column_width: int = 420,
                      gap: int = 40) -> dict:
    """A UI-format workflow the frontend opens: positions by column, sockets, links and
    widget values in definition order (defaults for widgets not given)."""
    ids = {n.key: i + 1 for i, n in enumerate(nodes)}
    link_rows, out_links = [], {}
    ui_nodes, heights = [], {}
    for order, n in enumerate(nodes):
        info = object_info[n.type]
        unknown = set(n.inputs) - {name for name, _, _ in _spec_inputs(info)}
        if unknown:
            raise KeyError(f"{n.type} has no inputs {sorted(unknown)}")
        sockets, widgets = [], []
        for name, spec, optional in _spec_inputs(info):
            given = n.inputs.get(name)
            if is_widget(spec):
                if isinstance(given, tuple):
                    raise ValueError(f"{n.key}.{name} is a widget; linking widgets is not supported here")
                widgets.append(widget_default(spec) if given is None else given)
                if has_control_widget(name, spec):
                    widgets.append("fixed")
                continue
            kind = spec[0]
            link_id = None
            if given is not None:
                source, slot = given
                link_id = len(link_rows) + 1
                link_rows.append([link_id, ids[source], slot, ids[n.key], len(sockets), kind])
                out_links.setdefault((source, slot), []).append(link_id)
            elif not optional:
                raise ValueError(f"{n.key}.{name} ({kind}) is required but not linked")
            sockets.append({"name": name, "type": kind, "link": link_id})
        height = 60 + 26 * (len(sockets) + len(widgets)) + EXTRA_HEIGHT.get(n.type, 0)
        y = sum(heights.get(m.key, 0) + gap for m in nodes[:order] if m.col == n.col)
        heights[n.key] = height
        ui_node = {"id": ids[n.key], "type": n.type, "pos": [40 + n.col * column_width, 40 + y],
                   "size": [column_width - 60, height], "flags": {}, "order": order, "mode": 0,
                   "inputs": sockets, "outputs": [], "properties": {"Node name for S&R": n.type},
                   "widgets_values": widgets}
        if n.title:
            ui_node["title"] = n.title
        ui_nodes.append(ui_node)
    for n, ui_node in zip(nodes, ui_nodes):
        info = object_info[n.type]
        ui_node["outputs"] = [
            {"name": (info.get("output_name") or info["output"])[slot], "type": kind,
             "slot_index": slot, "links": out_links.get((n.key, slot), [])}
            for slot, kind in enumerate(info["output"])]
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "dev2pro/" + "/".join(n.key for n in nodes))),
            "revision": 0, "last_node_id": len(nodes), "last_link_id": len(link_rows),
            "nodes": ui_nodes, "links": link_rows, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

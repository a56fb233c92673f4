#!/usr/bin/env python3
"""Make the UI-format workflows in example_workflows/ from their API-format twins in example_workflows/api/.

    python scripts/api_to_ui_workflow.py --object-info http://127.0.0.1:8188  (or a saved object_info.json)

The API twin is the single source: node ids, inputs and links come from it; the node schemas from ComfyUI's
/object_info give the slot order and which inputs are widgets (and in what order their values go). Nodes are laid
out left to right by depth. An optional ``_note`` entry at the top of the API file becomes a Note node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COL_W, GAP_X = 360, 60
# The frontend draws a node's title (30 units) above its pos, and its source badge ("model_merger") above the
# title: a stacked node needs this much room above it, or its badge covers the node above.
GAP_Y = 80
TOP = 80
# At the stored zoom (0.8) a 1600 px window shows about 1900 units of canvas beside the sidebar: wider graphs have
# their last columns folded under the column before them, so nothing is off-screen and the thumbnail is readable.
MAX_RIGHT = 1860
SCALE = 0.8

NOTES = {
    "merge_to_graph_and_preview.json": (
        "Merge into the graph, then render an image to check the result.\n\n"
        "1. Pick the checkpoints in the Add Model To Manifest nodes (chain more of them for more models; "
        "weights are relative).\n2. Queue. Weighted Merge streams the merge key by key and hands the merged "
        "model to KSampler without writing a file.\n3. Happy with it? Set output_mode to 'disk' or 'both' to save "
        "it under output/checkpoints."
    ),
    "cross_merge_to_graph_and_preview.json": (
        "Cross-lineage merge: base + scale * combine(model - base) for each model, then render to check it.\n\n"
        "Pick the common base (or leave '(automatic)' and put base models in models/merge_bases: the node picks "
        "the one the models descend from and says why). Text encoder and VAE: by difference, from the base, or "
        "from one model (model:1 = the first Add Model)."
    ),
    "scan_and_merge_to_disk.json": (
        "Merge every checkpoint in a folder, with equal weights, to a file.\n\n"
        "Put the models to merge into models/checkpoints/to_merge (or change 'folder' and 'pattern'). "
        "The merged file is written to output/checkpoints/merged_00001_.safetensors, where the checkpoint "
        "loaders find it."
    ),
    "merge_rows_to_disk.json": (
        "One node, one row per model: Merge Models lists checkpoints with a weight and an on/off switch each; "
        "'+ Add model' adds a row, the switch leaves a row out without losing it. Weights are relative. "
        "The merged file goes to output/checkpoints/rows_merged_00001_.safetensors."
    ),
    "build_manifest_and_merge.json": (
        "Build a manifest in the graph: one Add Model To Manifest per checkpoint, chained, each with its weight "
        "(weight 0 removes a model). Save Manifest stores it in models/model_merger for Load Manifest and the "
        "command line; Weighted Merge writes the merged checkpoint to output/checkpoints."
    ),
}


def load_object_info(src: str) -> dict:
    if src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src.rstrip("/") + "/object_info", timeout=60) as r:
            return json.load(r)
    with open(src, encoding="utf-8") as f:
        return json.load(f)


def is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in WIDGET_TYPES


def control_widgets(name: str, spec) -> int:
    """How many widgets the frontend (1.27) adds after this input's own: a "control after generate" combo after an
    INT whose spec has ``control_after_generate`` or, when the spec does not say, that is named ``seed`` or
    ``noise_seed``; a combo with ``control_after_generate`` also gets a filter text widget."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = opts.get("control_after_generate")
    if spec[0] == "INT":
        if control is None:
            control = name in ("seed", "noise_seed")
        return 1 if control else 0
    if isinstance(spec[0], list) and control:
        return 2
    return 0


def ordered_inputs(info: dict):
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name]


def convert(api: dict, object_info: dict, note: str | None = None) -> dict:
    nodes_api = {k: v for k, v in api.items() if not k.startswith("_")}
    # depth = longest chain of links leading to the node
    depth: dict = {}

    def d(nid):
        # column: one right of the furthest upstream node; a chain of nodes of one class (Add Model To Manifest)
        # is stacked in one column instead
        if nid not in depth:
            depth[nid] = 0
            ups = [str(v[0]) for v in nodes_api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            chained = len(ups) == 1 and nodes_api[ups[0]]["class_type"] == nodes_api[nid]["class_type"]
            depth[nid] = d(ups[0]) if chained else 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in nodes_api:
        d(nid)
    links, nodes = [], []
    link_id = 0
    out_links: dict = {}  # (node, slot) -> [link ids]
    ui_inputs: dict = {}
    sizes: dict = {}
    for nid, node in nodes_api.items():
        info = object_info[node["class_type"]]
        inputs, widgets, n_widgets, multiline = [], [], 0, 0
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            if is_widget(spec):
                if isinstance(value, list):
                    raise SystemExit(f"node {nid}: widget input {name} is linked; not supported here")
                if value is None:
                    opts = spec[1] if len(spec) > 1 else {}
                    value = opts.get("default", spec[0][0] if isinstance(spec[0], list) else None)
                widgets.append(value)
                n_widgets += 1
                if len(spec) > 1 and spec[1].get("multiline"):
                    multiline += 1
                extra = control_widgets(name, spec)
                if extra:
                    widgets.append("fixed")  # templates never change a seed by themselves
                if extra > 1:
                    widgets.append("")
            else:
                typ = spec[0]
                inputs.append({"name": name, "type": typ, "link": None, "_src": value})
        ui_inputs[nid] = inputs
        n_out = len(info["output"])
        if node["class_type"] == "ModelMergerMergeModels":  # web/js/rows.js: 4 widgets a row, the add button
            try:
                n_widgets += 4 * len(json.loads(node["inputs"].get("models") or "[]")) + 1 - 1  # models is hidden
            except ValueError:
                pass
        h = 46 + 22 * max(len(inputs), n_out) + 26 * n_widgets + 90 * multiline
        w = 340
        if node["class_type"] == "PreviewAny":
            w, h = 420, 300
        elif node["class_type"] in ("SaveImage", "PreviewImage"):
            w, h = 400, 440
        sizes[nid] = [w, h]
        node["_widgets"] = widgets
    for nid, inputs in ui_inputs.items():
        for slot, inp in enumerate(inputs):
            src = inp.pop("_src")
            if isinstance(src, list) and len(src) == 2:
                link_id += 1
                up, up_slot = str(src[0]), int(src[1])
                typ = object_info[nodes_api[up]["class_type"]]["output"][up_slot]
                links.append([link_id, int(up), up_slot, int(nid), slot, typ])
                inp["link"] = link_id
                if inp["type"] == "*":
                    inp["type"] = typ
                out_links.setdefault((up, up_slot), []).append(link_id)
    columns: dict = {}
    order = sorted(nodes_api, key=lambda n: (depth[n], int(n)))
    column = dict(depth)

    def layout_columns():
        col_w: dict = {}
        for nid in nodes_api:
            col_w[column[nid]] = max(col_w.get(column[nid], 0), sizes[nid][0])
        col_x, x = {}, 60
        for c in sorted(col_w):
            col_x[c] = x
            x += col_w[c] + GAP_X
        return col_x, x - GAP_X

    col_x, right = layout_columns()
    while right > MAX_RIGHT and len(col_x) > 1:  # fold the last column under the one before it
        last = max(col_x)
        prev = max(c for c in col_x if c < last)
        for nid in nodes_api:
            if column[nid] == last:
                column[nid] = prev
        col_x, right = layout_columns()
    for i, nid in enumerate(order):
        node = nodes_api[nid]
        info = object_info[node["class_type"]]
        col = column[nid]
        y = columns.get(col, TOP)
        columns[col] = y + sizes[nid][1] + GAP_Y
        outputs = []
        for slot, (typ, name) in enumerate(zip(info["output"], info["output_name"])):
            outputs.append({"name": name, "type": typ, "links": out_links.get((nid, slot), []), "slot_index": slot})
        entry = {
            "id": int(nid),
            "type": node["class_type"],
            "pos": [col_x[col], y],
            "size": sizes[nid],
            "flags": {},
            "order": i,
            "mode": 0,
            "inputs": ui_inputs[nid],
            "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": node.pop("_widgets"),
        }
        title = (node.get("_meta") or {}).get("title")
        if title and title != info.get("display_name"):
            entry["title"] = title
        nodes.append(entry)
    last_id = max(int(n) for n in nodes_api)
    if note:
        last_id += 1
        nodes.append({
            "id": last_id, "type": "Note", "pos": [60, max(columns.get(0, TOP), TOP)], "size": [340, 220],
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653",
        })
    return {
        "last_node_id": last_id,
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": SCALE, "offset": [0, 0]}},
        "version": 0.4,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--object-info", required=True, help="ComfyUI address or a saved /object_info JSON file")
    p.add_argument("--folder", default=os.path.join(HERE, "example_workflows"))
    args = p.parse_args(argv)
    info = load_object_info(args.object_info)
    api_dir = os.path.join(args.folder, "api")
    for name in sorted(os.listdir(api_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(api_dir, name), encoding="utf-8") as f:
            api = json.load(f)
        ui = convert(api, info, note=NOTES.get(name))
        out = os.path.join(args.folder, name)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(ui, f, indent=1)
            f.write("\n")
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The example workflows: every UI workflow has an API twin describing the same graph (CI, no ComfyUI needed)."""

from __future__ import annotations

import glob
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
API_FILES = sorted(glob.glob(os.path.join(ROOT, "api", "*.json")))


def test_every_ui_workflow_has_an_api_twin_and_a_thumbnail():
    ui = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.json")))
    api = [os.path.basename(p) for p in API_FILES]
    assert ui == api and len(api) >= 4
    for name in api:
        assert os.path.exists(os.path.join(ROOT, name[:-5] + ".jpg")), f"no template thumbnail for {name}"


@pytest.mark.parametrize("path", API_FILES, ids=os.path.basename)
def test_ui_and_api_describe_the_same_graph(path):
    with open(path) as f:
        api = json.load(f)
    with open(os.path.join(ROOT, os.path.basename(path))) as f:
        ui = json.load(f)
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert {k: v["class_type"] for k, v in api.items()} == {k: v["type"] for k, v in nodes.items()}
    links = {l[0]: l for l in ui["links"]}
    expected = set()
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                expected.add((value[0], value[1], nid, name))
            else:  # a widget value: it is in the node's widgets_values
                assert value in nodes[nid]["widgets_values"], (nid, name, value)
    got = set()
    for nid, node in nodes.items():
        for inp in node["inputs"]:
            if inp["link"] is not None:
                l = links[inp["link"]]
                assert str(l[3]) == nid and node["inputs"][l[4]] is inp
                got.add((str(l[1]), l[2], nid, inp["name"]))
                src_out = nodes[str(l[1])]["outputs"][l[2]]
                assert inp["link"] in src_out["links"] and src_out["type"] == l[5]
    assert got == expected
    assert ui["last_link_id"] == max(links, default=0)
    assert ui["last_node_id"] >= max(int(k) for k in api)
    # api twins are valid /prompt bodies: only {id: {class_type, inputs}}
    assert all(set(v) <= {"class_type", "inputs", "_meta"} for v in api.values())


def _generator():
    import importlib.util

    path = os.path.join(os.path.dirname(ROOT), "scripts", "api_to_ui_workflow.py")
    spec = importlib.util.spec_from_file_location("api_to_ui_workflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_follows_the_frontends_seed_rule():
    """The frontend adds a control widget after an INT named seed even when the spec does not ask for one."""
    gen = _generator()
    info = {"N": {"input": {"required": {"seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 3}],
                                         "other": ["INT", {"default": 1, "control_after_generate": True}],
                                         "noise_seed": ["INT", {"default": 0, "control_after_generate": False}]}},
                  "output": [], "output_name": []}}
    ui = gen.convert({"1": {"class_type": "N", "inputs": {"seed": 5, "steps": 2, "other": 1, "noise_seed": 0}}}, info)
    assert ui["nodes"][0]["widgets_values"] == [5, "fixed", 2, 1, "fixed", 0]


TITLE_AND_BADGE = 30 + 24  # the frontend draws the title above a node's pos, and the source badge above the title


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "*.json"))), ids=os.path.basename)
def test_layout_fits_a_1600_px_window_and_nothing_overlaps(path):
    with open(path) as f:
        ui = json.load(f)
    ds = ui["extra"]["ds"]
    canvas_w = 1600 - 64  # the sidebar
    boxes = []
    for n in ui["nodes"]:
        x, y = n["pos"]
        w, h = n["size"]
        boxes.append((n["id"], x, y - TITLE_AND_BADGE, x + w, y + h))
        assert (x + w + ds["offset"][0]) * ds["scale"] <= canvas_w, f"node {n['id']} ({n['type']}) is off-screen"
        assert (y - TITLE_AND_BADGE + ds["offset"][1]) >= 0, f"node {n['id']}'s badge is above the view"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
            assert apart, f"nodes {a[0]} and {b[0]} overlap (title and badge included)"
    # a readable thumbnail: the graph is not a strip
    x0 = min(b[1] for b in boxes); x1 = max(b[3] for b in boxes)
    y0 = min(b[2] for b in boxes); y1 = max(b[4] for b in boxes)
    assert (x1 - x0) / (y1 - y0) <= 2.2, f"the graph is {x1 - x0} x {y1 - y0}: a strip"

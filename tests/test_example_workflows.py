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

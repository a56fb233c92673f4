"""Every UI template's ``widgets_values`` against the nodes' declared inputs, the way ComfyUI's frontend places them.

No ComfyUI needed: this pack's nodes come from their ``INPUT_TYPES()`` (loaded against the stand-in host), the core
nodes from ``support/core_object_info.json`` (a saved /object_info of ComfyUI 0.3.64, checked against the real
server in test_comfyui_host.py). The frontend (1.27) makes one widget per widget input, in input order, and adds a
"control after generate" widget (values fixed/increment/decrement/randomize) after an INT input whose spec has
``control_after_generate``, or that is named ``seed`` or ``noise_seed`` when the spec does not say; a combo with
``control_after_generate`` also gets a filter text widget. A template that stores one value too few or too many
shifts every later value onto the wrong widget: this test names the node and the widget.
"""

from __future__ import annotations

import glob
import json
import math
import os

import pytest

import comfy_stub

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "*.json")))
CORE_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "core_object_info.json")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
PLACEHOLDERS = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors", "model_d.safetensors"]


def frontend_slots(inputs: dict, order: dict):
    """The frontend's widget slots for a node: (input name or control slot, spec) in widgets_values order."""
    slots = []
    for section in ("required", "optional"):
        for name in order.get(section, list(inputs.get(section, {}))):
            spec = inputs[section][name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            kind = "COMBO" if isinstance(typ, list) else typ
            if kind not in WIDGET_TYPES:
                continue
            slots.append((name, kind, typ, opts))
            control = opts.get("control_after_generate")
            if kind == "INT":
                if control is None:
                    control = name in ("seed", "noise_seed")
                if control:
                    slots.append((f"{name}:control_after_generate", "CONTROL", None, {}))
            elif kind == "COMBO" and control:
                slots.append((f"{name}:control_after_generate", "CONTROL", None, {}))
                slots.append((f"{name}:control_filter_list", "STRING", "STRING", {}))
    return slots


def check_value(where: str, kind: str, typ, opts: dict, value):
    if kind == "CONTROL":
        assert value in CONTROL_VALUES, f"{where}: {value!r} is not a control-after-generate value"
    elif kind == "COMBO":
        assert value in typ, f"{where}: {value!r} is not one of the choices ({', '.join(map(str, typ[:8]))} ...)"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    if kind in ("INT", "FLOAT"):
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), f"{where}: {value!r} is out of range"


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    """Node schemas like /object_info's: this pack's (with the placeholder checkpoints present) and the core ones."""
    base = str(tmp_path_factory.mktemp("comfy"))
    ck = os.path.join(base, "models", "checkpoints")
    os.makedirs(os.path.join(ck, "to_merge"), exist_ok=True)
    for name in PLACEHOLDERS:
        for folder in (ck, os.path.join(ck, "to_merge")):
            open(os.path.join(folder, name), "wb").close()
    _host, pack = comfy_stub.install(base)
    try:
        info = {}
        for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
            types = cls.INPUT_TYPES()
            info[node_id] = {"input": types, "input_order": {s: list(types.get(s, {})) for s in ("required", "optional")}}
    finally:
        comfy_stub.uninstall()
    with open(CORE_INFO, encoding="utf-8") as f:
        core = json.load(f)
    for node_id, entry in core.items():
        if not node_id.startswith("_"):
            info.setdefault(node_id, entry)
    return info


def test_frontend_rule_itself():
    """The rule this file applies: a seed gets a control widget unless its spec says otherwise."""
    seed = {"required": {"seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 1}]}}
    assert [s[0] for s in frontend_slots(seed, {})] == ["seed", "seed:control_after_generate", "steps"]
    off = {"required": {"seed": ["INT", {"default": 0, "control_after_generate": False}]}}
    assert [s[0] for s in frontend_slots(off, {})] == ["seed"]
    other = {"required": {"n": ["INT", {"control_after_generate": True}], "m": ["MODEL", {}]}}
    assert [s[0] for s in frontend_slots(other, {})] == ["n", "n:control_after_generate"]


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_every_widget_value_lands_on_its_widget(path, schemas):
    with open(path, encoding="utf-8") as f:
        ui = json.load(f)
    with open(os.path.join(ROOT, "api", os.path.basename(path)), encoding="utf-8") as f:
        api = json.load(f)
    for node in ui["nodes"]:
        if node["type"] == "Note":
            continue
        assert node["type"] in schemas, f"{os.path.basename(path)}: node {node['id']}: unknown type {node['type']}"
        info = schemas[node["type"]]
        slots = frontend_slots(info["input"], info.get("input_order") or {})
        values = node.get("widgets_values") or []
        names = [s[0] for s in slots]
        assert len(values) == len(slots), (
            f"{os.path.basename(path)}: node {node['id']} ({node['type']}) stores {len(values)} widget values, the "
            f"frontend makes {len(slots)} widgets: {names}"
        )
        twin = api[str(node["id"])]["inputs"]
        for (name, kind, typ, opts), value in zip(slots, values):
            where = f"{os.path.basename(path)}: node {node['id']} ({node['type']}) widget {name}"
            check_value(where, kind, typ, opts, value)
            if name in twin and not isinstance(twin[name], list):
                assert value == twin[name], f"{where}: UI {value!r}, API twin {twin[name]!r}"
        for name, value in twin.items():  # every literal of the API twin has its widget
            if not isinstance(value, list):
                assert name in names, f"{os.path.basename(path)}: node {node['id']}: API input {name} has no widget"


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_seed_controls_are_fixed(path):
    """A template's seeds do not change after each run (a changed seed re-merges and re-renders)."""
    with open(path, encoding="utf-8") as f:
        ui = json.load(f)
    for node in ui["nodes"]:
        vals = node.get("widgets_values") or []
        for v in vals:
            assert v != "randomize", f"{os.path.basename(path)}: node {node['id']} has a randomizing control"

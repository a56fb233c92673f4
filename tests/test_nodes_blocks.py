"""The block-weight editor's data: Train Difference's alpha_blocks and Cross-Arch Merge's scale_blocks carry, in
their input spec (it reaches /object_info), the block names per architecture and the presets' values from the data
files; the text the browser writes from them (web/js/logic/blocks.mjs) is what the CLI's parser reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import comfy_stub

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "merger_core", "data")
NODES = {"ModelMergerTrainDifference": "alpha_blocks", "ModelMergerCrossArchMerge": "scale_blocks"}


@pytest.fixture
def pack(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "mmhome"))
    _host, pack = comfy_stub.install(str(tmp_path / "comfy"))
    yield pack
    comfy_stub.uninstall()


def load(*parts):
    with open(os.path.join(DATA, *parts), encoding="utf-8") as f:
        return json.load(f)


def spec_of(pack, node, inp):
    req = pack.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]
    kind, opts = req[inp]
    assert kind == "STRING" and opts["default"] == ""  # still the text the CLI reads; nothing else is stored
    json.dumps(opts)  # /object_info sends it as JSON
    return opts["model_merger_blocks"]


@pytest.mark.parametrize("node, inp", NODES.items())
def test_spec_carries_block_names_and_presets_from_the_data_files(pack, node, inp):
    spec = spec_of(pack, node, inp)
    archs = {a["id"]: a for a in spec["archs"]}
    assert [a["label"] for a in spec["archs"]] == ["SD1.5", "SDXL"]
    assert archs["sd1"]["blocks"] == load("architectures", "sd1.json")["blocks"]
    assert archs["sdxl_base"]["blocks"] == load("architectures", "sdxl_base.json")["blocks"]
    assert len(archs["sd1"]["blocks"]) == 26 and len(archs["sdxl_base"]["blocks"]) == 21
    assert spec["default_arch"] in archs
    presets = {k: v for k, v in load("block_presets.json").items() if not k.startswith("_")}
    assert set(spec["presets"]) == set(presets)
    for name, p in spec["presets"].items():
        assert p["doc"] == presets[name]["doc"]
        for arch_id, a in archs.items():
            assert len(p["values"][arch_id]) == len(a["blocks"])


def test_preset_values_are_the_engines_and_their_text_parses(pack):
    parse = pack.merger_core.merge.blockweights.parse_blocks
    spec = spec_of(pack, "ModelMergerTrainDifference", "alpha_blocks")
    for a in spec["archs"]:
        for name, p in spec["presets"].items():
            table = parse(name, a["id"])  # the preset dropdown writes the name
            assert [table[b] for b in a["blocks"]] == p["values"][a["id"]]
            # one value per block, as a moved slider writes it, gives the same table
            listed = parse(",".join(repr(v) for v in p["values"][a["id"]]), a["id"])
            assert listed == table
    grad = spec["presets"]["GRAD_V"]["values"]["sd1"]
    assert grad[0] == 0.0 and grad[1] == 0.0 and grad[-1] == 1.0  # BASE 0, IN00 0 ... OUT11 1


JS = r"""
import * as bl from "./web/js/logic/blocks.mjs";
const spec = JSON.parse(process.argv[2]);
const out = [];
for (const a of spec.archs) {
  const names = Object.keys(spec.presets);
  out.push([a.id, bl.presetText(names[0], spec.presets)]);
  out.push([a.id, bl.presetText(bl.NONE, spec.presets)]);
  let t = bl.setBlock("", a, spec.presets, a.blocks[3], 0.35);
  out.push([a.id, t]);
  t = bl.setBlock(t, a, spec.presets, "OUT00", -0.5);
  out.push([a.id, t]);
  for (const name of names) out.push([a.id, bl.setBlock(name, a, spec.presets, "M00", 0.9)]);
  out.push([a.id, bl.setBlock("*=0.5,OUT=1", a, spec.presets, "BASE", 0)]);
  out.push([a.id, bl.setBlock("not=a=spec", a, spec.presets, "IN00", 1, a.blocks.map(() => 0.25))]);
}
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="no node on PATH")
def test_text_the_browser_writes_is_read_by_the_cli_parser(pack, tmp_path):
    parse = pack.merger_core.merge.blockweights.parse_blocks
    spec = spec_of(pack, "ModelMergerCrossArchMerge", "scale_blocks")
    script = os.path.join(ROOT, ".blocks_check.mjs")
    with open(script, "w", encoding="utf-8") as f:
        f.write(JS)
    try:
        got = subprocess.run(["node", script, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(script)
    assert got.returncode == 0, got.stderr
    texts = json.loads(got.stdout)
    assert len(texts) > 10
    blocks = {a["id"]: a["blocks"] for a in spec["archs"]}
    for arch_id, text in texts:
        if text == "":
            continue  # empty: the global value everywhere (the node passes None)
        table = parse(text, arch_id)
        assert set(table) <= set(blocks[arch_id]), text
    for arch_id, a in blocks.items():
        first = [t for aid, t in texts if aid == arch_id]
        assert parse(first[2], arch_id) == {a[3]: 0.35}
        assert parse(first[3], arch_id) == {a[3]: 0.35, "OUT00": -0.5}
        m = parse(first[4], arch_id)
        assert len(m) == len(a) and m["M00"] == 0.9

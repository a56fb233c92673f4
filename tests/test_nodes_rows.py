"""Merge Models (rows): one node with a list of model rows (checkpoint, weight, on/off), against the stand-in host."""

from __future__ import annotations

import json
import os

import pytest



def rows(*items):
    return json.dumps([{"on": on, "ckpt": c, "weight": w} for c, w, on in items])


def node(pack):
    return pack.NODE_CLASS_MAPPINGS["ModelMergerMergeModels"]


def test_rows_node_declares_one_rows_input_and_the_merge_inputs(comfy, ckpts):
    _host, pack = comfy
    req = node(pack).INPUT_TYPES()["required"]
    assert list(req)[:2] == ["models", "normalize"]
    assert req["models"][0] == "STRING" and json.loads(req["models"][1]["default"]) == []
    assert {"device", "dtype", "output_mode", "filename_prefix"} <= set(req)
    assert node(pack).RETURN_TYPES == ("MODEL", "CLIP", "VAE", "STRING", "MANIFEST")


def test_rows_merge_equals_weighted_merge_and_skips_rows_that_are_off(comfy, ckpts):
    host, pack = comfy
    text = rows(("model-0.safetensors", 1.0, True), ("model-1.safetensors", 2.0, True),
                ("model-2.safetensors", 5.0, False))
    model, clip, vae, report, manifest = node(pack)().merge(text, True, "cpu", "fp32", "graph", "x", unique_id="4")
    got = host.loaded_state_dicts[-1]
    assert [os.path.basename(e.path) for e in manifest.models] == ["model-0.safetensors", "model-1.safetensors"]
    assert manifest.weights == [1.0, 2.0]
    add = pack.NODE_CLASS_MAPPINGS["ModelMergerAddModel"]()
    m, _ = add.add("model-0.safetensors", 1.0)
    m, _ = add.add("model-1.safetensors", 2.0, manifest=m)
    pack.NODE_CLASS_MAPPINGS["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp32", "graph", "x")
    ref = host.loaded_state_dicts[-1]
    import torch

    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert "66.7%" in report and host.events[-1][1]["status"] == "done"


@pytest.mark.parametrize("text, problem", [
    ("not json", "not valid JSON"),
    ('{"ckpt": "a"}', "a list of rows"),
    (rows(("model-0.safetensors", -1, True), ("model-1.safetensors", 1, True)), r"row 1 \(model-0.safetensors\): weight"),
    (rows(("nope.safetensors", 1, True), ("model-1.safetensors", 1, True)), r"row 1: checkpoint 'nope.safetensors'"),
    (rows(("model-0.safetensors", 1, True), ("model-1.safetensors", 1, False)), "at least two"),
    ("[]", "at least two"),
])
def test_bad_rows_are_refused_before_running_naming_the_row(comfy, ckpts, text, problem):
    host, pack = comfy
    import re

    msg = node(pack).VALIDATE_INPUTS(models=text, filename_prefix="x")
    assert isinstance(msg, str) and re.search(problem, msg), msg
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match=problem):
        node(pack)().merge(text, True, "cpu", "fp16", "graph", "x")
    assert host.events[-1][1]["status"] == "failed"


def test_rows_is_changed_same_twice_and_follows_the_files(comfy, ckpts):
    _host, pack = comfy
    cls = node(pack)
    text = rows(("model-0.safetensors", 1.0, True), ("model-1.safetensors", 1.0, True))
    a = cls.IS_CHANGED(models=text, normalize=True)
    assert cls.IS_CHANGED(models=text, normalize=True) == a
    st = os.stat(ckpts[1])
    os.utime(ckpts[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cls.IS_CHANGED(models=text, normalize=True) != a

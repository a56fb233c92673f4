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


# LoRA rows (issue 14): {"lora": name, "strength_model", "strength_clip", "on"} beside the model rows


def lora_row(name, sm=1.0, sc=1.0, on=True):
    return {"lora": name, "strength_model": sm, "strength_clip": sc, "on": on}


@pytest.fixture
def lora(comfy, ckpts):
    import kohya_lora

    host, _ = comfy
    path = os.path.join(host.base, "models", "loras", "style.safetensors")
    kohya_lora.write_kohya_lora(path, ckpts[0], seed=5)
    kohya_lora.write_kohya_lora(os.path.join(host.base, "models", "loras", "other.safetensors"), ckpts[0], seed=6)
    return path


def with_loras(model_rows, *loras):
    return json.dumps(json.loads(model_rows) + list(loras))


def test_rows_node_offers_the_loras_to_the_browser(comfy, ckpts, lora):
    _host, pack = comfy
    spec = node(pack).INPUT_TYPES()["required"]["models"][1]
    assert spec["model_merger_loras"] == ["other.safetensors", "style.safetensors"]
    assert "lora" in spec["tooltip"]


def test_lora_rows_are_baked_like_add_lora_to_manifest(comfy, ckpts, lora):
    host, pack = comfy
    text = with_loras(rows(("model-0.safetensors", 1.0, True), ("model-1.safetensors", 2.0, True)),
                      lora_row("style.safetensors", 0.6, -0.3), lora_row("other.safetensors", 5.0, 5.0, on=False),
                      lora_row("other.safetensors", 0.0, 0.0))  # off, and both strengths 0: left out
    model, clip, vae, report, manifest = node(pack)().merge(text, True, "cpu", "fp32", "graph", "x", unique_id="4")
    got = host.loaded_state_dicts[-1]
    assert [(os.path.basename(e.path), e.strength_model, e.strength_clip) for e in manifest.loras] == [
        ("style.safetensors", 0.6, -0.3)]
    assert "with 1 LoRA(s) baked in" in report and "baking 1 LoRA(s)" in report
    add = pack.NODE_CLASS_MAPPINGS["ModelMergerAddModel"]()
    m, _ = add.add("model-0.safetensors", 1.0)
    m, _ = add.add("model-1.safetensors", 2.0, manifest=m)
    m, _ = pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"]().add(m, "style.safetensors", 0.6, -0.3)
    pack.NODE_CLASS_MAPPINGS["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp32", "graph", "x")
    ref = host.loaded_state_dicts[-1]
    import torch

    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    plain = node(pack)().merge(rows(("model-0.safetensors", 1.0, True), ("model-1.safetensors", 2.0, True)),
                               True, "cpu", "fp32", "graph", "x")[4]
    assert plain.loras == [] and not torch.equal(host.loaded_state_dicts[-1][
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
        got["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])


def test_old_rows_without_loras_and_the_row_numbers(comfy, ckpts, lora):
    _host, pack = comfy
    rows_node = __import__(pack.__name__ + ".nodes.rows_node", fromlist=["x"])
    # a LoRA row first does not shift the model rows' numbers: "row 2" is the second model row
    text = json.dumps([lora_row("style.safetensors"), {"ckpt": "model-0.safetensors"}, {"ckpt": "nope.safetensors"}])
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match=r"row 2: checkpoint 'nope.safetensors'"):
        rows_node.rows_manifest(text)
    models, loras = rows_node.parse_all_rows(text)
    assert [n for n, _w, _on in models] == ["model-0.safetensors", "nope.safetensors"]
    assert loras == [rows_node.LoraRow("style.safetensors", 1.0, 1.0, True)]
    assert rows_node.parse_rows(text) == models


@pytest.mark.parametrize("extra, problem", [
    (lora_row("nope.safetensors"), r"LoRA row 1: LoRA 'nope.safetensors' is not in ComfyUI's loras folders"),
    (lora_row("old.ckpt"), r"LoRA row 1: 'old.ckpt' is not a .safetensors file"),
    (lora_row("style.safetensors", sm=float("inf")), r"LoRA row 1 \(style.safetensors\): strength_model inf must be"),
    (lora_row("style.safetensors", sc=-101), r"LoRA row 1 \(style.safetensors\): strength_clip -101 must be between"),
    (lora_row("style.safetensors", sc="1"), r"LoRA row 1 \(style.safetensors\): strength_clip '1' must be a finite"),
    ({"lora": "style.safetensors", "on": 1}, r"LoRA row 1 \(style.safetensors\): on must be true or false"),
    ({"lora": ""}, "LoRA row 1 has no LoRA file"),
    ({"lora": "style.safetensors", "ckpt": "model-0.safetensors"}, "row 3 has both ckpt and lora"),
])
def test_bad_lora_rows_are_refused_before_running_naming_the_row(comfy, ckpts, lora, extra, problem):
    host, pack = comfy
    import re

    text = with_loras(rows(("model-0.safetensors", 1, True), ("model-1.safetensors", 1, True)), extra)
    if "inf" in problem:  # JSON has no inf: json.dumps writes Infinity, which Python's json reads back
        assert "Infinity" in text
    msg = node(pack).VALIDATE_INPUTS(models=text, filename_prefix="x")
    assert isinstance(msg, str) and re.search(problem, msg), msg
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match=problem):
        node(pack)().merge(text, True, "cpu", "fp16", "graph", "x")
    assert host.events[-1][1]["status"] == "failed"


def test_the_same_lora_twice_is_refused_naming_both_rows(comfy, ckpts, lora):
    _host, pack = comfy
    text = with_loras(rows(("model-0.safetensors", 1, True), ("model-1.safetensors", 1, True)),
                      lora_row("style.safetensors", 0.5), lora_row("style.safetensors", 0.25))
    assert "LoRA row 2: 'style.safetensors' is already LoRA row 1" in node(pack).VALIDATE_INPUTS(models=text)


def test_rows_is_changed_follows_the_lora_files(comfy, ckpts, lora):
    _host, pack = comfy
    cls = node(pack)
    text = with_loras(rows(("model-0.safetensors", 1.0, True), ("model-1.safetensors", 1.0, True)),
                      lora_row("style.safetensors"))
    a = cls.IS_CHANGED(models=text, normalize=True)
    assert cls.IS_CHANGED(models=text, normalize=True) == a
    st = os.stat(lora)
    os.utime(lora, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cls.IS_CHANGED(models=text, normalize=True) != a

"""Analyze Structure, CivitAI Lookup, Train Difference and Cross-Arch Merge nodes against the stand-in host."""

from __future__ import annotations

import os

import pytest

import comfy_stub
import helpers


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]


def _equal_state_dicts(a, b):
    import torch

    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_analyze_structure_report_and_picture(comfy, ckpts):
    host, pack = comfy
    cls = node(pack, "ModelMergerAnalyzeStructure")
    text, image = cls().analyze(os.path.basename(ckpts[0]))
    assert "model-0.safetensors" in text
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # manifest: every model plus the compatibility verdict; compare_to: the distance table and heatmap
    add = node(pack, "ModelMergerAddModel")()
    m, _ = add.add(os.path.basename(ckpts[0]), 1.0)
    m, _ = add.add(os.path.basename(ckpts[1]), 1.0, manifest=m)
    text2, image2 = cls().analyze(os.path.basename(ckpts[0]), manifest=m)
    assert "model-1.safetensors" in text2 and "compatibility" in text2
    text3, image3 = cls().analyze(os.path.basename(ckpts[0]), compare_to=os.path.basename(ckpts[1]), unique_id="4")
    assert "model-0.safetensors vs model-1.safetensors" in text3
    assert image3.shape[1] > image.shape[1]  # the heatmap is stacked under the facts
    assert host.progress and host.progress[-1][0] == host.progress[-1][1]


def test_civitai_lookup_offline_uses_only_the_cache(comfy, ckpts, monkeypatch):
    host, pack = comfy
    import socket

    def no_network(*a, **k):
        raise AssertionError("offline lookup opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    report, words, base = node(pack, "ModelMergerCivitaiLookup")().lookup(os.path.basename(ckpts[0]), offline=True)
    assert "offline" in report and "model-0.safetensors" in report
    assert words == "" and base == ""


def test_train_difference_node_equals_the_engine_plan(comfy, ckpts):
    host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    cls = node(pack, "ModelMergerTrainDifference")
    model, clip, vae, report = cls().merge(names[0], names[1], names[2], 0.7, "", "cpu", "fp16", "graph", "x",
                                           unique_id="2")
    got = host.loaded_state_dicts[-1]
    tm = pack.merger_core.merge.train
    sd, _ = pack.merger_core.merge.runner.merge_to_state_dict(tm.plan_train_difference(*ckpts, alpha=0.7, dtype="fp16"))
    _equal_state_dicts(got, sd)
    assert "train difference" in report and "alpha 0.7" in report
    assert cls.VALIDATE_INPUTS(filename_prefix="../x") != True  # noqa: E712


def test_cross_arch_merge_node_with_explicit_base(comfy, ckpts):
    host, pack = comfy
    cls = node(pack, "ModelMergerCrossArchMerge")
    choices = cls.INPUT_TYPES()["required"]["base"][0]
    assert choices[0] == "(automatic)" and "checkpoints/model-0.safetensors" in choices
    add = node(pack, "ModelMergerAddModel")()
    m, _ = add.add("model-1.safetensors", 1.0)
    m, _ = add.add("model-2.safetensors", 2.0, manifest=m)
    *_, report = cls().merge(m, "checkpoints/model-0.safetensors", "sum", 0.8, 0.2, 0.5, "delta", "base", "", 0,
                             "cpu", "fp16", "graph", "x", unique_id="5")
    got = host.loaded_state_dicts[-1]
    cm = pack.merger_core.merge.cross
    req = cm.CrossMergeRequest(models=ckpts[1:], weights=[1.0, 2.0], base=ckpts[0], combine="sum", scale=0.8)
    _cp, sd, _ = cm.cross_merge_to_state_dict(req)
    _equal_state_dicts(got, sd)
    assert "base: model-0.safetensors (given)" in report
    # the base must not be one of the models
    with pytest.raises(pack.merger_core.errors.ManifestError, match="both the base and one of the models"):
        cls().merge(m, "checkpoints/model-1.safetensors", "sum", 1.0, 0.2, 0.5, "delta", "base", "", 0,
                    "cpu", "fp16", "graph", "x")


def test_bases_folder_kind_is_registered_and_used(comfy):
    host, pack = comfy
    import folder_paths

    paths = folder_paths.get_folder_paths("merge_bases")
    assert paths[0] == os.path.join(host.base, "models", "merge_bases")
    assert pack.merger_core.identity.bases.bases_dir(create=False) == paths[0]


# ---------------------------------------------------------------------------------------------------------------
# Issue 13: caching follows the input files, missing requirements, refusals, the toast on every failure path


def _touch(path, seconds=5):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def _reads_a_model_file(spec_list, names):
    return isinstance(spec_list, list) and any(n in spec_list or f"checkpoints/{n}" in spec_list for n in names)


def test_every_node_with_a_model_file_input_has_is_changed(comfy, ckpts):
    """ComfyUI caches a node by its input values: a node that reads a file named by a widget must report the file's
    size and mtime through IS_CHANGED, or a replaced file gives the old result."""
    _host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        inputs = {**types.get("required", {}), **types.get("optional", {})}
        if any(_reads_a_model_file(spec[0], names) for spec in inputs.values()):
            assert callable(getattr(cls, "IS_CHANGED", None)), f"{node_id} reads a model file but has no IS_CHANGED"


def test_train_difference_is_changed_follows_every_file(comfy, ckpts):
    _host, pack = comfy
    cls = node(pack, "ModelMergerTrainDifference")
    names = [os.path.basename(p) for p in ckpts]
    kw = dict(model_a=names[0], model_b=names[1], model_c=names[2], alpha=1.0, alpha_blocks="", device="cpu",
              dtype="fp16", output_mode="graph", filename_prefix="x")
    first = cls.IS_CHANGED(**kw)
    assert cls.IS_CHANGED(**kw) == first  # the same prompt: cached
    for p in ckpts:
        before = cls.IS_CHANGED(**kw)
        _touch(p)
        assert cls.IS_CHANGED(**kw) != before, f"{os.path.basename(p)} replaced, IS_CHANGED did not change"


def test_cross_arch_merge_is_changed_follows_the_base(comfy, ckpts):
    host, pack = comfy
    cls = node(pack, "ModelMergerCrossArchMerge")
    kw = dict(manifest=None, base="checkpoints/model-0.safetensors", combine="ties", scale=1.0, density=0.2, drop=0.5,
              text_encoder="delta", vae="base", scale_blocks="", seed=0, device="cpu", dtype="fp16",
              output_mode="graph", filename_prefix="x", unique_id="3")
    first = cls.IS_CHANGED(**kw)
    assert cls.IS_CHANGED(**kw) == first
    _touch(ckpts[0])
    assert cls.IS_CHANGED(**kw) != first
    # (automatic): a base added to (or replaced in) models/merge_bases can change the choice
    kw["base"] = "(automatic)"
    auto = cls.IS_CHANGED(**kw)
    assert cls.IS_CHANGED(**kw) == auto
    bases = os.path.join(host.base, "models", "merge_bases")
    os.makedirs(bases, exist_ok=True)
    helpers.write_model(os.path.join(bases, "base.safetensors"), seed=11)
    assert cls.IS_CHANGED(**kw) != auto


def test_missing_requirements_one_clear_message_everywhere(tmp_path, monkeypatch, caplog):
    """A git-clone install without pip install -r requirements.txt: the pack still loads, one log line says what
    is missing and the exact command, every node fails with that message, and the merge nodes send the toast."""
    import logging
    import sys

    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "mmhome"))
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema raises ImportError
    monkeypatch.setitem(sys.modules, "blake3", None)
    caplog.set_level(logging.WARNING, logger="model_merger")
    host, pack = comfy_stub.install(str(tmp_path / "comfy"))
    try:
        command = f"{sys.executable} -m pip install -r {os.path.join(comfy_stub.PACK_ROOT, 'requirements.txt')}"
        lines = [r.getMessage() for r in caplog.records if "jsonschema" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "blake3" in lines[0] and command in lines[0] and "platformdirs" not in lines[0]
        helpers.write_models(os.path.join(host.base, "models", "checkpoints"), 3)
        for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
            fn = getattr(cls(), cls.FUNCTION)
            host.events.clear()
            with pytest.raises(pack.merger_core.errors.ModelMergerError) as info:
                fn()  # no arguments needed: the check comes first
            assert str(info.value) == lines[0].replace("Model Merger: ", "", 1) or lines[0].endswith(str(info.value)), node_id
            assert command in str(info.value)
            if cls.RETURN_TYPES[:3] == ("MODEL", "CLIP", "VAE"):
                assert host.events and host.events[-1][1]["status"] == "failed", node_id
                assert command in host.events[-1][1]["message"]
    finally:
        comfy_stub.uninstall()


def test_requirements_present_no_message(comfy, caplog):
    _host, pack = comfy
    import sys

    req = sys.modules[f"{comfy_stub.PACK_MODULE}.nodes._requirements"]
    assert req.missing_requirements() == []
    assert req.MESSAGE is None


def test_failure_toast_on_every_failure_path(comfy, ckpts, tmp_path):
    """Failures before the merge starts (a refused path, a missing base, a bad block string) send the event too."""
    host, pack = comfy
    outside = helpers.write_models(tmp_path / "outside", 2)
    m = pack.merger_core.manifest.Manifest(models=[pack.merger_core.manifest.ManifestEntry(path=p, weight=1.0) for p in outside])
    cases = [
        lambda: node(pack, "ModelMergerWeightedMerge")().merge(m, "cpu", "fp16", "graph", "x"),
        lambda: node(pack, "ModelMergerCrossArchMerge")().merge(m, "(automatic)", "sum", 1.0, 0.2, 0.5, "delta",
                                                                 "base", "", 0, "cpu", "fp16", "graph", "x"),
        lambda: node(pack, "ModelMergerTrainDifference")().merge("model-0.safetensors", "model-1.safetensors",
                                                                  "model-2.safetensors", 1.0, "NOT_A_PRESET", "cpu",
                                                                  "fp16", "graph", "x"),
    ]
    for case in cases:
        host.events.clear()
        with pytest.raises(Exception):
            case()
        assert host.events, "no model_merger.done event"
        event, data = host.events[-1]
        assert event == "model_merger.done" and data["status"] == "failed" and data["message"]


def test_path_refusal_names_the_rule_not_the_servers_folders(comfy, ckpts, tmp_path):
    host, pack = comfy
    outside = helpers.write_models(tmp_path / "outside", 1)[0]
    h = sys_mod(pack, "_host")
    with pytest.raises(pack.merger_core.errors.ScanError) as info:
        h.check_allowed(outside, "model")
    msg = str(info.value)
    assert outside in msg and "MODEL_MERGER_ALLOW_ANY_FOLDER=1" in msg and "outside the folders ComfyUI knows" in msg
    for root in h.model_roots():
        assert root not in msg, f"the refusal lists the server folder {root}"
    assert len(msg) < 400, msg


def sys_mod(pack, name):
    import sys

    return sys.modules[f"{comfy_stub.PACK_MODULE}.nodes.{name}"]


def test_toast_time_is_the_merge_time_not_the_cleanup(comfy, ckpts, monkeypatch):
    host, pack = comfy
    import time as _time

    mn = sys_mod(pack, "merge_node")

    class SlowGC:
        @staticmethod
        def collect():
            _time.sleep(1.0)
            return 0

    monkeypatch.setattr(mn, "gc", SlowGC)
    add = node(pack, "ModelMergerAddModel")()
    m, _ = add.add("model-0.safetensors", 1.0)
    m, _ = add.add("model-1.safetensors", 1.0, manifest=m)
    t0 = _time.monotonic()
    *_, report = node(pack, "ModelMergerWeightedMerge")().merge(m, "cpu", "fp16", "graph", "x")
    wall = _time.monotonic() - t0
    seconds = host.events[-1][1]["seconds"]
    # the node's whole call includes the 1 s collection; the toast's time must not (whatever the machine's speed)
    assert wall >= 1.0
    assert seconds <= wall - 0.9, f"the toast's time ({seconds} s of {wall:.3f} s) includes the garbage-collection pass"

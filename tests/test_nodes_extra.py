"""Analyze Structure, CivitAI Lookup, Train Difference and Cross-Arch Merge nodes against the stand-in host."""

from __future__ import annotations

import os

import pytest

import comfy_stub
import helpers


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    monkeypatch.delenv("MODEL_MERGER_ALLOW_ANY_FOLDER", raising=False)
    monkeypatch.delenv("CIVITAI_API_KEY", raising=False)
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "mmhome"))
    host, pack = comfy_stub.install(str(tmp_path / "comfy"))
    yield host, pack
    comfy_stub.uninstall()


@pytest.fixture
def ckpts(comfy):
    host, _ = comfy
    return helpers.write_models(os.path.join(host.base, "models", "checkpoints"), 3)


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

"""Extract LoRA, Merge LoRAs and Apply LoRA nodes against the stand-in host, running the real engine on small files:
the file goes into the loras folder (same bytes as the engine's own call), the LORA_MODEL output is that file's
state dict, progress/cancel/errors behave like the merging nodes'."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from merger_core.lora.extract import extract_lora
from merger_core.lora.merge_loras import merge_loras

EXTRACT, MERGE, APPLY = "ModelMergerExtractLora", "ModelMergerMergeLoras", "ModelMergerApplyLora"


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]


def loras_dir(host):
    return os.path.join(host.base, "models", "loras")


def extract(pack, names, prefix="model_merger/extracted", rank=4, conv_rank=0, energy=0.0, dtype="fp16", uid="7"):
    return node(pack, EXTRACT)().extract(names[1], names[0], rank, conv_rank, energy, dtype, prefix, unique_id=uid)


def test_registered_with_display_names(comfy):
    _host, pack = comfy
    for nid, name in [(EXTRACT, "Extract LoRA (Model Merger)"), (MERGE, "Merge LoRAs (Model Merger)"),
                      (APPLY, "Apply LoRA (Model Merger)")]:
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[nid] == name
        assert node(pack, nid).CATEGORY == "model_merger"
    assert node(pack, EXTRACT).RETURN_TYPES == ("LORA_MODEL", "STRING")
    assert node(pack, APPLY).INPUT_TYPES()["required"]["lora"][0] == "LORA_MODEL"


def test_extract_writes_into_the_loras_folder_and_returns_the_lora(comfy, ckpts, tmp_path):
    host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    lora, report = extract(pack, names, conv_rank=2)
    out = os.path.join(loras_dir(host), "model_merger", "extracted_00001_.safetensors")
    assert os.path.isfile(out)
    ref = tmp_path / "ref" / "extracted_00001_.safetensors"
    ref.parent.mkdir()
    extract_lora(ckpts[1], ckpts[0], 4, conv_rank=2, out_path=str(ref))
    assert sha(out) == sha(ref)  # the node is the engine's call
    want = load_file(out)
    assert set(lora) == set(want) and all(torch.equal(lora[k], want[k]) for k in want)
    assert "model_merger/extracted_00001_.safetensors" in report and "retained energy" in report
    assert "model_merger/extracted_00001_.safetensors" in node(pack, MERGE).INPUT_TYPES()["required"]["lora_1"][0]
    assert host.progress and host.progress[-1][0] == host.progress[-1][1]
    assert any("extracting: key" in t for _, t in host.texts)
    assert host.events[-1][1]["status"] == "done" and "extracted_00001_" in host.events[-1][1]["message"]
    extract(pack, names)  # a second run: the next counter, the first file kept
    assert os.path.isfile(os.path.join(loras_dir(host), "model_merger", "extracted_00002_.safetensors"))


def test_prefix_outside_the_loras_folder_is_refused_before_running(comfy):
    _host, pack = comfy
    cls = node(pack, EXTRACT)
    assert cls.VALIDATE_INPUTS(filename_prefix="a/b") is True
    for bad in ("../x", "/abs/x", "", "a/../../x"):
        assert isinstance(cls.VALIDATE_INPUTS(filename_prefix=bad), str), bad
    assert isinstance(node(pack, MERGE).VALIDATE_INPUTS(filename_prefix="../../x"), str)


def test_cancel_leaves_nothing_and_errors_are_clear(comfy, ckpts):
    host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    host.interrupt_after_updates = 3
    with pytest.raises(Exception) as info:
        extract(pack, names)
    assert type(info.value).__name__ in ("InterruptProcessingException", "MergeCancelled")
    assert host.events[-1][1]["status"] == "cancelled"
    host.interrupt_after_updates = None
    host.interrupt = False
    folder = os.path.join(loras_dir(host), "model_merger")
    assert not os.path.isdir(folder) or os.listdir(folder) == []
    errors = pack.merger_core.errors
    with pytest.raises(errors.ModelMergerError, match="same file"):
        node(pack, EXTRACT)().extract(names[0], names[0], 4, 0, 0.0, "fp16", "x", unique_id="7")
    assert host.events[-1][1]["status"] == "failed"
    with pytest.raises(errors.ModelMergerError, match="rank"):
        extract(pack, names, energy=0.0, rank=0)
    with pytest.raises(errors.ModelMergerError, match="not in ComfyUI's checkpoint folders"):
        node(pack, EXTRACT)().extract("nope.safetensors", names[0], 4, 0, 0.0, "fp16", "x")


def test_is_changed_follows_both_files(comfy, ckpts):
    _host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    cls = node(pack, EXTRACT)
    kw = dict(tuned=names[1], base=names[0], rank=4, conv_rank=0, energy=0.0, dtype="fp16", filename_prefix="x")
    first = cls.IS_CHANGED(**kw)
    assert cls.IS_CHANGED(**kw) == first
    for p in ckpts[:2]:
        before = cls.IS_CHANGED(**kw)
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
        assert cls.IS_CHANGED(**kw) != before


def test_merge_loras_node_equals_the_engine(comfy, ckpts, tmp_path):
    host, pack = comfy
    names = [os.path.basename(p) for p in ckpts]
    extract(pack, names, prefix="a", rank=3)
    node(pack, EXTRACT)().extract(names[2], names[0], 3, 0, 0.0, "fp16", "b", unique_id="8")
    a = os.path.join(loras_dir(host), "a_00001_.safetensors")
    b = os.path.join(loras_dir(host), "b_00001_.safetensors")
    slots = dict(lora_1="a_00001_.safetensors", weight_1=0.5, lora_2="(none)", weight_2=1.0,
                 lora_3="b_00001_.safetensors", weight_3=-0.25, lora_4="(none)", weight_4=1.0)
    cls = node(pack, MERGE)
    assert cls.IS_CHANGED(**slots, checkpoint="(none)") == cls.IS_CHANGED(**slots, checkpoint="(none)")
    lora, report = cls().merge(rank=2, conv_rank=0, energy=0.0, dtype="fp16", checkpoint="(none)",
                               filename_prefix="model_merger/merged", unique_id="9", **slots)
    out = os.path.join(loras_dir(host), "model_merger", "merged_00001_.safetensors")
    ref = tmp_path / "r" / "merged_00001_.safetensors"
    ref.parent.mkdir()
    merge_loras([(a, 0.5), (b, -0.25)], 2, str(ref))
    assert sha(out) == sha(ref)
    assert set(lora) == set(load_file(out))
    assert "0.5  a_00001_.safetensors" in report and "-0.25  b_00001_.safetensors" in report
    # through a checkpoint's key map
    lora2, report2 = cls().merge(rank=2, conv_rank=0, energy=0.5, dtype="fp32", checkpoint=names[0],
                                 filename_prefix="m2", **slots)
    assert "lined up through model-0.safetensors" in report2 and lora2
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match="no LoRA chosen"):
        cls().merge(rank=2, conv_rank=0, energy=0.0, dtype="fp16", checkpoint="(none)", filename_prefix="m3",
                    **{**slots, "lora_1": "(none)", "lora_3": "(none)"})


def test_apply_lora_patches_model_and_clip_like_lora_loader(comfy, monkeypatch):
    _host, pack = comfy
    import sys

    calls = []

    def load_lora_for_models(model, clip, lora, sm, sc):
        calls.append((model, clip, sorted(lora), sm, sc))
        return ("patched " + model, None if clip is None else "patched " + clip)

    monkeypatch.setattr(sys.modules["comfy.sd"], "load_lora_for_models", load_lora_for_models, raising=False)
    lora = {"lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    m, c = node(pack, APPLY)().apply("M", lora, 0.8, 0.3, clip="C")
    assert (m, c) == ("patched M", "patched C") and calls[-1] == ("M", "C", ["lora_unet_x.lora_up.weight"], 0.8, 0.3)
    m, c = node(pack, APPLY)().apply("M", lora, 1.0, 1.0)
    assert m == "patched M" and type(c).__name__ == "ExecutionBlocker" and calls[-1][1] is None
    assert node(pack, APPLY)().apply("M", lora, 0.0, 0.0, clip="C") == ("M", "C")
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match="LORA_MODEL"):
        node(pack, APPLY)().apply("M", "not a lora", 1.0, 1.0)

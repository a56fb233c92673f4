"""Add LoRA To Manifest and the manifest nodes' LoRA handling (issue 14), against the stand-in host: LoRAs picked from
ComfyUI's loras folder, copied (never changing a cached upstream manifest), checked against the model folders,
fingerprinted by their files, listed in the summary, and baked by Weighted Merge exactly as the engine bakes them."""

from __future__ import annotations

import json
import os

import pytest
import torch

import kohya_lora


def loras_dir(host):
    return os.path.join(host.base, "models", "loras")


@pytest.fixture
def lora(comfy, ckpts):
    host, _ = comfy
    path = os.path.join(loras_dir(host), "style.safetensors")
    kohya_lora.write_kohya_lora(path, ckpts[0], seed=3)
    return path


def nodes(pack):
    m = pack.NODE_CLASS_MAPPINGS
    return m["ModelMergerAddModel"](), m["ModelMergerAddLora"](), m["ModelMergerWeightedMerge"]()


def two(pack):
    add, _, _ = nodes(pack)
    m, _ = add.add("model-0.safetensors", 1.0)
    m, _ = add.add("model-1.safetensors", 3.0, manifest=m)
    return m


def test_add_lora_node_is_registered_and_lists_the_loras_folder(comfy, ckpts, lora):
    host, pack = comfy
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ModelMergerAddLora"] == "Add LoRA To Manifest (Model Merger)"
    with open(os.path.join(loras_dir(host), "old.ckpt"), "wb") as f:
        f.write(b"pickle")
    req = pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"].INPUT_TYPES()["required"]
    assert list(req) == ["manifest", "lora_name", "strength_model", "strength_clip"]
    assert req["lora_name"][0] == ["style.safetensors"]  # pickle formats are not offered
    assert req["strength_model"][1]["min"] == -100 and req["strength_clip"][1]["max"] == 100
    assert all(req[k][1].get("tooltip") for k in req)
    os.unlink(os.path.join(loras_dir(host), "style.safetensors"))  # none left: one placeholder, refused when run
    names = pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"].INPUT_TYPES()["required"]["lora_name"][0]
    assert names == ["(no LoRA in the loras folder)"]
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match="no LoRA chosen: put a .safetensors LoRA"):
        pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"]().add(two(pack), names[0], 1.0, 1.0)


def test_add_lora_appends_a_copy_replaces_strengths_and_zero_removes(comfy, ckpts, lora):
    _host, pack = comfy
    _, add_lora, _ = nodes(pack)
    m0 = two(pack)
    m1, summary = add_lora.add(m0, "style.safetensors", 0.8, -0.5)
    assert m0.loras == [] and len(m1.models) == 2  # the upstream (cached) manifest is unchanged
    assert [(e.path, e.strength_model, e.strength_clip) for e in m1.loras] == [(os.path.abspath(lora), 0.8, -0.5)]
    assert "1 LoRA(s) baked in" in summary and "0.8 / -0.5  style.safetensors" in summary
    m2, _ = add_lora.add(m1, "style.safetensors", 1.0, 1.0)
    assert [(e.strength_model, e.strength_clip) for e in m2.loras] == [(1.0, 1.0)]
    assert (m1.loras[0].strength_model, m1.loras[0].strength_clip) == (0.8, -0.5)  # m1's entries were copied
    m3, summary = add_lora.add(m2, "style.safetensors", 0.0, 0.0)
    assert m3.loras == [] and "LoRA" not in summary and len(m2.loras) == 1


@pytest.mark.parametrize("args, problem", [
    (("nope.safetensors", 1.0, 1.0), "not in ComfyUI's loras folders"),
    (("style.safetensors", float("nan"), 1.0), "strength_model nan must be a finite number"),
    (("style.safetensors", 1.0, 101.0), "strength_clip 101.0 must be between -100 and 100"),
])
def test_add_lora_refusals_name_the_problem(comfy, ckpts, lora, args, problem):
    _host, pack = comfy
    _, add_lora, _ = nodes(pack)
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match=problem):
        add_lora.add(two(pack), *args)
    cls = pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"]
    if "strength" in problem:
        assert problem in cls.VALIDATE_INPUTS(strength_model=args[1], strength_clip=args[2])
    assert cls.VALIDATE_INPUTS(strength_model=-2.5, strength_clip=0.0) is True


def test_weighted_merge_bakes_the_lora_as_the_engine_does(comfy, ckpts, lora):
    host, pack = comfy
    _, add_lora, merge = nodes(pack)
    m, _ = add_lora.add(two(pack), "style.safetensors", 0.7, -0.4)
    *_, report = merge.merge(m, "cpu", "fp32", "graph", "x", unique_id="5")
    got = host.loaded_state_dicts[-1]
    assert "baking 1 LoRA(s) into" in report and "strength 0.7 model / -0.4 text encoders" in report
    from merger_core.merge.bake import LoraInput
    from merger_core.merge.runner import merge_to_state_dict
    import helpers

    ref, _ = merge_to_state_dict(helpers.plan_for(ckpts[:2], weights=[1.0, 3.0], dtype="fp32",
                                                  loras=[LoraInput(lora, 0.7, -0.4)]))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    # and it is the merge plus 0.7 (model) / -0.4 (text encoder) times the kohya delta, within fp32 rounding
    plain, _ = merge_to_state_dict(helpers.plan_for(ckpts[:2], weights=[1.0, 3.0], dtype="fp32"))
    for module, key in kohya_lora.SD15_MODULES.items():
        s = -0.4 if key.startswith("cond_stage_model.") else 0.7
        want = plain[key].double() + s * kohya_lora.reference_delta(lora, module)
        assert torch.allclose(got[key].double(), want, rtol=1e-5, atol=1e-6), key
    assert torch.equal(got[helpers.KEY_OUT], plain[helpers.KEY_OUT])  # keys the LoRA does not name are the merge


def test_lora_outside_the_model_folders_is_refused(comfy, ckpts, tmp_path):
    host, pack = comfy
    outside = tmp_path / "elsewhere" / "evil.safetensors"
    outside.parent.mkdir()
    kohya_lora.write_kohya_lora(outside, ckpts[0])
    text = json.dumps({"version": 1, "models": [{"path": "model-0.safetensors"}, {"path": "model-1.safetensors"}],
                       "loras": [{"path": str(outside), "strength_model": 0.5}]})
    load = pack.NODE_CLASS_MAPPINGS["ModelMergerLoadManifest"]()
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match=r"loras\[0\] \(evil.safetensors\)"):
        load.load("(use pasted JSON)", text)
    m = two(pack)
    m.loras.append(pack.merger_core.manifest.model.LoraEntry(str(outside)))
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match="outside the folders ComfyUI knows"):
        nodes(pack)[2].merge(m, "cpu", "fp16", "graph", "x")
    assert host.events[-1][1]["status"] == "failed"


def test_pasted_lora_names_resolve_in_the_loras_folder_and_save_round_trips(comfy, ckpts, lora):
    host, pack = comfy
    text = json.dumps({"version": 1, "models": [{"path": "model-0.safetensors"}, {"path": "model-1.safetensors"}],
                       "loras": [{"path": "style.safetensors", "strength_model": 0.5, "strength_clip": 2}]})
    load = pack.NODE_CLASS_MAPPINGS["ModelMergerLoadManifest"]()
    m, summary = load.load("(use pasted JSON)", text)
    assert [(e.path, e.strength_model, e.strength_clip) for e in m.loras] == [(os.path.abspath(lora), 0.5, 2.0)]
    assert "0.5 / 2  style.safetensors" in summary
    out = pack.NODE_CLASS_MAPPINGS["ModelMergerSaveManifest"]().save(m, "with_lora")["result"][0]
    with open(out) as f:
        saved = json.load(f)
    assert saved["loras"][0]["strength_model"] == 0.5 and saved["loras"][0]["path"].endswith("style.safetensors")
    again, _ = load.load("with_lora.json", "")
    assert again.loras == m.loras


def test_fingerprints_follow_the_lora_file(comfy, ckpts, lora):
    _host, pack = comfy
    from importlib import import_module

    mn = import_module(pack.__name__ + ".nodes.manifest_nodes")
    m, _ = nodes(pack)[1].add(two(pack), "style.safetensors", 1.0, 1.0)
    cls = pack.NODE_CLASS_MAPPINGS["ModelMergerAddLora"]
    a, fa = cls.IS_CHANGED(lora_name="style.safetensors", strength_model=1.0, strength_clip=1.0), mn.manifest_fingerprint(m)
    assert cls.IS_CHANGED(lora_name="style.safetensors", strength_model=1.0, strength_clip=1.0) == a
    assert mn.manifest_fingerprint(mn.copy_manifest(m)) == fa
    st = os.stat(lora)
    os.utime(lora, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cls.IS_CHANGED(lora_name="style.safetensors", strength_model=1.0, strength_clip=1.0) != a
    assert mn.manifest_fingerprint(m) != fa
    assert cls.IS_CHANGED(lora_name="gone.safetensors").startswith("error:")


def test_cross_arch_merge_bakes_the_manifests_loras(comfy, ckpts, lora):
    """A manifest's LoRAs are baked by Cross-Arch Merge too (they were dropped silently before)."""
    host, pack = comfy
    m = pack.NODE_CLASS_MAPPINGS
    add, add_lora = m["ModelMergerAddModel"](), m["ModelMergerAddLora"]()
    man, _ = add.add("model-1.safetensors", 1.0)
    man, _ = add.add("model-2.safetensors", 2.0, manifest=man)
    man, _ = add_lora.add(man, "style.safetensors", 0.7, 0.4)
    *_, report = m["ModelMergerCrossArchMerge"]().merge(man, "checkpoints/model-0.safetensors", "sum", 0.8, 0.2, 0.5,
                                                        "delta", "base", "", 0, "cpu", "fp16", "graph", "x",
                                                        unique_id="5")
    got = host.loaded_state_dicts[-1]
    cm = pack.merger_core.merge.cross
    req = cm.CrossMergeRequest(models=ckpts[1:], weights=[1.0, 2.0], base=ckpts[0], combine="sum", scale=0.8,
                               loras=[(lora, 0.7, 0.4)])
    _cp, want, _ = cm.cross_merge_to_state_dict(req)
    _cp, plain, _ = cm.cross_merge_to_state_dict(cm.CrossMergeRequest(models=ckpts[1:], weights=[1.0, 2.0],
                                                                      base=ckpts[0], combine="sum", scale=0.8))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], plain[k]) for k in want)
    assert "baking 1 LoRA(s)" in report

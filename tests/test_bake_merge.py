"""Baking LoRAs into a merge (issue 14 item 1): manifest ``loras``, one pass, each key = merged weight + the LoRA
deltas in fp32, checked against a float64 reference written here from the LoRA formula; refusals before any weight
is read; the recipe and ``verify``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import helpers
from lora_synth import SD1_CONV, SD1_SHAPES, SD1_TE_Q, SD1_TO_K, SD1_TO_Q, gen, save
from merger_core.errors import IncompatibleModelsError, ManifestError
from merger_core.manifest.model import LoraEntry, Manifest, ManifestEntry
from merger_core.manifest.parse import load_manifest, save_manifest
from merger_core.merge.bake import LoraInput
from merger_core.merge.plan import plan_from_manifest, prepare
from merger_core.merge.runner import merge_to_file, merge_to_state_dict
from merger_core.merge.verify import verify_file

D = torch.float64
KOHYA_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
KOHYA_CONV = "lora_unet_input_blocks_1_0_in_layers_2"
KOHYA_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))


def sd1_models(tmp_path):
    shapes = dict(SD1_SHAPES)
    out = []
    for i in range(2):
        r = gen(10 + i)
        sd = {k: r(*s).half() for k, s in shapes.items()}
        out.append((save(tmp_path / f"m{i}.safetensors", sd), sd))
    return out


def sd1_lora(path, seed=1, unmatched=False):
    r = gen(seed)
    f = {"up": r(8, 4), "down": r(4, 768), "cup": r(6, 3, 1, 1), "cdown": r(3, 4, 3, 3), "tup": r(6, 2), "tdown": r(2, 5)}
    t = {
        f"{KOHYA_TO_K}.lora_up.weight": f["up"], f"{KOHYA_TO_K}.lora_down.weight": f["down"],
        f"{KOHYA_TO_K}.alpha": torch.tensor(2.0),
        f"{KOHYA_CONV}.lora_up.weight": f["cup"], f"{KOHYA_CONV}.lora_down.weight": f["cdown"],
        f"{KOHYA_TE_Q}.lora_up.weight": f["tup"], f"{KOHYA_TE_Q}.lora_down.weight": f["tdown"],
    }
    if unmatched:
        t["lora_unet_no_such_block_to_k.lora_up.weight"] = f["up"].clone()
        t["lora_unet_no_such_block_to_k.lora_down.weight"] = f["down"].clone()
    save(path, t)
    return f


def deltas(f):
    """What the LoRA formula gives, in float64 (kohya: up @ down * alpha / rank; no alpha: scale 1)."""
    return {
        SD1_TO_K: (2.0 / 4) * (f["up"].to(D) @ f["down"].to(D)),
        SD1_CONV: torch.einsum("or,rikl->oikl", f["cup"].to(D)[:, :, 0, 0], f["cdown"].to(D)),
        SD1_TE_Q: f["tup"].to(D) @ f["tdown"].to(D),
    }


def manifest_with(tmp_path, models, loras, **kw):
    return Manifest(models=[ManifestEntry(p, w) for p, w in zip(models, (0.25, 0.75))], dtype="fp32",
                    loras=[LoraEntry(p, sm, sc) for p, sm, sc in loras], **kw)


def test_bake_equals_the_float64_reference(tmp_path):
    (a, sa), (b, sb) = sd1_models(tmp_path)
    f1 = sd1_lora(tmp_path / "l1.safetensors", seed=1)
    f2 = sd1_lora(tmp_path / "l2.safetensors", seed=2)
    m = manifest_with(tmp_path, [a, b], [(str(tmp_path / "l1.safetensors"), 0.8, 0.5),
                                         (str(tmp_path / "l2.safetensors"), -0.3, 1.2)])
    out = tmp_path / "out.safetensors"
    res = merge_to_file(plan_from_manifest(m), out)
    got = load_file(str(out))
    d1, d2 = deltas(f1), deltas(f2)
    for k in SD1_SHAPES:
        ref = 0.25 * sa[k].to(D) + 0.75 * sb[k].to(D)
        te = k.startswith("cond_stage_model.")
        if k in d1:
            ref = ref + (0.5 if te else 0.8) * d1[k] + (1.2 if te else -0.3) * d2[k]
        tol = 1e-5 * ref.abs().max().item() + 1e-6
        assert (got[k].to(D) - ref).abs().max().item() <= tol, k
    assert any("baking 2 LoRA(s) into 3 key(s)" in n for n in res.notes)
    recipe = json.loads(res.metadata["sd_merge_recipe"])
    assert [(x["name"], x["strength_model"], x["strength_clip"]) for x in recipe["loras"]] == [
        ("l1.safetensors", 0.8, 0.5), ("l2.safetensors", -0.3, 1.2)]
    assert recipe["loras"][0]["sha256"] == helpers.sha256_file(tmp_path / "l1.safetensors")
    assert verify_file(out).verified


def test_bake_with_a_tensor_method_and_workers_gives_the_same_bytes(tmp_path):
    (a, _), (b, _) = sd1_models(tmp_path)
    sd1_lora(tmp_path / "l.safetensors")
    outs = []
    for k in (1, 3):
        plan = helpers.plan_for([a, b], method="slerp", params={"t": 0.4}, threads=k,
                                loras=[LoraInput(str(tmp_path / "l.safetensors"), 1.0, 1.0)])
        sd, _ = merge_to_state_dict(plan)
        outs.append(sd)
    plain, _ = merge_to_state_dict(helpers.plan_for([a, b], method="slerp", params={"t": 0.4}))
    for key in SD1_SHAPES:
        assert torch.equal(outs[0][key], outs[1][key]), key
    assert not torch.equal(outs[0][SD1_TO_K], plain[SD1_TO_K]) and torch.equal(outs[0][SD1_TO_Q], plain[SD1_TO_Q])


@pytest.mark.parametrize("method,params", [("slerp", {"t": 0.4}), ("ties", {"density": 0.5}), ("dare", {"drop": 0.3})])
def test_bake_with_a_tensor_method_on_the_device_path_gives_the_cpu_paths_bytes(tmp_path, method, params, monkeypatch):
    """The device path (forced here on the CPU: the methods load their slices through the pipeline) adds the baked
    LoRA deltas to the merged key as the chunked path does."""
    from merger_core.merge import runner

    (a, _), (b, _) = sd1_models(tmp_path)
    sd1_lora(tmp_path / "l.safetensors")
    plan = lambda: helpers.plan_for([a, b], method=method, params=params, seed=3,  # noqa: E731
                                    loras=[LoraInput(str(tmp_path / "l.safetensors"), 0.8, 1.0)])
    chunked, _ = merge_to_state_dict(plan())
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    device, _ = merge_to_state_dict(plan())
    assert chunked.keys() == device.keys()
    assert all(torch.equal(chunked[k], device[k]) for k in chunked)
    plain, _ = merge_to_state_dict(helpers.plan_for([a, b], method=method, params=params, seed=3))
    assert not torch.equal(device[SD1_TO_K], plain[SD1_TO_K])  # the LoRA is in there


def test_unmatched_lora_modules_are_named_in_the_notes(tmp_path):
    (a, _), (b, _) = sd1_models(tmp_path)
    sd1_lora(tmp_path / "l.safetensors", unmatched=True)
    prep = prepare(helpers.plan_for([a, b], loras=[LoraInput(str(tmp_path / "l.safetensors"))]))
    text = "\n".join(prep.notes)
    assert "match no checkpoint key and are not applied" in text and "lora_unet_no_such_block_to_k" in text


def test_a_lora_of_another_architecture_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    (a, _), (b, _) = sd1_models(tmp_path)
    r = gen(3)
    save(tmp_path / "xl.safetensors", {  # SDXL: cross-attention keys of width 2048
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": r(8, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": r(4, 2048),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(6, 2),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(2, 1280),
    })
    import safetensors

    def no_reads(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(safetensors, "safe_open", no_reads)
    with pytest.raises(IncompatibleModelsError, match="SDXL"):
        prepare(helpers.plan_for([a, b], loras=[LoraInput(str(tmp_path / "xl.safetensors"))]))


def test_manifest_loras_round_trip_and_validation(tmp_path):
    (a, _), (b, _) = sd1_models(tmp_path)
    sd1_lora(tmp_path / "l.safetensors")
    m = manifest_with(tmp_path, [a, b], [(str(tmp_path / "l.safetensors"), 0.7, 0.2)])
    path = save_manifest(m, tmp_path / "m.json")
    doc = json.loads(open(path).read())
    assert doc["loras"] == [{"path": "l.safetensors", "strength_model": 0.7, "strength_clip": 0.2}]
    back = load_manifest(path)
    assert back.loras == m.loras
    plan = plan_from_manifest(back)
    assert [(l.path, l.strength_model, l.strength_clip) for l in plan.loras] == [(str(tmp_path / "l.safetensors"), 0.7, 0.2)]
    doc["loras"][0]["path"] = "missing.safetensors"
    doc["loras"].append({"path": "l.safetensors", "strength_model": "strong"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as e:
        plan_from_manifest(load_manifest(bad))
    assert "strength_model" in str(e.value)
    doc["loras"].pop()
    bad.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="loras\\[0\\].*file not found"):
        plan_from_manifest(load_manifest(bad))


def test_a_manifest_without_loras_is_unchanged(tmp_path):
    (a, _), (b, _) = sd1_models(tmp_path)
    m = Manifest(models=[ManifestEntry(a), ManifestEntry(b)])
    doc = json.loads(open(save_manifest(m, tmp_path / "m.json")).read())
    assert "loras" not in doc


def test_a_cross_merge_bakes_loras_and_verifies(tmp_path):
    """Cross-merge (and so the Cross-Arch Merge node, which passes a manifest's LoRAs on) bakes LoRAs too: the result
    is the cross-merge without them plus the LoRA delta, and verify re-applies them."""
    from merger_core.merge.cross import CrossMergeRequest, cross_merge_to_file

    (a, _), (b, _) = sd1_models(tmp_path)
    r = gen(30)
    base = save(tmp_path / "base.safetensors", {k: r(*s).half() for k, s in SD1_SHAPES.items()})
    f = sd1_lora(tmp_path / "l.safetensors")
    plain, baked = tmp_path / "plain.safetensors", tmp_path / "baked.safetensors"
    req = dict(models=[a, b], base=base, combine="sum", scale=0.7, dtype="fp32")
    cross_merge_to_file(CrossMergeRequest(**req), str(plain))
    _, res = cross_merge_to_file(CrossMergeRequest(**req, loras=[(str(tmp_path / "l.safetensors"), 0.6, 1.5)]), str(baked))
    p, q = load_file(str(plain)), load_file(str(baked))
    for k, d in deltas(f).items():
        strength = 1.5 if k.startswith("cond_stage_model.") else 0.6
        ref = p[k].to(D) + strength * d
        assert (q[k].to(D) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6, k
    assert torch.equal(p[SD1_TO_Q], q[SD1_TO_Q])
    assert verify_file(baked).verified

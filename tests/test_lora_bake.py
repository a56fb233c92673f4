"""Baking LoRAs (merger_core/lora/delta.py): each format against a float64 reference written here from the LoRA
formulas, slices in any order from several threads, unmatched modules reported, other architectures refused before
any weight is read."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lora_synth import (SD1_CONV, SD1_SHAPES, SD1_TE_FC1, SD1_TE_Q, SD1_TO_K, SD1_TO_Q, SDXL_IN_PROJ, SDXL_SHAPES,
                        SDXL_TE1_Q, SDXL_TO_K, gen, save)
from merger_core.errors import BadFileError, IncompatibleModelsError
from merger_core.lora import delta as delta_mod
from merger_core.lora.delta import lora_deltas
from merger_core.lora.formats import LoraError, read_lora

D = torch.float64


def bake(key_delta, key, shape, start=0, n=None):
    n = n if n is not None else int(torch.Size(shape).numel())
    v = torch.zeros(n, dtype=torch.float32)
    d = key_delta(key)
    assert d is not None, key
    d.add_to(v, start)
    return v


def close(got, ref, tol=1e-5):
    ref = ref.reshape(-1).to(torch.float32)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err


def test_kohya_lora_locon_and_text_encoder_sd1(tmp_path):
    r = gen(1)
    up, down = r(8, 4), r(4, 768)
    cup, cdown = r(6, 3, 1, 1), r(3, 4, 3, 3)
    tup, tdown = r(6, 2), r(2, 5)
    p = save(tmp_path / "l.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(2.0),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": cup,
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": cdown,
        "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(1.5),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": tup,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": tdown,
    })
    kd, report = lora_deltas(SD1_SHAPES, [(p, 0.8, 0.5)])
    close(bake(kd, SD1_TO_K, (8, 768)), 0.8 * (2.0 / 4) * (up.to(D) @ down.to(D)))
    ref = torch.einsum("or,rikl->oikl", cup.to(D)[:, :, 0, 0], cdown.to(D))
    close(bake(kd, SD1_CONV, (6, 4, 3, 3)), 0.8 * (1.5 / 3) * ref)
    close(bake(kd, SD1_TE_Q, (6, 5)), 0.5 * (tup.to(D) @ tdown.to(D)))  # no alpha: scale 1
    assert kd(SD1_TO_Q) is None
    assert sorted(report.keys) == sorted([SD1_TO_K, SD1_CONV, SD1_TE_Q])
    assert report.loras[0]["arch"] == "sd1" and report.loras[0]["unmatched"] == []


def test_locon_tucker_mid(tmp_path):
    r = gen(2)
    up, mid, down = r(6, 3, 1, 1), r(3, 3, 3, 3), r(3, 4, 1, 1)
    p = save(tmp_path / "t.safetensors", {
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": up,
        "lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight": mid,
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": down,
        "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(3.0),
    })
    kd, _ = lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])
    ref = torch.einsum("or,rskl,si->oikl", up.to(D)[:, :, 0, 0], mid.to(D), down.to(D)[:, :, 0, 0])
    close(bake(kd, SD1_CONV, (6, 4, 3, 3)), (3.0 / 3) * ref)


def test_loha_plain_and_cp(tmp_path):
    r = gen(3)
    a1, b1, a2, b2 = r(6, 2), r(2, 10), r(6, 2), r(2, 10)
    # CP (Tucker) on the conv: w_a (rank, out), w_b (rank, in), t (rank, rank, kh, kw)
    ca1, cb1, ct1, ca2, cb2, ct2 = r(2, 6), r(2, 4), r(2, 2, 3, 3), r(2, 6), r(2, 4), r(2, 2, 3, 3)
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    c = "lora_unet_input_blocks_1_0_in_layers_2"
    p = save(tmp_path / "h.safetensors", {
        f"{m}.hada_w1_a": a1, f"{m}.hada_w1_b": b1, f"{m}.hada_w2_a": a2, f"{m}.hada_w2_b": b2,
        f"{m}.alpha": torch.tensor(1.0),
        f"{c}.hada_w1_a": ca1, f"{c}.hada_w1_b": cb1, f"{c}.hada_t1": ct1,
        f"{c}.hada_w2_a": ca2, f"{c}.hada_w2_b": cb2, f"{c}.hada_t2": ct2, f"{c}.alpha": torch.tensor(4.0),
    })
    kd, _ = lora_deltas(SD1_SHAPES, [(p, 0.7, 1.0)])
    close(bake(kd, SD1_TO_Q, (6, 10)), 0.7 * 0.5 * ((a1.to(D) @ b1.to(D)) * (a2.to(D) @ b2.to(D))))
    def cp(a, b, t):
        return torch.einsum("rskl,sj,rp->pjkl", t.to(D), b.to(D), a.to(D))
    close(bake(kd, SD1_CONV, (6, 4, 3, 3)), 0.7 * 2.0 * (cp(ca1, cb1, ct1) * cp(ca2, cb2, ct2)))


def _kron(a, b):  # kron by its definition, not torch.kron
    out = torch.einsum("ik,jl->ijkl", a, b)
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def test_lokr_whole_and_factored(tmp_path):
    r = gen(4)
    w1, w2a, w2b = r(2, 2), r(3, 2), r(2, 5)  # kron -> (6, 10)
    w1a, w1b, w2 = r(4, 1), r(1, 48), r(2, 16)  # kron -> (8, 768) on to_k
    p = save(tmp_path / "k.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1": w1,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2_a": w2a,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2_b": w2b,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w1_a": w1a,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w1_b": w1b,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w2": w2,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(3.0),
    })
    kd, _ = lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])
    close(bake(kd, SD1_TO_Q, (6, 10)), 0.5 * _kron(w1.to(D), w2a.to(D) @ w2b.to(D)))  # alpha / w2_b rows
    close(bake(kd, SD1_TO_K, (8, 768)), 3.0 * _kron(w1a.to(D) @ w1b.to(D), w2.to(D)))  # alpha / w1_b rows
    # rows of one slice that cut through the kron's blocks
    close(bake(kd, SD1_TO_K, (8, 768), start=1000, n=2000),
          (3.0 * _kron(w1a.to(D) @ w1b.to(D), w2.to(D))).reshape(-1)[1000:3000])


def test_peft_and_diffusers_names_sdxl_with_fused_clip_g_rows(tmp_path):
    r = gen(5)
    up, down = r(8, 2), r(2, 2048)
    kup, kdown = r(1280, 2), r(2, 1280)
    qup, qdown = r(6, 1), r(1, 5)
    p = save(tmp_path / "p.safetensors", {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k.lora_B.weight": up,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k.lora_A.weight": down,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": kup,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": kdown,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight": qup,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": qdown,
    })
    kd, report = lora_deltas(SDXL_SHAPES, [(p, 1.2, 0.6)])
    close(bake(kd, SDXL_TO_K, (8, 2048)), 1.2 * (up.to(D) @ down.to(D)))
    close(bake(kd, SDXL_TE1_Q, (6, 5)), 0.6 * (qup.to(D) @ qdown.to(D)))
    # k_proj is rows 1280..2560 of the fused in_proj_weight: a slice across the q/k border gets zeros, then k
    start, n = 1270 * 1280, 30 * 1280
    got = bake(kd, SDXL_IN_PROJ, (3840, 1280), start=start, n=n)
    ref = torch.zeros(30, 1280, dtype=D)
    ref[10:] = 0.6 * (kup.to(D) @ kdown.to(D))[:20]
    close(got, ref)
    assert report.loras[0]["arch"] == "sdxl"


def test_slices_from_threads_in_any_order_match_one_pass(tmp_path):
    r = gen(6)
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    h = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    p = save(tmp_path / "a.safetensors", {f"{m}.lora_up.weight": r(8, 3), f"{m}.lora_down.weight": r(3, 768)})
    q = save(tmp_path / "b.safetensors", {f"{m}.hada_w1_a": r(8, 2), f"{m}.hada_w1_b": r(2, 768),
                                          f"{m}.hada_w2_a": r(8, 2), f"{m}.hada_w2_b": r(2, 768),
                                          f"{h}.lokr_w1": r(2, 2), f"{h}.lokr_w2": r(3, 5)})
    kd, _ = lora_deltas(SD1_SHAPES, [(p, 0.9, 1.0), (q, -0.4, 1.0)])
    whole = bake(kd, SD1_TO_K, (8, 768))
    cuts = sorted(random.Random(0).sample(range(1, 8 * 768), 23))
    bounds = list(zip([0] + cuts, cuts + [8 * 768]))
    random.Random(1).shuffle(bounds)
    out = torch.zeros(8 * 768)
    d = kd(SD1_TO_K)  # one object, many workers: the runner's case

    def work(b):
        s, e = b
        v = torch.zeros(e - s)
        d.add_to(v, s)
        out[s:e] = v

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(work, bounds))
    assert torch.equal(out, whole)


def test_unmatched_modules_and_unknown_tensors_reported_by_name(tmp_path):
    r = gen(7)
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    p = save(tmp_path / "u.safetensors", {
        f"{m}.lora_up.weight": r(8, 2), f"{m}.lora_down.weight": r(2, 768),
        "lora_unet_no_such_block.lora_up.weight": r(4, 2), "lora_unet_no_such_block.lora_down.weight": r(2, 4),
        "emb_params": r(3, 768),
    })
    _, report = lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])
    entry = report.loras[0]
    assert entry["unmatched"] == ["lora_unet_no_such_block"]
    assert entry["unknown"] == ["emb_params"]
    text = "\n".join(report.lines())
    assert "lora_unet_no_such_block" in text and "emb_params" in text


def test_other_architecture_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    r = gen(8)
    p = save(tmp_path / "xl.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": r(8, 2),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": r(2, 2048),
    })
    import safetensors

    def no_reading(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    with pytest.raises(IncompatibleModelsError, match="SDXL LoRA and the checkpoint is SD1"):
        lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])
    # and the other way round: an SD1 LoRA on SDXL, recognised by its text-encoder width
    q = save(tmp_path / "sd1.safetensors", {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": r(7, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": r(2, 768),
    })
    with pytest.raises(IncompatibleModelsError, match="SD1.x LoRA and the checkpoint is SDXL"):
        lora_deltas(SDXL_SHAPES, [(q, 1.0, 1.0)])


def test_shape_mismatch_dora_and_bad_files_refused(tmp_path):
    r = gen(9)
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    p = save(tmp_path / "s.safetensors", {f"{m}.lora_up.weight": r(6, 2), f"{m}.lora_down.weight": r(2, 11)})
    with pytest.raises(IncompatibleModelsError, match="do not fit"):
        lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])
    q = save(tmp_path / "d.safetensors", {f"{m}.lora_up.weight": r(6, 2), f"{m}.lora_down.weight": r(2, 10),
                                          f"{m}.dora_scale": r(6, 1)})
    with pytest.raises(LoraError, match=f"{m} \\(DoRA dora_scale\\)"):
        lora_deltas(SD1_SHAPES, [(q, 1.0, 1.0)])
    with pytest.raises(BadFileError, match="not found"):
        lora_deltas(SD1_SHAPES, [(str(tmp_path / "missing.safetensors"), 1.0, 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(BadFileError):
        read_lora(tmp_path / "junk.safetensors")


def test_lora_of_no_matching_module_refused(tmp_path):
    r = gen(10)
    p = save(tmp_path / "n.safetensors", {"something_else.lora_up.weight": r(4, 2), "something_else.lora_down.weight": r(2, 4)})
    with pytest.raises(IncompatibleModelsError, match="none of its 1 modules"):
        lora_deltas(SD1_SHAPES, [(p, 1.0, 1.0)])

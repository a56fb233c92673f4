"""Merging LoRAs (merger_core/lora/merge_loras.py): the merged LoRA's delta is the weighted sum of the inputs' deltas
(exact at full rank), by module name or through a checkpoint's key map (mixed namings)."""

from __future__ import annotations

import pytest
import torch

from lora_synth import SD1_SHAPES, SD1_TE_Q, SD1_TO_K, SD1_CONV, checkpoint, gen, save
from merger_core.errors import IncompatibleModelsError
from merger_core.lora.delta import lora_deltas
from merger_core.lora.merge_loras import merge_loras

K = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
C = "lora_unet_input_blocks_1_0_in_layers_2"


def delta_of(path, key):
    kd, _ = lora_deltas(SD1_SHAPES, [(str(path), 1.0, 1.0)])
    v = torch.zeros(int(torch.Size(SD1_SHAPES[key]).numel()))
    d = kd(key)
    if d is not None:
        d.add_to(v, 0)
    return v.double()


def test_weighted_sum_by_module_name(tmp_path):
    r = gen(21)
    a = save(tmp_path / "a.safetensors", {f"{K}.lora_up.weight": r(8, 2), f"{K}.lora_down.weight": r(2, 768),
                                          f"{K}.alpha": torch.tensor(1.0),
                                          f"{C}.lora_up.weight": r(6, 2, 1, 1), f"{C}.lora_down.weight": r(2, 4, 3, 3)})
    b = save(tmp_path / "b.safetensors", {f"{K}.hada_w1_a": r(8, 2), f"{K}.hada_w1_b": r(2, 768),
                                          f"{K}.hada_w2_a": r(8, 2), f"{K}.hada_w2_b": r(2, 768)})
    out = tmp_path / "m.safetensors"
    res, report = merge_loras([(a, 0.7), (b, 0.3)], rank=6, out_path=str(out), dtype="fp32")
    assert report is None and sorted(m.module for m in res.modules) == [C, K]
    want = 0.7 * delta_of(a, SD1_TO_K) + 0.3 * delta_of(b, SD1_TO_K)  # LoHa rank 2*2 = 4, plus 2: exact at 6
    got = delta_of(out, SD1_TO_K)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (delta_of(out, SD1_CONV) - 0.7 * delta_of(a, SD1_CONV)).abs().max() < 1e-4
    res2, _ = merge_loras([(a, 0.7), (b, 0.3)], rank=1, out_path=str(tmp_path / "low.safetensors"))
    assert min(m.retained for m in res2.modules) < 1.0


def test_mixed_namings_through_a_checkpoint(tmp_path):
    r = gen(22)
    ck = tmp_path / "ck.safetensors"
    checkpoint(ck, SD1_SHAPES)
    a = save(tmp_path / "a.safetensors", {f"{K}.lora_up.weight": r(8, 1), f"{K}.lora_down.weight": r(1, 768)})
    b = save(tmp_path / "b.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k.lora_B.weight": r(8, 1),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k.lora_A.weight": r(1, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": r(6, 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": r(1, 5),
        "unet.no_such_block.lora_B.weight": r(3, 1), "unet.no_such_block.lora_A.weight": r(1, 3),
    })
    out = tmp_path / "m.safetensors"
    res, report = merge_loras([(a, 1.0), (b, -0.5)], rank=2, out_path=str(out), dtype="fp32", checkpoint=str(ck))
    assert report.unmatched == {"b.safetensors": ["unet.no_such_block"]}
    assert sorted(m.module for m in res.modules) == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", K]
    want = delta_of(a, SD1_TO_K) - 0.5 * delta_of(b, SD1_TO_K)
    assert (delta_of(out, SD1_TO_K) - want).abs().max() < 1e-4 * want.abs().max()
    assert (delta_of(out, SD1_TE_Q) + 0.5 * delta_of(b, SD1_TE_Q)).abs().max() < 1e-4


def test_loras_of_different_architectures_refused(tmp_path):
    r = gen(23)
    a = save(tmp_path / "a.safetensors", {f"{K}.lora_up.weight": r(8, 1), f"{K}.lora_down.weight": r(1, 768)})
    x = save(tmp_path / "x.safetensors", {f"{K}.lora_up.weight": r(8, 1), f"{K}.lora_down.weight": r(1, 2048)})
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        merge_loras([(a, 1.0), (x, 1.0)], rank=2, out_path=str(tmp_path / "o.safetensors"))

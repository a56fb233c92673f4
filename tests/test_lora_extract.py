"""Extracting a LoRA (merger_core/lora/extract.py): the round trip through the baking code reproduces the fine-tune
within the reported retained energy, the same inputs give the same bytes, names and metadata are kohya's."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

from lora_synth import SD1_CONV, SD1_SHAPES, SD1_TE_Q, SD1_TO_K, SD1_TO_Q, SDXL_IN_PROJ, gen, save
from merger_core.errors import IncompatibleModelsError, OutputError
from merger_core.lora.delta import lora_deltas
from merger_core.lora.extract import LoraExtractor, extract_lora, factorize
from merger_core.lora.formats import LoraError, read_lora


def pair(tmp_path, rank=2, noise=0.01, dtype=torch.float32):
    """base and tuned SD1-named checkpoints; tuned = base + rank-`rank` change + noise on three keys."""
    r = gen(11)
    base = {k: r(*s) for k, s in SD1_SHAPES.items()}
    tuned = dict(base)
    for k in (SD1_TO_K, SD1_TO_Q, SD1_TE_Q, SD1_CONV):
        s = SD1_SHAPES[k]
        low = (r(s[0], rank) @ r(rank, int(torch.Size(s[1:]).numel()))).reshape(s)
        tuned[k] = base[k] + low + noise * r(*s)
    b = save(tmp_path / "base.safetensors", {k: v.to(dtype) for k, v in base.items()})
    t = save(tmp_path / "tuned.safetensors", {k: v.to(dtype) for k, v in tuned.items()})
    return b, t, base, tuned


def test_round_trip_within_reported_energy(tmp_path):
    b, t, base, tuned = pair(tmp_path)
    out = tmp_path / "lora.safetensors"
    res = extract_lora(t, b, rank=3, conv_rank=3, out_path=str(out), dtype="fp32")
    by_key = {m.key: m for m in res.modules}
    assert sorted(by_key) == sorted([SD1_TO_K, SD1_TO_Q, SD1_TE_Q, SD1_CONV])  # only keys that differ
    kd, report = lora_deltas({k: v.shape for k, v in base.items()}, [(str(out), 1.0, 1.0)])
    assert report.loras[0]["unmatched"] == [] and report.loras[0]["unknown"] == []
    for k, m in by_key.items():
        v = base[k].reshape(-1).clone()
        kd(k).add_to(v, 0)
        delta = (tuned[k] - base[k]).double()
        err = ((v.double() - tuned[k].reshape(-1).double()) ** 2).sum() / (delta ** 2).sum()
        assert 0.98 < m.retained < 1.0
        assert abs(err.item() - (1.0 - m.retained)) < 1e-4, (k, err.item(), m.retained)
    lf = read_lora(out)
    assert {m.kind for m in lf.modules.values()} == {"lora"}
    md = lf.header.metadata
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3.0"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lf.modules
    assert "lora_unet_input_blocks_1_0_in_layers_2" in lf.modules
    conv = lf.header.tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    assert conv.shape == (3, 4, 3, 3)
    assert "\n".join(res.summary_lines()).count("lora_") == 4


def test_same_inputs_same_bytes_and_no_3x3_conv_without_conv_rank(tmp_path):
    b, t, _, _ = pair(tmp_path)
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    a = extract_lora(t, b, rank=2, out_path=str(tmp_path / "1" / "l.safetensors"))
    extract_lora(t, b, rank=2, out_path=str(tmp_path / "2" / "l.safetensors"))
    ha = hashlib.sha256((tmp_path / "1" / "l.safetensors").read_bytes()).hexdigest()
    assert ha == hashlib.sha256((tmp_path / "2" / "l.safetensors").read_bytes()).hexdigest()
    assert a.skipped_conv == 1 and SD1_CONV not in {m.key for m in a.modules}
    with safe_open(str(tmp_path / "1" / "l.safetensors"), "pt") as f:
        assert f.get_tensor(f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight").dtype == torch.float16


def test_energy_picks_the_smallest_rank_and_signs_are_fixed():
    r = gen(12)
    m = r(20, 4) @ r(4, 30)  # rank 4 exactly
    up, down, kept = factorize(m, 16, 0.999999)
    assert down.shape[0] == 4 and kept > 0.999999
    up1, down1, kept1 = factorize(m, 16, 0.5)
    assert down1.shape[0] < 4 and kept1 >= 0.5
    # the sign convention: the largest-|value| entry of each left vector is positive
    col = up / up.norm(dim=0)
    assert (col.gather(0, col.abs().argmax(0, keepdim=True)) > 0).all()
    up2, down2, _ = factorize(-m, 16, None)
    assert torch.allclose(up2 @ down2, -m, atol=1e-4)


def test_fused_clip_g_rows_get_three_modules(tmp_path):
    from lora_synth import SDXL_SHAPES

    keys = list(SDXL_SHAPES)
    ex = LoraExtractor(str(tmp_path / "x.safetensors"), keys, rank=2)
    r = gen(13)
    d = torch.zeros(3840, 1280)
    d[1280:2560] = r(1280, 1) @ r(1, 1280)  # only k changes
    mods = ex.add_key(SDXL_IN_PROJ, d)
    assert [m.module for m in mods] == [f"lora_te2_text_model_encoder_layers_0_self_attn_{x}_proj" for x in "qkv"]
    assert [m.norm > 0 for m in mods] == [False, True, False]
    res = ex.finish()
    assert read_lora(res.output).header.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_refusals(tmp_path):
    b, t, _, _ = pair(tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(t, b, rank=2, out_path=str(out))
    with pytest.raises(LoraError, match="rank"):
        extract_lora(t, b, rank=0, out_path=str(tmp_path / "p.safetensors"))
    with pytest.raises(LoraError, match="nothing to extract"):
        extract_lora(b, b, rank=2, out_path=str(tmp_path / "q.safetensors"))
    other = save(tmp_path / "other.safetensors", {"model.diffusion_model.x.weight": torch.zeros(2, 2)})
    with pytest.raises(IncompatibleModelsError, match="no known architecture"):
        extract_lora(t, other, rank=2, out_path=str(tmp_path / "r.safetensors"))
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "q.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

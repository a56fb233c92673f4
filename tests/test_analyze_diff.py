"""Diff and lineage on small real files with constructed deltas; the base registry."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merger_core.arch import diff_models, rank_bases
from merger_core.identity.bases import list_bases, register_base, remove_base
from merger_core.arch.blocks import block_of
from merger_core.report.images import diff_heatmap, image_to_array
from merger_core.report.text import render_diff
from synth import layout_from_fingerprint, write_sparse
from merger_core.errors import BadFileError, IncompatibleModelsError, ManifestError, MergeCancelled

UNET = "model.diffusion_model."
# small tensors with real SD1 key names, a few per block
SMALL_KEYS = {
    UNET + "time_embed.0.weight": (64, 32),
    UNET + "input_blocks.0.0.weight": (32, 4, 3, 3),
    UNET + "input_blocks.1.1.proj_in.weight": (32, 32),
    UNET + "input_blocks.4.0.in_layers.2.weight": (64, 32, 3, 3),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 77),
    UNET + "middle_block.1.proj_out.weight": (64, 64),
    UNET + "output_blocks.3.0.skip_connection.weight": (64, 128, 1, 1),
    UNET + "output_blocks.11.1.proj_out.weight": (32, 32),
    UNET + "out.2.weight": (4, 32, 3, 3),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (77,),
    "first_stage_model.decoder.conv_in.weight": (16, 4, 3, 3),
}


def _random(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SMALL_KEYS.items()}


def _save(path, sd, dtype=torch.float32):
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_diff_matches_constructed_deltas(tmp_path):
    a = _random(1)
    b = {k: v.clone() for k, v in a.items()}
    # IN04: add a delta of exactly 10% of A's norm over that block; VAE: scale by 2 (cosine 1, rel L2 1)
    in04 = [k for k in a if block_of("sd1", k) == "IN04"]
    norm_a = math.sqrt(sum(float((a[k] ** 2).sum()) for k in in04))
    g = torch.Generator().manual_seed(7)
    deltas = {k: torch.randn(a[k].shape, generator=g, dtype=torch.float64) for k in in04}
    dn = math.sqrt(sum(float((d ** 2).sum()) for d in deltas.values()))
    for k in in04:
        b[k] = a[k] + deltas[k] * (0.1 * norm_a / dn)
    b["first_stage_model.decoder.conv_in.weight"] = a["first_stage_model.decoder.conv_in.weight"] * 2
    pa, pb = _save(tmp_path / "a.safetensors", a), _save(tmp_path / "b.safetensors", b)
    seen = []
    rep = diff_models(pa, pb, progress=lambda d, t, k: seen.append((d, t)), arch="sd1")
    assert seen[-1] == (len(SMALL_KEYS), len(SMALL_KEYS))
    # float32 files: the constructed numbers hold to float32 precision
    a32 = {k: v.float().double() for k, v in a.items()}
    b32 = {k: v.float().double() for k, v in b.items()}

    def ref(keys):
        sd = sum(float(((a32[k] - b32[k]) ** 2).sum()) for k in keys)
        sa = sum(float((a32[k] ** 2).sum()) for k in keys)
        sb = sum(float((b32[k] ** 2).sum()) for k in keys)
        dot = sum(float((a32[k] * b32[k]).sum()) for k in keys)
        return math.sqrt(sd / sa), dot / math.sqrt(sa * sb)

    r_in04 = rep.blocks["IN04"]
    assert r_in04.rel_l2 == pytest.approx(0.1, rel=1e-4)
    assert (r_in04.rel_l2, r_in04.cosine) == pytest.approx(ref(in04), rel=1e-5)
    assert rep.blocks["IN01"].rel_l2 == 0 and rep.blocks["IN01"].cosine == pytest.approx(1.0)
    assert rep.components["vae"].rel_l2 == pytest.approx(1.0, rel=1e-6)
    assert rep.components["vae"].cosine == pytest.approx(1.0, abs=1e-6)
    assert rep.components["text_encoder.clip_l"].rel_l2 == 0
    assert (rep.total.rel_l2, rep.total.cosine) == pytest.approx(ref(list(a)), rel=1e-5)
    assert rep.identical_keys == len(SMALL_KEYS) - len(in04) - 1
    assert rep.top_keys[0][0] == "first_stage_model.decoder.conv_in.weight"
    text = render_diff(rep)
    assert "IN04" in text and "0.10000" in text
    img = image_to_array(diff_heatmap(rep))
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["blocks"]["IN04"]["rel_l2"] == pytest.approx(0.1, rel=1e-4)


def test_diff_chunking_equals_whole(tmp_path):
    from merger_core.arch.diff import tensor_sums

    a = torch.randn(10_001, dtype=torch.float32)
    b = torch.randn(10_001, dtype=torch.float32)
    one = tensor_sums(a, b)
    many = tensor_sums(a, b, chunk=1000)
    assert many.sq_diff == pytest.approx(one.sq_diff, rel=1e-6)
    assert many.dot == pytest.approx(float((a.double() * b.double()).sum()), rel=1e-5, abs=1e-3)


def test_diff_skips_mismatched_keys_and_refuses_other_families(tmp_path):
    a = _random(1)
    b = _random(2)
    b[UNET + "out.2.weight"] = torch.zeros(4, 32, 1, 1, dtype=torch.float64)
    del b[UNET + "time_embed.0.weight"]
    pa, pb = _save(tmp_path / "a.safetensors", a), _save(tmp_path / "b.safetensors", b)
    rep = diff_models(pa, pb, arch="sd1")
    assert rep.skipped == {"only in A": 1, "shape differs": 1}
    assert rep.total.keys == len(SMALL_KEYS) - 2
    s1 = write_sparse(tmp_path / "sd1.safetensors", layout_from_fingerprint("sd1"))
    s2 = write_sparse(tmp_path / "xl.safetensors", layout_from_fingerprint("sdxl_base"))
    with pytest.raises(IncompatibleModelsError, match="different families"):
        diff_models(tmp_path / "sd1.safetensors", tmp_path / "xl.safetensors")


def test_diff_cancel(tmp_path):
    pa = _save(tmp_path / "a.safetensors", _random(1))
    pb = _save(tmp_path / "b.safetensors", _random(2))
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(MergeCancelled):
        diff_models(pa, pb, cancel=cancel)


def test_lineage_true_base_ranks_first(tmp_path):
    bases = {}
    for i, name in enumerate(["base_a", "base_b", "base_c"]):
        bases[name] = _random(100 + i)
    model = {k: v + 0.05 * torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
             for k, v in bases["base_b"].items()}
    paths = [_save(tmp_path / f"{n}.safetensors", sd, torch.float16) for n, sd in bases.items()]
    pm = _save(tmp_path / "finetune.safetensors", model, torch.float16)
    ranking = rank_bases(pm, paths, sample=6, max_elements=256)
    assert [os.path.basename(r[0]) for r in ranking][0] == "base_b.safetensors"
    best, second = ranking[0][1], ranking[1][1]
    assert best == pytest.approx(0.05, rel=0.25)  # the constructed delta, measured on a sample
    assert second > 1.0  # an unrelated random model is as far as the model itself
    assert any("sampled tensors compared" in e for e in ranking[0][2])


def test_lineage_marks_other_family_not_comparable(tmp_path):
    write_sparse(tmp_path / "xl.safetensors", layout_from_fingerprint("sdxl_base", components=[]))
    write_sparse(tmp_path / "sd1.safetensors", layout_from_fingerprint("sd1", components=[]))
    write_sparse(tmp_path / "xl2.safetensors", layout_from_fingerprint("sdxl_base", components=[]))
    r = rank_bases(tmp_path / "xl.safetensors", [tmp_path / "sd1.safetensors", tmp_path / "xl2.safetensors"], sample=4, max_elements=64)
    assert os.path.basename(r[0][0]) == "xl2.safetensors" and r[0][1] == 0.0  # zero files: identical
    assert math.isinf(r[1][1]) and "not comparable" in r[1][2][0]


def test_base_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    write_sparse(tmp_path / "sdxl.safetensors", layout_from_fingerprint("sdxl_base"))
    write_sparse(tmp_path / "sd15.safetensors", layout_from_fingerprint("sd1"))
    write_sparse(tmp_path / "junk.safetensors", {"x": ("F16", (2,))})
    e = register_base(tmp_path / "sdxl.safetensors", "SDXL 1.0")
    assert e.family == "sdxl" and e.arch_id == "sdxl_base"
    register_base(tmp_path / "sd15.safetensors")
    assert [b.name for b in list_bases()] == ["sd15", "SDXL 1.0"]
    assert [b.name for b in list_bases("sdxl")] == ["SDXL 1.0"]
    register_base(tmp_path / "sdxl.safetensors", "SDXL 1.0")  # same name: replaced, not duplicated
    assert len(list_bases()) == 2
    assert os.path.exists(tmp_path / "home" / "bases.json")
    with pytest.raises(BadFileError, match="junk.safetensors"):
        register_base(tmp_path / "junk.safetensors")
    remove_base("sd15")
    with pytest.raises(ManifestError, match="no registered base is called 'sd15'"):
        remove_base("sd15")
    assert [b.name for b in list_bases()] == ["SDXL 1.0"]

"""``cross-merge --to-lora`` (merger_core/merge/lora_sink.py): the merge's difference from the base written as a LoRA.

Checked against an independent path: the same cross-merge written as an fp32 checkpoint, then ``extract_lora`` of
(that - base) with the existing extractor, gives the same LoRA bytes; the LoRA applied to the base reproduces the
merge within the reported retained energy; keys taken from the base are not in the LoRA; cancel leaves nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from merger_core.errors import MergeCancelled
from merger_core.lora.delta import lora_deltas
from merger_core.lora.extract import extract_lora
from merger_core.lora.formats import LoraError, read_lora
from merger_core.merge.cross import CrossMergeRequest, cross_merge_to_file, plan_cross_merge
from merger_core.merge.lora_sink import merge_to_lora
from test_crossmerge import SD1_TE, VAE, make_family

CONV3 = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def family(tmp_path):
    base_paths, models, base, deltas = make_family(tmp_path / "f", 2, seed=5)
    return base_paths[0], models, base


@pytest.mark.parametrize("combine,settings", [("sum", dict(rank=4, conv_rank=2)), ("ties", dict(rank=8, energy=0.6))])
def test_same_bytes_as_extracting_from_the_fp32_cross_merge(tmp_path, family, combine, settings):
    base, models, _ = family
    req = CrossMergeRequest(models, base=base, combine=combine, weights=[1.0, 0.5], scale=0.8, density=0.5,
                            dtype="fp32")
    ckpt = tmp_path / "merged.safetensors"
    cross_merge_to_file(req, str(ckpt))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = extract_lora(str(ckpt), base, out_path=str(tmp_path / "a" / "x.safetensors"), **settings)
    req.dtype = "fp16"  # ignored: the LoRA path always merges in fp32
    got = merge_to_lora(plan_cross_merge(req).plan, tmp_path / "b" / "x.safetensors", **settings)
    assert got.output == str(tmp_path / "b" / "x.safetensors")
    assert sha(tmp_path / "a" / "x.safetensors") == sha(tmp_path / "b" / "x.safetensors")
    assert [(m.module, m.rank, m.retained) for m in got.extract.modules] == [
        (m.module, m.rank, m.retained) for m in ref.modules]
    assert got.extract.skipped_conv == ref.skipped_conv == 0
    assert got.keys_merged < got.keys_total  # the VAE (from the base), norms and biases are never merged


def test_round_trip_within_reported_energy_and_base_components_left_out(tmp_path, family):
    base, models, base_t = family
    req = CrossMergeRequest(models, base=base, combine="sum", scale=0.5, dtype="fp32", text_encoder="model:2")
    ckpt = tmp_path / "merged.safetensors"
    cross_merge_to_file(req, str(ckpt))
    merged = load_file(str(ckpt))
    out = tmp_path / "x.safetensors"
    res = merge_to_lora(plan_cross_merge(req).plan, out, rank=3, dtype="fp32")
    assert res.extract.skipped_conv > 0  # 3x3 convs need a conv rank
    lf = read_lora(out)
    assert not [m for m in lf.modules if "first_stage" in m]  # the VAE came from the base: no difference
    assert any(m.startswith("lora_te_") for m in lf.modules)  # text encoder taken from model 2: its difference
    md = lf.header.metadata
    assert md["ss_sd_model_name"] == os.path.basename(base) and md["ss_network_dim"] == "3"
    kd, report = lora_deltas({k: v.shape for k, v in base_t.items()}, [(str(out), 1.0, 1.0)])
    assert report.loras[0]["unmatched"] == []
    by_key = {m.key: m for m in res.extract.modules}
    assert CONV3 not in by_key
    for k, m in by_key.items():
        v = base_t[k].float().reshape(-1).clone()
        kd(k).add_to(v, 0)
        delta = merged[k].double() - base_t[k].double()
        err = float(((v.double() - merged[k].reshape(-1).double()) ** 2).sum() / (delta ** 2).sum())
        assert abs(err - (1.0 - m.retained)) < 1e-4, (k, err, m.retained)
    te = [k for k in by_key if k.startswith(SD1_TE)]
    assert te and not [k for k in by_key if k.startswith(VAE)]


def test_text_encoder_from_the_base_gives_no_text_encoder_modules(tmp_path, family):
    base, models, _ = family
    req = CrossMergeRequest(models, base=base, combine="sum", text_encoder="base")
    res = merge_to_lora(plan_cross_merge(req).plan, tmp_path / "x.safetensors", rank=2)
    assert res.extract.modules and not [m for m in res.extract.modules if m.module.startswith("lora_te")]


def test_cancel_leaves_nothing_and_bad_settings_are_refused_before_reading(tmp_path, family):
    base, models, _ = family
    plan = plan_cross_merge(CrossMergeRequest(models, base=base, combine="sum")).plan
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(MergeCancelled):
        merge_to_lora(plan, tmp_path / "x.safetensors", rank=2, cancel=cancel)
    assert os.listdir(tmp_path) == ["f"]
    with pytest.raises(LoraError, match="rank"):
        merge_to_lora(plan, tmp_path / "x.safetensors", rank=0)
    assert os.listdir(tmp_path) == ["f"]


def test_cli_to_lora(tmp_path, family, capsys):
    from merger_core.cli import cross_merge as cli_x
    from merger_core.cli import main

    base, models, _ = family
    p = argparse.ArgumentParser()
    cli_x.add_arguments(p)
    out = tmp_path / "l.safetensors"
    args = p.parse_args(models + ["--base", base, "--combine", "sum", "--to-lora", "--rank", "4", "--conv-rank", "2",
                                  "-o", str(out), "--no-progress"])
    assert cli_x.run(args) == 0
    text = capsys.readouterr().out
    assert "retained energy" in text and f"wrote {out}" in text
    assert read_lora(out).header.metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    # errors end in one line, never a traceback
    assert main(["cross-merge", *models, "--base", base, "--to-lora", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "--to-lora needs --rank" in capsys.readouterr().err
    assert main(["cross-merge", *models, "--base", base, "--rank", "4", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "go with --to-lora" in capsys.readouterr().err
    assert main(["cross-merge", *models, "--base", base, "--to-lora", "--rank", "4", "-o", str(out), "--no-progress"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()

"""The analyze / diff / lineage commands and the node-facing analyze_report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merger_core.report import analyze_report
from synth import layout_from_fingerprint, write_sparse
from merger_core.cli import main

UNET = "model.diffusion_model."


@pytest.fixture(autouse=True)
def plenty_of_disk(monkeypatch):
    """Verdicts must not depend on this machine's free disk (a 6.9 GB output is estimated)."""
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2 ** 50, 0, 2 ** 50))


@pytest.fixture
def files(tmp_path):
    write_sparse(tmp_path / "xl.safetensors", layout_from_fingerprint("sdxl_base"))
    write_sparse(tmp_path / "xl2.safetensors", layout_from_fingerprint("sdxl_base"),
                 metadata={"modelspec.architecture": "stable-diffusion-v1"})
    write_sparse(tmp_path / "sd1.safetensors", layout_from_fingerprint("sd1"))
    return tmp_path


def test_analyze_json(files, capsys):
    assert main(["analyze", str(files / "xl.safetensors"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"][0]["arch_id"] == "sdxl_base" and doc["errors"] == []


def test_analyze_table_and_disagreement(files, capsys):
    assert main(["analyze", str(files / "xl2.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "SDXL base" in out and "DISAGREEMENT: modelspec.architecture says sd1" in out


def test_analyze_folder_compat_and_image(files, capsys, tmp_path):
    png = tmp_path / "r.png"
    rc = main(["analyze", str(files), "--compat", "--brief", "--image", str(png)])
    out = capsys.readouterr().out
    assert rc == 1  # sd1 with sdxl cannot be merged
    assert "verdict: incompatible" in out and out.count(".safetensors") >= 3
    from PIL import Image

    assert Image.open(png).size[0] == 768


def test_analyze_compatible_pair_exit_0(files, capsys):
    assert main(["analyze", str(files / "xl.safetensors"), str(files / "xl2.safetensors"), "--compat", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["compatibility"]["verdict"] == "ok"


def test_analyze_bad_file(tmp_path, capsys):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01")
    assert main(["analyze", str(p)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def _small(path, seed, base=None, scale=0.0):
    g = torch.Generator().manual_seed(seed)
    sd = {UNET + "input_blocks.4.1.proj_in.weight": torch.randn(64, 64, generator=g),
          UNET + "middle_block.1.proj_out.weight": torch.randn(64, 64, generator=g),
          UNET + "out.2.weight": torch.randn(4, 32, 3, 3, generator=g)}
    if base is not None:
        sd = {k: base[k] + scale * v for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


def test_diff_and_lineage_commands(tmp_path, capsys):
    base = _small(tmp_path / "base.safetensors", 1)
    _small(tmp_path / "other.safetensors", 2)
    _small(tmp_path / "ft.safetensors", 3, base=base, scale=0.1)
    png = tmp_path / "h.png"
    assert main(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), "--arch", "sd1",
                 "--json", "--no-progress", "--image", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["blocks"]) == {"IN04", "M00", "OUT11"}
    assert doc["total"]["rel_l2"] == pytest.approx(0.1, rel=0.2)
    assert png.exists()
    assert main(["lineage", str(tmp_path / "ft.safetensors"), str(tmp_path / "other.safetensors"),
                 str(tmp_path / "base.safetensors"), "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    assert ranking[0]["base"].endswith("base.safetensors")
    from merger_core.report import diff_report

    text, img = diff_report(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", arch="sd1")
    assert "M00" in text and img.ndim == 3 and img.dtype == np.float32


def test_analyze_report_for_the_node(files):
    text, img = analyze_report(str(files / "xl2.safetensors"))
    assert "SDXL base" in text and "says sd1" in text
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    text2, img2 = analyze_report([files / "xl.safetensors", files / "sd1.safetensors"])
    assert "== compatibility" in text2 and "incompatible" in text2
    assert img2.shape[0] > img.shape[0]

"""The LoRA commands (extract-lora, merge-loras): output, and error paths that end in one line, never a traceback."""

from __future__ import annotations

import pytest
import torch

from lora_synth import SD1_SHAPES, SD1_TO_K, gen, save
from merger_core.cli import main
from merger_core.cli.merge_loras import parse_lora_arg


@pytest.fixture
def models(tmp_path):
    r = gen(31)
    base = {k: r(*s) for k, s in SD1_SHAPES.items()}
    tuned = dict(base)
    tuned[SD1_TO_K] = base[SD1_TO_K] + r(8, 2) @ r(2, 768)
    return save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)


def test_extract_then_merge(models, tmp_path, capsys):
    b, t = models
    out = tmp_path / "l.safetensors"
    assert main(["extract-lora", t, "--base", b, "--rank", "4", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "retained energy" in text and "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k" in text
    assert out.exists()
    merged = tmp_path / "m.safetensors"
    assert main(["merge-loras", f"{out}:0.5", str(out), "--rank", "2", "-o", str(merged), "--no-progress"]) == 0
    assert merged.exists() and "wrote" in capsys.readouterr().out


def test_error_paths(models, tmp_path, capsys):
    b, t = models
    out = tmp_path / "l.safetensors"
    assert main(["extract-lora", str(tmp_path / "nope.safetensors"), "--base", b, "--rank", "4", "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    out.write_bytes(b"keep")
    assert main(["extract-lora", t, "--base", b, "--rank", "4", "-o", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", t, "--base", b, "--rank", "0", "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract-lora", t, "--base", b, "--rank", "4", "--energy", "1.5", "-o", str(tmp_path / "x.safetensors")])
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["merge-loras", str(tmp_path / "none.safetensors:0.5"), "--rank", "2", "-o", str(tmp_path / "y.safetensors")]) == 2
    assert "none.safetensors: file not found" in capsys.readouterr().err


def test_lora_argument_syntax(tmp_path):
    assert parse_lora_arg("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\a.safetensors:-0.5") == ("C:\\loras\\a.safetensors", -0.5)
    odd = tmp_path / "x:2"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)  # a file whose name ends in :2 is that file

"""Compatibility preflight on incompatible and partly compatible pairs (headers only, sparse full-size files)."""

from __future__ import annotations

import json
import os

import pytest

from merger_core.arch import check_compatibility, require_compatible
from merger_core.report.text import render_compat
from synth import layout_from_fingerprint, layout_from_json, write_sparse
from merger_core.errors import IncompatibleModelsError

LAYOUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "layouts")
UNET = "model.diffusion_model."


@pytest.fixture(autouse=True)
def plenty_of_disk(monkeypatch):
    """Full-size layouts estimate outputs of many GiB: the verdicts under test must not depend on this machine's
    free disk (test_not_enough_disk_is_reported sets its own)."""
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2 ** 50, 0, 2 ** 50))


def _layout(name):
    path = os.path.join(LAYOUT_DIR, name + ".json")
    if not os.path.exists(path):
        pytest.skip("../shared/layouts not present")
    with open(path) as f:
        return layout_from_json(json.load(f))


def _write(tmp_path, name, spec, **kw):
    p = tmp_path / f"{name}.safetensors"
    write_sparse(p, spec, **kw)
    return str(p)


def test_same_architecture_is_ok(tmp_path):
    a = _write(tmp_path, "a", layout_from_fingerprint("sdxl_base"))
    b = _write(tmp_path, "b", layout_from_fingerprint("sdxl_base"))
    rep = check_compatibility([a, b])
    assert rep.verdict == "ok" and rep.ok and not rep.problems
    assert all(c.status == "same" for c in rep.components.values())
    require_compatible(rep)
    assert rep.estimates.output_bytes >= os.path.getsize(a) - 1_000_000
    assert rep.estimates.disk_free_bytes is not None


def test_sd15_with_sdxl_is_incompatible(tmp_path):
    a = _write(tmp_path, "sd15", layout_from_fingerprint("sd1"))
    b = _write(tmp_path, "sdxl", layout_from_fingerprint("sdxl_base"))
    rep = check_compatibility([a, b])
    assert rep.verdict == "incompatible"
    assert any("different model families" in p and "sd15.safetensors is Stable Diffusion 1.x" in p for p in rep.problems)
    unet = rep.components["unet"]
    assert unet.status == "shapes_differ"
    k = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert unet.shape_mismatch_count > 0
    with pytest.raises(IncompatibleModelsError, match="different model families"):
        require_compatible(rep)


def test_sd15_with_sdxl_full_layouts_name_shapes(tmp_path):
    a = _write(tmp_path, "sd15", _layout("sd15"))
    b = _write(tmp_path, "sdxl", _layout("sdxl_base"))
    rep = check_compatibility([a, b])
    assert rep.verdict == "incompatible"
    text = render_compat(rep)
    assert "unet: input_blocks.0.0.weight" not in text  # same shape in both: not listed
    assert "shape diffs" in text and "lacks" in text
    # the VAE is the same structure in both: the report says so
    assert rep.components["vae"].status == "same"
    assert rep.components["text_encoder.clip_l"].present_in == [0, 1]


def test_base_with_refiner(tmp_path):
    a = _write(tmp_path, "base", _layout("sdxl_base"))
    b = _write(tmp_path, "refiner", _layout("sdxl_refiner"))
    rep = check_compatibility([a, b])
    assert rep.verdict == "incompatible"
    assert any("SDXL refiner" in p for p in rep.problems)
    assert rep.components["unet"].status == "shapes_differ"
    # CLIP-G has the same relative keys in both (embedders.1 in base, embedders.0 in the refiner)
    assert rep.components["text_encoder.clip_g"].status == "same"
    assert rep.components["text_encoder.clip_l"].status == "missing_in_some"
    assert rep.components["text_encoder.clip_l"].missing_in == [1]


def test_inpainting_with_normal_offers_common_channels(tmp_path):
    spec = layout_from_fingerprint("sd1")
    a = _write(tmp_path, "normal", spec)
    inp = dict(spec)
    inp[UNET + "input_blocks.0.0.weight"] = ("F16", (320, 9, 3, 3))
    b = _write(tmp_path, "inpaint", inp)
    rep = check_compatibility([a, b])
    assert rep.verdict == "ok_with_options"
    u = rep.components["unet"]
    assert u.status == "variant_differs" and u.shape_mismatch_count == 1
    assert u.shape_mismatch["input_blocks.0.0.weight"] == {0: [320, 4, 3, 3], 1: [320, 9, 3, 3]}
    assert any("common input channels" in o for o in rep.options)
    assert any("normal" in n and "inpaint" in n for n in u.notes)


def test_missing_vae_offers_take_or_drop(tmp_path):
    a = _write(tmp_path, "full", layout_from_fingerprint("sdxl_base"))
    b = _write(tmp_path, "novae", layout_from_fingerprint("sdxl_base", components=["text_encoder.clip_l", "text_encoder.clip_g"]))
    rep = check_compatibility([a, b])
    assert rep.verdict == "ok_with_options"
    v = rep.components["vae"]
    assert v.status == "missing_in_some" and v.missing_in == [1]
    assert any(o.startswith("vae: drop it") and "full.safetensors" in o for o in rep.options)


def test_unet_only_against_checkpoint_compares_inside_the_component(tmp_path):
    a = _write(tmp_path, "ckpt", layout_from_fingerprint("flux_dev"))
    b = _write(tmp_path, "bare", layout_from_fingerprint("flux_dev", prefix=""))
    rep = check_compatibility([a, b])
    assert rep.components["unet"].status == "same"
    assert any("key layouts differ" in n for n in rep.notes)  # issue 12 item 7: compared by canonical name
    assert rep.canonical and rep.keys.ok


def test_dtype_mix_is_a_note_not_a_problem(tmp_path):
    spec = layout_from_fingerprint("sd1")
    a = _write(tmp_path, "fp16", spec)
    b = _write(tmp_path, "fp32", {k: ("F32", s) for k, (d, s) in spec.items()})
    rep = check_compatibility([a, b], out_dtype="fp16")
    assert rep.verdict == "ok"
    assert any("dtypes differ" in n for n in rep.components["unet"].notes)
    assert rep.estimates.output_bytes < os.path.getsize(b)


def test_unknown_file_is_a_problem(tmp_path):
    a = _write(tmp_path, "a", layout_from_fingerprint("sd1"))
    b = _write(tmp_path, "junk", {"foo.weight": ("F16", (4, 4))})
    rep = check_compatibility([a, b])
    assert rep.verdict == "incompatible"
    assert any("junk.safetensors: architecture not recognised" in p for p in rep.problems)


def test_not_enough_disk_is_reported(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    a = _write(tmp_path, "a", layout_from_fingerprint("sd1"))
    b = _write(tmp_path, "b", layout_from_fingerprint("sd1"))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 ** 12, 10 ** 12 - 10 ** 6, 10 ** 6))
    rep = check_compatibility([a, b], output_path=str(tmp_path / "out.safetensors"))
    assert rep.verdict == "incompatible" and not rep.estimates.fits
    assert any("not enough free disk" in p for p in rep.problems)


def test_gpu_estimate_present_for_a_gpu_device(tmp_path):
    a = _write(tmp_path, "a", layout_from_fingerprint("sd1"))
    rep = check_compatibility([a, a], device="cuda:0")
    assert rep.estimates.vram_bytes is not None and rep.estimates.vram_bytes > 0
    json.dumps(rep.to_dict())


def test_flux_dev_with_schnell_differs_only_by_guidance_in(tmp_path):
    dev = layout_from_fingerprint("flux_dev", prefix="")
    a = _write(tmp_path, "dev", dev)
    b = _write(tmp_path, "schnell", {k: v for k, v in dev.items() if not k.startswith("guidance_in.")})
    rep = check_compatibility([a, b])
    assert [d.arch_id for d in rep.detections] == ["flux_dev", "flux_schnell"]
    assert rep.verdict == "ok_with_options"
    u = rep.components["unet"]
    assert u.status == "keys_differ" and u.keys_missing[1] == ["guidance_in.in_layer.weight"]


def test_prefix_difference_needs_a_choice_and_is_not_counted_twice(tmp_path):
    spec = layout_from_fingerprint("flux_dev", prefix="")
    a = _write(tmp_path, "bare", spec)
    b = _write(tmp_path, "ckpt", layout_from_fingerprint("flux_dev"))
    one = check_compatibility([a, a]).estimates.output_bytes
    rep = check_compatibility([a, b])
    assert rep.verdict == "ok"  # issue 12 item 7: bare and prefixed keys are merged by canonical name, no choice
    assert not any("same prefix" in o for o in rep.options)
    assert rep.estimates.output_bytes == pytest.approx(one, rel=0.001)

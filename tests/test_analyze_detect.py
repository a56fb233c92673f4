"""Architecture detection from headers: sparse full-size files from the compact fingerprints (always) and from the
full reference layouts in ../shared/layouts (when present), plus synthetic variants."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest

from merger_core.arch import detect, load_fingerprints
from merger_core.arch.blocks import block_of, blocks
from synth import layout_from_fingerprint, layout_from_json, write_sparse
from merger_core.errors import BadFileError

LAYOUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "layouts")
LAYOUTS = sorted(glob.glob(os.path.join(LAYOUT_DIR, "*.json")))
EXPECTED = {  # layout file -> (arch_id, layout, prediction)
    "sd15": ("sd1", "checkpoint", "eps"),
    "sd21_768v": ("sd2", "checkpoint", "v"),
    "sdxl_base": ("sdxl_base", "checkpoint", "eps"),
    "sdxl_refiner": ("sdxl_refiner", "checkpoint", "eps"),
    "sd3_medium": ("sd3_medium", "checkpoint", "flow"),
    "sd3_medium_t5": ("sd3_medium", "checkpoint", "flow"),
    "flux1_dev": ("flux_dev", "unet_only", "flow"),
    "flux1_dev_bfl": ("flux_dev", "unet_only", "flow"),
}
ARCH_IDS = ["sd1", "sd2", "sdxl_base", "sdxl_refiner", "sd3_medium", "sd35_medium", "sd3_large", "flux_dev", "flux_schnell"]
UNET = "model.diffusion_model."


def _load_layout(name):
    path = os.path.join(LAYOUT_DIR, name + ".json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (../shared is optional)")
    with open(path) as f:
        return json.load(f)


def test_every_architecture_has_a_fingerprint():
    assert set(ARCH_IDS) <= set(load_fingerprints())


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_detect_sparse_from_compact_fingerprint(tmp_path, arch):
    p = tmp_path / f"{arch}.safetensors"
    spec = layout_from_fingerprint(arch)
    size = write_sparse(p, spec)
    assert os.path.getsize(p) == size
    det = detect(p)
    assert det.arch_id == arch, det.evidence
    assert det.variant == "normal"
    assert det.mergeable
    fp = load_fingerprints()[arch]
    assert det.components["unet"].status == "present"
    assert det.components["unet"].params == fp.components["unet"].params
    for name, c in fp.components.items():
        if c.required:
            assert det.components[name].status == "present", name


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detect_sparse_full_layout(tmp_path, name):
    doc = _load_layout(name)
    p = tmp_path / f"{name}.safetensors"
    write_sparse(p, layout_from_json(doc))
    det = detect(p)
    arch, layout, pred = EXPECTED[name]
    assert (det.arch_id, det.layout, det.prediction) == (arch, layout, pred), det.evidence
    assert det.params == doc["totals"]["params"]
    # every component the reference layout has is found complete
    assert det.expected_params == det.params
    assert not det.warnings and not det.disagreements
    assert det.file_size == os.path.getsize(p)


def test_full_layout_block_map_covers_every_unet_key():
    for name, arch in (("sd15", "sd1"), ("sdxl_base", "sdxl_base"), ("sdxl_refiner", "sdxl_refiner"),
                       ("sd3_medium", "sd3_medium"), ("flux1_dev", "flux_dev")):
        path = os.path.join(LAYOUT_DIR, name + ".json")
        if not os.path.exists(path):
            pytest.skip("../shared/layouts not present")
        keys = json.load(open(path))["tensors"]
        names = set(blocks(arch))
        seen = set()
        for k in keys:
            b = block_of(arch, k)
            if k.startswith(UNET):
                assert b is not None, (arch, k)
            if b is not None:
                assert b in names, (arch, k, b)
                seen.add(b)
        # every UNet block of the map has at least one key
        unet_blocks = {b for b in names if b not in ("BASE", "VAE")}
        assert unet_blocks <= seen, unet_blocks - seen


def test_block_map_examples():
    assert blocks("sd1") == ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    assert blocks("sdxl_base")[-1] == "VAE" and len(blocks("sdxl_base")) == 21
    assert block_of("sd1", UNET + "input_blocks.11.0.emb_layers.1.weight") == "IN11"
    assert block_of("sd1", "input_blocks.11.0.emb_layers.1.weight") == "IN11"  # bare UNet-only key
    assert block_of("sd1", UNET + "middle_block.2.out_layers.3.weight") == "M00"
    assert block_of("sd1", UNET + "out.0.weight") == "OUT11"
    assert block_of("sdxl_base", UNET + "out.0.weight") == "OUT08"
    assert block_of("sdxl_base", UNET + "label_emb.0.0.weight") == "IN00"
    assert block_of("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight") == "BASE"
    assert block_of("sd1", "first_stage_model.decoder.conv_in.weight") == "BASE"
    assert block_of("sdxl_base", "first_stage_model.decoder.conv_in.weight") == "VAE"
    assert block_of("sdxl_base", "conditioner.embedders.1.model.ln_final.weight") == "BASE"
    assert block_of("flux_dev", "single_blocks.37.linear2.weight") == "S37"
    assert block_of("sd1", "v_pred") is None
    with pytest.raises(KeyError):
        blocks("no_such_arch")


def _sdxl_spec():
    return layout_from_fingerprint("sdxl_base")


@pytest.mark.parametrize("arch,channels,variant", [("sd1", 9, "inpaint"), ("sd1", 8, "pix2pix"), ("sdxl_base", 9, "inpaint"),
                                                   ("sd2", 5, "depth")])
def test_channel_variants(tmp_path, arch, channels, variant):
    spec = layout_from_fingerprint(arch)
    k = UNET + "input_blocks.0.0.weight"
    d, s = spec[k]
    spec[k] = (d, (s[0], channels) + s[2:])
    p = tmp_path / "v.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == arch and det.variant == variant
    assert any("input channels" in e for e in det.evidence)


def test_unknown_channel_count_is_flagged_not_guessed(tmp_path):
    spec = layout_from_fingerprint("sd1")
    k = UNET + "input_blocks.0.0.weight"
    spec[k] = ("F16", (320, 7, 3, 3))
    p = tmp_path / "odd.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "sd1" and det.variant.startswith("unknown (7")
    assert det.warnings


@pytest.mark.parametrize("prefix,layout", [("", "unet_only"), (UNET, "unet_only")])
def test_unet_only(tmp_path, prefix, layout):
    spec = layout_from_fingerprint("sdxl_base", prefix=prefix, components=[])
    p = tmp_path / "unet.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "sdxl_base" and det.layout == layout
    assert det.components["vae"].status == "missing"
    assert det.components["text_encoder.clip_g"].status == "missing"
    assert det.unet_prefix == prefix


def test_no_vae(tmp_path):
    spec = layout_from_fingerprint("sd1", components=["text_encoder.clip_l"])
    p = tmp_path / "novae.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "sd1" and det.layout == "checkpoint"
    assert det.components["vae"].status == "missing"
    assert "no vae in the file" in det.evidence


def test_fp8_and_mixed_dtypes(tmp_path):
    spec = {k: ("F8_E4M3" if k.startswith(UNET) else "F32", s) for k, (d, s) in layout_from_fingerprint("flux_dev").items()}
    p = tmp_path / "fp8.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "flux_dev"
    assert det.dtype_label == "fp8_e4m3fn"
    assert det.components["unet"].dtype_label == "fp8_e4m3fn"
    spec2 = layout_from_fingerprint("sd1")
    spec2 = {k: ("F32" if k.startswith("first_stage_model.") else d, s) for k, (d, s) in spec2.items()}
    p2 = tmp_path / "mixed.safetensors"
    write_sparse(p2, spec2)
    det2 = detect(p2)
    assert det2.dtype_label.startswith("mixed (fp16")
    assert det2.components["vae"].dtype_label == "fp32"
    # expected size follows each component's own dtype
    assert det2.expected_data_bytes == det2.data_bytes


def test_renamed_prefix_is_recognised_with_a_warning(tmp_path):
    spec = {("unet." + k[len(UNET):] if k.startswith(UNET) else k): v for k, v in layout_from_fingerprint("sdxl_base").items()}
    p = tmp_path / "renamed.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "sdxl_base" and det.layout == "renamed_prefix" and det.unet_prefix == "unet."
    assert any("'unet.'" in w for w in det.warnings)


def test_truncated_header_is_a_clear_error(tmp_path):
    p = tmp_path / "trunc.safetensors"
    write_sparse(p, layout_from_fingerprint("sd1"))
    raw = open(p, "rb").read(4096)
    with open(p, "wb") as f:
        f.write(raw)
    with pytest.raises(BadFileError, match="trunc.safetensors"):
        detect(p)


def test_no_known_keys_is_an_honest_unknown(tmp_path):
    p = tmp_path / "mystery.safetensors"
    write_sparse(p, {"foo.weight": ("F16", (10, 10)), "bar.bias": ("F32", (10,))})
    det = detect(p)
    assert det.arch_id == "unknown" and det.closest is None and not det.mergeable
    assert "none of the 2 keys" in det.evidence[0]


def test_partial_match_names_the_closest_and_the_difference(tmp_path):
    spec = layout_from_fingerprint("sdxl_base")
    k = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    spec[k] = ("F16", (640, 4096))  # a context width no known model has
    p = tmp_path / "odd_ctx.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "unknown"
    assert det.closest == "sdxl_base" and 0.9 < det.closest_score < 1
    assert any("[640, 4096]" in e and "[640, 2048]" in e for e in det.evidence)


def test_fewer_blocks_is_unknown(tmp_path):
    spec = {k: v for k, v in layout_from_fingerprint("flux_dev").items() if not k.startswith(UNET + "single_blocks.37.")}
    p = tmp_path / "short.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == "unknown" and det.closest in ("flux_dev", "flux_schnell")
    assert any("single_blocks: 37 numbered blocks" in e for e in det.evidence)


def test_flux_schnell_vs_dev(tmp_path):
    dev = layout_from_fingerprint("flux_dev", prefix="")
    schnell = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    p = tmp_path / "s.safetensors"
    write_sparse(p, schnell)
    assert detect(p).arch_id == "flux_schnell"


def _std_bytes(n, std, seed=0):
    x = np.random.default_rng(seed).normal(0, std, n).astype(np.float16)
    return x.tobytes()


@pytest.mark.parametrize("std,pred", [(0.2, "v"), (0.02, "eps"), (0.0, "eps")])
def test_sd2_prediction_from_one_tensor(tmp_path, std, pred):
    spec = layout_from_fingerprint("sd2")
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spec[key] = ("F16", (320,))
    p = tmp_path / "sd2.safetensors"
    write_sparse(p, spec, values={key: _std_bytes(320, std)} if std else None)
    det = detect(p)
    assert det.arch_id == "sd2" and det.prediction == pred, det.prediction_source
    assert "std of" in det.prediction_source
    assert detect(p, read_probe=False).prediction == "unknown"


def test_marker_keys_and_metadata_claims(tmp_path):
    spec = layout_from_fingerprint("sdxl_base")
    spec["v_pred"] = ("F32", (0,))
    spec["ztsnr"] = ("F32", (0,))
    p = tmp_path / "noobai_vpred.safetensors"
    write_sparse(p, spec, metadata={"modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "epsilon"})
    det = detect(p)
    assert det.arch_id == "sdxl_base" and det.prediction == "v + ztsnr"
    assert det.claimed_family == "sd1"
    assert any("says sd1" in d and "structure says sdxl" in d for d in det.disagreements)
    assert any("prediction eps" in d for d in det.disagreements)


def test_pony_name_agrees_with_sdxl(tmp_path):
    p = tmp_path / "ponyDiffusionV6XL.safetensors"
    write_sparse(p, layout_from_fingerprint("sdxl_base"), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    det = detect(p)
    assert det.family == "sdxl" and det.claimed_family == "sdxl" and not det.disagreements


@pytest.mark.parametrize("keys,layout,family", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "kohya_lora", "unknown"),
    ({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
      "conv_in.weight": (320, 4, 3, 3), "mid_block.resnets.0.conv1.weight": (1280, 1280, 3, 3)}, "diffusers_unet", "sdxl"),
    ({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "ldm_vae", "sd_vae_4ch"),
])
def test_name_recognised_layouts_are_refused(tmp_path, keys, layout, family):
    p = tmp_path / "x.safetensors"
    write_sparse(p, {k: ("F16", s) for k, s in keys.items()})
    det = detect(p)
    assert det.layout == layout and det.arch_id == "unknown" and not det.mergeable
    assert det.family == family
    assert det.refusal


def test_to_dict_is_json(tmp_path):
    p = tmp_path / "a.safetensors"
    write_sparse(p, layout_from_fingerprint("sd1"))
    d = detect(p).to_dict()
    back = json.loads(json.dumps(d))
    assert back["arch_id"] == "sd1" and back["components"]["vae"]["status"] == "present"
    assert back["components"]["unet"]["dtype_label"] == "fp16"


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_sd2_probe_other_dtypes(tmp_path, dtype):
    import torch

    spec = layout_from_fingerprint("sd2")
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spec[key] = (dtype, (320,))
    t = torch.from_numpy(np.random.default_rng(1).normal(0, 0.2, 320)).to(torch.bfloat16 if dtype == "BF16" else torch.float32)
    raw = t.view(torch.int16).numpy().tobytes() if dtype == "BF16" else t.numpy().tobytes()
    p = tmp_path / "sd2.safetensors"
    write_sparse(p, spec, values={key: raw})
    det = detect(p)
    assert det.prediction == "v"
    assert f"{float(t.float().std()):.3f}" in det.prediction_source


# ------------------------------------------------------------------------------------------------- ModelSpec label


@pytest.mark.parametrize("arch_id, prefix, want", [
    ("sd1", UNET, "stable-diffusion-v1"),
    ("sdxl_base", UNET, "stable-diffusion-xl-v1-base"),
    ("sdxl_base", "", "stable-diffusion-xl-v1-base"),  # a UNet-only file (the old key probe said "unknown")
    ("sd35_medium", UNET, "stable-diffusion-v3.5-medium"),  # the old key probe said "stable-diffusion-v3-medium"
    ("sd3_large", UNET, "stable-diffusion-v3.5-large"),
    ("flux_dev", "", "flux-1-dev"),
])
def test_modelspec_label_comes_from_the_detector(tmp_path, arch_id, prefix, want):
    from merger_core.arch import modelspec_architecture

    p = tmp_path / f"{arch_id}.safetensors"
    write_sparse(p, layout_from_fingerprint(arch_id, prefix=prefix))
    assert modelspec_architecture(detect(p)) == want


def test_known_key_names_at_other_widths_are_named_but_not_labelled(tmp_path):
    """The demo's narrow SD1.5-keyed files: the key layout is named, the ModelSpec label claims nothing."""
    import helpers
    from merger_core.arch import modelspec_architecture

    det = detect(helpers.write_model(tmp_path / "narrow.safetensors"))
    assert not det.known and det.key_layout == ["sd1"]
    assert det.arch_name == "SD1 layout, non-standard widths"
    assert modelspec_architecture(det) == "unknown"

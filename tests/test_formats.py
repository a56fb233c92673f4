"""Element formats the engine must carry: 8-byte elements (F64, I64, U64) larger than a chunk, fp8 inputs for every
method, and quantized checkpoints (ComfyUI's scaled fp8, bitsandbytes NF4/FP4, GGUF). Real safetensors files,
checked against float64 computations written here."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.merge.plan import MergeInput, MergePlan, prepare
from merger_core.merge.runner import merge_to_file, merge_to_state_dict

# ------------------------------------------------------------------------------------------------- 8-byte elements

BIG = (1024, 513)  # 525,312 elements: more than the 512 Ki that fit one 4 MiB chunk at 8 bytes each


@pytest.mark.parametrize("dtype, expect", [("keep", "F64"), ("fp32", "F32")])
def test_eight_byte_tensors_larger_than_a_chunk_merge_to_file(tmp_path, dtype, expect):
    extra = {"extra.f64": ("F64", BIG), "extra.i64": ("I64", BIG), "extra.u64": ("U64", (3, 5))}
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1, extra=extra)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2, extra=extra, offset=0.5, scale=2.0)
    sd = load_file(b)
    sd["extra.i64"] = sd["extra.i64"] * 3 + 7  # the first model's integers must win, unchanged
    save_file(sd, b)
    weights = [0.3, 0.7]
    out = tmp_path / "merged.safetensors"
    merge_to_file(helpers.plan_for([a, b], weights, dtype=dtype), out)
    ref, bound = helpers.reference_merge([a, b], weights)
    rep = helpers.check_against_reference(str(out), ref, bound, 2)
    assert rep.ok, rep.problems[:5]
    merged = load_file(str(out))
    assert merged["extra.f64"].dtype == {"F64": torch.float64, "F32": torch.float32}[expect]
    assert merged["extra.i64"].dtype == torch.int64
    assert torch.equal(merged["extra.i64"], load_file(a)["extra.i64"])
    # the file path and the in-memory path give the same tensors
    mem, _ = merge_to_state_dict(helpers.plan_for([a, b], weights, dtype=dtype))
    for k in ("extra.f64", "extra.i64", "extra.u64", helpers.KEY_CONV_IN):
        assert torch.equal(mem[k], merged[k]), k


# ------------------------------------------------------------------------------------------------- quantized files

import struct  # noqa: E402

from merger_core.arch.detect import detect  # noqa: E402
from merger_core.errors import BadFileError, IncompatibleModelsError, ManifestError  # noqa: E402
from merger_core.io.safetensors import read_header  # noqa: E402
from merger_core.report.text import render_detection, render_detections  # noqa: E402

UNET = helpers.UNET


def linear_keys(layout, limit=None):
    """The UNet's 2-D weights (Linear layers: what ComfyUI quantizes), in sorted order."""
    keys = sorted(k for k, (dt, shape) in layout.items() if k.startswith(UNET) and k.endswith(".weight") and len(shape) == 2)
    return keys[:limit] if limit else keys


def write_gguf(path):
    """The start of a GGUF file: magic, version 3, no tensors, no metadata."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return str(path)


@pytest.mark.parametrize("name", ["model.gguf", "renamed.safetensors"])
def test_gguf_file_is_named_and_a_conversion_suggested(tmp_path, name):
    path = write_gguf(tmp_path / name)
    for call in (lambda: read_header(path), lambda: detect(path)):
        with pytest.raises(BadFileError) as exc:
            call()
        msg = str(exc.value)
        assert name in msg and "GGUF" in msg and "ComfyUI-GGUF" in msg and "convert" in msg, msg
    other = helpers.write_model(tmp_path / "b.safetensors", seed=1)
    with pytest.raises(BadFileError, match="GGUF"):
        prepare(helpers.plan_for([other, path]))


def write_bnb(path, kind):
    """A checkpoint laid out as bitsandbytes saves a 4-bit model: each quantized Linear weight becomes packed U8
    codes plus ``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
    ``.quant_state.bitsandbytes__{kind}``; the other tensors stay fp16."""
    layout = helpers.small_layout()
    sd = helpers.make_tensors(layout, seed=3)
    for k in linear_keys(layout):
        n = sd[k].numel()
        sd[k] = torch.randint(0, 255, ((n + 1) // 2, 1), dtype=torch.uint8)
        sd[k + ".absmax"] = torch.randint(0, 255, (-(-n // 64),), dtype=torch.uint8)
        sd[k + ".quant_map"] = torch.linspace(-1, 1, 16)
        sd[k + ".nested_absmax"] = torch.rand(1)
        sd[k + ".nested_quant_map"] = torch.linspace(-1, 1, 256)
        sd[k + f".quant_state.bitsandbytes__{kind}"] = torch.randint(0, 255, (120,), dtype=torch.uint8)
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("kind, label", [("nf4", "NF4"), ("fp4", "FP4")])
def test_bitsandbytes_4bit_is_detected_and_refused(tmp_path, kind, label):
    path = write_bnb(tmp_path / f"model-{kind}.safetensors", kind)
    det = detect(path)
    assert det.quantization == kind
    assert not det.mergeable and label in det.refusal
    text = render_detection(det)
    assert f"bitsandbytes {label}" in text, text
    assert kind in render_detections([det])
    assert det.to_dict()["quantization"] == kind
    other = helpers.write_model(tmp_path / "plain.safetensors", seed=1)
    with pytest.raises(IncompatibleModelsError) as exc:
        prepare(helpers.plan_for([other, path], allow_missing=True))
    msg = str(exc.value)
    assert f"model-{kind}.safetensors" in msg and label in msg and "unquantized" in msg and "bitsandbytes" in msg, msg
    assert "plain.safetensors" not in msg


def test_plain_checkpoint_has_no_quantization(tmp_path):
    path = helpers.write_model(tmp_path / "plain.safetensors", seed=1)
    det = detect(path)
    assert det.quantization is None
    assert "quantization" not in render_detection(det)


SCALE_INPUT_KEYS = 3  # layers that also carry a .scale_input (ComfyUI writes it for fp8 matrix multiplication)


def write_scaled_fp8(path, seed=3, fp8=torch.float8_e4m3fn, marker_shape=(0,), other_dtype="F16", layout=None):
    """A checkpoint laid out as ComfyUI saves scaled fp8: each UNet Linear weight is fp8 codes with a per-layer fp32
    ``.scale_weight`` (value = codes * scale), a few layers carry a ``.scale_input``, and the marker tensor
    ``model.diffusion_model.scaled_fp8`` (empty, of the fp8 dtype); everything else stays ``other_dtype``.
    Returns the path and the dequantized values in float64 (what the file means)."""
    layout = layout or helpers.small_layout(other_dtype)
    sd = helpers.make_tensors(layout, seed=seed)
    meaning = {k: v.to(torch.float64) for k, v in sd.items()}
    top = torch.finfo(fp8).max
    for i, k in enumerate(linear_keys(layout)):
        w = sd[k].float()
        scale = torch.tensor(float(w.abs().max()) / top * 1.5, dtype=torch.float32)  # codes up to 2/3 of the fp8 range
        codes = (w / scale).clamp(-top, top).to(fp8)
        sd[k] = codes
        sd[k[: -len("weight")] + "scale_weight"] = scale
        if i < SCALE_INPUT_KEYS:
            sd[k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        meaning[k] = (codes.float() * scale).to(torch.float64)  # what ComfyUI computes: codes.float() * scale
    sd[UNET + "scaled_fp8"] = torch.zeros(marker_shape, dtype=fp8)
    save_file(sd, str(path))
    return str(path), meaning


def ref_weighted(meanings, weights, key):
    total = sum(weights)
    return sum(w / total * m[key] for w, m in zip(weights, meanings))


def assert_close_to(got, ref, st_dtype, terms):
    """Within one ULP of the output dtype plus the fp32 accumulation bound of ``terms`` inputs."""
    from oracle import ulp

    err = (got.to(torch.float64) - ref).abs()
    tol = ulp(ref, st_dtype) + (terms + 3) * 2.0**-23 * ref.abs().clamp_min(1.0) * 4
    assert bool((err <= tol).all()), float((err - tol).max())


@pytest.mark.parametrize("method,params", [("weighted_sum", {}), ("ties", {"density": 0.5}), ("slerp", {"t": 0.3})])
def test_scaled_fp8_inputs_on_the_device_path_give_the_cpu_paths_bytes(tmp_path, method, params, monkeypatch):
    """Scaled fp8 inputs (codes times a per-layer scale) through the device path (forced on the CPU), where the
    tensor methods load slices dequantized on the device, match the chunked path byte for byte."""
    from merger_core.merge import runner

    a, _ = write_scaled_fp8(tmp_path / "a.safetensors", seed=3)
    b, _ = write_scaled_fp8(tmp_path / "b.safetensors", seed=4)
    plan = lambda: helpers.plan_for([a, b], method=method, params=params, dtype="fp16", seed=2)  # noqa: E731
    chunked, _ = merge_to_state_dict(plan())
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    device, _ = merge_to_state_dict(plan())
    assert chunked.keys() == device.keys()
    raw = lambda t: t.reshape(-1).view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731
    assert [k for k in chunked if not torch.equal(raw(chunked[k]), raw(device[k]))] == []


def test_scaled_fp8_is_detected(tmp_path):
    path, _ = write_scaled_fp8(tmp_path / "scaled.safetensors")
    det = detect(path)
    assert det.quantization == "scaled_fp8"
    assert "fp8" not in det.refusal  # (the small layout is refused for its widths, not for being scaled fp8)
    assert det.refusal == detect(helpers.write_model(tmp_path / "plain.safetensors", seed=1)).refusal
    text = render_detection(det)
    assert "ComfyUI scaled fp8" in text, text
    assert any("scale_weight" in e for e in det.evidence), det.evidence


@pytest.mark.parametrize("dtype, st", [("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_scaled_fp8_merges_with_an_fp16_model(tmp_path, dtype, st):
    s, s_vals = write_scaled_fp8(tmp_path / "scaled.safetensors")
    b = helpers.write_model(tmp_path / "plain.safetensors", seed=4, offset=0.5)
    b_vals = {k: v.to(torch.float64) for k, v in load_file(b).items()}
    weights = [0.4, 0.6]
    out = tmp_path / "merged.safetensors"
    result = merge_to_file(helpers.plan_for([s, b], weights, dtype=dtype), out)  # no allow_missing: scales hidden
    header = read_header(out)
    assert set(header.tensors) == set(b_vals)  # no .scale_weight / .scale_input, no scaled_fp8 marker
    assert {t.dtype for k, t in header.tensors.items() if k != helpers.KEY_POSITION_IDS} == {st}
    got = load_file(str(out))
    for k in linear_keys(helpers.small_layout()) + [helpers.KEY_CONV_IN, helpers.KEY_VAE_CONV_IN]:
        assert_close_to(got[k], ref_weighted([s_vals, b_vals], weights, k), st, 2)
    assert torch.equal(got[helpers.KEY_POSITION_IDS], load_file(s)[helpers.KEY_POSITION_IDS])
    assert any("scaled fp8" in n and "scaled.safetensors" in n for n in result.notes), result.notes
    mem, _ = merge_to_state_dict(helpers.plan_for([s, b], weights, dtype=dtype))
    assert sorted(mem) == sorted(got) and all(torch.equal(mem[k], got[k]) for k in got)


def test_scaled_fp8_inputs_on_both_sides_and_e5m2(tmp_path):
    a, a_vals = write_scaled_fp8(tmp_path / "a.safetensors", seed=3)
    b, b_vals = write_scaled_fp8(tmp_path / "b.safetensors", seed=5, fp8=torch.float8_e5m2, marker_shape=(2,))
    out, _ = merge_to_state_dict(helpers.plan_for([a, b], [1.0, 3.0], dtype="fp32"))
    assert not any(k.endswith(("scale_weight", "scale_input", "scaled_fp8")) for k in out)
    for k in linear_keys(helpers.small_layout()):
        assert_close_to(out[k], ref_weighted([a_vals, b_vals], [1.0, 3.0], k), "F32", 2)


def test_scaled_fp8_kept_dtype_is_the_models_own(tmp_path):
    """dtype keep cannot keep fp8 codes without their scale: those weights take the dtype of the model's other
    tensors (bf16 here), and a note says so."""
    s, s_vals = write_scaled_fp8(tmp_path / "scaled.safetensors", other_dtype="BF16")
    b = helpers.write_model(tmp_path / "plain.safetensors", seed=4)
    prep = prepare(helpers.plan_for([s, b], dtype="keep"))
    dtypes = {j.name: j.out_dtype for j in prep.jobs}
    key = linear_keys(helpers.small_layout())[0]
    assert dtypes[key] == "BF16" and dtypes[helpers.KEY_CONV_IN] == "BF16"
    assert any("bf16" in n and "scaled fp8" in n for n in prep.notes), prep.notes


@pytest.mark.parametrize("method, params, n", [("ties", {"density": 0.5}, 3), ("dare", {"drop": 0.3}, 3),
                                               ("slerp", {"t": 0.3}, 2), ("train_difference", {"alpha": 0.7}, 3),
                                               ("add_difference", {"alpha": 0.5}, 3)])
def test_scaled_fp8_in_every_method_equals_its_dequantized_copy(tmp_path, method, params, n):
    """A scaled fp8 input merges as the fp32 file of its dequantized values (codes.float() * scale) would."""
    full = helpers.small_layout()
    keep = set(linear_keys(full, 24)) | {helpers.KEY_CONV_IN, helpers.KEY_OUT, helpers.KEY_POSITION_IDS}
    layout = {k: v for k, v in full.items() if k in keep}
    s, _ = write_scaled_fp8(tmp_path / "scaled.safetensors", layout=layout)
    deq = {k: v for k, v in load_file(s).items() if not k.endswith(("scale_weight", "scale_input", "scaled_fp8"))}
    sd = load_file(s)
    for k in linear_keys(layout):
        deq[k] = sd[k].float() * sd[k[: -len("weight")] + "scale_weight"]
    d = tmp_path / "dequantized.safetensors"
    save_file(deq, str(d))
    others = [helpers.write_model(tmp_path / f"o{i}.safetensors", seed=10 + i, offset=0.1 * i, layout=layout) for i in range(n - 1)]
    for position in range(n):  # the scaled model as the base, as A, as a plain model
        with_s = others[:position] + [s] + others[position:]
        with_d = others[:position] + [str(d)] + others[position:]
        got, _ = merge_to_state_dict(MergePlan([MergeInput(p) for p in with_s], method=method, params=params, dtype="fp32", seed=2))
        want, _ = merge_to_state_dict(MergePlan([MergeInput(p) for p in with_d], method=method, params=params, dtype="fp32", seed=2))
        assert sorted(got) == sorted(want)
        for k in want:
            if method == "add_difference":  # linear: the scale is folded into the coefficient (same values, other rounding)
                assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-6, atol=1e-6), (position, k)
            else:
                assert torch.equal(got[k], want[k]), (position, k)


def test_scaled_fp8_key_taken_from_the_scaled_model_is_dequantized(tmp_path):
    s, s_vals = write_scaled_fp8(tmp_path / "scaled.safetensors")
    b = helpers.write_model(tmp_path / "plain.safetensors", seed=4)
    key = linear_keys(helpers.small_layout())[1]
    out, _ = merge_to_state_dict(helpers.plan_for([s, b], dtype="fp32", key_source=lambda k: 0 if k == key else None))
    assert torch.equal(out[key].double(), s_vals[key])


def test_compatibility_preflight_compares_a_scaled_fp8_model_by_its_weights(tmp_path):
    """Analyze Structure's --compat check sees the keys the merge sees: the scales are no missing keys."""
    from merger_core.arch.compat import check_compatibility
    from merger_core.arch.keys import compare_keys

    s, _ = write_scaled_fp8(tmp_path / "scaled.safetensors")
    b = helpers.write_model(tmp_path / "plain.safetensors", seed=4)
    assert compare_keys([read_header(s), read_header(b)], ["s", "b"]).missing  # the raw files differ by the scales
    rep = check_compatibility([s, b])
    assert not rep.keys.missing and not rep.keys.shape_mismatch
    assert rep.detections[0].quantization == "scaled_fp8" and rep.detections[1].quantization is None
    assert not any("allow-missing" in o for o in rep.options), rep.options
    nf4 = write_bnb(tmp_path / "model-nf4.safetensors", "nf4")
    rep = check_compatibility([b, nf4])
    assert rep.verdict == "incompatible" and any("NF4" in p for p in rep.problems), rep.problems


# ------------------------------------------------------------------------------------------ scaled fp8 output


def test_fp8_scaled_output_requantizes_the_merged_linear_weights(tmp_path):
    """dtype fp8_scaled: each diffusion-model linear weight becomes e4m3fn codes with scale = max|w|/448 of the merged
    fp32 values; other floats are bf16; the marker is there; and the file dequantizes back within fp8 rounding."""
    s, s_vals = write_scaled_fp8(tmp_path / "scaled.safetensors")
    b = helpers.write_model(tmp_path / "plain.safetensors", seed=8)
    b_vals = {k: v.to(torch.float64) for k, v in load_file(b).items()}
    out = tmp_path / "out.safetensors"
    res = merge_to_file(helpers.plan_for([s, b], [0.25, 0.75], dtype="fp8_scaled"), out)
    got = load_file(str(out))
    linear = set(linear_keys(helpers.small_layout()))
    assert got[UNET + "scaled_fp8"].dtype == torch.float8_e4m3fn and got[UNET + "scaled_fp8"].shape == (2,)
    assert any("fp8_scaled" in n for n in res.notes)
    for k, v in got.items():
        if k.endswith(".scale_weight") or k == UNET + "scaled_fp8":
            continue
        ref = ref_weighted([s_vals, b_vals], [0.25, 0.75], k) if v.is_floating_point() else None
        if k in linear:
            assert v.dtype == torch.float8_e4m3fn, k
            scale = got[k[: -len("weight")] + "scale_weight"]
            assert scale.dtype == torch.float32 and scale.shape == ()
            assert float(scale) == pytest.approx(float(ref.abs().max()) / 448.0, rel=1e-6)
            deq = v.to(torch.float64) * float(scale)
            # e4m3fn keeps 3 mantissa bits: within half a step (1/16 relative) plus the subnormal floor
            assert bool(((deq - ref).abs() <= ref.abs() / 16 + float(scale) * 2.0**-9 + 1e-12).all()), k
        elif v.is_floating_point():
            assert v.dtype == torch.bfloat16, k
            assert_close_to(v, ref, "BF16", 2)
    assert not [k for k in got if k.endswith(".scale_input")]
    # our own reader sees a scaled fp8 checkpoint again: merging it with itself gives its dequantized values
    again = tmp_path / "again.safetensors"
    merge_to_file(helpers.plan_for([str(out), str(out)], dtype="fp32"), again)
    back = load_file(str(again))
    k = sorted(linear)[0]
    assert torch.equal(back[k], got[k].float() * got[k[: -len("weight")] + "scale_weight"])


def test_fp8_scaled_output_is_refused_without_a_diffusion_model(tmp_path):
    layout = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": ("F16", (8,)),
              "first_stage_model.decoder.conv_out.weight": ("F16", (3, 8, 3, 3))}
    a = helpers.write_model(tmp_path / "a.safetensors", layout=layout)
    b = helpers.write_model(tmp_path / "b.safetensors", layout=layout, seed=3)
    with pytest.raises(ManifestError, match="fp8_scaled"):
        merge_to_file(helpers.plan_for([a, b], dtype="fp8_scaled"), tmp_path / "out.safetensors")
    assert not os.path.exists(tmp_path / "out.safetensors")

"""The streaming merge against an independent float64 reference, on real safetensors files with SD1.5 keys."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import helpers
from merger_core.merge import runner as engine
from merger_core.merge.plan import MergeInput, MergePlan, prepare
from merger_core.merge.runner import merge_to_file, merge_to_state_dict
from merger_core.errors import DeviceError, IncompatibleModelsError, ManifestError
from merger_core.io.safetensors import read_header
from merger_core.io.writer import tensor_data_sha256

WEIGHTS = {
    2: [0.7, 0.3],
    3: [0.5, 0.3, 0.2],
    4: [1.0, 2.0, 3.0, 4.0],
    5: [0.05, 0.6, 0.1, 0.15, 0.1],
    6: [3.0, 1.0, 0.5, 0.25, 2.0, 0.125],
}


def check(output, paths, weights, **kw):
    ref, bound = helpers.reference_merge(paths, weights, **kw)
    report = helpers.check_against_reference(str(output), ref, bound, len(paths))
    assert report.ok, report.problems[:5]
    return report


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_weighted_sum_matches_float64_reference(make_models, out_dir, n):
    paths = make_models(n)
    weights = WEIGHTS[n]
    out = out_dir / "merged.safetensors"
    result = merge_to_file(helpers.plan_for(paths, weights), out)
    assert result.keys == 1131
    rep = check(out, paths, weights)
    assert rep.float_keys == 1130 and rep.exact_keys == 1
    # the merge really mixes the inputs: the result is far from every input
    with safe_open(str(out), "pt") as f, safe_open(paths[0], "pt") as a:
        k = helpers.KEY_CONV_IN
        assert not torch.allclose(f.get_tensor(k).float(), a.get_tensor(k).float(), atol=0.05)


def test_wrong_weights_are_caught_by_the_reference_check(make_models, out_dir):
    """The reference check is sharp enough to notice weights off by a little."""
    paths = make_models(3)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, [0.5, 0.3, 0.2]), out)
    ref, bound = helpers.reference_merge(paths, [0.5, 0.31, 0.19])
    assert not helpers.check_against_reference(str(out), ref, bound, 3).ok


@pytest.mark.parametrize(
    "out_dtype, in_dtypes, expect",
    [
        ("fp16", ["F32", "BF16", "F16"], "F16"),
        ("bf16", ["F16", "F16", "F32"], "BF16"),
        ("fp32", ["F16", "BF16", "F16"], "F32"),
        ("keep", ["BF16", "F16", "F32"], "BF16"),
        ("keep", ["F32", "F16", "F16"], "F32"),
    ],
)
def test_output_dtypes(make_models, out_dir, out_dtype, in_dtypes, expect):
    paths = make_models(3, dtypes=in_dtypes)
    weights = [0.2, 0.5, 0.3]
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, weights, dtype=out_dtype), out)
    header = read_header(out)
    float_dtypes = {t.dtype for k, t in header.tensors.items() if k != helpers.KEY_POSITION_IDS}
    assert float_dtypes == {expect}
    assert header.tensors[helpers.KEY_POSITION_IDS].dtype == "I64"
    check(out, paths, weights)


def test_fp32_output_is_within_fp32_rounding(make_models, out_dir):
    paths = make_models(4, dtype="F32")
    weights = [0.1, 0.2, 0.3, 0.4]
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, weights, dtype="fp32"), out)
    rep = check(out, paths, weights)
    assert rep.max_abs_error < 1e-5


def test_keys_spanning_many_chunks(make_models, out_dir, monkeypatch):
    """Tensors larger than the CPU chunk are merged in pieces; every piece must land in the right place."""
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    extra = {"extra.big.weight": ("F16", (37, 301)), "extra.odd": ("F32", (1001,))}
    paths = make_models(3, extra=extra)
    weights = [0.6, 0.3, 0.1]
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, weights), out)
    check(out, paths, weights)


def test_integer_tensors_are_copied_bit_exact(make_models, out_dir):
    extra = {
        "extra.i32": ("I32", (5, 7)),
        "extra.u8": ("U8", (13,)),
        "extra.bool": ("BOOL", (9,)),
        "extra.i16": ("I16", (3, 3)),
    }
    paths = make_models(3, extra=extra)
    # make the integer tensors differ between models: the first model's must win, unchanged
    from safetensors.torch import load_file, save_file

    for i, p in enumerate(paths):
        sd = load_file(p)
        sd[helpers.KEY_POSITION_IDS] = sd[helpers.KEY_POSITION_IDS] + 1000 * i + (2**40 if i == 0 else 0)
        sd["extra.i32"] = sd["extra.i32"] * (i + 1) - 7
        save_file(sd, p)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, [0.1, 0.1, 0.8], dtype="fp32"), out)
    first = load_file(paths[0])
    merged = load_file(str(out))
    for k in [helpers.KEY_POSITION_IDS, *extra]:
        assert merged[k].dtype == first[k].dtype, k
        assert torch.equal(merged[k], first[k]), k
    assert int(merged[helpers.KEY_POSITION_IDS][0, 5]) == 2**40 + 5  # no trip through a float


def test_marker_tensors_are_kept(make_models, out_dir):
    paths = make_models(2, markers=True)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths), out)
    header = read_header(out)
    for k in ("v_pred", "ztsnr"):
        assert k in header.tensors and header.tensors[k].shape == (0,)
    assert header.metadata.get("modelspec.prediction_type") == "v"


def test_every_marker_key_of_the_one_list_is_copied_exactly(tmp_path, out_dir):
    """EDM marker tensors hold values (sigma bounds, latent mean/std): they are copied from the first model, never
    averaged. The list is data/markers.json; the engine and the detector read the same one."""
    from merger_core.io.safetensors import MARKER_KEYS

    assert {"v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_min", "edm_vpred.sigma_max"} <= set(MARKER_KEYS)
    extra = {"edm_mean": ("F32", (1, 4, 1, 1)), "edm_std": ("F32", (1, 4, 1, 1)),
             "edm_vpred.sigma_min": ("F32", (1,)), "edm_vpred.sigma_max": ("F32", (1,))}
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1, extra=extra)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2, extra=extra, offset=3.0)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for([a, b]), out)
    with safe_open(out, "pt") as fo, safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for k in extra:
            assert not torch.equal(fa.get_tensor(k), fb.get_tensor(k))
            assert torch.equal(fo.get_tensor(k), fa.get_tensor(k)), k


def test_two_runs_are_byte_identical_and_hash_is_recorded(make_models, tmp_path):
    paths = make_models(3)
    outs = []
    for d in ("run1", "run2"):
        (tmp_path / d).mkdir()
        out = tmp_path / d / "merged.safetensors"
        result = merge_to_file(helpers.plan_for(paths, [0.5, 0.25, 0.25]), out)
        outs.append(out)
    a, b = (o.read_bytes() for o in outs)
    assert a == b
    header = read_header(outs[0])
    data_hash = helpers.data_sha256(outs[0])  # computed here, not by the engine
    assert header.metadata["modelspec.hash_sha256"] == "0x" + data_hash
    assert result.tensor_sha256 == data_hash == tensor_data_sha256(outs[0])


def test_output_layout_and_metadata(make_models, out_dir, tmp_path):
    paths = make_models(3)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, [2, 1, 1]), out)
    raw, n = helpers.raw_header(out)
    assert (8 + n) % 8 == 0
    keys = [k for k in raw if k != "__metadata__"]
    assert keys == sorted(keys)
    pos = 0
    for k in keys:  # data laid out in key order, no gaps
        b, e = raw[k]["data_offsets"]
        assert b == pos
        pos = e
    assert os.path.getsize(out) == 8 + n + pos
    meta = raw["__metadata__"]
    # the inputs have SD1.5's key names at shrunk widths: no ModelSpec architecture is claimed for them
    assert meta["modelspec.architecture"] == "unknown"
    assert meta["modelspec.title"] == "merged"
    assert meta["modelspec.merged_from"] == "model-0.safetensors, model-1.safetensors, model-2.safetensors"
    recipe = json.loads(meta["sd_merge_recipe"])
    assert [m["weight"] for m in recipe["models"]] == [0.5, 0.25, 0.25]
    json.loads(meta["sd_merge_models"])
    for v in meta.values():  # no absolute paths
        assert str(tmp_path) not in v


def test_allow_missing_renormalises_per_key(make_models, out_dir):
    dropped = [helpers.KEY_CONV_IN, helpers.KEY_VAE_CONV_IN]
    paths = make_models(2)
    paths.append(helpers.write_model(os.path.join(os.path.dirname(paths[0]), "partial.safetensors"), seed=9,
                                     offset=3.0, drop=dropped))
    weights = [0.2, 0.3, 0.5]
    with pytest.raises(IncompatibleModelsError) as exc:
        prepare(helpers.plan_for(paths, weights))
    assert "partial.safetensors lacks 2 of 1131 keys" in str(exc.value)
    assert helpers.KEY_CONV_IN in str(exc.value) and "--allow-missing" in str(exc.value)
    out = out_dir / "merged.safetensors"
    result = merge_to_file(helpers.plan_for(paths, weights, allow_missing=True), out)
    assert any("partial.safetensors lacks 2" in n for n in result.notes)
    check(out, paths, weights, allow_missing=True)
    # the dropped key is the 0.2/0.3 mix renormalised to 0.4/0.6
    from safetensors.torch import load_file

    a, b, m = load_file(paths[0]), load_file(paths[1]), load_file(str(out))
    want = (0.4 * a[helpers.KEY_CONV_IN].double() + 0.6 * b[helpers.KEY_CONV_IN].double())
    assert torch.allclose(m[helpers.KEY_CONV_IN].double(), want, atol=2e-3, rtol=1e-3)


def test_key_only_in_one_model_is_taken_from_it(make_models, out_dir):
    paths = make_models(2)
    only = helpers.write_model(os.path.join(os.path.dirname(paths[0]), "extra.safetensors"), seed=5,
                               extra={"extra.only_here": ("F16", (11, 3))})
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for([*paths, only], [1, 1, 2], allow_missing=True), out)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out))["extra.only_here"], load_file(only)["extra.only_here"])


def test_normalize_false_uses_weights_as_given(make_models, out_dir):
    paths = make_models(2)
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, [1.0, 1.0], normalize=False, dtype="fp32"), out)
    check(out, paths, [1.0, 1.0], normalize=False)


def test_state_dict_equals_file(make_models, out_dir):
    paths = make_models(4, dtypes=["F16", "BF16", "F32", "F16"])
    weights = [0.4, 0.3, 0.2, 0.1]
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths, weights, dtype="bf16"), out)
    sd, result = merge_to_state_dict(helpers.plan_for(paths, weights, dtype="bf16"))
    from safetensors.torch import load_file

    on_disk = load_file(str(out))
    assert sorted(sd) == sorted(on_disk)
    for k, t in on_disk.items():
        assert sd[k].dtype == t.dtype and sd[k].shape == t.shape, k
        assert torch.equal(sd[k], t), k
    assert result.output is None and result.keys == len(on_disk)


def test_progress_reports_every_key_and_all_bytes(make_models, out_dir):
    paths = make_models(2)
    seen = []
    out = out_dir / "merged.safetensors"
    merge_to_file(helpers.plan_for(paths), out, progress=seen.append)
    assert [p.keys_done for p in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].keys_done == seen[-1].keys_total == 1131
    assert seen[-1].bytes_done == seen[-1].bytes_total
    assert seen[-1].bytes_total == os.path.getsize(out) - 8 - helpers.raw_header(out)[1]
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(seen, seen[1:]))


def test_engine_rejects_bad_weights_before_reading(make_models):
    paths = make_models(2)
    for weights, words in (([float("nan"), 1.0], "not a finite number"), ([1.0, float("inf")], "not a finite"),
                           ([1.0, -1.0], "sum to 0"), ([0.0, 0.0], "sum to 0")):
        with pytest.raises(ManifestError, match=words):
            prepare(helpers.plan_for(paths, weights))


def test_unknown_device_lists_available(make_models, out_dir):
    paths = make_models(2)
    with pytest.raises(DeviceError, match=r"cuda:3.*available here: cpu"):
        merge_to_file(helpers.plan_for(paths, device="cuda:3"), out_dir / "m.safetensors")
    assert os.listdir(out_dir) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu(make_models, out_dir):
    paths = make_models(4)
    weights = [0.4, 0.3, 0.2, 0.1]
    merge_to_file(helpers.plan_for(paths, weights, device="cuda"), out_dir / "gpu.safetensors")
    check(out_dir / "gpu.safetensors", paths, weights)


# ------------------------------------------------------------------------------------------------- merge workers


@pytest.mark.parametrize("method, params, base", [
    ("weighted_sum", {}, False), ("add_difference", {"alpha": 0.7}, False), ("train_difference", {"alpha": 0.7}, False),
    ("task_arithmetic", {"scale": 0.8}, True), ("ties", {"density": 0.3}, True), ("dare", {"drop": 0.4}, True),
    ("slerp", {"t": 0.3}, False),
])
def test_output_bytes_and_hash_are_the_same_for_every_number_of_workers(tmp_path, method, params, base):
    """K merge workers compute fixed slices: K = 1, 2, 4, 8 give the same bytes and modelspec.hash_sha256."""
    from merger_core.methods import get_method

    n = get_method(method).max_inputs or 3
    extra = {"model.diffusion_model.big.weight": ("F16", (1300, 1031))}  # several chunks and odd slice ends
    paths = [helpers.write_model(tmp_path / f"m{i}.safetensors", seed=i + 1, extra=extra) for i in range(min(n, 3))]
    shas = set()
    for k in (1, 2, 4, 8):
        (tmp_path / f"k{k}").mkdir()
        out = tmp_path / f"k{k}" / "out.safetensors"  # same name: the title in the metadata is the same
        plan = helpers.plan_for(paths, method=method, params=params, threads=k, seed=5)
        res = merge_to_file(plan, out)
        shas.add((res.tensor_sha256, helpers.sha256_file(out)))
    assert len(shas) == 1, shas

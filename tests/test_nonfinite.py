"""Values that do not fit: NaN or Inf in an input, and merged values beyond the output dtype's range.

By default the merge stops naming the key and the inputs that hold such values; ``nonfinite: "warn"`` writes them
as they are and lists the keys in the result's notes; ``"clamp"`` clamps them to the output dtype's range (NaN
becomes 0). Real safetensors files, every mode, linear and tensor methods, file and in-memory paths.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.errors import ManifestError, ModelMergerError
from merger_core.merge.plan import MergeInput, MergePlan, plan_from_manifest, prepare
from merger_core.merge.runner import merge_to_file, merge_to_state_dict

KEYS = {
    "blk.a.weight": (40, 30),
    "blk.b.weight": (6, 5, 3, 3),
    "blk.c.bias": (16,),
    "blk.d.weight": (77, 16),
}
NAN_KEY = "blk.a.weight"  # NaN in model 1 (m1.safetensors)
INF_KEY = "blk.c.bias"  # +Inf and -Inf in model 2 (m2.safetensors)
FP16_MAX = 65504.0

# method -> (inputs, params)
METHODS = {
    "weighted_sum": (3, {}),
    "add_difference": (3, {"alpha": 0.5}),
    "ties": (3, {"density": 0.5}),
    "dare": (3, {"drop": 0.1}),
    "slerp": (2, {"t": 0.4}),
    "train_difference": (3, {"alpha": 0.8}),
}


def write(path, tensors, dtype=torch.float32):
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def models(tmp_path, n, seed=0, dtype=torch.float32, bad=True):
    """n models m0..m{n-1}; with ``bad``, m1 holds NaN in a row of NAN_KEY and m2 (or m1 when n == 2) +-Inf in
    INF_KEY. Returns the paths and the tensors."""
    g = torch.Generator().manual_seed(seed)
    ts = []
    for i in range(n):
        ts.append({k: torch.randn(s, generator=g) * 0.5 + 0.1 * i for k, s in KEYS.items()})
    if bad:
        ts[1][NAN_KEY][3, :] = float("nan")
        inf_model = ts[min(2, n - 1)]
        inf_model[INF_KEY][2] = float("inf")
        inf_model[INF_KEY][5] = float("-inf")
    paths = [write(tmp_path / f"m{i}.safetensors", t, dtype) for i, t in enumerate(ts)]
    return paths, ts


def plan(paths, method="weighted_sum", params=None, **kw):
    return MergePlan([MergeInput(p) for p in paths], method=method, params=params or {}, **kw)


def note_of(result):
    found = [n for n in result.notes if "blk." in n]
    assert found, result.notes
    return "\n".join(found)


# ------------------------------------------------------------------------------------------------- error (default)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nan_in_an_input_stops_the_merge_naming_the_key_and_the_input(tmp_path, method):
    n, params = METHODS[method]
    paths, _ = models(tmp_path, n)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = plan(paths, method, params)
    assert p.nonfinite == "error"
    with pytest.raises(ModelMergerError) as exc:
        merge_to_file(p, out_dir / "merged.safetensors")
    msg = str(exc.value)
    assert NAN_KEY in msg and "m1.safetensors" in msg and "NaN" in msg, msg
    assert "m0.safetensors" not in msg  # only the inputs that hold such values are named
    assert "warn" in msg and "clamp" in msg, msg  # what to do about it
    assert "Traceback" not in msg
    assert os.listdir(out_dir) == []  # nothing written, no temporary file left
    with pytest.raises(ModelMergerError, match=NAN_KEY):
        merge_to_state_dict(p)


def test_inf_in_an_input_is_named_too(tmp_path):
    paths, ts = models(tmp_path, 3)
    ts[1][NAN_KEY][3, :] = 0.0  # only the Inf left
    write(paths[1], ts[1])
    with pytest.raises(ModelMergerError) as exc:
        merge_to_state_dict(plan(paths))
    msg = str(exc.value)
    assert INF_KEY in msg and "m2.safetensors" in msg and "Inf" in msg, msg
    assert "m1.safetensors" not in msg


# ------------------------------------------------------------------------------------------------- warn


@pytest.mark.parametrize("method", ["weighted_sum", "ties", "train_difference"])
def test_warn_writes_the_values_and_notes_the_keys(tmp_path, method):
    n, params = METHODS[method]
    paths, ts = models(tmp_path, n)
    out = tmp_path / "merged.safetensors"
    result = merge_to_file(plan(paths, method, params, nonfinite="warn", dtype="fp32"), out)
    got = load_file(str(out))
    assert torch.isnan(got[NAN_KEY][3]).any()
    assert not torch.isfinite(got[INF_KEY]).all()
    assert torch.isfinite(got["blk.b.weight"]).all()
    note = note_of(result)
    assert NAN_KEY in note and INF_KEY in note and "2 keys" in note, note
    assert "blk.b.weight" not in note
    _, mem = merge_to_state_dict(plan(paths, method, params, nonfinite="warn", dtype="fp32"))
    assert note_of(mem) == note


def test_warn_weighted_sum_keeps_every_other_value(tmp_path):
    paths, ts = models(tmp_path, 3)
    out = tmp_path / "merged.safetensors"
    merge_to_file(plan(paths, nonfinite="warn", dtype="fp32"), out)
    got = load_file(str(out))
    for k in KEYS:
        ref = sum(t[k].double() for t in ts) / 3
        ok = torch.isfinite(ref)
        assert torch.equal(torch.isnan(got[k]), torch.isnan(ref)), k
        assert torch.allclose(got[k].double()[ok], ref[ok], atol=1e-6), k


def test_notes_name_the_first_few_keys_and_the_count(tmp_path):
    g = torch.Generator().manual_seed(3)
    names = [f"blk.k{i:02d}.weight" for i in range(8)]
    a = {k: torch.randn(10, generator=g) for k in names}
    b = {k: torch.randn(10, generator=g) for k in names}
    for k in names:
        b[k][1] = float("nan")
    paths = [write(tmp_path / "a.safetensors", a), write(tmp_path / "b.safetensors", b)]
    _, result = merge_to_state_dict(plan(paths, nonfinite="warn"))
    note = note_of(result)
    assert "8 keys" in note and "and 3 more" in note, note
    assert all(k in note for k in names[:5]) and not any(k in note for k in names[5:]), note


# ------------------------------------------------------------------------------------------------- clamp


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype, limit", [("fp16", FP16_MAX), ("fp32", torch.finfo(torch.float32).max)])
def test_clamp_writes_finite_values_inside_the_output_range(tmp_path, method, dtype, limit):
    n, params = METHODS[method]
    paths, ts = models(tmp_path, n)
    sd, result = merge_to_state_dict(plan(paths, method, params, nonfinite="clamp", dtype=dtype))
    for k in KEYS:
        assert torch.isfinite(sd[k]).all(), k
    note = note_of(result)
    assert NAN_KEY in note and "clamp" in note, note
    if method in ("weighted_sum", "add_difference"):  # +Inf -> the largest value, -Inf -> the smallest
        sign = -1.0 if method == "add_difference" else 1.0  # there the Inf is in C: A + alpha * (B - C)
        assert float(sd[INF_KEY][2]) == sign * limit and float(sd[INF_KEY][5]) == -sign * limit
    if method == "weighted_sum":
        assert bool((sd[NAN_KEY][3] == 0).all())  # NaN -> 0
    out = tmp_path / "merged.safetensors"
    merge_to_file(plan(paths, method, params, nonfinite="clamp", dtype=dtype), out)
    got = load_file(str(out))
    for k in KEYS:
        assert torch.equal(got[k], sd[k]), k


# ------------------------------------------------------------------------------------------------- output range


def big_models(tmp_path, n=2):
    """fp32 models whose INF_KEY holds finite values beyond fp16's range (1e5 and -2e5)."""
    paths, ts = models(tmp_path, n, bad=False)
    for i, t in enumerate(ts):
        t[INF_KEY][0] = 1e5
        t[INF_KEY][1] = -2e5
        write(paths[i], t)
    return paths, ts


@pytest.mark.parametrize("method, params", [("weighted_sum", {}), ("ties", {"density": 1.0})])
def test_fp32_values_beyond_fp16_stop_a_merge_to_fp16(tmp_path, method, params):
    paths, ts = big_models(tmp_path, 3 if method == "ties" else 2)
    with pytest.raises(ModelMergerError) as exc:
        merge_to_file(plan(paths, method, params, dtype="fp16"), tmp_path / "merged.safetensors")
    msg = str(exc.value)
    assert INF_KEY in msg and "fp16" in msg and "65504" in msg, msg
    assert "m0.safetensors" in msg  # the input holding the values that do not fit
    assert "bf16" in msg or "fp32" in msg, msg  # a wider output dtype is offered
    assert not (tmp_path / "merged.safetensors").exists()


def test_fp32_values_beyond_fp16_warn_clamp_and_wider_outputs(tmp_path):
    paths, ts = big_models(tmp_path)
    sd, result = merge_to_state_dict(plan(paths, dtype="fp16", nonfinite="warn"))
    assert math.isinf(float(sd[INF_KEY][0])) and math.isinf(float(sd[INF_KEY][1]))
    assert INF_KEY in note_of(result) and "fp16" in note_of(result)
    sd, result = merge_to_state_dict(plan(paths, dtype="fp16", nonfinite="clamp"))
    assert float(sd[INF_KEY][0]) == FP16_MAX and float(sd[INF_KEY][1]) == -FP16_MAX
    ref = (ts[0][INF_KEY][2:].double() + ts[1][INF_KEY][2:].double()) / 2
    assert torch.allclose(sd[INF_KEY][2:].double(), ref, atol=1e-3)  # the rest untouched
    for dtype in ("fp32", "bf16"):  # they hold 1e5: nothing to report
        sd, result = merge_to_state_dict(plan(paths, dtype=dtype))
        assert torch.isfinite(sd[INF_KEY]).all()
        assert not [n for n in result.notes if "blk." in n]
        assert abs(float(sd[INF_KEY][0]) - 1e5) <= 1e5 * 2**-8


def test_merged_values_beyond_fp8_are_caught(tmp_path):
    """add difference of fp8 inputs kept as fp8: 400 + (400 - -400) does not fit e4m3 (torch would write NaN)."""
    base = {k: torch.full(s, 1.0) for k, s in KEYS.items()}
    a, b, c = (dict(base) for _ in range(3))
    a[INF_KEY] = torch.full(KEYS[INF_KEY], 400.0)
    b[INF_KEY] = torch.full(KEYS[INF_KEY], 400.0)
    c[INF_KEY] = torch.full(KEYS[INF_KEY], -400.0)
    paths = [write(tmp_path / f"{n}.safetensors", t, torch.float8_e4m3fn) for n, t in (("a", a), ("b", b), ("c", c))]
    p = plan(paths, "add_difference", {"alpha": 1.0}, dtype="keep")
    with pytest.raises(ModelMergerError) as exc:
        merge_to_state_dict(p)
    assert INF_KEY in str(exc.value) and "448" in str(exc.value), str(exc.value)
    p.nonfinite = "clamp"
    sd, _ = merge_to_state_dict(p)
    assert sd[INF_KEY].dtype == torch.float8_e4m3fn and bool((sd[INF_KEY].float() == 448).all())


def test_a_copied_key_that_does_not_fit_is_caught(tmp_path):
    """A key taken unmerged from one model and cast to the output dtype is checked the same way."""
    paths, ts = big_models(tmp_path)
    p = plan(paths, dtype="fp16", key_source=lambda k: 1 if k == INF_KEY else None)
    with pytest.raises(ModelMergerError) as exc:
        merge_to_state_dict(p)
    assert INF_KEY in str(exc.value) and "m1.safetensors" in str(exc.value) and "m0.safetensors" not in str(exc.value)
    p.nonfinite = "clamp"
    sd, _ = merge_to_state_dict(p)
    assert float(sd[INF_KEY][0]) == FP16_MAX
    assert torch.equal(sd["blk.b.weight"], ((ts[0]["blk.b.weight"] + ts[1]["blk.b.weight"]) / 2).half())


def test_clean_inputs_give_no_note_and_identical_bytes_in_every_mode(tmp_path):
    paths, _ = models(tmp_path, 2, bad=False)
    digests = set()
    for mode in ("error", "warn", "clamp"):
        out = tmp_path / f"{mode}.safetensors"
        result = merge_to_file(plan(paths, nonfinite=mode), out)
        assert not [n for n in result.notes if "blk." in n]
        digests.add(helpers.data_sha256(out))
    assert len(digests) == 1


def test_an_unknown_mode_is_refused(tmp_path):
    paths, _ = models(tmp_path, 2, bad=False)
    with pytest.raises(ManifestError, match="nonfinite.*error, warn, clamp"):
        prepare(plan(paths, nonfinite="ignore"))


# ------------------------------------------------------------------------------------------------- manifest and CLI


def manifest_file(tmp_path, paths, **top):
    doc = {"version": 1, "method": "weighted_sum", "dtype": "fp16", "models": [{"path": p} for p in paths], **top}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(doc))
    return path


def test_manifest_nonfinite_option(tmp_path):
    from merger_core.manifest import ManifestValidationError
    from merger_core.manifest.parse import load_manifest, manifest_to_dict, save_manifest

    paths, _ = models(tmp_path, 2)
    m = load_manifest(manifest_file(tmp_path, paths))
    assert m.nonfinite == "error" and "nonfinite" not in manifest_to_dict(m)  # the default is not written
    m = load_manifest(manifest_file(tmp_path, paths, nonfinite="clamp"))
    assert m.nonfinite == "clamp"
    assert plan_from_manifest(m).nonfinite == "clamp"
    assert plan_from_manifest(m, nonfinite="warn").nonfinite == "warn"
    saved = save_manifest(m, tmp_path / "again.json")
    assert json.loads(open(saved).read())["nonfinite"] == "clamp"
    assert load_manifest(saved) == m
    with pytest.raises(ManifestValidationError, match="nonfinite"):
        load_manifest(manifest_file(tmp_path, paths, nonfinite="ignore"))


def test_cli_nonfinite_flag(tmp_path, capsys):
    from merger_core.cli import main

    paths, _ = models(tmp_path, 2)
    recipe = manifest_file(tmp_path, paths)
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", str(recipe), "-o", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert rc == 2 and NAN_KEY in stderr and "m1.safetensors" in stderr and "--nonfinite" in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()
    rc = main(["merge", str(recipe), "-o", str(out), "--no-progress", "--nonfinite", "clamp"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert NAN_KEY in stdout and INF_KEY in stdout and "clamp" in stdout, stdout
    got = load_file(str(out))
    assert all(torch.isfinite(t).all() for t in got.values())
    with pytest.raises(SystemExit):
        main(["merge", str(recipe), "-o", str(out), "--nonfinite", "ignore"])


def test_huge_finite_fp32_values_that_fit_pass_unchanged(tmp_path):
    """Values whose sum over the key would overflow fp32 (16 x 1e38) are still fine for an fp32 output."""
    paths, ts = models(tmp_path, 2, bad=False)
    for i, t in enumerate(ts):
        t[INF_KEY][:] = 1e38
        write(paths[i], t)
    sd, result = merge_to_state_dict(plan(paths, dtype="fp32"))
    assert bool((sd[INF_KEY] == torch.tensor(1e38)).all())
    assert not [n for n in result.notes if "blk." in n]


def test_overflow_of_the_arithmetic_itself_is_explained(tmp_path):
    """Finite inputs, but A + 3 * (B - C) leaves fp32's range: the message says the parameters push it out."""
    paths, ts = models(tmp_path, 3, bad=False)
    for i, v in enumerate((3e38, 3e38, -3e38)):
        ts[i][INF_KEY][0] = v
        write(paths[i], ts[i])
    with pytest.raises(ModelMergerError) as exc:
        merge_to_state_dict(plan(paths, "add_difference", {"alpha": 3.0}, dtype="fp32"))
    msg = str(exc.value)
    assert INF_KEY in msg and "every input's values are finite" in msg and "parameters" in msg, msg
    assert "m0.safetensors" not in msg and "m2.safetensors" not in msg

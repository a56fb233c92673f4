"""The device pipeline (merge/pipeline.py): keys computed on the device reach the sink one key later, with the range
check done on the device and decided when the bytes are back.

Here on the CPU the pipeline runs with synchronous copies (tests force the device path with ``runner._chunked``); that
checks its order of operations: keys in order across host-emitted and device-emitted keys, a scaled fp8 output (whose
scale keys merge through a second sink), every ``nonfinite`` mode, a failure leaving nothing behind. The tests at the
end run only where CUDA exists: the same bytes as the CPU, overlapped streams, device memory flat in the number of
models, and ``cuda:N`` beyond the devices a clear error.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.errors import DeviceError, ModelMergerError
from merger_core.merge import pipeline as pipeline_mod
from merger_core.merge import runner
from merger_core.merge.plan import MergeInput, MergePlan
from merger_core.merge.runner import merge_to_file, merge_to_state_dict

KEYS = {
    "a.weight": (40, 30),
    "b.weight": (6, 5, 3, 3),
    "c.bias": (16,),
    "d.weight": (77, 16),
    "e.position_ids": (1, 7),  # an integer key: copied on the host, between device keys
}


def _models(tmp_path, n, bad=False, scale=1.0):
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(n):
        ts = {k: (torch.randn(s, generator=g) * scale + 0.1 * i) for k, s in KEYS.items() if k != "e.position_ids"}
        ts["e.position_ids"] = torch.arange(7, dtype=torch.int64).reshape(1, 7)
        if bad and i == 1:
            ts["a.weight"][3, :] = float("nan")
            ts["c.bias"][2] = float("inf")
        p = tmp_path / f"m{i}.safetensors"
        save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in ts.items()}, str(p))
        paths.append(str(p))
    return paths


def _plan(paths, **kw):
    return MergePlan([MergeInput(p) for p in paths], **kw)


@pytest.fixture
def device_path(monkeypatch):
    """Force the whole-key device path on the CPU; count the pipeline's deferred emissions."""
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    seen = []
    real = runner._Runner._emit_device_key

    def spy(self, job, host, counts, sink):
        seen.append(job.name)
        return real(self, job, host, counts, sink)

    monkeypatch.setattr(runner._Runner, "_emit_device_key", spy)
    return seen


def _equal(a, b):
    """The same keys with the same bytes (NaN included)."""
    raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)


@pytest.mark.parametrize("method,params,n", [("weighted_sum", {}, 4), ("ties", {"density": 0.4}, 3), ("dare", {"drop": 0.3}, 3),
                                             ("train_difference", {"alpha": 0.7}, 3), ("slerp", {"t": 0.3}, 2)])
def test_the_pipeline_gives_the_chunked_paths_file_byte_for_byte(tmp_path, method, params, n, monkeypatch):
    paths = _models(tmp_path, n)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "dev").mkdir()
    a = merge_to_file(_plan(paths, method=method, params=params, seed=2), tmp_path / "cpu" / "m.safetensors")
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    b = merge_to_file(_plan(paths, method=method, params=params, seed=2), tmp_path / "dev" / "m.safetensors")
    assert a.tensor_sha256 == b.tensor_sha256
    assert helpers.sha256_file(tmp_path / "cpu" / "m.safetensors") == helpers.sha256_file(tmp_path / "dev" / "m.safetensors")


@pytest.mark.parametrize("method,params", [("weighted_sum", {}), ("ties", {"density": 0.4})])
@pytest.mark.parametrize("dtype", ["fp16", "keep"])
@pytest.mark.parametrize("kind", ["fp8", "f64", "bf16"])
def test_dtypes_a_backend_lacks_are_cast_on_the_host(tmp_path, method, params, dtype, kind, monkeypatch):
    """MPS has no fp8 and no float64, and no bfloat16 before macOS 14: the pipeline widens fp8 inputs to fp16 and
    bf16 inputs to fp32 (both exact) and rounds float64 inputs to fp32 on the host there, and brings such outputs
    back as fp32 to cast them on the host; the merge gives the bytes of the chunked path (forced here on the CPU with
    the pipeline's ``host_widen``, for a device without bf16)."""
    g = torch.Generator().manual_seed(6)
    paths = []
    kinds = {"fp8": [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fn], "f64": [torch.float64] * 3,
             "bf16": [torch.bfloat16] * 3}[kind]
    for i, dt in enumerate(kinds):
        ts = {k: (torch.randn(shape, generator=g) * 2).to(dt) for k, shape in KEYS.items() if k != "e.position_ids"}
        p = tmp_path / f"f{i}.safetensors"
        save_file(ts, str(p))
        paths.append(str(p))
    want, _ = merge_to_state_dict(_plan(paths, method=method, params=params, dtype=dtype))
    assert {t.dtype for t in want.values()} == ({torch.float16} if dtype == "fp16" else {kinds[0]})
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    real_init, real_upload = pipeline_mod.DevicePipeline.__init__, pipeline_mod.DevicePipeline.upload
    sent = []

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.host_widen = pipeline_mod.host_widening(torch, has_bf16=False)
        self.staging = [torch.empty(2 * b.numel(), dtype=torch.uint8) for b in self.staging]
        self.dev_in = [torch.empty(2 * b.numel(), dtype=torch.uint8) for b in self.dev_in]

    def upload(self, flat):
        dev, slot = real_upload(self, flat)
        sent.append(dev.dtype)
        return dev, slot

    real_finish = pipeline_mod.DevicePipeline.finish
    came_back = []

    def finish(self, job, *a, **kw):
        real_finish(self, job, *a, **kw)
        came_back.append(self.pending[-1][2].dtype)  # what the device wrote and the host received

    monkeypatch.setattr(pipeline_mod.DevicePipeline, "__init__", init)
    monkeypatch.setattr(pipeline_mod.DevicePipeline, "upload", upload)
    monkeypatch.setattr(pipeline_mod.DevicePipeline, "finish", finish)
    got, _ = merge_to_state_dict(_plan(paths, method=method, params=params, dtype=dtype))
    assert sent and set(sent) == {torch.float16 if kind == "fp8" else torch.float32}
    assert all(pipeline_mod.host_widening(torch, has_bf16=True).get(dt) == {"bf16": None}.get(kind, d)
               for dt, d in zip(kinds, sent))  # a device with bf16 takes it as it is
    assert came_back and set(came_back) == ({torch.float16} if dtype == "fp16" else {torch.float32})
    assert _equal(want, got)


def test_device_keys_reach_the_sink_in_order_one_key_later(tmp_path, device_path):
    paths = _models(tmp_path, 3)
    got, _ = merge_to_state_dict(_plan(paths))
    assert list(got) == sorted(KEYS)  # the integer key (host) sits between device keys, in order
    assert device_path == [k for k in sorted(KEYS) if k != "e.position_ids"]


def test_a_scaled_fp8_output_through_the_pipeline(tmp_path, device_path):
    paths = _models(tmp_path, 2)
    whole, _ = merge_to_state_dict(_plan(paths, dtype="fp8_scaled"))
    assert device_path  # the scale keys' merges went through the device and came back to their own sink
    runner_chunked = runner._chunked
    try:
        runner._chunked = lambda device: True
        chunked, _ = merge_to_state_dict(_plan(paths, dtype="fp8_scaled"))
    finally:
        runner._chunked = runner_chunked
    assert _equal(whole, chunked)


def test_error_mode_found_one_key_later_still_stops_and_leaves_nothing(tmp_path, device_path):
    paths = _models(tmp_path, 3, bad=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelMergerError) as exc:
        merge_to_file(_plan(paths), out / "m.safetensors")
    msg = str(exc.value)
    assert "a.weight" in msg and "m1.safetensors" in msg and "NaN" in msg, msg
    assert "m0.safetensors" not in msg
    assert os.listdir(out) == []


@pytest.mark.parametrize("mode", ["warn", "clamp"])
def test_warn_and_clamp_give_the_chunked_paths_bytes_and_notes(tmp_path, mode, monkeypatch):
    paths = _models(tmp_path, 3, bad=True)
    chunked, r1 = merge_to_state_dict(_plan(paths, nonfinite=mode))
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    whole, r2 = merge_to_state_dict(_plan(paths, nonfinite=mode))
    assert _equal(chunked, whole)
    assert [n for n in r1.notes if "a.weight" in n] == [n for n in r2.notes if "a.weight" in n] != []


def test_values_beyond_fp16_are_found_on_the_device(tmp_path, monkeypatch):
    paths = _models(tmp_path, 2, scale=1.0)
    big = load_file(paths[0])
    big["d.weight"][0, 0] = 60000.0
    other = load_file(paths[1])
    other["d.weight"][0, 0] = 60000.0
    save_file(big, paths[0])
    save_file(other, paths[1])
    # weights 1 and 1 without normalizing: 120000 does not fit fp16
    plan = lambda mode: MergePlan([MergeInput(p, 1.0) for p in paths], normalize=False, nonfinite=mode)  # noqa: E731
    chunked, r1 = merge_to_state_dict(plan("clamp"))
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    with pytest.raises(ModelMergerError, match="d.weight.*do not fit"):
        merge_to_state_dict(plan("error"))
    whole, r2 = merge_to_state_dict(plan("clamp"))
    assert _equal(chunked, whole)
    assert float(whole["d.weight"][0, 0]) == 65504.0
    assert r1.notes == r2.notes


def test_a_failure_in_the_middle_drains_the_pipeline_and_writes_nothing(tmp_path, device_path, monkeypatch):
    paths = _models(tmp_path, 3)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3  # after three keys: one device key is still queued

    drained = []
    real = pipeline_mod.DevicePipeline.drain
    monkeypatch.setattr(pipeline_mod.DevicePipeline, "drain", lambda self: (drained.append(True), real(self)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelMergerError):
        merge_to_file(_plan(paths), out / "m.safetensors", cancel=cancel)
    assert drained and os.listdir(out) == []


# ------------------------------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@cuda
@pytest.mark.parametrize("method,params", [("weighted_sum", {}), ("add_difference", {"alpha": 0.6}), ("ties", {"density": 0.3}),
                                           ("dare", {"drop": 0.4}), ("train_difference", {"alpha": 0.8}),
                                           ("slerp", {"t": 0.3})])
def test_cuda_gives_the_cpus_bytes_or_within_one_ulp(tmp_path, method, params):
    n = 2 if method == "slerp" else 3
    paths = _models(tmp_path, n)
    cpu, _ = merge_to_state_dict(_plan(paths, method=method, params=params, seed=4))
    gpu, _ = merge_to_state_dict(_plan(paths, method=method, params=params, seed=4, device="cuda"))
    for k in cpu:
        a, b = cpu[k], gpu[k]
        if torch.equal(a, b):
            continue
        assert a.dtype == torch.float16
        ia = a.view(torch.int16).to(torch.int32)
        ib = b.view(torch.int16).to(torch.int32)
        assert int((ia - ib).abs().max()) <= 1, k


@cuda
def test_cuda_device_memory_is_flat_in_the_number_of_models(tmp_path):
    peaks = []
    for n in (2, 6):
        paths = _models(tmp_path / str(n), n) if (tmp_path / str(n)).mkdir() is None else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        merge_to_state_dict(_plan(paths, device="cuda"))
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.1 + 4096, peaks


@cuda
@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare", {"drop": 0.4})])
def test_cuda_tensor_methods_device_memory_is_flat_in_the_number_of_models(tmp_path, method, params, monkeypatch):
    """The streaming tensor methods never hold a key's inputs whole on the device: with keys of a million elements
    cut into device slices (the limits scaled down as for a key of tens of millions), 6 models take about the
    device memory of 2."""
    from merger_core.methods import _common

    monkeypatch.setattr(_common, "DEVICE_SLICE_MIN", 1 << 15)
    monkeypatch.setattr(_common, "DEVICE_CACHE_MAX", 1 << 15)
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1000, 1000, generator=g)
    peaks = []
    for n in (2, 6):
        paths = []
        for i in range(n):
            p = tmp_path / f"{n}_{i}.safetensors"
            save_file({"big.weight": (base + 0.01 * torch.randn(1000, 1000, generator=g)).half()}, str(p))
            paths.append(str(p))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        merge_to_state_dict(_plan(paths, method=method, params=params, device="cuda"))
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.25, peaks


@cuda
def test_cuda_uses_a_copy_stream_beside_the_compute_stream(tmp_path):
    paths = _models(tmp_path, 3)
    dev = torch.device("cuda:0")
    pipe = pipeline_mod.DevicePipeline(torch, dev, 1 << 20, 1 << 20)
    assert pipe.copy is not None and pipe.copy != pipe.compute
    x = torch.randn(1000).half()
    d, slot = pipe.upload(x)
    y = d.float() * 2
    pipe.release(slot)
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), x.float() * 2)
    got, _ = merge_to_state_dict(_plan(paths, device="cuda"))
    assert list(got) == sorted(KEYS)


def test_a_cuda_index_beyond_the_devices_is_a_clear_error(tmp_path):
    paths = _models(tmp_path, 2)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match=rf"cuda:{n + 1}.*available here: cpu"):
        merge_to_file(_plan(paths, device=f"cuda:{n + 1}"), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_ties_on_the_device_sends_the_base_over_once_per_key(tmp_path, monkeypatch):
    """TIES reads the base in its threshold pass (once per model) and in its merge: the base crosses the bus once per
    key and stays on the device in its file dtype, so a key costs 2N + 1 transfers of its size, not 3N + 1; the
    bytes stay the chunked path's."""
    from merger_core.methods import _common

    n, models = 300_000, 3
    g = torch.Generator().manual_seed(9)
    base = torch.randn(n, generator=g)
    paths = []
    for i in range(models + 1):
        p = tmp_path / f"t{i}.safetensors"
        save_file({"big.weight": (base + (0.01 * torch.randn(n, generator=g) if i else 0)).half().reshape(600, 500)}, str(p))
        paths.append(str(p))
    plan = lambda: _plan(paths, method="ties", params={"density": 0.3}, seed=2)  # noqa: E731
    want = merge_to_file(plan(), tmp_path / "cpu.safetensors")
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    monkeypatch.setattr(_common, "DEVICE_SLICE_MIN", 1 << 14)
    monkeypatch.setattr(_common, "DEVICE_CACHE_MAX", 1 << 14)  # no whole-key cache for this key
    sent = []
    real = pipeline_mod.DevicePipeline.upload
    monkeypatch.setattr(pipeline_mod.DevicePipeline, "upload", lambda self, flat: sent.append(flat.numel()) or real(self, flat))
    got = merge_to_file(plan(), tmp_path / "dev.safetensors")
    assert got.tensor_sha256 == want.tensor_sha256
    assert sum(sent) == (2 * models + 1) * n, (sum(sent) / n, len(sent))


def test_host_widening_is_exact_for_every_dtype_a_device_lacks():
    """Every float dtype of the dtype table that MPS lacks is widened to one that holds each of its values exactly
    (fp8 e4m3/e5m2 to fp16; e8m0, whose powers of two reach 2^127, to fp32), and the staging buffers have room for
    the widest of them."""
    from merger_core.io.safetensors import DTYPES

    widen = pipeline_mod.host_widening(torch, has_bf16=False)
    lacking = [getattr(torch, d.torch_name) for d in DTYPES.values()
               if d.is_float and (d.size in (1, 8) or d.name == "BF16") and hasattr(torch, d.torch_name)]
    assert set(widen) == set(lacking)
    for dt, wider in widen.items():
        if dt.itemsize == 1:  # every code
            codes = torch.arange(256, dtype=torch.uint8).view(dt)
            assert torch.allclose(codes.to(wider).double(), codes.double(), rtol=0, atol=0, equal_nan=True), dt
    assert pipeline_mod.staging_factor(widen) == 4  # e8m0 -> fp32
    assert pipeline_mod.staging_factor({}) == 1

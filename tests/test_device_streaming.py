"""The tensor methods' device paths (``streams_on_device``): they merge from slices that ``KeyContext.load`` brings
to the device, so no input is ever whole there and device memory stays flat in the number of models.

Here the "device" is the CPU: the loader hands out CPU tensors, which runs the very code a GPU runs. Checked: the
same bytes as the CPU paths (SLERP within one fp32 ulp: its per-slice dot products are batched differently), slices
no larger than ``device_slice`` allows, and the loaded slices alive at once bounded by about one key whatever N.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from merger_core.methods import _common, get_method
from merger_core.methods.registry import KeyContext

N_ELEMENTS = 300_007


@pytest.fixture(autouse=True)
def small_device_slices(monkeypatch):
    """Slices of the size a GPU uses for keys of tens of millions of elements, scaled down to a small key."""
    monkeypatch.setattr(_common, "DEVICE_SLICE_MIN", 1 << 15)


class Loader:
    """``KeyContext.load`` over CPU tensors that records every slice asked for and the elements alive at once."""

    def __init__(self, tensors):
        self.flats = [t.reshape(-1) for t in tensors]
        self.sizes = []
        self.live = 0
        self.most_live = 0

    def _freed(self, n):
        self.live -= n

    def __call__(self, j, s, e):
        x = self.flats[j][s:e].to(torch.float32, copy=True)
        self.sizes.append(e - s)
        self.live += e - s
        self.most_live = max(self.most_live, self.live)
        weakref.finalize(x, self._freed, e - s)
        return x


def family(models, dtype, seed=0, n=N_ELEMENTS):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.05
    ts = [base] + [base + torch.randn(n, generator=g) * 1e-3 for _ in range(models)]
    ts[1][::101] = ts[0][::101]  # equal magnitudes and zero differences
    return [t.to(dtype) for t in ts]


CASES = [
    ("ties", {"density": 0.2, "scale": 0.9}),
    ("ties", {"density": 1.0, "scale": 1.0}),
    ("ties", {"density": 0.0, "scale": 1.0}),
    ("dare", {"drop": 0.4, "scale": 1.0}),
    ("train_difference", {"alpha": 0.7}),
    ("slerp", {"t": 0.3}),
]


def _run(name, params, ts, load=None):
    method = get_method(name)
    params = method.check_params(params)
    ws = [1.0] + [(0.7, -0.3, 1.2)[i % 3] for i in range(len(ts) - 1)]
    ctx = KeyContext("k", 1234, (), list(range(len(ts))), load=load, device=torch.device("cpu") if load else None)
    if name == "train_difference" and load is None:  # the engine hands this method fp32 on the CPU
        ts = [t.float() for t in ts]
    return method.merge_tensor(ts, ws, params, ctx).reshape(-1)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_the_device_path_gives_the_cpu_paths_bytes(name, params, dtype):
    models = {"slerp": 1, "train_difference": 2}.get(name, 3)
    ts = family(models, dtype)
    cpu = _run(name, params, ts)
    load = Loader(ts)
    dev = _run(name, params, ts, load)
    assert len(load.sizes) > len(ts)  # it really went slice by slice
    if name == "slerp":  # within one fp32 ulp
        gap = (cpu.view(torch.int32).long() - dev.view(torch.int32).long()).abs().max()
        assert int(gap) <= 1
    else:
        assert torch.equal(cpu.view(torch.int32), dev.view(torch.int32))


@pytest.mark.parametrize("name,params", [CASES[0], CASES[3]])
def test_device_memory_of_the_loaded_slices_is_flat_in_the_number_of_models(name, params):
    """The slices a method asks for shrink with N where it holds one per model (TIES: the N trimmed differences and
    8 more at once stay about one key) and do not depend on N where it holds a fixed few (DARE); what is loaded and
    alive at once never passes about a key."""
    sizes, live = {}, {}
    for models in (2, 4, 8):
        ts = family(models, torch.float16, seed=models)
        load = Loader(ts)
        _run(name, params, ts, load)
        sizes[models], live[models] = max(load.sizes), load.most_live
    if name == "ties":
        assert all(sizes[m] * (m + 8) <= N_ELEMENTS + (m + 8) * _common.SLICE for m in sizes), sizes
    else:
        assert len(set(sizes.values())) == 1, sizes
    assert all(v <= 1.5 * N_ELEMENTS for v in live.values()), live
    assert live[8] <= 1.5 * live[2], live


def test_device_slices_are_whole_small_keys_and_multiples_of_slice():
    assert _common.device_slice(1000, 13) == 1000
    for n in (10_000_000, 63_000_000):
        for k in (3, 7, 13):
            d = _common.device_slice(n, k)
            assert d % _common.SLICE == 0 and d >= _common.DEVICE_SLICE_MIN and d * k <= n + k * _common.SLICE


def test_train_difference_keeps_the_first_input_when_a_key_is_missing_on_the_device():
    ts = family(1, torch.float16)
    method = get_method("train_difference")
    load = Loader(ts)
    ctx = KeyContext("k", 0, (), [0, 2], load=load, device=torch.device("cpu"))
    got = method.merge_tensor(ts, [1, 1], method.check_params({"alpha": 1.0}), ctx)
    assert got.dtype == torch.float32 and torch.equal(got, ts[0].float())


def test_slerp_takes_its_dot_products_on_the_cpu_where_the_device_has_no_float64(monkeypatch):
    """MPS has no float64: there SLERP's first pass brings its slices back to the CPU (same coefficients)."""
    from merger_core.methods import slerp

    ts = family(1, torch.float16)
    want = _run("slerp", {"t": 0.3}, ts, Loader(ts))
    monkeypatch.setattr(slerp, "has_fp64", lambda device: False)
    moved = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: moved.append(self.numel()) or real_cpu(self, *a, **kw))
    got = _run("slerp", {"t": 0.3}, ts, Loader(ts))
    assert sum(moved) >= 2 * N_ELEMENTS and torch.equal(got.view(torch.int32), want.view(torch.int32))


def _same(a, b):
    return bool(torch.isnan(a)) and bool(torch.isnan(b)) or torch.equal(a.view(torch.int32), b.view(torch.int32))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("n,nans", [(101, 0), (101, 3), (101, 40), (300_007, 1000)])
def test_kth_smallest_on_a_device_is_kthvalue_for_every_rank(device, n, nans):
    """The device threshold: ``torch.kthvalue``'s element (on the CPU) for ranks on both sides of the middle, with
    duplicates, zeros, infinities and NaN (which ranks above every number, and is the answer once the rank reaches
    it). On CUDA a long row takes ``topk``'s multi-block path."""
    g = torch.Generator().manual_seed(nans)
    a = (torch.randn(n, generator=g) * 4).round().abs()  # many duplicates and zeros
    a[:5] = float("inf")
    a[5:5 + nans] = float("nan")
    a = a[torch.randperm(n, generator=g)]
    ranks = range(1, n + 1) if n < 1000 else [1, 2, n // 5, n // 2, n // 2 + 1, n - 1001, n - 1000, n - 999, n]
    on = a.to(device)
    for k in ranks:
        got = _common.kth_smallest(on, k)
        assert got.device.type == device and _same(got.cpu(), torch.kthvalue(a, k).values), k


def test_ties_on_a_device_takes_no_kthvalue(monkeypatch):
    """CUDA runs ``kthvalue`` on a 1-D tensor in one thread block (the whole key through one multiprocessor, 16
    passes): the device path selects its thresholds with ``topk`` instead, which CUDA spreads over many blocks, and
    keeps the CPU path's bytes, NaN and infinities included."""
    ts = family(3, torch.float16)
    ts[1][5] = float("nan")
    ts[2][7] = float("inf")
    ts[3][::7] = float("nan")  # a seventh of the key: the threshold itself is NaN, nothing is trimmed
    cpu = _run("ties", {"density": 0.2, "scale": 0.9}, ts)

    def no_kthvalue(*a, **kw):
        raise AssertionError("kthvalue on the device path")

    monkeypatch.setattr(torch, "kthvalue", no_kthvalue)
    dev = _run("ties", {"density": 0.2, "scale": 0.9}, ts, Loader(ts))
    assert torch.equal(cpu.view(torch.int32), dev.view(torch.int32))


def test_ties_on_a_device_finds_thresholds_in_the_result_buffer(monkeypatch):
    """With the engine's result buffer (``ctx.out``), the threshold pass writes each ``|M_i - base|`` there (the
    merge overwrites it afterwards): no key-sized buffer of its own."""
    ts = family(3, torch.float16)
    want = _run("ties", {"density": 0.2, "scale": 0.9}, ts, Loader(ts))
    sizes = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: sizes.append(a) or real_empty(*a, **kw))
    method = get_method("ties")
    out = real_empty(N_ELEMENTS + 10)
    ctx = KeyContext("k", 1234, (), [0, 1, 2, 3], load=Loader(ts), device=torch.device("cpu"), out=out)
    got = method.merge_tensor(ts, [1.0, 0.7, -0.3, 1.2], method.check_params({"density": 0.2, "scale": 0.9}), ctx)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got.reshape(-1).view(torch.int32), want.view(torch.int32))
    assert not [a for a in sizes if a and a[0] == N_ELEMENTS], sizes

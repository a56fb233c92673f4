"""The fast CPU paths of TIES, DARE, train difference and SLERP against straightforward references (whole-key
torch.kthvalue, plain ops in the documented order), bit for bit, on 1, 2 and 4 worker threads."""

from __future__ import annotations

import math

import pytest
import torch

from merger_core.methods import _common
from merger_core.methods.dare import dare_merge, uniforms
from merger_core.methods.registry import KeyContext
from merger_core.methods.slerp import slerp_coefficients, slerp_merge
from merger_core.methods.ties import ties_merge
from merger_core.methods.train_difference import TrainDifference, train_difference

THREADS = (1, 2, 4)


def bits(t):
    return t.reshape(-1).view(torch.int32)


def ref_ties(ts, ws, density, scale):
    """Whole-key reference: thresholds by torch.kthvalue, then the documented ops (fp32)."""
    base = ts[0].reshape(-1).float()
    ds = [m.reshape(-1).float() - base for m in ts[1:]]
    n = base.numel()
    count = min(n, math.ceil(density * n - 1e-9))
    trimmed = []
    for d in ds:
        if count >= n:
            trimmed.append(d)
        elif count <= 0:
            trimmed.append(None)
        else:
            t = torch.kthvalue(d.abs(), n - count + 1).values
            lam = float(torch.nextafter(t, torch.zeros(())))
            trimmed.append(torch.nn.functional.hardshrink(d, lam))
    vote = torch.zeros(n)
    for d, w in zip(trimmed, ws):
        if d is not None:
            vote.add_(d, alpha=w)
    num, den = torch.zeros(n), torch.zeros(n)
    for d, w in zip(trimmed, ws):
        if d is None:
            continue
        agree = torch.mul(d, vote).gt_(0)
        num.addcmul_(d, agree, value=w)
        den.add_(agree, alpha=w)
    if any(w <= 0 for w in ws):
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    else:
        merged = num.div_(den.clamp_min_(min(ws)))
    return torch.add(base, merged, alpha=scale)


def family(n, dtype, kind, seed=0, models=2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.05
    if kind == "grid":  # many equal magnitudes: ties at the threshold
        base = torch.randint(-50, 50, (n,), generator=g) / 32
        ms = [base + torch.randint(-20, 20, (n,), generator=g) / 32 for _ in range(models)]
    elif kind == "zeros":
        ms = [base.clone()] + [base + (torch.rand(n, generator=g) < 0.1) * torch.randn(n, generator=g) * 1e-3 for _ in range(models - 1)]
    elif kind == "biased":  # the strided sample sees smaller differences than the key has: the brackets miss
        ms = [base + torch.randn(n, generator=g) * 1e-3 for _ in range(models)]
        step = max(1, n // 65536)
        for m in ms:
            m[::step] = base[::step] + (m[::step] - base[::step]) * 0.3
    else:
        ms = [base + torch.randn(n, generator=g) * 1e-3 for _ in range(models)]
    base[::7] = -0.0
    return [base.to(dtype)] + [m.to(dtype) for m in ms]


@pytest.mark.parametrize("n", [1000, 262_144, 300_007])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32])
@pytest.mark.parametrize("kind", ["normal", "grid", "zeros", "biased"])
def test_ties_bit_exact(n, dtype, kind):
    ts = family(n, dtype, kind, models=3 if kind == "normal" else 2)
    for density in (0.0, 0.01, 0.2, 0.77, 1.0):
        for ws in ([1.0] * 3, [0.5, 2.0, 0.3], [1.0, -0.7, 1 / 3]):
            ws = ws[: len(ts) - 1]
            ref = ref_ties(ts, ws, density, 0.9)
            for k in THREADS:
                with _common.use_workers(k):
                    got = ties_merge(ts, [1.0] + ws, density, 0.9)
                assert torch.equal(bits(got), bits(ref)), (density, ws, k)


def test_ties_inference_mode_and_out_buffer():
    ts = family(300_007, torch.float16, "normal")
    ref = ref_ties(ts, [1.0, 1.0], 0.2, 1.0)
    out = torch.empty(400_000)
    with torch.inference_mode(), _common.use_workers(2):
        got = ties_merge([t.clone() for t in ts], [1, 1, 1], 0.2, 1.0, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("drop", [0.0, 0.3, 0.7, 0.999])
def test_dare_bit_exact(drop):
    n, seed = 300_007, 4242
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=g) for _ in range(3)]
    ts[1][::97] = float("nan")  # a slice with a non-finite difference takes the masked fill
    ts[0][::5] = -0.0
    ws = [1.0, 1.0, -0.6]
    b = ts[0]
    acc = torch.zeros(n)
    for i, (m, w) in enumerate(zip(ts[1:], ws[1:]), start=1):
        d = m - b
        if drop > 0:
            d.masked_fill_(uniforms(seed, i, 100, n) < drop, 0.0)
        acc.add_(d, alpha=w)
    if drop > 0:
        acc.div_(1.0 - drop)
    ref = torch.add(b, acc, alpha=0.8)
    for k in THREADS:
        with _common.use_workers(k):
            got = dare_merge(ts, ws, drop, 0.8, seed, [0, 1, 2], offset=100)
        assert torch.equal(bits(got), bits(ref)), k


def test_dare_mask_compare_at_the_drop_value():
    for drop in (0.1, 0.3, 0.7, 0.999, 1 / 3):
        f = torch.tensor(drop, dtype=torch.float32)
        u = torch.stack([torch.nextafter(f, torch.tensor(0.0)), f, torch.nextafter(f, torch.tensor(1.0))]).repeat(100)
        keep = torch.empty_like(u)
        torch.ge(u, drop, out=keep)
        assert torch.equal(keep, (~(u < drop)).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_difference_bit_exact(dtype):
    g = torch.Generator().manual_seed(9)
    n = 300_007
    a, b, c = (torch.randn(n, generator=g) * 0.05 for _ in range(3))
    b[::3] = c[::3]
    a[1::5] = b[1::5]
    a[::11] = float("nan")
    c[2::13] = float("inf")
    a, b, c = (x.to(dtype).float() for x in (a, b, c))  # the engine widens a chunkable method's inputs to fp32
    ref = train_difference(a, b, c, 0.7)
    for k in THREADS:
        with _common.use_workers(k):
            got = TrainDifference().merge_tensor([a, b, c], [1, 1, 1], {"alpha": 0.7}, KeyContext("k", 0, (), [0, 1, 2]))
        assert torch.equal(bits(got), bits(ref)), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float64])
def test_slerp_bit_exact(dtype):
    g = torch.Generator().manual_seed(3)
    n = 300_007
    a, b = ((torch.randn(n, generator=g) * 0.05).to(dtype) for _ in range(2))
    dot = na2 = nb2 = 0.0
    for s, e in _common.slices(n):
        x, y = a[s:e].float().double(), b[s:e].float().double()
        dot, na2, nb2 = dot + float(torch.dot(x, y)), na2 + float(torch.dot(x, x)), nb2 + float(torch.dot(y, y))
    c0, c1 = slerp_coefficients(dot, na2, nb2, 0.3)
    ref = torch.add(a.float() * c0, b.float(), alpha=c1)
    for k in THREADS:
        with _common.use_workers(k):
            got = slerp_merge(a, b, 0.3)
        assert torch.equal(bits(got), bits(ref)), k

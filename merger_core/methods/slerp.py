"""Spherical linear interpolation of two models, per key.

With ``a`` and ``b`` the key's two tensors flattened, ``cos w = <a, b> / (|a| |b|)`` (accumulated in fp64). The
result is ``sin((1-t) w)/sin w * a + sin(t w)/sin w * b``. Where the vectors are (nearly) parallel or
anti-parallel (``|cos w| > 0.9995``) or one is zero, the angle is ill-defined and the plain linear interpolation
``(1-t) a + t b`` is used.

On the CPU both passes run in slices on the worker threads with buffers reused per thread. The dot products are
taken per slice of ``_common.SLICE`` elements and added up slice by slice in order, as they always were (their
rounding depends on that order); the mix ``a * c0 + c1 * b`` is elementwise and runs in bigger slices. An input is
widened straight to fp64 for the dots when that gives the same values as widening it to fp32 first (fp16, bf16,
fp32).
"""

import math

from .registry import MergeMethod, Param, register
from ._common import (
    SLICE, device_slice, device_work, empty_f32, flat, has_fp64, result_on, run_slices, scratch, slices, widen_into,
    work_size,
)

PARALLEL = 0.9995


def slerp_coefficients(dot: float, na2: float, nb2: float, t: float):
    if na2 <= 0 or nb2 <= 0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / math.sqrt(na2 * nb2)))
    if abs(cos) > PARALLEL:
        return 1.0 - t, t
    w = math.acos(cos)
    s = math.sin(w)
    return math.sin((1.0 - t) * w) / s, math.sin(t * w) / s


def slerp_merge(a, b, t: float, out=None, ctx=None):
    """The merge of one key (any float dtypes; on the CPU, memory-mapped views are fine). Returns a flat fp32
    tensor (``out`` when given: a contiguous fp32 tensor of at least the key's number of elements)."""
    import torch

    a, b = flat(a), flat(b)
    n = a.numel()
    dev = device_work([a, b], ctx)
    if dev is not None:
        return _slerp_merge_device(dev[0], n, t, dev[1], out)
    # pass 1: the three dot products in fp64, one per SLICE and summed slice by slice in order, as always (the
    # slices may run on several threads: each one's dots do not depend on where it runs)
    def dots(s, e):
        L = e - s
        x32, y32 = (v[:L] for v in scratch("slerp32", 2, L))
        x, y = (v[:L] for v in scratch("slerp64", 2, L, dtype=torch.float64))
        _widen64(x, a[s:e], x32)
        _widen64(y, b[s:e], y32)
        return float(torch.dot(x, y)), float(torch.dot(x, x)), float(torch.dot(y, y))

    dot = na2 = nb2 = 0.0
    for d, p, q in run_slices(n, dots, SLICE):
        dot += d
        na2 += p
        nb2 += q
    c0, c1 = slerp_coefficients(dot, na2, nb2, t)
    out = empty_f32(n) if out is None else out.reshape(-1)[:n]

    def mix(s, e):  # pass 2: a * c0 + c1 * b, the same two ops as always
        L = e - s
        x, y = (v[:L] for v in scratch("slerp-mix", 2, L))
        widen_into(x, a[s:e]).mul_(c0)
        torch.add(x, widen_into(y, b[s:e]), alpha=c1, out=out[s:e])

    run_slices(n, mix, work_size(n))
    return out


def _widen64(x, v, tmp32):
    """``x`` (fp64) = ``f32(v).double()``: straight from fp16, bf16 and fp32 (exact either way), through fp32
    otherwise (fp64 inputs are rounded to fp32 first, as they always were)."""
    import torch

    if v.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return x.copy_(v)
    return x.copy_(widen_into(tmp32, v))


def _slerp_merge_device(load, n: int, t: float, device, out=None):
    """The same merge on a device (GPU, MPS), from slices that ``load(j, s, e)`` brings there (fp32, read only).
    The dot products are taken per ``SLICE`` on the device in fp64, batched (one kernel per big slice), come back to
    the host once per key and are added up there in the same order as on the CPU; the per-slice values may round
    differently from the CPU's ``torch.dot`` (the reductions run in another order), so the coefficients, and the
    result, may differ from the CPU's in the last bit."""
    import torch

    size = device_slice(n, 12)  # the fp64 copies and products of pass 1: about 12 fp32 slices
    here = has_fp64(device)  # MPS has no float64: there pass 1 runs on the CPU, from slices brought back
    parts = []
    for s, e in slices(n, size):
        x, y = load(0, s, e), load(1, s, e)
        if not here:
            x, y = x.cpu(), y.cpu()
        x, y = x.double(), y.double()
        m = (e - s) // SLICE * SLICE  # s is a multiple of SLICE: these rows are the CPU's slices
        if m:
            xs, ys = x[:m].view(-1, SLICE), y[:m].view(-1, SLICE)
            parts.append(torch.stack([(xs * ys).sum(1), (xs * xs).sum(1), (ys * ys).sum(1)], 1))
        if m < e - s:
            xt, yt = x[m:], y[m:]
            parts.append(torch.stack([torch.dot(xt, yt), torch.dot(xt, xt), torch.dot(yt, yt)]).reshape(1, 3))
        del x, y
    dot = na2 = nb2 = 0.0
    for d, p, q in torch.cat(parts).cpu().tolist():  # the key's one wait for the device
        dot += d
        na2 += p
        nb2 += q
    c0, c1 = slerp_coefficients(dot, na2, nb2, t)
    out = result_on(device, n, out)
    for s, e in slices(n, device_slice(n, 4)):
        torch.add(load(0, s, e) * c0, load(1, s, e), alpha=c1, out=out[s:e])
    return out


class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation between two models, per key (t=0: A, t=1: B)"
    kind = "tensor"
    native_inputs = True
    streams_on_device = True
    params = (Param("t", 0.5, 0.0, 1.0, "position between A (0) and B (1)"),)
    min_inputs = 2
    max_inputs = 2
    roles = ("A", "B")
    uses_weights = False
    memory_note = "one fp32 result of the key plus a few fp64 slices (CPU); two passes over the key's inputs"

    def merge_tensor(self, tensors, weights, params, ctx):
        return slerp_merge(tensors[0], tensors[1], float(params["t"]), out=ctx.out, ctx=ctx)


register(Slerp())

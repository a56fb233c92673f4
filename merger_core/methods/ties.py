"""TIES merging (Yadav et al. 2023) over a common base; the first input is the base.

For each model i the difference ``d_i = M_i - base`` is trimmed to its top ``density`` fraction by magnitude
within the key (elements with ``|d_i| >= t_i``, where ``t_i`` is the ceil(density*n)-th largest magnitude; ties at
the threshold are kept). A sign is elected per element: the sign of ``sum_i w_i * trim(d_i)``. The trimmed
differences that agree with it (non-zero, same sign) are averaged with weights ``w_i``:
``merged = sum_agree w_i trim(d_i) / sum_agree w_i`` (0 where none agrees), and the result is
``base + scale * merged``.

How it runs on the CPU (two passes over the key, in slices of ``_common.WORK`` elements spread over the worker
threads, each thread with its own reused scratch buffers):

1. Thresholds. For a key of more than 2^18 elements, a strided sample of each ``|d_i|`` (65536 values) gives a
   bracket ``[lo, hi]`` around the threshold (two order statistics of the sample, found by ``numpy.partition``).
   One pass over the key then computes every model's ``|d_i|`` slice by slice (the base is widened once per slice
   for all the models), counts the values above ``hi`` and copies out the few in ``[lo, hi]`` (numpy comparisons
   and boolean indexing). The threshold is the element of that band whose rank makes the count right, found by
   ``numpy.partition``; it is the exact ``count``-th largest magnitude. When the sample misled (the threshold is
   outside the bracket) the whole ``|d_i|`` is built and selected from instead. Smaller keys are selected from
   directly. Only where the search looks depends on the sample, never the threshold it finds.
2. Trim, elect and average, slice by slice, with the same torch operations in the same order as always, so every
   result is bit for bit what it was: the difference (widened into a buffer, then subtracted), ``hardshrink`` at
   the float just below the threshold (``|x| > nextafter(t, 0)`` is ``|x| >= t``), the weighted vote, the agreement
   ``d * vote > 0``, the weighted sums, the division and ``base + scale * merged`` written into the output.

Other devices run the same two passes with torch operations only.
"""

import math

from .registry import MergeMethod, Param, register
from ._common import (
    BandScan,
    brackets,
    empty_f32,
    f32,
    flat,
    kth_largest_streamed,
    kth_smallest_np,
    np_scratch,
    operand,
    run_slices,
    scratch,
    widen_into,
    work_size,
)

SAMPLE = 1 << 16  # elements sampled (strided) to bracket each threshold
DIRECT = 1 << 18  # keys up to this many elements select their thresholds from the whole |d| directly
GROUP = 4  # models whose bands one threshold pass gathers together (the band of each is about 3% of the key)


def ties_merge(tensors, weights, density: float, scale: float, out=None):
    """tensors[0] is the base; any float dtype: every slice meets fp32 arithmetic widened (fp16/bf16 inside the
    operation, fp8 and fp64 first: torch does not promote fp8 in mixed operations). Returns a flat fp32 tensor:
    ``out`` (a contiguous fp32 tensor of at least the key's number of elements on the same device, reused between
    keys by a caller that wants no fresh allocation per key) when given, else a new one."""
    import torch

    base = flat(tensors[0])
    models = [flat(t) for t in tensors[1:]]
    ws = [float(w) for w in weights[1:]]
    n = base.numel()
    if out is not None:
        out = out.reshape(-1)[:n]
    if base.device.type != "cpu":
        return _ties_merge_torch(base, models, ws, density, scale, out)
    count = min(n, math.ceil(density * n - 1e-9))
    keep_all = count >= n
    if keep_all or count <= 0 or not models:
        thresholds = [None] * len(models)
    else:
        thresholds = _thresholds(base, models, n, count)
    import numpy as np

    # below the threshold -> 0, as one fused op: hardshrink zeroes |x| <= lambd, and |x| > nextafter(t, 0) <=> |x| >= t
    lambdas = [
        -1.0 if keep_all else None if t is None else float(np.nextafter(np.float32(t), np.float32(0)))
        for t in thresholds
    ]
    if out is None:
        out = empty_f32(n)
    _trim_elect_average(base, models, ws, lambdas, scale, out)
    return out


def _absdiff_into(x, m, b):
    """``|m - b|`` in the fp32 buffer ``x`` (``b``: the base's slice, already fp32)."""
    import torch

    widen_into(x, m)
    return torch.sub(x, b, out=x).abs_()


def _thresholds(base, models, n: int, count: int) -> list:
    """Each model's exact ``count``-th largest ``|M_i - base|`` over the key (a numpy float32 value), CPU."""
    import numpy as np
    import torch

    if n <= DIRECT:
        b = widen_into(torch.empty(n, dtype=torch.float32), base)
        x = torch.empty(n, dtype=torch.float32)
        return [kth_smallest_np(_absdiff_into(x, m, b).numpy(), n - count + 1) for m in models]
    step = max(1, n // SAMPLE)
    b_sample = f32(base[::step])
    tries = []  # per model: the brackets still to try, narrow first
    for m in models:
        sample = torch.sub(operand(m[::step]), b_sample).abs_()
        narrow, wide = brackets(sample, n, count)
        tries.append([] if math.isnan(wide[1]) else [narrow, wide])  # a NaN bound brackets nothing
    found = [None] * len(models)
    for attempt in range(2):
        todo = [i for i in range(len(models)) if found[i] is None and len(tries[i]) > attempt]
        for g in range(0, len(todo), GROUP):
            group = todo[g : g + GROUP]
            scans = [BandScan(*tries[i][attempt]) for i in group]

            def one(s, e, group=group, scans=scans):
                L = e - s
                bb, x = scratch("ties-thresholds", 2, L)
                mask_a, mask_b = np_scratch("ties-thresholds", 2, L)
                b = widen_into(bb[:L], base[s:e])
                res = []
                for i, scan in zip(group, scans):
                    xs = _absdiff_into(x[:L], models[i][s:e], b).numpy()
                    res.append(scan.scan(xs, mask_a[:L], mask_b[:L]))
                return res

            parts = run_slices(n, one, work_size(n))
            for j, i in enumerate(group):
                found[i] = BandScan.result([p[j] for p in parts], count)
    for i, t in enumerate(found):
        if t is None:  # the sample misled (or saw NaN): select from the whole |d|
            full = empty_f32(n)

            def fill(s, e, i=i):
                bb = scratch("ties-fallback", 1, e - s)[0]
                _absdiff_into(full[s:e], models[i][s:e], widen_into(bb[: e - s], base[s:e]))

            run_slices(n, fill, work_size(n))
            found[i] = kth_smallest_np(full.numpy(), n - count + 1)
            del full
    return found


def _trim_elect_average(base, models, ws, lambdas, scale: float, out) -> None:
    """Pass 2 on the CPU: ``out = base + scale * merged`` slice by slice (see the module's docstring)."""
    import torch

    signed_weights = any(w <= 0 for w in ws)
    min_w = min(ws) if ws else 1.0
    live = [(i, lam, w) for i, (lam, w) in enumerate(zip(lambdas, ws)) if lam is not None]
    n = base.numel()

    def pass2(s, e):
        L = e - s
        bufs = [t[:L] for t in scratch("ties-merge", 4 + 2 * len(live), L)]
        zero = scratch("zeros", 1, L, zeros=True)[0][:L]  # stays zero: nothing writes a "zeros" buffer
        b = widen_into(bufs[0], base[s:e])
        vote, num, den = bufs[1:4]
        trimmed = []
        for j, (i, lam, w) in enumerate(live):
            d = widen_into(bufs[4 + j], models[i][s:e])
            torch.sub(d, b, out=d)
            if lam >= 0:
                torch.hardshrink(d, lam, out=d)
            trimmed.append((d, w))
        if not trimmed:  # nothing kept: merged = 0 / min_w
            num.zero_()
            den.zero_()
        else:
            # vote = sum_j w_j d_j, left to right, as 0 + w_1 d_1, then fused multiply-adds; the sign of a zero
            # vote never matters (only d * vote > 0 is asked), so 0 + w_1 d_1 may be w_1 d_1, or d_1 itself
            (d1, w1) = trimmed[0]
            rest = trimmed[1:]
            if w1 == 1.0 and rest:
                torch.add(d1, rest[0][0], alpha=rest[0][1], out=vote)
                rest = rest[1:]
            elif w1 == 1.0:
                vote = d1
            else:
                torch.mul(d1, w1, out=vote)
            for d, w in rest:
                vote.add_(d, alpha=w)
            agrees = bufs[4 + len(live) : 4 + len(live) + len(trimmed)]
            for (d, w), agree in zip(trimmed, agrees):
                torch.mul(d, vote, out=agree).gt_(0)  # 1.0 where same sign as the vote and both non-zero
            # num = 0 + w_1 d_1 a_1 + ... (the zero is a buffer that stays zero: no zero fill per slice)
            torch.addcmul(zero, d1, agrees[0], value=w1, out=num)
            for (d, w), agree in zip(trimmed[1:], agrees[1:]):
                num.addcmul_(d, agree, value=w)
            # den = 0 + w_1 a_1 + ...: the sign of a zero den never matters (den != 0, or clamp_min(min_w > 0))
            rest = list(zip(agrees[1:], [w for _, w in trimmed[1:]]))
            if w1 == 1.0 and rest:
                torch.add(agrees[0], rest[0][0], alpha=rest[0][1], out=den)
                rest = rest[1:]
            elif w1 == 1.0:
                den = agrees[0]
            else:
                torch.mul(agrees[0], w1, out=den)
            for agree, w in rest:
                den.add_(agree, alpha=w)
        if signed_weights:  # with weights <= 0 a zero denominator can meet a non-zero numerator
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        else:  # den is 0 (and then num too) or at least the smallest weight: flooring it there changes nothing else
            merged = num.div_(den.clamp_min_(min_w))
        torch.add(b, merged, alpha=scale, out=out[s:e])

    run_slices(n, pass2, work_size(n))


def _ties_merge_torch(base, models, ws, density: float, scale: float, out=None):
    """The same merge with torch operations only (GPU and other devices): whole fp32 tensors of the key."""
    import torch

    n = base.numel()
    count = min(n, math.ceil(density * n - 1e-9))
    thresholds = []
    for m in models:  # pass 1: each model's magnitude threshold over the whole key, streamed
        def absdiff(s, e, m=m):
            return torch.sub(operand(m[s:e]), f32(base[s:e])).abs_()

        step = max(1, n // SAMPLE)
        sample = torch.sub(operand(m[::step]), f32(base[::step])).abs_()
        thresholds.append(None if count >= n else kth_largest_streamed(absdiff, n, count, sample))
    keep_all = count >= n
    signed_weights = any(w <= 0 for w in ws)
    min_w = min(ws) if ws else 1.0
    lambdas = [
        -1.0 if keep_all else None if t is None else float(torch.nextafter(t.reshape(()).float(), torch.zeros((), device=t.device)))
        for t in thresholds
    ]
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=base.device)

    def pass2(s, e):  # trim, elect, disjoint mean for one slice
        b = f32(base[s:e])
        trimmed = []
        vote = torch.zeros_like(b)
        for m, lam, w in zip(models, lambdas, ws):
            if lam is None:
                trimmed.append(None)
                continue
            d = torch.sub(operand(m[s:e]), b)
            if lam >= 0:
                d = torch.nn.functional.hardshrink(d, lam)
            trimmed.append(d)
            vote.add_(d, alpha=w)
        num = torch.zeros_like(b)
        den = torch.zeros_like(b)
        for d, w in zip(trimmed, ws):
            if d is None:
                continue
            agree = torch.mul(d, vote).gt_(0)
            num.addcmul_(d, agree, value=w)
            den.add_(agree, alpha=w)
        if signed_weights:
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        else:
            merged = num.div_(den.clamp_min_(min_w))
        torch.add(b, merged, alpha=scale, out=out[s:e])

    run_slices(n, pass2)
    return out


class Ties(MergeMethod):
    name = "ties"
    description = "TIES: trim each difference from the base to its top-k, elect signs, average the agreeing ones"
    kind = "tensor"
    native_inputs = True
    params = (
        Param("density", 0.2, 0.0, 1.0, "fraction of each difference kept (by magnitude, per key)"),
        Param("scale", 1.0, -2.0, 3.0, "lambda: how much of the merged difference is added to the base"),
    )
    min_inputs = 2
    uses_weights = False
    takes_base = True  # input 0 is the base (a manifest's "base" goes there)
    memory_note = (
        "the fp32 result of the key, the values near each threshold (about 3% of the key for each of up to 4"
        " models at a time), and N+5 slices of 256 KiB per thread; independent of the number of models (CPU). On a"
        " GPU the engine also holds the N+1 fp32 inputs of the key."
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        return ties_merge(tensors, weights, float(params["density"]), float(params["scale"]), out=ctx.out)


register(Ties())

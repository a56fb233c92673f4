"""TIES merging (Yadav et al. 2023) over a common base; the first input is the base.

For each model i the difference ``d_i = M_i - base`` is trimmed to its top ``density`` fraction by magnitude
within the key (elements with ``|d_i| >= t_i``, where ``t_i`` is the ceil(density*n)-th largest magnitude; ties at
the threshold are kept). A sign is elected per element: the sign of ``sum_i w_i * trim(d_i)``. The trimmed
differences that agree with it (non-zero, same sign) are averaged with weights ``w_i``:
``merged = sum_agree w_i trim(d_i) / sum_agree w_i`` (0 where none agrees), and the result is
``base + scale * merged``.
"""

import math

from .registry import MergeMethod, Param, register
from ._common import f32, flat, kth_largest_streamed, operand, run_slices

SAMPLE = 1 << 16  # elements sampled (strided) to bracket each threshold


def ties_merge(tensors, weights, density: float, scale: float):
    """tensors[0] is the base; any float dtype: every slice meets fp32 arithmetic widened (fp16/bf16 inside the
    operation, fp8 and fp64 first: torch does not promote fp8 in mixed operations). Returns a flat fp32 tensor."""
    import torch

    base = flat(tensors[0])
    models = [flat(t) for t in tensors[1:]]
    ws = [float(w) for w in weights[1:]]
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
    # below the threshold -> 0, as one fused op: hardshrink zeroes |x| <= lambd, and |x| > nextafter(t, 0) <=> |x| >= t
    lambdas = [
        -1.0 if keep_all else None if t is None else float(torch.nextafter(t.reshape(()).float(), torch.zeros((), device=t.device)))
        for t in thresholds
    ]
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
            agree = torch.mul(d, vote).gt_(0)  # 1.0 where same sign as the vote and both non-zero
            num.addcmul_(d, agree, value=w)
            den.add_(agree, alpha=w)
        if signed_weights:  # with weights <= 0 a zero denominator can meet a non-zero numerator
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        else:  # den is 0 (and then num too) or at least the smallest weight: flooring it there changes nothing else
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
        "the fp32 result of the key, the values near each threshold (about 3% of the key), and N+4 slices of"
        " 128 KiB per thread; independent of the number of models (CPU). On a GPU the engine also holds the N+1"
        " fp32 inputs of the key."
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        return ties_merge(tensors, weights, float(params["density"]), float(params["scale"]))


register(Ties())

"""TIES merging (Yadav et al. 2023) over a common base; the first input is the base.

For each model i the difference ``d_i = M_i - base`` is trimmed to its top ``density`` fraction by magnitude
within the key (elements with ``|d_i| >= t_i``, where ``t_i`` is the ceil(density*n)-th largest magnitude; ties at
the threshold are kept). A sign is elected per element: the sign of ``sum_i w_i * trim(d_i)``. The trimmed
differences that agree with it (non-zero, same sign) are averaged with weights ``w_i``:
``merged = sum_agree w_i trim(d_i) / sum_agree w_i`` (0 where none agrees), and the result is
``base + scale * merged``.
"""

import math

from . import MergeMethod, Param, register
from ._common import f32, flat, kth_largest, slices


def ties_merge(tensors, weights, density: float, scale: float):
    """tensors[0] is the base; any float dtype (slices are widened to fp32). Returns a flat fp32 tensor."""
    import torch

    base = flat(tensors[0])
    models = [flat(t) for t in tensors[1:]]
    ws = [float(w) for w in weights[1:]]
    n = base.numel()
    buf = torch.empty(n, dtype=torch.float32, device=base.device)
    count = min(n, math.ceil(density * n - 1e-9))
    thresholds = []
    for m in models:  # pass 1: each model's magnitude threshold over the whole key
        if count <= 0:
            thresholds.append(None)
            continue
        for s, e in slices(n):
            torch.sub(f32(m[s:e]), f32(base[s:e]), out=buf[s:e]).abs_()
        thresholds.append(kth_largest(buf, count))
    out = buf
    for s, e in slices(n):  # pass 2: trim, elect, disjoint mean, slice by slice
        b = f32(base[s:e])
        trimmed = []
        vote = torch.zeros_like(b)
        for m, t, w in zip(models, thresholds, ws):
            d = f32(m[s:e]) - b
            if t is None:
                d.zero_()
            else:
                d.masked_fill_(d.abs() < t, 0.0)
            trimmed.append(d)
            vote.add_(d, alpha=w)
        elected = torch.sign(vote)
        num = torch.zeros_like(b)
        den = torch.zeros_like(b)
        for d, w in zip(trimmed, ws):
            agree = (torch.sign(d) == elected) & (d != 0)
            num.add_(torch.where(agree, d, 0.0), alpha=w)
            den.add_(agree.to(torch.float32), alpha=w)
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        torch.add(b, merged, alpha=scale, out=out[s:e])
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
    memory_note = (
        "one fp32 buffer of the key (reused as the result) plus about 1.5x that during the threshold search, and"
        " N+4 fp32 slices of 4 MiB; independent of the number of models (CPU). On a GPU the engine also holds"
        " the N+1 fp32 inputs of the key."
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        if not ctx.sources or ctx.sources[0] != 0:
            raise_no_base(self.name, ctx)
        return ties_merge(tensors, weights, float(params["density"]), float(params["scale"]))


def raise_no_base(method, ctx):
    from ...errors import IncompatibleModelsError

    raise IncompatibleModelsError(f"{ctx.key}: the base (first input) lacks this key, so {method} has no difference to take")


register(Ties())

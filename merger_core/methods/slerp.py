"""Spherical linear interpolation of two models, per key.

With ``a`` and ``b`` the key's two tensors flattened, ``cos w = <a, b> / (|a| |b|)`` (accumulated in fp64). The
result is ``sin((1-t) w)/sin w * a + sin(t w)/sin w * b``. Where the vectors are (nearly) parallel or
anti-parallel (``|cos w| > 0.9995``) or one is zero, the angle is ill-defined and the plain linear interpolation
``(1-t) a + t b`` is used.
"""

import math

from .registry import MergeMethod, Param, register
from ._common import f32, flat, slices

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


def slerp_merge(a, b, t: float):
    import torch

    a, b = flat(a), flat(b)
    n = a.numel()
    dot = na2 = nb2 = 0.0
    for s, e in slices(n):
        x = f32(a[s:e]).double()
        y = f32(b[s:e]).double()
        dot += float(torch.dot(x, y))
        na2 += float(torch.dot(x, x))
        nb2 += float(torch.dot(y, y))
    c0, c1 = slerp_coefficients(dot, na2, nb2, t)
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    for s, e in slices(n):
        torch.add(f32(a[s:e]) * c0, f32(b[s:e]), alpha=c1, out=out[s:e])
    return out


class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation between two models, per key (t=0: A, t=1: B)"
    kind = "tensor"
    native_inputs = True
    params = (Param("t", 0.5, 0.0, 1.0, "position between A (0) and B (1)"),)
    min_inputs = 2
    max_inputs = 2
    roles = ("A", "B")
    uses_weights = False
    memory_note = "one fp32 result of the key plus a few fp64 slices (CPU); two passes over the key's inputs"

    def merge_tensor(self, tensors, weights, params, ctx):
        return slerp_merge(tensors[0], tensors[1], float(params["t"]))


register(Slerp())

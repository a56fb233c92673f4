"""Helpers shared by the tensor methods: slice-wise widening to fp32 and an exact top-k threshold.

Methods that set ``native_inputs`` receive the inputs of one key in their file dtype (memory-mapped views on the
CPU) and walk them in slices of :data:`SLICE` elements, so their working memory does not grow with the number of
models.
"""

from __future__ import annotations

from typing import Iterator, Tuple

SLICE = 1 << 20  # elements per slice (4 MiB in fp32)


def slices(n: int, size: int = SLICE) -> Iterator[Tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


def f32(t):
    import torch

    return t if t.dtype == torch.float32 else t.to(torch.float32)


def flat(t):
    return t.reshape(-1)


def kth_largest(a, count: int):
    """The value ``v`` such that exactly the ``count`` largest elements of the 1-D tensor ``a`` are ``>= v``
    (ties at ``v`` are all kept). Exact; a sampled bracket makes it a few comparisons instead of a full select."""
    import torch

    n = a.numel()
    if count >= n:
        return a.min()
    if count <= 0:
        return None
    if n <= (1 << 18):
        return torch.kthvalue(a, n - count + 1).values
    step = max(1, n // (1 << 16))
    sample = a[::step].contiguous()
    m = sample.numel()
    q = 1.0 - count / n  # quantile of the threshold
    margin = 4.0 / (m ** 0.5) + 1.0 / m
    lo_q, hi_q = max(0.0, q - margin), min(1.0, q + margin)
    ss = torch.sort(sample).values
    lo = ss[int(lo_q * (m - 1))]
    hi = ss[min(m - 1, int(hi_q * (m - 1)) + 1)]
    above = int((a > hi).sum())
    need = count - above
    if need >= 1:
        band = a[(a >= lo) & (a <= hi)]
        if need <= band.numel():
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(a, n - count + 1).values

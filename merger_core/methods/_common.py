"""Helpers shared by the tensor methods: slice-wise widening to fp32 and an exact top-k threshold.

Methods that set ``native_inputs`` receive the inputs of one key in their file dtype (memory-mapped views on the
CPU) and walk them in slices of :data:`SLICE` elements, so their working memory does not grow with the number of
models.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

SLICE = 1 << 15  # elements per slice (128 KiB in fp32): cache-resident, and at torch's parallel grain size, so each op runs on one thread without OpenMP hand-offs


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


def kth_largest_streamed(values, n: int, count: int, sample):
    """Like :func:`kth_largest` for a tensor that is produced slice by slice: ``values(s, e)`` returns elements
    ``s..e`` as a 1-D fp32 tensor, ``sample`` is a 1-D tensor of some of its elements (a strided subset). The
    sample brackets the answer; one pass counts the elements above the bracket and keeps those inside it, so no
    buffer of the whole key is needed. Falls back to a full buffer when the sample misleads (exact either way).
    Returns None when ``count <= 0``."""
    import torch

    if count <= 0:
        return None
    if count >= n or n <= (1 << 18) or sample.numel() < 64:
        return kth_largest(torch.cat([values(s, e) for s, e in slices(n)]), count)
    m = sample.numel()
    q = 1.0 - count / n
    margin = 4.0 / (m ** 0.5) + 1.0 / m
    ss = torch.sort(sample).values
    lo = ss[int(max(0.0, q - margin) * (m - 1))]
    hi = ss[min(m - 1, int(min(1.0, q + margin) * (m - 1)) + 1)]
    above = torch.zeros((), dtype=torch.int64, device=ss.device)
    band = []
    for s, e in slices(n):
        x = values(s, e)
        above += (x > hi).sum()
        band.append(x[(x >= lo) & (x <= hi)])
    need = count - int(above)
    band_t = torch.cat(band)
    if 1 <= need <= band_t.numel():
        return torch.kthvalue(band_t, band_t.numel() - need + 1).values
    full = torch.cat([values(s, e) for s, e in slices(n)])
    return torch.kthvalue(full, n - count + 1).values

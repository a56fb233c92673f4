"""Helpers shared by the tensor methods: slice-wise widening to fp32 and an exact top-k threshold.

Methods that set ``native_inputs`` receive the inputs of one key in their file dtype (memory-mapped views on the
CPU) and walk them in slices of :data:`SLICE` elements, so their working memory does not grow with the number of
models.
"""

from __future__ import annotations

import os
from typing import Iterator, Tuple

SLICE = 1 << 15  # elements per slice (128 KiB in fp32): cache-resident, and at torch's parallel grain size, so each op runs on one thread without OpenMP hand-offs


def slices(n: int, size: int = SLICE) -> Iterator[Tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


_POOL = None
_POOL_SIZE = 0
_OVERRIDE = [0]  # a merge's own thread count (MergePlan.threads), while it runs


class use_workers:
    """``with use_workers(k):`` slice work runs on ``k`` threads (0: the default below)."""

    def __init__(self, k: int):
        self.k, self.old = int(k or 0), 0

    def __enter__(self):
        self.old, _OVERRIDE[0] = _OVERRIDE[0], self.k
        return self

    def __exit__(self, *exc):
        _OVERRIDE[0] = self.old


def workers() -> int:
    """Threads for slice work: the running merge's ``threads``, else ``$MODEL_MERGER_THREADS``, else one less than
    the CPUs this process may run on. Independent of torch's intra-op setting (the engine sets it to 1 on the CPU): slices are
    below torch's parallel grain size, so each op runs on the thread that calls it, and the threads here do no
    spin-waiting. Results never depend on it: slice boundaries are fixed."""
    if _OVERRIDE[0] > 0:
        return _OVERRIDE[0]
    env = os.environ.get("MODEL_MERGER_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # one core is left to the output's hashing and writing threads: on this project's 2-core test machine two
    # merge workers were slower than one (weighted sum 6.8 s vs 5.9 s, TIES 39 s vs 33 s; docs/performance.md)
    return max(1, cpus - 1)


def run_slices(n: int, fn, size: int = SLICE) -> list:
    """``[fn(s, e) for each slice of 0..n]``, in order. The slices are handed to worker threads in runs of a few
    (torch releases the GIL inside its ops), so every core is used while each op stays single-threaded and
    cache-resident. The result does not depend on the number of threads."""
    global _POOL, _POOL_SIZE
    sl = list(slices(n, size))
    k = workers()
    if k <= 1 or len(sl) < 2 * k:
        return [fn(s, e) for s, e in sl]
    if _POOL is None or _POOL_SIZE != k:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=k, thread_name_prefix="model-merger-slices")
        _POOL_SIZE = k
    import torch

    per = max(1, min(16, len(sl) // (4 * k)))  # several runs per thread: a slowed core does not hold the rest
    groups = [sl[i : i + per] for i in range(0, len(sl), per)]
    # Inference mode is per thread: ComfyUI runs nodes inside torch.inference_mode(), so tensors made by the caller
    # are inference tensors, which the workers may only update in place inside the same mode.
    inference = torch.is_inference_mode_enabled()

    def run(group):
        with torch.inference_mode(inference):
            return [fn(s, e) for s, e in group]

    futures = [_POOL.submit(run, g) for g in groups]
    return [r for f in futures for r in f.result()]


def f32(t):
    import torch

    return t if t.dtype == torch.float32 else t.to(torch.float32)


def operand(t):
    """``t`` ready for arithmetic with fp32 tensors: fp16, bf16 and fp32 as they are (torch widens them inside the
    operation, with no temporary), anything else (fp8, which torch does not promote, and fp64) widened to fp32."""
    import torch

    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.to(torch.float32)


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
    def scan(s, e):
        x = values(s, e)
        return int((x > hi).sum()), x[(x >= lo) & (x <= hi)]

    parts = run_slices(n, scan)
    above = sum(a for a, _ in parts)
    band = [b for _, b in parts]
    need = count - int(above)
    band_t = torch.cat(band)
    if 1 <= need <= band_t.numel():
        return torch.kthvalue(band_t, band_t.numel() - need + 1).values
    full = torch.cat([values(s, e) for s, e in slices(n)])
    return torch.kthvalue(full, n - count + 1).values

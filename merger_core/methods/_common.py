"""Helpers shared by the tensor methods: slice-wise widening to fp32, per-thread scratch buffers, a pool of worker
threads for slices, and an exact top-k threshold.

Methods that set ``native_inputs`` receive the inputs of one key in their file dtype (memory-mapped views on the
CPU) and walk them in slices, so their working memory does not grow with the number of models.

Slice boundaries are fixed multiples of :data:`SLICE` whatever the slice size or the number of threads, so every
elementwise op sees the same elements in its vectorized blocks and its scalar tail as it always has: the bytes of a
result never depend on the slicing or on the threads.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator, Tuple

SLICE = 1 << 15  # the unit of slice boundaries (and the slice of methods that sum per slice, such as SLERP's dot products)
WORK = 1 << 16  # elements per slice of elementwise work on one thread (256 KiB in fp32): a few such buffers stay in
# a core's L2 cache, and each op on them is long enough that torch's per-call cost (about 2 us) stays small
WORK_THREADED = 1 << 18  # ... with several worker threads: longer ops. Every torch op releases the GIL and takes it
# back; when another thread holds it then, the caller sleeps, and waking a sleeping thread costs tens of
# microseconds on a virtual machine (the other thread usually takes the GIL back first). Ops shorter than that make
# two threads slower than one (TIES at 32 Ki-element slices: 41 s on two threads, 34 s on one); ops of 256 Ki
# elements (50-100 us each) scale to about 1.9x on two cores.
SERIAL_BELOW = 1 << 19  # a range of fewer elements runs on the calling thread: it is short, or the caller is itself
# one of several workers (the engine hands element-wise methods 256 Ki-element chunks on its own threads)


def work_size(n: int) -> int:
    """Elements per slice for elementwise work over ``n`` elements on :func:`workers` threads: a multiple of
    :data:`SLICE` (so results never depend on it), :data:`WORK` on one thread, up to :data:`WORK_THREADED` on
    several, but small enough that each thread gets a few slices of the range."""
    k = workers()
    if k <= 1 or n < SERIAL_BELOW:
        return WORK
    size = min(WORK_THREADED, max(WORK, n // (4 * k)))
    return max(SLICE, size - size % SLICE)


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
    (torch and numpy release the GIL inside their ops), so every core is used while each op stays single-threaded
    and cache-resident. A range below :data:`SERIAL_BELOW` elements runs on the calling thread. The result does
    not depend on the number of threads."""
    sl = list(slices(n, size))
    k = workers()
    if k <= 1 or len(sl) < 2 or n < SERIAL_BELOW:
        return [fn(s, e) for s, e in sl]
    per = max(1, min(8, len(sl) // (4 * k)))  # several runs per thread: a slowed core does not hold the rest
    groups = [sl[i : i + per] for i in range(0, len(sl), per)]
    return [r for rs in _on_pool(k, [lambda g=g: [fn(s, e) for s, e in g] for g in groups]) for r in rs]


def run_each(fns) -> list:
    """``[f() for f in fns]``, in order, the calls on the worker threads side by side when there are several (a
    model's share of some per-key work, say). The calls must not use the worker threads themselves."""
    k = workers()
    if k <= 1 or len(fns) < 2:
        return [f() for f in fns]
    return _on_pool(k, fns)


def _on_pool(k: int, fns) -> list:
    """``[f() for f in fns]`` on a pool of ``k`` threads, in the caller's inference mode."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != k:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=k, thread_name_prefix="model-merger-slices")
        _POOL_SIZE = k
    import torch

    # Inference mode is per thread: ComfyUI runs nodes inside torch.inference_mode(), so tensors made by the caller
    # are inference tensors, which the workers may only update in place inside the same mode.
    inference = torch.is_inference_mode_enabled()

    def run(f):
        with torch.inference_mode(inference):
            return f()

    futures = [_POOL.submit(run, f) for f in fns]
    return [f.result() for f in futures]


_TLS = threading.local()


def scratch(tag: str, count: int, size: int, dtype=None, zeros: bool = False) -> list:
    """``count`` CPU buffers of ``size`` elements (fp32 unless ``dtype``) owned by the calling thread and reused by
    every call with the same ``tag``: no allocation and no page faults per slice. A caller uses its buffers only
    until it returns (a tag is not used by two nested callers on one thread). Buffers made inside inference mode
    are kept apart from the others (an inference tensor may not be updated in place outside that mode).
    ``zeros``: the buffers are made zero-filled, for a caller that only reads them (tag ``"zeros"``)."""
    import torch

    dtype = dtype or torch.float32
    cache = getattr(_TLS, "bufs", None)
    if cache is None:
        cache = _TLS.bufs = {}
    key = (tag, dtype, torch.is_inference_mode_enabled())
    have = cache.get(key)
    if have is None or len(have) < count or have[0].numel() < size:
        make = torch.zeros if zeros else torch.empty
        cache[key] = have = [make(size, dtype=dtype) for _ in range(count)]
    return have[:count]


def np_scratch(tag: str, count: int, size: int, dtype=None) -> list:
    """Like :func:`scratch` for numpy arrays (bool unless ``dtype``)."""
    import numpy as np

    dtype = np.dtype(dtype or np.bool_)
    cache = getattr(_TLS, "np_bufs", None)
    if cache is None:
        cache = _TLS.np_bufs = {}
    key = (tag, dtype)
    have = cache.get(key)
    if have is None or len(have) < count or have[0].size < size:
        cache[key] = have = [np.empty(size, dtype=dtype) for _ in range(count)]
    return have[:count]


def empty_f32(n: int):
    """A new 1-D fp32 CPU tensor of ``n`` elements for a key-sized result. Its memory comes from numpy, which asks
    the kernel for transparent huge pages on large blocks (madvise): filling a fresh 60 MB result then takes about
    30 page faults instead of 15 000, which made up a tenth of TIES's time."""
    import numpy as np
    import torch

    if n < (1 << 20):
        return torch.empty(n, dtype=torch.float32)
    return torch.from_numpy(np.empty(n, dtype=np.float32))


DEVICE_SLICE_MIN = 1 << 18  # elements (1 MiB in fp32): on a device, a key up to this size is one slice, and no slice
# is smaller (its kernels stay long enough); small against the largest key, so N + 7 such slices stay below it
DEVICE_CACHE_MAX = 1 << 22  # a key whose inputs hold up to this many elements in all is uploaded once, whole


def device_slice(n: int, buffers: int) -> int:
    """Elements per slice for a method's work on a GPU over a key of ``n`` elements: the whole key when it is small,
    else about ``n / buffers`` (so that the ``buffers`` fp32 slices a method holds at once take about one fp32 key:
    device memory flat in the number of models), at least :data:`DEVICE_SLICE_MIN` (kernels stay long) and a
    multiple of :data:`SLICE`."""
    if n <= DEVICE_SLICE_MIN:
        return max(n, 1)
    size = max(DEVICE_SLICE_MIN, -(-n // max(1, buffers)))
    return -(-size // SLICE) * SLICE


def device_work(tensors, ctx):
    """``(load, device)`` for a method's device path, or None for its CPU path. ``load(j, s, e)`` gives elements
    ``s..e`` of input ``j`` as an fp32 tensor on ``device``, which the caller only reads: the engine's own
    (``ctx.load``: the inputs stay on the host and come over slice by slice) when it gives one, else slices of
    ``tensors`` when they are on a device already (a direct call), widened."""
    if ctx is not None and ctx.load is not None:
        return ctx.load, ctx.device
    if tensors[0].device.type == "cpu":
        return None
    flats = [flat(t) for t in tensors]
    return (lambda j, s, e: f32(flats[j][s:e])), tensors[0].device


def has_fp64(device) -> bool:
    """Whether ``device`` computes in float64 (MPS does not)."""
    import torch

    return torch.device(device).type != "mps"


def result_on(device, n: int, out=None):
    """``out`` (a contiguous fp32 buffer of at least ``n`` elements) cut to ``n``, or a new fp32 tensor on ``device``."""
    import torch

    return torch.empty(n, dtype=torch.float32, device=device) if out is None else out.reshape(-1)[:n]


def f32(t):
    import torch

    return t if t.dtype == torch.float32 else t.to(torch.float32)


def operand(t):
    """``t`` ready for arithmetic with fp32 tensors: fp16, bf16 and fp32 as they are (torch widens them inside the
    operation, with no temporary), anything else (fp8, which torch does not promote, and fp64) widened to fp32."""
    import torch

    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.to(torch.float32)


def widen_into(buf, t):
    """``t`` (any float dtype, same number of elements as ``buf``) written into the fp32 buffer ``buf`` with the
    values ``t.to(torch.float32)`` has (fp16, bf16 and fp8 exactly, fp64 rounded to nearest); returns ``buf``."""
    import torch

    if t.dtype.is_floating_point and t.dtype.itemsize == 1:  # fp8: through torch's own conversion, as before
        return buf.copy_(t.to(torch.float32))
    return buf.copy_(t)


def flat(t):
    return t.reshape(-1)


def kth_smallest(a, k: int):
    """The ``k``-th smallest (1-based) element of the 1-D tensor ``a`` as a 0-dim tensor on its device, NaN ranking
    above every number: the element ``torch.kthvalue(a, k)`` gives, with no wait for the host.

    On CUDA ``kthvalue`` runs one thread block per row, so a key's whole ``|d|`` would go through one multiprocessor
    (16 passes of 2-bit radix select); ``topk`` of a long row is a multi-block radix select. So this is ``topk`` of the
    smaller side: the ``k`` smallest (their largest is the answer; a NaN among them means it is NaN), or the
    ``n - k + 1`` largest (their smallest number, NaN when they are all NaN). Memory: that many values and their
    int64 indices, at most half the row's elements. MPS, which lacks the selection ops, selects on the CPU."""
    import torch

    if a.device.type == "mps":
        return torch.kthvalue(a.cpu(), k).values.to(a.device)
    r = a.numel() - k + 1  # the same element is the r-th largest
    if k <= r:
        return torch.topk(a, k, largest=False, sorted=False).values.max()
    top = torch.topk(a, r, largest=True, sorted=False).values
    nan = top.isnan()
    all_nan = nan.all()
    return torch.where(all_nan, float("nan"), top.masked_fill_(nan, float("inf")).min())


def kth_smallest_np(a, k: int):
    """The ``k``-th smallest (1-based) element of the 1-D float numpy array ``a``, as a 0-dim numpy value. NaN
    ranks above every number, as in ``torch.kthvalue`` and ``torch.sort``. ``numpy.partition`` is an introselect:
    exact, and several times faster on the CPU than ``torch.kthvalue``."""
    import numpy as np

    return np.partition(a, k - 1)[k - 1]


def _bracket_indices(m: int, n: int, count: int, sigmas=None):
    """Positions in the sorted sample of ``m`` values of a bracket around the ``count``-th largest of ``n``: a
    margin of ``4/sqrt(m)`` in quantile either side (at least 8 standard deviations of the sample quantile; the
    bracket the search has always used), or ``sigmas`` standard deviations, kept inside that one."""
    q = 1.0 - count / n
    margin = 4.0 / (m ** 0.5) + 1.0 / m
    i_lo = int(max(0.0, q - margin) * (m - 1))
    i_hi = min(m - 1, int(min(1.0, q + margin) * (m - 1)) + 1)
    if sigmas is None:
        return i_lo, i_hi
    narrow = sigmas * (max(q * (1.0 - q), 1.0 / m) / m) ** 0.5 + 2.0 / m
    return max(i_lo, int(max(0.0, q - narrow) * (m - 1))), min(i_hi, int(min(1.0, q + narrow) * (m - 1)) + 1)


NARROW_SIGMAS = 3.5


def brackets(sample, n: int, count: int):
    """``(narrow, wide)`` brackets ``(lo, hi)`` from a CPU ``sample``: ``wide`` spans a margin of ``4/sqrt(m)`` in quantile, ``narrow``
    (inside it) spans :data:`NARROW_SIGMAS` standard deviations of the sample quantile, about a third of its width.
    Gathering the values inside a bracket costs in proportion to how many there are (numpy's boolean gather
    branches on every kept value), so the search tries the narrow one first and the wide one only if the
    threshold is outside it (a sample that misrepresents the key)."""
    import numpy as np

    m = sample.numel()
    i_lo, i_hi = _bracket_indices(m, n, count)
    j_lo, j_hi = _bracket_indices(m, n, count, NARROW_SIGMAS)
    s = sample.float().contiguous().numpy()
    part = np.partition(s, sorted({i_lo, j_lo, j_hi, i_hi}))  # sorted-sample elements (NaN last, as in a sort)
    return (float(part[j_lo]), float(part[j_hi])), (float(part[i_lo]), float(part[i_hi]))


class BandScan:
    """One pass of the exact threshold search for one value stream (a model's ``|M - base|``) over slices of a key.

    :meth:`add` takes the fp32 values of a slice (a numpy view): it counts those above ``hi`` and keeps a copy of
    those in ``[lo, hi]`` (NaN is in neither). Comparisons write numpy bool arrays (SIMD; torch's comparisons into
    bool are several times slower on the CPU) and the band is gathered by boolean indexing. :meth:`result` gives
    the ``count``-th largest value when the band holds it, else None (the caller falls back to a full select)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def scan(self, x, mask_a, mask_b):
        """Count and band of one slice (``x``: fp32 numpy view; masks: bool scratch of its size)."""
        import numpy as np

        np.greater(x, np.float32(self.hi), out=mask_a)
        above = int(np.count_nonzero(mask_a))
        np.greater_equal(x, np.float32(self.lo), out=mask_b)
        np.logical_xor(mask_a, mask_b, out=mask_b)  # lo <= x <= hi (x > hi implies x >= lo, as lo <= hi)
        return above, np.compress(mask_b, x)  # (twice as fast as x[mask_b])

    @staticmethod
    def result(parts, count: int):
        """The ``count``-th largest value from the slices' ``(above, band)`` pairs, or None."""
        import numpy as np

        above = sum(a for a, _ in parts)
        need = count - above
        bands = [b for _, b in parts if b.size]
        size = sum(b.size for b in bands)
        if not 1 <= need <= size:
            return None
        band = np.concatenate(bands) if len(bands) != 1 else bands[0]
        return kth_smallest_np(band, size - need + 1)

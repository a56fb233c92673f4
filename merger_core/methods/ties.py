"""TIES merging (Yadav et al. 2023) over a common base; the first input is the base.

For each model i the difference ``d_i = M_i - base`` is trimmed to its top ``density`` fraction by magnitude
within the key (elements with ``|d_i| >= t_i``, where ``t_i`` is the ceil(density*n)-th largest magnitude; ties at
the threshold are kept). A sign is elected per element: the sign of ``sum_i w_i * trim(d_i)``. The trimmed
differences that agree with it (non-zero, same sign) are averaged with weights ``w_i``:
``merged = sum_agree w_i trim(d_i) / sum_agree w_i`` (0 where none agrees), and the result is
``base + scale * merged``.

How it runs on the CPU: two passes over the key, in slices (``_common.work_size``: 64 Ki elements on one thread,
up to 256 Ki with several) handed to the worker threads (``_common.run_slices``), each thread with buffers made
once and reused (``_Work``). Every slice starts at a multiple of ``_common.SLICE``, so every element meets the same
torch kernels in the same way (in their vectorized loops, or, for the key's last few elements, in their scalar
tails) as it always has, and the result is the same bit for bit whatever the slicing and the number of threads.

1. Thresholds (``_Ties.thresholds``). For a key of more than 2^18 elements, a strided sample of each ``|d_i|``
   (65536 values) brackets its threshold: two order statistics of the sample (``numpy.partition``), 3.5 standard
   deviations of the sample quantile either side of it. One pass over the key computes the ``|d_i|`` of all the
   models slice by slice (the base widened once per slice), counts those above the bracket and copies out the
   few inside it (numpy's SIMD comparisons and ``compress``: torch's comparisons into bool and ``masked_select``
   are several times slower; the copy costs in proportion to what it keeps, hence the narrow bracket). The
   threshold is the element of the band whose rank makes the count right (``numpy.partition``): exactly the
   ``count``-th largest magnitude. When the sample misled (the threshold outside the bracket), another pass
   tries the wide bracket the search has always used (a margin of ``4/sqrt(65536)`` in quantile), and if that
   misses too, or a bound is NaN, the whole ``|d_i|`` is selected from, as before. Smaller keys select from the
   whole ``|d_i|`` directly. Only the time depends on the sample, never the thresholds; NaN and infinities meet
   the same decisions as before.
2. Trim, elect and average (``_Ties.block``): the difference (each input widened to fp32 in a buffer, then the
   subtraction), ``hardshrink`` at the float just below the threshold (``|x| > nextafter(t, 0)`` is ``|x| >= t``),
   the weighted vote, the agreement ``d * vote > 0``, the weighted sums, the division and ``base + scale * merged``:
   the same torch operations in the same order as always. Where a step was a zero fill followed by an add, it is
   one op with the same result (up to the sign of a zero that nothing reads: a zero vote or denominator).

On a device (GPU, MPS) the two passes run with torch operations on slices the engine brings over one at a time
(``_ties_merge_device``, thresholds by ``topk``): device memory about two fp32 keys at the default density,
whatever the number of models.
"""

import math

from .registry import MergeMethod, Param, register
from ._common import (
    _TLS,
    BandScan,
    brackets,
    device_work,
    device_slice,
    empty_f32,
    f32,
    flat,
    kth_smallest,
    kth_smallest_np,
    operand,
    result_on,
    run_each,
    run_slices,
    slices,
    widen_into,
    work_size,
    workers,
)

SAMPLE = 1 << 16  # elements sampled (strided) to bracket each threshold
DIRECT = 1 << 18  # keys up to this many elements select their thresholds from the whole |d| directly
PER_MODEL_THREADS = 1 << 15  # keys from this many elements spread the per-model steps of the search over the threads
GROUP = 8  # models whose thresholds one pass over the key finds together (each keeps ~2% of the key's values)


def ties_merge(tensors, weights, density: float, scale: float, out=None, ctx=None):
    """tensors[0] is the base; any float dtype: every slice meets fp32 arithmetic widened (fp16/bf16 inside the
    operation, fp8 and fp64 first: torch does not promote fp8 in mixed operations). Returns a flat fp32 tensor:
    ``out`` (a contiguous fp32 tensor of at least the key's number of elements on the same device, reused between
    keys by a caller that wants no fresh allocation per key) when given, else a new one. On a device (tensors
    there, or ``ctx.load``): :func:`_ties_merge_device`."""
    base = flat(tensors[0])
    ws = [float(w) for w in weights[1:]]
    n = base.numel()
    dev = device_work(tensors, ctx)
    if dev is not None:
        return _ties_merge_device(dev[0], n, ws, density, scale, dev[1], out)
    models = [flat(t) for t in tensors[1:]]
    if out is not None:
        out = out.reshape(-1)[:n]
    count = min(n, math.ceil(density * n - 1e-9))
    if out is None:
        out = empty_f32(n)
    job = _Ties(base, models, ws, scale, out)
    if count >= n:
        job.merge([-1.0] * len(models))  # everything kept: no trimming at all
    elif count <= 0 or not models:
        job.merge([None] * len(models))  # nothing kept: merged = 0
    else:
        job.merge([_below(t) for t in job.thresholds(count)])
    return out


def _below(t) -> float:
    """``hardshrink``'s lambda for threshold ``t``: the float32 just below it (NaN stays NaN: nothing trimmed)."""
    import numpy as np

    return float(np.nextafter(np.float32(t), np.float32(0)))


class _Work:
    """One thread's buffers for blocks of ``L`` elements of an ``N``-model key, with their views made once (each
    view made per slice costs about a microsecond of Python, and a slice makes dozens)."""

    def __init__(self, N: int, L: int):
        import numpy as np
        import torch

        self.b, self.vote, self.num = torch.empty(3, L).unbind(0)
        self.zero = torch.zeros(L)  # stays zero: num = zero + w_1 d_1 a_1 needs no zero fill per slice
        self.D = torch.empty(N, L).unbind(0)  # the differences, trimmed in place
        A = torch.empty(N, L)
        self.A = A.unbind(0)  # |d| for the threshold search, then the agreement masks
        self.x = list(A.numpy())
        self.above = list(np.empty((N, L), dtype=np.bool_))
        self.band = list(np.empty((N, L), dtype=np.bool_))


class _Part:
    """The first ``L`` elements of each buffer of a :class:`_Work` (for a key's last, shorter slice)."""

    def __init__(self, w: _Work, L: int):
        self.b, self.vote, self.num, self.zero = w.b[:L], w.vote[:L], w.num[:L], w.zero[:L]
        self.D = [t[:L] for t in w.D]
        self.A = [t[:L] for t in w.A]
        self.x = [t[:L] for t in w.x]
        self.above = [t[:L] for t in w.above]
        self.band = [t[:L] for t in w.band]


def _work(N: int, L: int, size: int):
    """The calling thread's buffers for ``N`` models and a block of ``L <= size`` elements (``size``: the full
    slice, whose buffers are kept between calls)."""
    import torch

    cache = getattr(_TLS, "ties_work", None)
    if cache is None:
        cache = _TLS.ties_work = {}
    key = (N, torch.is_inference_mode_enabled())  # an inference tensor may not be updated outside that mode
    w = cache.get(key)
    if w is None or w.b.numel() != size:
        w = cache[key] = _Work(N, size)
    return w if L == size else _Part(w, L)


class _Ties:
    """One key's merge on the CPU (see the module's docstring)."""

    def __init__(self, base, models, ws, scale: float, out):
        self.base, self.models, self.ws, self.scale, self.out = base, models, ws, scale, out
        self.n = base.numel()
        self.signed = any(w <= 0 for w in ws)  # a weight <= 0: den may be 0 where num is not
        self.min_w = min(ws) if ws else 1.0
        self.k = workers()
        self.size = work_size(self.n)  # elements per slice

    # -- the merge of one block ------------------------------------------------------------------------------
    def _differences(self, bsrc, msrcs, L: int) -> _Work:
        """Widen the block's inputs: ``work.b`` = base, ``work.D[i]`` = M_i - base, in fp32."""
        import torch

        w = _work(len(self.models), L, max(L, self.size))
        b = widen_into(w.b, bsrc)
        for d, m in zip(w.D, msrcs):
            widen_into(d, m)
            torch.sub(d, b, out=d)
        return w

    def _combine(self, w: _Work, lambdas, out_view) -> None:
        """Trim ``w.D`` (in place) at ``lambdas`` and write ``base + scale * merged`` into ``out_view``."""
        import torch

        ws = self.ws
        live = [(d, a, lam, wt) for d, a, lam, wt in zip(w.D, w.A, lambdas, ws) if lam is not None]
        for d, _, lam, _ in live:
            if lam >= 0:
                torch.hardshrink(d, lam, out=d)
        num = w.num
        if not live:  # nothing kept: merged = 0 / min_w
            num.zero_()
            den = w.vote.zero_()
        else:
            # vote = sum_j w_j d_j, left to right, as 0 + w_1 d_1, then fused multiply-adds; the sign of a zero
            # vote never matters (only d * vote > 0 is asked)
            (d1, a1, _, w1), rest = live[0], live[1:]
            vote = _weighted_sum([(d, wt) for d, _, _, wt in live], w.vote)
            for d, a, _, _ in live:
                torch.mul(d, vote, out=a).gt_(0)  # 1.0 where same sign as the vote and both non-zero
            # num = 0 + w_1 d_1 a_1 + ...
            torch.addcmul(w.zero, d1, a1, value=w1, out=num)
            for d, a, _, wt in rest:
                num.addcmul_(d, a, value=wt)
            # den = 0 + w_1 a_1 + ... (in the vote's buffer, free now): the sign of a zero den never matters
            # (den != 0, or clamp_min(min_w > 0))
            den = _weighted_sum([(a, wt) for _, a, _, wt in live], w.vote)
        if self.signed:  # with weights <= 0 a zero denominator can meet a non-zero numerator
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        else:  # den is 0 (and then num too) or at least the smallest weight: flooring it there changes nothing else
            merged = num.div_(den.clamp_min_(self.min_w))
        torch.add(w.b, merged, alpha=self.scale, out=out_view)

    def block(self, bsrc, msrcs, lambdas, out_view) -> None:
        """The exact merge of one slice of the key into ``out_view``."""
        self._combine(self._differences(bsrc, msrcs, out_view.numel()), lambdas, out_view)

    def merge(self, lambdas) -> None:
        """The merge of the whole key with known thresholds."""
        base, models, out = self.base, self.models, self.out

        def one(s, e):
            self.block(base[s:e], [m[s:e] for m in models], lambdas, out[s:e])

        run_slices(self.n, one, self.size)

    # -- thresholds ---------------------------------------------------------------------------------------------
    def thresholds(self, count: int) -> list:
        """Each model's exact ``count``-th largest ``|M_i - base|`` over the key (numpy float32 values)."""
        import torch

        base, models, n = self.base, self.models, self.n
        # Each model's share of the search outside the slice passes (its selection, its sample and brackets, its
        # band's selection) runs on the worker threads side by side (run_each), for keys big enough to pay a hand-off.
        each = run_each if n >= PER_MODEL_THREADS else (lambda fns: [f() for f in fns])
        if n <= DIRECT:
            b = widen_into(torch.empty(n, dtype=torch.float32), base)

            def select(m):
                x = torch.empty(n, dtype=torch.float32)
                return kth_smallest_np(_absdiff_into(x, m, b).numpy(), n - count + 1)

            return each([lambda m=m: select(m) for m in models])
        step = max(1, n // SAMPLE)
        b_sample = f32(base[::step])

        def bracket_of(m):  # the brackets to try, narrow first; a NaN bound brackets nothing
            narrow, wide = brackets(torch.sub(operand(m[::step]), b_sample).abs_(), n, count)
            return [] if math.isnan(wide[1]) else [narrow, wide]

        tries = each([lambda m=m: bracket_of(m) for m in models])
        found = [None] * len(models)
        for attempt in range(2):
            todo = [i for i in range(len(models)) if found[i] is None and len(tries[i]) > attempt]
            for g in range(0, len(todo), GROUP):
                group = todo[g : g + GROUP]
                scans = [BandScan(*tries[i][attempt]) for i in group]

                def one(s, e, group=group, scans=scans):
                    w = _work(len(group), e - s, self.size)
                    b = widen_into(w.b, base[s:e])
                    res = []
                    for j, i in enumerate(group):
                        d, a = w.D[j], w.A[j]
                        widen_into(d, models[i][s:e])
                        torch.abs(torch.sub(d, b, out=d), out=a)
                        res.append(scans[j].scan(w.x[j], w.above[j], w.band[j]))
                    return res

                parts = run_slices(n, one, self.size)
                results = each([lambda j=j: BandScan.result([p[j] for p in parts], count) for j in range(len(group))])
                for j, i in enumerate(group):
                    found[i] = results[j]
        for i, t in enumerate(found):
            if t is None:  # the sample misled (or saw NaN): select from the whole |d|
                full = empty_f32(n)

                def fill(s, e, i=i):
                    w = _work(1, e - s, self.size)
                    _absdiff_into(full[s:e], models[i][s:e], widen_into(w.b, base[s:e]))

                run_slices(n, fill, self.size)
                found[i] = kth_smallest_np(full.numpy(), n - count + 1)
                del full
        return found


def _weighted_sum(terms, buf):
    """``0 + w_1 t_1 + w_2 t_2 + ...`` left to right for ``terms`` = [(t_j, w_j)], in ``buf`` or, for a single
    term of weight 1, ``t_1`` itself. The leading ``0 +`` is left out: it changes only the sign of a zero, which
    no caller reads (a zero vote or denominator)."""
    import torch

    (t1, w1), rest = terms[0], terms[1:]
    if w1 == 1.0 and not rest:
        return t1
    if w1 == 1.0:
        torch.add(t1, rest[0][0], alpha=rest[0][1], out=buf)
        rest = rest[1:]
    else:
        torch.mul(t1, w1, out=buf)
    for t, wt in rest:
        buf.add_(t, alpha=wt)
    return buf


def _absdiff_into(x, m, b):
    """``|m - b|`` in the fp32 buffer ``x`` (``b``: the base's slice, already fp32)."""
    import torch

    widen_into(x, m)
    return torch.sub(x, b, out=x).abs_()


def _ties_merge_device(load, n: int, ws, density: float, scale: float, device, out=None):
    """The same merge on a device (GPU, MPS), from slices that ``load(j, s, e)`` brings there (fp32, read only).

    The base is read N + 1 times: where the loader can (``load.hold``, the engine's), it crosses the bus once and
    stays on the device in its file dtype, so a key costs 2N + 1 transfers instead of 3N + 1. Pass 1, per model:
    ``|M_i - base|`` of the whole key in the result buffer (free until pass 2), and its exact threshold by
    :func:`_common.kth_smallest` (``topk`` of the smaller side: a 0-dim tensor that stays on the device, no wait for
    the host). Pass 2 in slices of :func:`_common.device_slice` (N + 8 fp32 slices at once at most, about half a
    key): trim (``|d| < t`` set to 0, which is ``hardshrink`` at the float below ``t``; NaN is kept, as there),
    elect, average, in the order of the CPU path, into the result buffer. Device memory, whatever N: the result, the
    held base (half an fp32 key for fp16 files), the selection's values and indices (12 bytes for ``min(density, 1 -
    density)`` of the key's elements, in pass 1) and half an fp32 key of slices (in pass 2)."""
    import torch

    N = len(ws)
    count = min(n, math.ceil(density * n - 1e-9))
    out = result_on(device, n, out)
    hold = getattr(load, "hold", None)
    if hold is not None and 0 < count < n:
        hold(0)  # the base, read by every threshold and by the merge, crosses the bus once (2N + 1 transfers, not 3N + 1)
    # pass 2 holds the N trimmed differences and up to 8 more slices: about half a key, room for the held base
    size = device_slice(n, 2 * (N + 8))
    thresholds = [None] * N
    if 0 < count < n:
        for i in range(N):
            for s, e in slices(n, size):
                torch.sub(load(i + 1, s, e), load(0, s, e), out=out[s:e]).abs_()
            thresholds[i] = kth_smallest(out, n - count + 1)
    signed = any(w <= 0 for w in ws)
    min_w = min(ws) if ws else 1.0
    for s, e in slices(n, size):
        b = load(0, s, e)
        trimmed = []
        if count > 0:
            vote = torch.zeros_like(b)
            for i, w in enumerate(ws):
                d = torch.sub(load(i + 1, s, e), b)
                if thresholds[i] is not None:
                    d.masked_fill_(d.abs() < thresholds[i], 0.0)
                trimmed.append((d, w))
                vote.add_(d, alpha=w)
        num = torch.zeros_like(b)
        den = torch.zeros_like(b)
        for d, w in trimmed:
            agree = torch.mul(d, vote).gt_(0)
            num.addcmul_(d, agree, value=w)
            den.add_(agree, alpha=w)
        if signed:
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        else:
            merged = num.div_(den.clamp_min_(min_w))
        torch.add(b, merged, alpha=scale, out=out[s:e])
        del trimmed
    return out


class Ties(MergeMethod):
    name = "ties"
    description = "TIES: trim each difference from the base to its top-k, elect signs, average the agreeing ones"
    kind = "tensor"
    native_inputs = True
    streams_on_device = True
    params = (
        Param("density", 0.2, 0.0, 1.0, "fraction of each difference kept (by magnitude, per key)"),
        Param("scale", 1.0, -2.0, 3.0, "lambda: how much of the merged difference is added to the base"),
    )
    min_inputs = 2
    uses_weights = False
    takes_base = True  # input 0 is the base (a manifest's "base" goes there)
    memory_note = (
        "the fp32 result of the key, the values near each threshold (about 2% of the key for each of up to 8"
        " models at a time), and N+5 slices of 256 KiB per thread; independent of the number of models (CPU). On a"
        " GPU: the fp32 result (which holds |M_i - base| while a threshold is selected), the base in its file dtype, the"
        " selection's values and indices (12 bytes for min(density, 1 - density) of the key's elements) or half an"
        " fp32 key of slices; flat in N."
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        return ties_merge(tensors, weights, float(params["density"]), float(params["scale"]), out=ctx.out, ctx=ctx)


register(Ties())

"""DARE (Yu et al. 2024) over a common base; the first input is the base.

Each model's difference ``d_i = M_i - base`` has every element dropped with probability ``drop`` and the rest
rescaled by ``1 / (1 - drop)``; the results are summed with the input weights (default 1) and added to the base:
``base + scale * sum_i w_i * mask_i * d_i / (1 - drop)``.

The masks are reproducible: element ``j`` of input ``i`` for key ``k`` is kept when ``u >= drop`` where ``u`` is
drawn from a ``torch.Generator`` seeded from (the merge seed and key, ``i``, ``j // BLOCK``). The same seed gives
identical bytes on every run, whatever the slice size or device.

On the CPU the work goes in slices of ``_common.WORK`` elements with buffers reused per thread (the engine calls
this method on chunks of a key from its own worker threads). Dropping is a multiplication by the 0/1 mask
``u >= drop`` (written as floats by one comparison): a masked fill (select) branches on every element, which on a
random mask costs several times the arithmetic. It gives the same bytes: a kept difference is multiplied by 1; a
dropped one becomes a zero whose sign the sum ignores (the sum starts from +0, and x + (-0) is x, +0 + -0 is +0).
A slice where some difference is not finite (inf * 0 is NaN, where the fill gave 0) is dropped by the fill
instead.
"""

import math

from .registry import MergeMethod, Param, register
from ._common import (
    _TLS, device_slice, device_work, empty_f32, result_on, run_slices, scratch, slices, widen_into,
    work_size,
)

BLOCK = 1 << 14
DRAWS_KEPT = (1 << 20) + 2 * BLOCK  # the largest draw buffers kept per thread (an engine chunk's, 4 MiB each)
_M = (1 << 63) - 1


def block_seed(key_seed: int, input_index: int, block: int) -> int:
    x = (key_seed * 0x9E3779B97F4A7C15 + (input_index + 1) * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & _M
    x ^= x >> 31
    x = (x * 0xD6E8FEDA4B3B21A5) & _M
    return x ^ (x >> 29)


def uniforms(key_seed: int, input_index: int, offset: int, n: int, out=None):
    """The uniform draws in [0, 1) for elements ``offset .. offset+n`` of one input's difference (CPU, fp32).
    ``out``: a 1-D fp32 CPU tensor to draw into when it is long enough (the whole blocks the range touches), so
    a caller that keeps one allocates nothing; the result is a view of it."""
    import torch

    if n <= 0:
        return torch.empty(0, dtype=torch.float32)
    first, size = _blocks(offset, n)
    u = out[:size] if out is not None and out.numel() >= size else torch.empty(size, dtype=torch.float32)
    g = _generator()
    for i, blk in enumerate(range(first, first + size // BLOCK)):
        g.manual_seed(block_seed(key_seed, input_index, blk))
        torch.rand(BLOCK, generator=g, out=u[i * BLOCK : (i + 1) * BLOCK])
    start = offset - first * BLOCK
    return u[start : start + n]


def _blocks(offset: int, n: int):
    """(first block, elements of the whole blocks) that elements ``offset .. offset+n`` (n >= 1) of a difference touch."""
    first, last = offset // BLOCK, (offset + n - 1) // BLOCK
    return first, (last - first + 1) * BLOCK


def _generator():
    """The calling thread's CPU generator (reseeded for every block; one per thread, as threads draw at once)."""
    import torch

    g = getattr(_TLS, "dare_generator", None)
    if g is None:
        g = _TLS.dare_generator = torch.Generator()
    return g


def keep_mask(key_seed: int, input_index: int, offset: int, n: int, drop: float, device=None):
    """Boolean mask of the kept elements ``offset .. offset+n`` of one input's difference (``u >= drop``)."""
    keep = uniforms(key_seed, input_index, offset, n) >= drop
    return keep if device is None or keep.device == device else keep.to(device)


def dare_merge(tensors, weights, drop: float, scale: float, key_seed: int, sources, offset: int = 0, out=None,
               ctx=None):
    """tensors[0] is the base; returns base + scale * sum_i w_i * mask_i * (M_i - base) / (1 - drop), flat fp32
    (in ``out``, a contiguous fp32 tensor of at least the key's number of elements, when given). On a device
    (tensors there, or ``ctx.load``): :func:`_dare_merge_device`."""
    import torch

    base = tensors[0].reshape(-1)
    n = base.numel()
    dev = device_work(tensors, ctx)
    if dev is not None:
        return _dare_merge_device(dev[0], n, weights, drop, scale, key_seed, sources, offset, dev[1], out)
    models = [m.reshape(-1) for m in tensors[1:]]
    out = empty_f32(n) if out is None else out.reshape(-1)[:n]
    if drop > 0:
        size = _blocks(offset, max(n, 1))[1]
        # an engine chunk's draws go to buffers kept per thread; a whole large key's are allocated for the call
        room = scratch("dare-draws", len(models), size) if size <= DRAWS_KEPT else [None] * len(models)
        draws = [uniforms(key_seed, src, offset, n, buf) for src, buf in zip(sources[1:], room)]
    else:
        draws = [None] * len(models)
    ws = [float(w) for w in weights[1:]]

    def one(s, e):
        L = e - s
        b_buf, d, keep, acc = (t[:L] for t in scratch("dare", 4, L))
        zero = scratch("zeros", 1, L, zeros=True)[0][:L]
        b = base[s:e] if base.dtype == torch.float32 else widen_into(b_buf, base[s:e])
        for j, (m, w, u) in enumerate(zip(models, ws, draws)):
            widen_into(d, m[s:e])
            torch.sub(d, b, out=d)
            if u is not None:
                if math.isfinite(float(d.sum())):
                    torch.ge(u[s:e], drop, out=keep)  # 1.0 where kept (u >= drop, compared in fp32 as u < drop was)
                    d.mul_(keep)
                else:  # an inf or NaN difference: inf * 0 would be NaN where the fill gives 0
                    d.masked_fill_(u[s:e] < drop, 0.0)
            if j == 0:
                torch.add(zero, d, alpha=w, out=acc)  # 0 + w * d, as the sum always started
            else:
                acc.add_(d, alpha=w)
        if not models:
            acc.zero_()
        if drop > 0:
            acc.div_(1.0 - drop)
        torch.add(b, acc, alpha=scale, out=out[s:e])

    run_slices(n, one, work_size(n))
    return out


def _dare_merge_device(load, n: int, weights, drop: float, scale: float, key_seed: int, sources, offset: int, device,
                       out=None):
    """The same merge on a device (GPU, MPS), from slices that ``load(j, s, e)`` brings there (fp32, read only), in
    slices of :func:`_common.device_slice` (about 6 fp32 slices at once, whatever N). The draws are made on the
    CPU, as everywhere (the same masks on every device), and their boolean masks uploaded slice by slice."""
    import torch

    out = result_on(device, n, out)
    ws = [float(w) for w in weights[1:]]
    for s, e in slices(n, device_slice(n, 6)):  # b, acc, d, its mask and temporaries: about 6 slices, whatever N
        b = load(0, s, e)
        acc = torch.zeros_like(b)
        for j, (src, w) in enumerate(zip(sources[1:], ws)):
            d = torch.sub(load(j + 1, s, e), b)
            if drop > 0:
                d.masked_fill_(_dropped_on(device, uniforms(key_seed, src, offset + s, e - s) < drop), 0.0)
            acc.add_(d, alpha=w)
        if drop > 0:
            acc.div_(1.0 - drop)
        torch.add(b, acc, alpha=scale, out=out[s:e])
    return out


def _dropped_on(device, mask):
    """The host's boolean drop mask on ``device``: on CUDA through pinned memory without waiting (a copy from
    pageable memory would make the host wait for the device's queued work); one byte per element."""
    if getattr(device, "type", None) == "cuda":
        return mask.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned block until the copy is done
    return mask.to(device)


class Dare(MergeMethod):
    name = "dare"
    description = "DARE: randomly drop a fraction of each difference from the base, rescale the rest, add them"
    kind = "tensor"
    chunkable = True
    streams_on_device = True
    params = (
        Param("drop", 0.5, 0.0, 0.999, "probability p of dropping each element of a difference"),
        Param("scale", 1.0, -2.0, 3.0, "lambda: how much of the summed differences is added to the base"),
    )
    min_inputs = 2
    uses_weights = False
    takes_base = True  # input 0 is the base (a manifest's "base" goes there)
    memory_note = (
        "element-wise: the fp32 result of a 4 MiB engine chunk, its random draws (4 MiB per model, kept per thread),"
        " 256 KiB slices (CPU); on a GPU the fp32 result of the key and about 6 slices of a sixth of it, flat in N"
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        return dare_merge(
            tensors, weights, float(params["drop"]), float(params["scale"]), ctx.seed, list(ctx.sources), ctx.offset,
            out=ctx.out, ctx=ctx,
        )


register(Dare())

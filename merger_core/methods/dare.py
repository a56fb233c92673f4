"""DARE (Yu et al. 2024) over a common base; the first input is the base.

Each model's difference ``d_i = M_i - base`` has every element dropped with probability ``drop`` and the rest
rescaled by ``1 / (1 - drop)``; the results are summed with the input weights (default 1) and added to the base:
``base + scale * sum_i w_i * mask_i * d_i / (1 - drop)``.

The masks are reproducible: element ``j`` of input ``i`` for key ``k`` is kept when ``u >= drop`` where ``u`` is
drawn from a ``torch.Generator`` seeded from (the merge seed and key, ``i``, ``j // BLOCK``). The same seed gives
identical bytes on every run, whatever the slice size or device.
"""

from .registry import MergeMethod, Param, register
from ._common import f32, operand, run_slices

BLOCK = 1 << 14
_M = (1 << 63) - 1


def block_seed(key_seed: int, input_index: int, block: int) -> int:
    x = (key_seed * 0x9E3779B97F4A7C15 + (input_index + 1) * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & _M
    x ^= x >> 31
    x = (x * 0xD6E8FEDA4B3B21A5) & _M
    return x ^ (x >> 29)


def uniforms(key_seed: int, input_index: int, offset: int, n: int):
    """The uniform draws in [0, 1) for elements ``offset .. offset+n`` of one input's difference (CPU, fp32)."""
    import torch

    if n <= 0:
        return torch.empty(0, dtype=torch.float32)
    first, last = offset // BLOCK, (offset + n - 1) // BLOCK
    u = torch.empty((last - first + 1) * BLOCK, dtype=torch.float32)
    g = torch.Generator()
    for i, blk in enumerate(range(first, last + 1)):
        g.manual_seed(block_seed(key_seed, input_index, blk))
        torch.rand(BLOCK, generator=g, out=u[i * BLOCK : (i + 1) * BLOCK])
    start = offset - first * BLOCK
    return u[start : start + n]


def keep_mask(key_seed: int, input_index: int, offset: int, n: int, drop: float, device=None):
    """Boolean mask of the kept elements ``offset .. offset+n`` of one input's difference (``u >= drop``)."""
    keep = uniforms(key_seed, input_index, offset, n) >= drop
    return keep if device is None or keep.device == device else keep.to(device)


def dare_merge(tensors, weights, drop: float, scale: float, key_seed: int, sources, offset: int = 0):
    """tensors[0] is the base; returns base + scale * sum_i w_i * mask_i * (M_i - base) / (1 - drop)."""
    import torch

    base = tensors[0].reshape(-1)
    models = [m.reshape(-1) for m in tensors[1:]]
    n = base.numel()
    out = torch.empty(n, dtype=torch.float32, device=base.device)
    draws = [uniforms(key_seed, src, offset, n) if drop > 0 else None for src in sources[1:]]
    if base.device.type != "cpu":
        draws = [None if u is None else u.to(base.device) for u in draws]
    def one(s, e):
        b = f32(base[s:e])
        acc = torch.zeros_like(b)
        for m, w, u in zip(models, weights[1:], draws):
            d = torch.sub(operand(m[s:e]), b)
            if u is not None:
                d.masked_fill_(u[s:e] < drop, 0.0)
            acc.add_(d, alpha=float(w))
        if drop > 0:
            acc.div_(1.0 - drop)
        torch.add(b, acc, alpha=scale, out=out[s:e])

    run_slices(n, one)  # cache-sized single-thread slices, spread over the cores
    return out


class Dare(MergeMethod):
    name = "dare"
    description = "DARE: randomly drop a fraction of each difference from the base, rescale the rest, add them"
    kind = "tensor"
    chunkable = True
    params = (
        Param("drop", 0.5, 0.0, 0.999, "probability p of dropping each element of a difference"),
        Param("scale", 1.0, -2.0, 3.0, "lambda: how much of the summed differences is added to the base"),
    )
    min_inputs = 2
    uses_weights = False
    takes_base = True  # input 0 is the base (a manifest's "base" goes there)
    memory_note = "element-wise: the fp32 result of a 4 MiB engine chunk, its random draws (4 MiB per model), 128 KiB slices"

    def merge_tensor(self, tensors, weights, params, ctx):
        return dare_merge(
            tensors, weights, float(params["drop"]), float(params["scale"]), ctx.seed, list(ctx.sources), ctx.offset
        )


register(Dare())

"""DARE (Yu et al. 2024) over a common base; the first input is the base.

Each model's difference ``d_i = M_i - base`` has every element dropped with probability ``drop`` and the rest
rescaled by ``1 / (1 - drop)``; the results are summed with the input weights (default 1) and added to the base:
``base + scale * sum_i w_i * mask_i * d_i / (1 - drop)``.

The masks are reproducible: element ``j`` of input ``i`` for key ``k`` is kept when ``u >= drop`` where ``u`` is
drawn from a ``torch.Generator`` seeded from (the merge seed and key, ``i``, ``j // BLOCK``). The same seed gives
identical bytes on every run, whatever the slice size or device.
"""

from . import MergeMethod, Param, register

BLOCK = 1 << 14
_M = (1 << 63) - 1


def block_seed(key_seed: int, input_index: int, block: int) -> int:
    x = (key_seed * 0x9E3779B97F4A7C15 + (input_index + 1) * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & _M
    x ^= x >> 31
    x = (x * 0xD6E8FEDA4B3B21A5) & _M
    return x ^ (x >> 29)


def keep_mask(key_seed: int, input_index: int, offset: int, n: int, drop: float, device=None):
    """Boolean mask of the kept elements ``offset .. offset+n`` of one input's difference."""
    import torch

    if n <= 0:
        return torch.ones(0, dtype=torch.bool, device=device)
    first, last = offset // BLOCK, (offset + n - 1) // BLOCK
    parts = []
    for blk in range(first, last + 1):
        g = torch.Generator()
        g.manual_seed(block_seed(key_seed, input_index, blk))
        parts.append(torch.rand(BLOCK, generator=g))
    u = parts[0] if len(parts) == 1 else torch.cat(parts)
    start = offset - first * BLOCK
    keep = u[start : start + n] >= drop
    return keep if device is None or keep.device == device else keep.to(device)


def dare_merge(tensors, weights, drop: float, scale: float, key_seed: int, sources, offset: int = 0):
    """tensors[0] is the base; returns base + scale * sum_i w_i * mask_i * (M_i - base) / (1 - drop)."""
    import torch

    base = tensors[0].reshape(-1)
    acc = torch.zeros_like(base)
    n = base.numel()
    for m, w, src in zip(tensors[1:], weights[1:], sources[1:]):
        d = m.reshape(-1) - base
        if drop > 0:
            d.mul_(keep_mask(key_seed, src, offset, n, drop, d.device)).div_(1.0 - drop)
        acc.add_(d, alpha=float(w))
    return base + scale * acc


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
    memory_note = "element-wise on cache-sized slices: about N+4 fp32 slices of 4 MiB plus the random draws"

    def merge_tensor(self, tensors, weights, params, ctx):
        if not ctx.sources or ctx.sources[0] != 0:
            from .ties import raise_no_base

            raise_no_base(self.name, ctx)
        return dare_merge(
            tensors, weights, float(params["drop"]), float(params["scale"]), ctx.seed, list(ctx.sources), ctx.offset
        )


register(Dare())

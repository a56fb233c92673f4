"""Train difference (SuperMerger; sd-mecha's form is the same):

``A + 1.8 * alpha * (B - C) * |B - A| / (|B - A| + |B - C|)``, element-wise, with the fraction taken as 0 where
its denominator is 0. Where B equals C the result is A. It adds B's change over C to A, scaled down where A is
already far from B, so a fine-tune's training is transferred rather than its absolute weights.
"""

from .registry import MergeMethod, Param, register
from ._common import f32, run_slices

SCALE = 1.8


def train_difference(a, b, c, alpha: float):
    """The formula on tensors of one dtype (fp32 in the engine, fp64 in tests)."""
    import torch

    diff = b - c
    dist_a = (b - a).abs_()
    denom = dist_a + diff.abs()
    frac = torch.where(denom != 0, dist_a / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return a + (SCALE * alpha) * diff * frac


class TrainDifference(MergeMethod):
    name = "train_difference"
    description = "A + 1.8*alpha*(B - C)*|B - A|/(|B - A| + |B - C|) (SuperMerger's train difference)"
    kind = "tensor"
    chunkable = True
    params = (Param("alpha", 1.0, -2.0, 3.0, "strength of the transferred training"),)
    min_inputs = 3
    max_inputs = 3
    roles = ("A", "B", "C")
    uses_weights = False
    memory_note = "element-wise: the fp32 result of a 4 MiB engine chunk and a few 128 KiB slices per thread"

    def merge_tensor(self, tensors, weights, params, ctx):
        if len(tensors) != 3 or list(ctx.sources) != [0, 1, 2]:
            return tensors[0]  # a key that not all of A, B, C have: kept from the first that has it
        import torch

        a, b, c = (t.reshape(-1) for t in tensors)
        alpha = float(params["alpha"])
        out = torch.empty(a.numel(), dtype=torch.float32, device=a.device)
        def one(s, e):
            out[s:e] = train_difference(f32(a[s:e]), f32(b[s:e]), f32(c[s:e]), alpha)

        run_slices(a.numel(), one)  # cache-sized single-thread slices, spread over the cores
        return out


register(TrainDifference())

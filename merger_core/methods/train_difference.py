"""Train difference (SuperMerger; sd-mecha's form is the same):

``A + 1.8 * alpha * (B - C) * |B - A| / (|B - A| + |B - C|)``, element-wise, with the fraction taken as 0 where
its denominator is 0. Where B equals C the result is A. It adds B's change over C to A, scaled down where A is
already far from B, so a fine-tune's training is transferred rather than its absolute weights.

On the CPU (``_train_difference_into``) the same operations run on slices of ``_common.WORK`` elements with
buffers reused per thread, writing straight into the result, and the fraction's "0 where the denominator is 0"
is a division by the denominator floored at the smallest positive float: the denominator is a sum of two
magnitudes, so it is 0 only where the numerator is 0 too (0 / tiny = +0, as before), any positive denominator is
at least that float (unchanged), and NaN stays NaN (as ``where(denom != 0, ...)`` gave). Two comparisons into
bool and two selects per element are gone; the bytes are the same. (Where denormals are flushed to zero, the
floor would be 0: there the selects are kept.)
"""

from .registry import MergeMethod, Param, register
from ._common import SLICE, device_slice, device_work, f32, result_on, run_slices, scratch, slices, work_size

SCALE = 1.8


def train_difference(a, b, c, alpha: float):
    """The formula on tensors of one dtype (fp32 in the engine, fp64 in tests)."""
    import torch

    diff = b - c
    dist_a = (b - a).abs_()
    denom = dist_a + diff.abs()
    frac = torch.where(denom != 0, dist_a / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return a + (SCALE * alpha) * diff * frac


def _denormals_kept() -> bool:
    """Whether the CPU keeps subnormal floats (``torch.set_flush_denormal(True)`` flushes them to zero)."""
    import torch

    tiny = torch.tensor([1e-45], dtype=torch.float32)  # the smallest positive fp32, a subnormal
    return bool((tiny * 1.0).item() != 0.0)


def _train_difference_into(out, a, b, c, alpha: float, bufs, floor: float) -> None:
    """``out = train_difference(a, b, c, alpha)`` for fp32 CPU slices, bit for bit, in three fp32 buffers."""
    import torch

    diff, dist, t = bufs
    torch.sub(b, c, out=diff)
    torch.sub(b, a, out=dist).abs_()
    torch.add(dist, torch.abs(diff, out=t), out=t)  # denom = dist + |diff|, in that order (NaN's sign depends on it)
    if floor > 0:
        torch.div(dist, t.clamp_min_(floor), out=t)  # frac: denom is 0 only where dist is
    else:
        t.copy_(torch.where(t != 0, dist / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(t)))
    torch.mul(diff, SCALE * alpha, out=diff).mul_(t)  # (1.8 * alpha) * diff * frac, left to right
    torch.add(a, diff, out=out)


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
    streams_on_device = True
    memory_note = (
        "element-wise: the fp32 result of a 4 MiB engine chunk and a few 256 KiB slices per thread (CPU); on a GPU"
        " the fp32 result of the key and about one more key in slices"
    )

    def merge_tensor(self, tensors, weights, params, ctx):
        import torch

        n = tensors[0].numel()
        dev = device_work(tensors, ctx)
        if len(tensors) != 3 or list(ctx.sources) != [0, 1, 2]:
            # a key that not all of A, B, C have: kept from the first that has it
            if ctx.load is not None:
                return result_on(ctx.device, n, ctx.out).copy_(ctx.load(0, 0, n))
            return tensors[0]
        a, b, c = (t.reshape(-1) for t in tensors)
        alpha = float(params["alpha"])
        if dev is not None:  # on a GPU: slices brought over by the engine
            load, device = dev
            out = result_on(device, n, ctx.out)
            for s, e in slices(n, device_slice(n, 11)):  # 3 inputs and up to 8 temporaries
                out[s:e] = train_difference(load(0, s, e), load(1, s, e), load(2, s, e), alpha)
            return out
        out = result_on(a.device, n, ctx.out)
        floor = 1e-45 if _denormals_kept() else 0.0

        def one(s, e):
            L = e - s
            bufs = [t[:L] for t in scratch("train-difference", 3, L)]
            _train_difference_into(out[s:e], f32(a[s:e]), f32(b[s:e]), f32(c[s:e]), alpha, bufs, floor)

        # the engine passes fp32 chunks; other inputs are widened per SLICE, as they always were (a NaN's bits
        # after widening may depend on where it falls in the conversion's blocks)
        fp32 = all(x.dtype == torch.float32 for x in (a, b, c))
        run_slices(n, one, work_size(n) if fp32 else SLICE)  # cache-sized single-thread slices, spread over the cores
        return out


register(TrainDifference())

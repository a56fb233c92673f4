"""Task arithmetic over a common base: ``base + scale * sum_i w_i * (M_i - base)``.

The first input is the base, the others are models derived from it; input weights (default 1) weight each
model's difference. It is linear (coefficients ``1 - scale*sum(w)`` for the base and ``scale*w_i`` for model i),
so the engine streams it like a weighted sum. This is cross-merge's ``--combine sum``.
"""

from .registry import MergeMethod, Param, register


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "base + scale * sum_i w_i (M_i - base); first input is the base"
    kind = "linear"
    params = (Param("scale", 1.0, -2.0, 3.0, "lambda: how much of the combined difference is added to the base"),)
    min_inputs = 2
    uses_weights = False
    takes_base = True  # input 0 is the base (a manifest's "base" goes there)
    memory_note = "streamed in cache-sized fp32 chunks: a few MiB, independent of model size and count"

    def coefficients(self, weights, params):
        lam = float(params["scale"])
        ws = [float(w) for w in weights[1:]]
        return [1.0 - lam * sum(ws)] + [lam * w for w in ws]


register(TaskArithmetic())

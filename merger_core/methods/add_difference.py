"""Add difference: ``A + alpha * (B - C)``. Linear, so the engine streams it like a weighted sum."""

from .registry import MergeMethod, Param, register


class AddDifference(MergeMethod):
    name = "add_difference"
    description = "A + alpha * (B - C): add what B learned over C to A"
    kind = "linear"
    params = (Param("alpha", 1.0, -2.0, 3.0, "strength of the added difference"),)
    min_inputs = 3
    max_inputs = 3
    roles = ("A", "B", "C")
    uses_weights = False
    memory_note = "streamed in cache-sized fp32 chunks: a few MiB, independent of model size"

    def coefficients(self, weights, params):
        a = float(params["alpha"])
        return [1.0, a, -a]


register(AddDifference())

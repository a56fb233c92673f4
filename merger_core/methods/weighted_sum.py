"""Weighted sum of N models: ``sum_i w_i * M_i``; the engine normalises the weights to 1 unless told not to."""

from .registry import MergeMethod, register


class WeightedSum(MergeMethod):
    name = "weighted_sum"
    description = "sum of w_i * M_i over N models (weights normalised to sum 1 by default)"
    kind = "linear"
    min_inputs = 2
    memory_note = "one cache-sized fp32 chunk per key on CPU; one fp32 accumulator of the largest tensor on a GPU"

    def coefficients(self, weights, params):
        return list(weights)


register(WeightedSum())

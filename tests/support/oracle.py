"""The float64 oracle of the engine's tests: a weighted sum computed in float64 from whole (small) files, and a
check of a merged file against it with the tightest bound that any order of fp32 accumulation meets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from merger_core.io.safetensors import MARKER_KEYS

_MANTISSA_BITS = {"F16": 11, "BF16": 8, "F32": 24, "F64": 53}
_MIN_SUBNORMAL_EXP = {"F16": -24, "BF16": -133, "F32": -149, "F64": -1074}


def reference_merge(
    paths: Sequence[str],
    weights: Sequence[float],
    normalize: bool = True,
    allow_missing: bool = False,
) -> Tuple[Dict[str, object], Dict[str, object]]:
    """The weighted sum in float64, loading whole (small) files: the independent check of the engine.

    Returns ``(reference, bound)``: per key the float64 result (integer and marker keys: the first model's tensor
    that has it, unchanged), and per float key the sum of ``|c_i * x_i|``, which bounds the fp32 rounding error of
    any order of accumulation.
    """
    import torch
    from safetensors.torch import load_file

    models = [load_file(p) for p in paths]
    keys = sorted({k for m in models for k in m})
    ref: Dict[str, object] = {}
    bound: Dict[str, object] = {}
    for key in keys:
        have = [i for i, m in enumerate(models) if key in m]
        if len(have) != len(models) and not allow_missing:
            raise ValueError(f"{key} is missing from some models")
        first = models[have[0]][key]
        if not first.is_floating_point() or key in MARKER_KEYS:
            ref[key] = first
            continue
        ws = [float(weights[i]) for i in have]
        if normalize:
            total = sum(ws)
            ws = [w / total for w in ws]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        mag = torch.zeros(first.shape, dtype=torch.float64)
        for i, w in zip(have, ws):
            x = models[i][key].to(torch.float64)
            acc += w * x
            mag += (w * x).abs()
        ref[key] = acc
        bound[key] = mag
    return ref, bound


def ulp(values, st_dtype: str):
    """Unit in the last place of float64 ``values`` in the float format ``st_dtype`` (F16, BF16, F32, F64)."""
    import torch

    v = values.to(torch.float64)
    _, exp = torch.frexp(v)
    e = (exp.to(torch.float64) - _MANTISSA_BITS[st_dtype]).clamp(min=_MIN_SUBNORMAL_EXP[st_dtype])
    e = torch.where(v == 0, torch.full_like(e, _MIN_SUBNORMAL_EXP[st_dtype]), e)
    return torch.pow(2.0, e)


@dataclass
class CheckReport:
    keys: int = 0
    float_keys: int = 0
    exact_keys: int = 0
    max_abs_error: float = 0.0
    max_error_in_ulps: float = 0.0  # of the output dtype
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_against_reference(output: str, reference: Mapping[str, object], bound: Mapping[str, object], n_terms: int) -> CheckReport:
    """Compare a merged file with :func:`reference_merge`'s result.

    Float keys must be within one ULP of the output dtype (the final rounding) plus the fp32 accumulation bound
    ``(n_terms + 2) * 2**-23 * sum|c_i x_i|``; integer and marker keys must be bit-identical. Keys and shapes must match.
    """
    import torch
    from safetensors import safe_open

    rep = CheckReport()
    with safe_open(output, framework="pt") as f:
        out_keys = set(f.keys())
        ref_keys = set(reference)
        if out_keys != ref_keys:
            rep.problems.append(
                f"keys differ: {len(out_keys - ref_keys)} unexpected, {len(ref_keys - out_keys)} missing"
            )
        for key in sorted(out_keys & ref_keys):
            rep.keys += 1
            got = f.get_tensor(key)
            want = reference[key]
            if tuple(got.shape) != tuple(want.shape):
                rep.problems.append(f"{key}: shape {list(got.shape)}, expected {list(want.shape)}")
                continue
            if key not in bound:
                if got.dtype != want.dtype or not torch.equal(got, want):
                    rep.problems.append(f"{key}: not copied exactly ({got.dtype} vs {want.dtype})")
                else:
                    rep.exact_keys += 1
                continue
            rep.float_keys += 1
            st = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}.get(got.dtype)
            if st is None:
                rep.problems.append(f"{key}: output dtype {got.dtype} is not a float type")
                continue
            if got.numel() == 0:
                continue
            err = (got.to(torch.float64) - want).abs()
            tol = ulp(want, st) + (n_terms + 2) * 2.0**-23 * bound[key]
            rep.max_abs_error = max(rep.max_abs_error, float(err.max()))
            rep.max_error_in_ulps = max(rep.max_error_in_ulps, float((err / ulp(want, st)).max()))
            bad = err > tol
            if bool(bad.any()):
                i = int(torch.argmax((err - tol).reshape(-1)))
                rep.problems.append(
                    f"{key}: {int(bad.sum())} values off the reference, e.g. {float(got.reshape(-1)[i])} vs "
                    f"{float(want.reshape(-1)[i])}"
                )
    return rep



"""Writing the output as ComfyUI's scaled fp8 (``dtype="fp8_scaled"``): the diffusion model's linear weights as
``float8_e4m3fn`` codes with a fresh per-layer ``scale_weight``, everything else as bf16.

The format is what ComfyUI loads with its ``scaled_fp8`` operations (``comfy/ops.py``, ``comfy/model_detection.py``):
a ``scaled_fp8`` marker tensor of the fp8 dtype beside the diffusion model's keys, and for each linear layer
``X.weight`` (fp8 codes) and ``X.scale_weight`` (one fp32 value, the weight is codes x scale). The marker has two
elements, which tells ComfyUI to dequantize the weights for its matrix multiplications rather than to multiply in
fp8 (that mode also wants per-layer input scales, which a merge cannot know); so no ``scale_input`` is written.

The scale of a layer is ``max |w| / 448`` (the largest e4m3fn value), computed on the merged fp32 values of the whole
key, and the codes are ``w / scale`` rounded to the nearest fp8 value. ``X.scale_weight`` sorts before ``X.weight``,
so the runner merges the weight when it reaches the scale, keeps its fp32 values for that one key, and writes the
codes next.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Set

from ..errors import ManifestError
from ..io.safetensors import MARKER_KEYS

FP8_OUTPUT = "fp8_scaled"  # the plan's dtype
FP8_DTYPE = "F8_E4M3"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
UNET_PREFIX = "model.diffusion_model."
OTHER_PREFIXES = ("cond_stage_model.", "conditioner.", "first_stage_model.", "text_encoders.", "vae.")
MARKER_SHAPE = (2,)


@dataclass
class QuantPlan:
    """Which output keys are fp8 codes, which are their scales (scale key -> weight key), and the marker key."""

    weights: Set[str] = field(default_factory=set)
    scale_of: Dict[str, str] = field(default_factory=dict)
    marker: str = UNET_PREFIX + "scaled_fp8"


def _prefix(names) -> Optional[str]:
    if any(n.startswith(UNET_PREFIX) for n in names):
        return UNET_PREFIX
    if not any(n.startswith(OTHER_PREFIXES) for n in names):
        return ""  # a diffusion-model-only file
    return None


def plan_fp8_output(prep) -> None:
    """Turn a prepared merge with ``dtype="fp8_scaled"`` into one that writes scaled fp8 (in place; once)."""
    if prep.plan.dtype != FP8_OUTPUT or getattr(prep, "quant", None) is not None:
        return
    names = [j.name for j in prep.jobs]
    prefix = _prefix(names)
    if prefix is None:
        raise ManifestError(
            "dtype fp8_scaled: the output has text-encoder or VAE keys but no diffusion model under "
            f"{UNET_PREFIX!r}, so there is nothing ComfyUI would load as scaled fp8; write fp16 or bf16 instead"
        )
    quant = QuantPlan(marker=prefix + "scaled_fp8")
    existing = set(names)
    if quant.marker in existing:
        raise ManifestError(f"dtype fp8_scaled: the output already has a key named {quant.marker}")
    jobs = []
    for job in prep.jobs:
        jobs.append(job)
        if not (job.name.startswith(prefix) and job.name.endswith(".weight") and len(job.shape) == 2):
            continue
        if job.name in MARKER_KEYS or job.out_dtype not in ("BF16", "F16", "F32", "F64") or job.numel == 0:
            continue
        scale = job.name[: -len("weight")] + "scale_weight"
        if scale in existing:
            continue
        job.out_dtype = FP8_DTYPE
        quant.weights.add(job.name)
        quant.scale_of[scale] = job.name
        names_in = {i: job.source_name(i) for i in (job.sources if job.copy_from is None else [job.copy_from])}
        jobs.append(dataclasses.replace(job, name=scale, shape=(), out_dtype="F32", source_names=names_in,
                                        scales=dict(job.scales)))
    if not jobs:
        return
    # the marker: written as zeros, reads no input (a KeyJob like the others, without importing plan.py)
    jobs.append(dataclasses.replace(jobs[0], name=quant.marker, shape=MARKER_SHAPE, out_dtype=FP8_DTYPE, sources=[],
                                    copy_from=None, scales={}, source_names={}))
    jobs.sort(key=lambda j: j.name)
    prep.jobs[:] = jobs
    prep.quant = quant
    if quant.weights:
        prep.notes.append(
            f"dtype fp8_scaled: {len(quant.weights)} linear weights of the diffusion model are written as fp8 (e4m3fn) "
            "with a fresh scale per layer (max |w| / 448); the other tensors as bf16"
        )

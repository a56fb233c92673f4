"""A cheap architecture probe from key names and shapes, used for ``modelspec.architecture``.

This is a quick look for metadata only; :mod:`merger_core.analyze` (Analyze Structure) is the full detector.
"""

from __future__ import annotations

from typing import Mapping

from .safetensors_io import TensorInfo

UNET = "model.diffusion_model."


def probe_architecture(tensors: Mapping[str, TensorInfo]) -> str:
    """Return a ModelSpec architecture string, or "unknown"."""

    def shape(key):
        t = tensors.get(key)
        return t.shape if t is not None else None

    for prefix in (UNET, ""):
        if any(k.startswith(prefix + "double_blocks.") for k in tensors):
            return "flux-1-dev" if shape(prefix + "guidance_in.in_layer.weight") else "flux-1-schnell"
        if any(k.startswith(prefix + "joint_blocks.") for k in tensors):
            return "stable-diffusion-v3-medium"
    # input_blocks.4 has cross-attention in SD1, SD2 and SDXL; input_blocks.1 only in SD1/SD2
    ctx = shape(UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight") or shape(
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    )
    label = shape(UNET + "label_emb.0.0.weight")
    if ctx is not None:
        dim = ctx[-1]
        if dim == 768:
            return "stable-diffusion-v1"
        if dim == 1024:
            return "stable-diffusion-v2"
        if dim == 2048 and label is not None:
            return "stable-diffusion-xl-v1-base"
        if dim == 1280 and label is not None:
            return "stable-diffusion-xl-v1-refiner"
    if label is not None and shape(UNET + "label_emb.0.0.weight")[-1] == 2816:
        return "stable-diffusion-xl-v1-base"
    return "unknown"

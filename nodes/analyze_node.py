"""Analyze Structure: what a checkpoint really is, from its header (and a diff against a second model)."""

from __future__ import annotations

import os

from ..merger_core import report as rep
from ..merger_core.arch import diff_models
from . import _host as host
from .manifest_nodes import check_manifest_paths

NONE = "(none)"


def to_image(pil_image):
    """A PIL picture as a ComfyUI IMAGE: a [1, H, W, 3] float32 tensor in [0, 1]."""
    import torch

    return torch.from_numpy(rep.image_to_array(pil_image))[None]


class AnalyzeStructure:
    DESCRIPTION = (
        "Tell what a checkpoint is from its tensor structure (not its name or metadata): architecture, variant, "
        "prediction type, components present, dtypes, parameter counts, and where the embedded metadata disagrees. "
        "With a manifest: every model in it plus whether they can be merged. With 'compare to': how far two models "
        "are apart, per block (reads both models once)."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "analyze"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "picture")
    OUTPUT_TOOLTIPS = (
        "The findings as text (connect to a text preview node).",
        "A picture of the main facts (and the per-block distance heatmap when comparing).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        names = host.checkpoint_names()
        return {
            "required": {
                "ckpt_name": (names, {"tooltip": "The checkpoint to analyze (ignored when a manifest is connected)."}),
                "compare_to": ([NONE] + names, {
                    "default": NONE,
                    "tooltip": "Optional second checkpoint: measure the distance between the two per block and per "
                               "component (relative L2 and cosine similarity). Reads both files once.",
                }),
            },
            "optional": {
                "manifest": (host.MANIFEST_TYPE, {
                    "tooltip": "Analyze every model of this manifest instead, and check that they can be merged.",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, ckpt_name=None, compare_to=NONE, manifest=None):
        try:
            paths = [host.checkpoint_path(ckpt_name)] + ([host.checkpoint_path(compare_to)] if compare_to != NONE else [])
            return repr(host.file_signature(paths))
        except Exception as exc:
            return f"error: {exc}"

    def analyze(self, ckpt_name, compare_to=NONE, manifest=None, unique_id=None):
        if manifest is not None:
            check_manifest_paths(manifest)
            paths = [e.path for e in manifest.models]
        else:
            paths = [host.checkpoint_path(ckpt_name)]
        text, picture = rep.analyze_report(paths, as_array=False)
        pictures = [picture]
        if compare_to != NONE:
            a = host.checkpoint_path(ckpt_name)
            b = host.checkpoint_path(compare_to)
            bar = host.KeyProgress(unique_id, label="comparing")
            diff = diff_models(a, b, progress=bar, cancel=host.check_interrupt)
            text += "\n\n== " + f"{os.path.basename(a)} vs {os.path.basename(b)}\n" + rep.render_diff(diff)
            pictures.append(rep.diff_heatmap(diff))
        image = rep.stack_images(pictures) if len(pictures) > 1 else pictures[0]
        return (text, to_image(image))

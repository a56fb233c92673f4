"""Analyze Structure: architecture detection from headers, compatibility preflight, model diff and lineage.

Public API::

    detect(path) -> Detection                      structure of one file (headers only)
    blocks(arch_id) / block_of(arch_id, key)       block maps (merger_core.analyze.blocks)
    check_compatibility(paths, device="cpu") -> CompatReport ; require_compatible(report)
    diff_models(a, b, progress=None, cancel=None) -> DiffReport
    rank_bases(model, bases) -> [(base, score, evidence)] ; register_base(path, name) ; list_bases()
    analyze_report(paths) -> (text, image)          what the Analyze Structure node shows
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from .compat import CompatReport, check_compatibility, require_compatible  # noqa: F401
from .detect import ComponentInfo, Detection, detect, detect_header  # noqa: F401
from .diff import DiffReport, Distance, diff_models  # noqa: F401
from .fingerprints import get_fingerprint, load_fingerprints  # noqa: F401
from .lineage import BaseEntry, list_bases, rank_bases, register_base, remove_base  # noqa: F401


def analyze_report(paths: Sequence[str | os.PathLike] | str | os.PathLike, as_array: bool = True) -> Tuple[str, object]:
    """Detect each file and return (report text, picture).

    The picture is an H×W×3 float32 numpy array in [0, 1] (``as_array``) or a PIL image. With several files the
    text starts with a one-line-per-file overview, and when there are two or more recognised files the
    compatibility verdict follows.
    """
    from .report import detection_image, image_to_array, render_detection, render_detections, stack_images

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    dets: List[Detection] = [detect(p) for p in paths]
    parts = []
    if len(dets) > 1:
        parts.append(render_detections(dets))
    parts.extend(render_detection(d) for d in dets)
    images = [detection_image(d) for d in dets]
    if len(dets) > 1:
        from .report import compat_image

        rep = check_compatibility(paths)
        parts.append("== compatibility\n" + rep.describe())
        images.append(compat_image(rep))
    img = stack_images(images)
    return "\n\n".join(parts), (image_to_array(img) if as_array else img)


def diff_report(a, b, progress=None, cancel=None, arch=None, as_array: bool = True) -> Tuple[str, object]:
    """Diff two models and return (report text, heatmap picture) for a node; see :func:`diff_models`."""
    from .report import diff_heatmap, image_to_array, render_diff

    rep = diff_models(a, b, progress=progress, cancel=cancel, arch=arch)
    img = diff_heatmap(rep)
    return render_diff(rep), (image_to_array(img) if as_array else img)

"""Rendering what the other rooms found: text (:mod:`.text`) and pictures (:mod:`.images`), and the two
reports the nodes and the CLI show (Analyze Structure, diff)."""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from ..arch import check_compatibility, detect, diff_models
from .images import compat_image, detection_image, diff_heatmap, image_to_array, stack_images
from .text import render_compat, render_detection, render_detections, render_diff


def analyze_report(paths: Sequence[str | os.PathLike] | str | os.PathLike, as_array: bool = True) -> Tuple[str, object]:
    """Detect each file and return (report text, picture).

    The picture is an H×W×3 float32 numpy array in [0, 1] (``as_array``) or a PIL image. With several files the
    text starts with a one-line-per-file overview, and when there are two or more files the compatibility verdict
    follows.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    dets = [detect(p) for p in paths]
    parts: List[str] = []
    if len(dets) > 1:
        parts.append(render_detections(dets))
    parts.extend(render_detection(d) for d in dets)
    images = [detection_image(d) for d in dets]
    if len(dets) > 1:
        rep = check_compatibility(paths)
        parts.append("== compatibility\n" + render_compat(rep))
        images.append(compat_image(rep))
    img = stack_images(images)
    return "\n\n".join(parts), (image_to_array(img) if as_array else img)


def diff_report(a, b, progress=None, cancel=None, arch=None, as_array: bool = True) -> Tuple[str, object]:
    """Diff two models and return (report text, heatmap picture) for a node; see :func:`merger_core.arch.diff_models`."""
    rep = diff_models(a, b, progress=progress, cancel=cancel, arch=arch)
    img = diff_heatmap(rep)
    return render_diff(rep), (image_to_array(img) if as_array else img)

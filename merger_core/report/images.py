"""Pictures (PIL) of detections, compatibility reports and diffs.

Pictures are returned as ``PIL.Image.Image``; :func:`image_to_array` turns one into an H×W×3 float32 array in
[0, 1] (what a ComfyUI IMAGE holds per batch item).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List

from .text import detection_facts, human_params

if TYPE_CHECKING:  # pragma: no cover
    from ..arch.compat import CompatReport
    from ..arch.detect import Detection
    from ..arch.diff import DiffReport


# ---------------------------------------------------------------------------------------------------------------
# pictures

BG = (24, 26, 30)
FG = (230, 232, 236)
DIM = (150, 155, 165)
GREEN = (70, 170, 90)
RED = (210, 70, 60)
ORANGE = (220, 150, 50)
BLUE = (80, 140, 220)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width_chars: int) -> List[str]:
    import textwrap

    return textwrap.wrap(text, width_chars) or [""]


def detection_image(det: "Detection", width: int = 768):
    """A picture of a detection's main facts: title, fact table, component boxes, disagreements."""
    from PIL import Image, ImageDraw

    f_title, f_body, f_small = _font(22), _font(15), _font(13)
    lines = []  # (text, font, colour, indent)
    lines.append((det.file_name, f_title, FG, 0))
    head = det.arch_name if det.known else "UNKNOWN architecture"
    lines.append((head, f_title, GREEN if det.known else RED, 0))
    for k, v in detection_facts(det)[1:]:
        for n, part in enumerate(_wrap(f"{k}: {v}", 80)):
            lines.append((part, f_body, FG if n == 0 else DIM, 0 if n == 0 else 16))
    for dis in det.disagreements:
        for part in _wrap("metadata disagrees: " + dis, 80):
            lines.append((part, f_body, ORANGE, 0))
    for w in det.warnings[:4]:
        for part in _wrap("warning: " + w, 86):
            lines.append((part, f_small, ORANGE, 0))
    comps = list(det.components.values())
    line_h = {id(f_title): 30, id(f_body): 21, id(f_small): 18}
    h = 16 + sum(line_h[id(f)] for _, f, _, _ in lines) + (70 if comps else 0) + 16
    img = Image.new("RGB", (width, h), BG)
    dr = ImageDraw.Draw(img)
    y = 12
    for text, f, col, ind in lines:
        dr.text((16 + ind, y), text, font=f, fill=col)
        y += line_h[id(f)]
    if comps:
        y += 8
        x = 16
        bw = min(180, (width - 32 - 8 * (len(comps) - 1)) // max(1, len(comps)))
        for c in comps:
            col = {"present": GREEN, "partial": ORANGE, "missing": RED if c.required else (90, 90, 100)}.get(c.status, BLUE)
            dr.rectangle((x, y, x + bw, y + 52), fill=col)
            dr.text((x + 6, y + 4), c.name.replace("text_encoder.", "TE "), font=f_small, fill=(255, 255, 255))
            dr.text((x + 6, y + 22), f"{c.status} {human_params(c.params) if c.params else ''}", font=f_small, fill=(255, 255, 255))
            x += bw + 8
    return img


def _cmap(t: float):
    """0 -> dark blue, 0.5 -> orange, 1 -> bright yellow (a simple perceptual-ish ramp)."""
    t = 0.0 if not math.isfinite(t) else max(0.0, min(1.0, t))
    stops = [(0.0, (20, 30, 80)), (0.35, (120, 40, 130)), (0.7, (230, 110, 50)), (1.0, (250, 240, 120))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return tuple(int(a + (b - a) * u) for a, b in zip(c0, c1))
    return stops[-1][1]


def diff_heatmap(rep: "DiffReport", cell_w: int = 150, cell_h: int = 20):
    """Heatmap: one row per block (then per component), columns relative L2 and 1 - cosine, each column scaled
    to its own maximum; the value is printed in each cell."""
    from PIL import Image, ImageDraw

    rows = [(b, d) for b, d in rep.blocks.items()] + [(f"[{c}]", d) for c, d in rep.components.items()]
    metrics = [("rel L2", lambda d: d.rel_l2), ("1 - cosine", lambda d: 1 - d.cosine)]
    label_w = 130
    f, f_title = _font(13), _font(16)
    top = 50
    w = label_w + cell_w * len(metrics) + 16
    h = top + cell_h * len(rows) + 12
    img = Image.new("RGB", (w, h), BG)
    dr = ImageDraw.Draw(img)
    dr.text((8, 6), f"{rep.a} vs {rep.b}"[:70], font=f_title, fill=FG)
    for j, (name, _) in enumerate(metrics):
        dr.text((label_w + j * cell_w + 6, 30), name, font=f, fill=DIM)
    for j, (_, fn) in enumerate(metrics):
        vals = [fn(d) for _, d in rows]
        m = max((v for v in vals if math.isfinite(v)), default=0) or 1.0
        for i, v in enumerate(vals):
            x0, y0 = label_w + j * cell_w, top + i * cell_h
            col = _cmap(v / m)
            dr.rectangle((x0, y0, x0 + cell_w - 2, y0 + cell_h - 2), fill=col)
            lum = 0.3 * col[0] + 0.6 * col[1] + 0.1 * col[2]
            dr.text((x0 + 6, y0 + 3), f"{v:.4g}", font=f, fill=(0, 0, 0) if lum > 140 else (255, 255, 255))
    for i, (name, _) in enumerate(rows):
        dr.text((8, top + i * cell_h + 3), name, font=f, fill=FG)
    return img


def compat_image(rep: "CompatReport", width: int = 768):
    """Picture of a compatibility report: verdict and one coloured row per component."""
    from PIL import Image, ImageDraw

    f_title, f = _font(20), _font(14)
    rows = list(rep.components.values())
    extra = rep.problems[:6]
    h = 60 + 24 * len(rows) + 20 * len(extra) + 20
    img = Image.new("RGB", (width, h), BG)
    dr = ImageDraw.Draw(img)
    col = {"ok": GREEN, "ok_with_options": ORANGE}.get(rep.verdict, RED)
    dr.text((16, 12), f"compatibility: {rep.verdict}", font=f_title, fill=col)
    y = 48
    for c in rows:
        ccol = GREEN if c.status == "same" else ORANGE if c.status in ("missing_in_some", "variant_differs", "keys_differ") else RED
        dr.rectangle((16, y, 30, y + 14), fill=ccol)
        dr.text((40, y), f"{c.name}: {c.status}", font=f, fill=FG)
        y += 24
    for p in extra:
        dr.text((16, y), p[:100], font=f, fill=RED)
        y += 20
    return img


def image_to_array(img):
    """PIL image -> H×W×3 float32 numpy array in [0, 1]."""
    import numpy as np

    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def stack_images(images, gap: int = 8):
    """Stack pictures vertically (padding to the widest), for several files in one IMAGE."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    w = max(i.width for i in images)
    h = sum(i.height for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, h), BG)
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height + gap
    return out

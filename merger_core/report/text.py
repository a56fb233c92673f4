"""Readable text of detections, compatibility reports and diffs (tables and lines, no pictures)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence

from ..units import human_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..arch.compat import CompatReport
    from ..arch.detect import Detection
    from ..arch.diff import DiffReport


def human_params(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


def _table(rows: List[Sequence[str]], header: Optional[Sequence[str]] = None) -> str:
    all_rows = ([list(header)] if header else []) + [list(map(str, r)) for r in rows]
    if not all_rows:
        return ""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in all_rows) for i in range(max(len(r) for r in all_rows))]
    out = []
    for n, r in enumerate(all_rows):
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if header and n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# detection


def detection_facts(det: "Detection") -> List[tuple]:
    """(label, value) pairs of the main facts, shared by the text and the picture."""
    arch = det.arch_name if det.known else "unknown"
    if not det.known and det.closest:
        arch += f" (closest: {det.closest}, {det.closest_score:.0%} of identifying keys)"
    elif det.known and not det.verified_fingerprint:
        arch += " (derived fingerprint)"
    size = human_bytes(det.file_size)
    if det.expected_data_bytes:
        ratio = det.data_bytes / det.expected_data_bytes
        size += f" (expected {human_bytes(det.expected_data_bytes)} of data for what it holds, {ratio:.0%})"
    params = human_params(det.params)
    if det.expected_params:
        params += f" (reference {human_params(det.expected_params)})"
    facts = [
        ("architecture", arch + (f" [{det.arch_id}]" if det.known else "")),
        ("family", det.family),
        ("layout", det.layout_name or det.layout),
        ("variant", det.variant),
        ("prediction", det.prediction),
        ("dtype", det.dtype_label or "-"),
    ]
    if det.quantization:
        facts.append(("quantization", _quantization_label(det)))
    facts += [
        ("parameters", params),
        ("file size", size),
        ("mergeable", "yes" if det.mergeable else f"no: {det.refusal}"),
    ]
    if det.metadata_claims:
        facts.append(("claims", "; ".join(f"{k}={v}" for k, v in det.metadata_claims.items())))
    return facts


def _quantization_label(det: "Detection") -> str:
    from ..arch.detect import QUANTIZATION_NAMES

    name = QUANTIZATION_NAMES.get(det.quantization or "", det.quantization or "")
    if det.quantization == "scaled_fp8":
        return f"{name} (fp8 codes times a per-layer scale; dequantized to merge)"
    return f"{name} (packed 4-bit codes; not mergeable)"


def _dtype_cell(det: "Detection") -> str:
    """The dtype with the quantized format beside it (``fp8_e4m3fn [scaled_fp8]``)."""
    return (det.dtype_label or "-") + (f" [{det.quantization}]" if det.quantization else "")


def render_detection(det: "Detection", evidence: bool = True) -> str:
    lines = [f"== {det.file_name}"]
    lines.append(_table([(k, v) for k, v in detection_facts(det)]))
    if det.components:
        rows = []
        for c in det.components.values():
            exp = human_params(c.expected_params) if c.expected_params else "-"
            rows.append((c.name, c.status + ("" if c.required or c.status != "missing" else " (optional)"),
                         str(c.tensors), human_params(c.params), exp, c.dtype_label))
        lines.append("")
        lines.append(_table(rows, ("component", "status", "tensors", "params", "reference", "dtype")))
    for title, items in (("DISAGREEMENT", det.disagreements), ("warning", det.warnings)):
        for it in items:
            lines.append(f"{title}: {it}")
    if evidence and det.evidence:
        lines.append("evidence:")
        lines.extend(f"  - {e}" for e in det.evidence)
    return "\n".join(lines)


def render_detections(dets: Sequence["Detection"]) -> str:
    """One line per file, then nothing else: the overview for many files."""
    rows = []
    for d in dets:
        missing = [n for n, c in d.components.items() if c.status == "missing" and c.required and n != "unet"]
        rows.append((
            d.file_name, d.arch_id if d.known else f"unknown~{d.closest or '-'}", d.variant, d.prediction,
            _dtype_cell(d), human_params(d.params), human_bytes(d.file_size),
            ("no " + ",".join(missing)) if missing else "",
            "!" + str(len(d.disagreements)) if d.disagreements else "",
        ))
    return _table(rows, ("file", "arch", "variant", "prediction", "dtype", "params", "size", "missing", "disagree"))


# ---------------------------------------------------------------------------------------------------------------
# compatibility


def render_compat(rep: "CompatReport") -> str:
    lines = [f"verdict: {rep.verdict}"]
    lines.append(_table([(f"[{i}]", n, d.arch_id if d.known else "unknown", d.variant, _dtype_cell(d))
                         for i, (n, d) in enumerate(zip(rep.files, rep.detections))],
                        ("#", "file", "arch", "variant", "dtype")))
    for p in rep.problems:
        lines.append(f"problem: {p}")
    rows = []
    for c in rep.components.values():
        rows.append((c.name, c.status, ",".join(str(i) for i in c.present_in), c.keys, c.shape_mismatch_count))
    if rows:
        lines.append("")
        lines.append(_table(rows, ("component", "status", "in files", "keys", "shape diffs")))
    for c in rep.components.values():
        for i, keys in c.keys_missing.items():
            more = c.keys_missing_count[i] - len(keys)
            lines.append(f"{c.name}: {rep.files[i]} lacks {c.keys_missing_count[i]} keys: {', '.join(keys)}"
                         + (f" and {more} more" if more > 0 else ""))
        for k, shapes in c.shape_mismatch.items():
            lines.append(f"{c.name}: {k} " + ", ".join(f"{rep.files[i]} {s}" for i, s in shapes.items()))
        if c.shape_mismatch_count > len(c.shape_mismatch):
            lines.append(f"{c.name}: ... {c.shape_mismatch_count - len(c.shape_mismatch)} more shape differences")
        for n in c.notes:
            lines.append(f"{c.name}: {n}")
    for n in rep.notes:
        lines.append(f"note: {n}")
    if rep.options:
        lines.append("options:")
        lines.extend(f"  - {o}" for o in rep.options)
    e = rep.estimates
    lines.append(
        f"estimates: output {human_bytes(e.output_bytes)}; peak RAM {human_bytes(e.peak_ram_bytes_linear)} "
        f"(weighted sum) / {human_bytes(e.peak_ram_bytes_tensorwise)} (TIES, DARE, SLERP)"
        + (f"; VRAM {human_bytes(e.vram_bytes)} on {e.device} (free {human_bytes(e.vram_free_bytes)})" if e.vram_bytes else "")
        + f"; RAM available {human_bytes(e.ram_available_bytes)}; free disk {human_bytes(e.disk_free_bytes)} in {e.output_folder}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# diff


def render_diff(rep: "DiffReport") -> str:
    lines = [f"diff {rep.a} vs {rep.b} ({rep.arch_id})",
             f"total: relative L2 {rep.total.rel_l2:.5f}, cosine {rep.total.cosine:.6f} over {rep.total.keys} keys "
             f"({human_params(rep.total.params)} values); {rep.identical_keys} keys identical"]
    if rep.skipped:
        lines.append("not compared: " + ", ".join(f"{n} {why}" for why, n in rep.skipped.items()))
    lines.append("")
    lines.append(_table([(c, d.keys, f"{d.rel_l2:.5f}", f"{d.cosine:.6f}") for c, d in rep.components.items()],
                        ("component", "keys", "rel L2", "cosine")))
    if rep.blocks:
        lines.append("")
        lines.append(_table([(b, d.keys, f"{d.rel_l2:.5f}", f"{d.cosine:.6f}", _bar(d.rel_l2, rep)) for b, d in rep.blocks.items()],
                            ("block", "keys", "rel L2", "cosine", "")))
    if rep.top_keys:
        lines.append("")
        lines.append("most changed keys:")
        lines.extend(f"  {r:.5f}  {k}" for k, r in rep.top_keys)
    return "\n".join(lines)


def _bar(v: float, rep: "DiffReport", width: int = 30) -> str:
    m = max((d.rel_l2 for d in rep.blocks.values() if math.isfinite(d.rel_l2)), default=0)
    if m <= 0 or not math.isfinite(v):
        return ""
    return "#" * max(0, round(width * v / m))



"""The one key and shape comparison of N models, from their headers (no weight is read).

``compare_tensors`` compares any per-file mapping of key -> shape; ``compare_keys`` applies it to whole headers.
A merge runs it once (inside the compatibility check, :mod:`.compat`), and both the engine's gate and every
explanation read that one result; Analyze Structure's per-component view applies the same function to each
component's keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..io.safetensors import SafetensorsHeader

SHOW_FIRST = 5


@dataclass
class KeyReport:
    """What differs between the inputs' key sets and shapes. Files absent from a comparison (``None``) are
    listed in ``absent`` and are not counted as missing keys."""

    names: List[str]
    missing: Dict[int, List[str]] = field(default_factory=dict)  # input index -> keys others have but it lacks
    shape_mismatch: Dict[str, Dict[int, Tuple[int, ...]]] = field(default_factory=dict)
    union_keys: int = 0
    absent: List[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def describe(self) -> str:
        lines = []
        for i, keys in sorted(self.missing.items()):
            lines.append(f"{self.names[i]} lacks {len(keys)} of {self.union_keys} keys: " + first_few(keys))
        if self.shape_mismatch:
            items = sorted(self.shape_mismatch.items())
            shown = [
                f"{k} (" + ", ".join(f"{self.names[i]}: {list(s)}" for i, s in sorted(v.items())) + ")"
                for k, v in items[:SHOW_FIRST]
            ]
            more = f" and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""
            lines.append(f"{len(items)} keys differ in shape: " + "; ".join(shown) + more)
        return "\n".join(lines) if lines else "all inputs have the same keys and shapes"


def first_few(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOW_FIRST])
    return shown + (f" and {len(keys) - SHOW_FIRST} more" if len(keys) > SHOW_FIRST else "")


def compare_tensors(
    per_file: Sequence[Optional[Mapping[str, Tuple[int, ...]]]], names: Sequence[str], empty_is_absent: bool = True
) -> KeyReport:
    """Compare key -> shape mappings, one per file. With ``empty_is_absent`` a file with none of these keys
    (``None`` or empty) is listed in ``absent`` (a component it does not have) instead of lacking every key."""
    report = KeyReport(names=list(names))
    union: Dict[str, None] = {}
    for m in per_file:
        if m:
            union.update(dict.fromkeys(m))
    report.union_keys = len(union)
    for i, m in enumerate(per_file):
        if not m and empty_is_absent:
            report.absent.append(i)
            continue
        lacking = sorted(k for k in union if not m or k not in m)
        if lacking:
            report.missing[i] = lacking
    for k in union:
        shapes = {i: tuple(m[k]) for i, m in enumerate(per_file) if m and k in m}
        if len(set(shapes.values())) > 1:
            report.shape_mismatch[k] = shapes
    return report


def compare_keys(headers: Sequence[SafetensorsHeader], names: Sequence[str] | None = None) -> KeyReport:
    """Compare whole files by full key names (what the engine merges by)."""
    names = list(names or [os.path.basename(h.path) for h in headers])
    return compare_tensors([{k: t.shape for k, t in h.tensors.items()} for h in headers], names, empty_is_absent=False)

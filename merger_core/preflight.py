"""Key and shape compatibility of N safetensors headers, checked before any weight is read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from .safetensors_io import SafetensorsHeader

SHOW_FIRST = 5


@dataclass
class KeyReport:
    """What differs between the inputs' key sets and shapes."""

    names: List[str]
    missing: Dict[int, List[str]] = field(default_factory=dict)  # input index -> keys others have but it lacks
    shape_mismatch: Dict[str, Dict[int, Tuple[int, ...]]] = field(default_factory=dict)
    union_keys: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def describe(self) -> str:
        lines = []
        for i, keys in sorted(self.missing.items()):
            lines.append(f"{self.names[i]} lacks {len(keys)} of {self.union_keys} keys: " + _first(keys))
        if self.shape_mismatch:
            items = sorted(self.shape_mismatch.items())
            shown = [
                f"{k} (" + ", ".join(f"{self.names[i]}: {list(s)}" for i, s in sorted(v.items())) + ")"
                for k, v in items[:SHOW_FIRST]
            ]
            more = f" and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""
            lines.append(f"{len(items)} keys differ in shape: " + "; ".join(shown) + more)
        return "\n".join(lines) if lines else "all inputs have the same keys and shapes"


def _first(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOW_FIRST])
    return shown + (f" and {len(keys) - SHOW_FIRST} more" if len(keys) > SHOW_FIRST else "")


def compare_keys(headers: Sequence[SafetensorsHeader], names: Sequence[str] | None = None) -> KeyReport:
    names = list(names or [os.path.basename(h.path) for h in headers])
    union: Dict[str, None] = {}
    for h in headers:
        union.update(dict.fromkeys(h.tensors))
    report = KeyReport(names=names, union_keys=len(union))
    for i, h in enumerate(headers):
        lacking = sorted(k for k in union if k not in h.tensors)
        if lacking:
            report.missing[i] = lacking
    for k in union:
        shapes = {i: h.tensors[k].shape for i, h in enumerate(headers) if k in h.tensors}
        if len(set(shapes.values())) > 1:
            report.shape_mismatch[k] = shapes
    return report

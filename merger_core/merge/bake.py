"""Baking LoRAs into a merge: the plan's LoRAs (``MergePlan.loras``) become one more per-key hook, so each key is
computed once: merged weight plus the sum of the LoRA deltas, in fp32, in the same pass (``merger_core/lora``).

:func:`attach_loras` runs in :func:`~merger_core.merge.plan.prepare`, on headers only: a LoRA of another
architecture, a bad file or a module that cannot be baked is refused before any weight is read, and the LoRA
modules that match no key are named in the notes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass
class LoraInput:
    """A LoRA to bake: its strengths for the diffusion model and for the text encoders (ComfyUI's LoraLoader)."""

    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    name: str = ""
    sha256: Optional[str] = None  # full-file SHA-256 when known (a hint, checked like a model's)

    def display_name(self) -> str:
        return self.name or os.path.basename(self.path)


def _both(first, second):
    """One key_delta hook from two (either may be None): their deltas are added one after the other."""
    if first is None or second is None:
        return first or second

    class _Sum:
        def __init__(self, a, b):
            self.parts = [d for d in (a, b) if d is not None]

        def add_to(self, values, start):
            for d in self.parts:
                d.add_to(values, start)

        def release(self):
            for d in self.parts:
                getattr(d, "release", lambda: None)()

    def hook(key):
        a, b = first(key), second(key)
        return a if b is None else b if a is None else _Sum(a, b)

    return hook


def attach_loras(plan, jobs, to_canonical: Dict[str, str], notes: List[str]) -> Tuple[object, Optional[object]]:
    """``(plan with the LoRA hook added, LoraReport)`` for a plan with LoRAs; the plan unchanged and None without.

    ``jobs`` are the output keys; ``to_canonical`` maps output names to the ComfyUI checkpoint names the LoRA key
    map knows (only where they differ)."""
    if not plan.loras:
        return plan, None
    from ..io.safetensors import FLOAT_DTYPES
    from ..lora.delta import lora_deltas

    shapes = {to_canonical.get(j.name, j.name): j.shape for j in jobs if j.out_dtype in FLOAT_DTYPES or j.out_dtype.startswith("F8")}
    key_delta, report = lora_deltas(shapes, [(l.path, l.strength_model, l.strength_clip) for l in plan.loras])
    lora_hook = key_delta if not to_canonical else (lambda key: key_delta(to_canonical.get(key, key)))
    patched = len(report.keys)
    notes.append(f"baking {len(plan.loras)} LoRA(s) into {patched} key(s) in the same pass")
    for line in report.lines():
        notes.append(line.strip())
    return dataclasses.replace(plan, key_delta=_both(plan.key_delta, lora_hook)), report

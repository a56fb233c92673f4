"""Manifest data: :class:`Manifest` and :class:`ManifestEntry`, display names, and the validation error type.

``docs/manifest.md`` documents the format. Parsing and writing are in :mod:`.parse`, the JSON Schema check in
:mod:`.schema`, the checks a schema cannot express in :mod:`.validate`, scans in :mod:`.scan`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ManifestError

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MODEL_EXTENSION = ".safetensors"
DTYPES = ("fp16", "bf16", "fp32", "keep", "fp8_scaled")  # fp8_scaled: ComfyUI's scaled fp8 (docs/formats.md)

# order of keys in a saved manifest
_TOP_KEYS = ("version", "method", "normalize", "dtype", "device", "params", "base", "title", "seed", "allow_missing", "nonfinite", "key_layout", "notes", "models", "loras")
_ENTRY_KEYS = ("path", "weight", "sha256", "notes", "civitai")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class ManifestEntry:
    """One input model. ``path`` is absolute once loaded; ``weight`` is a finite number >= 0."""

    path: str
    weight: float = 1.0
    sha256: Optional[str] = None
    notes: Optional[str] = None
    civitai: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class LoraEntry:
    """A LoRA baked into the merge: ``strength_model`` scales its diffusion-model deltas, ``strength_clip`` its
    text-encoder deltas (as ComfyUI's LoraLoader does)."""

    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    sha256: Optional[str] = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class Manifest:
    """A merge recipe. ``path`` is where it was loaded from or saved to (not part of equality)."""

    models: List[ManifestEntry]
    method: str = "weighted_sum"
    normalize: bool = True
    dtype: str = "fp16"
    device: str = "cpu"
    params: Dict[str, Any] = field(default_factory=dict)
    base: Optional[str] = None
    title: Optional[str] = None
    seed: int = 0
    allow_missing: bool = False
    nonfinite: str = "error"
    key_layout: Optional[str] = None  # output key layout: None/"first" (the first model's) or a layout id
    loras: List[LoraEntry] = field(default_factory=list)  # LoRAs baked into the merged keys, in order
    notes: Optional[str] = None
    path: Optional[str] = field(default=None, compare=False)

    @property
    def entries(self) -> List[ManifestEntry]:
        """Another name for :attr:`models`."""
        return self.models

    @property
    def weights(self) -> List[float]:
        return [e.weight for e in self.models]

    @property
    def folder(self) -> Optional[str]:
        """The folder relative paths resolve against (the manifest file's folder), if known."""
        return os.path.dirname(self.path) if self.path else None



def display_names(paths: Sequence[str]) -> List[str]:
    """Names shown for inputs: the file names, or, where two share a name, paths relative to their common folder
    (``/`` separators). Never absolute paths."""
    base = [os.path.basename(p) for p in paths]
    if len(set(base)) == len(base):
        return base
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        return base
    out = []
    for p in paths:
        out.append(os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One validation problem: ``where`` is ``models[2] (name.safetensors)`` or ``""`` for the top level."""

    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.where, self.field, self.message) if p)


class ManifestValidationError(ManifestError):
    """A manifest failed validation; :attr:`problems` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        head = source or "manifest"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            msg = f"{head} has {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


def _entry_label(index: int, path: Any) -> str:
    if isinstance(path, str) and path:
        return f"models[{index}] ({os.path.basename(path.replace(chr(92), '/')) or path})"
    return f"models[{index}]"


def _problem_order(p: Problem) -> Tuple[int, int]:
    """Top-level problems first, then by entry index (stable for problems of one entry)."""
    if p.where.startswith("models["):
        return (1, int(p.where[7 : p.where.index("]")]))
    return (0, 0)

"""Analyze Structure: architecture detection from headers, compatibility preflight, model diff and lineage.

Public API::

    detect(path) -> Detection
    block_of(arch_id, key) -> str | None ; blocks(arch_id) -> list[str]     (merger_core.analyze.blocks)
"""

from .detect import ComponentInfo, Detection, detect, detect_header  # noqa: F401
from .fingerprints import get_fingerprint, load_fingerprints  # noqa: F401

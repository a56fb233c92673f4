"""Block maps: which block of an architecture a key belongs to, for block-weighted merges.

``blocks(arch_id)`` lists the block names in order (SD1: BASE, IN00-IN11, M00, OUT00-OUT11; SDXL: BASE,
IN00-IN08, M00, OUT00-OUT08, VAE; SD3: BASE, EMB, J00.., FINAL, VAE; Flux: BASE, EMB, D00-D18, S00-S37, FINAL,
VAE). ``block_of(arch_id, key)`` maps a full key (with or without the ``model.diffusion_model.`` prefix) to its
block, or ``None`` for keys outside every block (markers such as ``v_pred``, training leftovers). The rules are
data, in ``merger_core/data/architectures/<arch>.json`` (``block_rules``, ``component_blocks``).
"""

from __future__ import annotations

import functools
from typing import List, Optional

from .fingerprints import UNET_PREFIX, get_fingerprint

_ALIASES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl_base", "flux": "flux_dev", "sd3": "sd3_medium"}


def _fp(arch_id: str):
    return get_fingerprint(_ALIASES.get(arch_id, arch_id))


def blocks(arch_id: str) -> List[str]:
    """Block names of ``arch_id`` in merge order. Raises KeyError for an unknown id."""
    return list(_fp(arch_id).blocks)


@functools.lru_cache(maxsize=200_000)
def block_of(arch_id: str, key: str) -> Optional[str]:
    """The block ``key`` belongs to in ``arch_id``, or None when it belongs to none."""
    fp = _fp(arch_id)
    for comp in fp.components.values():
        if comp.name == "unet":
            continue
        if any(key.startswith(p) for p in comp.prefixes):
            return fp.component_blocks.get(comp.name.split(".")[0])
    for prefix in (UNET_PREFIX, "diffusion_model.", ""):
        if key.startswith(prefix):
            label = fp.unet_block(key[len(prefix):])
            if label is not None:
                return label
    return None

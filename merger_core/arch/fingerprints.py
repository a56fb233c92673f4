"""Loading the architecture fingerprints (``merger_core/data/architectures/*.json``) and resolving key owners.

Every architecture is data: identifying keys with shapes (relative to the diffusion model's prefix), counts of
numbered blocks, keys that must be absent, the components with their key prefixes and expected sizes, the
input-channel variant rule, and the block map. See ``docs/architectures.md`` for the format.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..data import data_path

DATA_DIR = data_path("architectures")
UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Component:
    name: str
    prefixes: Tuple[str, ...]
    tensors: Optional[int]
    params: Optional[int]
    required: bool


@dataclass
class Fingerprint:
    id: str
    name: str
    family: str
    kind: str
    prediction: str
    verified: bool
    source: str
    notes: str
    nominal_dtype: str
    components: Dict[str, Component]
    signature: Dict[str, Tuple[int, ...]]
    counts: Dict[str, int]
    absent: List[str]
    variant: dict
    prediction_probe: Optional[dict]
    blocks: List[str]
    block_rules: List[Tuple["re.Pattern[str]", str]]
    component_blocks: Dict[str, str]
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def expected_params(self) -> int:
        return sum(c.params or 0 for c in self.components.values())

    def component_of(self, key: str, unet_prefix: str) -> Optional[str]:
        """Which component ``key`` belongs to, given the file's diffusion-model prefix."""
        for c in self.components.values():
            if c.name == "unet":
                continue
            for p in c.prefixes:
                if key.startswith(p):
                    return c.name
        if key.startswith(unet_prefix):
            return "unet"
        return None

    def unet_block(self, rel: str) -> Optional[str]:
        for pat, label in self.block_rules:
            m = pat.search(rel)
            if m:
                if "{0" in label:
                    return label.format(int(m.group(1)))
                return label
        return None


def _load_one(path: str) -> Fingerprint:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    comps = {
        name: Component(name, tuple(c["prefixes"]), c.get("tensors"), c.get("params"), bool(c.get("required", True)))
        for name, c in d["components"].items()
    }
    return Fingerprint(
        id=d["id"],
        name=d["name"],
        family=d["family"],
        kind=d["kind"],
        prediction=d["prediction"],
        verified=bool(d.get("verified")),
        source=d.get("source", ""),
        notes=d.get("notes", ""),
        nominal_dtype=d.get("nominal_dtype", "F16"),
        components=comps,
        signature={k: tuple(v) for k, v in d["signature"].items()},
        counts=dict(d.get("counts", {})),
        absent=list(d.get("absent", [])),
        variant=d.get("variant") or {},
        prediction_probe=d.get("prediction_probe"),
        blocks=list(d["blocks"]),
        block_rules=[(re.compile(p), label) for p, label in d["block_rules"]],
        component_blocks=dict(d.get("component_blocks", {})),
        raw=d,
    )


@functools.lru_cache(maxsize=None)
def load_fingerprints(data_dir: str = DATA_DIR) -> Dict[str, Fingerprint]:
    """All architecture fingerprints, by id, in a stable order."""
    out: Dict[str, Fingerprint] = {}
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".json") and not name.startswith("_"):
            fp = _load_one(os.path.join(data_dir, name))
            out[fp.id] = fp
    return out


@functools.lru_cache(maxsize=None)
def load_layouts(data_dir: str = DATA_DIR) -> dict:
    """Name-recognised layouts, marker keys and metadata-claim rules (``_layouts.json``), regexes compiled."""
    with open(os.path.join(data_dir, "_layouts.json"), encoding="utf-8") as f:
        d = json.load(f)
    for lay in d["layouts"]:
        lay["_re"] = [re.compile(p) for p in lay["patterns"]]
        lay["_hints"] = [(re.compile(p), dim, table) for p, dim, table in lay.get("family_hints", [])]
    d["extra_keys"]["_leftover"] = [re.compile(p) for p in d["extra_keys"]["leftover_patterns"]]
    return d


def get_fingerprint(arch_id: str) -> Fingerprint:
    fps = load_fingerprints()
    if arch_id not in fps:
        raise KeyError(f"unknown architecture id {arch_id!r}; known: {', '.join(fps)}")
    return fps[arch_id]

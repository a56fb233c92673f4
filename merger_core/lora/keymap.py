"""The key map from LoRA module names to checkpoint keys, built from the data files ``data/lora_keys/*.json``.

The data files are generated from ComfyUI's own mapping (``comfy/lora.py`` ``model_lora_keys_unet`` and
``model_lora_keys_clip``) by ``scripts/gen_lora_keys.py`` and hold, per architecture, alias templates, the
diffusers-name table of the diffusion model, the irregular text-encoder keys and the few entries no rule makes. The
map itself is expanded here, forward, from the keys a checkpoint really has (as ComfyUI does from its model's keys),
and it names keys in the *saved* layout (``model.diffusion_model.*``, ``cond_stage_model.*``,
``conditioner.embedders.*``, ``text_encoders.*``).

A target is a checkpoint key, optionally a block of rows of it (``rows=(start, count)``: a fused qkv weight of which
a LoRA module patches one part) and optionally transposed (the OpenCLIP ``text_projection`` is stored transposed).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from ..data import data_path, load_json

KEYMAP_DIR = "lora_keys"


@dataclass(frozen=True)
class Target:
    """What one LoRA module patches: ``key`` (saved layout), rows ``start .. start + count`` of it (``None``: the
    whole key) and whether the module's delta is the transpose of the stored tensor."""

    key: str
    rows: Optional[Tuple[int, int]] = None
    transpose: bool = False

    @staticmethod
    def from_data(value) -> "Target":
        if isinstance(value, str):
            return Target(value)
        key = value[0]
        rows = (int(value[1]), int(value[2])) if len(value) >= 3 and value[1] is not None else None
        transpose = bool(value[3]) if len(value) >= 4 else False
        return Target(key, rows, transpose)

    def to_data(self):
        if self.rows is None and not self.transpose:
            return self.key
        out = [self.key, *(self.rows if self.rows is not None else (None, None))]
        if self.transpose:
            out.append(1)
        return out


def architectures() -> List[str]:
    """The architectures that have a key map, by data file name (``sd15``, ``sdxl_base``, ...)."""
    folder = data_path(KEYMAP_DIR)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))


@lru_cache(maxsize=None)
def keymap_data(arch: str) -> Mapping:
    return load_json(KEYMAP_DIR, f"{arch}.json")


def _fill(template: str, dot: str) -> str:
    proc = dot.replace(".to_", ".processor.to_")
    if proc.endswith(".to_out.0"):
        proc = proc[:-2]
    return template.replace("{us}", dot.replace(".", "_")).replace("{dot}", dot).replace("{proc}", proc)


def arch_of_checkpoint(keys: Iterable[str]) -> Optional[str]:
    """The key-map architecture whose identifying keys a checkpoint has (the most specific match), or ``None``."""
    keys = set(keys)
    best, best_n = None, 0
    for arch in architectures():
        need = keymap_data(arch)["detect"]
        if all(k in keys for k in need) and len(need) > best_n:
            best, best_n = arch, len(need)
    return best


def build_key_map(arch: str, keys: Iterable[str]) -> Dict[str, Target]:
    """alias -> Target for a checkpoint of ``arch`` with these keys (saved layout). Only targets the checkpoint has."""
    d = keymap_data(arch)
    keys = set(keys)
    out: Dict[str, Target] = {}
    # the diffusion model: every key by its own name, then the diffusers names
    unet = d["unet"]
    prefix = next((p for p in unet["prefixes"] if any(k.startswith(p) for k in keys)), None)
    if prefix is not None:
        for k in sorted(keys):
            if not k.startswith(prefix):
                continue
            rel = k[len(prefix):]
            if rel.endswith(".weight"):
                for t in unet["weight_aliases"]:
                    out[_fill(t, rel[: -len(".weight")])] = Target(k)
            else:
                for t in unet["other_aliases"]:
                    out[_fill(t, rel)] = Target(k)
        diff = d.get("diffusers") or {}
        for name, value in diff.get("table", {}).items():
            t = Target.from_data(value)
            t = Target(prefix + t.key, t.rows, t.transpose)
            if t.key in keys:
                for a in diff["aliases"]:
                    out[_fill(a, name)] = t
    # the text encoders: internal (ComfyUI) names, regular by prefix, irregular by table
    for enc in d.get("text_encoders", []):
        internal: Dict[str, Target] = {}
        ck = enc.get("ckpt_prefix")
        if ck:
            for k in keys:
                if k.startswith(ck) and k.endswith(".weight"):
                    internal[k[len(ck):-len(".weight")]] = Target(k)
        for rel, value in enc.get("table", {}).items():
            t = Target.from_data(value)
            if t.key in keys:
                internal[rel] = t
        layer = re.compile(enc["layer_pattern"]) if enc.get("layer_pattern") else None
        for rel in sorted(internal):
            t = internal[rel]
            for a in enc.get("all_aliases", []):
                out[_fill(a, rel)] = t
            if layer is not None and layer.match(rel):
                for a in enc.get("layer_aliases", []):
                    out[_fill(a, rel)] = t
    for alias in d.get("exclude", []):
        out.pop(alias, None)
    for alias, value in d.get("extra", {}).items():
        t = Target.from_data(value)
        if t.key in keys:
            out[alias] = t
    return out


# the kohya prefixes an extracted LoRA names its text-encoder modules with, per key map (first wins)
KOHYA_TE_PREFIXES = {"sd15": ["lora_te_"], "sd21": ["lora_te_"], "sdxl_base": ["lora_te1_", "lora_te2_"],
                     "sd3_medium": ["lora_te1_", "lora_te2_"], "flux1_dev": ["lora_te1_", "lora_te2_"]}


def kohya_modules(arch: str, keys: Iterable[str]) -> Dict[str, List[Tuple[str, Optional[Tuple[int, int]]]]]:
    """checkpoint key -> [(kohya module name, rows or None)] for the keys a kohya-format LoRA can patch: every weight
    of the diffusion model by its own name (``lora_unet_`` + the name with ``_``), the attention and MLP weights of
    the text encoders (``lora_te_``/``lora_te1_``/``lora_te2_``; a fused OpenCLIP ``in_proj_weight`` gets three
    modules, one per block of rows). Names are ones ComfyUI's map (and so this one) resolves to the same target."""
    keys = set(keys)
    d = keymap_data(arch)
    km = build_key_map(arch, keys)
    out: Dict[str, List[Tuple[str, Optional[Tuple[int, int]]]]] = {}
    prefix = next((p for p in d["unet"]["prefixes"] if any(k.startswith(p) for k in keys)), None)
    if prefix is not None:
        for k in keys:
            if k.startswith(prefix) and k.endswith(".weight"):
                name = "lora_unet_" + k[len(prefix): -len(".weight")].replace(".", "_")
                if km.get(name) == Target(k):
                    out[k] = [(name, None)]
    prefs = KOHYA_TE_PREFIXES.get(arch, ["lora_te_"])
    chosen: Dict[Tuple[str, Optional[Tuple[int, int]]], str] = {}
    for alias, t in km.items():
        if t.transpose or t.key in out:
            continue
        p = next((i for i, pre in enumerate(prefs) if alias.startswith(pre)), None)
        if p is None or not re.search(r"_text_model_encoder_layers_\d+_", alias):
            continue
        slot = (t.key, t.rows)
        old = chosen.get(slot)
        if old is None or (p, alias) < (next(i for i, pre in enumerate(prefs) if old.startswith(pre)), old):
            chosen[slot] = alias
    for (k, rows), alias in chosen.items():
        out.setdefault(k, []).append((alias, rows))
    for k in out:
        out[k].sort(key=lambda m: (m[1] or (0, 0)))
    return out

"""Block weights: any per-block float parameter of a method given per UNet (or transformer) block.

A block spec is one of

* a preset name (``GRAD_V``, ``IN_ONLY``, ...; see :func:`presets` and ``merger_core/data/block_presets.json``);
* a comma-separated list with one value per block of the architecture, in the order of
  :func:`merger_core.arch.blocks.blocks` (SD1: 26 values BASE, IN00-IN11, M00, OUT00-OUT11; SDXL: 21 values
  BASE, IN00-IN08, M00, OUT00-OUT08, VAE);
* ``NAME=value`` pairs, comma-separated, where NAME is a block (``IN04``), a range (``IN00-IN05``), a group
  (``IN``, ``M``, ``OUT``, ``BASE``, ``VAE``) or ``*`` for every block not named otherwise
  (``*=0.5,OUT=1,BASE=0``). Unnamed blocks keep the method's global value;
* a list or dict of numbers (from a manifest) with the same meaning as the two previous forms.

:func:`key_params_hook` turns specs into a ``MergePlan.key_params`` hook; keys outside every block (markers) keep
the global values.
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ManifestError
from ..data import data_path

PRESETS_FILE = data_path("block_presets.json")
Spec = Union[str, Sequence[float], Mapping[str, float]]
_GROUPS = ("BASE", "VAE", "IN", "M", "OUT")


def _blocks(arch_id: str) -> List[str]:
    from ..arch.blocks import blocks

    try:
        return blocks(arch_id)
    except KeyError as exc:
        raise ManifestError(f"block weights: {exc.args[0]}") from None


def _block_of(arch_id: str, key: str) -> Optional[str]:
    from ..arch.blocks import block_of

    return block_of(arch_id, key)


def presets() -> Dict[str, str]:
    """Preset names and one-line descriptions."""
    with open(PRESETS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v["doc"] for k, v in data.items() if not k.startswith("_")}


def _preset(name: str, block_names: Sequence[str]) -> Dict[str, float]:
    with open(PRESETS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    p = data.get(name.upper())
    if p is None or name.startswith("_"):
        raise ManifestError(f"unknown block-weight preset {name!r}; presets: {', '.join(presets())}")
    unet = [b for b in block_names if b not in ("BASE", "VAE")]
    rule = p["unet"]
    out: Dict[str, float] = {}
    for i, b in enumerate(unet):
        x = i / (len(unet) - 1) if len(unet) > 1 else 0.0
        kind = rule["kind"]
        if kind == "const":
            v = rule["value"]
        elif kind == "linear":
            v = rule["start"] + (rule["end"] - rule["start"]) * x
        elif kind == "cosine":
            v = rule["start"] + (rule["end"] - rule["start"]) * (1 - math.cos(math.pi * x)) / 2
        elif kind == "groups":
            v = rule.get(_group(b), rule.get("other", 0.0))
        else:
            raise ManifestError(f"block preset {name}: unknown kind {kind!r} in {PRESETS_FILE}")
        out[b] = float(v)
    for b in block_names:
        if b in ("BASE", "VAE"):
            out[b] = float(p["rest"])
    return out


def _group(block: str) -> str:
    m = re.match(r"^(IN|M|OUT)\d+$", block)
    return m.group(1) if m else block


def _num(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ManifestError(f"block weights: {where}: {text!r} is not a number") from None
    if v != v or math.isinf(v):
        raise ManifestError(f"block weights: {where}: {text!r} is not a finite number")
    return v


def _expand(name: str, block_names: Sequence[str]) -> List[str]:
    name = name.strip().upper()
    if name == "*":
        return list(block_names)
    if name in block_names:
        return [name]
    if name in _GROUPS:
        got = [b for b in block_names if _group(b) == name]
        if got:
            return got
    m = re.match(r"^([A-Z]+\d+)\s*-\s*([A-Z]+\d+)$", name)
    if m and m.group(1) in block_names and m.group(2) in block_names:
        i, j = block_names.index(m.group(1)), block_names.index(m.group(2))
        if i <= j:
            return list(block_names[i : j + 1])
    raise ManifestError(f"block weights: {name!r} names no block; blocks are {', '.join(block_names)}")


def parse_blocks(spec: Spec, arch_id: str) -> Dict[str, float]:
    """Block name -> value for ``arch_id``. Blocks the spec leaves out are absent (they keep the global value)."""
    names = _blocks(arch_id)
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
        return _from_pairs([(k, _num(str(v), k)) for k, v in items], names)
    if isinstance(spec, (list, tuple)):
        return _from_list([_num(str(v), f"value {i + 1}") for i, v in enumerate(spec)], names, arch_id)
    text = str(spec).strip()
    if not text:
        raise ManifestError("block weights: empty spec")
    if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", text) and "=" not in text:
        return _preset(text, names)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if any("=" in p or ":" in p for p in parts):
        pairs = []
        for p in parts:
            k, sep, v = p.replace(":", "=", 1).partition("=")
            if not sep:
                raise ManifestError(f"block weights: {p!r} should be NAME=value (mixing forms is not allowed)")
            pairs.append((k, _num(v.strip(), k.strip())))
        return _from_pairs(pairs, names)
    return _from_list([_num(p, f"value {i + 1}") for i, p in enumerate(parts)], names, arch_id)


def _from_pairs(pairs: Sequence[Tuple[str, float]], names: Sequence[str]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    star = [v for k, v in pairs if k.strip() == "*"]
    if star:
        out.update(dict.fromkeys(names, star[-1]))
    for k, v in pairs:  # ranges and groups, then single blocks win
        if k.strip() != "*" and k.strip().upper() not in names:
            out.update(dict.fromkeys(_expand(k, names), v))
    for k, v in pairs:
        if k.strip().upper() in names:
            out[k.strip().upper()] = v
    return out


def _from_list(values: Sequence[float], names: Sequence[str], arch_id: str) -> Dict[str, float]:
    if len(values) != len(names):
        raise ManifestError(
            f"block weights for {arch_id} take {len(names)} values ({names[0]}, ..., {names[-1]}), got {len(values)}"
        )
    return dict(zip(names, values))


def check_range(values: Mapping[str, float], lo: float, hi: float, param: str) -> None:
    for b, v in values.items():
        if not (lo <= v <= hi):
            raise ManifestError(f"block weights: {param} for {b} must be in [{lo}, {hi}], got {v}")


def key_params_hook(arch_id: str, specs: Mapping[str, Spec], method=None) -> Callable[[str], Dict[str, float]]:
    """A ``MergePlan.key_params`` hook giving each per-block parameter its block's value for every key.

    ``specs`` maps parameter names to block specs. With ``method`` (a MergeMethod) the names and ranges are checked.
    """
    tables: Dict[str, Dict[str, float]] = {}
    known = {p.name: p for p in method.params} if method is not None else {}
    for param, spec in specs.items():
        values = parse_blocks(spec, arch_id)
        if method is not None:
            p = known.get(param)
            if p is None:
                raise ManifestError(f"method {method.name!r} has no parameter {param!r}; it takes: {', '.join(known) or 'none'}")
            if not p.per_block:
                raise ManifestError(f"parameter {param!r} of {method.name!r} cannot be given per block")
            check_range(values, p.min, p.max, param)
        tables[param] = values
    cache: Dict[str, Optional[str]] = {}

    def hook(key: str) -> Dict[str, float]:
        block = cache.get(key, "")
        if block == "":
            block = cache[key] = _block_of(arch_id, key)
        if block is None:
            return {}
        return {param: t[block] for param, t in tables.items() if block in t}

    return hook


def split_block_params(params: Mapping[str, object], method, arch_id: str):
    """Separate per-block values (lists, dicts, strings) from plain numbers in a method's parameters.

    Returns ``(scalar_params, hook_or_None)``; a per-block parameter's global value becomes its default (used for
    keys outside every block).
    """
    scalar: Dict[str, object] = {}
    specs: Dict[str, Spec] = {}
    defaults = method.default_params()
    for k, v in params.items():
        if isinstance(v, (list, tuple, dict, str)):
            specs[k] = v
            scalar[k] = defaults.get(k, 0.0)
        else:
            scalar[k] = v
    if not specs:
        return scalar, None
    return scalar, key_params_hook(arch_id, specs, method)


def chain_hooks(*hooks: Optional[Callable[[str], Dict[str, float]]]):
    """One key_params hook from several (later ones win)."""
    hs = [h for h in hooks if h is not None]
    if not hs:
        return None
    if len(hs) == 1:
        return hs[0]

    def hook(key: str) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for h in hs:
            out.update(h(key) or {})
        return out

    return hook

"""Small real checkpoints in the key layouts users have (issue 12 item 7), built from the reference layouts.

``shared_keys(name)`` reads the key list of ``../shared/layouts/<name>.json`` (skipping the test when it is absent);
``tiny(keys)`` gives every key a small shape (at most ``side`` per axis, the same shape for the same key in every
file), so merges are fast while the key names are exactly the released ones. ``write_values`` writes a file with
deterministic random values and returns them, so a test can merge the renamed tensors by hand.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import pytest
from safetensors.numpy import save_file

LAYOUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "layouts")
UNET = "model.diffusion_model."


def shared_doc(name: str) -> dict:
    path = os.path.join(LAYOUT_DIR, name + ".json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (../shared is optional)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shared_keys(name: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """key -> (dtype, shape) of a reference layout."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in shared_doc(name)["tensors"].items()}


def tiny(spec: Mapping[str, Tuple[str, Tuple[int, ...]]], side: int = 3) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """The same keys with every axis cut to at most ``side`` (float dtypes as F16; integer keys kept)."""
    out = {}
    for k, (dt, shape) in spec.items():
        dt = "F16" if dt in ("F16", "BF16", "F32") else dt
        out[k] = (dt, tuple(min(s, side) for s in shape))
    return out


def rename(spec: Mapping, fn: Callable[[str], Optional[str]]) -> Dict:
    """``spec`` with each key renamed by ``fn`` (None drops the key)."""
    out = {}
    for k, v in spec.items():
        n = fn(k)
        if n is not None:
            out[n] = v
    return out


def only(spec: Mapping, prefixes: Iterable[str]) -> Dict:
    prefixes = tuple(prefixes)
    return {k: v for k, v in spec.items() if k.startswith(prefixes)}


def write_values(path, spec: Mapping[str, Tuple[str, Tuple[int, ...]]], seed: int) -> Dict[str, np.ndarray]:
    """Write ``spec`` with deterministic values (seeded per key name's position); returns {key: array}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k in sorted(spec):
        dt, shape = spec[k]
        if dt == "F16":
            arrays[k] = rng.standard_normal(shape).astype(np.float16)
        elif dt == "F32":
            arrays[k] = rng.standard_normal(shape).astype(np.float32)
        elif dt == "I64":
            arrays[k] = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        else:
            raise ValueError(f"{k}: dtype {dt} not supported here")
    save_file(arrays, os.fspath(path))
    return arrays

"""Synthetic safetensors files for tests and benchmarks: real headers, zero data that takes no disk space.

``write_sparse(path, spec)`` writes the header and then extends the file to its full size with ``truncate``, so a
7 GB SDXL layout costs a few hundred kilobytes of disk (on file systems with sparse files). ``layout_from_fingerprint``
builds a key layout from the compact fingerprint data alone (identifying keys, numbered blocks, one filler tensor
per component with the expected parameter count), so detection can be tested without the full layouts.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional, Tuple

from merger_core.io.safetensors import DTYPE_SIZES
from merger_core.io.writer import OutTensor, build_header
from merger_core.arch.fingerprints import UNET_PREFIX, get_fingerprint

Spec = Dict[str, Tuple[str, Tuple[int, ...]]]  # key -> (dtype, shape)


def layout_from_json(doc: Mapping, dtype: Optional[str] = None) -> Spec:
    """A full layout document (``shared/layouts/*.json``) -> Spec."""
    return {k: (dtype or v["dtype"] if v["dtype"] in ("F16", "BF16", "F32") else v["dtype"], tuple(v["shape"]))
            for k, v in doc["tensors"].items()}


def layout_from_fingerprint(arch_id: str, dtype: str = "F16", prefix: str = UNET_PREFIX,
                            components: Optional[list] = None) -> Spec:
    """Key layout with the fingerprint's identifying keys, block counts and component sizes."""
    fp = get_fingerprint(arch_id)
    spec: Spec = {}
    for rel, shape in fp.signature.items():
        spec[prefix + rel] = (dtype, tuple(shape))
    for block, n in fp.counts.items():
        for i in range(n):
            key = f"{prefix}{block}{i}.synthetic.bias"
            if not any(k.startswith(f"{prefix}{block}{i}.") for k in spec):
                spec[key] = (dtype, (8,))
    used = sum(math.prod(s) for _, s in spec.values())
    unet = fp.components["unet"]
    if unet.params and unet.params > used:
        spec[prefix + "synthetic_filler.weight"] = (dtype, (unet.params - used,))
    for name, c in fp.components.items():
        if name == "unet" or (components is not None and name not in components):
            continue
        if components is None and not c.required:
            continue
        n = c.params or 1000
        spec[c.prefixes[0] + "synthetic_filler.weight"] = (dtype, (n,))
    return spec


def write_sparse(path: str | os.PathLike, spec: Spec, metadata: Optional[Mapping[str, str]] = None,
                 values: Optional[Mapping[str, bytes]] = None) -> int:
    """Write a safetensors file whose data is zero (sparse). ``values`` gives raw bytes for some tensors.

    Returns the file size.
    """
    outs = [OutTensor(k, d, tuple(s)) for k, (d, s) in spec.items()]
    blob, offsets, _ = build_header(outs, dict(metadata or {}))
    total = len(blob) + sum(o.nbytes for o in outs)
    with open(path, "wb") as f:
        f.write(blob)
        for k, raw in (values or {}).items():
            b, e = offsets[k]
            if len(raw) != e - b:
                raise ValueError(f"{k}: {len(raw)} bytes given, {e - b} needed")
            f.seek(len(blob) + b)
            f.write(raw)
        f.truncate(total)
    return total


def spec_nbytes(spec: Spec) -> int:
    return sum(math.prod(s) * DTYPE_SIZES[d] for d, s in spec.values())

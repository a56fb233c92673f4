"""Lineage: which base model a fine-tune most likely comes from.

``rank_bases(model, bases)`` reads the same deterministic sample of tensors (a slice of at most
``max_elements`` elements from each of ``sample`` keys spread over the diffusion model) from the model and each
candidate base and ranks the bases by the relative L2 distance ``‖model − base‖ / ‖model‖`` over that sample:
the true base has the smallest delta. It reads a few megabytes per file, not the whole file.
The registry of the user's bases is :mod:`merger_core.identity.bases`.
"""

from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import BadFileError, MergeCancelled
from ..io.safetensors import read_header
from .detect import detect_header
from .diff import Distance, _open


def _sample_keys(header, prefix: str, sample: int) -> List[str]:
    """Deterministic spread of large float keys of the diffusion model (falls back to all keys)."""
    keys = sorted(k for k, t in header.tensors.items() if t.is_float and t.numel >= 4096 and k.startswith(prefix))
    if not keys:
        keys = sorted(k for k, t in header.tensors.items() if t.is_float and t.numel > 0)
    if len(keys) <= sample:
        return keys
    step = len(keys) / sample
    return [keys[int(i * step)] for i in range(sample)]


def _read_rows(handle, key: str, shape, max_elements: int):
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
    take = max(1, min(rows, max_elements // per_row)) if len(shape) >= 1 else 1
    if not shape:
        return handle.get_tensor(key)
    return handle.get_slice(key)[0:take]


def rank_bases(
    model_path: str | os.PathLike,
    base_paths: Sequence[str | os.PathLike],
    sample: int = 48,
    max_elements: int = 1 << 16,
    progress: Optional[Callable[[int, int, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> List[Tuple[str, float, List[str]]]:
    """Rank candidate bases for ``model_path``: [(base path, score, evidence)], best (smallest score) first.

    score = relative L2 distance of the model from the base over the sampled slices (``inf`` when the base is
    not comparable: another family, or no sampled key in common).
    """
    import torch

    model_path = os.fspath(model_path)
    hm = read_header(model_path)
    dm = detect_header(hm, read_probe=False)
    prefix = dm.unet_prefix if dm.known and dm.unet_prefix is not None else ""
    keys = _sample_keys(hm, prefix, sample)
    results = []
    cache = {}
    with _open(model_path) as fm:
        for k in keys:
            cache[k] = _read_rows(fm, k, hm.tensors[k].shape, max_elements).to(torch.float32).reshape(-1)
    for n, bp in enumerate(base_paths):
        bp = os.fspath(bp)
        if cancel is not None and cancel():
            raise MergeCancelled("lineage ranking cancelled")
        evidence: List[str] = []
        try:
            hb = read_header(bp)
        except BadFileError as exc:
            results.append((bp, math.inf, [str(exc)]))
            continue
        db = detect_header(hb, read_probe=False)
        if dm.known and db.known and dm.family != db.family:
            results.append((bp, math.inf, [f"not comparable: the model is {dm.arch_name}, the base is {db.arch_name}"]))
            continue
        pb = db.unet_prefix if db.known and db.unet_prefix is not None else prefix
        tot = Distance()
        used = 0
        with _open(bp) as fb:
            for k in keys:
                kb = pb + k[len(prefix):] if k.startswith(prefix) else k
                tb_info = hb.tensors.get(kb)
                if tb_info is None or tb_info.shape != hm.tensors[k].shape or not tb_info.is_float:
                    continue
                tb = _read_rows(fb, kb, tb_info.shape, max_elements).to(torch.float32).reshape(-1)
                a = cache[k]
                tot.sq_a += float(torch.dot(a, a))
                tot.sq_b += float(torch.dot(tb, tb))
                tot.dot += float(torch.dot(a, tb))
                dlt = a - tb
                tot.sq_diff += float(torch.dot(dlt, dlt))
                tot.params += a.numel()
                used += 1
        if used == 0:
            results.append((bp, math.inf, ["not comparable: none of the sampled keys exists with the same shape"]))
            continue
        evidence.append(f"{used} of {len(keys)} sampled tensors compared ({tot.params:,} values)")
        evidence.append(f"relative L2 of model - base: {tot.rel_l2:.4f}; cosine {tot.cosine:.5f}")
        results.append((bp, tot.rel_l2, evidence))
        if progress is not None:
            progress(n + 1, len(base_paths), bp)
    results.sort(key=lambda r: r[1])
    return results

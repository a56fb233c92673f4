"""Lineage: which base model a fine-tune most likely comes from, and a registry of the user's base models.

``rank_bases(model, bases)`` reads the same deterministic sample of tensors (a slice of at most
``max_elements`` elements from each of ``sample`` keys spread over the diffusion model) from the model and each
candidate base and ranks the bases by the relative L2 distance ``‖model − base‖ / ‖model‖`` over that sample:
the true base has the smallest delta. It reads a few megabytes per file, not the whole file.

The registry (``register_base``, ``list_bases``, ``remove_base``) is a JSON file beside the hash cache
(``bases.json`` in :func:`merger_core.userdirs.data_dir`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import BadFileError, MergeCancelled, ModelMergerError
from ..safetensors_io import read_header
from .detect import detect, detect_header
from .diff import Distance, _open

REGISTRY_NAME = "bases.json"


@dataclass
class BaseEntry:
    name: str
    path: str
    arch_id: str
    family: str
    file_size: int
    added: float

    @property
    def exists(self) -> bool:
        return os.path.isfile(self.path)


def _registry_path() -> str:
    from ..userdirs import data_dir

    return os.path.join(data_dir(), REGISTRY_NAME)


def _load(path: Optional[str] = None) -> List[BaseEntry]:
    path = path or _registry_path()
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return [BaseEntry(**e) for e in doc.get("bases", [])]
    except (OSError, ValueError, TypeError) as exc:
        raise ModelMergerError(f"the base-model registry {path} cannot be read ({exc}); fix or delete it") from None


def _save(entries: List[BaseEntry], path: Optional[str] = None) -> None:
    path = path or _registry_path()
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".bases.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "bases": [asdict(e) for e in entries]}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def register_base(path: str | os.PathLike, name: Optional[str] = None, registry: Optional[str] = None) -> BaseEntry:
    """Add (or update, by name) a base model. The file must be a recognised architecture."""
    path = os.path.abspath(os.fspath(path))
    det = detect(path, read_probe=False)
    if not det.known:
        raise BadFileError(f"{os.path.basename(path)}: not a recognised architecture, so it cannot be a base ({det.refusal})")
    name = (name or os.path.splitext(os.path.basename(path))[0]).strip()
    if not name:
        raise ModelMergerError("a base model needs a non-empty name")
    entry = BaseEntry(name=name, path=path, arch_id=det.arch_id, family=det.family, file_size=det.file_size, added=time.time())
    entries = [e for e in _load(registry) if e.name != name]
    entries.append(entry)
    entries.sort(key=lambda e: (e.family, e.name.lower()))
    _save(entries, registry)
    return entry


def list_bases(family: Optional[str] = None, registry: Optional[str] = None) -> List[BaseEntry]:
    """Registered bases, optionally only one family (``"sdxl"``, ``"sd1"``...)."""
    return [e for e in _load(registry) if family is None or e.family == family]


def remove_base(name: str, registry: Optional[str] = None) -> bool:
    entries = _load(registry)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        return False
    _save(kept, registry)
    return True


# ---------------------------------------------------------------------------------------------------------------


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

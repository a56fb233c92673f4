"""Model diff: how far two compatible models are apart, per block and per component, streamed key by key.

``diff_models(a, b)`` opens both files with ``safetensors.safe_open`` (memory-mapped), walks the common
floating-point keys in file order and accumulates, in fp32 chunks of at most ``CHUNK`` elements, the sums
Σ(a-b)², Σa², Σb² and Σab per key, per block (the architecture's block map) and per component. Memory stays at a
few chunk buffers whatever the model size. From those sums:

* relative L2 distance ``‖a − b‖ / ‖a‖`` (0 = identical; 1 = the difference is as large as A itself);
* cosine similarity ``Σab / (‖a‖ ‖b‖)`` (1 = same direction).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import IncompatibleModelsError, MergeCancelled
from ..io.safetensors import read_header
from .blocks import block_of
from .detect import Detection, detect_header
from .fingerprints import get_fingerprint

CHUNK = 1 << 22  # elements per fp32 chunk (16 MiB)

ProgressFn = Callable[[int, int, str], None]  # (keys done, keys total, current key)
CancelFn = Callable[[], bool]


@dataclass
class Distance:
    """Accumulated sums over a set of tensors, and the metrics derived from them."""

    keys: int = 0
    params: int = 0
    sq_diff: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0

    def add(self, other: "Distance") -> None:
        self.keys += other.keys
        self.params += other.params
        self.sq_diff += other.sq_diff
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.dot += other.dot

    @property
    def rel_l2(self) -> float:
        if self.sq_a == 0:
            return 0.0 if self.sq_diff == 0 else math.inf
        return math.sqrt(self.sq_diff / self.sq_a)

    @property
    def cosine(self) -> float:
        if self.sq_a == 0 or self.sq_b == 0:
            return 1.0 if self.sq_a == self.sq_b else 0.0
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.sq_a * self.sq_b)))

    def summary(self) -> dict:
        return {"keys": self.keys, "params": self.params, "rel_l2": self.rel_l2, "cosine": self.cosine}


@dataclass
class DiffReport:
    a: str
    b: str
    arch_id: str
    blocks: Dict[str, Distance] = field(default_factory=dict)  # in block order
    components: Dict[str, Distance] = field(default_factory=dict)
    total: Distance = field(default_factory=Distance)
    top_keys: List[Tuple[str, float]] = field(default_factory=list)  # largest relative change first
    identical_keys: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> count

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "arch_id": self.arch_id,
            "total": self.total.summary(),
            "blocks": {k: v.summary() for k, v in self.blocks.items()},
            "components": {k: v.summary() for k, v in self.components.items()},
            "top_keys": [{"key": k, "rel_l2": r} for k, r in self.top_keys],
            "identical_keys": self.identical_keys,
            "skipped": dict(self.skipped),
        }


def tensor_sums(ta, tb, chunk: int = CHUNK) -> Distance:
    """Σ(a-b)², Σa², Σb², Σab of two same-shape tensors, computed in fp32 chunks (sums in float64)."""
    import torch

    fa = ta.reshape(-1)
    fb = tb.reshape(-1)
    d = Distance(keys=1, params=fa.numel())
    n = fa.numel()
    for s in range(0, n, chunk):
        a = fa[s:s + chunk].to(torch.float32)
        b = fb[s:s + chunk].to(torch.float32)
        d.sq_a += float(torch.dot(a, a))
        d.sq_b += float(torch.dot(b, b))
        d.dot += float(torch.dot(a, b))
        diff = a - b  # never in place: for fp32 inputs ``a`` is the caller's tensor, not a copy
        d.sq_diff += float(torch.dot(diff, diff))
    return d


def _open(path):
    from safetensors import safe_open

    return safe_open(path, framework="pt", device="cpu")


def diff_models(
    a: str | os.PathLike,
    b: str | os.PathLike,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    top: int = 10,
    arch: Optional[str] = None,
) -> DiffReport:
    """Compare two models key by key. Raises IncompatibleModelsError when they share no comparable key.

    ``arch`` forces the block map (an architecture id) when detection cannot tell it (small or pruned files).
    """
    a, b = os.fspath(a), os.fspath(b)
    ha, hb = read_header(a), read_header(b)
    da, db = detect_header(ha, read_probe=False), detect_header(hb, read_probe=False)
    arch = arch or (da.arch_id if da.known else db.arch_id)
    if da.known and db.known and da.family != db.family:
        raise IncompatibleModelsError(
            f"{os.path.basename(a)} is {da.arch_name} and {os.path.basename(b)} is {db.arch_name}: "
            "models of different families cannot be compared key by key"
        )
    rep = DiffReport(a=os.path.basename(a), b=os.path.basename(b), arch_id=arch)
    fp = get_fingerprint(arch) if arch != "unknown" else None
    if fp is not None:
        for name in fp.blocks:
            rep.blocks[name] = Distance()
    # compare by the name inside the diffusion model when the prefixes differ (UNet-only file vs checkpoint)
    map_b = _key_map(ha, da, hb, db)
    jobs = []
    for k, ta in ha.tensors.items():
        kb = map_b.get(k)
        if kb is None:
            rep.skipped["only in A"] = rep.skipped.get("only in A", 0) + 1
            continue
        tb = hb.tensors[kb]
        if not ta.is_float or not tb.is_float or ta.numel == 0:
            rep.skipped["not floating point / empty"] = rep.skipped.get("not floating point / empty", 0) + 1
            continue
        if ta.shape != tb.shape:
            rep.skipped["shape differs"] = rep.skipped.get("shape differs", 0) + 1
            continue
        jobs.append((ta.begin, k, kb))
    only_b = len(hb.tensors) - len(set(map_b.values()))
    if only_b:
        rep.skipped["only in B"] = only_b
    if not jobs:
        raise IncompatibleModelsError(f"{rep.a} and {rep.b} have no floating-point key in common with the same shape")
    jobs.sort()
    per_key: List[Tuple[float, str]] = []
    with _open(a) as fa, _open(b) as fb:
        for n, (_, k, kb) in enumerate(jobs):
            if cancel is not None and cancel():
                raise MergeCancelled("diff cancelled")
            d = tensor_sums(fa.get_tensor(k), fb.get_tensor(kb))
            if d.sq_diff == 0:
                rep.identical_keys += 1
            rep.total.add(d)
            comp = _component(fp, da, k)
            rep.components.setdefault(comp, Distance()).add(d)
            if fp is not None:
                blk = block_of(arch, k) if da.unet_prefix in ("model.diffusion_model.", "", None) else _block_renamed(arch, da, k)
                if blk is not None:
                    rep.blocks.setdefault(blk, Distance()).add(d)
            per_key.append((d.rel_l2, k))
            if progress is not None:
                progress(n + 1, len(jobs), k)
    rep.blocks = {k: v for k, v in rep.blocks.items() if v.keys}
    per_key.sort(reverse=True)
    rep.top_keys = [(k, r) for r, k in per_key[:top] if r > 0]
    return rep


def _block_renamed(arch, det: Detection, key: str):
    p = det.unet_prefix or ""
    if key.startswith(p):
        return block_of(arch, "model.diffusion_model." + key[len(p):])
    return block_of(arch, key)


def _component(fp, det: Detection, key: str) -> str:
    if fp is None:
        return "all"
    return fp.component_of(key, det.unet_prefix or "") or "other"


def _key_map(ha, da: Detection, hb, db: Detection) -> Dict[str, str]:
    """key in A -> key in B, matching diffusion-model keys across different prefixes."""
    out = {k: k for k in ha.tensors if k in hb.tensors}
    pa, pb = da.unet_prefix, db.unet_prefix
    if da.known and db.known and pa is not None and pb is not None and pa != pb:
        fp = get_fingerprint(da.arch_id)
        for k in ha.tensors:
            if fp.component_of(k, pa) == "unet" and k.startswith(pa):
                kb = pb + k[len(pa):]
                if kb in hb.tensors:
                    out[k] = kb
    return out

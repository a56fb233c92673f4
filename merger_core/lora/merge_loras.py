"""Merging LoRAs: the weighted sum of their deltas per module, re-factorised to rank R by the extractor's SVD.

Two ways to line the modules up:

* with ``checkpoint`` (a model of the LoRAs' architecture; only its header is read): every LoRA is mapped to the
  checkpoint's keys through the key map, as for baking, so LoRAs of different namings (kohya, PEFT, LyCORIS) merge;
  modules that match no key are reported. The output uses kohya names.
* without it: modules are lined up by name (the LoRAs must use one naming, as kohya's ``merge_lora.py`` assumes),
  and keep their names.

Each output module costs one module's full delta in fp32 plus its SVD; the factors are spilled and written as in
:mod:`.extract`.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import IncompatibleModelsError, MergeCancelled
from ..io.safetensors import read_header
from .delta import ARCH_LABELS, LoraReport, ModuleDelta, lora_deltas
from .extract import ExtractProgress, ExtractResult, LoraExtractor, check_settings
from .formats import KEYMAP_ARCH, SUPPORTED, LoraError, read_lora
from .keymap import arch_of_checkpoint

LORA_TO_KEYMAP = {v: k for k, v in KEYMAP_ARCH.items()}


def merge_loras(loras: Sequence[Tuple[str, float]], rank: int, out_path: str, conv_rank: Optional[int] = None,
                energy: Optional[float] = None, dtype: str = "fp16", overwrite: bool = False,
                checkpoint: Optional[str] = None, progress: Optional[Callable] = None,
                cancel: Optional[Callable[[], bool]] = None) -> Tuple[ExtractResult, Optional[LoraReport]]:
    """Write ``sum_i weight_i * delta_i`` of ``loras = [(path, weight)]`` as one LoRA of rank ``rank`` (3x3 convs:
    ``conv_rank``, default ``rank``; or the smallest rank keeping ``energy``). Returns (result, report or None)."""
    check_settings(rank, conv_rank, energy, dtype)
    if not loras:
        raise LoraError("no LoRAs to merge")
    conv_rank = conv_rank if conv_rank is not None else rank
    files = [read_lora(p) for p, _ in loras]
    archs = {lf.arch for lf in files if lf.arch is not None}
    if len(archs) > 1:
        raise IncompatibleModelsError(
            "the LoRAs are for different architectures: "
            + ", ".join(f"{lf.name} {ARCH_LABELS.get(lf.arch, '?')}" for lf in files))
    t0 = time.monotonic()
    import torch

    if checkpoint is not None:
        h = read_header(checkpoint)
        shapes = {k: t.shape for k, t in h.tensors.items()}
        key_delta, report = lora_deltas(shapes, [(p, float(w), float(w)) for p, w in loras])
        ex = LoraExtractor(out_path, shapes, rank, conv_rank, energy, dtype, overwrite,
                           metadata={"ss_sd_model_name": os.path.basename(checkpoint)})
        try:
            keys = sorted(report.keys)
            for i, k in enumerate(keys):
                _check_cancel(cancel)
                v = torch.zeros(int(torch.Size(shapes[k]).numel()), dtype=torch.float32)
                kd = key_delta(k)
                kd.add_to(v, 0)
                kd.release()
                if k not in ex.modules:  # a key a kohya LoRA cannot name (a transposed text projection)
                    continue
                ex.add_key(k, v.reshape(shapes[k]))
                if progress is not None:
                    progress(ExtractProgress(i + 1, len(keys), i + 1, len(keys), k, time.monotonic() - t0))
            _check_cancel(cancel)
            res = ex.finish()
        finally:
            ex.close()
        res.seconds = time.monotonic() - t0
        return res, report

    arch = LORA_TO_KEYMAP.get(next(iter(archs)) if archs else "", "sd15")
    groups: Dict[str, List[Tuple[ModuleDelta, float]]] = {}
    for lf, (_, w) in zip(files, loras):
        for name, m in sorted(lf.modules.items()):
            if m.format not in SUPPORTED or m.dora:
                raise LoraError(f"{lf.name}: module {name!r} ({'DoRA' if m.dora else m.format}) cannot be merged here")
            groups.setdefault(name, []).append((ModuleDelta(lf, m), float(w)))
        if lf.unknown:
            raise LoraError(f"{lf.name}: tensors of no known LoRA kind: {', '.join(lf.unknown[:6])}")
    ex = LoraExtractor(out_path, [], rank, conv_rank, energy, dtype, overwrite, arch=arch)
    try:
        names = sorted(groups)
        for i, name in enumerate(names):
            _check_cancel(cancel)
            shapes = {tuple(md.shape) for md, _ in groups[name]}
            if len(shapes) > 1:
                raise IncompatibleModelsError(f"module {name!r} has different shapes in the LoRAs: {sorted(shapes)}")
            shape = shapes.pop()
            total = None
            for md, w in groups[name]:
                f = md.load("cpu")
                d = md.full(f).reshape(shape) * (w * md.scale(f))
                total = d if total is None else total.add_(d)
            if len(shape) in (2, 4):
                ex.add_module(name, name, total)
            if progress is not None:
                progress(ExtractProgress(i + 1, len(names), i + 1, len(names), name, time.monotonic() - t0))
        _check_cancel(cancel)
        res = ex.finish()
    finally:
        ex.close()
    res.seconds = time.monotonic() - t0
    return res, None


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise MergeCancelled("LoRA merge cancelled; no output was written")

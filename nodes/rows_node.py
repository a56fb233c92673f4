"""Merge Models: one node with a list of model rows (checkpoint, weight, on/off) instead of a chain of nodes, plus
LoRA rows (LoRA file, strength_model, strength_clip, on/off) baked into the merge.

The rows are one STRING input, ``models``, holding JSON: ``[{"ckpt": "a.safetensors", "weight": 1.0, "on": true},
{"lora": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0, "on": true}, ...]``: a row with
``ckpt`` is a model, a row with ``lora`` a LoRA (workflows saved before LoRA rows existed hold model rows only, and
load as they are). The browser shows it as rows with "add model" and "add LoRA" buttons (web/js/logic/rows.mjs); the
workflow and the API-format prompt store the same JSON string, so it survives reload, copy-paste and undo like any
widget value, and a script can write it by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import List, NamedTuple, Tuple

from ..merger_core import manifest as mf
from ..merger_core.errors import ManifestError
from ..merger_core.manifest.model import LoraEntry
from ..merger_core.merge.plan import plan_from_manifest
from . import _host as host
from .manifest_nodes import check_manifest_paths, describe_manifest, lora_names, strength_problem
from .merge_node import (
    COMMON_OUTPUT_TOOLTIPS,
    COMMON_RETURN_NAMES,
    COMMON_RETURN_TYPES,
    MergeEvent,
    common_inputs,
    optional_inputs,
    run_plan,
    thread_count,
    validate_prefix,
)

EXAMPLE = '[{"ckpt": "a.safetensors", "weight": 1.0, "on": true}, {"ckpt": "b.safetensors", "weight": 0.5, "on": true}]'
LORA_EXAMPLE = '{"lora": "style.safetensors", "strength_model": 1.0, "strength_clip": 1.0, "on": true}'


class LoraRow(NamedTuple):
    name: str
    strength_model: float
    strength_clip: float
    on: bool


def parse_all_rows(text) -> Tuple[List[Tuple[str, float, bool]], List[LoraRow]]:
    """(model rows as (checkpoint name, weight, on), LoRA rows). Errors name the row: ``row N`` is the N-th model
    row, ``LoRA row N`` the N-th LoRA row (1-based, as the node shows them), then the field."""
    try:
        data = json.loads(text if isinstance(text, str) and text.strip() else "[]")
    except ValueError as exc:
        raise ManifestError(f"models: not valid JSON ({exc}); expected {EXAMPLE}") from None
    if not isinstance(data, list):
        raise ManifestError(f"models: expected a list of rows like {EXAMPLE}")
    models, loras = [], []
    for row in data:
        if isinstance(row, dict) and "lora" in row and "ckpt" not in row:
            loras.append(_lora_row(len(loras) + 1, row))
            continue
        i = len(models) + 1
        if not isinstance(row, dict):
            raise ManifestError(f"models: row {i} is not an object with ckpt, weight and on")
        if "lora" in row:
            raise ManifestError(f"models: row {i} has both ckpt and lora; a row is a model or a LoRA")
        name = row.get("ckpt")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"models: row {i} has no checkpoint (ckpt)")
        w = row.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ManifestError(f"models: row {i} ({name}): weight {w!r} must be a finite number >= 0")
        on = row.get("on", True)
        if not isinstance(on, bool):
            raise ManifestError(f"models: row {i} ({name}): on must be true or false")
        models.append((name, float(w), on))
    return models, loras


def _lora_row(i: int, row: dict) -> LoraRow:
    name = row.get("lora")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"models: LoRA row {i} has no LoRA file (lora)")
    strengths = []
    for fld in ("strength_model", "strength_clip"):
        v = row.get(fld, 1.0)
        problem = strength_problem(fld, v)
        if problem:
            raise ManifestError(f"models: LoRA row {i} ({name}): {problem}")
        strengths.append(float(v))
    on = row.get("on", True)
    if not isinstance(on, bool):
        raise ManifestError(f"models: LoRA row {i} ({name}): on must be true or false")
    return LoraRow(name, strengths[0], strengths[1], on)


def parse_rows(text) -> List[Tuple[str, float, bool]]:
    """(checkpoint name, weight, on) per model row (LoRA rows are checked and left out: see parse_all_rows)."""
    return parse_all_rows(text)[0]


def _lora_file(name: str):
    try:
        return host.folder_paths.get_full_path("loras", name)
    except KeyError:  # a host without a loras folder kind
        return None


def rows_manifest(text, normalize: bool = True) -> "mf.Manifest":
    """The manifest of the rows that are on (a weight of 0 counts as off; a LoRA with both strengths 0 too), with
    the files found and checked."""
    model_rows, lora_rows = parse_all_rows(text)
    entries = []
    for i, (name, w, on) in enumerate(model_rows, 1):
        if not on or w == 0:
            continue
        path = host.folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise ManifestError(f"models: row {i}: checkpoint {name!r} is not in ComfyUI's checkpoint folders")
        entries.append(mf.ManifestEntry(path=path, weight=w))
    if len(entries) < 2:
        raise ManifestError(f"models: {len(entries)} row(s) on; a merge needs at least two (add a model, or switch "
                            "a row on)")
    loras, seen = [], {}
    for i, r in enumerate(lora_rows, 1):
        if not r.on or (r.strength_model == 0 and r.strength_clip == 0):
            continue
        if not r.name.lower().endswith(".safetensors"):
            raise ManifestError(f"models: LoRA row {i}: {r.name!r} is not a .safetensors file (other formats can run "
                                "code when loaded)")
        path = _lora_file(r.name)
        if path is None:
            raise ManifestError(f"models: LoRA row {i}: LoRA {r.name!r} is not in ComfyUI's loras folders")
        if r.name in seen:
            raise ManifestError(f"models: LoRA row {i}: {r.name!r} is already LoRA row {seen[r.name]}; give one row "
                                "the sum of the strengths instead")
        seen[r.name] = i
        loras.append(LoraEntry(path=path, strength_model=r.strength_model, strength_clip=r.strength_clip))
    m = mf.Manifest(models=entries, normalize=bool(normalize), loras=loras)
    check_manifest_paths(m)
    return m


class MergeModels:
    DESCRIPTION = (
        "Merge checkpoints listed as rows on this node: each row a checkpoint, a weight and an on/off switch; "
        "'+ Add model' adds a row. '+ Add LoRA' adds a LoRA row (a LoRA file, its model and clip strengths, on/off) "
        "baked into the merge in the same pass. Weighted sum, key by key with bounded memory, into the graph, to a "
        "file, or both. Also outputs the manifest (for Save Manifest or the other merge nodes)."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = COMMON_RETURN_TYPES + (host.MANIFEST_TYPE,)
    RETURN_NAMES = COMMON_RETURN_NAMES + ("manifest",)
    OUTPUT_TOOLTIPS = COMMON_OUTPUT_TOOLTIPS + ("The rows that are on (models and LoRAs), as a manifest.",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "models": ("STRING", {
                "default": "[]",
                # the rows' checkpoint list, for the browser (web/js/rows.js); not a ComfyUI option
                "model_merger_checkpoints": host.checkpoint_names(),
                "model_merger_loras": lora_names(),
                "tooltip": "The model rows, as JSON: " + EXAMPLE + ", plus LoRA rows like " + LORA_EXAMPLE + ". The "
                           "node shows them as rows with a checkpoint (or LoRA) list, a weight (or the two "
                           "strengths) and an on/off switch; rows that are off (or weight 0) are left out.",
            }),
            "normalize": ("BOOLEAN", {
                "default": True,
                "tooltip": "Divide the weights by their sum (1, 1, 2 means 25%, 25%, 50%). Off: the weights are used "
                           "as given.",
            }),
        }
        req.update(common_inputs())
        return {"required": req, "optional": optional_inputs(), "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, models=None, filename_prefix=None):
        if models is not None:
            try:
                rows_manifest(models)
            except Exception as exc:
                return str(exc)
        return validate_prefix(filename_prefix)

    @classmethod
    def IS_CHANGED(cls, models="[]", normalize=True, **_inputs):
        """The rows' files' size and mtime, LoRAs included (the rows themselves are in the cache key anyway)."""
        try:
            model_rows, lora_rows = parse_all_rows(models)
            paths = [host.folder_paths.get_full_path("checkpoints", n) or n for n, w, on in model_rows if on and w]
            paths += [_lora_file(r.name) or r.name for r in lora_rows
                      if r.on and (r.strength_model or r.strength_clip)]
            return hashlib.sha256(repr(host.file_signature(paths)).encode()).hexdigest()
        except Exception as exc:
            return f"error: {exc}"

    def merge(self, models, normalize, device, dtype, output_mode, filename_prefix, threads=0, unique_id=None):
        with MergeEvent("Model Merger: merge models", unique_id) as ev:
            m = rows_manifest(models, normalize)
            plan = plan_from_manifest(m, device=device, dtype=dtype)
            plan.threads = thread_count(threads)
            out = run_plan(plan, node_id=unique_id, output_mode=output_mode, filename_prefix=filename_prefix,
                           title=f"Model Merger: merge of {len(plan.inputs)} models (rows)"
                           + (f" with {len(m.loras)} LoRA(s) baked in" if m.loras else ""), event=ev)
            return out + (m,)


__all__ = ["MergeModels", "parse_rows", "parse_all_rows", "rows_manifest", "describe_manifest"]

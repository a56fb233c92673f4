"""Merge Models: one node with a list of model rows (checkpoint, weight, on/off) instead of a chain of nodes.

The rows are one STRING input, ``models``, holding JSON: ``[{"ckpt": "a.safetensors", "weight": 1.0, "on": true},
...]``. The browser shows it as rows with an "add model" button (web/js/logic/rows.mjs); the workflow and the
API-format prompt store the same JSON string, so it survives reload, copy-paste and undo like any widget value,
and a script can write it by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import List, Tuple

from ..merger_core import manifest as mf
from ..merger_core.errors import ManifestError
from ..merger_core.merge.plan import plan_from_manifest
from . import _host as host
from .manifest_nodes import check_manifest_paths, describe_manifest
from .merge_node import (
    COMMON_OUTPUT_TOOLTIPS,
    COMMON_RETURN_NAMES,
    COMMON_RETURN_TYPES,
    MergeEvent,
    common_inputs,
    run_plan,
    validate_prefix,
)

EXAMPLE = '[{"ckpt": "a.safetensors", "weight": 1.0, "on": true}, {"ckpt": "b.safetensors", "weight": 0.5, "on": true}]'


def parse_rows(text) -> List[Tuple[str, float, bool]]:
    """(checkpoint name, weight, on) per row; errors name the row (1-based) and the field."""
    try:
        data = json.loads(text if isinstance(text, str) and text.strip() else "[]")
    except ValueError as exc:
        raise ManifestError(f"models: not valid JSON ({exc}); expected {EXAMPLE}") from None
    if not isinstance(data, list):
        raise ManifestError(f"models: expected a list of rows like {EXAMPLE}")
    out = []
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise ManifestError(f"models: row {i} is not an object with ckpt, weight and on")
        name = row.get("ckpt")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"models: row {i} has no checkpoint (ckpt)")
        w = row.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ManifestError(f"models: row {i} ({name}): weight {w!r} must be a finite number >= 0")
        on = row.get("on", True)
        if not isinstance(on, bool):
            raise ManifestError(f"models: row {i} ({name}): on must be true or false")
        out.append((name, float(w), on))
    return out


def rows_manifest(text, normalize: bool = True) -> "mf.Manifest":
    """The manifest of the rows that are on (a weight of 0 counts as off), with the files found and checked."""
    entries = []
    for i, (name, w, on) in enumerate(parse_rows(text), 1):
        if not on or w == 0:
            continue
        path = host.folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise ManifestError(f"models: row {i}: checkpoint {name!r} is not in ComfyUI's checkpoint folders")
        entries.append(mf.ManifestEntry(path=path, weight=w))
    if len(entries) < 2:
        raise ManifestError(f"models: {len(entries)} row(s) on; a merge needs at least two (add a model, or switch "
                            "a row on)")
    m = mf.Manifest(models=entries, normalize=bool(normalize))
    check_manifest_paths(m)
    return m


class MergeModels:
    DESCRIPTION = (
        "Merge checkpoints listed as rows on this node: each row a checkpoint, a weight and an on/off switch; "
        "'+ Add model' adds a row. Weighted sum, key by key with bounded memory, into the graph, to a file, or both. "
        "Also outputs the manifest (for Save Manifest or the other merge nodes)."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = COMMON_RETURN_TYPES + (host.MANIFEST_TYPE,)
    RETURN_NAMES = COMMON_RETURN_NAMES + ("manifest",)
    OUTPUT_TOOLTIPS = COMMON_OUTPUT_TOOLTIPS + ("The rows that are on, as a manifest.",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "models": ("STRING", {
                "default": "[]",
                # the rows' checkpoint list, for the browser (web/js/rows.js); not a ComfyUI option
                "model_merger_checkpoints": host.checkpoint_names(),
                "tooltip": "The model rows, as JSON: " + EXAMPLE + ". The node shows them as rows with a checkpoint "
                           "list, a weight and an on/off switch; rows that are off (or weight 0) are left out.",
            }),
            "normalize": ("BOOLEAN", {
                "default": True,
                "tooltip": "Divide the weights by their sum (1, 1, 2 means 25%, 25%, 50%). Off: the weights are used "
                           "as given.",
            }),
        }
        req.update(common_inputs())
        return {"required": req, "hidden": {"unique_id": "UNIQUE_ID"}}

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
        """The rows' files' size and mtime (the rows themselves are in the cache key anyway)."""
        try:
            names = [n for n, w, on in parse_rows(models) if on and w]
            paths = [host.folder_paths.get_full_path("checkpoints", n) or n for n in names]
            return hashlib.sha256(repr(host.file_signature(paths)).encode()).hexdigest()
        except Exception as exc:
            return f"error: {exc}"

    def merge(self, models, normalize, device, dtype, output_mode, filename_prefix, unique_id=None):
        with MergeEvent("Model Merger: merge models", unique_id) as ev:
            m = rows_manifest(models, normalize)
            plan = plan_from_manifest(m, device=device, dtype=dtype)
            out = run_plan(plan, node_id=unique_id, output_mode=output_mode, filename_prefix=filename_prefix,
                           title=f"Model Merger: merge of {len(plan.inputs)} models (rows)", event=ev)
            return out + (m,)


__all__ = ["MergeModels", "parse_rows", "rows_manifest", "describe_manifest"]

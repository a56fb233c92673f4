"""Metadata written into a merged checkpoint: ModelSpec keys, the A1111/SuperMerger recipe, the manifest.

Everything here is derived from the plan and the input headers only, so the same inputs and manifest give the
same bytes: no dates, no absolute paths, no secrets.
"""

from __future__ import annotations

import json
import os
from typing import Dict

from ..version import __version__

METHOD_LABELS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}


def build_metadata(prep, output_path: str) -> Dict[str, str]:
    plan = prep.plan
    names = [i.display_name() for i in plan.inputs]
    title = plan.title or os.path.splitext(os.path.basename(output_path))[0]
    weights = [float(i.weight) for i in plan.inputs]
    total = sum(weights)
    shown = [w / total for w in weights] if (plan.normalize and prep.method.uses_weights and total) else weights
    hashes = [i.sha256.lower() if i.sha256 else None for i in plan.inputs]
    recipe = {
        "type": "model-merger",
        "version": __version__,
        "interp_method": METHOD_LABELS.get(plan.method, plan.method),
        "method": plan.method,
        "models": [
            {"name": n, "sha256": h, "weight": w} for n, h, w in zip(names, hashes, shown)
        ],
        "params": _jsonable(prep.params),
        "normalize": plan.normalize,
        "dtype": plan.dtype,
        "save_as_half": plan.dtype in ("fp16", "bf16"),
        "allow_missing": plan.allow_missing,
        "seed": plan.seed,
    }
    for slot, h in zip(("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"), hashes):
        recipe[slot] = h
    if plan.recipe:
        recipe.update(_jsonable(plan.recipe))
    merge_models = {}
    for n, h, inp in zip(names, hashes, plan.inputs):
        merge_models[h or f"unknown:{n}"] = {"name": n, "legacy_hash": None, "sd_merge_recipe": None}
    manifest = {
        "version": 1,
        "method": plan.method,
        "normalize": plan.normalize,
        "dtype": plan.dtype,
        "models": [{"path": n, "weight": float(i.weight), **({"sha256": i.sha256} if i.sha256 else {})} for n, i in zip(names, plan.inputs)],
    }
    if prep.params:
        manifest["params"] = _jsonable(prep.params)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": prep.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.merged_from": ", ".join(names),
        "sd_merge_recipe": json.dumps(recipe, sort_keys=True),
        "sd_merge_models": json.dumps(merge_models, sort_keys=True),
        "model_merger.manifest": json.dumps(manifest, sort_keys=True),
        "model_merger.version": __version__,
    }
    pred = _prediction_type(prep)
    if pred:
        meta["modelspec.prediction_type"] = pred
    return meta


def _prediction_type(prep) -> str | None:
    keys = {j.name for j in prep.jobs}
    if "v_pred" in keys:
        return "v"
    return None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))

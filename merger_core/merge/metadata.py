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


NESTED_LIMIT = 1 << 20  # an input's own recipe or model list larger than this (characters) is not carried on
REPLAY_KEY = "model_merger.replay"  # what `model-merger verify` re-runs


def build_metadata(prep, output_path: str, identities=None) -> Dict[str, str]:
    """The output's metadata. ``identities`` (:class:`~merger_core.merge.provenance.InputHashes`) gives each input's
    SHA-256, AutoV2 and AutoV1; hashes still being computed are placeholders the writer fills at the end."""
    plan = prep.plan
    names = [i.display_name() for i in plan.inputs]
    title = plan.title or os.path.splitext(os.path.basename(output_path))[0]
    weights = [float(i.weight) for i in plan.inputs]
    total = sum(weights)
    shown = [w / total for w in weights] if (plan.normalize and prep.method.uses_weights and total) else weights
    n = len(plan.inputs)
    if identities is not None:
        hashes = [identities.sha256_field(i) for i in range(n)]
        autov2 = [identities.autov2_field(i) for i in range(n)]
        legacy = [identities.inputs[i].autov1 for i in range(n)]
        sizes = [identities.inputs[i].size for i in range(n)]
    else:
        hashes = [i.sha256.lower() if i.sha256 else None for i in plan.inputs]
        autov2 = [h[:10] if h else None for h in hashes]
        legacy = [None] * n
        sizes = [h.file_size for h in prep.headers]
    recipe = {
        "type": "model-merger",
        "version": __version__,
        "interp_method": METHOD_LABELS.get(plan.method, plan.method),
        "method": plan.method,
        "models": [
            {"name": nm, "sha256": h, "autov2": a, "weight": w} for nm, h, a, w in zip(names, hashes, autov2, shown)
        ],
        "params": _jsonable(prep.params),
        "normalize": plan.normalize,
        "dtype": plan.dtype,
        "save_as_half": plan.dtype in ("fp16", "bf16"),
        "allow_missing": plan.allow_missing,
        "seed": plan.seed,
        "nonfinite": plan.nonfinite,
    }
    for slot, h in zip(("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"), hashes):
        recipe[slot] = h
    loras = list(plan.loras or [])
    if identities is not None:
        lora_hashes = [identities.sha256_field(n + j) for j in range(len(loras))]
        lora_av2 = [identities.autov2_field(n + j) for j in range(len(loras))]
        lora_sizes = [x.size for x in identities.loras]
    else:
        lora_hashes = [l.sha256.lower() if l.sha256 else None for l in loras]
        lora_av2 = [h[:10] if h else None for h in lora_hashes]
        lora_sizes = [os.path.getsize(l.path) for l in loras]
    if loras:
        recipe["loras"] = [
            {"name": l.display_name(), "sha256": h, "autov2": a, "strength_model": float(l.strength_model),
             "strength_clip": float(l.strength_clip)}
            for l, h, a in zip(loras, lora_hashes, lora_av2)
        ]
    if plan.recipe:
        recipe.update(_jsonable(plan.recipe))
    # A1111/Forge's form: {sha256: {name, legacy_hash, sd_merge_recipe}} in input order, then what each input was
    # itself merged from (so the web UIs and CivitAI show the whole family). Insertion order, not sorted: the bytes
    # must not depend on whether a hash came from the cache or was computed in the run.
    merge_models: Dict[str, object] = {}
    for nm, h, v1, header in zip(names, hashes, legacy, prep.headers):
        own = header.metadata or {}
        merge_models[h or f"unknown:{nm}"] = {"name": nm, "legacy_hash": v1, "sd_merge_recipe": _nested(own.get("sd_merge_recipe"))}
        inner = _nested(own.get("sd_merge_models"))
        if isinstance(inner, dict):
            for k, v in inner.items():
                if isinstance(k, str) and k not in merge_models:
                    merge_models[k] = v
    manifest = {
        "version": 1,
        "method": plan.method,
        "normalize": plan.normalize,
        "dtype": plan.dtype,
        "models": [{"path": nm, "weight": float(i.weight), **({"sha256": h} if h else {})} for nm, i, h in zip(names, plan.inputs, hashes)],
    }
    if prep.params:
        manifest["params"] = _jsonable(prep.params)
    if loras:
        manifest["loras"] = [
            {"path": l.display_name(), "strength_model": float(l.strength_model), "strength_clip": float(l.strength_clip),
             **({"sha256": h} if h else {})}
            for l, h in zip(loras, lora_hashes)
        ]
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": prep.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.merged_from": ", ".join(names),
        "sd_merge_recipe": json.dumps(recipe, sort_keys=True),
        "sd_merge_models": json.dumps(merge_models),
        "model_merger.manifest": json.dumps(manifest, sort_keys=True),
        "model_merger.version": __version__,
    }
    given = getattr(prep, "given", None) or plan
    replay = given.replay or _plan_replay(given)
    if replay:
        meta[REPLAY_KEY] = json.dumps({
            "version": 1,
            **_jsonable(replay),
            "inputs": [{"name": nm, "sha256": h, "size": sz} for nm, h, sz in zip(names, hashes, sizes)],
            "loras": [{"name": l.display_name(), "sha256": h, "size": sz} for l, h, sz in zip(loras, lora_hashes, lora_sizes)],
        }, sort_keys=True)
    pred = _prediction_type(prep)
    if pred:
        meta["modelspec.prediction_type"] = pred
    return meta


def _prediction_type(prep) -> str | None:
    keys = {j.name for j in prep.jobs}
    if "v_pred" in keys:
        return "v"
    return None


def _plan_replay(plan):
    """A plan built without per-key hooks is its own record: its fields, inputs by index."""
    if any(h is not None for h in (plan.key_params, plan.key_source, plan.key_weights, plan.key_delta)):
        return None  # a planner that adds hooks records itself (plan.replay)
    return {"planner": "plan", "args": {
        "weights": [float(i.weight) for i in plan.inputs], "method": plan.method, "params": _jsonable(plan.params),
        "normalize": plan.normalize, "dtype": plan.dtype, "device": plan.device, "allow_missing": plan.allow_missing,
        "seed": plan.seed, "title": plan.title, "nonfinite": plan.nonfinite, "recipe": _jsonable(plan.recipe),
        "key_layout": getattr(plan, "key_layout", None),
        "loras": [{"path": j, "strength_model": float(l.strength_model), "strength_clip": float(l.strength_clip)}
                  for j, l in enumerate(plan.loras or [])],
    }}


def _nested(value):
    """An input's own recipe or model list (JSON in its metadata) as a value to carry on, or None."""
    if not isinstance(value, str) or not value or len(value) > NESTED_LIMIT:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))

"""Train Difference and Cross-Arch Merge: difference merges over a common base, to the graph, disk or both."""

from __future__ import annotations

import os

from ..merger_core.arch.blocks import blocks as block_names
from ..merger_core.identity import bases as bases_mod
from ..merger_core.merge import blockweights
from ..merger_core.merge import cross as cm
from ..merger_core.merge import train as trainmerge
from ..merger_core.errors import ManifestError
from . import _host as host
from .manifest_nodes import check_manifest_paths
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

BASES_KIND = "merge_bases"
AUTO = "(automatic)"
MAX_MODEL_CHOICES = 8


def register_bases_kind() -> None:
    """The ``merge_bases`` model folder (models/merge_bases, merged into a user entry) for cross-merge bases."""
    fp = host.folder_paths
    default = os.path.join(fp.models_dir, BASES_KIND)
    entry = fp.folder_names_and_paths.get(BASES_KIND)
    if entry is None:
        fp.folder_names_and_paths[BASES_KIND] = ([default], {".safetensors", ".sft"})
    else:
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        fp.folder_names_and_paths[BASES_KIND] = (paths, set(exts or ()) | {".safetensors", ".sft"})
    bases_mod.use_bases_dirs(fp.get_folder_paths(BASES_KIND))


def base_choices():
    try:
        names = [f"bases/{n}" for n in host.folder_paths.get_filename_list(BASES_KIND)]
    except KeyError:
        names = []
    return [AUTO] + names + [f"checkpoints/{n}" for n in host.checkpoint_names()]


def base_path(choice: str):
    if choice == AUTO:
        return None
    kind, _, name = choice.partition("/")
    if kind == "bases":
        path = host.folder_paths.get_full_path(BASES_KIND, name)
    elif kind == "checkpoints":
        path = host.folder_paths.get_full_path("checkpoints", name)
    else:
        path = None
    if path is None:
        raise ManifestError(f"base {choice!r} is not in the merge_bases or checkpoint folders")
    return host.check_allowed(path, "base")


# The architectures the block-weight editor offers (web/js/blocks.js): id in the block-map data, label shown.
BLOCK_EDITOR_ARCHS = (("sd1", "SD1.5"), ("sdxl_base", "SDXL"))
BLOCK_EDITOR_KEY = "model_merger_blocks"


def block_editor_spec(default_arch: str = "sdxl_base") -> dict:
    """What the browser's block-weight editor needs, sent inside the STRING input's spec (it reaches /object_info;
    not a ComfyUI option): per architecture its block names from the block-map data, and every preset with its
    description and its value per block, computed by the engine's own parser (so the sliders show what a merge
    uses)."""
    archs = []
    for arch_id, label in BLOCK_EDITOR_ARCHS:
        archs.append({"id": arch_id, "label": label, "blocks": block_names(arch_id)})
    presets = {}
    for name, doc in blockweights.presets().items():
        values = {}
        for a in archs:
            table = blockweights.parse_blocks(name, a["id"])
            values[a["id"]] = [table[b] for b in a["blocks"]]
        presets[name] = {"doc": doc, "values": values}
    return {"archs": archs, "presets": presets, "default_arch": default_arch}


def component_choices(first: str):
    rest = [c for c in ("delta", "base") if c != first]
    return [first] + rest + [f"model:{k}" for k in range(1, MAX_MODEL_CHOICES + 1)]


class TrainDifference:
    DESCRIPTION = (
        "A + train difference of (B - C): moves A the way B was trained away from C (SuperMerger's formula), with "
        "alpha global or per UNet block. Typical use: A your model, B a fine-tune, C the base B was trained from."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = COMMON_RETURN_TYPES
    RETURN_NAMES = COMMON_RETURN_NAMES
    OUTPUT_TOOLTIPS = COMMON_OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        names = host.checkpoint_names()
        req = {
            "model_a": (names, {"tooltip": "A: the model that receives the difference."}),
            "model_b": (names, {"tooltip": "B: the model whose training is transferred."}),
            "model_c": (names, {"tooltip": "C: the model B was trained from (its base)."}),
            "alpha": ("FLOAT", {
                "default": 1.0, "min": -2.0, "max": 3.0, "step": 0.05,
                "tooltip": "Strength of the transferred training (1 = all of it).",
            }),
            "alpha_blocks": ("STRING", {
                "default": "",
                # block names and presets for the browser's per-block sliders (web/js/blocks.js)
                BLOCK_EDITOR_KEY: block_editor_spec(),
                "tooltip": "Optional per-block alpha: a preset name (e.g. GRAD_V), one value per block "
                           "(SD1: BASE,IN00..IN11,M00,OUT00..OUT11; SDXL: BASE,IN00..IN08,M00,OUT00..OUT08,VAE), "
                           "or NAME=value pairs. Empty: alpha everywhere. The architecture, preset and "
                           "slider widgets below it edit this text.",
            }),
        }
        req.update(common_inputs())
        return {"required": req, "optional": optional_inputs(), "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return validate_prefix(filename_prefix)

    @classmethod
    def IS_CHANGED(cls, model_a=None, model_b=None, model_c=None, **_inputs):
        """The three files' size and mtime: a model replaced in place merges again (the widgets are in the cache
        key anyway)."""
        try:
            return repr(host.file_signature([host.checkpoint_path(n) for n in (model_a, model_b, model_c)]))
        except Exception as exc:  # the run reports it
            return f"error: {exc}"

    def merge(self, model_a, model_b, model_c, alpha, alpha_blocks, device, dtype, output_mode, filename_prefix,
              threads=0, unique_id=None):
        title = "Model Merger: train difference"
        with MergeEvent(title, unique_id) as ev:
            paths = [host.check_allowed(host.checkpoint_path(n), "model") for n in (model_a, model_b, model_c)]
            plan = trainmerge.plan_train_difference(*paths, alpha=float(alpha),
                                                    alpha_blocks=(alpha_blocks or "").strip() or None,
                                                    dtype=dtype, device=device)
            plan.threads = thread_count(threads)
            header = [f"A {model_a} + train difference of (B {model_b} - C {model_c}), alpha {alpha:g}"
                      + (f", per block {alpha_blocks}" if (alpha_blocks or "").strip() else "")]
            return run_plan(plan, node_id=unique_id, output_mode=output_mode, filename_prefix=filename_prefix,
                            title=title, header_lines=header, event=ev)


class CrossArchMerge:
    DESCRIPTION = (
        "Merge models of different lineages that share a base (for example Pony and Illustrious, both SDXL): "
        "base + scale * combine(model_i - base), key by key. The base is chosen automatically from the registered "
        "bases (models/merge_bases) by lineage unless you pick one. Text encoders and VAE can be merged by "
        "difference, taken from the base, or from one model."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = COMMON_RETURN_TYPES
    RETURN_NAMES = COMMON_RETURN_NAMES
    OUTPUT_TOOLTIPS = COMMON_OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "manifest": (host.MANIFEST_TYPE, {
                "tooltip": "The models to combine, with their weights (from Add Model To Manifest, Scan Folder or "
                           "Load Manifest). Do not include the base.",
            }),
            "base": (base_choices(), {
                "default": AUTO,
                "tooltip": "The common ancestor. (automatic): the registered base the models' lineage points to "
                           "(put bases in models/merge_bases); the report says which and why.",
            }),
            "combine": (list(cm.COMBINE_METHODS), {
                "default": "ties",
                "tooltip": "How the differences are combined: sum (task arithmetic), ties (trim, elect sign, "
                           "merge) or dare (random drop and rescale; seeded).",
            }),
            "scale": ("FLOAT", {
                "default": 1.0, "min": -2.0, "max": 3.0, "step": 0.05,
                "tooltip": "How much of the combined difference is added to the base.",
            }),
            "density": ("FLOAT", {
                "default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "ties: fraction of each difference kept, by magnitude.",
            }),
            "drop": ("FLOAT", {
                "default": 0.5, "min": 0.0, "max": 0.999, "step": 0.01,
                "tooltip": "dare: probability of dropping each element of a difference.",
            }),
            "text_encoder": (component_choices("delta"), {
                "default": "delta",
                "tooltip": "Text encoder(s): merged by difference, taken from the base, or from model K of the "
                           "manifest (model:1 is the first). Pony retrained its text encoder: choose on purpose.",
            }),
            "vae": (component_choices("base"), {
                "default": "base",
                "tooltip": "VAE: from the base (default), merged by difference, or from model K of the manifest.",
            }),
            "scale_blocks": ("STRING", {
                "default": "",
                # block names and presets for the browser's per-block sliders (web/js/blocks.js)
                BLOCK_EDITOR_KEY: block_editor_spec(),
                "tooltip": "Optional per-block scale (preset, one value per block, or NAME=value pairs). Empty: "
                           "scale everywhere. The architecture, preset and slider widgets below it edit this text.",
            }),
            "seed": ("INT", {
                "default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": True,
                "tooltip": "Seed for dare's random drop (per key: the same seed gives identical bytes). The control "
                           "after it starts 'fixed': a changing seed would merge again on every run.",
            }),
        }
        req.update(common_inputs())
        return {"required": req, "optional": optional_inputs(), "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return validate_prefix(filename_prefix)

    @classmethod
    def IS_CHANGED(cls, base=AUTO, **_inputs):
        """The base file's size and mtime; with (automatic), those of every base it can choose from (a base added
        to or replaced in models/merge_bases can change the result). The manifest's files are reported by the node
        that made the manifest."""
        try:
            if base == AUTO:
                paths = sorted(b.path for b in bases_mod.list_bases())
            else:
                paths = [base_path(base)]
            return repr((base, host.file_signature(paths)))
        except Exception as exc:  # the run reports it
            return f"error: {exc}"

    def merge(self, manifest, base, combine, scale, density, drop, text_encoder, vae, scale_blocks, seed, device,
              dtype, output_mode, filename_prefix, threads=0, unique_id=None):
        title = "Model Merger: cross-arch merge"
        with MergeEvent(title, unique_id) as ev:
            return self._merge(ev, manifest, base, combine, scale, density, drop, text_encoder, vae, scale_blocks,
                               seed, device, dtype, output_mode, filename_prefix, threads, unique_id)

    def _merge(self, ev, manifest, base, combine, scale, density, drop, text_encoder, vae, scale_blocks, seed, device,
               dtype, output_mode, filename_prefix, threads, unique_id):
        if manifest is None:
            raise ManifestError("no manifest connected")
        check_manifest_paths(manifest)
        req = cm.CrossMergeRequest(
            models=[e.path for e in manifest.models],
            weights=[float(e.weight) for e in manifest.models],
            base=base_path(base),
            combine=combine,
            scale=float(scale),
            density=float(density),
            drop=float(drop),
            text_encoder=text_encoder,
            vae=vae,
            scale_blocks=(scale_blocks or "").strip() or None,
            dtype=dtype,
            device=device,
            seed=int(seed),
            threads=thread_count(threads),
            loras=[(e.path, e.strength_model, e.strength_clip) for e in manifest.loras],  # baked into the result
        )
        cp = cm.plan_cross_merge(req)
        host.check_allowed(cp.base, "base")
        header = [f"cross-merge ({combine}, scale {scale:g}) of {len(manifest.models)} model(s)", cp.describe()]
        return run_plan(cp.plan, node_id=unique_id, output_mode=output_mode, filename_prefix=filename_prefix,
                        title="Model Merger: cross-arch merge", header_lines=header, event=ev)

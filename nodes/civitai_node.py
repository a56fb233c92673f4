"""CivitAI Lookup: which model and base a checkpoint is, by its hash (cached; works offline from the cache)."""

from __future__ import annotations

import os

from ..merger_core.identity import civitai
from . import _host as host
from .manifest_nodes import check_manifest_paths


class CivitaiLookup:
    DESCRIPTION = (
        "Look a checkpoint up on CivitAI by its SHA-256 (hashed once, then cached): model and version names, base "
        "model, trained words, page address. Answers are cached; 'offline' answers from the cache only. An API key, "
        "if needed, comes from the CIVITAI_API_KEY environment variable of the server (never from the workflow)."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "lookup"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("report", "trained_words", "base_model")
    OUTPUT_TOOLTIPS = (
        "What CivitAI says about each file (or that it is unknown there).",
        "The trained (trigger) words, comma-separated: connect to a prompt.",
        "CivitAI's base model (for example 'Pony' or 'SDXL 1.0'); several joined by ', ' when files differ.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.checkpoint_names(), {
                    "tooltip": "The checkpoint to look up (ignored when a manifest is connected).",
                }),
                "offline": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Only use answers cached earlier; never contact CivitAI.",
                }),
            },
            "optional": {
                "manifest": (host.MANIFEST_TYPE, {"tooltip": "Look up every model of this manifest instead."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, ckpt_name=None, offline=False, manifest=None):
        try:
            return repr((offline, host.file_signature([host.checkpoint_path(ckpt_name)])))
        except Exception as exc:
            return f"error: {exc}"

    def lookup(self, ckpt_name, offline=False, manifest=None, unique_id=None):
        if manifest is not None:
            check_manifest_paths(manifest)
            paths = [e.path for e in manifest.models]
        else:
            paths = [host.checkpoint_path(ckpt_name)]
        bar = {"bar": None}

        def progress(name, done, total):
            if bar["bar"] is None:
                bar["bar"] = host.comfy.utils.ProgressBar(max(1, total))
            host.send_text(unique_id, f"hashing {os.path.basename(name)}: {host.human_bytes(done)} of {host.human_bytes(total)}")
            bar["bar"].update_absolute(min(done, total), max(1, total))

        report, words, base = civitai.lookup_report(paths, offline=bool(offline), progress=progress,
                                                    cancel=host.check_interrupt)
        return (report, words, base)

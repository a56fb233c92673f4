"""ComfyUI V1 node classes: thin wrappers over merger_core. The only code that imports ComfyUI."""

from __future__ import annotations

import logging

from . import _host as host
from .manifest_nodes import AddModelToManifest, LoadManifest, SaveManifest, ScanFolder
from .merge_node import WeightedMerge

log = logging.getLogger("model_merger")

host.register_folder_kind()
try:  # keep the hash/CivitAI cache under ComfyUI's user directory
    from ..merger_core import userdirs

    userdirs.use_comfyui_user_dir(host.folder_paths.get_user_directory())
except Exception as exc:  # not fatal: the platform data folder is used instead
    log.warning("Model Merger: could not use ComfyUI's user directory for its cache: %s", exc)

from . import routes  # noqa: E402,F401  (serves the browser-side logic module)

NODES = [
    ("ModelMergerScanFolder", ScanFolder, "Scan Folder (Model Merger)"),
    ("ModelMergerLoadManifest", LoadManifest, "Load Manifest (Model Merger)"),
    ("ModelMergerAddModel", AddModelToManifest, "Add Model To Manifest (Model Merger)"),
    ("ModelMergerSaveManifest", SaveManifest, "Save Manifest (Model Merger)"),
    ("ModelMergerWeightedMerge", WeightedMerge, "Weighted Merge (Model Merger)"),
]

# Nodes over engine parts that other modules provide; a missing part leaves its node out with a log line.
for _mod, _names in (
    ("analyze_node", [("ModelMergerAnalyzeStructure", "AnalyzeStructure", "Analyze Structure (Model Merger)")]),
    ("civitai_node", [("ModelMergerCivitaiLookup", "CivitaiLookup", "CivitAI Lookup (Model Merger)")]),
    ("crossmerge_node", [
        ("ModelMergerTrainDifference", "TrainDifference", "Train Difference (Model Merger)"),
        ("ModelMergerCrossArchMerge", "CrossArchMerge", "Cross-Arch Merge (Model Merger)"),
    ]),
):
    try:
        _m = __import__(f"{__name__}.{_mod}", fromlist=["_"])
    except ImportError as exc:
        log.warning("Model Merger: %s nodes are not available: %s", _mod, exc)
        continue
    for _id, _cls, _display in _names:
        NODES.append((_id, getattr(_m, _cls), _display))

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, _, name in NODES}

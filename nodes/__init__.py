"""ComfyUI V1 node classes: thin wrappers over merger_core. The only code that imports ComfyUI."""

from __future__ import annotations

import logging

from . import _requirements
from . import _host as host
from .manifest_nodes import AddLoraToManifest, AddModelToManifest, LoadManifest, SaveManifest, ScanFolder
from .merge_node import WeightedMerge

log = logging.getLogger("model_merger")

host.register_folder_kind()
try:  # keep the hash/CivitAI cache under ComfyUI's user directory
    from ..merger_core.host import userdirs

    userdirs.use_comfyui_user_dir(host.folder_paths.get_user_directory())
except Exception as exc:  # not fatal: the platform data folder is used instead
    log.warning("Model Merger: could not use ComfyUI's user directory for its cache: %s", exc)

NODES = [
    ("ModelMergerScanFolder", ScanFolder, "Scan Folder (Model Merger)"),
    ("ModelMergerLoadManifest", LoadManifest, "Load Manifest (Model Merger)"),
    ("ModelMergerAddModel", AddModelToManifest, "Add Model To Manifest (Model Merger)"),
    ("ModelMergerAddLora", AddLoraToManifest, "Add LoRA To Manifest (Model Merger)"),
    ("ModelMergerSaveManifest", SaveManifest, "Save Manifest (Model Merger)"),
    ("ModelMergerWeightedMerge", WeightedMerge, "Weighted Merge (Model Merger)"),
]

# Nodes over the analysis, CivitAI and difference-merge engine parts.
from .analyze_node import AnalyzeStructure  # noqa: E402
from .civitai_node import CivitaiLookup  # noqa: E402
from .crossmerge_node import CrossArchMerge, TrainDifference, register_bases_kind  # noqa: E402
from .rows_node import MergeModels  # noqa: E402
from .lora_nodes import ApplyLora, ExtractLora, MergeLoras  # noqa: E402

register_bases_kind()
NODES += [
    ("ModelMergerAnalyzeStructure", AnalyzeStructure, "Analyze Structure (Model Merger)"),
    ("ModelMergerCivitaiLookup", CivitaiLookup, "CivitAI Lookup (Model Merger)"),
    ("ModelMergerTrainDifference", TrainDifference, "Train Difference (Model Merger)"),
    ("ModelMergerCrossArchMerge", CrossArchMerge, "Cross-Arch Merge (Model Merger)"),
    ("ModelMergerMergeModels", MergeModels, "Merge Models (Model Merger)"),
    ("ModelMergerExtractLora", ExtractLora, "Extract LoRA (Model Merger)"),
    ("ModelMergerMergeLoras", MergeLoras, "Merge LoRAs (Model Merger)"),
    ("ModelMergerApplyLora", ApplyLora, "Apply LoRA (Model Merger)"),
]



def _refuse_to_run(cls, message: str) -> None:
    """Missing requirements: the node stays listed (workflows open) but its function fails with ``message``; a
    merging node also sends the failure event, so the toast says it too."""
    from .merge_node import MergeEvent
    from ..merger_core.errors import ModelMergerError

    merges = tuple(cls.RETURN_TYPES[:3]) == ("MODEL", "CLIP", "VAE")

    def refuse(self, *args, unique_id=None, **kwargs):
        if merges:
            with MergeEvent(f"Model Merger: {cls.__name__}", unique_id):
                raise ModelMergerError(message)
        raise ModelMergerError(message)

    refuse.__name__ = cls.FUNCTION
    setattr(cls, cls.FUNCTION, refuse)


if _requirements.MESSAGE:
    log.warning(_requirements.MESSAGE)
    for _node_id, _cls, _name in NODES:
        _refuse_to_run(_cls, _requirements.MESSAGE)

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, _, name in NODES}

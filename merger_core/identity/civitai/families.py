"""CivitAI's base-model names (``data/civitai_base_models.json``) and the structure family of a file."""

from __future__ import annotations

import json
from typing import Optional

from ...errors import ModelMergerError
from ...data import data_path

_DATA = data_path("civitai_base_models.json")


def _base_model_table() -> dict:
    with open(_DATA, "r", encoding="utf-8") as f:
        return json.load(f)


def base_model_family(base_model: Optional[str], base_model_type: Optional[str] = None) -> Optional[str]:
    """Structure family of a CivitAI ``baseModel`` (``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``, ``sd3``,
    ``flux``), or ``None`` for a name this program does not know."""
    if not base_model:
        return None
    table = _base_model_table()
    for fam, names in table["families"].items():
        if base_model.strip().lower() in (n.lower() for n in names):
            if fam == "sdxl" and base_model_type == table["refiner_base_model_type"]:
                return "sdxl-refiner"
            return fam
    return None


def structure_family(architecture: Optional[str]) -> Optional[str]:
    if not architecture:
        return None
    return _base_model_table()["structures"].get(architecture)


def detect_architecture(path: str, cache=None) -> str:
    """The file's architecture id from the one detector (:func:`merger_core.arch.detect.detect`): the recognised
    architecture, else the one architecture whose key names the file follows (non-standard widths, e.g. a pruned
    or shrunk model), else ``"unknown"``. Cached as fact ``civitai.structure``."""
    if cache is not None:
        got = cache.get_fact(path, "civitai.structure")
        if isinstance(got, str):
            return got
    from ...arch import detect, get_fingerprint

    try:
        det = detect(path)
        families = {get_fingerprint(i).family for i in det.key_layout}
        arch = det.arch_id if det.known else (det.key_layout[0] if len(families) == 1 else "unknown")
    except ModelMergerError:
        arch = "unknown"
    if cache is not None:
        cache.put_fact(path, "civitai.structure", arch)
    return arch

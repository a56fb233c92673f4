"""What a file is and what fits with what, from headers: fingerprints (data), the one detector, the one key and
shape comparison, the compatibility preflight, block maps, model diff and lineage ranking.

    detect(path) -> Detection                      structure of one file (headers only)
    modelspec_architecture(detection) -> str       the ModelSpec label written into merged files
    blocks(arch_id) / block_of(arch_id, key)       block maps
    compare_keys(headers) -> KeyReport             key and shape comparison of whole files
    check_compatibility(paths) / check_headers(headers) -> CompatReport
    diff_models(a, b) -> DiffReport ; rank_bases(model, bases) -> [(base, score, evidence)]
"""

from .blocks import block_of, blocks  # noqa: F401
from .compat import CompatReport, check_compatibility, check_headers, require_compatible  # noqa: F401
from .detect import ComponentInfo, Detection, detect, detect_header, modelspec_architecture  # noqa: F401
from .diff import DiffReport, Distance, diff_models  # noqa: F401
from .fingerprints import get_fingerprint, load_fingerprints  # noqa: F401
from .keys import KeyReport, compare_keys, compare_tensors  # noqa: F401
from .lineage import rank_bases  # noqa: F401

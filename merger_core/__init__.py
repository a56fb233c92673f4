"""Model Merger engine: streaming checkpoint merges, manifests, scans. No ComfyUI import anywhere in here."""

__version__ = "0.6.0"

from .errors import (  # noqa: E402
    BadFileError,
    DeviceError,
    IncompatibleModelsError,
    ManifestError,
    MergeCancelled,
    ModelMergerError,
    OutputError,
    ScanError,
)
from .safetensors_io import SafetensorsHeader, StreamingWriter, TensorInfo, read_header  # noqa: E402
from .engine import (  # noqa: E402
    MergeInput,
    MergePlan,
    MergeResult,
    ProgressInfo,
    merge_to_file,
    merge_to_state_dict,
    prepare,
)
from .devices import available_devices, resolve_device  # noqa: E402
from .scan import ScanResult, scan_folder  # noqa: E402  (``scan`` itself: merger_core.scan.scan; the name is the module)
from .manifest import Manifest, ManifestEntry, load_manifest, manifest_from_scan, save_manifest  # noqa: E402

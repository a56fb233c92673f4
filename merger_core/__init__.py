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

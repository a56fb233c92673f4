"""Model Merger engine: streaming checkpoint merges, manifests, scans. No ComfyUI import anywhere in here.

The rooms and what each may import are in ``docs/architecture.md``; this file only re-exports the public API.
"""

from .version import __version__  # noqa: F401

from .errors import (  # noqa: F401
    BadFileError, DeviceError, IncompatibleModelsError, ManifestError, MergeCancelled, ModelMergerError, OutputError,
    ScanError,
)
from .io.safetensors import SafetensorsHeader, TensorInfo, read_header  # noqa: F401
from .io.writer import StreamingWriter  # noqa: F401
from .manifest.model import Manifest, ManifestEntry
from .manifest.parse import load_manifest, save_manifest
from .manifest.scan import manifest_from_scan
from .manifest.scan import ScanResult, scan_folder  # noqa: F401
from .merge.device import available_devices, resolve_device  # noqa: F401
from .merge.plan import MergeInput, MergePlan, plan_from_manifest, prepare  # noqa: F401
from .merge.runner import MergeResult, ProgressInfo, merge_to_file, merge_to_state_dict  # noqa: F401

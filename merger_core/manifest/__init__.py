"""Manifests: the versioned JSON list of models and weights (``docs/manifest.md``), in rooms: :mod:`.model` (the
data), :mod:`.schema` (the JSON Schema in plain words), :mod:`.parse` (JSON in and out), :mod:`.validate` (what a
schema cannot check) and :mod:`.scan` (finding models, and a manifest over them)."""

from .model import MANIFEST_VERSION, Manifest, ManifestEntry, ManifestValidationError, Problem, display_names  # noqa: F401
from .parse import load_manifest, manifest_from_dict, manifest_to_dict, manifest_to_json, save_manifest  # noqa: F401
from .scan import ScanResult, manifest_from_scan, scan_folder  # noqa: F401
from .schema import SCHEMA_PATH, load_schema  # noqa: F401
from .validate import validate  # noqa: F401

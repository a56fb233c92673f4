"""CivitAI: the HTTP client and its answers (:mod:`.client`), cached lookups (:mod:`.lookup`), base-model families
(:mod:`.families`), ``scan --civitai`` (:mod:`.enrich`) and downloads (:mod:`.download`)."""

from .client import (  # noqa: F401
    DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, MAX_TIMEOUT, CivitaiClient, CivitaiError, CivitaiResult, DownloadError, RetryPolicy,
    check_timeout, check_version, printable, redact, resolve_api_key, resolve_base_url, site_url,
)
from .download import download, download_async  # noqa: F401
from .enrich import enrich_manifest  # noqa: F401
from .families import base_model_family, detect_architecture, structure_family  # noqa: F401
from .lookup import format_result, lookup_files, lookup_hashes, lookup_hashes_async, lookup_report, run_sync  # noqa: F401

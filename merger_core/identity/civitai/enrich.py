"""``scan --civitai``: hashes and CivitAI facts into a manifest, with a warning where CivitAI's base model and the
file's structure disagree."""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from ...errors import ModelMergerError
from ..hashing import CancelFn, FileHashes
from .client import DEFAULT_TIMEOUT, RetryPolicy, check_timeout, printable
from .families import base_model_family, detect_architecture, structure_family
from .lookup import _entry_path, _manifest_entries, _open_cache, lookup_hashes

def _set(entry, name: str, value) -> None:
    if isinstance(entry, dict):
        entry[name] = value
    else:
        setattr(entry, name, value)


def enrich_manifest(
    manifest,
    *,
    offline: bool = False,
    api_key: Optional[str] = None,
    base_url: Optional[str] = None,
    cache=None,
    base_dir: Optional[str] = None,
    refresh: bool = False,
    progress: Optional[Callable[[str, int, int], None]] = None,
    cancel: Optional[CancelFn] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry: Optional[RetryPolicy] = None,
) -> List[str]:
    """``scan --civitai``: hash every entry (cached), look them up in batches of 100, set each entry's ``sha256``
    and ``civitai`` (:meth:`CivitaiResult.manifest_dict`), and return warnings: lookups that failed, and files whose
    CivitAI base model disagrees with their structure (Pony, Illustrious and NoobAI are SDXL: agreement).

    ``manifest`` is a :class:`merger_core.manifest.Manifest` (entries in ``.models`` with ``path``, ``sha256``,
    ``civitai``) or a list of such entries or dicts. Relative paths resolve against ``base_dir``. A lookup that
    fails (unreachable, malformed answer) is a warning for that file; the others carry on. The warnings are
    :func:`printable` (names and messages from CivitAI included). A bad ``timeout`` raises before any file is read."""
    check_timeout(timeout)
    entries = _manifest_entries(manifest)
    store = _open_cache(cache)
    warnings: List[str] = []
    paths = [_entry_path(e, manifest, base_dir) for e in entries]
    hashes: List[FileHashes] = []
    for p in paths:
        cb = (lambda d, t, p=p: progress(p, d, t)) if progress is not None else None
        if store is not None:
            hashes.append(store.hashes(p, ("sha256",), progress=cb, cancel=cancel))
        else:
            from ..hashing import hash_file

            hashes.append(hash_file(p, ("sha256",), progress=cb, cancel=cancel))
    results = lookup_hashes(
        [h.sha256 for h in hashes], cache=store, offline=offline, refresh=refresh, api_key=api_key,
        base_url=base_url, timeout=timeout, retry=retry,
    )
    errors = 0
    for entry, p, h in zip(entries, paths, hashes):
        r = results[h.sha256]
        name = os.path.basename(p)
        _set(entry, "sha256", h.sha256)
        _set(entry, "civitai", r.manifest_dict())
        if r.status == "error":
            errors += 1
            if errors == 1:
                warnings.append(f"{name}: CivitAI lookup failed: {r.message}")
            continue
        if r.status == "offline":
            warnings.append(f"{name}: offline and not in the cache; no CivitAI information")
            continue
        if not r.found:
            continue
        try:
            arch = detect_architecture(p, store)
        except ModelMergerError as exc:
            warnings.append(f"{name}: structure not checked against CivitAI ({exc})")
            continue
        want = base_model_family(r.base_model, r.base_model_type)
        have = structure_family(arch)
        if want is None:
            if r.base_model:
                warnings.append(
                    f"{name}: CivitAI base model {r.base_model!r} is not one this program can check "
                    f"(structure: {arch})"
                )
        elif have is None:
            warnings.append(f"{name}: CivitAI says {r.base_model!r} but the structure was not recognised ({arch})")
        elif want != have:
            warnings.append(
                f"{name}: CivitAI says base model {r.base_model!r} ({want}) but the file's structure is {arch} ({have})"
            )
    if errors > 1:
        warnings.append(f"CivitAI lookup failed for {errors} files in all")
    return [printable(w) for w in warnings]


# ---------------------------------------------------------------------------------------------------------------
# Downloads

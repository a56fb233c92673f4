"""Lookups by SHA-256 with the hash cache in front of the client, and their text for the CLI and the node."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from ...errors import ModelMergerError
from ..hashing import CancelFn, FileHashes, normalize_sha256
from .client import (
    BATCH_SIZE, DEFAULT_TIMEOUT, CivitaiClient, CivitaiError, CivitaiResult, RetryPolicy, _versions_for, check_timeout, printable,
)

async def lookup_hashes_async(
    hashes: Sequence[str],
    *,
    cache=None,
    offline: bool = False,
    refresh: bool = False,
    client: Optional[CivitaiClient] = None,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry: Optional[RetryPolicy] = None,
    negative_ttl: Optional[float] = None,
) -> Dict[str, CivitaiResult]:
    """Look SHA-256 hashes up: the cache first (unless ``refresh``), then CivitAI in batches (one GET for a single
    hash). Returns ``{sha256 (lower case): CivitaiResult}``; network problems and malformed answers give
    ``status="error"`` results (nothing is remembered for them). A bad ``timeout`` raises before any request."""
    check_timeout(timeout)
    shas: List[str] = []
    for h in hashes:
        s = normalize_sha256(h)
        if s is None:
            raise ModelMergerError(f"not a SHA-256 hash (64 hex digits): {str(h)[:80]!r}")
        if s not in shas:
            shas.append(s)
    own_client = client is None
    if client is None:
        client = CivitaiClient(base_url, api_key, timeout=timeout, retry=retry)
    site = client.site
    results: Dict[str, CivitaiResult] = {}
    todo: List[str] = []
    for s in shas:
        entry = cache.get_civitai(s, negative_ttl) if (cache is not None and not refresh) else None
        r = None
        if entry is not None:
            if entry.found:
                try:
                    r = CivitaiResult.from_version(s, entry.data, site, source="cache")
                except CivitaiError as exc:  # kept by an older version of this program: ask again
                    if offline:
                        results[s] = CivitaiResult(s, "error", source="cache",
                                                   message=f"the cached answer cannot be used: {exc}")
                        continue
            else:
                r = CivitaiResult(s, "not_found", source="cache", message="not on CivitAI (remembered)")
        if r is not None:
            r.fetched = entry.fetched
            results[s] = r
        elif offline:
            results[s] = CivitaiResult(s, "offline", source="cache", message="offline: not in the local cache")
        else:
            todo.append(s)
    if not todo:
        return results

    async def work(c: CivitaiClient) -> None:
        if len(todo) == 1:
            s = todo[0]
            try:
                v = await c.version_by_hash(s)
            except CivitaiError as exc:
                results[s] = CivitaiResult(s, "error", message=str(exc))
                return
            if v is None:
                _remember(cache, s, None)
                results[s] = CivitaiResult(s, "not_found", message="not on CivitAI")
                return
            try:
                r = CivitaiResult.from_version(s, v, site)
            except CivitaiError as exc:
                results[s] = CivitaiResult(s, "error", message=str(exc))
                return
            files = v.get("files") or []
            if not r.confirmed and files:
                results[s] = CivitaiResult(
                    s, "not_found",
                    message=f"CivitAI answered with version {r.version_id} but none of its files has this SHA-256",
                )
                return
            _remember(cache, s, v)
            r.fetched = time.time()
            results[s] = r
            return
        for i in range(0, len(todo), BATCH_SIZE):
            batch = todo[i: i + BATCH_SIZE]
            try:
                versions = await c.versions_by_hashes(batch)
            except CivitaiError as exc:
                for s in batch:
                    results[s] = CivitaiResult(s, "error", message=str(exc))
                continue
            now = time.time()
            for s in batch:
                try:  # one malformed version is one failed entry; the rest of the batch carries on
                    v = _versions_for(s, versions)
                    r = CivitaiResult.from_version(s, v, site) if v is not None else None
                except CivitaiError as exc:
                    results[s] = CivitaiResult(s, "error", message=str(exc))
                    continue
                if r is None:
                    _remember(cache, s, None)
                    results[s] = CivitaiResult(s, "not_found", message="not on CivitAI")
                else:
                    _remember(cache, s, v)
                    r.fetched = now
                    results[s] = r

    if own_client:
        async with client:
            await work(client)
    else:
        await work(client)
    return results


def _remember(cache, sha: str, version: Optional[dict]) -> None:
    if cache is not None:
        cache.put_civitai(sha, version)


def run_sync(make_coro: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion from synchronous code. In a thread that already runs an event loop (never the
    case in the node's worker thread or the CLI) it runs in a helper thread instead of failing."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    box: Dict[str, Any] = {}

    def runner():
        try:
            box["v"] = asyncio.run(make_coro())
        except BaseException as exc:  # pragma: no cover - re-raised below
            box["e"] = exc

    t = threading.Thread(target=runner, name="civitai-sync")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def lookup_hashes(hashes: Sequence[str], **kwargs) -> Dict[str, CivitaiResult]:
    """Synchronous :func:`lookup_hashes_async`."""
    return run_sync(lambda: lookup_hashes_async(hashes, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Report for the node and the CLI


def _open_cache(cache):
    if cache is False:
        return None
    if cache is None:
        from ..cache import open_cache

        return open_cache()
    return cache


def lookup_files(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    offline: bool = False,
    api_key: Optional[str] = None,
    base_url: Optional[str] = None,
    cache=None,
    refresh: bool = False,
    progress: Optional[Callable[[str, int, int], None]] = None,
    cancel: Optional[CancelFn] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry: Optional[RetryPolicy] = None,
    negative_ttl: Optional[float] = None,
) -> List[Tuple[str, FileHashes, CivitaiResult]]:
    """Hash each file (through the cache) and look them up. ``progress(path, done_bytes, total_bytes)`` reports
    hashing. ``cache=False`` uses no cache at all. A bad ``timeout`` raises before any file is read."""
    check_timeout(timeout)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    elif hasattr(paths, "models") or hasattr(paths, "entries"):  # a Manifest
        paths = [_entry_path(e, paths, None) for e in _manifest_entries(paths)]
    store = _open_cache(cache)
    hashed: List[Tuple[str, FileHashes]] = []
    for p in paths:
        p = os.fspath(p)
        cb = (lambda d, t, p=p: progress(p, d, t)) if progress is not None else None
        if store is not None:
            h = store.hashes(p, ("sha256",), progress=cb, cancel=cancel)
        else:
            from ..hashing import hash_file

            h = hash_file(p, ("sha256",), progress=cb, cancel=cancel)
        hashed.append((p, h))
    results = lookup_hashes(
        [h.sha256 for _, h in hashed], cache=store, offline=offline, refresh=refresh, api_key=api_key,
        base_url=base_url, timeout=timeout, retry=retry, negative_ttl=negative_ttl,
    )
    return [(p, h, results[h.sha256]) for p, h in hashed]


def format_result(name: str, hashes: FileHashes, r: CivitaiResult) -> str:
    """The text for one file. Every text in ``r`` came from CivitAI (or an uploader): it goes through
    :func:`printable` here as well, whatever built ``r``, so no control character reaches a terminal."""
    t = printable
    lines = [t(name), f"  SHA256 {hashes.sha256.upper()}  AutoV2 {hashes.autov2.upper()}"]
    if r.status == "found":
        lines.append(f"  Model: {t(r.model_name) or '?'} / version {t(r.version_name) or '?'} "
                     f"(model {r.model_id}, version {r.version_id})")
        base = t(r.base_model) or "?"
        if r.base_model_type and r.base_model_type != "Standard":
            base += f" ({t(r.base_model_type)})"
        lines.append(f"  Base model: {base}; type: {t(r.model_type) or '?'}")
        if r.trained_words:
            lines.append(f"  Trained words: {', '.join(t(w) for w in r.trained_words)}")
        if r.file_format or r.file_precision:
            lines.append(f"  File: {t(r.file_format) or '?'} {t(r.file_precision)}".rstrip())
        if r.page_url:
            lines.append(f"  Page: {t(r.page_url)}")
        if r.image_urls:
            lines.append(f"  Images: {' '.join(t(u) for u in r.image_urls[:3])}"
                         + (" ..." if len(r.image_urls) > 3 else ""))
        if not r.confirmed and r.message:
            lines.append(f"  Note: {t(r.message)}")
    elif r.status == "not_found":
        lines.append(f"  Not on CivitAI{' (remembered from an earlier lookup)' if r.source == 'cache' else ''}"
                     + (f": {t(r.message)}" if r.message and 'version' in r.message else ""))
    elif r.status == "offline":
        lines.append("  Offline: not in the local cache")
    else:
        lines.append(f"  Lookup failed: {t(r.message)}")
    if r.status in ("found", "not_found") and r.source == "cache" and r.fetched:
        lines.append(f"  From the cache (asked {time.strftime('%Y-%m-%d %H:%M', time.localtime(r.fetched))})")
    return "\n".join(lines)


def lookup_report(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    offline: bool = False,
    api_key: Optional[str] = None,
    **kwargs,
) -> Tuple[str, str, str]:
    """For the CivitAI Lookup node: ``(report, trained_words, base_model)``.

    ``paths``: one path, a list of paths, or a :class:`~merger_core.manifest.Manifest` (its entries' files).

    ``trained_words`` joins the trained words of every file found (comma-separated, first seen first);
    ``base_model`` is CivitAI's base model, several joined by ``", "`` when the files disagree, empty when none
    is known. Blocking: call it from a worker thread, never on a running event loop's thread."""
    rows = lookup_files(paths, offline=offline, api_key=api_key, **kwargs)
    parts = []
    if offline:
        parts.append("CivitAI lookup (offline: answers from the local cache only)")
    else:
        parts.append("CivitAI lookup")
    words: List[str] = []
    bases: List[str] = []
    for p, h, r in rows:
        parts.append(format_result(os.path.basename(p), h, r))
        if r.found:
            for w in map(printable, r.trained_words):
                if w and w not in words:
                    words.append(w)
            base = printable(r.base_model)
            if base and base not in bases:
                bases.append(base)
    return "\n\n".join(parts), ", ".join(words), ", ".join(bases)


# ---------------------------------------------------------------------------------------------------------------
# scan --civitai


def _manifest_entries(manifest) -> List[Any]:
    for attr in ("models", "entries"):
        entries = getattr(manifest, attr, None)
        if entries is not None:
            return list(entries)
    if isinstance(manifest, (list, tuple)):
        return list(manifest)
    raise TypeError("enrich_manifest needs a Manifest (with .models) or a list of entries")


def _entry_path(entry, manifest, base_dir: Optional[str]) -> str:
    path = os.fspath(entry["path"] if isinstance(entry, dict) else entry.path)
    resolver = getattr(manifest, "resolve_path", None)
    if callable(resolver):
        return os.fspath(resolver(path))
    if not os.path.isabs(path):
        folder = base_dir or getattr(manifest, "base_dir", None) or getattr(manifest, "folder", None)
        if folder:
            path = os.path.join(os.fspath(folder), path)
    return path

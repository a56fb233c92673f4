"""Resumable, SHA-256-verified downloads of model files by CivitAI model-version id or URL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from typing import Optional
from urllib.parse import unquote, urlsplit

from ...errors import ModelMergerError
from ..hashing import CancelFn, FileHashes, ProgressFn, normalize_sha256
from .client import (
    DEFAULT_TIMEOUT, DOWNLOAD_CHUNK, MAX_REDIRECTS, REDIRECT_STATUSES, USER_AGENT, CivitaiClient, CivitaiError, DownloadError, RetryPolicy,
    _same_host, check_version, log, printable, redact, redirect_target,
)
from .lookup import _open_cache, run_sync

def _safe_filename(name: str) -> Optional[str]:
    name = unquote(name or "").replace("\\", "/").split("/")[-1].strip()
    name = printable(re.sub(r"[\x00-\x1f<>:\"|?*]", "_", name)).strip()
    if not name or name in (".", "..") or name.startswith("."):
        return None
    return name[:200]


def _disposition_name(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    m = re.search(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)", value)
    if m:
        return _safe_filename(m.group(1).strip().strip('"'))
    m = re.search(r'filename\s*=\s*"([^"]+)"', value) or re.search(r"filename\s*=\s*([^;]+)", value)
    return _safe_filename(m.group(1).strip()) if m else None


def _pick_file(version: dict) -> Optional[dict]:
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    for f in files:
        if f.get("primary"):
            return f
    for f in files:
        if f.get("type") == "Model":
            return f
    return files[0] if files else None


async def download_async(
    url_or_version_id,
    dest_folder: str | os.PathLike,
    sha256: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    *,
    api_key: Optional[str] = None,
    base_url: Optional[str] = None,
    filename: Optional[str] = None,
    overwrite: bool = False,
    cancel: Optional[CancelFn] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry: Optional[RetryPolicy] = None,
    cache=None,
) -> str:
    """See :func:`download`."""
    import aiohttp

    dest_folder = os.fspath(dest_folder)
    if not os.path.isdir(dest_folder):
        raise DownloadError(f"download folder {dest_folder} does not exist")
    client = CivitaiClient(base_url, api_key, timeout=timeout, retry=retry)
    retry = client.retry
    want = normalize_sha256(sha256) if sha256 else None
    if sha256 and want is None:
        raise DownloadError(f"expected SHA-256 {sha256[:80]!r} is not 64 hex digits")
    name = _safe_filename(filename) if filename else None
    if filename and name is None:
        raise DownloadError(f"file name {filename!r} is not usable")

    ref = url_or_version_id
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
        version_id = int(ref)
        async with client:
            try:
                v = await client.version(version_id)
            except CivitaiError as exc:
                raise DownloadError(f"cannot get CivitAI version {version_id}: {exc}") from None
        if v is None:
            raise DownloadError(f"CivitAI has no model version {version_id}")
        try:
            check_version(v)
        except CivitaiError as exc:
            raise DownloadError(f"cannot get CivitAI version {version_id}: {exc}") from None
        f = _pick_file(v)
        if f is not None:
            name = name or _safe_filename(f.get("name") or "")
            if want is None:
                want = normalize_sha256((f.get("hashes") or {}).get("SHA256"))
        url = (f or {}).get("downloadUrl") or v.get("downloadUrl") or f"{client.site}/api/download/models/{version_id}"
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"CivitAI gave version {version_id} a download address that is not an http or https address")
    else:
        url = str(ref).strip()
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"not a download address or version id: {redact(url, client._api_key)[:200]!r}")

    def final_path(n: str) -> str:
        return os.path.join(dest_folder, n)

    if name is not None and os.path.exists(final_path(name)):
        existing = final_path(name)
        if want is not None:
            from ..hashing import hash_file

            if hash_file(existing, ("sha256",)).sha256 == want:
                return existing
        if not overwrite:
            raise DownloadError(f"{existing} already exists; not overwritten")

    session_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    hasher = hashlib.sha256()
    done = 0
    total: Optional[int] = None
    attempt = 0
    clean = client._clean
    async with aiohttp.ClientSession(timeout=session_timeout, headers={"User-Agent": USER_AGENT}) as session:
        while True:
            partial = final_path(name) + ".partial" if name else None
            if partial and os.path.exists(partial) and done == 0:
                # resume: hash what is already there
                with open(partial, "rb") as pf:
                    while True:
                        b = pf.read(DOWNLOAD_CHUNK)
                        if not b:
                            break
                        hasher.update(b)
                        done += len(b)
            problem = None
            retry_after = None
            try:
                target = url
                for _ in range(MAX_REDIRECTS + 1):
                    headers = {}
                    if client._api_key and _same_host(target, client.base_url):
                        headers["Authorization"] = f"Bearer {client._api_key}"
                    if done:
                        headers["Range"] = f"bytes={done}-"
                    resp = await session.get(target, headers=headers, allow_redirects=False)
                    if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                        resp.release()
                        target = redirect_target(resp.url, resp.headers["Location"])
                        if target is None:
                            raise DownloadError(
                                "download failed: the server redirected to an address that is not an http or "
                                "https address; not followed"
                            )
                        continue
                    break
                else:
                    raise DownloadError(f"download failed: more than {MAX_REDIRECTS} redirects")
                async with resp:
                    status = resp.status
                    log.debug("download %s -> %s", clean(urlsplit(target).path), status)
                    if status == 416 and done:
                        total = done  # the partial file is already complete
                    elif status == 429 or status >= 500:
                        retry_after = resp.headers.get("Retry-After")
                        problem = f"the server answered {status}"
                    elif status in (401, 403):
                        raise DownloadError(
                            f"download refused (HTTP {status}): this file needs a CivitAI API key"
                            + (" and the key given is not accepted" if client._api_key else "")
                        )
                    elif status >= 400:
                        raise DownloadError(f"download failed: HTTP {status}")
                    else:
                        if name is None:
                            name = _disposition_name(resp.headers.get("Content-Disposition")) or _safe_filename(
                                urlsplit(str(resp.url)).path
                            )
                            if name is None:
                                raise DownloadError("the server gave no usable file name; pass filename=")
                            if os.path.exists(final_path(name)) and not overwrite:
                                raise DownloadError(f"{final_path(name)} already exists; not overwritten")
                            partial = final_path(name) + ".partial"
                        if status == 206:
                            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                            if not m or int(m.group(1)) != done:
                                raise DownloadError("the server answered a resumed download with the wrong range")
                            total = int(m.group(2)) if m.group(2) != "*" else None
                            mode = "ab"
                        else:
                            if done:
                                hasher = hashlib.sha256()
                                done = 0
                            length = resp.headers.get("Content-Length")
                            total = int(length) if length and length.isdigit() else None
                            mode = "wb"
                        with open(partial, mode) as out:
                            async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                                if cancel is not None and cancel():
                                    raise DownloadError(f"download cancelled; {partial} is kept to resume later")
                                out.write(chunk)
                                hasher.update(chunk)
                                done += len(chunk)
                                if progress is not None:
                                    progress(done, total or 0)
                        if total is not None and done < total:
                            problem = f"the connection closed after {done} of {total} bytes"
            except asyncio.TimeoutError:
                problem = f"no data for {timeout:g} s"
            except aiohttp.ClientError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            except OSError as exc:
                raise DownloadError(f"cannot write into {dest_folder}: {exc.strerror or exc}") from exc
            if problem is None:
                break
            if attempt >= retry.max_retries:
                raise DownloadError(clean(f"download failed: {problem} (gave up after {attempt + 1} tries)"))
            wait = retry.delay(attempt, retry_after)
            log.info("download: %s; retrying in %.1f s", clean(problem), wait)
            await asyncio.sleep(wait)
            attempt += 1

    got = hasher.hexdigest()
    if want is not None and got != want:
        os.unlink(partial)
        raise DownloadError(
            f"{name}: downloaded file has SHA-256 {got.upper()}, expected {want.upper()}; it was deleted"
        )
    target_path = final_path(name)
    if os.path.exists(target_path) and not overwrite:
        raise DownloadError(f"{target_path} appeared while downloading; not overwritten")
    os.replace(partial, target_path)
    store = _open_cache(cache)
    if store is not None:
        try:
            store.record(target_path, FileHashes(size=done, sha256=got))
        except ModelMergerError:
            pass
    return target_path


def download(
    url_or_version_id,
    dest_folder: str | os.PathLike,
    sha256: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    **kwargs,
) -> str:
    """Download a file (an address, or a CivitAI model version id) into ``dest_folder``; returns its path.

    Writes ``<name>.partial`` and renames it when complete; a ``.partial`` left by an earlier try is resumed with an
    HTTP Range request (when the name is known up front: a version id, or ``filename=``). The SHA-256 is verified
    against ``sha256`` (or, for a version id, CivitAI's hash of the file); a mismatch deletes the file and raises
    :class:`DownloadError`. An existing file is kept (returned as is when its SHA-256 matches) unless
    ``overwrite=True``. The API key is sent only to the API's host, never to a redirect target.
    ``progress(done_bytes, total_bytes or 0)``; ``cancel()`` true stops it, keeping the partial file. Options:
    ``api_key``, ``base_url``, ``filename``, ``overwrite``, ``cancel``, ``timeout`` (per read), ``retry``, ``cache``
    (``False`` for none)."""
    return run_sync(lambda: download_async(url_or_version_id, dest_folder, sha256, progress, **kwargs))

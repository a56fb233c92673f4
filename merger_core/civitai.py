"""CivitAI: look models up by hash, enrich scan manifests, download files.

* :class:`CivitaiClient` speaks the public REST API (``docs/civitai.md``) with aiohttp: ``GET
  /model-versions/by-hash/{sha256}`` (the answer is confirmed against ``files[].hashes.SHA256``), ``POST
  /model-versions/by-hash`` for up to 100 hashes at a time, ``GET /model-versions/{id}``. Timeouts; 429 and 5xx
  answers (and dropped connections) are retried with a doubling back-off (1 s up to 30 s, configurable); other 4xx
  answers are not retried.
* :func:`lookup_hashes` / :func:`lookup_report` put the cache (:mod:`merger_core.cache`) in front of it: answers
  are kept by SHA-256, "not found" for a configurable time, and ``offline=True`` serves the cache only.
* :func:`enrich_manifest` is ``scan --civitai``; :func:`download` is a resumable, verified download.

The API key comes from the caller (pack settings) or the ``CIVITAI_API_KEY`` environment variable. It is sent only
as an ``Authorization: Bearer`` header to the API's own host, and never appears in logs, error messages, results,
metadata or manifests (:func:`redact` is applied to every message built from outside text).

Everything here is blocking-free for an event loop only in the ``async`` functions; the plain functions
(:func:`lookup_report`, :func:`enrich_manifest`, :func:`download`) run their own event loop and are meant for a
worker thread (the ComfyUI node) or the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit

from .errors import ModelMergerError
from .hashing import CancelFn, FileHashes, ProgressFn, normalize_sha256

log = logging.getLogger("model_merger.civitai")

DEFAULT_BASE_URL = "https://civitai.com/api/v1"
ENV_API_KEY = "CIVITAI_API_KEY"
ENV_BASE_URL = "MODEL_MERGER_CIVITAI_URL"
BATCH_SIZE = 100
DEFAULT_TIMEOUT = 30.0
USER_AGENT = "model-merger (+https://github.com/model-merger/model-merger)"
MAX_IMAGES = 8
DOWNLOAD_CHUNK = 4 * 1024 * 1024

_DATA = os.path.join(os.path.dirname(__file__), "data", "civitai_base_models.json")


class CivitaiError(ModelMergerError):
    """CivitAI could not be reached or answered with something unusable."""


class DownloadError(ModelMergerError):
    """A download failed, was refused, or gave a file with the wrong hash."""


@dataclass
class RetryPolicy:
    """Retries for 429, 5xx, timeouts and dropped connections: waits ``backoff_start`` doubling up to
    ``backoff_max`` seconds (a ``Retry-After`` answer is honoured up to ``backoff_max``)."""

    max_retries: int = 5
    backoff_start: float = 1.0
    backoff_max: float = 30.0

    def delay(self, attempt: int, retry_after: Optional[str] = None) -> float:
        wait = min(self.backoff_start * (2 ** attempt), self.backoff_max)
        if retry_after:
            try:
                wait = min(max(float(retry_after), 0.0), self.backoff_max)
            except ValueError:
                pass
        return wait


# ---------------------------------------------------------------------------------------------------------------
# Secrets


def resolve_api_key(api_key: Optional[str] = None) -> Optional[str]:
    """The key given, else ``$CIVITAI_API_KEY``, else ``None`` (anonymous)."""
    key = (api_key or "").strip() or os.environ.get(ENV_API_KEY, "").strip()
    return key or None


def resolve_base_url(base_url: Optional[str] = None) -> str:
    url = (base_url or "").strip() or os.environ.get(ENV_BASE_URL, "").strip() or DEFAULT_BASE_URL
    return url.rstrip("/")


def redact(text: str, *secrets: Optional[str]) -> str:
    """``text`` with every secret (and ``token=`` / ``Bearer`` values) replaced by ``***``."""
    out = str(text)
    for s in secrets:
        if s:
            out = out.replace(s, "***")
    out = re.sub(r"(?i)(token=)[^&\s\"']+", r"\1***", out)
    out = re.sub(r"(?i)(bearer\s+)[^\s\"']+", r"\1***", out)
    return out


def site_url(base_url: str) -> str:
    """The site root for page and download addresses: the API base without its ``/api/v1`` tail."""
    base = base_url.rstrip("/")
    for tail in ("/api/v1", "/api"):
        if base.endswith(tail):
            return base[: -len(tail)]
    return base


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class CivitaiResult:
    """What CivitAI says about one file (by its SHA-256).

    ``status``: ``found``; ``not_found``; ``offline`` (offline mode and nothing cached); ``error`` (``message``
    says what). ``source``: ``civitai`` (asked now) or ``cache``. ``confirmed`` is False when CivitAI's answer could
    not be checked against the file's SHA-256 (an archived version lists no files)."""

    sha256: str
    status: str
    source: str = "civitai"
    confirmed: bool = False
    message: Optional[str] = None
    model_id: Optional[int] = None
    model_name: Optional[str] = None
    model_type: Optional[str] = None
    nsfw: Optional[bool] = None
    version_id: Optional[int] = None
    version_name: Optional[str] = None
    base_model: Optional[str] = None
    base_model_type: Optional[str] = None
    trained_words: List[str] = field(default_factory=list)
    file_name: Optional[str] = None
    file_format: Optional[str] = None
    file_precision: Optional[str] = None
    file_size_kb: Optional[float] = None
    page_url: Optional[str] = None
    image_urls: List[str] = field(default_factory=list)
    download_url: Optional[str] = None
    fetched: Optional[float] = None

    @property
    def found(self) -> bool:
        return self.status == "found"

    @classmethod
    def from_version(cls, sha256: str, version: Mapping[str, Any], site: str, source: str = "civitai") -> "CivitaiResult":
        sha = sha256.lower()
        files = version.get("files") or []
        mine = None
        for f in files:
            if isinstance(f, dict) and str(((f.get("hashes") or {}).get("SHA256") or "")).lower() == sha:
                mine = f
                break
        model = version.get("model") or {}
        images = [i.get("url") for i in (version.get("images") or []) if isinstance(i, dict) and i.get("url")]
        words = [str(w).strip() for w in (version.get("trainedWords") or []) if str(w).strip()]
        model_id = _int(version.get("modelId"))
        version_id = _int(version.get("id"))
        page = None
        if model_id is not None:
            page = f"{site}/models/{model_id}" + (f"?modelVersionId={version_id}" if version_id is not None else "")
        meta = (mine or {}).get("metadata") or {}
        r = cls(
            sha256=sha,
            status="found",
            source=source,
            confirmed=mine is not None,
            model_id=model_id,
            model_name=_str(model.get("name")),
            model_type=_str(model.get("type")),
            nsfw=model.get("nsfw") if isinstance(model.get("nsfw"), bool) else None,
            version_id=version_id,
            version_name=_str(version.get("name")),
            base_model=_str(version.get("baseModel")),
            base_model_type=_str(version.get("baseModelType")),
            trained_words=words,
            file_name=_str((mine or {}).get("name")),
            file_format=_str(meta.get("format")),
            file_precision=_str(meta.get("fp")),
            file_size_kb=(mine or {}).get("sizeKB") if isinstance((mine or {}).get("sizeKB"), (int, float)) else None,
            page_url=page,
            image_urls=images[:MAX_IMAGES],
            download_url=_str((mine or {}).get("downloadUrl") or version.get("downloadUrl")),
        )
        if mine is None:
            r.message = "CivitAI lists no file with this SHA-256 for the version (archived?); the match is unconfirmed"
        return r

    def manifest_dict(self) -> Dict[str, Any]:
        """The compact form stored in a manifest entry's ``civitai`` field (no secrets, no local paths)."""
        if not self.found:
            return {"status": self.status, **({"message": self.message} if self.message else {})}
        d = {
            "status": "found",
            "confirmed": self.confirmed,
            "model_id": self.model_id,
            "model_name": self.model_name,
            "version_id": self.version_id,
            "version_name": self.version_name,
            "base_model": self.base_model,
            "base_model_type": self.base_model_type,
            "type": self.model_type,
            "trained_words": list(self.trained_words),
            "format": self.file_format,
            "precision": self.file_precision,
            "page": self.page_url,
        }
        return {k: v for k, v in d.items() if v not in (None, [], "")}

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _int(v) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v) -> Optional[str]:
    return v if isinstance(v, str) and v else None


# ---------------------------------------------------------------------------------------------------------------
# The HTTP client


class CivitaiClient:
    """An aiohttp client for the CivitAI API. Use as ``async with CivitaiClient(...) as c:``."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Optional[RetryPolicy] = None,
    ):
        self.base_url = resolve_base_url(base_url)
        self.site = site_url(self.base_url)
        self._api_key = resolve_api_key(api_key)
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        self._session = None
        self.requests_made = 0

    def __repr__(self) -> str:
        return f"CivitaiClient(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'none'})"

    @property
    def has_key(self) -> bool:
        return self._api_key is not None

    async def __aenter__(self) -> "CivitaiClient":
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers_for(self, url: str) -> Dict[str, str]:
        if self._api_key and _same_host(url, self.base_url):
            return {"Authorization": f"Bearer {self._api_key}"}
        return {}

    def _clean(self, text: str) -> str:
        return redact(text, self._api_key)

    async def _request(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """Send one API request with retries; returns (status, parsed JSON or None for a 404)."""
        import aiohttp

        if self._session is None:
            raise RuntimeError("CivitaiClient must be used inside 'async with'")
        url = self.base_url + path
        what = f"{method} {path}"
        attempt = 0
        while True:
            self.requests_made += 1
            problem: Optional[str] = None
            retry_after = None
            try:
                async with self._session.request(method, url, json=body, headers=self._headers_for(url)) as resp:
                    status = resp.status
                    log.debug("CivitAI %s -> %s", what, status)
                    if status == 404:
                        return 404, None
                    if status == 429 or status >= 500:
                        retry_after = resp.headers.get("Retry-After")
                        problem = f"CivitAI answered {status} to {what}"
                    elif status >= 400:
                        detail = await _error_detail(resp)
                        hint = " (an API key may be needed, or the key is not valid)" if status in (401, 403) else ""
                        raise CivitaiError(self._clean(f"CivitAI refused {what}: HTTP {status}{detail}{hint}"))
                    else:
                        text = await resp.text()
                        try:
                            return status, json.loads(text)
                        except ValueError:
                            raise CivitaiError(
                                self._clean(f"CivitAI answered {what} with text that is not JSON: {text[:120]!r}")
                            ) from None
            except asyncio.TimeoutError:
                problem = f"CivitAI did not answer {what} within {self.timeout:g} s"
            except aiohttp.ClientConnectorError as exc:
                # nothing listens there (offline, wrong address): one more try, not the full back-off
                problem = f"cannot reach CivitAI at {self.site} for {what}: {exc.__class__.__name__}: {exc}"
                if attempt >= min(1, self.retry.max_retries):
                    raise CivitaiError(self._clean(f"{problem} (gave up after {attempt + 1} tries)")) from None
            except aiohttp.ClientError as exc:
                problem = f"CivitAI connection failed for {what}: {exc.__class__.__name__}: {exc}"
            if attempt >= self.retry.max_retries:
                raise CivitaiError(self._clean(f"{problem} (gave up after {attempt + 1} tries)"))
            wait = self.retry.delay(attempt, retry_after)
            log.info("%s; retrying in %.1f s", self._clean(problem), wait)
            await asyncio.sleep(wait)
            attempt += 1

    async def version_by_hash(self, sha256: str) -> Optional[dict]:
        """The version JSON for a hash, or ``None`` if CivitAI does not know it (404)."""
        status, doc = await self._request("GET", f"/model-versions/by-hash/{sha256.strip().upper()}")
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise CivitaiError("CivitAI answered a by-hash lookup with JSON that is not an object")
        return doc

    async def versions_by_hashes(self, hashes: Sequence[str]) -> List[dict]:
        """Versions found for up to :data:`BATCH_SIZE` SHA-256 hashes (misses are left out by CivitAI)."""
        if len(hashes) > BATCH_SIZE:
            raise ValueError(f"at most {BATCH_SIZE} hashes per request")
        status, doc = await self._request("POST", "/model-versions/by-hash", [h.strip().upper() for h in hashes])
        if doc is None:
            return []
        if not isinstance(doc, list):
            raise CivitaiError("CivitAI answered a batch lookup with JSON that is not a list")
        return [v for v in doc if isinstance(v, dict)]

    async def version(self, version_id: int) -> Optional[dict]:
        status, doc = await self._request("GET", f"/model-versions/{int(version_id)}")
        return doc if isinstance(doc, dict) else None

    async def model(self, model_id: int) -> Optional[dict]:
        status, doc = await self._request("GET", f"/models/{int(model_id)}")
        return doc if isinstance(doc, dict) else None


async def _error_detail(resp) -> str:
    try:
        text = await resp.text()
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return f" ({doc['error'][:200]})"
    except Exception:
        pass
    return ""


def _same_host(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


# ---------------------------------------------------------------------------------------------------------------
# Lookups through the cache


def _versions_for(sha: str, versions: Iterable[dict]) -> Optional[dict]:
    for v in versions:
        for f in v.get("files") or []:
            if isinstance(f, dict) and str(((f.get("hashes") or {}).get("SHA256") or "")).lower() == sha:
                return v
    return None


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
    hash). Returns ``{sha256 (lower case): CivitaiResult}``; network problems give ``status="error"`` results."""
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
        if entry is not None:
            if entry.found:
                r = CivitaiResult.from_version(s, entry.data, site, source="cache")
            else:
                r = CivitaiResult(s, "not_found", source="cache", message="not on CivitAI (remembered)")
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
            r = CivitaiResult.from_version(s, v, site)
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
                v = _versions_for(s, versions)
                if v is None:
                    _remember(cache, s, None)
                    results[s] = CivitaiResult(s, "not_found", message="not on CivitAI")
                else:
                    _remember(cache, s, v)
                    r = CivitaiResult.from_version(s, v, site)
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
        from .cache import open_cache

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
    hashing. ``cache=False`` uses no cache at all."""
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
            from .hashing import hash_file

            h = hash_file(p, ("sha256",), progress=cb, cancel=cancel)
        hashed.append((p, h))
    results = lookup_hashes(
        [h.sha256 for _, h in hashed], cache=store, offline=offline, refresh=refresh, api_key=api_key,
        base_url=base_url, timeout=timeout, retry=retry, negative_ttl=negative_ttl,
    )
    return [(p, h, results[h.sha256]) for p, h in hashed]


def format_result(name: str, hashes: FileHashes, r: CivitaiResult) -> str:
    lines = [f"{name}", f"  SHA256 {hashes.sha256.upper()}  AutoV2 {hashes.autov2.upper()}"]
    if r.status == "found":
        lines.append(f"  Model: {r.model_name or '?'} / version {r.version_name or '?'} "
                     f"(model {r.model_id}, version {r.version_id})")
        base = r.base_model or "?"
        if r.base_model_type and r.base_model_type != "Standard":
            base += f" ({r.base_model_type})"
        lines.append(f"  Base model: {base}; type: {r.model_type or '?'}")
        if r.trained_words:
            lines.append(f"  Trained words: {', '.join(r.trained_words)}")
        if r.file_format or r.file_precision:
            lines.append(f"  File: {r.file_format or '?'} {r.file_precision or ''}".rstrip())
        if r.page_url:
            lines.append(f"  Page: {r.page_url}")
        if r.image_urls:
            lines.append(f"  Images: {' '.join(r.image_urls[:3])}" + (" ..." if len(r.image_urls) > 3 else ""))
        if not r.confirmed and r.message:
            lines.append(f"  Note: {r.message}")
    elif r.status == "not_found":
        lines.append(f"  Not on CivitAI{' (remembered from an earlier lookup)' if r.source == 'cache' else ''}"
                     + (f": {r.message}" if r.message and 'version' in r.message else ""))
    elif r.status == "offline":
        lines.append("  Offline: not in the local cache")
    else:
        lines.append(f"  Lookup failed: {r.message}")
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
            for w in r.trained_words:
                if w not in words:
                    words.append(w)
            if r.base_model and r.base_model not in bases:
                bases.append(r.base_model)
    return "\n\n".join(parts), ", ".join(words), ", ".join(bases)


# ---------------------------------------------------------------------------------------------------------------
# scan --civitai


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
    """The file's structure: :func:`merger_core.analyze.detect.detect`'s architecture id when it recognises the
    file, else :func:`merger_core.archprobe.probe_architecture`'s ModelSpec string (``"unknown"`` if neither does).
    Cached as fact ``civitai.structure``."""
    if cache is not None:
        got = cache.get_fact(path, "civitai.structure")
        if isinstance(got, str):
            return got
    from .safetensors_io import read_header

    header = read_header(path)
    arch = "unknown"
    try:
        from .analyze.detect import detect_header
    except ImportError:  # pragma: no cover - analyze is part of the package
        detect_header = None
    if detect_header is not None:
        try:
            det = detect_header(header)
            if det.known:
                arch = det.arch_id
        except ModelMergerError:
            pass
    if arch == "unknown":
        from .archprobe import probe_architecture

        arch = probe_architecture(header.tensors)
    if cache is not None:
        cache.put_fact(path, "civitai.structure", arch)
    return arch


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
    ``civitai``) or a list of such entries or dicts. Relative paths resolve against ``base_dir``."""
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
            from .hashing import hash_file

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
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Downloads


def _safe_filename(name: str) -> Optional[str]:
    name = unquote(name or "").replace("\\", "/").split("/")[-1].strip()
    name = re.sub(r"[\x00-\x1f<>:\"|?*]", "_", name)
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
    from yarl import URL

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
        f = _pick_file(v)
        if f is not None:
            name = name or _safe_filename(f.get("name") or "")
            if want is None:
                want = normalize_sha256((f.get("hashes") or {}).get("SHA256"))
        url = (f or {}).get("downloadUrl") or v.get("downloadUrl") or f"{client.site}/api/download/models/{version_id}"
    else:
        url = str(ref).strip()
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"not a download address or version id: {redact(url, client._api_key)[:200]!r}")

    def final_path(n: str) -> str:
        return os.path.join(dest_folder, n)

    if name is not None and os.path.exists(final_path(name)):
        existing = final_path(name)
        if want is not None:
            from .hashing import hash_file

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
                for _ in range(10):
                    headers = {}
                    if client._api_key and _same_host(target, client.base_url):
                        headers["Authorization"] = f"Bearer {client._api_key}"
                    if done:
                        headers["Range"] = f"bytes={done}-"
                    resp = await session.get(target, headers=headers, allow_redirects=False)
                    if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                        target = str(resp.url.join(URL(resp.headers["Location"])))
                        resp.release()
                        continue
                    break
                else:
                    raise DownloadError("too many redirects")
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

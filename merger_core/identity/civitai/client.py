"""CivitAI: the HTTP client, its settings (API key, base URL, retries) and its answers.

The package splits the rest by concern: :mod:`.lookup` (cached lookups and their text), :mod:`.families`
(CivitAI's base-model names against the file's structure), :mod:`.enrich` (``scan --civitai``) and :mod:`.download`.


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

Nothing CivitAI says is trusted as it comes: an answer whose parts have the wrong JSON types is one failed lookup
(:class:`CivitaiError`, "malformed answer"), never a crash, and every text taken from an answer or an error body
goes through :func:`printable` (no control characters, no bidi overrides) before it is kept or shown. Redirects
are followed by hand, to http and https addresses only. A timeout must be a number of seconds above 0 and at most
:data:`MAX_TIMEOUT`.

Everything here is blocking-free for an event loop only in the ``async`` functions; the plain functions
(:func:`lookup_report`, :func:`enrich_manifest`, :func:`download`) run their own event loop and are meant for a
worker thread (the ComfyUI node) or the CLI.
"""


from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from ...errors import ModelMergerError

log = logging.getLogger("model_merger.civitai")

DEFAULT_BASE_URL = "https://civitai.com/api/v1"
ENV_API_KEY = "CIVITAI_API_KEY"
ENV_BASE_URL = "MODEL_MERGER_CIVITAI_URL"
BATCH_SIZE = 100
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
MAX_REDIRECTS = 10
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "model-merger (+https://github.com/model-merger/model-merger)"
MAX_IMAGES = 8
DOWNLOAD_CHUNK = 4 * 1024 * 1024




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


# C0 controls (tab and newline too), DEL, C1 controls, and the bidi embeddings, overrides and isolates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: Any) -> str:
    """``text`` without control characters (C0 including tab and newline, DEL, C1) and bidi overrides
    (U+202A-U+202E, U+2066-U+2069), so that text chosen by uploaders or sent by a server cannot move the cursor,
    retitle or clear the terminal, start a forged report line or reorder what is shown. Letters, marks, symbols
    and spaces of any script are kept. ``None`` gives ``""``."""
    if text is None:
        return ""
    return _CONTROL.sub("", str(text))


def check_timeout(timeout: Any) -> float:
    """``timeout`` as seconds if it is a finite number above 0 and at most :data:`MAX_TIMEOUT`; ``None`` is the
    default. Anything else is a :class:`ModelMergerError` (before any network use)."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    value = float(timeout) if ok else math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        shown = printable(repr(timeout) if not ok else f"{value:g}")[:40]
        raise ModelMergerError(
            f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} (got {shown})"
        )
    return value


def redirect_target(base, location: str) -> Optional[str]:
    """The address a redirect from ``base`` (a :class:`yarl.URL`) with ``Location: location`` leads to, or
    ``None`` if it is not an http or https address (``file:``, ``ftp:``, unreadable)."""
    from yarl import URL

    try:
        target = base.join(URL(location))
    except (ValueError, TypeError):
        return None
    if target.scheme not in ("http", "https") or not target.host:
        return None
    return str(target)


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
        """The result for ``sha256`` from CivitAI's version JSON. Raises :class:`CivitaiError` when the JSON is
        malformed (see :func:`check_version`); every text in the result is :func:`printable`."""
        check_version(version)
        sha = sha256.lower()
        files = version.get("files") or []
        mine = None
        for f in files:
            if _file_sha256(f) == sha:
                mine = f
                break
        model = version.get("model") or {}
        images = [_str(i.get("url")) for i in (version.get("images") or []) if _str(i.get("url"))]
        words = [printable(w).strip() for w in (version.get("trainedWords") or []) if printable(w).strip()]
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
    return (printable(v) or None) if isinstance(v, str) else None


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return "something else"


def _malformed(version: Any, problem: str) -> CivitaiError:
    vid = _int(version.get("id")) if isinstance(version, dict) else None
    about = f" (version {vid})" if vid is not None else ""
    return CivitaiError(f"CivitAI sent a malformed answer{about}: {problem}")


def _version_files(version: Any) -> List[dict]:
    """The ``files`` of a version answer, checked: a list of objects whose ``hashes`` is an object."""
    if not isinstance(version, dict):
        raise _malformed(version, f"a model version is {_kind(version)}, not an object")
    files = version.get("files")
    if files is None:
        return []
    if not isinstance(files, list):
        raise _malformed(version, f"'files' is {_kind(files)}, not a list")
    for f in files:
        if not isinstance(f, dict):
            raise _malformed(version, f"an entry of 'files' is {_kind(f)}, not an object")
        for name in ("hashes", "metadata"):
            if f.get(name) is not None and not isinstance(f[name], dict):
                raise _malformed(version, f"a file's '{name}' is {_kind(f[name])}, not an object")
    return files


def check_version(version: Any) -> None:
    """Raise :class:`CivitaiError` ("malformed answer") unless ``version`` has the JSON types the API documents
    where this program reads it: an object; ``model`` an object; ``files`` a list of objects (their ``hashes`` and
    ``metadata`` objects); ``images`` a list of objects; ``trainedWords`` a list of strings (or numbers). Missing
    or null parts are fine; single values of the wrong type are ignored where they are read."""
    _version_files(version)
    model = version.get("model")
    if model is not None and not isinstance(model, dict):
        raise _malformed(version, f"'model' is {_kind(model)}, not an object")
    images = version.get("images")
    if images is not None:
        if not isinstance(images, list):
            raise _malformed(version, f"'images' is {_kind(images)}, not a list")
        for i in images:
            if not isinstance(i, dict):
                raise _malformed(version, f"an entry of 'images' is {_kind(i)}, not an object")
    words = version.get("trainedWords")
    if words is not None:
        if not isinstance(words, list):
            raise _malformed(version, f"'trainedWords' is {_kind(words)}, not a list")
        for w in words:
            if isinstance(w, bool) or not isinstance(w, (str, int, float)):
                raise _malformed(version, f"an entry of 'trainedWords' is {_kind(w)}, not a string")


def _file_sha256(f: dict) -> str:
    return str((f.get("hashes") or {}).get("SHA256") or "").strip().lower()


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
        self.timeout = check_timeout(timeout)
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
        """A message built from outside text, fit to show: no secrets, no control characters."""
        return printable(redact(text, self._api_key))

    async def _send(self, method: str, url: str, body: Any, what: str):
        """One request, following redirects by hand (at most :data:`MAX_REDIRECTS`): only to http and https
        addresses, and with the API key only for the API's own host. Returns the final response (to be released)."""
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._session.request(
                method, target, json=body, headers=self._headers_for(target), allow_redirects=False
            )
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            target = redirect_target(resp.url, location)
            if target is None:
                raise CivitaiError(
                    f"CivitAI redirected {what} to an address that is not an http or https address; not followed"
                )
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise CivitaiError(f"CivitAI redirected {what} more than {MAX_REDIRECTS} times; not followed")

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
                async with await self._send(method, url, body, what) as resp:
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

    async def versions_by_hashes(self, hashes: Sequence[str]) -> List[Any]:
        """Versions found for up to :data:`BATCH_SIZE` SHA-256 hashes (misses are left out by CivitAI), as sent:
        an item may be malformed, which :func:`_versions_for` and :meth:`CivitaiResult.from_version` find."""
        if len(hashes) > BATCH_SIZE:
            raise ValueError(f"at most {BATCH_SIZE} hashes per request")
        status, doc = await self._request("POST", "/model-versions/by-hash", [h.strip().upper() for h in hashes])
        if doc is None:
            return []
        if not isinstance(doc, list):
            raise CivitaiError("CivitAI answered a batch lookup with JSON that is not a list")
        return list(doc)

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
            return f" ({printable(doc['error'])[:200]})"
    except Exception:
        pass
    return ""


def _same_host(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


# ---------------------------------------------------------------------------------------------------------------
# Lookups through the cache


def _versions_for(sha: str, versions: Iterable[Any]) -> Optional[dict]:
    """The version of a batch answer whose files list ``sha``, or ``None``. When none does and an item of the
    answer could not be read (malformed), whether ``sha`` is on CivitAI is unknown: :class:`CivitaiError`, so that
    it is not remembered as "not on CivitAI"."""
    unreadable: Optional[CivitaiError] = None
    for v in versions:
        try:
            files = _version_files(v)
        except CivitaiError as exc:
            unreadable = unreadable or exc
            continue
        for f in files:
            if _file_sha256(f) == sha:
                return v
    if unreadable is not None:
        raise CivitaiError(f"{unreadable}; whether this file is on CivitAI is not known")
    return None

"""A local SQLite cache: file hashes, parsed header facts, and CivitAI answers.

* **File hashes** are keyed by real path, size and modification time (ns). A changed file is rehashed. A file that
  is not known under its path is looked for among the files already known with the same size and the same few
  sampled 64 KiB blocks (:func:`merger_core.hashing.sample_signature`, a pre-filter only: the samples never prove
  anything). Its hashes are reused without reading it only when it is provably the same file: the same device and
  inode and the same modification time (a rename or move within one file system, or a hard link). Anything else
  (a copy, a move across file systems, another file that happens to match the samples) is hashed in full; when its
  full-file SHA-256 (or BLAKE3) then equals a known file's whose old path is gone, that entry (its other hashes and
  its facts) is taken over.
* **Facts** are any JSON value about a file (parsed header facts, structure results), keyed by the file's identity
  and a ``kind`` string; a fact is dropped when the file changes. See :meth:`HashCache.get_fact`.
* **CivitAI answers** are keyed by SHA-256. "Not found" answers are remembered too, for ``negative_ttl`` seconds.

The database lives in :func:`merger_core.userdirs.cache_db_path` unless a path is given. It uses WAL mode, short
transactions and a busy timeout, so the ComfyUI server and a CLI run can use it at the same time. A database file that
SQLite cannot read is moved aside (``*.corrupt-<time>``) and rebuilt; if even that fails the cache carries on in
memory. Cache problems never stop a hash or a scan: they are logged and the work is done without the cache.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .hashing import DEFAULT_ALGORITHMS, FileHashes, CancelFn, ProgressFn, hash_file, normalize_algorithms, sample_signature
from ..errors import BadFileError
from ..host import userdirs
from ..io.files import not_regular_reason

log = logging.getLogger("model_merger.cache")

SCHEMA_VERSION = 2  # 2: files.dev and files.ino (a version 1 database gets the columns, and keeps its rows)
DEFAULT_NEGATIVE_TTL = 7 * 24 * 3600.0
BUSY_TIMEOUT_S = 15.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sample TEXT,
    sha256 TEXT,
    autov1 TEXT,
    autov3 TEXT,
    autov3_checked INTEGER NOT NULL DEFAULT 0,
    crc32 TEXT,
    blake3 TEXT,
    updated REAL NOT NULL,
    dev INTEGER,
    ino INTEGER
);
CREATE INDEX IF NOT EXISTS files_by_size ON files(size, sample);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS facts (
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    value TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (path, kind)
);
CREATE TABLE IF NOT EXISTS civitai (
    sha256 TEXT PRIMARY KEY,
    found INTEGER NOT NULL,
    data TEXT,
    fetched REAL NOT NULL
);
"""

_HASH_COLUMNS = ("sha256", "autov1", "autov3", "crc32", "blake3")


@dataclass
class CivitaiEntry:
    """A cached CivitAI answer: ``found`` False is a remembered "not on CivitAI"."""

    sha256: str
    found: bool
    data: Optional[dict]
    fetched: float


@dataclass(frozen=True)
class FileIdentity:
    path: str  # real path
    size: int
    mtime_ns: int
    dev: int = 0  # device and inode: 0 where the platform gives none
    ino: int = 0

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileIdentity":
        real = os.path.realpath(os.fspath(path))
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise BadFileError(f"{os.fspath(path)}: file not found") from None
        except PermissionError:
            raise BadFileError(f"{os.fspath(path)}: permission denied") from None
        except OSError as exc:
            raise BadFileError(f"{os.fspath(path)}: cannot be read ({exc.strerror or exc})") from None
        special = not_regular_reason(os.fspath(path), st)
        if special is not None:
            raise BadFileError(special)
        return cls(real, st.st_size, st.st_mtime_ns, st.st_dev or 0, st.st_ino or 0)

    def same_inode(self, dev: Optional[int], ino: Optional[int]) -> bool:
        """True when ``(dev, ino)`` (as stored) is this file's device and inode; never for unknown values."""
        return bool(self.ino) and dev is not None and ino is not None and (dev, ino) == (self.dev, self.ino)


@dataclass
class _Known:
    """A row of ``files`` found for another path: a candidate for the same file."""

    path: str
    mtime_ns: int
    dev: Optional[int]
    ino: Optional[int]
    hashes: FileHashes

    def gone(self) -> bool:
        """True when the file this row was about is no longer at its path (moved away, deleted or replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        if self.dev is None or self.ino is None or not st.st_ino:
            return False
        return (st.st_dev, st.st_ino) != (self.dev, self.ino)


class HashCache:
    """The cache. Thread-safe (one connection behind a lock); several processes may open the same file."""

    def __init__(self, db_path: Optional[str | os.PathLike] = None, negative_ttl: float = DEFAULT_NEGATIVE_TTL):
        self.db_path = os.fspath(db_path) if db_path is not None else userdirs.cache_db_path(create_dir=False)
        self.negative_ttl = float(negative_ttl)
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = None
        self.in_memory = False
        self.recovered_from: Optional[str] = None  # where a corrupt file was moved, if that happened
        with self._lock:
            self._open()

    # -- connection ---------------------------------------------------------------------------------------------
    def _connect(self, path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            if path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                _add_inode_columns(conn)
            elif version not in (0, SCHEMA_VERSION):
                # a cache from another layout: start over (it is only a cache)
                conn.executescript(
                    "DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS facts; DROP TABLE IF EXISTS civitai;"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.db_path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            log.warning("the hash cache cannot be kept in %s (%s); using a temporary in-memory cache for this run",
                        folder, userdirs.folder_problem(folder, exc))
            self._memory()
            return
        for attempt in (0, 1):
            try:
                self._conn = self._connect(self.db_path)
                return
            except sqlite3.OperationalError as exc:
                if _is_busy(exc) and not attempt:
                    continue
                if not _is_corrupt(exc):
                    log.warning("hash cache %s cannot be opened (%s); using a temporary in-memory cache",
                                self.db_path, exc)
                    self._memory()
                    return
                break
            except sqlite3.DatabaseError:
                break
        self._rebuild()

    def _memory(self) -> None:
        self._conn = self._connect(":memory:")
        self.in_memory = True

    def _rebuild(self) -> None:
        """Move a corrupt database aside and start a new one."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        aside = f"{self.db_path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            if os.path.exists(self.db_path):
                os.replace(self.db_path, aside)
                self.recovered_from = aside
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.db_path + suffix):
                    os.replace(self.db_path + suffix, aside + suffix)
            log.warning("hash cache %s was unreadable; moved to %s and rebuilt", self.db_path, aside)
            self._conn = self._connect(self.db_path)
        except (OSError, sqlite3.Error) as exc:
            log.warning("hash cache %s could not be rebuilt (%s); using a temporary in-memory cache", self.db_path, exc)
            self._memory()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "HashCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, fn: Callable[[sqlite3.Connection], Any], write: bool = False, default: Any = None) -> Any:
        """Run ``fn(conn)`` in one short transaction; never raises a database error."""
        with self._lock:
            for attempt in (0, 1):
                if self._conn is None:
                    self._open()
                conn = self._conn
                try:
                    if write:
                        conn.execute("BEGIN IMMEDIATE")
                        try:
                            result = fn(conn)
                            conn.execute("COMMIT")
                        except BaseException:
                            try:
                                if conn.in_transaction:
                                    conn.execute("ROLLBACK")
                            except sqlite3.Error:
                                pass
                            raise
                        return result
                    return fn(conn)
                except sqlite3.OperationalError as exc:
                    if _is_busy(exc):
                        log.warning("hash cache busy (%s); continuing without it for this step", exc)
                        return default
                    if not _is_corrupt(exc) or attempt:
                        log.warning("hash cache error (%s); continuing without it for this step", exc)
                        return default
                    self._rebuild()
                except sqlite3.DatabaseError as exc:
                    if attempt:
                        log.warning("hash cache error (%s); continuing without it for this step", exc)
                        return default
                    self._rebuild()
            return default

    # -- file hashes --------------------------------------------------------------------------------------------
    def lookup(self, path: str | os.PathLike, algorithms: Iterable[str] | str | None = DEFAULT_ALGORITHMS) -> Optional[FileHashes]:
        """Cached hashes of ``path`` if they cover ``algorithms`` and the file has not changed; no file reads."""
        ident = FileIdentity.of(path)
        row = self._row(ident)
        if row is not None and row.has(algorithms):
            return row
        return None

    def hashes(
        self,
        path: str | os.PathLike,
        algorithms: Iterable[str] | str | None = DEFAULT_ALGORITHMS,
        *,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        **hash_kwargs,
    ) -> FileHashes:
        """Hashes of ``path``: from the cache when the file is unchanged (or recognised after a move), otherwise
        computed in one pass (only the missing ones) and stored."""
        names = normalize_algorithms(algorithms)
        ident = FileIdentity.of(path)
        known = self._row(ident)
        sample: Optional[str] = None
        others: list = []
        if known is None:
            try:
                sample = sample_signature(ident.path, ident.size)
            except OSError as exc:
                raise BadFileError(f"{os.fspath(path)}: cannot be read ({exc.strerror or exc})") from exc
            others = self._known_elsewhere(ident, sample)
            known = self._adopt_moved(ident, sample, others)
        if known is not None and known.has(names):
            if progress is not None:
                progress(ident.size, ident.size)
            return known
        missing = [n for n in names if known is None or not known.has([n])]
        fresh = hash_file(ident.path, missing, progress=progress, cancel=cancel, **hash_kwargs)
        result = fresh.merged_with(known) if known is not None else fresh
        twin = _proven_twin(fresh, others) if known is None else None
        if twin is not None:  # the full hash shows the same bytes: the known entry's other hashes apply too
            result = result.merged_with(twin.hashes)
        after = FileIdentity.of(ident.path)
        if after == ident:  # do not store hashes of a file that changed while it was read
            if sample is None:
                sample = self._sample_of(ident)
            if twin is not None and twin.gone():
                self._take_over(ident, sample, result, twin.path)
                log.debug("recognised %s as %s by its full hash; entry taken over", ident.path, twin.path)
            else:
                self.record(ident, result, sample=sample)
        return result

    def record(self, path_or_ident, hashes: FileHashes, sample: Optional[str] = None) -> None:
        """Store known hashes of a file (e.g. a merge output whose tensor-data hash came from the writer)."""
        ident = path_or_ident if isinstance(path_or_ident, FileIdentity) else FileIdentity.of(path_or_ident)
        if hashes.size != ident.size:
            return
        if sample is None:
            try:
                sample = sample_signature(ident.path, ident.size)
            except OSError:
                sample = None

        def write(conn):
            old = _row_to_hashes(conn.execute(_SELECT_ROW, (ident.path,)).fetchone(), ident)
            merged = hashes.merged_with(old) if old is not None else hashes
            _insert_row(conn, ident, sample, merged)

        self._run(write, write=True)

    def _sample_of(self, ident: FileIdentity) -> Optional[str]:
        try:
            return sample_signature(ident.path, ident.size)
        except OSError:
            return None

    def _row(self, ident: FileIdentity) -> Optional[FileHashes]:
        return self._run(lambda c: _row_to_hashes(c.execute(_SELECT_ROW, (ident.path,)).fetchone(), ident))

    def _known_elsewhere(self, ident: FileIdentity, sample: str) -> list:
        """Rows for other paths with the same size and samples: candidates, never proof, of the same file."""

        def find(conn):
            return conn.execute(
                "SELECT path, size, mtime_ns, dev, ino, sha256, autov1, autov3, autov3_checked, crc32, blake3 "
                "FROM files WHERE size = ? AND sample = ? AND path != ?",
                (ident.size, sample, ident.path),
            ).fetchall()

        rows = self._run(find, default=[]) or []
        return [_Known(r[0], r[2], r[3], r[4], _hashes_from(r[1], r[5:])) for r in rows]

    def _adopt_moved(self, ident: FileIdentity, sample: str, others: list) -> Optional[FileHashes]:
        """The hashes of the same file known under another path, when that is provable without reading it: the
        same device, inode and modification time (a rename or move within one file system, or a hard link)."""
        for known in others:
            if not (ident.same_inode(known.dev, known.ino) and known.mtime_ns == ident.mtime_ns):
                continue
            if known.gone():
                self._take_over(ident, sample, known.hashes, known.path)
            else:  # a hard link: both names stay
                self.record(ident, known.hashes, sample=sample)
            log.debug("recognised %s as %s (same inode); hashes reused", ident.path, known.path)
            return known.hashes
        return None

    def _take_over(self, ident: FileIdentity, sample: Optional[str], hashes: FileHashes, old_path: str) -> None:
        """Store ``hashes`` for ``ident`` and move the entry (row and facts) of ``old_path``, where the same file
        was before, to it."""

        def move(conn):
            _insert_row(conn, ident, sample, hashes)
            conn.execute("DELETE FROM files WHERE path = ?", (old_path,))
            conn.execute("DELETE FROM facts WHERE path = ?", (ident.path,))
            conn.execute(
                "UPDATE facts SET path = ?, mtime_ns = ? WHERE path = ? AND size = ?",
                (ident.path, ident.mtime_ns, old_path, ident.size),
            )

        self._run(move, write=True)

    def paths_with_sha256(self, sha256: str) -> List[str]:
        """Paths the cache knows with this full-file SHA-256 whose size and modification time still match (a
        candidate is proof only once :meth:`lookup` agrees; the file is not read here)."""
        value = (sha256 or "").lower()

        def find(conn):
            return conn.execute("SELECT path FROM files WHERE sha256 = ? ORDER BY updated DESC", (value,)).fetchall()

        out = []
        for (path,) in self._run(find, default=[]) or []:
            try:
                known = self.lookup(path, ("sha256",))
            except BadFileError:
                continue
            if known is not None and known.sha256 == value:
                out.append(path)
        return out

    def forget(self, path: str | os.PathLike) -> None:
        real = os.path.realpath(os.fspath(path))

        def delete(conn):
            conn.execute("DELETE FROM files WHERE path = ?", (real,))
            conn.execute("DELETE FROM facts WHERE path = ?", (real,))

        self._run(delete, write=True)

    # -- facts --------------------------------------------------------------------------------------------------
    def get_fact(self, path: str | os.PathLike, kind: str) -> Optional[Any]:
        """The JSON value stored for ``(path, kind)`` while the file is unchanged, else ``None``."""
        ident = FileIdentity.of(path)

        def get(conn):
            return conn.execute(
                "SELECT value FROM facts WHERE path = ? AND kind = ? AND size = ? AND mtime_ns = ?",
                (ident.path, kind, ident.size, ident.mtime_ns),
            ).fetchone()

        row = self._run(get)
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError:
            return None

    def put_fact(self, path: str | os.PathLike, kind: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` about the file as it is now."""
        ident = FileIdentity.of(path)
        text = json.dumps(value, sort_keys=True)

        def put(conn):
            conn.execute(
                "INSERT OR REPLACE INTO facts (path, kind, size, mtime_ns, value, updated) VALUES (?,?,?,?,?,?)",
                (ident.path, kind, ident.size, ident.mtime_ns, text, time.time()),
            )

        self._run(put, write=True)

    # -- CivitAI ------------------------------------------------------------------------------------------------
    def get_civitai(self, sha256: str, negative_ttl: Optional[float] = None) -> Optional[CivitaiEntry]:
        """The cached answer for ``sha256``: found answers are kept, "not found" only for ``negative_ttl``."""
        key = sha256.strip().lower()
        ttl = self.negative_ttl if negative_ttl is None else negative_ttl
        row = self._run(lambda c: c.execute("SELECT found, data, fetched FROM civitai WHERE sha256 = ?", (key,)).fetchone())
        if row is None:
            return None
        found, data, fetched = bool(row[0]), row[1], float(row[2])
        if not found:
            if time.time() - fetched > ttl:
                return None
            return CivitaiEntry(key, False, None, fetched)
        try:
            return CivitaiEntry(key, True, json.loads(data), fetched)
        except (TypeError, ValueError):
            return None

    def put_civitai(self, sha256: str, data: Optional[dict]) -> None:
        """Remember CivitAI's answer for ``sha256`` (``None``: not found)."""
        key = sha256.strip().lower()
        text = json.dumps(data) if data is not None else None

        def put(conn):
            conn.execute(
                "INSERT OR REPLACE INTO civitai (sha256, found, data, fetched) VALUES (?,?,?,?)",
                (key, int(data is not None), text, time.time()),
            )

        self._run(put, write=True)

    def stats(self) -> Dict[str, int]:
        def count(conn):
            return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("files", "facts", "civitai")}

        return self._run(count, default={}) or {}


_SELECT_ROW = (
    "SELECT path, size, mtime_ns, sha256, autov1, autov3, autov3_checked, crc32, blake3 FROM files WHERE path = ?"
)


def _insert_row(conn, ident: FileIdentity, sample: Optional[str], h: FileHashes) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO files (path, size, mtime_ns, sample, sha256, autov1, autov3, autov3_checked,"
        " crc32, blake3, updated, dev, ino) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            ident.path, ident.size, ident.mtime_ns, sample, h.sha256, h.autov1, h.autov3, int(h.autov3_checked),
            h.crc32, h.blake3, time.time(), ident.dev or None, ident.ino or None,
        ),
    )


def _add_inode_columns(conn: sqlite3.Connection) -> None:
    """Schema 1 to 2: ``files.dev`` and ``files.ino`` (unknown, so never matched, for the rows already there)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(files)")}
    for column in ("dev", "ino"):
        if have and column not in have:
            try:
                conn.execute(f"ALTER TABLE files ADD COLUMN {column} INTEGER")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc).lower():
                    raise


def _proven_twin(fresh: FileHashes, others: list) -> Optional["_Known"]:
    """A candidate whose full-file hashes (SHA-256, BLAKE3) equal the ones just computed for the file: the same
    bytes. ``None`` when no full-file hash was computed or none matches."""
    for known in others:
        compared = False
        for name in ("sha256", "blake3"):
            mine, theirs = getattr(fresh, name), getattr(known.hashes, name)
            if mine is not None and theirs is not None:
                if mine != theirs:
                    break
                compared = True
        else:
            if compared:
                return known
    return None


def _hashes_from(size: int, cols: Tuple) -> FileHashes:
    sha256, autov1, autov3, checked, crc32, blake3 = cols
    h = FileHashes(size=size, sha256=sha256, autov1=autov1, autov3=autov3, crc32=crc32, blake3=blake3)
    h.autov3_checked = bool(checked)
    if crc32:
        h.crc32_le = bytes.fromhex(crc32)[::-1].hex()
    return h


def _row_to_hashes(row, ident: FileIdentity) -> Optional[FileHashes]:
    if row is None or row[1] != ident.size or row[2] != ident.mtime_ns:
        return None
    return _hashes_from(row[1], row[3:])


def _is_busy(exc: Exception) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _is_corrupt(exc: Exception) -> bool:
    msg = str(exc).lower()
    return "not a database" in msg or "malformed" in msg or "corrupt" in msg or "disk image" in msg


_shared: Dict[str, HashCache] = {}
_shared_lock = threading.Lock()


def open_cache(db_path: Optional[str | os.PathLike] = None) -> HashCache:
    """A process-wide :class:`HashCache` for ``db_path`` (default location when ``None``)."""
    path = os.path.abspath(os.fspath(db_path)) if db_path is not None else userdirs.cache_db_path(create_dir=False)
    with _shared_lock:
        cache = _shared.get(path)
        if cache is None:
            cache = _shared[path] = HashCache(path)
        return cache


def remember_written_file(path: str | os.PathLike, tensor_sha256: str, cache: Optional[HashCache] = None) -> None:
    """Record the AutoV3 (tensor-data SHA-256) of a file this program just wrote, as computed by
    :class:`~merger_core.safetensors_io.StreamingWriter` (``writer.sha256``), so a later hash of the output does not
    need to read it for AutoV3. Never raises: the cache is an optimisation."""
    try:
        from .hashing import normalize_sha256

        value = normalize_sha256(tensor_sha256)
        if value is None:
            return
        store = cache if cache is not None else open_cache()
        ident = FileIdentity.of(path)
        store.record(ident, FileHashes(size=ident.size, autov3=value, autov3_checked=True))
    except Exception as exc:  # pragma: no cover - defensive
        log.debug("could not record the hashes of %s: %s", path, exc)

"""Model hashes from one streaming pass: SHA256, AutoV2, AutoV1, AutoV3, CRC32 and BLAKE3.

Definitions (see docs/hashing.md):

* ``sha256``: full-file SHA-256; ``autov2`` is its first 10 hex digits (A1111's "shorthash").
* ``autov1``: A1111's legacy hash, SHA-256 of the 0x10000 bytes at offset 0x100000, first 8 hex digits. Like A1111
  a file that ends inside that window hashes the bytes that are there; a file of 0x100000 bytes or less has none.
* ``autov3``: safetensors only, SHA-256 of the data section (bytes ``[8 + header length, end)``), so files that differ
  only in metadata share it. CivitAI shows its first 12 hex digits; ``modelspec.hash_sha256`` holds all 64.
* ``crc32``: full-file CRC-32 (IEEE) as zlib prints it; ``crc32_le`` is the same four bytes in little-endian order,
  the form CivitAI's scanner shows. Compare both.
* ``blake3``: full-file BLAKE3.

The file is read once with large ``readinto`` calls into a small ring of reused buffers. Each hash runs in its own
worker thread (hashlib, zlib and blake3 release the GIL on large buffers), so reading and hashing overlap and several
hashes cost about as much as the slowest one, as long as there are cores for them.

Hex digests are lower case here; CivitAI answers in upper case: compare case-insensitively.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import BadFileError, ModelMergerError
from ..io.files import open_regular

ALGORITHMS: Tuple[str, ...] = ("sha256", "autov2", "autov1", "autov3", "crc32", "blake3")
DEFAULT_ALGORITHMS: Tuple[str, ...] = ("sha256", "autov2")
DEFAULT_CHUNK = 16 * 1024 * 1024
RING_BUFFERS = 4
INLINE_BELOW = 4 * 1024 * 1024  # smaller files are hashed in the calling thread (threads would cost more)

AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

SAMPLE_SIZE = 64 * 1024
SAMPLE_POINTS = 5

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class HashCancelled(ModelMergerError):
    """Hashing was stopped through the cancel callback."""

    def __init__(self, message: str = "hashing cancelled"):
        super().__init__(message)


@dataclass
class FileHashes:
    """Hashes of one file; a field is ``None`` when it was not asked for or does not exist for this file."""

    size: int
    sha256: Optional[str] = None
    autov1: Optional[str] = None
    autov3: Optional[str] = None  # all 64 hex digits; CivitAI shows ``autov3_short``
    crc32: Optional[str] = None  # zlib order (``0d4a1185`` for "hello world")
    crc32_le: Optional[str] = None  # the same bytes reversed (``85114a0d``), CivitAI's form
    blake3: Optional[str] = None
    autov3_checked: bool = False  # True once the file was read for AutoV3 (None then means "not safetensors")

    @property
    def autov2(self) -> Optional[str]:
        return self.sha256[:10] if self.sha256 else None

    @property
    def autov3_short(self) -> Optional[str]:
        return self.autov3[:12] if self.autov3 else None

    def get(self, name: str) -> Optional[str]:
        """The value for one name of :data:`ALGORITHMS` (``autov2`` derived from ``sha256``)."""
        if name not in ALGORITHMS:
            raise ValueError(f"unknown hash {name!r}; choose from {', '.join(ALGORITHMS)}")
        return getattr(self, name)

    def has(self, algorithms: Iterable[str]) -> bool:
        """True when every named hash is known (a hash that cannot exist for this file counts as known)."""
        for name in normalize_algorithms(algorithms):
            if name == "autov2":
                continue  # comes with sha256, which normalize_algorithms adds
            if name == "autov1":
                if self.size > AUTOV1_OFFSET and self.autov1 is None:
                    return False
            elif name == "autov3":
                if self.autov3 is None and not self.autov3_checked:
                    return False
            elif getattr(self, name) is None:
                return False
        return True

    def to_dict(self, upper: bool = False) -> Dict[str, object]:
        d: Dict[str, object] = asdict(self)
        d.pop("autov3_checked")
        d["autov2"] = self.autov2
        d["autov3_short"] = self.autov3_short
        if upper:
            d = {k: v.upper() if isinstance(v, str) else v for k, v in d.items()}
        return d

    def merged_with(self, other: "FileHashes") -> "FileHashes":
        """Fields of ``self`` completed by those of ``other`` (same file)."""
        out = FileHashes(self.size)
        for name in ("sha256", "autov1", "autov3", "crc32", "crc32_le", "blake3"):
            setattr(out, name, getattr(self, name) or getattr(other, name))
        out.autov3_checked = self.autov3_checked or other.autov3_checked
        return out


def normalize_algorithms(algorithms: Iterable[str] | str | None) -> Tuple[str, ...]:
    """Validate a list of hash names (or ``"all"`` / a comma-separated string); ``autov2`` implies ``sha256``."""
    if algorithms is None:
        return DEFAULT_ALGORITHMS
    if isinstance(algorithms, str):
        algorithms = [a for a in algorithms.replace(" ", ",").split(",") if a]
    names: List[str] = []
    for a in algorithms:
        a = a.strip().lower()
        if a == "all":
            names.extend(ALGORITHMS)
            continue
        if a not in ALGORITHMS:
            raise ModelMergerError(f"unknown hash {a!r}; choose from {', '.join(ALGORITHMS)} or 'all'")
        names.append(a)
    if "autov2" in names and "sha256" not in names:
        names.append("sha256")
    return tuple(n for n in ALGORITHMS if n in names)


# ---------------------------------------------------------------------------------------------------------------
# Feeders: each consumes the file's chunks in order


class _Whole:
    """A hasher fed every byte of the file."""

    def __init__(self, h):
        self.h = h

    def update(self, mv: memoryview, pos: int) -> None:
        self.h.update(mv)


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, mv: memoryview, pos: int) -> None:
        self.value = zlib.crc32(mv, self.value)


class _From:
    """A SHA-256 of the bytes from ``start`` to the end (AutoV3)."""

    def __init__(self, start: int):
        self.start = start
        self.h = hashlib.sha256()

    def update(self, mv: memoryview, pos: int) -> None:
        end = pos + len(mv)
        if end <= self.start:
            return
        self.h.update(mv[max(0, self.start - pos):] if pos < self.start else mv)


def _safetensors_data_start(head: bytes, size: int) -> Optional[int]:
    """Offset of the data section if ``head`` (the file's first bytes) looks like a safetensors file."""
    if len(head) < 9:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        return None
    if head[8:9] != b"{":
        return None
    return 8 + n


def _blake3_hasher(threads: bool):
    try:
        import blake3
    except ImportError:  # pragma: no cover - blake3 is a declared dependency
        raise ModelMergerError("the blake3 package is needed for BLAKE3 hashes (pip install blake3)") from None
    if threads:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def hash_file(
    path: str | os.PathLike,
    algorithms: Iterable[str] | str | None = DEFAULT_ALGORITHMS,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    chunk_size: int = DEFAULT_CHUNK,
    threads: Optional[bool] = None,
    blake3_threads: Optional[bool] = None,
) -> FileHashes:
    """Hash ``path`` in one pass. ``progress(done_bytes, total_bytes)`` is called after each chunk; a true
    ``cancel()`` stops with :class:`HashCancelled`. ``threads`` (default: files of 4 MiB or more) runs each hash in
    its own worker thread; ``blake3_threads`` lets BLAKE3 use several cores (default: when cores are spare)."""
    path = os.fspath(path)
    try:
        f = open_regular(path, buffering=0)
    except FileNotFoundError:
        raise BadFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadFileError(f"{path}: is a folder, not a file") from None
    except PermissionError:
        raise BadFileError(f"{path}: permission denied (cannot read the file)") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger kernel read-ahead
            except OSError:
                pass
        try:
            return _hash_stream(f, size, algorithms, progress, cancel, chunk_size, threads, blake3_threads)
        except OSError as exc:
            raise BadFileError(f"{path}: read failed while hashing ({exc.strerror or exc})") from exc


def hash_bytes(data: bytes, algorithms: Iterable[str] | str | None = ALGORITHMS) -> FileHashes:
    """The same hashes for bytes in memory (tests, small payloads)."""
    return _hash_stream(io.BytesIO(data), len(data), algorithms, None, None, DEFAULT_CHUNK, False, False)


def _hash_stream(f, size, algorithms, progress, cancel, chunk_size, threads, blake3_threads) -> FileHashes:
    names = normalize_algorithms(algorithms)
    if chunk_size < 64 * 1024:
        raise ValueError("chunk_size must be at least 64 KiB")
    if threads is None:
        threads = size >= INLINE_BELOW
    heavy = [n for n in names if n in ("sha256", "autov3", "crc32", "blake3")]
    if blake3_threads is None:
        blake3_threads = (os.cpu_count() or 1) > len(heavy)

    feeders: Dict[str, object] = {}
    if "sha256" in names:
        feeders["sha256"] = _Whole(hashlib.sha256())
    if "crc32" in names:
        feeders["crc32"] = _Crc32()
    if "blake3" in names:
        feeders["blake3"] = _Whole(_blake3_hasher(blake3_threads))
    want_v1 = "autov1" in names and size > AUTOV1_OFFSET
    v1 = bytearray()
    want_v3 = "autov3" in names
    v3_start: Optional[int] = None

    executors: Dict[str, ThreadPoolExecutor] = {}
    nbuf = RING_BUFFERS if threads else 1
    bufs = [bytearray(min(chunk_size, max(size, 1))) for _ in range(nbuf)]
    pending: List[List] = [[] for _ in range(nbuf)]

    def executor(name: str) -> ThreadPoolExecutor:
        ex = executors.get(name)
        if ex is None:
            ex = executors[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hash-{name}")
        return ex

    pos = 0
    i = 0
    try:
        while True:
            slot = i % nbuf
            for fut in pending[slot]:
                fut.result()
            pending[slot] = []
            if cancel is not None and cancel():
                raise HashCancelled()
            buf = bufs[slot]
            n = f.readinto(buf)
            if not n:
                break
            mv = memoryview(buf)[:n]
            if i == 0 and want_v3:
                v3_start = _safetensors_data_start(bytes(mv[: min(n, 16)]), size)
                if v3_start is not None:
                    feeders["autov3"] = _From(v3_start)
            if want_v1 and pos < AUTOV1_OFFSET + AUTOV1_LENGTH and pos + n > AUTOV1_OFFSET:
                a = max(AUTOV1_OFFSET, pos) - pos
                b = min(AUTOV1_OFFSET + AUTOV1_LENGTH, pos + n) - pos
                v1 += mv[a:b]
            for name, feeder in feeders.items():
                if threads:
                    pending[slot].append(executor(name).submit(feeder.update, mv, pos))
                else:
                    feeder.update(mv, pos)
            pos += n
            i += 1
            if progress is not None:
                progress(pos, size)
        for lst in pending:
            for fut in lst:
                fut.result()
    finally:
        for ex in executors.values():
            ex.shutdown(wait=True)

    out = FileHashes(size=pos)
    if "sha256" in feeders:
        out.sha256 = feeders["sha256"].h.hexdigest()
    if want_v1 and v1:
        out.autov1 = hashlib.sha256(bytes(v1)).hexdigest()[:8]
    if want_v3:
        out.autov3_checked = True
        if "autov3" in feeders:
            out.autov3 = feeders["autov3"].h.hexdigest()
    if "crc32" in feeders:
        value = feeders["crc32"].value & 0xFFFFFFFF
        out.crc32 = f"{value:08x}"
        out.crc32_le = struct.pack("<I", value).hex()
    if "blake3" in feeders:
        out.blake3 = feeders["blake3"].h.hexdigest()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cheap identity for moved files


def sample_signature(path: str | os.PathLike, size: Optional[int] = None) -> str:
    """A digest of the file size and a few 64 KiB samples (start, quarters, end): a cheap pre-filter for finding a
    moved file among known ones. Not a content hash and never proof: two files that differ only between the samples
    have the same signature, so the cache reuses hashes only for the same inode (or after a full hash)."""
    path = os.fspath(path)
    h = hashlib.blake2b(digest_size=16)
    with open_regular(path) as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        h.update(struct.pack("<Q", size))
        if size <= SAMPLE_SIZE * SAMPLE_POINTS:
            h.update(f.read())
        else:
            last = size - SAMPLE_SIZE
            for k in range(SAMPLE_POINTS):
                f.seek(last * k // (SAMPLE_POINTS - 1))
                h.update(f.read(SAMPLE_SIZE))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Hash strings given by users or found in metadata

_HEX = frozenset("0123456789abcdefABCDEF")


def is_hex(s: str, length: Optional[int] = None) -> bool:
    return bool(s) and all(c in _HEX for c in s) and (length is None or len(s) == length)


def normalize_sha256(value: object) -> Optional[str]:
    """A lower-case 64-hex SHA-256 from ``value`` (``0x`` prefix allowed), or ``None`` if it is not one.
    The SHA-256 of empty input (a common wrong embedded value) is refused."""
    if not isinstance(value, str):
        return None
    s = value.strip()
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    if not is_hex(s, 64):
        return None
    s = s.lower()
    if s == hashlib.sha256(b"").hexdigest():
        return None
    return s


def guess_hash_kind(value: str) -> Sequence[str]:
    """Which hash names a hex string could be, by length (64 hex is SHA256 or BLAKE3, 8 is AutoV1 or CRC32)."""
    s = value.strip()
    if not is_hex(s):
        return ()
    return {64: ("sha256", "blake3"), 10: ("autov2",), 12: ("autov3",), 8: ("autov1", "crc32")}.get(len(s), ())

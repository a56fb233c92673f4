"""Writing safetensors files as a stream: header first, then each tensor's bytes, to a temporary file beside the
target that is fsynced and renamed into place.

It exists because ``safetensors.torch.save_file`` needs the whole output in memory: here the header is built from
the known names, shapes and dtypes, and the tensor-data SHA-256 is computed while the bytes go out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..errors import OutputError
from ..units import human_bytes
from .safetensors import DTYPE_SIZES, read_header

WRITEBACK_STEP = 64 * 1024 * 1024  # start disk writeback of the output every this many bytes
FREE_DISK_MARGIN = 16 * 1024 * 1024  # kept free beside an output (the file system's own needs, a manifest)

HASH_PLACEHOLDER = "0x" + "0" * 64
HASH_METADATA_KEY = "modelspec.hash_sha256"


@dataclass(frozen=True)
class OutTensor:
    """Name, dtype and shape of one tensor in a file being written."""

    name: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def build_header(tensors: Iterable[OutTensor], metadata: Mapping[str, str]) -> Tuple[bytes, Dict[str, Tuple[int, int]], int]:
    """Build a header with keys in sorted order, data laid out in the same order, padded to 8 bytes.

    Returns (header bytes including the 8-byte length prefix, name -> (begin, end), offset of the
    ``modelspec.hash_sha256`` value inside the returned bytes or -1).
    """
    doc: Dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise TypeError(f"metadata value for {k!r} must be a string")
        doc["__metadata__"] = dict(sorted(metadata.items()))
    offsets: Dict[str, Tuple[int, int]] = {}
    pos = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if t.name in offsets:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        offsets[t.name] = (pos, pos + t.nbytes)
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    blob = struct.pack("<Q", len(body)) + body
    hash_at = -1
    if metadata.get(HASH_METADATA_KEY) == HASH_PLACEHOLDER:
        marker = json.dumps(HASH_METADATA_KEY).encode() + b":" + json.dumps(HASH_PLACEHOLDER).encode()
        at = blob.find(marker)
        assert at >= 0 and blob.find(marker, at + 1) < 0
        hash_at = at + len(marker) - len(HASH_PLACEHOLDER) - 1
    return blob, offsets, hash_at


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a CPU torch tensor, without a copy where it is contiguous."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


# Temporary files of writers in this process that are still open: what a forced exit (a second Ctrl-C) removes.
LIVE_PARTIALS: Set[str] = set()


def partial_path(target: str) -> str:
    """The temporary file a writer of ``target`` uses: hidden, beside the target, named after it, this process and
    this thread (``.NAME.PID.TID.partial``)."""
    folder, base = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{base[:120]}.{os.getpid()}.{threading.get_ident() % 100000}.partial")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours (EPERM)
        return True
    return True


def sweep_stale_partials(target: str) -> List[str]:
    """Remove the temporary files of ``target`` left by processes that no longer exist (killed with SIGKILL, by the
    OOM killer, a power cut). Returns the paths removed. POSIX only (elsewhere nothing is removed)."""
    if os.name != "posix":
        return []
    folder, base = os.path.split(os.path.abspath(target))
    pattern = re.compile(r"^\." + re.escape(base[:120]) + r"\.(\d+)\.(\d+)\.partial$")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = pattern.match(name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in sorted name order, to a temporary file then rename.

    Usage::

        with StreamingWriter(path, out_tensors, metadata, overwrite=False) as w:
            for name in w.names:
                w.write(name, tensor)
        # w.sha256 is the SHA-256 of the tensor data, also stored in the header if asked for

    ``metadata[HASH_METADATA_KEY] = HASH_PLACEHOLDER`` reserves a fixed-width slot that is filled at the end.
    Leaving the block with an exception removes the temporary file and leaves any existing target untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: Iterable[OutTensor],
        metadata: Optional[Mapping[str, str]] = None,
        overwrite: bool = False,
        opener: Optional[Callable[[str], object]] = None,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.tensors = {t.name: t for t in tensors}
        self.names: List[str] = sorted(self.tensors)
        self.overwrite = overwrite
        self._header, self._offsets, self._hash_at = build_header(self.tensors.values(), dict(metadata or {}))
        self.data_bytes = sum(t.nbytes for t in self.tensors.values())
        self.total_bytes = len(self._header) + self.data_bytes
        self._opener = opener or (lambda p: open(p, "xb"))
        self._next = 0
        self._hasher = hashlib.sha256()
        self._file = None
        self.tmp_path: Optional[str] = None
        self.swept: List[str] = []  # stale temporary files of this target removed on entry
        self.sha256: Optional[str] = None
        self.bytes_written = 0
        self._flushed = 0
        self._fills: Dict[str, str] = {}

    # -- checks that can run before any work -------------------------------------------------------------------
    def check_target(self) -> None:
        """Refuse an existing output (unless overwrite), an unwritable folder, or too little free disk."""
        check_output_target(self.path, self.total_bytes, self.overwrite)

    def __enter__(self) -> "StreamingWriter":
        self.check_target()
        self.swept = sweep_stale_partials(self.path)
        self.tmp_path = partial_path(self.path)
        try:  # the temporary file is created inside the block that removes it, whatever interrupts it
            LIVE_PARTIALS.add(self.tmp_path)
            self._file = self._opener(self.tmp_path)
            self._file.write(self._header)
        except OSError as exc:
            self._discard()
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        except BaseException:
            self._discard()
            raise
        self.bytes_written = len(self._header)
        return self

    def write(self, name: str, tensor) -> None:
        """Write the next tensor. Names must come in ``self.names`` order with the declared dtype and shape."""
        expected = self.names[self._next] if self._next < len(self.names) else None
        if name != expected:
            raise ValueError(f"writer expected tensor {expected!r}, got {name!r}")
        data = tensor_bytes(tensor)
        spec = self.tensors[name]
        if len(data) != spec.nbytes or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: {tuple(tensor.shape)} ({len(data)} bytes) does not match the header {spec}")
        self.write_raw(data)
        self._next += 1

    def write_raw(self, data) -> None:
        """Hash and write the next bytes of the data section."""
        self.hash_raw(data)
        self.write_unhashed(data)

    def hash_raw(self, data) -> None:
        """Add the next bytes of the data section to the tensor-data hash (split from writing so that the two can
        run in separate threads, in the same order)."""
        self._hasher.update(data)

    def write_unhashed(self, data) -> None:
        """Write the next bytes of the data section; they must also go through :meth:`hash_raw`."""
        try:
            self._file.write(data)
        except OSError as exc:
            raise OutputError(f"writing {self.path} failed: {exc.strerror or exc}") from exc
        self.bytes_written += len(data)
        if self.bytes_written - self._flushed >= WRITEBACK_STEP:
            self._start_writeback()

    def fill(self, replacements: Mapping[str, str]) -> None:
        """Replace placeholders in the header (values known only at the end, such as the inputs' hashes being
        computed during the run) when the file is finished. Each value must have its placeholder's length and be
        plain ASCII that JSON writes as it is, so the header keeps its size and layout."""
        for old, new in replacements.items():
            if len(old) != len(new) or not new.isascii() or any(c in new for c in '"\\') or not new.isprintable():
                raise ValueError(f"header placeholder {old!r} cannot take {new!r}")
            if self._header.find(old.encode("ascii")) < 0:
                raise ValueError(f"header placeholder {old!r} is not in the header")
            self._fills[old] = new

    def _start_writeback(self) -> None:
        """Start writing the bytes so far to disk now, instead of all at once in the final fsync.

        On Linux ``POSIX_FADV_DONTNEED`` starts asynchronous writeback of the dirty range (and later lets the
        kernel drop those pages), so the disk writes overlap the merge's arithmetic and the output does not push
        the inputs out of the page cache.
        """
        fadvise = getattr(os, "posix_fadvise", None)
        fileno = getattr(self._file, "fileno", None)
        if fadvise is None or fileno is None:
            return
        try:
            self._file.flush()
            fadvise(fileno(), self._flushed, self.bytes_written - self._flushed, os.POSIX_FADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            return
        self._flushed = self.bytes_written

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        if self.bytes_written != self.total_bytes:
            self._discard()
            raise ValueError(f"writer closed after {self.bytes_written} of {self.total_bytes} bytes")
        self.sha256 = self._hasher.hexdigest()
        try:
            header = self._header
            for old, new in self._fills.items():
                header = header.replace(old.encode("ascii"), new.encode("ascii"))
            if self._hash_at >= 0:
                value = ("0x" + self.sha256).encode("ascii")
                header = header[: self._hash_at] + value + header[self._hash_at + len(value):]
            if header != self._header:
                self._file.seek(0)
                self._file.write(header)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if not self.overwrite and os.path.exists(self.path):
                raise OutputError(f"{self.path} appeared while merging; not overwritten (use --overwrite)")
            os.replace(self.tmp_path, self.path)
            LIVE_PARTIALS.discard(self.tmp_path)
            self.tmp_path = None
            _fsync_dir(os.path.dirname(self.path))
        except OSError as exc:
            self._discard()
            raise OutputError(f"finishing {self.path} failed: {exc.strerror or exc}") from exc
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self.tmp_path:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            LIVE_PARTIALS.discard(self.tmp_path)
        self.tmp_path = None


def check_output_target(path: str, needed_bytes: int, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``path`` cannot take a ``needed_bytes`` file."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path} already exists; choose another name or pass --overwrite")
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder")
    if not os.path.isdir(folder):
        raise OutputError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    free = _free_bytes(folder)
    if free is not None and free < needed_bytes + FREE_DISK_MARGIN:
        raise OutputError(
            f"not enough free disk in {folder}: the output needs {human_bytes(needed_bytes)} ({needed_bytes:,} bytes) "
            f"and {human_bytes(FREE_DISK_MARGIN)} are kept free beside it; {human_bytes(free)} ({free:,} bytes) are free"
        )


def _free_bytes(folder: str) -> Optional[int]:
    try:
        import shutil

        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _fsync_dir(folder: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_data_sha256(path: str | os.PathLike, chunk: int = 8 * 1024 * 1024) -> str:
    """SHA-256 of a safetensors file's data section (AutoV3 / ``modelspec.hash_sha256``), hex."""
    header = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()

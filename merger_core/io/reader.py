"""Reading the inputs' tensors during a merge: memory-mapped views (:class:`MappedInput`), read-ahead of the coming
byte ranges, and unmapping of pages once a key is merged.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import ExitStack
from typing import List, Optional, Sequence, Tuple

from ..errors import BadFileError
from .safetensors import SafetensorsHeader

PREFETCH_BYTES = 512 * 1024 * 1024  # how far ahead of the arithmetic the kernel is asked to read
BATCH_BYTES = 64 * 1024 * 1024  # merged input pages unmapped at once
POPULATE_BYTES = 128 * 1024 * 1024  # how far ahead the coming pages are mapped into the process


def _readahead_bytes(path: str) -> int:
    """The kernel's read-ahead window for the device holding ``path`` (what one WILLNEED reads), default 128 KiB."""
    try:
        dev = os.stat(path).st_dev
        base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for candidate in (f"{base}/queue/read_ahead_kb", f"{base}/../queue/read_ahead_kb"):
            if os.path.exists(candidate):
                with open(candidate) as f:
                    kb = int(f.read().strip())
                if kb > 0:
                    return kb * 1024
    except (OSError, ValueError):
        pass
    return 128 * 1024


class Prefetcher:
    """Reads the coming keys ahead of the arithmetic, from a thread of its own.

    Two fronts run ahead of the key being merged: ``posix_fadvise(WILLNEED)`` starts the disk reads up to
    PREFETCH_BYTES ahead, and where the inputs are mapped (``bases``: each input's mapping address) and the kernel has
    ``MADV_POPULATE_READ`` (Linux 5.14), the pages of the next POPULATE_BYTES are also mapped into the process ahead
    of time. Without that the merging threads fault every page in themselves, one fault per 64 KiB: on a warm page
    cache that is a tenth of the merge's CPU time, on a cold one the workers stop at every page the disk has not
    delivered yet. Both are hints: any error ends them and the merge goes on without."""

    def __init__(self, paths: Sequence[str], ranges: List[List[Tuple[int, int, int]]], bases: Optional[Sequence[int]] = None):
        """``ranges[k]``: the byte ranges key ``k`` reads, as (input index, file offset, length)."""
        self.ranges = ranges
        self.paths = list(paths)
        self.bases = list(bases) if bases is not None else None
        self.position = 0
        self.cond = threading.Condition()
        self.stop = False
        self.thread = None
        self.populated = 0  # bytes mapped ahead of time (tests and benchmarks look)
        if hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, name="model-merger-readahead", daemon=True)
            self.thread.start()

    def advance(self, index: int):
        with self.cond:
            self.position = index
            self.cond.notify_all()

    def _run(self):
        fds = []
        try:
            fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            step = _readahead_bytes(self.paths[0])
            populate = _populate_fn() if self.bases is not None else None
            cum = [0]  # cum[k]: bytes of keys 0..k-1
            for r in self.ranges:
                cum.append(cum[-1] + sum(n for _, _, n in r))
            read_next = 0  # the next key whose reads are asked for
            map_next = 0  # the next key whose pages are mapped
            total = len(self.ranges)
            while True:
                with self.cond:
                    while True:
                        if self.stop:
                            return
                        pos = self.position
                        map_next = max(map_next, pos)
                        read_next = max(read_next, pos)
                        can_read = read_next < total and cum[read_next] - cum[pos] < PREFETCH_BYTES
                        can_map = populate is not None and map_next < read_next and cum[map_next] - cum[pos] < POPULATE_BYTES
                        if can_read or can_map:
                            break
                        if read_next >= total and (populate is None or map_next >= total):
                            return
                        self.cond.wait(0.5)
                # the disk reads first, as far ahead as the window allows (these calls do not wait for the disk) ...
                while read_next < total and cum[read_next] - cum[pos] < PREFETCH_BYTES:
                    for i, off, n in self.ranges[read_next]:
                        # One WILLNEED reads at most the device's read-ahead window: ask in steps of it.
                        for o in range(off, off + n, step):
                            os.posix_fadvise(fds[i], o, min(step, off + n - o), os.POSIX_FADV_WILLNEED)
                    read_next += 1
                # ... then the pages of the next key are mapped in (this waits for its reads to complete)
                if populate is not None and map_next < read_next and cum[map_next] - cum[pos] < POPULATE_BYTES:
                    for i, off, n in self.ranges[map_next]:
                        if n and not populate(self.bases[i] + off, n):
                            populate = None  # not supported here, or the file went away: hints only
                            break
                        self.populated += n
                    map_next += 1
        except OSError:
            return  # read-ahead is only a hint
        finally:
            for fd in fds:
                os.close(fd)

    def close(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


def _populate_fn():
    """``populate(address, length) -> bool``: map the pages of a file mapping in now (``MADV_POPULATE_READ``); None
    where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = mmap.PAGESIZE
    except (OSError, AttributeError):
        return None
    flag = getattr(mmap, "MADV_POPULATE_READ", 22)

    def populate(address: int, length: int) -> bool:
        lo = address - address % page
        return madvise(lo, address + length - lo, flag) == 0

    return populate


class Unmapper:
    """Unmaps the pages of input tensors once their key is merged (Linux ``madvise(MADV_DONTNEED)``).

    :class:`MappedInput` hands out views of a private, read-only-in-practice mapping of each input. Without this, every
    page read stays mapped until the files are closed, so the process's RSS grows to the size of all inputs (page
    cache, not private memory, but it is what task managers show and what an RSS limit counts). The pages stay in
    the page cache; only this process's mapping of them goes. A view is released only if it lies entirely inside
    a mapping of one of the input files (from ``/proc/self/maps``): anything else is left alone.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = {os.path.realpath(p) for p in paths}
        self.regions: List[Tuple[int, int]] = []
        self.pending: List[Tuple[int, int]] = []
        self.pending_bytes = 0
        self.madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            import ctypes
            import mmap

            libc = ctypes.CDLL(None, use_errno=True)
            self.madvise = libc.madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.page = mmap.PAGESIZE
            self.flag = getattr(mmap, "MADV_DONTNEED", 4)
        except (OSError, AttributeError):
            self.madvise = None

    def _load_regions(self) -> None:
        regions = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].strip() in self.paths:
                        lo, hi = parts[0].split("-")
                        regions.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass
        self.regions = regions

    def _inside(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in self.regions)

    def release(self, views) -> None:
        """Mark the pages of ``views`` (merged already) for unmapping. They are unmapped in batches of about
        BATCH_BYTES, adjacent ranges joined into one call: each call makes the kernel flush the other cores' TLBs, so
        one call per key costs more than the unmapping itself."""
        if self.madvise is None:
            return
        for t in views:
            n = t.numel() * t.element_size()
            if n < self.page:
                continue
            ptr = t.data_ptr()
            lo = ptr - ptr % self.page
            hi = -(-(ptr + n) // self.page) * self.page
            self.pending.append((lo, hi))
            self.pending_bytes += hi - lo
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Unmap what :meth:`release` collected."""
        if self.madvise is None or not self.pending:
            return
        ranges = sorted(self.pending)
        self.pending, self.pending_bytes = [], 0
        joined: List[Tuple[int, int]] = []
        for lo, hi in ranges:
            if joined and lo <= joined[-1][1]:
                joined[-1] = (joined[-1][0], max(hi, joined[-1][1]))
            else:
                joined.append((lo, hi))
        for lo, hi in joined:
            if not self._inside(lo, hi):
                self._load_regions()  # a file may have been mapped since the last look
                if not self._inside(lo, hi):
                    continue
            self.madvise(lo, hi - lo, self.flag)


class MappedInput:
    """One input's tensors as views of a private memory map of the file, from the header already read and checked.

    It does what ``safetensors.safe_open(...).get_tensor`` does on the CPU (a view of the mapped bytes, no copy), at
    a few microseconds a tensor instead of tens: the merge asks for every tensor of every input once. The map is
    copy-on-write (``ACCESS_COPY``), so nothing written to a view can reach the file. A tensor whose offset is not a
    multiple of its element size (allowed by the format, never written by the usual tools) is copied."""

    def __init__(self, header: SafetensorsHeader):
        import mmap
        import warnings

        import torch

        self.header = header
        self._map = None
        self._bytes = None
        with open(header.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != header.file_size:
                raise BadFileError(f"{os.path.basename(header.path)} changed since its header was read "
                                   f"(size {header.file_size:,} -> {size:,} bytes)")
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about buffers it cannot prove writable
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def get_tensor(self, name: str):
        from .safetensors import DTYPE_SIZES, torch_dtype

        info = self.header.tensors[name]
        start = self.header.data_start + info.begin
        raw = self._bytes[start : start + info.nbytes]
        item = DTYPE_SIZES[info.dtype]
        if info.nbytes == 0:
            import torch

            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if item > 1 and start % item:
            raw = raw.clone()  # a misaligned tensor: a copy of its own
        return raw.view(torch_dtype(info.dtype)).reshape(info.shape)

    @property
    def address(self) -> int:
        """Where the file's first byte is mapped."""
        return self._bytes.data_ptr()

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still held somewhere: the map goes when the last one does
            self._map = None

    def __enter__(self) -> "MappedInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_inputs(stack: ExitStack, headers: Sequence[SafetensorsHeader]):
    """Map every input (:class:`MappedInput`); closed when ``stack`` closes."""
    handles = []
    for h in headers:
        try:
            handles.append(stack.enter_context(MappedInput(h)))
        except BadFileError:
            raise
        except (OSError, ValueError) as exc:
            raise BadFileError(f"{os.path.basename(h.path)}: cannot be opened for reading ({getattr(exc, 'strerror', None) or exc})") from exc
    return handles

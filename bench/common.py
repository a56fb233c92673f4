"""Shared helpers for the benchmark scripts in ``bench/``.

Nothing here is part of the product; it is measurement plumbing:

* :func:`load_layout` / :func:`generate_file` / :func:`ensure_inputs`: full-size checkpoints of a real layout
  (``shared/layouts/*.json``: key -> shape/dtype under ``"tensors"``) filled with random-looking fp16 values,
  written with the engine's own :class:`merger_core.io.writer.StreamingWriter`. A few MiB of random fp16 are
  generated once and tiled with a per-model, per-key offset, so files differ from each other without spending
  minutes in the random number generator (fine for I/O and memory measurements, useless for quality).
* :class:`AnonRssSampler`: peak private memory (``RssAnon`` of ``/proc/PID/status``, summed over the process tree),
  sampled from a thread every ~20 ms.
* :func:`run_measured`: run a command, return wall time, CPU time, exit status and peak anonymous RSS.
* :func:`io_floor`: the I/O floor: read every input once with large sequential ``readinto`` calls, then write one
  output-sized file and fsync it.
* :func:`drop_caches`, :func:`cached_fraction`: cold runs and checking what the page cache holds.
* :func:`format_table`: a plain-text table.
* :class:`BenchLock`: ``flock`` on ``/tmp/bench.lock`` (the same lock as ``flock /tmp/bench.lock CMD``), so two
  benchmarks never overlap.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_LAYOUTS = os.path.normpath(os.path.join(REPO, "..", "shared", "layouts"))
DEFAULT_DATA_DIR = "/work/bench-data"
LOCK_PATH = "/tmp/bench.lock"
GiB = 1024**3
MiB = 1024**2

# short name -> layout file name, and the file prefix used under the data dir
LAYOUT_FILES = {"sd15": "sd15.json", "sdxl": "sdxl_base.json"}


# ---------------------------------------------------------------------------------------------------------------
# Locking


class BenchLock:
    """Hold ``/tmp/bench.lock`` (flock) for the lifetime of the block. Blocks until it is free."""

    def __init__(self, path: str = LOCK_PATH, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.fd: Optional[int] = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.quiet:
                print(f"waiting for {self.path} (another benchmark is running)...", file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------------------------
# Layouts and generated inputs


@dataclass(frozen=True)
class LayoutTensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]


def layout_path(layout: str, layouts_dir: str = DEFAULT_LAYOUTS) -> str:
    return os.path.join(layouts_dir, LAYOUT_FILES.get(layout, layout if layout.endswith(".json") else layout + ".json"))


def load_layout(layout: str, layouts_dir: str = DEFAULT_LAYOUTS) -> List[LayoutTensor]:
    """The tensors of a layout file, sorted by name. ``layout`` is a short name (sd15, sdxl) or a file name."""
    path = layout_path(layout, layouts_dir)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    tensors = doc["tensors"]
    return [LayoutTensor(k, v["dtype"], tuple(int(s) for s in v["shape"])) for k, v in sorted(tensors.items())]


def input_path(data_dir: str, layout: str, index: int) -> str:
    return os.path.join(data_dir, f"{layout}_{index}.safetensors")


def _metadata(layout: str, index: int) -> Dict[str, str]:
    return {"bench.layout": layout, "bench.index": str(index), "bench.note": "random values for benchmarks only"}


def expected_size(tensors: Sequence[LayoutTensor], layout: str, index: int) -> int:
    from merger_core.io.writer import OutTensor, build_header

    header, _, _ = build_header([OutTensor(t.name, t.dtype, t.shape) for t in tensors], _metadata(layout, index))
    return len(header) + sum(OutTensor(t.name, t.dtype, t.shape).nbytes for t in tensors)


_POOL = None
POOL_ELEMENTS = 4 * 1024 * 1024 + 17  # ~8 MiB of fp16; odd length so that offsets do not line up between keys


def _pool():
    """A fixed block of random fp16 values (doubled so that any window up to its length is contiguous)."""
    global _POOL
    if _POOL is None:
        import numpy as np

        rng = np.random.default_rng(20260101)
        base = (rng.standard_normal(POOL_ELEMENTS, dtype=np.float32) * 0.02).astype(np.float16)
        _POOL = np.concatenate([base, base])
    return _POOL


def _tensor_chunks(t: LayoutTensor, index: int, max_chunk: int = POOL_ELEMENTS):
    """Yield byte chunks for tensor ``t`` of model ``index``."""
    import math

    import numpy as np

    from merger_core.io.safetensors import DTYPE_SIZES

    n = math.prod(t.shape)
    if t.dtype == "F16":
        pool = _pool()
        off = (zlib.crc32(t.name.encode()) + index * 1_000_003) % POOL_ELEMENTS
        done = 0
        while done < n:
            k = min(max_chunk, n - done)
            yield memoryview(pool[off : off + k]).cast("B")
            done += k
            off = (off + k) % POOL_ELEMENTS
    elif t.dtype in ("I64", "I32"):
        dt = np.int64 if t.dtype == "I64" else np.int32
        last = t.shape[-1] if t.shape else 1
        yield memoryview(np.ascontiguousarray(np.broadcast_to(np.arange(last, dtype=dt), (n // max(last, 1), last)))).cast("B")
    else:
        size = n * DTYPE_SIZES[t.dtype]
        yield memoryview(np.zeros(size, dtype=np.uint8)).cast("B")


def generate_file(path: str, tensors: Sequence[LayoutTensor], layout: str, index: int) -> None:
    """Write one full-size checkpoint with the engine's StreamingWriter (temporary file, fsync, rename)."""
    from merger_core.io.writer import OutTensor, StreamingWriter

    out = [OutTensor(t.name, t.dtype, t.shape) for t in tensors]
    with StreamingWriter(path, out, _metadata(layout, index), overwrite=True) as w:
        by_name = {t.name: t for t in tensors}
        for name in w.names:
            for chunk in _tensor_chunks(by_name[name], index):
                w.write_raw(chunk)


def ensure_inputs(
    layout: str, n: int, data_dir: str = DEFAULT_DATA_DIR, layouts_dir: str = DEFAULT_LAYOUTS, log=print,
    generated: Optional[List[str]] = None,
) -> List[str]:
    """``{layout}_0 .. {layout}_{n-1}.safetensors`` under ``data_dir``; files of the right size are reused.

    Paths of files written by this call are appended to ``generated`` when given.
    """
    os.makedirs(data_dir, exist_ok=True)
    tensors = load_layout(layout, layouts_dir)
    paths = []
    for i in range(n):
        p = input_path(data_dir, layout, i)
        size = expected_size(tensors, layout, i)
        if not (os.path.isfile(p) and os.path.getsize(p) == size):
            free = shutil.disk_usage(data_dir).free
            if free < size + 2 * GiB:
                raise SystemExit(f"not enough disk for {p}: needs {size / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
            t0 = time.monotonic()
            generate_file(p, tensors, layout, i)
            if generated is not None:
                generated.append(p)
            log(f"generated {p} ({size / GiB:.2f} GiB) in {time.monotonic() - t0:.1f} s")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Page cache


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def evict(paths: Iterable[str]) -> None:
    """Drop the given files from the page cache (without root): fsync + POSIX_FADV_DONTNEED."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: Sequence[str]) -> Optional[float]:
    """Fraction of the files' bytes that are in the page cache (via ``fincore``), or None if unavailable."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return res / size if size else None


# ---------------------------------------------------------------------------------------------------------------
# I/O floor


@dataclass
class Floor:
    read_s: float
    write_s: float
    read_bytes: int
    write_bytes: int

    @property
    def total_s(self) -> float:
        return self.read_s + self.write_s


def read_all(paths: Sequence[str], block: int = 16 * MiB) -> Tuple[float, int]:
    """Read every file once, sequentially, with ``readinto`` of ``block`` bytes. Returns (seconds, bytes)."""
    buf = bytearray(block)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                total += k
    return time.perf_counter() - t0, total


def write_file(path: str, nbytes: int, block: int = 16 * MiB) -> float:
    """Write ``nbytes`` of non-zero data to ``path`` in ``block`` writes, fsync; returns seconds."""
    import numpy as np

    pool = _pool().view(np.uint8)
    data = memoryview(pool[:block] if pool.nbytes >= block else np.resize(pool, block)).cast("B")
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            k = min(left, block)
            f.write(data[:k])
            left -= k
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def io_floor(inputs: Sequence[str], output_bytes: int, scratch_path: str) -> Floor:
    """Read every input once, then write and fsync one ``output_bytes`` file at ``scratch_path`` (removed after)."""
    read_s, read_bytes = read_all(inputs)
    try:
        write_s = write_file(scratch_path, output_bytes)
    finally:
        if os.path.exists(scratch_path):
            os.unlink(scratch_path)
    return Floor(read_s, write_s, read_bytes, output_bytes)


# ---------------------------------------------------------------------------------------------------------------
# Memory of a process tree


def _children(pid: int) -> List[int]:
    kids: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _status_kib(pid: int, fields: Sequence[str]) -> Dict[str, int]:
    vals: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in fields:
                    vals[k] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return vals


class AnonRssSampler:
    """Sample ``RssAnon`` (private, anonymous resident memory) summed over a process tree every ``interval`` s.

    ``peak_anon`` is in bytes; ``peak_file`` is the largest ``RssFile`` sum seen (mapped file pages, which the
    kernel can drop at will and which are not counted as private memory).
    """

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.peak_anon = 0
        self.peak_file = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "AnonRssSampler":
        self._thread.start()
        return self

    def sample(self) -> None:
        anon = filed = 0
        for p in process_tree(self.pid):
            v = _status_kib(p, ("RssAnon", "RssFile"))
            anon += v.get("RssAnon", 0)
            filed += v.get("RssFile", 0)
        self.peak_anon = max(self.peak_anon, anon * 1024)
        self.peak_file = max(self.peak_file, filed * 1024)
        self.samples += 1

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all cores, from /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def busy_fraction(window: float = 2.0) -> float:
    """Fraction of all cores busy over the next ``window`` seconds."""
    b0, t0 = cpu_busy_seconds(), time.monotonic()
    time.sleep(window)
    return (cpu_busy_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


def wait_for_quiet(max_busy: float = 0.15, timeout: float = 600.0, window: float = 2.0, log=None) -> float:
    """Wait until the machine is mostly idle (others' tests skew timings on a small machine).

    Returns the last busy fraction seen; gives up after ``timeout`` seconds and returns anyway.
    """
    deadline = time.monotonic() + timeout
    told = False
    while True:
        b = busy_fraction(window)
        if b <= max_busy or time.monotonic() >= deadline:
            if told and log:
                log(f"  (machine {'quiet' if b <= max_busy else 'still busy, going ahead'}: {b * 100:.0f}% busy)")
            return b
        if not told and log:
            log(f"  (waiting up to {timeout:.0f} s for the machine to be quiet: {b * 100:.0f}% of the CPUs busy)")
            told = True


@dataclass
class Measured:
    wall_s: float
    cpu_s: float  # user + system CPU of the child (and its waited-for children)
    returncode: int
    peak_anon: int
    peak_file: int
    samples: int
    others_cpu_s: float = 0.0  # CPU used by everything else on the machine meanwhile (this script included)
    stdout: str = ""
    stderr: str = ""
    engine_s: Optional[float] = None  # time reported by the child itself, when it prints one
    user_s: float = 0.0  # user CPU of the process tree (cpu_s = user + system)


def run_measured(cmd: Sequence[str], cwd: Optional[str] = None, env: Optional[dict] = None, interval: float = 0.02) -> Measured:
    """Run ``cmd``; measure wall time, CPU time and peak anonymous RSS of its process tree."""
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = AnonRssSampler(proc.pid, interval).start()
    # read pipes in threads so a chatty child cannot block
    bufs: Dict[str, List[str]] = {"out": [], "err": []}

    def pump(stream, key):
        for line in stream:
            bufs[key].append(line)

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in pumps:
        t.start()
    # wait4 gives the child's resource usage; sample once more just before reaping
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy = cpu_busy_seconds() - busy0
    sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in pumps:
        t.join()
    cpu = ru.ru_utime + ru.ru_stime
    return Measured(wall, cpu, proc.returncode, sampler.peak_anon, sampler.peak_file,
                    sampler.samples, max(0.0, busy - cpu), "".join(bufs["out"]), "".join(bufs["err"]), user_s=ru.ru_utime)


# ---------------------------------------------------------------------------------------------------------------
# Output


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def machine_description() -> str:
    cores = os.cpu_count() or 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{cores} cores ({model}), {mem_kib / 1024**2:.0f} GiB RAM, {gpu}"

"""The streaming merge engine.

Keys are processed one at a time in sorted order (the output's layout). Inputs are opened with
``safetensors.safe_open``, whose tensors are views of the memory-mapped files: reading a key costs no private
memory, and a background thread asks the kernel to read ahead the next keys' byte ranges so that disk reads
overlap the arithmetic. On the CPU a linear method (weighted sum, add difference) is computed in cache-sized
chunks: each input chunk is widened to fp32 into a small scratch buffer and added into an fp32 accumulator
chunk, which is then narrowed to the output dtype straight into the writer's buffer. Memory therefore stays at
a few megabytes of chunks plus the writer's ring, whatever the number or size of the models. On a GPU the
accumulator is one fp32 tensor of the largest key, fed through pinned staging buffers.

The public entry points are :func:`merge_to_file` and :func:`merge_to_state_dict`; both take a
:class:`MergePlan` and report through plain callbacks (``progress(ProgressInfo)`` and ``cancel() -> bool``).
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import methods as _methods
from .archprobe import probe_architecture
from .devices import resolve_device
from .errors import BadFileError, IncompatibleModelsError, ManifestError, MergeCancelled, ModelMergerError, OutputError
from .preflight import KeyReport, compare_keys
from .safetensors_io import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    HASH_METADATA_KEY,
    HASH_PLACEHOLDER,
    OutTensor,
    SafetensorsHeader,
    StreamingWriter,
    check_output_target,
    read_header,
)

CHUNK_ELEMENTS = 1 << 20  # fp32 accumulator chunk on the CPU: 4 MiB
WRITE_RING = 8  # chunk buffers queued for the writer thread
PREFETCH_BYTES = 512 * 1024 * 1024  # how far ahead of the arithmetic the kernel is asked to read

OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "keep": None}
MARKER_KEYS = ("v_pred", "ztsnr")


def torch_dtype(st_dtype: str):
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
    }
    dt = table.get(st_dtype)
    if dt is None:
        raise BadFileError(f"dtype {st_dtype} is not supported by this torch build")
    return dt


# ---------------------------------------------------------------------------------------------------------------
# Plans


@dataclass
class MergeInput:
    path: str
    weight: float = 1.0
    name: str = ""
    sha256: Optional[str] = None  # full-file SHA-256 when known (manifest, hash cache): recorded in the recipe

    def display_name(self) -> str:
        return self.name or os.path.basename(self.path)


@dataclass
class MergePlan:
    """Everything a merge needs. ``key_params`` and ``key_source`` let callers vary a merge per key:

    * ``key_params(key) -> dict``: parameter values for this key (block weights), overriding ``params``.
    * ``key_source(key) -> int | None``: copy this key from input ``i`` instead of merging it (a text encoder or
      VAE taken from one model). ``None`` merges the key.
    * ``key_weights(key) -> list[float] | None``: per-input weights for this key (block-weighted sums).
    """

    inputs: List[MergeInput]
    method: str = "weighted_sum"
    params: Dict[str, object] = field(default_factory=dict)
    normalize: bool = True
    dtype: str = "fp16"
    device: str = "cpu"
    allow_missing: bool = False
    seed: int = 0
    title: Optional[str] = None
    key_params: Optional[Callable[[str], Dict[str, float]]] = None
    key_source: Optional[Callable[[str], Optional[int]]] = None
    key_weights: Optional[Callable[[str], Optional[Sequence[float]]]] = None
    recipe: Dict[str, object] = field(default_factory=dict)  # extra recipe facts for the metadata


@dataclass
class KeyJob:
    name: str
    shape: Tuple[int, ...]
    out_dtype: str
    sources: List[int]  # inputs that have this key, in input order
    copy_from: Optional[int] = None  # copy exactly (or cast) from this input instead of merging

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.out_dtype]


@dataclass
class PreparedMerge:
    plan: MergePlan
    headers: List[SafetensorsHeader]
    jobs: List[KeyJob]
    method: "_methods.MergeMethod"
    params: Dict[str, object]
    key_report: KeyReport
    architecture: str
    notes: List[str] = field(default_factory=list)
    compat: object = None  # merger_core.analyze.compat.CompatReport: per-component check and resource estimates

    @property
    def out_tensors(self) -> List[OutTensor]:
        return [OutTensor(j.name, j.out_dtype, j.shape) for j in self.jobs]

    @property
    def output_bytes(self) -> int:
        return sum(j.out_nbytes for j in self.jobs)

    @property
    def input_bytes(self) -> int:
        return sum(h.data_bytes for h in self.headers)

    @property
    def largest_numel(self) -> int:
        return max((j.numel for j in self.jobs), default=0)


@dataclass
class ProgressInfo:
    keys_done: int
    keys_total: int
    bytes_done: int  # output bytes produced
    bytes_total: int
    key: str
    elapsed: float


@dataclass
class MergeResult:
    output: Optional[str]
    keys: int
    output_bytes: int
    seconds: float
    tensor_sha256: Optional[str]
    architecture: str
    metadata: Dict[str, str]
    notes: List[str]


ProgressFn = Callable[[ProgressInfo], None]
CancelFn = Callable[[], bool]


def prepare(plan: MergePlan) -> PreparedMerge:
    """Read every header, check the plan and the inputs' keys and shapes; no weight is read."""
    method = _methods.get_method(plan.method)
    method.check_inputs(len(plan.inputs))
    params = method.check_params(dict(plan.params))
    if plan.dtype not in OUTPUT_DTYPES:
        raise ManifestError(f"output dtype {plan.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    weights = [i.weight for i in plan.inputs]
    for i, w in zip(plan.inputs, weights):
        if not isinstance(w, (int, float)) or w != w or math.isinf(w):
            raise ManifestError(f"{i.display_name()}: weight {w!r} is not a finite number")
    if method.uses_weights and plan.normalize and sum(weights) == 0:
        raise ManifestError("the weights sum to 0, so they cannot be normalised")
    headers = [read_header(i.path) for i in plan.inputs]
    names = [i.display_name() for i in plan.inputs]
    report = compare_keys(headers, names)
    compat = _structure_check(plan)
    if report.shape_mismatch or (report.missing and not plan.allow_missing):
        hint = "" if report.shape_mismatch else "\n(use --allow-missing to merge each key over the models that have it)"
        structure = "" if compat is None else "\n\nstructure (Analyze Structure):\n" + compat.describe()
        raise IncompatibleModelsError(
            "the models cannot be merged key by key:\n" + report.describe() + hint + structure, report
        )
    all_keys = sorted({k for h in headers for k in h.tensors})
    jobs: List[KeyJob] = []
    notes: List[str] = []
    if report.missing:
        notes.append("merged with missing keys: " + report.describe())
    for key in all_keys:
        sources = [i for i, h in enumerate(headers) if key in h.tensors]
        first = headers[sources[0]].tensors[key]
        copy_from = None
        if not first.is_float or key in MARKER_KEYS:
            copy_from = sources[0]
        elif plan.key_source is not None:
            chosen = plan.key_source(key)
            if chosen is not None:
                if chosen not in sources:
                    raise IncompatibleModelsError(f"{key} is taken from {names[chosen]}, which does not have it")
                copy_from = chosen
        if copy_from is not None and not headers[copy_from].tensors[key].is_float:
            out_dtype = headers[copy_from].tensors[key].dtype
        else:
            out_dtype = OUTPUT_DTYPES[plan.dtype] or headers[copy_from if copy_from is not None else sources[0]].tensors[key].dtype
        if copy_from is None and len(sources) < method.min_inputs:
            if method.roles:  # a role-bound method cannot merge a key some roles lack: keep the first model's
                copy_from = sources[0]
                notes.append(f"{key}: only in {len(sources)} model(s); copied from {names[sources[0]]}")
        jobs.append(KeyJob(key, first.shape, out_dtype, sources, copy_from))
    arch = probe_architecture(headers[0].tensors)
    prep = PreparedMerge(plan, headers, jobs, method, params, report, arch, notes)
    prep.compat = compat
    return prep


def _structure_check(plan: MergePlan):
    """Analyze Structure's per-component preflight (headers only), or None where it cannot run.

    It explains a refusal per component (UNet, text encoders, VAE) and estimates memory and disk; the key and
    shape comparison above stays the engine's own gate, so ``allow_missing`` keeps its meaning.
    """
    from .analyze.compat import check_compatibility

    try:
        return check_compatibility([i.path for i in plan.inputs], device=plan.device, out_dtype=plan.dtype)
    except ModelMergerError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Sinks: where merged bytes go


class _FileSink:
    """Feeds a StreamingWriter through a ring of reusable chunk buffers and two threads in a pipeline:
    the merging thread fills a chunk, a hashing thread adds it to the tensor-data SHA-256, a writing thread writes it
    and gives the buffer back. Order is kept by the queues; hashing and writing overlap each other and the merge.
    """

    def __init__(self, writer: StreamingWriter, chunk_bytes: int):
        import torch

        self.writer = writer
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(WRITE_RING)]
        self.free: "queue.Queue[int]" = queue.Queue()
        for i in range(WRITE_RING):
            self.free.put(i)
        self.todo: "queue.Queue[Optional[Tuple[int, int]]]" = queue.Queue()
        self.hashed: "queue.Queue[Optional[Tuple[int, int]]]" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.threads = [
            threading.Thread(target=self._hash_loop, name="model-merger-hash", daemon=True),
            threading.Thread(target=self._write_loop, name="model-merger-writer", daemon=True),
        ]
        for t in self.threads:
            t.start()
        self._slot: Optional[int] = None

    def _view(self, slot: int, n: int):
        return memoryview(self.buffers[slot][:n].numpy())

    def _hash_loop(self):
        while True:
            item = self.todo.get()
            if item is not None and self.error is None:
                try:
                    self.writer.hash_raw(self._view(*item))
                except BaseException as exc:  # reported to the merging thread
                    self.error = exc
            self.hashed.put(item)
            if item is None:
                return

    def _write_loop(self):
        while True:
            item = self.hashed.get()
            if item is None:
                return
            try:
                if self.error is None:
                    self.writer.write_unhashed(self._view(*item))
            except BaseException as exc:  # reported to the merging thread
                self.error = exc
            finally:
                self.free.put(item[0])

    def chunk(self, nbytes: int, dtype):
        """A 1-D buffer of ``dtype`` with room for ``nbytes`` to fill, then :meth:`commit`."""
        if self.error is not None:
            raise self.error
        self._slot = self.free.get()
        return self.buffers[self._slot][:nbytes].view(dtype)

    def commit(self, nbytes: int):
        self.todo.put((self._slot, nbytes))
        self._slot = None

    def begin_key(self, job: KeyJob):
        pass

    def end_key(self, job: KeyJob):
        pass

    def finish(self):
        self.todo.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error

    def abort(self):
        self.todo.put(None)
        for t in self.threads:
            t.join()


class _DictSink:
    """Builds a state dict of CPU tensors (graph mode)."""

    def __init__(self):
        self.out: Dict[str, object] = {}
        self._cur = None
        self._pos = 0

    def begin_key(self, job: KeyJob):
        import torch

        self._cur = torch.empty(job.numel, dtype=torch_dtype(job.out_dtype))
        self.out[job.name] = self._cur
        self._pos = 0
        self._job = job

    def chunk(self, nbytes: int, dtype):
        item = self._cur.element_size()
        return self._cur[self._pos : self._pos + nbytes // item]

    def commit(self, nbytes: int):
        self._pos += nbytes // self._cur.element_size()

    def end_key(self, job: KeyJob):
        self.out[job.name] = self._cur.reshape(job.shape)

    def finish(self):
        pass

    def abort(self):
        self.out.clear()


# ---------------------------------------------------------------------------------------------------------------
# Reading ahead


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


class _Prefetcher:
    """Asks the kernel to read the coming keys' byte ranges (posix_fadvise WILLNEED) ahead of the arithmetic."""

    def __init__(self, prep: PreparedMerge):
        self.ranges: List[List[Tuple[int, int, int]]] = []  # per job: (input, offset, length)
        for job in prep.jobs:
            srcs = [job.copy_from] if job.copy_from is not None else job.sources
            r = []
            for i in srcs:
                h = prep.headers[i]
                t = h.tensors[job.name]
                r.append((i, h.data_start + t.begin, t.nbytes))
            self.ranges.append(r)
        self.paths = [h.path for h in prep.headers]
        self.position = 0
        self.cond = threading.Condition()
        self.stop = False
        self.thread = None
        if hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, name="model-merger-readahead", daemon=True)
            self.thread.start()

    def advance(self, index: int):
        with self.cond:
            self.position = index
            self.cond.notify()

    def _run(self):
        fds = []
        try:
            fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            step = _readahead_bytes(self.paths[0])
            ahead = 0  # bytes requested beyond the current position
            nxt = 0
            done_bytes = [sum(n for _, _, n in r) for r in self.ranges]
            while nxt < len(self.ranges):
                with self.cond:
                    while not self.stop and nxt > self.position and ahead > PREFETCH_BYTES:
                        self.cond.wait(0.5)
                        ahead = sum(done_bytes[self.position : nxt])
                    if self.stop:
                        return
                for i, off, n in self.ranges[nxt]:
                    # One WILLNEED reads at most the device's read-ahead window: ask in steps of it.
                    for o in range(off, off + n, step):
                        os.posix_fadvise(fds[i], o, min(step, off + n - o), os.POSIX_FADV_WILLNEED)
                ahead += done_bytes[nxt]
                nxt += 1
        except OSError:
            return  # read-ahead is only a hint
        finally:
            for fd in fds:
                os.close(fd)

    def close(self):
        with self.cond:
            self.stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()


class _Unmapper:
    """Unmaps the pages of input tensors once their key is merged (Linux ``madvise(MADV_DONTNEED)``).

    ``safe_open`` hands out views of a private, read-only-in-practice mapping of each input. Without this, every
    page read stays mapped until the files are closed, so the process's RSS grows to the size of all inputs (page
    cache, not private memory, but it is what task managers show and what an RSS limit counts). The pages stay in
    the page cache; only this process's mapping of them goes. A view is released only if it lies entirely inside
    a mapping of one of the input files (from ``/proc/self/maps``): anything else is left alone.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = {os.path.realpath(p) for p in paths}
        self.regions: List[Tuple[int, int]] = []
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
        if self.madvise is None:
            return
        for t in views:
            n = t.numel() * t.element_size()
            if n < self.page:
                continue
            ptr = t.data_ptr()
            lo = ptr - ptr % self.page
            hi = -(-(ptr + n) // self.page) * self.page
            if not self._inside(lo, hi):
                self._load_regions()  # a file may have been mapped since the last look
                if not self._inside(lo, hi):
                    continue
            self.madvise(lo, hi - lo, self.flag)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _key_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFFFFFF


class _Runner:
    def __init__(self, prep: PreparedMerge, sink, progress: Optional[ProgressFn], cancel: Optional[CancelFn]):
        import torch

        self.torch = torch
        self.prep = prep
        self.plan = prep.plan
        self.sink = sink
        self.progress = progress
        self.cancel = cancel
        self.device = resolve_device(self.plan.device)
        self.on_cpu = self.device.type == "cpu"
        self.names = [i.display_name() for i in self.plan.inputs]
        self.base_weights = [float(i.weight) for i in self.plan.inputs]
        C = CHUNK_ELEMENTS
        if self.on_cpu:
            self.acc = torch.empty(C, dtype=torch.float32)
            self.tmp = torch.empty(C, dtype=torch.float32)
        else:
            n = prep.largest_numel
            self.acc = torch.empty(n, dtype=torch.float32, device=self.device)
            self.dev_out = torch.empty(n * 4, dtype=torch.uint8, device=self.device)
            self.pin = self.device.type == "cuda"
            self.staging = torch.empty(n * 4, dtype=torch.uint8, pin_memory=self.pin)
            self.host_out = torch.empty(n * 4, dtype=torch.uint8, pin_memory=self.pin)

    # -- weights and parameters per key --------------------------------------------------------------------------
    def key_weights(self, job: KeyJob) -> List[float]:
        w = None
        if self.plan.key_weights is not None:
            w = self.plan.key_weights(job.name)
        w = list(w) if w is not None else self.base_weights
        ws = [float(w[i]) for i in job.sources]
        if self.prep.method.uses_weights and self.plan.normalize:
            total = sum(ws)
            if total == 0:
                raise ManifestError(f"{job.name}: the weights of the models that have this key sum to 0")
            ws = [x / total for x in ws]
        return ws

    def key_params(self, job: KeyJob) -> Dict[str, float]:
        params = dict(self.prep.params)
        if self.plan.key_params is not None:
            params.update(self.plan.key_params(job.name) or {})
        return params

    # -- run --------------------------------------------------------------------------------------------------
    def run(self, handles) -> None:
        prep = self.prep
        self.unmapper = _Unmapper([h.path for h in prep.headers])
        total = len(prep.jobs)
        bytes_total = prep.output_bytes
        done_bytes = 0
        t0 = time.monotonic()
        prefetch = _Prefetcher(prep)
        threads = self.torch.get_num_threads()
        if self.on_cpu:
            # Chunks are small (4 MiB): intra-op threads only add barriers, and with a busy second core (the
            # writer's hashing, another process) a 2-thread OpenMP region stalls. One thread is 2-9x faster here.
            self.torch.set_num_threads(1)
        try:
            for idx, job in enumerate(prep.jobs):
                if self.cancel is not None and self.cancel():
                    raise MergeCancelled()
                prefetch.advance(idx)
                views = {i: handles[i].get_tensor(job.name) for i in ([job.copy_from] if job.copy_from is not None else job.sources)}
                self.sink.begin_key(job)
                if job.copy_from is not None:
                    self.copy_key(job, views[job.copy_from])
                elif prep.method.kind == "linear":
                    self.linear_key(job, views)
                else:
                    self.tensor_key(job, views)
                self.sink.end_key(job)
                self.unmapper.release(views.values())
                del views
                done_bytes += job.out_nbytes
                if self.progress is not None:
                    self.progress(ProgressInfo(idx + 1, total, done_bytes, bytes_total, job.name, time.monotonic() - t0))
        finally:
            prefetch.close()
            self.torch.set_num_threads(threads)

    # -- emitting results --------------------------------------------------------------------------------------
    def emit_cpu(self, job: KeyJob, produce: Callable[[int, int, object], None]) -> None:
        """Fill the output of ``job`` chunk by chunk: ``produce(start, stop, dst)`` writes elements into dst."""
        torch = self.torch
        out_dt = torch_dtype(job.out_dtype)
        item = DTYPE_SIZES[job.out_dtype]
        n = job.numel
        for s in range(0, n, CHUNK_ELEMENTS):
            e = min(n, s + CHUNK_ELEMENTS)
            dst = self.sink.chunk((e - s) * item, out_dt)
            produce(s, e, dst)
            self.sink.commit((e - s) * item)

    def emit_host(self, job: KeyJob, flat_host) -> None:
        """Pass a finished 1-D CPU tensor of the output dtype to the sink in chunks."""
        def produce(s, e, dst):
            dst.copy_(flat_host[s:e])

        self.emit_cpu(job, produce)

    def copy_key(self, job: KeyJob, view) -> None:
        torch = self.torch
        flat = view.reshape(-1)
        out_dt = torch_dtype(job.out_dtype)
        if flat.dtype == out_dt:
            self.emit_host(job, flat)
        else:
            def produce(s, e, dst):
                dst.copy_(flat[s:e])

            self.emit_cpu(job, produce)

    def linear_key(self, job: KeyJob, views) -> None:
        torch = self.torch
        coefs = self.prep.method.coefficients(self.key_weights(job), self.key_params(job))
        terms = [(views[i].reshape(-1), float(c)) for i, c in zip(job.sources, coefs) if c != 0.0]
        if not terms:
            def zero(s, e, dst):
                dst.zero_()
            return self.emit_cpu(job, zero) if self.on_cpu else self.emit_host(job, torch.zeros(job.numel, dtype=torch_dtype(job.out_dtype)))
        lead = max(range(len(terms)), key=lambda k: abs(terms[k][1]))
        terms.insert(0, terms.pop(lead))
        c0 = terms[0][1]
        if self.on_cpu:
            def produce(s, e, dst):
                a = self.acc[: e - s]
                a.copy_(terms[0][0][s:e])
                for x, c in terms[1:]:
                    xs = x[s:e]
                    if xs.dtype != torch.float32:
                        t = self.tmp[: e - s]
                        t.copy_(xs)
                        xs = t
                    a.add_(xs, alpha=c / c0)
                if c0 != 1.0:
                    a.mul_(c0)
                dst.copy_(a)

            self.emit_cpu(job, produce)
        else:
            acc = self.acc[: job.numel]
            for k, (x, c) in enumerate(terms):
                xd = self.to_device(x)
                if k == 0:
                    acc.copy_(xd)
                    if c != 1.0:
                        acc.mul_(c)
                else:
                    acc.add_(xd, alpha=c)
            self.emit_device(job, acc)

    def tensor_key(self, job: KeyJob, views) -> None:
        torch = self.torch
        method = self.prep.method
        weights = self.key_weights(job)
        params = self.key_params(job)
        ctx = _methods.KeyContext(job.name, _key_seed(self.plan.seed, job.name), self.names, list(job.sources))
        flats = [views[i].reshape(-1) for i in job.sources]
        if self.on_cpu and method.chunkable:
            def produce(s, e, dst):
                ctx.offset = s
                dst.copy_(method.merge_tensor([f[s:e].to(torch.float32) for f in flats], weights, params, ctx))

            self.emit_cpu(job, produce)
            return
        if self.on_cpu and method.native_inputs:
            ts = [f.reshape(job.shape) for f in flats]  # file-dtype views; the method widens slices itself
        elif self.on_cpu:
            ts = [f.to(torch.float32).reshape(job.shape) for f in flats]
        else:
            ts = [self.to_device(f).to(torch.float32).reshape(job.shape) for f in flats]
        result = method.merge_tensor(ts, weights, params, ctx).reshape(-1)
        del ts
        if self.on_cpu:
            self.emit_host(job, result.to(torch_dtype(job.out_dtype)))
        else:
            self.emit_device(job, result)

    # -- GPU transfers -----------------------------------------------------------------------------------------
    def to_device(self, flat):
        """Copy a CPU view to the merge device through a pinned staging buffer."""
        torch = self.torch
        nbytes = flat.numel() * flat.element_size()
        stage = self.staging[:nbytes].view(flat.dtype)
        stage.copy_(flat)
        out = stage.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the staging buffer is reused next
        return out

    def emit_device(self, job: KeyJob, acc) -> None:
        torch = self.torch
        out_dt = torch_dtype(job.out_dtype)
        nbytes = job.out_nbytes
        dev = self.dev_out[:nbytes].view(out_dt)
        dev.copy_(acc)
        host = self.host_out[:nbytes].view(out_dt)
        host.copy_(dev, non_blocking=self.pin)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.emit_host(job, host)


def _open_inputs(stack: ExitStack, prep: PreparedMerge):
    from safetensors import safe_open

    handles = []
    for h in prep.headers:
        try:
            handles.append(stack.enter_context(safe_open(h.path, framework="pt", device="cpu")))
        except Exception as exc:  # safetensors raises its own error types
            raise BadFileError(f"{os.path.basename(h.path)}: cannot be opened as safetensors ({exc})") from exc
    return handles


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def merge_to_file(
    plan: MergePlan,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
    prepared: Optional[PreparedMerge] = None,
    opener=None,
) -> MergeResult:
    """Merge to a safetensors file (temporary file, fsync, rename). Nothing is left behind on failure."""
    from .metadata import build_metadata

    output = os.path.abspath(os.fspath(output))
    prep = prepared or prepare(plan)
    resolve_device(plan.device)
    metadata = build_metadata(prep, output)
    metadata[HASH_METADATA_KEY] = HASH_PLACEHOLDER
    if extra_metadata:
        metadata.update(extra_metadata)
    writer = StreamingWriter(output, prep.out_tensors, metadata, overwrite=overwrite, opener=opener)
    writer.check_target()
    t0 = time.monotonic()
    chunk_bytes = CHUNK_ELEMENTS * 4
    with ExitStack() as stack:
        handles = _open_inputs(stack, prep)
        with writer:
            sink = _FileSink(writer, chunk_bytes)
            try:
                _Runner(prep, sink, progress, cancel).run(handles)
            except BaseException:
                sink.abort()
                raise
            sink.finish()
    metadata[HASH_METADATA_KEY] = "0x" + writer.sha256
    return MergeResult(
        output, len(prep.jobs), writer.total_bytes, time.monotonic() - t0, writer.sha256, prep.architecture, metadata, prep.notes
    )


def merge_to_state_dict(
    plan: MergePlan,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    prepared: Optional[PreparedMerge] = None,
) -> Tuple[Dict[str, object], MergeResult]:
    """Merge into a dict of CPU tensors (for loading straight into ComfyUI). Peak memory: one merged model."""
    prep = prepared or prepare(plan)
    t0 = time.monotonic()
    sink = _DictSink()
    with ExitStack() as stack:
        handles = _open_inputs(stack, prep)
        try:
            _Runner(prep, sink, progress, cancel).run(handles)
        except BaseException:
            sink.abort()
            raise
    result = MergeResult(None, len(prep.jobs), prep.output_bytes, time.monotonic() - t0, None, prep.architecture, {}, prep.notes)
    return sink.out, result

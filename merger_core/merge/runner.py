"""The streaming merge loop and its public entry points :func:`merge_to_file` and :func:`merge_to_state_dict`.

Keys are processed one at a time in sorted order (the output's layout), from memory-mapped views of the inputs
(:mod:`merger_core.io.reader`). On the CPU a linear method (weighted sum, add difference) is computed in
cache-sized chunks: each input chunk is widened to fp32 into a small scratch buffer and added into an fp32
accumulator chunk, which is then narrowed to the output dtype straight into the sink's buffer. Memory therefore
stays at a few megabytes of chunks plus the writer's ring, whatever the number or size of the models. On a GPU the
accumulator is one fp32 tensor of the largest key, fed through pinned staging buffers.

Every value is widened to fp32 before any arithmetic (fp8 included, which torch does not promote); a scaled fp8
input (ComfyUI's format) is dequantized on the way: its scale is folded into a linear method's coefficient, or
multiplied into the fp32 values a tensor method receives. Chunks are sized to the sink's buffers, so a key of
8-byte elements (F64, I64) goes out in chunks of fewer elements.

Before values are narrowed to the output dtype, each chunk is checked: finite, and inside the output dtype's range
(one sum, or a min and a max). What happens otherwise is the plan's ``nonfinite``: stop with
:class:`NonFiniteError` naming the key and the inputs that hold such values (looked for only then), or write them
and note the key, or clamp them and note the key (``MergeResult.notes``).

Both entry points take a :class:`~merger_core.merge.plan.MergePlan` and report through plain callbacks
(``progress(ProgressInfo)`` and ``cancel() -> bool``).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import os
import threading
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .. import methods as _methods
from ..methods import _common
from ..errors import BadFileError, ManifestError, MergeCancelled, ModelMergerError, NonFiniteError
from ..io.reader import Prefetcher, Unmapper, open_inputs
from ..io.safetensors import DTYPE_SIZES, FLOAT_DTYPES, MARKER_KEYS, dtype_label, torch_dtype
from ..io.writer import HASH_METADATA_KEY, HASH_PLACEHOLDER, StreamingWriter
from .device import resolve_device
from .pipeline import DevicePipeline, device_bytes
from .metadata import build_metadata
from .plan import KeyJob, MergePlan, PreparedMerge, prepare
from .provenance import InputHashes
from .quantize import FP8_MAX as QUANT_MAX, plan_fp8_output
from .sinks import DictSink, FileSink

CHUNK_ELEMENTS = 1 << 20  # fp32 accumulator chunk on the CPU: 4 MiB
SLICE_ELEMENTS = 1 << 18  # what one merge worker computes at a time (fixed: the bytes never depend on the workers)
STEP_ELEMENTS = 1 << 16  # a linear slice is computed in steps of this many: its fp32 buffers stay in the core's L2
NOTE_KEYS = 5  # keys named in a note about values that do not fit; the rest are counted


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
    architecture: str  # the ModelSpec label written into the output
    metadata: Dict[str, str]
    notes: List[str]
    structure: str = "unknown"  # what the first input is, in words (Analyze Structure)
    swept: List[str] = field(default_factory=list)  # stale temporary files of the target removed before writing
    inputs: List[Dict[str, object]] = field(default_factory=list)  # each input's name, path, size and hashes


ProgressFn = Callable[[ProgressInfo], None]
CancelFn = Callable[[], bool]


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
        self.on_cpu = _chunked(self.device)
        self.names = [i.display_name() for i in self.plan.inputs]
        self.base_weights = [float(i.weight) for i in self.plan.inputs]
        self.nonfinite = self.plan.nonfinite
        self.scales: Dict[int, float] = {}  # the current key's scaled fp8 inputs -> their scale
        self.delta = None  # what the plan adds to the current key's merged values (baked LoRAs), or None
        self.quant = getattr(prep, "quant", None)  # a scaled fp8 output's keys (merge/quantize.py), or None
        self.jobs_by_name = {j.name: j for j in prep.jobs} if self.quant is not None else {}
        self._held = None  # (weight key, its merged fp32 values, its scale) between a scale and its codes
        self.flagged: Dict[str, List[int]] = {}  # key -> [NaN, Inf, beyond the output range] (warn, clamp)
        self._flagged_dtype: Dict[str, str] = {}
        self._limits: Dict[str, float] = {}
        C = CHUNK_ELEMENTS
        self.pool = None  # the merge workers (CPU), started in run()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.pipe = None  # the device pipeline (merge/pipeline.py) off the CPU
        self._result = None  # CPU tensor methods' result buffer, kept between keys (result_buffer)
        if self.on_cpu:
            self.acc = torch.empty(C, dtype=torch.float32)
            self.tmp = torch.empty(C, dtype=torch.float32)
        else:
            in_bytes, out_bytes, n = device_bytes(prep)  # inputs travel in their file dtype and are widened there
            self.acc = torch.empty(n, dtype=torch.float32, device=self.device)
            self.pipe = DevicePipeline(torch, self.device, in_bytes, out_bytes)

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
        self.unmapper = Unmapper([h.path for h in prep.headers])
        total = len(prep.jobs)
        bytes_total = prep.output_bytes
        done_bytes = 0
        t0 = time.monotonic()
        bases = [getattr(h, "address", None) for h in handles]
        prefetch = Prefetcher([h.path for h in prep.headers], _read_ranges(prep), bases if None not in bases else None)
        threads = self.torch.get_num_threads()
        k = _common.workers() if not self.plan.threads else int(self.plan.threads)
        limit = _common.use_workers(k)
        limit.__enter__()
        if self.on_cpu:
            # Slices are small (1 MiB of fp32): intra-op threads only add barriers, and with a busy core (the
            # writer's hashing, another process) an OpenMP region stalls. The K merge workers each run single-threaded
            # ops on their own slices instead (torch releases the GIL inside its ops).
            self.torch.set_num_threads(1)
            if k > 1:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="model-merger-merge")
        self.handles = handles
        # The merge allocates little but often (views, futures); the objects that exist now (headers, key maps) need
        # no look from the cycle collector while it runs.
        gc.freeze()
        try:
            for idx, job in enumerate(prep.jobs):
                if self.cancel is not None and self.cancel():
                    raise MergeCancelled()
                check_unchanged(prep.headers, f"before {job.name}")
                prefetch.advance(idx)
                views = {i: handles[i].get_tensor(job.source_name(i)) for i in ([job.copy_from] if job.copy_from is not None else job.sources)}
                self.delta = self.plan.key_delta(job.name) if self.plan.key_delta is not None else None
                # scaled fp8 inputs: the value is code * scale (one float per layer)
                self.scales = {i: _scalar(handles[i].get_tensor(name)) for i, name in job.scales.items() if i in views}
                self.current_views = views
                # each key is emitted once, and its emission opens and closes it in the sink (begin_key/end_key):
                # on a device one key later than it is computed
                if self.quant is not None and self.quant_key(job, views):
                    pass  # a scaled fp8 output's marker, scale or codes
                else:
                    self.merge_key(job, views)
                if self.delta is not None and hasattr(self.delta, "release"):
                    self.delta.release()  # the LoRA factors of this key
                self.unmapper.release(views.values())
                del views
                done_bytes += job.out_nbytes
                if self.progress is not None:
                    self.progress(ProgressInfo(idx + 1, total, done_bytes, bytes_total, job.name, time.monotonic() - t0))
            if self.pipe is not None:
                self.pipe.flush(self._emit_device_key)
            self.unmapper.flush()
        except BaseException:
            if self.pipe is not None:
                self.pipe.drain()  # nothing on the device may still write into a buffer
            raise
        finally:
            gc.unfreeze()
            prefetch.close()
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None
            limit.__exit__(None, None, None)
            self.torch.set_num_threads(threads)

    def merge_key(self, job: KeyJob, views) -> None:
        if job.copy_from is not None:
            self.copy_key(job, views[job.copy_from])
        elif self.prep.method.kind == "linear":
            self.linear_key(job, views)
        else:
            self.tensor_key(job, views)

    # -- a scaled fp8 output (merge/quantize.py) -----------------------------------------------------------------
    def quant_key(self, job: KeyJob, views) -> bool:
        """Write ``job`` if it is part of a scaled fp8 output (marker, scale, codes); False for any other key."""
        torch = self.torch
        q = self.quant
        if job.name == q.marker:
            self.emit_host(job, torch.zeros(job.numel, dtype=torch_dtype(job.out_dtype)))
            return True
        if job.name in q.scale_of:
            weight = self.jobs_by_name[q.scale_of[job.name]]
            values = self.merged_fp32(weight, views)
            scale = values.abs().amax() / QUANT_MAX if values.numel() else torch.zeros((), dtype=torch.float32)
            if not float(scale) > 0.0:
                scale = torch.ones((), dtype=torch.float32)
            self._held = (weight.name, values, scale)
            self.emit_host(job, scale.reshape(1).to(torch.float32))
            return True
        if job.name in q.weights:
            held = self._held
            if held is not None and held[0] == job.name:
                _, values, scale = held
            else:  # not reached through its scale (never in sorted order): merge it here
                values = self.merged_fp32(job, views)
                scale = values.abs().amax() / QUANT_MAX
                scale = scale if float(scale) > 0.0 else torch.ones((), dtype=torch.float32)
            self._held = None
            codes = (values / scale).clamp_(-QUANT_MAX, QUANT_MAX).to(torch_dtype(job.out_dtype))
            self.emit_host(job, codes)
            return True
        return False

    def merged_fp32(self, job: KeyJob, views):
        """The merged values of ``job`` in fp32 (checked like any output), as one flat CPU tensor."""
        fjob = dataclasses.replace(job, out_dtype="F32")
        sink, self.sink = self.sink, DictSink()
        delta = self.delta
        self.delta = self.plan.key_delta(job.name) if self.plan.key_delta is not None else None
        try:
            if self.pipe is not None:
                self.pipe.flush(self._emit_device_key)  # keys before this one go to the sink they were meant for
            self.merge_key(fjob, views)
            if self.pipe is not None:
                self.pipe.flush(self._emit_device_key)
            return self.sink.out[job.name].reshape(-1)
        finally:
            self.sink = sink
            self.delta = delta

    # -- emitting results --------------------------------------------------------------------------------------
    def emit_cpu(self, job: KeyJob, produce: Callable[[int, int, object], None]) -> None:
        """Fill the output of ``job`` chunk by chunk: ``produce(start, stop, dst)`` writes elements into dst.

        With merge workers, each chunk is cut into fixed slices (multiples of SLICE_ELEMENTS, whatever the number of
        workers) that the workers compute side by side, and up to the sink's ``max_outstanding`` chunks are in
        flight at once, so the workers never wait at a chunk's end for the next one to be handed out. Chunks are
        committed in order, each only once all its slices are done."""
        if self.pipe is not None:
            self.pipe.flush(self._emit_device_key)  # keys computed on the device before this one go out first
        self.sink.begin_key(job)
        self._emit_chunks(job, produce)
        self.sink.end_key(job)

    def _emit_chunks(self, job: KeyJob, produce) -> None:
        out_dt = torch_dtype(job.out_dtype)
        item = DTYPE_SIZES[job.out_dtype]
        n = job.numel
        step = CHUNK_ELEMENTS
        room = getattr(self.sink, "chunk_bytes", None)  # a sink with fixed buffers: as many elements as fit one
        if room is not None:
            step = max(1, min(step, room // item))
        if self.pool is None or n <= SLICE_ELEMENTS:
            for s in range(0, n, step):
                e = min(n, s + step)
                dst = self.sink.chunk((e - s) * item, out_dt)
                produce(s, e, dst)
                self.sink.commit((e - s) * item)
            return
        window = max(1, int(getattr(self.sink, "max_outstanding", 1) or 1))
        pending: "collections.deque" = collections.deque()
        try:
            for s in range(0, n, step):
                e = min(n, s + step)
                while len(pending) >= window:
                    self._retire(pending.popleft())
                dst = self.sink.chunk((e - s) * item, out_dt)
                pending.append((self._submit(produce, s, e, dst), (e - s) * item))
            while pending:
                self._retire(pending.popleft())
        except BaseException:
            for futures, _ in pending:  # no worker may still write into a buffer once this returns
                for f in futures:
                    f.exception()
            raise

    def _submit(self, produce, s: int, e: int, dst) -> list:
        """Queue ``produce`` over the fixed slices of ``s..e`` on the merge workers; returns their futures."""
        inference = self.torch.is_inference_mode_enabled()

        def one(a, b):
            with self.torch.inference_mode(inference):
                produce(a, b, dst[a - s : b - s])

        first = (s // SLICE_ELEMENTS + 1) * SLICE_ELEMENTS
        bounds = [s] + list(range(first, e, SLICE_ELEMENTS)) + [e]
        return [self.pool.submit(one, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    def _retire(self, item) -> None:
        """Wait for one chunk's slices, then commit it (the first error of its slices is raised instead)."""
        futures, nbytes = item
        errors = [f.exception() for f in futures]
        first = next((x for x in errors if x is not None), None)
        if first is not None:
            raise first
        self.sink.commit(nbytes)

    def scratch(self, n: int):
        """Two fp32 buffers of ``n`` (at most CHUNK_ELEMENTS) elements for the calling thread (each worker has its own)."""
        if self.pool is None:
            return self.acc[:n], self.tmp[:n]
        loc = self._local
        if getattr(loc, "acc", None) is None:
            loc.acc = self.torch.empty(CHUNK_ELEMENTS, dtype=self.torch.float32)
            loc.tmp = self.torch.empty(CHUNK_ELEMENTS, dtype=self.torch.float32)
        return loc.acc[:n], loc.tmp[:n]

    def emit_host(self, job: KeyJob, flat_host) -> None:
        """Pass a finished 1-D CPU tensor of the output dtype to the sink in chunks."""
        def produce(s, e, dst):
            dst.copy_(flat_host[s:e])

        self.emit_cpu(job, produce)

    def copy_key(self, job: KeyJob, view) -> None:
        flat = view.reshape(-1)
        if job.out_dtype not in FLOAT_DTYPES or job.name in MARKER_KEYS:
            return self.emit_host(job, flat)  # integers and markers keep their bytes
        views = {job.copy_from: view}
        scale = self.scales.get(job.copy_from)
        delta = self.delta

        def produce(s, e, dst):  # a float key taken from one model: checked like a merged one
            x = flat[s:e] if scale is None and delta is None else self.widen(job.copy_from, flat[s:e])
            if delta is not None:
                delta.add_to(x, s)
            dst.copy_(self.guard(job, x, s, views))

        self.emit_cpu(job, produce)

    def linear_key(self, job: KeyJob, views) -> None:
        torch = self.torch
        coefs = self.prep.method.coefficients(self.key_weights(job), self.key_params(job))
        coefs = [c * self.scales.get(i, 1.0) for i, c in zip(job.sources, coefs)]  # c * (code * scale)
        terms = [(views[i].reshape(-1), float(c)) for i, c in zip(job.sources, coefs) if c != 0.0]
        if not terms:  # every weight 0: zeros (plus the delta, if any)
            delta = self.delta

            def zero(s, e, dst):
                if delta is None:
                    return dst.zero_()
                a, _ = self.scratch(e - s)
                a.zero_()
                delta.add_to(a, s)
                dst.copy_(self.guard(job, a, s, views))

            if self.on_cpu:
                return self.emit_cpu(job, zero)
            acc = self.acc[: job.numel].zero_()
            if delta is not None:
                delta.add_to(acc, 0)
            return self.emit_device(job, acc)
        lead = max(range(len(terms)), key=lambda k: abs(terms[k][1]))
        terms.insert(0, terms.pop(lead))
        c0 = terms[0][1]
        if self.on_cpu:
            lead, rest = terms[0][0], [(x, c / c0) for x, c in terms[1:]]
            delta = self.delta
            # Steps of STEP_ELEMENTS keep the fp32 accumulator and scratch in L2 (every op after the first read of an
            # input then runs from cache); with a LoRA delta the whole slice at once, as its row blocks are computed
            # per call. The operations and their order are the same either way, so the bytes are too.
            sub = CHUNK_ELEMENTS if delta is not None else STEP_ELEMENTS

            def produce(s, e, dst):
                af, tf = self.scratch(min(e - s, sub))
                for s1 in range(s, e, sub):
                    e1 = min(e, s1 + sub)
                    a, t = af[: e1 - s1], tf[: e1 - s1]
                    a.copy_(lead[s1:e1])
                    for x, r in rest:
                        xs = x[s1:e1]
                        if xs.dtype != torch.float32:
                            t.copy_(xs)
                            xs = t
                        a.add_(xs, alpha=r)
                    if c0 != 1.0:
                        a.mul_(c0)
                    if delta is not None:
                        delta.add_to(a, s1)
                    dst[s1 - s : e1 - s].copy_(self.guard(job, a, s1, views))

            self.emit_cpu(job, produce)
        else:
            # the same operations in the same order as the CPU chunks (the lead term, the others scaled by c / c0,
            # then times c0), so both give the same bytes where each step rounds alike (fp32, fused multiply-add)
            # Each input streams through the pipeline's two device buffers: the upload of the next overlaps this add.
            acc = self.acc[: job.numel]
            for k, (x, c) in enumerate(terms):
                xd, slot = self.pipe.upload(x)
                if k > 0 and xd.dtype != torch.float32:
                    xd = xd.to(torch.float32)  # as the CPU path widens each term before adding it
                if k == 0:
                    acc.copy_(xd)
                else:
                    acc.add_(xd, alpha=c / c0)
                self.pipe.release(slot)
            if c0 != 1.0:
                acc.mul_(c0)
            if self.delta is not None:
                self.delta.add_to(acc, 0)
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
                here = dataclasses.replace(ctx, offset=s)  # one context per slice: workers run slices at once
                merged = method.merge_tensor([self.widen(i, f[s:e]) for i, f in zip(job.sources, flats)], weights, params, here)
                if self.delta is not None:
                    merged = merged if merged.dtype == torch.float32 else merged.to(torch.float32)
                    self.delta.add_to(merged, s)
                dst.copy_(self.guard(job, merged, s, views))

            self.emit_cpu(job, produce)
            return
        if not self.on_cpu and getattr(method, "streams_on_device", False):
            # the inputs stay on the host; the method loads slices through the pipeline's staging buffers, so no input
            # is whole on the device (device memory flat in N); the result goes into the accumulator
            ctx = dataclasses.replace(ctx, load=self.device_loader(job, flats), device=self.device, out=self.acc)
            ts = flats
        elif self.on_cpu:
            # the result goes into one fp32 buffer kept between keys (emit_cpu below is done with it before the next
            # key): no fresh allocation and page faults per key
            ctx = dataclasses.replace(ctx, out=self.result_buffer(job.numel))
            if method.native_inputs:
                # file-dtype views; the method widens slices itself (a scaled fp8 input is dequantized here, in fp32)
                ts = [(f if i not in self.scales else self.widen(i, f)).reshape(job.shape) for i, f in zip(job.sources, flats)]
            else:
                ts = [self.widen(i, f).reshape(job.shape) for i, f in zip(job.sources, flats)]
        else:
            ts = [self.widen_on_device(i, f).reshape(job.shape) for i, f in zip(job.sources, flats)]
        result = method.merge_tensor(ts, weights, params, ctx).reshape(-1)
        del ts
        if self.delta is not None:
            result = result if result.dtype == torch.float32 else result.to(torch.float32)
            self.delta.add_to(result, 0)
        if self.on_cpu:
            # checked and narrowed slice by slice on the merge workers, straight into the sink's buffers
            def narrow(s, e, dst):
                dst.copy_(self.guard(job, result[s:e], s, views))

            self.emit_cpu(job, narrow)
        else:
            self.emit_device(job, result)

    def result_buffer(self, n: int):
        """A contiguous fp32 CPU buffer of at least ``n`` elements, kept between keys (grown to the largest key)."""
        torch = self.torch
        if self._result is None or self._result.numel() < n:
            self._result = None  # the old one goes before the bigger one is made
            self._result = torch.empty(n, dtype=torch.float32)
        return self._result

    # -- values that do not fit ---------------------------------------------------------------------------
    def limit(self, st_dtype: str) -> float:
        """The largest finite value of a float output dtype."""
        if st_dtype not in self._limits:
            try:
                self._limits[st_dtype] = float(self.torch.finfo(torch_dtype(st_dtype)).max)
            except (TypeError, ModelMergerError):
                self._limits[st_dtype] = float("inf")
        return self._limits[st_dtype]

    def guard(self, job: KeyJob, values, start: int, views):
        """Check values about to be written as ``job.out_dtype`` (elements ``start..`` of the key): finite and
        inside the output dtype's range. One sum (fp32/fp64 outputs) or a min and a max (narrower outputs); only a
        chunk that fails is looked at further. Returns
        the values to write (clamped with ``nonfinite="clamp"``); raises :class:`NonFiniteError` with "error"."""
        torch = self.torch
        if values.numel() == 0:
            return values
        limit = self.limit(job.out_dtype)
        w = values if values.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else values.float()
        if job.out_dtype in ("F32", "F64"):
            # the range is fp32's own: one sum tells (NaN and Inf make it non-finite; a sum that overflows on
            # finite values only sends the chunk to the exact look below)
            total = float(w.sum(dtype=torch.float64 if w.dtype == torch.float64 else torch.float32))
            if math.isfinite(total):
                return values
        else:
            lo, hi = torch.aminmax(w)  # one pass over the chunk
            if -limit <= float(lo) and float(hi) <= limit:  # False for NaN
                return values
        return self._does_not_fit(job, values, w, start, views, limit)

    def _does_not_fit(self, job: KeyJob, values, w, start: int, views, limit: float):
        torch = self.torch
        if job.out_dtype == "F64" and w.dtype != torch.float64:
            w = w.double()
        elif w.dtype not in (torch.float32, torch.float64):
            w = w.float()
        nan = int(torch.isnan(w).sum())
        inf = int(torch.isinf(w).sum())
        beyond = int((w.abs() > limit).sum()) - inf
        if not (nan or inf or beyond):  # finite values whose fp32 sum overflowed: they fit
            return values
        if self.nonfinite == "error":
            raise NonFiniteError(self._nonfinite_message(job, w, start, views, limit, nan, inf, beyond))
        with self._lock:  # workers may flag slices of one key at once
            counts = self.flagged.setdefault(job.name, [0, 0, 0])
            self._flagged_dtype[job.name] = job.out_dtype
            counts[0] += nan
            counts[1] += inf
            counts[2] += beyond
        if self.nonfinite == "warn":
            return w
        return torch.nan_to_num(w, nan=0.0, posinf=limit, neginf=-limit).clamp_(-limit, limit)

    def input_values(self, job: KeyJob, i: int, views, start: int, stop: int):
        """Input ``i``'s values of elements ``start..stop`` of the key, in fp32 (the error path's look at the inputs)."""
        return self.widen(i, views[i].reshape(-1)[start:stop])

    def widen(self, i: int, x, copy: bool = False):
        """Input ``i``'s elements ``x`` as fp32 values: widened, and for a scaled fp8 input times its scale; with
        ``copy``, always a tensor of their own (``x`` is a buffer about to be reused)."""
        x = x.to(self.torch.float32, copy=copy)
        scale = self.scales.get(i)
        if scale is None:
            return x
        return x.mul_(scale) if copy else x * scale

    def _nonfinite_message(self, job: KeyJob, w, start: int, views, limit: float, nan: int, inf: int, beyond: int) -> str:
        torch = self.torch
        out = dtype_label(job.out_dtype)
        stop = start + w.numel()
        sources = [job.copy_from] if job.copy_from is not None else list(job.sources)
        holding, large = [], []
        for i in sources:
            x = self.input_values(job, i, views, start, stop)
            kinds = [k for k, n in (("NaN", int(torch.isnan(x).sum())), ("Inf", int(torch.isinf(x).sum()))) if n]
            if kinds:
                holding.append(f"{self.names[i]} holds {' and '.join(kinds)}")
            elif beyond:
                top = float(x.abs().max())
                if top > limit:
                    large.append(f"{self.names[i]} (magnitudes up to {top:.6g})")
        what = " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n)
        copied = job.copy_from is not None
        values = f"the values taken unmerged from {self.names[job.copy_from]}" if copied else "the merged values"
        if holding:
            head = f"{job.name}: {'; '.join(holding)} in this key, so {values} are not finite ({what or 'NaN/Inf'})"
        elif beyond or (inf and large):
            head = f"{job.name}: {values} do not fit {out}, which holds values up to +-{limit:g}"
            if large:
                head += f"; beyond that range: {', '.join(large)}"
            else:
                head += " (the weights or parameters push them beyond it)"
        else:
            head = (f"{job.name}: the merged values are not finite ({what}) although every input's values are finite: "
                    "the weights or parameters push them beyond the range of fp32")
        advice = ""
        if (beyond or large) and job.out_dtype not in ("F32", "F64", "BF16"):
            advice = "write a wider output dtype (bf16 or fp32), or "
        return (
            f"{head}. No output was written; {advice}set nonfinite to \"warn\" to write the values as they are, or to "
            f"\"clamp\" to clamp them to {out}'s range with NaN as 0 (--nonfinite warn|clamp on the command line, "
            "\"nonfinite\" in a manifest)"
        )

    def nonfinite_notes(self) -> List[str]:
        """The note about keys whose values did not fit (warn, clamp): the first few by name, and a count."""
        if not self.flagged:
            return []
        keys = list(self.flagged)
        labels = {}
        for k in keys:
            nan, inf, beyond = self.flagged[k]
            parts = [f"{nan:,} NaN" if nan else "", f"{inf:,} Inf" if inf else "",
                     f"{beyond:,} beyond {dtype_label(self._flagged_dtype[k])}'s range" if beyond else ""]
            labels[k] = ", ".join(p for p in parts if p)
        shown = "; ".join(f"{k} ({labels[k]})" for k in keys[:NOTE_KEYS])
        more = f" and {len(keys) - NOTE_KEYS} more" if len(keys) > NOTE_KEYS else ""
        n = f"{len(keys)} key{'s' if len(keys) != 1 else ''}"
        if self.nonfinite == "warn":
            return [f"{n} held NaN/Inf or values beyond the output dtype's range, written as they are (nonfinite warn): {shown}{more}"]
        return [f"{n} held NaN/Inf or values beyond the output dtype's range, clamped to that range with NaN as 0 (nonfinite clamp): {shown}{more}"]

    # -- device transfers (merge/pipeline.py) --------------------------------------------------------------------
    def device_loader(self, job: KeyJob, flats):
        """``load(j, s, e)`` for a streaming tensor method (``KeyContext.load``): elements ``s..e`` of the key's input
        ``j`` as a new fp32 device tensor, uploaded through the pipeline's staging buffers and widened there (a
        scaled fp8 input times its scale).

        ``load.hold(j)``: a method that reads input ``j`` several times asks for it to cross once; its whole key then
        stays on the device in the dtype it crossed in (no wider), and later loads widen slices of that copy, with the
        same operations (so the same values) as a fresh upload. A small key's inputs (``DEVICE_CACHE_MAX`` elements
        in all) are held so at their first load, so a method's many small loads do not each pay a transfer."""
        from ..methods._common import DEVICE_CACHE_MAX

        small = job.numel * len(flats) <= DEVICE_CACHE_MAX
        held = {}

        def hold(j: int) -> None:
            if j not in held:
                dev, slot = self.pipe.upload(flats[j])
                held[j] = dev.clone()
                self.pipe.release(slot)

        def load(j: int, s: int, e: int):
            if small:
                hold(j)
            if j in held:
                return self.widen(job.sources[j], held[j][s:e], copy=True)
            return self.widen_on_device(job.sources[j], flats[j][s:e])

        load.hold = hold
        return load

    def widen_on_device(self, i: int, flat):
        """Input ``i``'s host elements ``flat`` as a new fp32 device tensor (through the staging buffers)."""
        dev, slot = self.pipe.upload(flat)
        x = self.widen(i, dev, copy=True)
        self.pipe.release(slot)
        return x

    def emit_device(self, job: KeyJob, values) -> None:
        """Queue the fp32 device values of ``job`` for their cast, range check and download; their bytes reach the
        sink one key later (:meth:`_emit_device_key`), so the device never waits for the host in between."""
        values = values if values.dtype == self.torch.float32 else values.to(self.torch.float32)
        self.pipe.finish(job, values, self.limit(job.out_dtype), self.nonfinite == "clamp", self._emit_device_key, self.sink)

    def _emit_device_key(self, job: KeyJob, host, counts, sink) -> None:
        """A device key's bytes are back on the host (``counts``: its NaN, Inf and too-large values): decide as the
        CPU's :meth:`guard` does, then pass the bytes to ``sink`` (the one current when the key was computed)."""
        nan, inf, beyond = counts
        if nan or inf or beyond:
            if self.nonfinite == "error":
                views = {i: self.handles[i].get_tensor(job.source_name(i))
                         for i in ([job.copy_from] if job.copy_from is not None else job.sources)}
                raise NonFiniteError(self._nonfinite_message(job, host, 0, views, self.limit(job.out_dtype), nan, inf, beyond))
            with self._lock:
                flagged = self.flagged.setdefault(job.name, [0, 0, 0])
                self._flagged_dtype[job.name] = job.out_dtype
                flagged[0] += nan
                flagged[1] += inf
                flagged[2] += beyond
        current, self.sink = self.sink, sink
        try:
            sink.begin_key(job)

            def produce(s, e, dst):
                dst.copy_(host[s:e])

            self._emit_chunks(job, produce)
            sink.end_key(job)
        finally:
            self.sink = current




def _chunked(device) -> bool:
    """True where keys are computed in cache-sized chunks (the CPU); elsewhere whole keys go through staging
    buffers to the device (the tests force that path on the CPU to compare the two)."""
    return device.type == "cpu"


def check_unchanged(headers, when: str) -> None:
    """Refuse to go on (or to keep the output) when an input changed since its header was read: a truncated file
    would fault the memory map, and a file rewritten in place would mix old and new tensors."""
    for h in headers:
        why = h.changed()
        if why is not None:
            raise BadFileError(
                f"{os.path.basename(h.path)} changed while it was being merged ({when}): {why}. No output was written; "
                "run the merge again once the file is complete"
            )


def _scalar(t) -> float:
    """The one value of a scale tensor (fp32, or any float dtype)."""
    return float(t.reshape(-1)[0].float())


def _read_ranges(prep: PreparedMerge) -> List[List[Tuple[int, int, int]]]:
    """Per job, the byte ranges it reads: (input index, file offset, length)."""
    out = []
    for job in prep.jobs:
        srcs = [job.copy_from] if job.copy_from is not None else job.sources
        out.append([
            (i, prep.headers[i].data_start + prep.headers[i].tensors[job.source_name(i)].begin,
             prep.headers[i].tensors[job.source_name(i)].nbytes)
            for i in srcs
        ])
    return out


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
    input_hashes: bool = True,
    cache=None,
) -> MergeResult:
    """Merge to a safetensors file (temporary file, fsync, rename). Nothing is left behind on failure.

    ``input_hashes`` records each input's SHA-256 and AutoV2 in the recipe: from the hash cache (``cache``, default
    the user's) where it knows them, else computed in this run alongside the merge and stored in the cache. With
    False, inputs the cache does not know are recorded without a hash."""
    output = os.path.abspath(os.fspath(output))
    prep = prepared or prepare(plan)
    plan_fp8_output(prep)
    resolve_device(plan.device)
    identities = InputHashes(plan, prep.headers, enabled=input_hashes, cache=cache)
    metadata = build_metadata(prep, output, identities)
    metadata[HASH_METADATA_KEY] = HASH_PLACEHOLDER
    if extra_metadata:
        metadata.update(extra_metadata)
    writer = StreamingWriter(output, prep.out_tensors, metadata, overwrite=overwrite, opener=opener)
    writer.check_target()
    t0 = time.monotonic()
    chunk_bytes = CHUNK_ELEMENTS * 4  # the ring's buffers; a key of wider elements goes in chunks of fewer elements
    with ExitStack() as stack:
        handles = open_inputs(stack, prep.headers)
        with writer:
            sink = FileSink(writer, chunk_bytes)
            identities.start()
            try:
                runner = _Runner(prep, sink, progress, cancel)
                runner.run(handles)
            except BaseException:
                identities.abort()
                sink.abort()
                raise
            try:
                sink.finish()
                writer.fill(identities.finish(prep.headers))
            except BaseException:
                identities.abort()
                raise
            check_unchanged(prep.headers, "at the end")  # before the rename: a rewritten input gives no output
    metadata[HASH_METADATA_KEY] = "0x" + writer.sha256
    return MergeResult(
        output, len(prep.jobs), writer.total_bytes, time.monotonic() - t0, writer.sha256, prep.architecture,
        _filled(metadata, identities), list(prep.notes) + identities.notes + runner.nonfinite_notes(), prep.structure,
        list(writer.swept), [dataclasses.asdict(x) for x in identities.inputs],
    )


def _filled(metadata: Dict[str, str], identities) -> Dict[str, str]:
    """The metadata as written: placeholders replaced by the hashes computed in the run."""
    out = dict(metadata)
    for old, new in identities.fills.items():
        out = {k: v.replace(old, new) for k, v in out.items()}
    return out


def merge_to_state_dict(
    plan: MergePlan,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    prepared: Optional[PreparedMerge] = None,
) -> Tuple[Dict[str, object], MergeResult]:
    """Merge into a dict of CPU tensors (for loading straight into ComfyUI). Peak memory: one merged model."""
    prep = prepared or prepare(plan)
    plan_fp8_output(prep)
    t0 = time.monotonic()
    sink = DictSink()
    with ExitStack() as stack:
        handles = open_inputs(stack, prep.headers)
        try:
            runner = _Runner(prep, sink, progress, cancel)
            runner.run(handles)
            check_unchanged(prep.headers, "at the end")
        except BaseException:
            sink.abort()
            raise
    result = MergeResult(None, len(prep.jobs), prep.output_bytes, time.monotonic() - t0, None, prep.architecture, {},
                         list(prep.notes) + runner.nonfinite_notes(), prep.structure)
    return sink.out, result

"""The streaming merge loop and its public entry points :func:`merge_to_file` and :func:`merge_to_state_dict`.

Keys are processed one at a time in sorted order (the output's layout), from memory-mapped views of the inputs
(:mod:`merger_core.io.reader`). On the CPU a linear method (weighted sum, add difference) is computed in
cache-sized chunks: each input chunk is widened to fp32 into a small scratch buffer and added into an fp32
accumulator chunk, which is then narrowed to the output dtype straight into the sink's buffer. Memory therefore
stays at a few megabytes of chunks plus the writer's ring, whatever the number or size of the models. On a GPU the
accumulator is one fp32 tensor of the largest key, fed through pinned staging buffers.

Both entry points take a :class:`~merger_core.merge.plan.MergePlan` and report through plain callbacks
(``progress(ProgressInfo)`` and ``cancel() -> bool``).
"""

from __future__ import annotations

import os
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .. import methods as _methods
from ..errors import BadFileError, ManifestError, MergeCancelled
from ..io.reader import Prefetcher, Unmapper, open_inputs
from ..io.safetensors import DTYPE_SIZES, torch_dtype
from ..io.writer import HASH_METADATA_KEY, HASH_PLACEHOLDER, StreamingWriter
from .device import resolve_device
from .metadata import build_metadata
from .plan import KeyJob, MergePlan, PreparedMerge, prepare
from .sinks import DictSink, FileSink

CHUNK_ELEMENTS = 1 << 20  # fp32 accumulator chunk on the CPU: 4 MiB


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
        self.unmapper = Unmapper([h.path for h in prep.headers])
        total = len(prep.jobs)
        bytes_total = prep.output_bytes
        done_bytes = 0
        t0 = time.monotonic()
        prefetch = Prefetcher([h.path for h in prep.headers], _read_ranges(prep))
        threads = self.torch.get_num_threads()
        if self.on_cpu:
            # Chunks are small (4 MiB): intra-op threads only add barriers, and with a busy second core (the
            # writer's hashing, another process) a 2-thread OpenMP region stalls. One thread is 2-9x faster here.
            self.torch.set_num_threads(1)
        try:
            for idx, job in enumerate(prep.jobs):
                if self.cancel is not None and self.cancel():
                    raise MergeCancelled()
                check_unchanged(prep.headers, f"before {job.name}")
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


def _read_ranges(prep: PreparedMerge) -> List[List[Tuple[int, int, int]]]:
    """Per job, the byte ranges it reads: (input index, file offset, length)."""
    out = []
    for job in prep.jobs:
        srcs = [job.copy_from] if job.copy_from is not None else job.sources
        out.append([
            (i, prep.headers[i].data_start + prep.headers[i].tensors[job.name].begin, prep.headers[i].tensors[job.name].nbytes)
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
) -> MergeResult:
    """Merge to a safetensors file (temporary file, fsync, rename). Nothing is left behind on failure."""
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
        handles = open_inputs(stack, prep.headers)
        with writer:
            sink = FileSink(writer, chunk_bytes)
            try:
                _Runner(prep, sink, progress, cancel).run(handles)
            except BaseException:
                sink.abort()
                raise
            sink.finish()
            check_unchanged(prep.headers, "at the end")  # before the rename: a rewritten input gives no output
    metadata[HASH_METADATA_KEY] = "0x" + writer.sha256
    return MergeResult(
        output, len(prep.jobs), writer.total_bytes, time.monotonic() - t0, writer.sha256, prep.architecture, metadata, prep.notes,
        prep.structure, list(writer.swept),
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
    sink = DictSink()
    with ExitStack() as stack:
        handles = open_inputs(stack, prep.headers)
        try:
            _Runner(prep, sink, progress, cancel).run(handles)
            check_unchanged(prep.headers, "at the end")
        except BaseException:
            sink.abort()
            raise
    result = MergeResult(None, len(prep.jobs), prep.output_bytes, time.monotonic() - t0, None, prep.architecture, {}, prep.notes, prep.structure)
    return sink.out, result

"""A merge written as a LoRA instead of a checkpoint: ``cross-merge --to-lora`` (issue 14).

:class:`LoraSink` is a sink of the merge runner (like :class:`~merger_core.merge.sinks.FileSink`): the runner fills
it with each key's merged values in fp32; at the end of the key the sink reads input 0's tensor of that key (the
base of a cross-merge), and hands ``merged - input 0`` in fp32 to a :class:`~merger_core.lora.extract.LoraExtractor`,
which factorises it (truncated SVD) and spills the factors. :func:`merge_to_lora` runs a plan that way and writes the
LoRA file. Memory: one key's merged values, input 0's tensor of that key and the SVD.

Only keys the LoRA format can hold are merged at all (the runner never sees the others): linear and conv weights of
the diffusion model and the text encoders' attention and MLP weights; 3x3 convs only with a conv rank (or an
energy); keys taken unmerged from input 0 (a VAE or text encoder from the base) have no difference and are left
out before any weight is read. A key input 0 lacks (taken from another model) has no difference to express and is
left out with a note.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

from ..errors import MergeCancelled
from ..io.reader import open_inputs
from ..io.safetensors import FLOAT_DTYPES, MARKER_KEYS, torch_dtype
from ..lora.extract import ExtractResult, LoraExtractor, check_settings
from .plan import KeyJob, MergePlan, PreparedMerge, prepare
from .runner import CHUNK_ELEMENTS, _Runner, _scalar, check_unchanged


@dataclass
class LoraMergeResult:
    """What :func:`merge_to_lora` did: the extraction result (modules and their retained energy) and the merge's."""

    extract: ExtractResult
    keys_merged: int  # keys the runner merged (the ones a LoRA can hold)
    keys_total: int  # keys of the merge plan
    seconds: float
    notes: List[str] = field(default_factory=list)

    @property
    def output(self) -> Optional[str]:
        return self.extract.output

    def summary_lines(self, n: int = 10) -> List[str]:
        return self.extract.summary_lines(n)


class LoraSink:
    """Receives merged values key by key and gives ``merged - input 0`` of each key to a LoRA extractor.

    ``handle0`` is input 0's open safetensors file (``safe_open``); ``wanted`` the output key names to extract (any
    other key the runner sends is computed into a scratch buffer and dropped). ``svd_threads``: torch's intra-op
    threads during the SVD (the CPU runner sets 1 for its own slices; the SVD is one big op and wants them all).
    """

    def __init__(self, extractor: LoraExtractor, handle0, wanted, svd_threads: Optional[int] = None):
        import torch

        self.torch = torch
        self.extractor = extractor
        self.handle0 = handle0
        self.wanted = set(wanted)
        self.svd_threads = svd_threads
        self.chunk_bytes = CHUNK_ELEMENTS * 4  # the runner sizes its chunks to this
        self._scratch = torch.empty(self.chunk_bytes, dtype=torch.uint8)
        self._cur = None
        self._pos = 0

    def begin_key(self, job: KeyJob) -> None:
        self._pos = 0
        self._cur = None
        if job.name in self.wanted:
            self._cur = self.torch.empty(job.numel, dtype=torch_dtype(job.out_dtype))

    def chunk(self, nbytes: int, dtype):
        if self._cur is None:
            return self._scratch[:nbytes].view(dtype)
        item = self._cur.element_size()
        return self._cur[self._pos: self._pos + nbytes // item]

    def commit(self, nbytes: int) -> None:
        if self._cur is not None:
            self._pos += nbytes // self._cur.element_size()

    def end_key(self, job: KeyJob) -> None:
        if self._cur is None:
            return
        torch = self.torch
        merged = self._cur if self._cur.dtype == torch.float32 else self._cur.to(torch.float32)
        self._cur = None
        base = self.handle0.get_tensor(job.source_name(0)).reshape(-1)
        base = base.to(torch.float32)
        scale_key = job.scales.get(0)
        if scale_key is not None:  # scaled fp8 input 0: its values are codes * scale
            base = base * _scalar(self.handle0.get_tensor(scale_key))
        delta = merged.sub_(base).reshape(job.shape)
        del base
        threads = torch.get_num_threads()
        if self.svd_threads and self.svd_threads != threads:
            torch.set_num_threads(self.svd_threads)
        try:
            self.extractor.add_key(job.name, delta)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        self._cur = None
        self.extractor.close()


def _is_conv3(shape) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def lora_jobs(prep: PreparedMerge, extractor: LoraExtractor):
    """(jobs to merge, notes): the plan's keys a LoRA holds a difference for, in the plan's order."""
    jobs, notes, not_in_base = [], [], []
    for job in prep.jobs:
        if job.out_dtype not in FLOAT_DTYPES or job.name in MARKER_KEYS:
            continue
        if not extractor.wants(job.name, job.shape):
            if job.name in extractor.modules and _is_conv3(job.shape):
                extractor.result.skipped_conv += 1
            continue
        if job.copy_from == 0:
            extractor.result.skipped_equal += 1  # taken unmerged from input 0: no difference
            continue
        if 0 not in job.sources:  # input 0 lacks it (taken from another model): no difference to take
            not_in_base.append(job.name)
            continue
        jobs.append(job)
    if not_in_base:
        shown = ", ".join(not_in_base[:5]) + (f" and {len(not_in_base) - 5} more" if len(not_in_base) > 5 else "")
        notes.append(f"{len(not_in_base)} key(s) are not in {prep.plan.inputs[0].display_name()}, so they have no "
                     f"difference a LoRA could hold; left out: {shown}")
    return jobs, notes


def merge_to_lora(
    plan: MergePlan,
    out_path: str | os.PathLike,
    rank: int,
    conv_rank: Optional[int] = None,
    energy: Optional[float] = None,
    *,
    dtype: str = "fp16",
    overwrite: bool = False,
    progress: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
    metadata: Optional[Mapping[str, str]] = None,
    min_diff: float = 0.0,
) -> LoraMergeResult:
    """Run ``plan`` and write ``merged - input 0`` (for a cross-merge: the combined, scaled delta over the base) as a
    kohya-format LoRA at ``out_path``, key by key, with the extractor's settings (``rank``, ``conv_rank``,
    ``energy``, ``dtype`` of the factors). The merge itself runs in fp32 (``plan.dtype`` is ignored) so no merged
    value is rounded before the SVD. The LoRA's ``ss_sd_model_name`` is input 0's file name. Nothing is left
    behind on failure or cancel."""
    check_settings(rank, conv_rank, energy, dtype)
    t0 = time.monotonic()
    plan = dataclasses.replace(plan, dtype="fp32")
    prep = prepare(plan)
    keys = [j.name for j in prep.jobs]
    md = {"ss_sd_model_name": plan.inputs[0].display_name()}
    md.update(metadata or {})
    extractor = LoraExtractor(out_path, keys, rank, conv_rank, energy, dtype, overwrite, metadata=md,
                              min_diff=min_diff)
    import torch

    try:
        jobs, notes = lora_jobs(prep, extractor)
        sub = dataclasses.replace(prep, jobs=jobs)
        with ExitStack() as stack:
            handles = open_inputs(stack, prep.headers)
            sink = LoraSink(extractor, handles[0], [j.name for j in jobs], svd_threads=torch.get_num_threads())
            try:
                runner = _Runner(sub, sink, progress, cancel)
                runner.run(handles)
                if cancel is not None and cancel():
                    raise MergeCancelled("merge cancelled; no LoRA was written")
                check_unchanged(prep.headers, "at the end")
            except BaseException:
                sink.abort()
                raise
        res = extractor.finish()
    finally:
        extractor.close()
    notes = list(prep.notes) + notes + runner.nonfinite_notes()
    return LoraMergeResult(res, len(jobs), len(prep.jobs), time.monotonic() - t0, notes)

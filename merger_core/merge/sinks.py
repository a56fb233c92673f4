"""Sinks: where merged bytes go. The runner asks a sink for a chunk buffer of the output dtype, fills it and
commits it; a sink never sees inputs.

* :class:`FileSink` feeds a :class:`~merger_core.io.writer.StreamingWriter` through a ring of reusable buffers.
* :class:`DictSink` builds a state dict of CPU tensors (graph mode in ComfyUI).
"""

from __future__ import annotations

import queue
import threading
from typing import Dict, Optional, Tuple

from ..io.safetensors import torch_dtype
from ..io.writer import StreamingWriter
from .plan import KeyJob

WRITE_RING = 8  # chunk buffers queued for the writer thread
OUTSTANDING = 4  # chunks the runner may hold at once (filled by its workers, committed in the order asked for)


class FileSink:
    """Feeds a StreamingWriter through a ring of reusable chunk buffers and two threads in a pipeline:
    the merging thread fills a chunk, a hashing thread adds it to the tensor-data SHA-256, a writing thread writes it
    and gives the buffer back. Order is kept by the queues; hashing and writing overlap each other and the merge.
    """

    max_outstanding = OUTSTANDING

    def __init__(self, writer: StreamingWriter, chunk_bytes: int):
        import collections
        import torch

        self.writer = writer
        self.chunk_bytes = chunk_bytes  # the most bytes one chunk may hold: the runner sizes its chunks to it
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
        self._slots = collections.deque()  # buffers handed out and not yet committed, oldest first

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
        """A 1-D buffer of ``dtype`` with room for ``nbytes`` (at most :attr:`chunk_bytes`) to fill, then :meth:`commit`.
        Up to :attr:`max_outstanding` chunks may be held at once; each :meth:`commit` hands on the oldest."""
        if self.error is not None:
            raise self.error
        if nbytes > self.chunk_bytes:
            raise ValueError(f"a chunk of {nbytes} bytes does not fit the writer's {self.chunk_bytes}-byte buffers")
        slot = self.free.get()
        self._slots.append(slot)
        return self.buffers[slot][:nbytes].view(dtype)

    def commit(self, nbytes: int):
        self.todo.put((self._slots.popleft(), nbytes))

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


class DictSink:
    """Builds a state dict of CPU tensors (graph mode)."""

    chunk_bytes = None  # any chunk size: each key is one tensor
    max_outstanding = OUTSTANDING

    def __init__(self):
        self.out: Dict[str, object] = {}
        self._cur = None
        self._pos = 0  # elements committed
        self._given = 0  # elements handed out (committed or not)

    def begin_key(self, job: KeyJob):
        import torch

        self._cur = torch.empty(job.numel, dtype=torch_dtype(job.out_dtype))
        self.out[job.name] = self._cur
        self._pos = 0
        self._given = 0
        self._job = job

    def chunk(self, nbytes: int, dtype):
        item = self._cur.element_size()
        start = self._given
        self._given += nbytes // item
        return self._cur[start : self._given]

    def commit(self, nbytes: int):
        self._pos += nbytes // self._cur.element_size()

    def end_key(self, job: KeyJob):
        self.out[job.name] = self._cur.reshape(job.shape)

    def finish(self):
        pass

    def abort(self):
        self.out.clear()



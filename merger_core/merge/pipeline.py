"""The device pipeline: whole keys merged on a GPU (CUDA or MPS) with the transfers overlapped.

What runs where, for key ``i`` (one merge worker on the host, two streams on a CUDA device):

* host: copies key ``i``'s inputs, one at a time, out of the memory-mapped files into one of two pinned staging
  buffers (this is where the files are read), then passes the bytes of key ``i - 1``, already back in a pinned
  host buffer, to the sink (hashing and writing threads);
* copy stream: the host-to-device copy of each staged input, and the device-to-host copy of each finished key;
* compute stream: the method's arithmetic, the output dtype's cast and the range check.

Two staging buffers, two device input buffers and two output buffer pairs (device and pinned host) take turns.
Events order them: a staging buffer is refilled only once the copy that read it is done
(``staged[slot].synchronize()``), a device input buffer is overwritten only once the compute that read it is done
(the copy stream waits on ``consumed[slot]``), an output buffer only once its device-to-host copy is done. So the
read of key ``i + 1``, the upload of ``i``, the compute of ``i`` and the download of ``i - 1`` overlap, and the host
waits for the device only when it needs a buffer back or the bytes of a finished key.

On MPS there is one queue and no events to wait on from the host: the pipeline calls ``torch.mps.synchronize()``
before any staging buffer is reused (a ``non_blocking`` copy out of a buffer that is then overwritten is a known
silent-corruption pattern). On the CPU (the tests force this path there) every copy is synchronous and the
pipeline's order of operations is checked against the chunked path byte for byte.

The range check of a key runs on the device (NaN, Inf and too-large counts in one small tensor that travels back
with the key's bytes), so the host never waits for a key's values to decide: the decision is taken when the key's
bytes are back, one key later. With ``nonfinite = "clamp"`` the clamp is applied on the device to every key (it
changes nothing in a key whose values fit).

Device memory: the fp32 accumulator of the largest key, two device input buffers and two output buffers of the
largest key's bytes; flat in the number of models for the linear methods (the inputs stream through the two input
buffers). The built-in tensor methods (``streams_on_device``) load slices of a key's inputs through the same
buffers (``Runner.device_loader``) and write into the accumulator: they add about one fp32 key of their own, flat
in N as well. A method without ``streams_on_device`` receives all of a key's inputs as fp32 device tensors.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

from ..io.safetensors import DTYPES, torch_dtype


class DevicePipeline:
    def __init__(self, torch, device, in_bytes: int, out_bytes: int):
        """``in_bytes``: the largest input tensor of a merged key in its file dtype (at least its fp32 size when a
        method widens on the host); ``out_bytes``: the largest output of a merged key."""
        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.mps = device.type == "mps"
        pin = self.cuda
        # MPS has no fp8 and no float64 dtypes, and no bfloat16 before macOS 14: there such inputs are widened on the
        # host before they go over (exactly, but float64, rounded to fp32 as the merge itself does first; the
        # staging buffers have room for the widest), and such outputs come back in fp32 and are cast on the host
        self.host_widen = host_widening(torch, has_bf16=_has_bf16(torch, device)) if self.mps else {}
        in_bytes = max(16, int(in_bytes)) * staging_factor(self.host_widen)
        out_bytes = max(16, int(out_bytes))
        self.staging = [torch.empty(in_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.dev_in = [torch.empty(in_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.dev_out = [torch.empty(out_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.host_out = [torch.empty(out_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.dev_counts = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(2)]
        self.host_counts = [torch.zeros(3, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.in_slot = 0
        self.out_slot = 0
        self.pending: Deque[Tuple] = deque()
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            ev = lambda: torch.cuda.Event()  # noqa: E731
            self.staged = [ev() for _ in range(2)]  # the upload out of staging[slot] is done
            self.uploaded = [ev() for _ in range(2)]  # dev_in[slot] holds the new input
            self.consumed = [ev() for _ in range(2)]  # the compute that read dev_in[slot] is done
            self.out_ready = [ev() for _ in range(2)]  # dev_out[slot] holds a finished key
            self.downloaded = [ev() for _ in range(2)]  # host_out[slot] holds it
            self._used_in = [False, False]
            self._used_out = [False, False]
        else:
            self.compute = self.copy = None

    # -- inputs ------------------------------------------------------------------------------------------------
    def upload(self, flat):
        """A device copy of the 1-D host tensor ``flat`` (file dtype), valid until :meth:`release` of its slot.
        Returns (device tensor, slot)."""
        torch = self.torch
        slot = self.in_slot
        self.in_slot ^= 1
        wider = self.host_widen.get(flat.dtype)
        if wider is not None:
            flat = flat.to(wider)
        nbytes = flat.numel() * flat.element_size()
        if self.cuda and self._used_in[slot]:
            self.staged[slot].synchronize()  # the last upload out of this staging buffer is done
        elif self.mps:
            torch.mps.synchronize()  # MPS: no event to wait on; nothing may still read the staging buffer
        stage = self.staging[slot][:nbytes].view(flat.dtype)
        stage.copy_(flat)  # the read of the file (page faults of the map) happens here, on the host
        dev = self.dev_in[slot][:nbytes].view(flat.dtype)
        if self.cuda:
            with torch.cuda.stream(self.copy):
                if self._used_in[slot]:
                    self.copy.wait_event(self.consumed[slot])  # the compute that read dev_in[slot] is done
                dev.copy_(stage, non_blocking=True)
                self.staged[slot].record(self.copy)
                self.uploaded[slot].record(self.copy)
            self.compute.wait_event(self.uploaded[slot])
            self._used_in[slot] = True
        elif self.mps:
            dev.copy_(stage, non_blocking=False)
        else:
            dev.copy_(stage)
        return dev, slot

    def release(self, slot: int) -> None:
        """The compute reading the device input of ``slot`` has been queued: the slot may be refilled after it."""
        if self.cuda:
            self.consumed[slot].record(self.compute)

    # -- outputs -----------------------------------------------------------------------------------------------
    def finish(self, job, values, limit: float, clamp: bool, emit: Callable, sink) -> None:
        """Queue the cast of the fp32 device tensor ``values`` to the output dtype, its range check and its
        download; the bytes of the key queued before this one are passed to ``emit(job, host_tensor, counts,
        sink)`` now, this key's at the next :meth:`finish` or :meth:`flush`."""
        torch = self.torch
        slot = self.out_slot
        self.out_slot ^= 1
        out_dt = torch_dtype(job.out_dtype)
        n = job.numel
        nbytes = job.out_nbytes
        if self.cuda and self._used_out[slot]:
            self.compute.wait_event(self.downloaded[slot])  # the last download out of dev_out[slot] is done
        counts = self.dev_counts[slot]
        if values.numel():
            nan = torch.isnan(values)
            inf = torch.isinf(values)
            counts[0] = nan.sum()
            counts[1] = inf.sum()
            counts[2] = (values.abs() > limit).sum() - counts[1]
            if clamp:
                values = torch.nan_to_num(values, nan=0.0, posinf=limit, neginf=-limit).clamp_(-limit, limit)
        else:
            counts.zero_()
        cast_on_host = out_dt in self.host_widen
        if cast_on_host:  # a dtype the device lacks: fp32 comes back (the buffers hold it), cast on the host
            out_dt, nbytes = torch.float32, n * 4
        dev = self.dev_out[slot][:nbytes].view(out_dt)
        dev.copy_(values.reshape(-1)[:n])
        # host_out[slot] is free: at most one key waits in `pending` (the one before this, in the other slot); the
        # key before last, which used this slot, was handed on at the end of the previous call
        host = self.host_out[slot][:nbytes].view(out_dt)
        hcounts = self.host_counts[slot]
        if self.cuda:
            self.out_ready[slot].record(self.compute)
            with torch.cuda.stream(self.copy):
                self.copy.wait_event(self.out_ready[slot])
                host.copy_(dev, non_blocking=True)
                hcounts.copy_(counts, non_blocking=True)
                self.downloaded[slot].record(self.copy)
            self._used_out[slot] = True
        else:
            host.copy_(dev)
            hcounts.copy_(counts)
        self.pending.append((job, slot, host, hcounts, sink, cast_on_host))
        while len(self.pending) > 1:
            self._emit_oldest(emit)

    def _emit_oldest(self, emit: Callable) -> None:
        job, slot, host, hcounts, sink, cast_on_host = self.pending.popleft()
        if self.cuda:
            self.downloaded[slot].synchronize()
        elif self.mps:
            self.torch.mps.synchronize()
        if cast_on_host:
            host = host.to(torch_dtype(job.out_dtype))
        emit(job, host, [int(x) for x in hcounts.tolist()], sink)

    def flush(self, emit: Callable) -> None:
        """Pass every queued key to ``emit`` (before a key that does not go through the device, and at the end)."""
        while self.pending:
            self._emit_oldest(emit)

    def drain(self) -> None:
        """Wait for the device without emitting anything (a failed or cancelled merge)."""
        self.pending.clear()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        elif self.mps:
            self.torch.mps.synchronize()


def host_widening(torch, has_bf16: bool = True) -> dict:
    """{dtype a device lacks: what the host widens it to first} for MPS, from the dtype table: fp8 e4m3 and e5m2 to
    fp16 and e8m0 (powers of two up to 2^127) to fp32, exactly, bf16 (without ``has_bf16``) to fp32, exactly; float64
    to fp32, as the merge rounds it anyway."""
    out = {}
    for d in DTYPES.values():
        dt = getattr(torch, d.torch_name, None)
        if dt is None or not d.is_float:
            continue
        if d.size == 1:
            out[dt] = torch.float16 if torch.finfo(dt).max <= torch.finfo(torch.float16).max else torch.float32
        elif d.size == 8 or (dt == torch.bfloat16 and not has_bf16):
            out[dt] = torch.float32
    return out


def staging_factor(widen: dict) -> int:
    """How many times its file bytes an input takes in the staging buffers once widened (``host_widening``)."""
    return max([wider.itemsize // dt.itemsize for dt, wider in widen.items()] + [1])


def _has_bf16(torch, device) -> bool:
    """Whether ``device`` computes in bfloat16 (MPS does from macOS 14 on)."""
    try:
        (torch.ones(2, dtype=torch.bfloat16, device=device) * 2).float().cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def device_bytes(prep) -> Tuple[int, int, int]:
    """(largest input of a merged key in bytes at the width the pipeline uploads it, largest merged output in
    bytes, largest merged key's element count). Copied keys stay on the host."""
    from ..io.safetensors import DTYPE_SIZES

    most_in = most_out = most_n = 0
    for job in prep.jobs:
        if job.copy_from is not None:
            continue
        for i in job.sources:
            item = DTYPE_SIZES[prep.headers[i].tensors[job.source_name(i)].dtype]
            most_in = max(most_in, job.numel * item)
        most_out = max(most_out, job.numel * max(4, DTYPE_SIZES[job.out_dtype]))
        most_n = max(most_n, job.numel)
    return most_in, most_out, most_n

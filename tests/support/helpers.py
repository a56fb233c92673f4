"""Plain helper functions for the tests: real safetensors files with SD1.5 key names, hashes, hand-made headers.

Import with ``import helpers`` from any test module in ``tests/`` (pytest puts this folder on ``sys.path``), or
use the fixtures in ``conftest.py`` that wrap these.

Every file written here is a real safetensors file (written by the safetensors library, or byte by byte for
the deliberately broken ones), small enough for CI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from merger_core.merge.demo import INT_DTYPES, Layout, make_tensors, sd15_full_layout, sd15_small_layout, write_checkpoint
from oracle import check_against_reference, reference_merge, ulp
from merger_core.merge.plan import MergeInput, MergePlan
from merger_core.io.safetensors import DTYPE_SIZES

UNET = "model.diffusion_model."
# A few well-known keys, handy for dropping or reshaping one.
KEY_CONV_IN = UNET + "input_blocks.0.0.weight"
KEY_OUT = UNET + "out.2.weight"
KEY_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
KEY_VAE_CONV_IN = "first_stage_model.encoder.conv_in.weight"


def small_layout(
    dtype: str = "F16",
    markers: bool = False,
    drop: Iterable[str] = (),
    reshape: Optional[Mapping[str, Tuple[int, ...]]] = None,
    extra: Optional[Mapping[str, Tuple[str, Tuple[int, ...]]]] = None,
) -> Layout:
    """The small SD1.5 layout (1131 keys, about 2.4 MB in fp16), edited: keys dropped, reshaped, added."""
    layout = sd15_small_layout(dtype, markers=markers)
    for k in drop:
        del layout[k]
    for k, shape in (reshape or {}).items():
        layout[k] = (layout[k][0], tuple(shape))
    layout.update(extra or {})
    return layout


def write_model(
    path: str | os.PathLike,
    seed: int = 0,
    dtype: str = "F16",
    markers: bool = False,
    drop: Iterable[str] = (),
    reshape: Optional[Mapping[str, Tuple[int, ...]]] = None,
    extra: Optional[Mapping[str, Tuple[str, Tuple[int, ...]]]] = None,
    offset: float = 0.0,
    scale: float = 1.0,
    metadata: Optional[Mapping[str, str]] = None,
    layout: Optional[Layout] = None,
) -> str:
    """Write one small SD1.5-keyed checkpoint; values are deterministic in ``seed``. Returns the path."""
    if layout is None:
        layout = small_layout(dtype, markers=markers, drop=drop, reshape=reshape, extra=extra)
    return write_checkpoint(path, layout, seed=seed, offset=offset, scale=scale, metadata=metadata)


def write_models(
    folder: str | os.PathLike,
    n: int,
    dtypes: Optional[Sequence[str]] = None,
    prefix: str = "model",
    **kw,
) -> List[str]:
    """Write ``n`` models ``{prefix}-{i}.safetensors`` into ``folder`` with seeds 1..n and differing offsets."""
    os.makedirs(folder, exist_ok=True)
    dtype = kw.pop("dtype", "F16")
    paths = []
    for i in range(n):
        dt = dtypes[i] if dtypes else dtype
        paths.append(
            write_model(
                os.path.join(os.fspath(folder), f"{prefix}-{i}.safetensors"),
                seed=i + 1,
                dtype=dt,
                offset=0.25 * (i - n / 2),
                scale=1.0 + 0.5 * i,
                **kw,
            )
        )
    return paths


def plan_for(paths: Sequence[str], weights: Optional[Sequence[float]] = None, **kw) -> MergePlan:
    """A MergePlan over ``paths`` (equal weights unless given); keyword arguments go to MergePlan."""
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    return MergePlan(inputs=[MergeInput(p, w) for p, w in zip(paths, weights)], **kw)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hashes(paths: Iterable[str]) -> Dict[str, str]:
    """SHA-256 of each file (to show inputs are unchanged after a run)."""
    return {p: sha256_file(p) for p in paths}


def data_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a safetensors file's data section, computed here independently of the engine."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


def raw_header(path: str | os.PathLike) -> Tuple[dict, int]:
    """The JSON header of a safetensors file, parsed here without the engine, and its length."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def leftovers(folder: str | os.PathLike) -> List[str]:
    """Temporary files a writer may have left in ``folder`` (names ending in .partial or .tmp)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".partial") or n.endswith(".tmp"))


def write_raw(path: str | os.PathLike, header: Mapping, data: bytes = b"", header_len: Optional[int] = None,
              raw_json: Optional[bytes] = None) -> str:
    """Write a safetensors file byte by byte: 8-byte length, JSON header (or ``raw_json``), data.

    ``header_len`` overrides the length field (to make it lie); nothing is validated, so this writes broken files.
    """
    body = raw_json if raw_json is not None else json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    n = len(body) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + body + data)
    return os.fspath(path)


def tensor_entry(dtype: str, shape: Sequence[int], begin: int) -> dict:
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}


def write_sparse_checkpoint(path: str | os.PathLike, layout: Layout, metadata: Optional[Mapping[str, str]] = None) -> str:
    """A full-size checkpoint without the disk cost: real header, data section left as a sparse hole (zeros).

    ``write_sparse_checkpoint(p, sd15_full_layout())`` gives a 2.1 GB SD1.5-layout file that takes a few KB on disk.
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for k in sorted(layout):
        dt, shape = layout[k]
        header[k] = tensor_entry(dt, shape, pos)
        pos = header[k]["data_offsets"][1]
    write_raw(path, header)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.truncate(f.tell() + pos)
    return os.fspath(path)


class FailingFile:
    """A file object that raises ``OSError(err)`` once more than ``limit`` bytes were written (ENOSPC halfway).

    Use as ``merge_to_file(..., opener=FailingFile.opener(limit))``.
    """

    def __init__(self, path: str, limit: int, err: int):
        self._f = open(path, "xb")
        self.limit = limit
        self.err = err
        self.written = 0

    @classmethod
    def opener(cls, limit: int, err: Optional[int] = None):
        import errno

        code = errno.ENOSPC if err is None else err
        return lambda p: cls(p, limit, code)

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.written + n > self.limit:
            room = max(0, self.limit - self.written)
            self._f.write(memoryview(data).cast("B")[:room])
            self.written += room
            raise OSError(self.err, os.strerror(self.err))
        self.written += n
        return self._f.write(data)

    def seek(self, *a):
        return self._f.seek(*a)

    def flush(self):
        return self._f.flush()

    def fileno(self):
        return self._f.fileno()

    def close(self):
        return self._f.close()

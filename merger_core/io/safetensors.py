"""Reading safetensors headers with strict validation, and the facts about the format that everything else uses:
THE dtype table (item sizes, which dtypes are floats, their short labels, their torch types) and the marker keys.

The header reader never touches tensor data: analysis, preflight and scans read a few kilobytes per file, and a
corrupt file fails with a clear message before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, Tuple

from ..errors import BadFileError
from .files import open_regular
from ..data import load_json


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its item size, whether it holds floats, a short label, the torch attribute name."""

    name: str
    size: int
    is_float: bool
    label: str
    torch_name: str


# The one dtype table. Names follow the format's specification; torch names that an older torch lacks are
# reported when used (``torch_dtype``), never guessed.
DTYPES: Dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, False, "bool", "bool"),
        DType("U8", 1, False, "u8", "uint8"),
        DType("I8", 1, False, "i8", "int8"),
        DType("F8_E4M3", 1, True, "fp8_e4m3fn", "float8_e4m3fn"),
        DType("F8_E5M2", 1, True, "fp8_e5m2", "float8_e5m2"),
        DType("F8_E8M0", 1, True, "fp8_e8m0", "float8_e8m0fnu"),
        DType("I16", 2, False, "i16", "int16"),
        DType("U16", 2, False, "u16", "uint16"),
        DType("F16", 2, True, "fp16", "float16"),
        DType("BF16", 2, True, "bf16", "bfloat16"),
        DType("I32", 4, False, "i32", "int32"),
        DType("U32", 4, False, "u32", "uint32"),
        DType("F32", 4, True, "fp32", "float32"),
        DType("I64", 8, False, "i64", "int64"),
        DType("U64", 8, False, "u64", "uint64"),
        DType("F64", 8, True, "fp64", "float64"),
    )
}
DTYPE_SIZES: Dict[str, int] = {n: d.size for n, d in DTYPES.items()}
FLOAT_DTYPES = frozenset(n for n, d in DTYPES.items() if d.is_float)

# Marker keys: empty tensors whose presence sets the prediction type (v_pred, ztsnr, EDM). Copied exactly by every
# merge, never averaged. key -> what it marks. Data: ``data/markers.json``.
MARKER_KEYS: Dict[str, str] = load_json("markers.json")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
GGUF_MAGIC = b"GGUF"  # the first bytes of a GGUF file (llama.cpp's format, used for quantized diffusion models)


def dtype_label(st_dtype: str) -> str:
    """The short label of a safetensors dtype (``F16`` -> ``fp16``)."""
    d = DTYPES.get(st_dtype)
    return d.label if d is not None else st_dtype.lower()


def torch_dtype(st_dtype: str):
    """The torch dtype of a safetensors dtype; :class:`BadFileError` where this torch build has none."""
    import torch

    d = DTYPES.get(st_dtype)
    dt = getattr(torch, d.torch_name, None) if d is not None else None
    if dt is None:
        raise BadFileError(f"dtype {st_dtype} is not supported by this torch build")
    return dt


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a header: dtype, shape and its byte range inside the data section."""

    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file."""

    path: str
    file_size: int
    header_len: int
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str] = field(default_factory=dict)
    identity: Tuple[int, int, int] = (0, 0, 0)  # (device, inode, mtime_ns) when the header was read

    def changed(self) -> str | None:
        """Why the file is no longer the one whose header this is (size, modification time or inode changed, or it is
        gone), or ``None``. A cheap ``stat``: the merge asks before every key and before keeping its output."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return f"it can no longer be read ({exc.strerror or exc})"
        if st.st_size != self.file_size:
            return f"its size changed from {self.file_size:,} to {st.st_size:,} bytes"
        if (st.st_dev, st.st_ino, st.st_mtime_ns) != self.identity:
            return "it was rewritten (its modification time or inode changed)"
        return None

    @property
    def data_start(self) -> int:
        """Byte offset of the data section in the file."""
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of ``path``. Raises :class:`BadFileError` naming the problem."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            file_size = st.st_size
            prefix = f.read(8)
            if prefix.startswith(GGUF_MAGIC):
                raise BadFileError(
                    f"{name}: this is a GGUF file (a quantized model format of llama.cpp and ComfyUI-GGUF), not "
                    "safetensors; the merge reads safetensors only: convert it to safetensors first (e.g. dequantize "
                    "it with city96's ComfyUI-GGUF tools), or merge the unquantized model instead"
                )
            if len(prefix) < 8:
                raise BadFileError(f"{name}: file is {file_size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise BadFileError(
                    f"{name}: header length {header_len} is not plausible (limit {MAX_HEADER_BYTES}); "
                    "this is not a safetensors file or its first bytes are damaged"
                )
            if 8 + header_len > file_size:
                raise BadFileError(
                    f"{name}: header length {header_len} runs past the end of the file ({file_size} bytes); "
                    "the file is truncated or not a safetensors file"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise BadFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadFileError(f"{path}: is a folder, not a safetensors file") from None
    except PermissionError:
        raise BadFileError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as exc:
        raise BadFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except _DuplicateName as dup:
        raise BadFileError(
            f"{name}: the header names {dup.args[0]!r} twice; the format allows each name once, so the file is corrupt"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{name}: header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadFileError(f"{name}: header is not a JSON object")
    header = _parse_header(path, name, file_size, header_len, doc)
    header.identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return header


class _DuplicateName(Exception):
    pass


def _no_duplicate_names(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateName(k)
        out[k] = v
    return out


def _parse_header(path: str, name: str, file_size: int, header_len: int, doc: dict) -> SafetensorsHeader:
    metadata_raw = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise BadFileError(f"{name}: __metadata__ is not a JSON object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata_raw.items()}
    data_size = file_size - 8 - header_len
    tensors: Dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        if not isinstance(entry, dict):
            raise BadFileError(f"{name}: entry {key!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise BadFileError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise BadFileError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise BadFileError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin < 0 or end < begin or end > data_size:
            raise BadFileError(
                f"{name}: tensor {key!r} data_offsets [{begin}, {end}] lie outside the data section "
                f"({data_size} bytes); the file is truncated or corrupt"
            )
        info = TensorInfo(dtype, tuple(shape), begin, end)
        if info.numel * DTYPE_SIZES[dtype] != end - begin:
            raise BadFileError(
                f"{name}: tensor {key!r} shape {list(shape)} {dtype} needs {info.numel * DTYPE_SIZES[dtype]} bytes "
                f"but its offsets span {end - begin}"
            )
        tensors[key] = info
    ordered = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
    for (b0, e0, k0), (b1, e1, k1) in zip(ordered, ordered[1:]):
        if b1 < e0:
            raise BadFileError(f"{name}: tensors {k0!r} and {k1!r} overlap in the data section")
    return SafetensorsHeader(path, file_size, header_len, tensors, metadata)



"""Extracting a LoRA from a difference: per key, a truncated SVD of the fp32 delta, written as a kohya-format LoRA.

:class:`LoraExtractor` takes ``add_key(key, delta)`` for any difference (tuned - base, or a cross-merge's combined
delta) and ``finish()`` writes the file; :func:`extract_lora` feeds it tuned - base, streamed key by key. Memory is
about one key's delta and its SVD: the factors (small) go to a temporary spill file beside the output until the
header, which needs every name and shape, can be written; then the streaming writer copies them in name order
(temporary file, fsync, rename).

Per key: the delta is flattened to ``(out, in * kh * kw)`` (3x3 convs as kohya's ``extract_lora_from_models.py``;
1x1 convs as linear), ``torch.linalg.svd`` (full, deterministic) in fp32 on the CPU, and each singular pair's sign
fixed so that the largest-magnitude entry of the left vector is positive: same inputs, same bytes. ``up = U_r *
S_r`` and ``down = Vh_r`` (kohya's split), ``alpha = r`` (scale 1). The rank is ``rank`` for linear weights and
``conv_rank`` for 3x3 convs (without it they are left out), or, with ``energy``, the smallest rank keeping that
fraction of the sum of squared singular values (capped by those ranks). The retained energy per module is reported.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import BadFileError, IncompatibleModelsError, MergeCancelled, OutputError
from ..io.safetensors import FLOAT_DTYPES, read_header
from ..io.writer import OutTensor, StreamingWriter, check_output_target
from ..version import __version__
from .formats import LoraError
from .keymap import arch_of_checkpoint, kohya_modules

OUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
# kohya's ss_base_model_version and the ModelSpec architecture, per key map
BASE_VERSIONS = {"sd15": ("sd_v1", "stable-diffusion-v1"), "sd21": ("sd_v2", "stable-diffusion-v2-768-v"),
                 "sdxl_base": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
                 "sd3_medium": ("sd3", "stable-diffusion-3-medium"), "flux1_dev": ("flux1", "flux-1-dev")}
ARCH_NAMES = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl_base": "SDXL", "sd3_medium": "SD3", "flux1_dev": "Flux"}


@dataclass
class ExtractProgress:
    """What the progress callback gets (the same fields as the merge's ``ProgressInfo``)."""

    keys_done: int
    keys_total: int
    bytes_done: int
    bytes_total: int
    key: str
    elapsed: float


@dataclass
class ModuleEnergy:
    module: str
    key: str
    rank: int
    full_rank: int
    retained: float  # fraction of the delta's squared Frobenius norm the rank keeps (1.0 for a zero delta)
    norm: float  # Frobenius norm of the delta


@dataclass
class ExtractResult:
    output: Optional[str]
    modules: List[ModuleEnergy] = field(default_factory=list)
    skipped_equal: int = 0  # keys whose delta is zero (no module)
    skipped_conv: int = 0  # 3x3 convs left out (no conv rank)
    output_bytes: int = 0
    seconds: float = 0.0

    @property
    def retained(self) -> float:
        """Retained energy over all modules, weighted by each delta's squared norm."""
        tot = sum(m.norm ** 2 for m in self.modules)
        return 1.0 if tot == 0 else sum(m.retained * m.norm ** 2 for m in self.modules) / tot

    def worst(self, n: int = 10) -> List[ModuleEnergy]:
        return sorted(self.modules, key=lambda m: (m.retained, m.module))[:n]

    def summary_lines(self, n: int = 10) -> List[str]:
        lines = [f"{len(self.modules)} modules, retained energy {self.retained:.4f} overall"
                 + (f"; {self.skipped_equal} keys unchanged" if self.skipped_equal else "")
                 + (f"; {self.skipped_conv} 3x3 convs left out (no --conv-rank)" if self.skipped_conv else "")]
        if self.modules:
            lines.append(f"{'retained':>9}  {'rank':>9}  {'|delta|':>9}  module (worst {min(n, len(self.modules))})")
            for m in self.worst(n):
                lines.append(f"{m.retained:9.4f}  {m.rank:>4}/{m.full_rank:<4}  {m.norm:9.3g}  {m.module}")
        return lines


def choose_rank(s2, cap: int, energy: Optional[float]) -> int:
    """The rank: ``cap``, or the smallest rank <= cap that keeps ``energy`` of sum(s^2) (s2 = squared values)."""
    import torch

    cap = max(1, min(cap, s2.numel()))
    if energy is None:
        return cap
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2.double(), 0) / total
    r = int(torch.searchsorted(kept, torch.tensor([energy], dtype=torch.float64)).item()) + 1
    return max(1, min(cap, r))


def factorize(mat, cap: int, energy: Optional[float]):
    """(up, down, retained) of a 2-D fp32 matrix: truncated SVD with a fixed sign convention."""
    import torch

    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    s2 = S.double() ** 2
    r = choose_rank(s2, cap, energy)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(r)])
    sign[sign == 0] = 1.0
    U = U * sign
    Vh = Vh * sign[:, None]
    total = float(s2.sum())
    retained = 1.0 if total == 0.0 else float(s2[:r].sum()) / total
    return (U * S).contiguous(), Vh.contiguous(), retained


class LoraExtractor:
    """Build a kohya-format LoRA from per-key differences: ``add_key(key, delta)`` then ``finish()``.

    ``keys`` are the checkpoint's keys (saved layout), to pick the key map and the module names. Keys the LoRA format
    cannot name (norms, embeddings, the VAE) are ignored by :meth:`wants`.
    """

    def __init__(self, out_path: str, keys: Iterable[str], rank: int, conv_rank: Optional[int] = None,
                 energy: Optional[float] = None, dtype: str = "fp16", overwrite: bool = False,
                 metadata: Optional[Mapping[str, str]] = None, min_diff: float = 0.0, arch: Optional[str] = None):
        check_settings(rank, conv_rank, energy, dtype)
        keys = list(keys)
        self.arch = arch or arch_of_checkpoint(keys)
        if self.arch is None:
            raise IncompatibleModelsError("LoRAs can be extracted from SD1.x, SD2.x, SDXL, SD3 and Flux checkpoints in "
                                          "the saved layout; these files are none of those")
        self.out_path = os.path.abspath(os.fspath(out_path))
        self.rank, self.conv_rank, self.energy = int(rank), conv_rank, energy
        self.st_dtype = OUT_DTYPES[dtype]
        self.overwrite = overwrite
        self.min_diff = float(min_diff)
        self.extra_metadata = dict(metadata or {})
        self.modules = kohya_modules(self.arch, keys)
        check_output_target(self.out_path, 0, overwrite)
        self.result = ExtractResult(None)
        self._spill = tempfile.TemporaryFile(dir=os.path.dirname(self.out_path), prefix=".lora-extract-")
        self._index: Dict[str, Tuple[int, int, Tuple[int, ...]]] = {}  # tensor -> (offset, nbytes, shape)
        self._pos = 0

    def wants(self, key: str, shape) -> bool:
        """Whether ``add_key`` would use this key (a named linear or conv weight; 3x3 convs only with a conv rank)."""
        if key not in self.modules or len(shape) not in (2, 4):
            return False
        if len(shape) == 4 and tuple(shape[2:]) != (1, 1) and self.conv_rank is None and self.energy is None:
            return False
        return True

    def add_key(self, key: str, delta) -> List[ModuleEnergy]:
        """Factorise one key's fp32 difference (its checkpoint shape) into its module(s)."""
        import torch

        shape = tuple(delta.shape)
        if key not in self.modules or len(shape) not in (2, 4):
            return []
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        if conv3 and self.conv_rank is None and self.energy is None:
            self.result.skipped_conv += 1
            return []
        d = delta.detach().to(device="cpu", dtype=torch.float32)
        if float(d.abs().max()) <= self.min_diff:
            self.result.skipped_equal += 1
            return []
        out = []
        for name, rows in self.modules[key]:
            out.append(self.add_module(name, key, d if rows is None else d[rows[0]: rows[0] + rows[1]]))
        return out

    def add_module(self, name: str, key: str, part) -> ModuleEnergy:
        """Factorise one module's fp32 delta (2-D, or 4-D for a conv) under the kohya module ``name``."""
        import torch

        shape = tuple(part.shape)
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        part = part.detach().to(device="cpu", dtype=torch.float32)
        mat = part.reshape(part.shape[0], -1)
        cap = (self.conv_rank if self.conv_rank is not None else self.rank) if conv3 else self.rank
        up, down, retained = factorize(mat, min(cap, *mat.shape), self.energy)
        r = down.shape[0]
        if len(shape) == 4:
            up = up.reshape(up.shape[0], r, 1, 1)
            down = down.reshape(r, *shape[1:])
        self._put(f"{name}.lora_up.weight", up)
        self._put(f"{name}.lora_down.weight", down)
        self._put(f"{name}.alpha", torch.tensor(float(r)))
        m = ModuleEnergy(name, key, r, min(mat.shape), retained, float(torch.linalg.vector_norm(mat.double())))
        self.result.modules.append(m)
        return m

    def _put(self, name: str, t) -> None:
        from ..io.safetensors import torch_dtype
        from ..io.writer import tensor_bytes

        data = tensor_bytes(t.to(torch_dtype(self.st_dtype)))
        self._spill.write(data)
        self._index[name] = (self._pos, len(data), tuple(t.shape))
        self._pos += len(data)

    def metadata(self) -> Dict[str, str]:
        version, spec_arch = BASE_VERSIONS[self.arch]
        dims = [m.rank for m in self.result.modules]
        dim = max(dims) if dims else self.rank
        net_args = {}
        if self.conv_rank is not None:
            net_args = {"conv_dim": str(self.conv_rank), "conv_alpha": str(float(self.conv_rank))}
        if self.energy is not None:
            net_args["dynamic_method"] = "sv_fro"
            net_args["dynamic_param"] = str(self.energy)
        md = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(dim),
            "ss_network_alpha": str(float(dim)),  # alpha = rank per module: scale 1
            "ss_network_args": json.dumps(net_args),
            "ss_base_model_version": version,
            "ss_v2": str(self.arch == "sd21"),
            "ss_output_name": os.path.splitext(os.path.basename(self.out_path))[0],
            "ss_training_comment": f"extracted by model-merger {__version__} (truncated SVD of the difference)",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{spec_arch}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if self.arch in ("sd15", "sd21", "sdxl_base") else "https://github.com/comfyanonymous/ComfyUI",
            "modelspec.title": os.path.splitext(os.path.basename(self.out_path))[0],
            "model_merger.retained_energy": f"{self.result.retained:.6f}",
        }
        md.update(self.extra_metadata)
        return md

    def finish(self) -> ExtractResult:
        """Write the LoRA file (temporary file + rename) and return the result with the per-module energies."""
        import torch
        from ..io.safetensors import torch_dtype

        t0 = time.monotonic()
        if not self._index:
            self.close()
            raise LoraError("the models do not differ in any key a LoRA can hold: there is nothing to extract")
        outs = [OutTensor(n, self.st_dtype, s) for n, (_, _, s) in self._index.items()]
        try:
            with StreamingWriter(self.out_path, outs, self.metadata(), overwrite=self.overwrite) as w:
                dt = torch_dtype(self.st_dtype)
                for name in w.names:
                    off, n, shape = self._index[name]
                    self._spill.seek(off)
                    w.write(name, torch.frombuffer(bytearray(self._spill.read(n)), dtype=dt).reshape(shape))
            self.result.output = self.out_path
            self.result.output_bytes = os.path.getsize(self.out_path)
        finally:
            self.close()
        self.result.seconds += time.monotonic() - t0
        return self.result

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def check_settings(rank, conv_rank, energy, dtype) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraError(f"rank must be a whole number of at least 1, not {rank!r}")
    if conv_rank is not None and (not isinstance(conv_rank, int) or isinstance(conv_rank, bool) or conv_rank < 1):
        raise LoraError(f"conv rank must be a whole number of at least 1, not {conv_rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise LoraError(f"energy must be a fraction in (0, 1], not {energy!r}")
    if dtype not in OUT_DTYPES:
        raise LoraError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")


def extract_lora(tuned: str, base: str, rank: int, conv_rank: Optional[int] = None, energy: Optional[float] = None,
                 out_path: str = "lora.safetensors", progress: Optional[Callable] = None,
                 cancel: Optional[Callable[[], bool]] = None, dtype: str = "fp16", overwrite: bool = False,
                 device: str = "cpu") -> ExtractResult:
    """Extract ``tuned - base`` as a kohya-format LoRA at ``out_path``, streamed key by key."""
    import torch
    from safetensors import safe_open

    check_settings(rank, conv_rank, energy, dtype)
    ht, hb = read_header(tuned), read_header(base)
    at, ab = arch_of_checkpoint(ht.tensors), arch_of_checkpoint(hb.tensors)
    if at is None or ab is None or at != ab:
        raise IncompatibleModelsError(
            f"{os.path.basename(tuned)} is {ARCH_NAMES.get(at, 'no known architecture')} and "
            f"{os.path.basename(base)} is {ARCH_NAMES.get(ab, 'no known architecture')}: a LoRA is extracted from "
            "a fine-tune and the base it was trained from, of one architecture")
    ex = LoraExtractor(out_path, ht.tensors, rank, conv_rank, energy, dtype, overwrite, arch=at,
                       metadata={"ss_sd_model_name": os.path.basename(base)})
    try:
        keys = []
        for k, ti in sorted(ht.tensors.items()):
            if ti.dtype not in FLOAT_DTYPES or not ex.wants(k, ti.shape):
                if k in ex.modules and len(ti.shape) == 4 and ti.shape[2:] != (1, 1):
                    ex.result.skipped_conv += 1
                continue
            tb = hb.tensors.get(k)
            if tb is None or tb.shape != ti.shape:
                raise IncompatibleModelsError(
                    f"{k}: {'missing from' if tb is None else 'another shape in'} {os.path.basename(base)} "
                    f"({ti.shape} vs {tb.shape if tb else '-'}): not the base of this fine-tune")
            keys.append(k)
        total = sum(ht.tensors[k].nbytes + hb.tensors[k].nbytes for k in keys)
        done, t0 = 0, time.monotonic()
        with safe_open(ht.path, framework="pt", device="cpu") as ft, safe_open(hb.path, framework="pt", device="cpu") as fb:
            for i, k in enumerate(keys):
                if cancel is not None and cancel():
                    raise MergeCancelled("extraction cancelled; no output was written")
                for h in (ht, hb):
                    why = h.changed()
                    if why:
                        raise BadFileError(f"{os.path.basename(h.path)} changed while it was read: {why}")
                d = ft.get_tensor(k).to(device=device, dtype=torch.float32)
                d.sub_(fb.get_tensor(k).to(device=device, dtype=torch.float32))
                ex.add_key(k, d)
                del d
                done += ht.tensors[k].nbytes + hb.tensors[k].nbytes
                if progress is not None:
                    progress(ExtractProgress(i + 1, len(keys), done, total, k, time.monotonic() - t0))
        if cancel is not None and cancel():
            raise MergeCancelled("extraction cancelled; no output was written")
        res = ex.finish()
        res.seconds = time.monotonic() - t0
        return res
    finally:
        ex.close()

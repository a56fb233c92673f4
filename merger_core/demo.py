"""Small SD1.5-shaped checkpoints, a float64 reference merge, and the ``model-merger demo`` run.

The key names are the real ones of an SD1.5 checkpoint (``data/sd15_keys.json``: the 1130 tensors of
v1-5-pruned-emaonly as ComfyUI saves it, plus the int64 ``position_ids`` that many SD1.5 files carry). The widths
are shrunk (320 channels become 8, and so on) so that a checkpoint is about 2.4 MB, while the context axis of the
cross-attention keys stays 768 wide so that the architecture probe still sees SD1.5.

Nothing in here prints: :func:`run_demo` returns a :class:`DemoReport` that the CLI shows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ModelMergerError

# Full-size width -> demo width. A function of the width alone, so related axes stay consistent.
SMALL_WIDTHS: Dict[int, int] = {
    1: 1, 3: 3, 4: 4, 8: 8, 77: 77,  # kernels, latent channels, token positions: kept
    320: 8, 640: 16, 960: 24, 1280: 32, 1920: 48, 2560: 64, 5120: 128, 10240: 256,  # UNet
    768: 24, 3072: 96, 49408: 64,  # text encoder (hidden, MLP, vocabulary)
    128: 4, 256: 8, 512: 16,  # VAE
}
CONTEXT_DIM = 768
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")
MARKER_KEYS = ("v_pred", "ztsnr")

Layout = Dict[str, Tuple[str, Tuple[int, ...]]]  # name -> (safetensors dtype, shape)


def sd15_full_layout() -> Layout:
    """The real SD1.5 key names with their full-size shapes and dtypes (fp16, int64 position_ids)."""
    raw = json.loads(resources.files(__package__).joinpath("data/sd15_keys.json").read_text(encoding="utf-8"))
    ints = set(raw.get("int64_keys", []))
    return {k: ("I64" if k in ints else raw["dtype"], tuple(s)) for k, s in raw["tensors"].items()}


def sd15_small_layout(dtype: str = "F16", markers: bool = False) -> Layout:
    """The SD1.5 keys at demo widths (about 1.19 M parameters). Integer keys keep their dtype.

    ``markers`` adds the empty ``v_pred`` and ``ztsnr`` marker tensors that v-prediction checkpoints carry.
    """
    out: Layout = {}
    for key, (dt, shape) in sd15_full_layout().items():
        small = [SMALL_WIDTHS[s] for s in shape]
        if dt in INT_DTYPES:
            small = list(shape)  # position_ids [1, 77]: kept exactly
        elif ".attn2.to_k." in key or ".attn2.to_v." in key:
            small[-1] = CONTEXT_DIM
        out[key] = (dt if dt in INT_DTYPES else dtype, tuple(small))
    if markers:
        for k in MARKER_KEYS:
            out[k] = ("F32", (0,))
    return out


def _torch_dtype(st: str):
    from .engine import torch_dtype

    return torch_dtype(st)


def make_tensors(layout: Layout, seed: int, offset: float = 0.0, scale: float = 1.0) -> Dict[str, object]:
    """Deterministic tensors for ``layout``: float keys ~ offset + scale * N(0, 1) drawn in float32 from ``seed``;
    integer keys hold ``arange`` (the values position_ids really have)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for key in sorted(layout):
        dt, shape = layout[key]
        n = math.prod(shape)
        if dt in INT_DTYPES:
            if dt == "BOOL":
                t = (torch.arange(n) % 2).to(torch.bool)
            else:
                t = torch.arange(n, dtype=torch.int64).to(_torch_dtype(dt))
        else:
            t = (torch.randn(n, generator=gen, dtype=torch.float32) * scale + offset).to(_torch_dtype(dt))
        out[key] = t.reshape(shape)
    return out


def write_checkpoint(
    path: str | os.PathLike,
    layout: Optional[Layout] = None,
    seed: int = 0,
    offset: float = 0.0,
    scale: float = 1.0,
    metadata: Optional[Mapping[str, str]] = None,
) -> str:
    """Write a safetensors checkpoint with ``layout`` (default: small SD1.5, fp16) using the safetensors library."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = make_tensors(layout or sd15_small_layout(), seed, offset, scale)
    save_file(tensors, path, metadata=dict(metadata) if metadata else None)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference and the check against it

_MANTISSA_BITS = {"F16": 11, "BF16": 8, "F32": 24, "F64": 53}
_MIN_SUBNORMAL_EXP = {"F16": -24, "BF16": -133, "F32": -149, "F64": -1074}


def reference_merge(
    paths: Sequence[str],
    weights: Sequence[float],
    normalize: bool = True,
    allow_missing: bool = False,
) -> Tuple[Dict[str, object], Dict[str, object]]:
    """The weighted sum in float64, loading whole (small) files: the independent check of the engine.

    Returns ``(reference, bound)``: per key the float64 result (integer and marker keys: the first model's tensor
    that has it, unchanged), and per float key the sum of ``|c_i * x_i|``, which bounds the fp32 rounding error of
    any order of accumulation.
    """
    import torch
    from safetensors.torch import load_file

    models = [load_file(p) for p in paths]
    keys = sorted({k for m in models for k in m})
    ref: Dict[str, object] = {}
    bound: Dict[str, object] = {}
    for key in keys:
        have = [i for i, m in enumerate(models) if key in m]
        if len(have) != len(models) and not allow_missing:
            raise ValueError(f"{key} is missing from some models")
        first = models[have[0]][key]
        if not first.is_floating_point() or key in MARKER_KEYS:
            ref[key] = first
            continue
        ws = [float(weights[i]) for i in have]
        if normalize:
            total = sum(ws)
            ws = [w / total for w in ws]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        mag = torch.zeros(first.shape, dtype=torch.float64)
        for i, w in zip(have, ws):
            x = models[i][key].to(torch.float64)
            acc += w * x
            mag += (w * x).abs()
        ref[key] = acc
        bound[key] = mag
    return ref, bound


def ulp(values, st_dtype: str):
    """Unit in the last place of float64 ``values`` in the float format ``st_dtype`` (F16, BF16, F32, F64)."""
    import torch

    v = values.to(torch.float64)
    _, exp = torch.frexp(v)
    e = (exp.to(torch.float64) - _MANTISSA_BITS[st_dtype]).clamp(min=_MIN_SUBNORMAL_EXP[st_dtype])
    e = torch.where(v == 0, torch.full_like(e, _MIN_SUBNORMAL_EXP[st_dtype]), e)
    return torch.pow(2.0, e)


@dataclass
class CheckReport:
    keys: int = 0
    float_keys: int = 0
    exact_keys: int = 0
    max_abs_error: float = 0.0
    max_error_in_ulps: float = 0.0  # of the output dtype
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_against_reference(output: str, reference: Mapping[str, object], bound: Mapping[str, object], n_terms: int) -> CheckReport:
    """Compare a merged file with :func:`reference_merge`'s result.

    Float keys must be within one ULP of the output dtype (the final rounding) plus the fp32 accumulation bound
    ``(n_terms + 2) * 2**-23 * sum|c_i x_i|``; integer and marker keys must be bit-identical. Keys and shapes must match.
    """
    import torch
    from safetensors import safe_open

    rep = CheckReport()
    with safe_open(output, framework="pt") as f:
        out_keys = set(f.keys())
        ref_keys = set(reference)
        if out_keys != ref_keys:
            rep.problems.append(
                f"keys differ: {len(out_keys - ref_keys)} unexpected, {len(ref_keys - out_keys)} missing"
            )
        for key in sorted(out_keys & ref_keys):
            rep.keys += 1
            got = f.get_tensor(key)
            want = reference[key]
            if tuple(got.shape) != tuple(want.shape):
                rep.problems.append(f"{key}: shape {list(got.shape)}, expected {list(want.shape)}")
                continue
            if key not in bound:
                if got.dtype != want.dtype or not torch.equal(got, want):
                    rep.problems.append(f"{key}: not copied exactly ({got.dtype} vs {want.dtype})")
                else:
                    rep.exact_keys += 1
                continue
            rep.float_keys += 1
            st = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}.get(got.dtype)
            if st is None:
                rep.problems.append(f"{key}: output dtype {got.dtype} is not a float type")
                continue
            if got.numel() == 0:
                continue
            err = (got.to(torch.float64) - want).abs()
            tol = ulp(want, st) + (n_terms + 2) * 2.0**-23 * bound[key]
            rep.max_abs_error = max(rep.max_abs_error, float(err.max()))
            rep.max_error_in_ulps = max(rep.max_error_in_ulps, float((err / ulp(want, st)).max()))
            bad = err > tol
            if bool(bad.any()):
                i = int(torch.argmax((err - tol).reshape(-1)))
                rep.problems.append(
                    f"{key}: {int(bad.sum())} values off the reference, e.g. {float(got.reshape(-1)[i])} vs "
                    f"{float(want.reshape(-1)[i])}"
                )
    return rep


# ---------------------------------------------------------------------------------------------------------------
# The demo run

DEMO_MODELS = (  # file name, seed, offset, scale
    ("demo-a.safetensors", 1, 0.5, 1.0),
    ("demo-b.safetensors", 2, -0.25, 0.5),
    ("demo-c.safetensors", 3, 0.0, 2.0),
)
DEMO_WEIGHTS = (0.5, 0.3, 0.2)


@dataclass
class DemoReport:
    folder: str
    inputs: List[str]
    input_bytes: int
    manifest: str
    output: str
    weights: List[float]
    dtype: str
    keys: int
    seconds: float
    tensor_sha256: str
    architecture: str
    check: CheckReport
    hash_ok: bool
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.check.ok and self.hash_ok


def build_demo_inputs(folder: str) -> List[str]:
    """Write the three demo checkpoints into ``folder`` (created if needed); same bytes every time."""
    os.makedirs(folder, exist_ok=True)
    layout = sd15_small_layout()
    paths = []
    for name, seed, offset, scale in DEMO_MODELS:
        p = os.path.join(folder, name)
        write_checkpoint(p, layout, seed=seed, offset=offset, scale=scale, metadata={"modelspec.title": name[:-12]})
        paths.append(p)
    return paths


def run_demo(folder: str, dtype: str = "fp16", device: str = "cpu", progress=None, cancel=None) -> DemoReport:
    """Build three small SD1.5 checkpoints in ``folder/inputs``, scan them, write a manifest with weights
    0.5/0.3/0.2, merge to ``folder/merged.safetensors`` and check the result against a float64 reference."""
    from .engine import merge_to_file
    from .manifest import load_manifest, manifest_from_scan, save_manifest
    from .safetensors_io import read_header, tensor_data_sha256
    from .scan import scan

    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ModelMergerError(f"{folder} exists and is not a folder")
    inputs_dir = os.path.join(folder, "inputs")
    paths = build_demo_inputs(inputs_dir)
    found = scan([os.path.join(inputs_dir, "demo-*.safetensors")])
    by_name = {name: w for (name, *_), w in zip(DEMO_MODELS, DEMO_WEIGHTS)}
    manifest = manifest_from_scan(found, weights=by_name, dtype=dtype, device=device, title="demo-merge")
    manifest_path = found.default_manifest_path
    save_manifest(manifest, manifest_path)
    loaded = load_manifest(manifest_path)
    plan = loaded.to_plan()
    output = os.path.join(folder, "merged.safetensors")
    result = merge_to_file(plan, output, overwrite=True, progress=progress, cancel=cancel)

    in_paths = [i.path for i in plan.inputs]
    weights = [float(i.weight) for i in plan.inputs]
    ref, bound = reference_merge(in_paths, weights, normalize=plan.normalize)
    check = check_against_reference(output, ref, bound, len(in_paths))
    stored = read_header(output).metadata.get("modelspec.hash_sha256", "")
    actual = tensor_data_sha256(output)
    hash_ok = stored == "0x" + actual == "0x" + (result.tensor_sha256 or "")
    if not hash_ok:
        check.problems.append(f"modelspec.hash_sha256 {stored} does not match the tensor data's SHA-256 {actual}")
    return DemoReport(
        folder=folder,
        inputs=in_paths,
        input_bytes=sum(os.path.getsize(p) for p in in_paths),
        manifest=manifest_path,
        output=output,
        weights=weights,
        dtype=plan.dtype,
        keys=result.keys,
        seconds=result.seconds,
        tensor_sha256=actual,
        architecture=result.architecture,
        check=check,
        hash_ok=hash_ok,
        notes=list(result.notes),
    )

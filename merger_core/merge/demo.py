"""The ``model-merger demo`` run: small SD1.5-keyed checkpoints, scanned, merged and checked.

The key names are the real ones of an SD1.5 checkpoint (``data/sd15_keys.json``: the 1130 tensors of
v1-5-pruned-emaonly as ComfyUI saves it, plus the int64 ``position_ids`` that many SD1.5 files carry). The widths
are shrunk (320 channels become 8, and so on) so that a checkpoint is about 2.4 MB; the cross-attention keys keep
their 768-wide context axis. Analyze Structure calls such a file "SD1 layout, non-standard widths".

The demo checks its output against the same weighted sum computed in float64 from the inputs (every value within
the output dtype's rounding), that integer keys are copied exactly, and that the stored tensor hash is right.
Nothing in here prints: :func:`run_demo` returns a :class:`DemoReport` that the CLI shows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ModelMergerError
from ..io.safetensors import DTYPES, MARKER_KEYS, torch_dtype
from ..data import load_json

# Full-size width -> demo width. A function of the width alone, so related axes stay consistent.
SMALL_WIDTHS: Dict[int, int] = {
    1: 1, 3: 3, 4: 4, 8: 8, 77: 77,  # kernels, latent channels, token positions: kept
    320: 8, 640: 16, 960: 24, 1280: 32, 1920: 48, 2560: 64, 5120: 128, 10240: 256,  # UNet
    768: 24, 3072: 96, 49408: 64,  # text encoder (hidden, MLP, vocabulary)
    128: 4, 256: 8, 512: 16,  # VAE
}
CONTEXT_DIM = 768
INT_DTYPES = tuple(n for n, d in DTYPES.items() if not d.is_float)
DEMO_MARKERS = ("v_pred", "ztsnr")  # what v-prediction SD checkpoints carry

Layout = Dict[str, Tuple[str, Tuple[int, ...]]]  # name -> (safetensors dtype, shape)


def sd15_full_layout() -> Layout:
    """The real SD1.5 key names with their full-size shapes and dtypes (fp16, int64 position_ids)."""
    raw = load_json("sd15_keys.json")
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
        for k in DEMO_MARKERS:
            out[k] = ("F32", (0,))
    return out


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
                t = torch.arange(n, dtype=torch.int64).to(torch_dtype(dt))
        else:
            t = (torch.randn(n, generator=gen, dtype=torch.float32) * scale + offset).to(torch_dtype(dt))
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
# The demo run

DEMO_MODELS = (  # file name, seed, offset, scale
    ("demo-a.safetensors", 1, 0.5, 1.0),
    ("demo-b.safetensors", 2, -0.25, 0.5),
    ("demo-c.safetensors", 3, 0.0, 2.0),
)
DEMO_WEIGHTS = (0.5, 0.3, 0.2)


@dataclass
class DemoCheck:
    keys: int = 0
    exact_keys: int = 0
    max_abs_error: float = 0.0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_demo_output(output: str, inputs: Sequence[str], weights: Sequence[float]) -> DemoCheck:
    """Compare the merged file with the normalised weighted sum of ``inputs`` computed in float64: each float value
    must round to within two units of the output dtype's precision of it; other keys must be the first input's."""
    import torch
    from safetensors.torch import load_file

    models = [load_file(p) for p in inputs]
    total = float(sum(weights))
    check = DemoCheck()
    merged = load_file(output)
    for key, got in sorted(merged.items()):
        check.keys += 1
        first = models[0][key]
        if not first.is_floating_point() or key in MARKER_KEYS:
            if not torch.equal(got, first):
                check.problems.append(f"{key}: not copied exactly")
            check.exact_keys += 1
            continue
        want = sum(m[key].to(torch.float64) * (w / total) for m, w in zip(models, weights))
        err = (got.to(torch.float64) - want).abs()
        scale = sum((m[key].to(torch.float64) * (w / total)).abs() for m, w in zip(models, weights))
        eps = torch.finfo(got.dtype).eps
        tol = 2 * eps * scale + torch.finfo(got.dtype).smallest_normal
        if got.numel():
            check.max_abs_error = max(check.max_abs_error, float(err.max()))
        if bool((err > tol).any()):
            check.problems.append(f"{key}: {int((err > tol).sum())} values off the float64 weighted sum")
    return check


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
    structure: str
    check: "DemoCheck"
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
    from ..io.safetensors import read_header
    from ..io.writer import tensor_data_sha256
    from ..manifest.parse import load_manifest, save_manifest
    from ..manifest.scan import manifest_from_scan
    from ..manifest.scan import scan
    from .plan import plan_from_manifest
    from .runner import merge_to_file

    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ModelMergerError(f"{folder} exists and is not a folder")
    inputs_dir = os.path.join(folder, "inputs")
    build_demo_inputs(inputs_dir)
    found = scan([os.path.join(inputs_dir, "demo-*.safetensors")])
    by_name = {name: w for (name, *_), w in zip(DEMO_MODELS, DEMO_WEIGHTS)}
    manifest = manifest_from_scan(found, weights=by_name, dtype=dtype, device=device, title="demo-merge")
    manifest_path = found.default_manifest_path
    save_manifest(manifest, manifest_path)
    loaded = load_manifest(manifest_path)
    plan = plan_from_manifest(loaded)
    output = os.path.join(folder, "merged.safetensors")
    result = merge_to_file(plan, output, overwrite=True, progress=progress, cancel=cancel)

    in_paths = [i.path for i in plan.inputs]
    weights = [float(i.weight) for i in plan.inputs]
    check = check_demo_output(output, in_paths, weights)
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
        structure=result.structure,
        check=check,
        hash_ok=hash_ok,
        notes=list(result.notes),
    )

"""``model-merger demo``: the whole pipeline on three small generated SD1.5 checkpoints, checked in float64."""

from __future__ import annotations

import os
import sys

from ..units import human_bytes
from ._signals import signals_of
from ._progress import ProgressBar

NAME = "demo"
HELP = "build three small SD1.5 checkpoints, scan, merge and check the result (no download)"
DESCRIPTION = """\
Build three small checkpoints with the real SD1.5 key names (1131 tensors at reduced widths, about 2.4 MB
each, including the int64 position_ids), scan them, write a manifest with weights 0.5/0.3/0.2, merge them with
the streaming engine, and check every merged value against a float64 reference computed independently.
Exit status 0 only if the check passes. Running it again rebuilds the same files."""

DEFAULT_DIR = "model-merger-demo"


def add_arguments(p) -> None:
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR,
                   help=f"folder to work in (created; default: ./{DEFAULT_DIR})")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "keep"], default="fp16", help="output dtype (default fp16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..merge.demo import DEMO_MODELS, run_demo

    out = sys.stdout
    folder = os.path.abspath(args.dir)
    print(f"building {len(DEMO_MODELS)} small SD1.5 checkpoints in {os.path.join(folder, 'inputs')}", file=out)
    with ProgressBar("merging", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            rep = run_demo(folder, dtype=args.dtype, device=args.device, progress=bar, cancel=signals_of(args))
    print(f"  {len(rep.inputs)} inputs, {human_bytes(rep.input_bytes)} in all:", file=out)
    for path, w in zip(rep.inputs, rep.weights):
        print(f"    {os.path.relpath(path, folder)}  weight {w:g}", file=out)
    print(f"scanned {os.path.join('inputs', 'demo-*.safetensors')} and wrote the manifest {rep.manifest}", file=out)
    print(f"merged {rep.keys} tensors ({rep.structure}, {rep.dtype}) in {rep.seconds:.2f} s into {rep.output}",
          file=out)
    c = rep.check
    print(f"checked against a float64 computation of the same merge: {c.keys - c.exact_keys} float tensors within "
          f"rounding of the output dtype (largest error {c.max_abs_error:.3g}), {c.exact_keys} integer/marker "
          f"tensors bit-exact", file=out)
    print(f"modelspec.hash_sha256 {'matches' if rep.hash_ok else 'DOES NOT match'} the tensor data "
          f"(sha256 {rep.tensor_sha256})", file=out)
    if not rep.ok:
        for problem in c.problems[:20]:
            print(f"  problem: {problem}", file=out)
        print("demo FAILED", file=out)
        return 1
    print("demo passed. Next, with your own models:", file=out)
    print("  model-merger scan \"models/*.safetensors\"", file=out)
    print("  model-merger merge models/manifest.json -o merged.safetensors", file=out)
    return 0

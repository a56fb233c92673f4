"""``model-merger merge``: run the merge a manifest describes and write one safetensors file."""

from __future__ import annotations

import os
import sys

from ..errors import IncompatibleModelsError, ModelMergerError
from ..units import human_bytes
from ..manifest.model import DTYPES
from ._options import add_input_hashes_option
from ._signals import signals_of
from ._progress import DEFAULT_NOTIFY_AFTER, ProgressBar, RunNotifier

NAME = "merge"
HELP = "merge the models listed in a manifest into one .safetensors file"
DESCRIPTION = """\
Merge the models listed in a manifest (see 'model-merger scan') into one .safetensors file.

Before any weight is read, every input's header is checked: the models must have the same keys and shapes
(--allow-missing merges a key over the models that have it). The output is written to a temporary file beside
the target and renamed into place at the end; Ctrl-C or an error leaves nothing behind (exit status 130 for
Ctrl-C). Options given here override the manifest's own settings."""


def add_arguments(p) -> None:
    p.add_argument("manifest", help="the manifest file (JSON)")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--device", default=None,
                   help="where to compute: cpu, cuda, cuda:N, mps or auto (default: the manifest's, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="output dtype; keep = each tensor's dtype in the first model (default: the manifest's, else fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge a key over the models that have it (weights renormalised per key) instead of stopping")
    p.add_argument("--nonfinite", choices=["error", "warn", "clamp"], default=None,
                   help="a key whose merged values are NaN/Inf or do not fit the output dtype: error stops naming the key "
                        "and the inputs that hold them, warn writes them as they are, clamp clamps them to the output "
                        "dtype's range (NaN becomes 0); warn and clamp list the keys (default: the manifest's, else error)")
    p.add_argument("--key-layout", default=None, metavar="LAYOUT",
                   help="key names of the output: first = the first model's layout (default: the manifest's, else first), "
                        "checkpoint (ComfyUI/LDM names), unet_only, bare (diffusion model without prefix), diffusers_unet, "
                        "diffusers; inputs whose layouts differ are merged by canonical name (docs/formats.md)")
    p.add_argument("--notify", action="store_true",
                   help="desktop notification (or terminal bell) when a long run ends; needs model-merger[notify]")
    p.add_argument("--notify-after", type=float, default=DEFAULT_NOTIFY_AFTER, metavar="SECONDS",
                   help=f"only notify for runs at least this long (default: {DEFAULT_NOTIFY_AFTER:g})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_input_hashes_option(p)
    p.add_argument("--threads", type=int, default=0, metavar="K",
                   help="merge workers on the CPU (default: $MODEL_MERGER_THREADS, else one less than the CPUs this process may use); "
                        "the output is the same for every K")


def run(args) -> int:
    from ..merge.runner import merge_to_file
    from ..merge.plan import plan_from_manifest, prepare
    from ..manifest.parse import load_manifest

    out = sys.stdout
    notifier = RunNotifier(args.notify, args.notify_after)
    output = os.path.abspath(args.output)
    if not output.lower().endswith(".safetensors"):
        print(f"note: the output name {os.path.basename(output)} does not end in .safetensors", file=out)
    try:
        manifest = load_manifest(args.manifest)
        overrides = {}
        if args.device is not None:
            overrides["device"] = args.device
        if args.dtype is not None:
            overrides["dtype"] = args.dtype
        if args.allow_missing:
            overrides["allow_missing"] = True
        if args.nonfinite is not None:
            overrides["nonfinite"] = args.nonfinite
        if args.key_layout is not None:
            overrides["key_layout"] = args.key_layout
        plan = plan_from_manifest(manifest, **overrides)
        plan.threads = max(0, args.threads)
        try:
            prep = prepare(plan)
        except IncompatibleModelsError as exc:
            print("preflight: the models do not fit together (checked from the headers; no weight was read)",
                  file=out)
            raise exc
        _describe(out, plan, prep, output)
        with ProgressBar("merging", enabled=not args.no_progress) as bar:
            with signals_of(args).polling():
                result = merge_to_file(plan, output, overwrite=args.overwrite, progress=bar, prepared=prep,
                                       input_hashes=args.input_hashes,
                                       cancel=signals_of(args))
    except ModelMergerError as exc:
        notifier.finish(False, f"{os.path.basename(output)}: {exc}")
        raise
    from ..identity.cache import remember_written_file

    for path in result.swept:
        print(f"note: removed {path}, a temporary file left by an earlier run that was killed", file=out)
    remember_written_file(result.output, result.tensor_sha256)  # AutoV3 of the output, from the writer
    rate = result.output_bytes / result.seconds / 2**20 if result.seconds > 0 else 0.0
    print(f"wrote {result.output} ({human_bytes(result.output_bytes)}, {result.keys} tensors) "
          f"in {result.seconds:.1f} s ({rate:.0f} MiB/s)", file=out)
    print(f"architecture: {result.structure} (modelspec {result.architecture}); tensor data sha256: {result.tensor_sha256}", file=out)
    for note in result.notes[len(prep.notes):]:  # what the run itself found (values that did not fit)
        print(f"warning: {note}", file=out)
    notifier.finish(True, f"{os.path.basename(output)} written in {notifier.elapsed():.0f} s")
    return 0


def _describe(out, plan, prep, output: str) -> None:
    names = [i.display_name() for i in plan.inputs]
    weights = [float(i.weight) for i in plan.inputs]
    total = sum(weights)
    norm = plan.normalize and prep.method.uses_weights and total
    print(f"merging {len(names)} models with {plan.method} into {output}", file=out)
    for n, w in zip(names, weights):
        shown = f"{w / total:.4g}" + (f" (weight {w:g})" if w != w / total else "") if norm else f"{w:g}"
        print(f"  {shown:>18}  {n}", file=out)
    from ..merge.device import resolve_device

    print(f"{len(prep.jobs)} tensors, {human_bytes(prep.input_bytes)} in, {human_bytes(prep.output_bytes)} out; "
          f"dtype {plan.dtype}, device {resolve_device(plan.device)}; architecture {prep.structure}", file=out)
    compat = prep.compat
    if compat is not None:
        est = compat.estimates
        ram = est.peak_ram_bytes_linear if prep.method.kind == "linear" else est.peak_ram_bytes_tensorwise
        line = f"preflight: {compat.verdict.replace('_', ' ')}; estimated peak RAM {human_bytes(ram)}"
        if est.vram_bytes is not None:
            line += f", GPU memory {human_bytes(est.vram_bytes)}"
        print(line, file=out)
        for problem in est.problems:
            print(f"  warning: {problem}", file=out)
        for option in compat.options:
            print(f"  option: {option}", file=out)
    for note in prep.notes:
        print(f"note: {note}", file=out)

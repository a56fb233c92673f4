"""``model-merger cross-merge MODEL... -o OUT``: merge fine-tunes of one base by their differences from it."""

from __future__ import annotations

import sys

from ..merge.cross import CrossMergeRequest, plan_cross_merge
from ..merge.runner import merge_to_file
from ..merge.plan import prepare
from ..errors import ManifestError
from ..units import human_bytes
from ._options import add_input_hashes_option
from ..manifest.model import DTYPES
from ._signals import signals_of
from ._progress import ProgressBar
from .extract_lora import fraction, positive_int

NAME = "cross-merge"
HELP = "merge models of different lineages over their common base: base + L * combine(M_i - base)"
DESCRIPTION = (
    "Streams base + L * combine(M_1 - base, ..., M_n - base) key by key (no intermediate files). Every model and the "
    "base must share one architecture (checked from the headers before any weight is read). Without --base the "
    "registered base that the models' lineage points to is used (see `model-merger bases`). Text encoders are "
    "merged by differences unless told otherwise (Pony retrained its text encoder: try --text-encoder model:1 or "
    "base); the VAE comes from the base unless told otherwise."
)


def _floats(text: str, what: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ManifestError(f"{what}: {text!r} is not a comma-separated list of numbers") from None


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="models fine-tuned from one base")
    p.add_argument("-o", "--output", help="output .safetensors file (not needed with --dry-run)")
    p.add_argument("--base", default=None, help="the common base (default: chosen among the registered bases)")
    p.add_argument("--combine", choices=["sum", "ties", "dare"], default="ties", help="how the differences are combined (default ties)")
    p.add_argument("--weights", default=None, help="comma-separated weight per model (default 1 each)")
    p.add_argument("--scale", type=float, default=1.0, help="L: strength of the combined difference (default 1.0)")
    p.add_argument("--scale-blocks", default=None, metavar="SPEC", help="L per UNet block (preset, list or NAME=value pairs)")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each difference kept (default 0.2)")
    p.add_argument("--drop", type=float, default=0.5, help="dare: drop probability (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed (same seed, same bytes)")
    p.add_argument("--text-encoder", default="delta", metavar="CHOICE", help="delta (default), base, or model:K (1-based)")
    p.add_argument("--te", action="append", default=[], metavar="NAME=CHOICE", help="one text encoder's choice, e.g. clip_g=base (repeatable)")
    p.add_argument("--vae", default="base", metavar="CHOICE", help="base (default), delta, or model:K")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan; read no weights, write nothing")
    p.add_argument("--no-progress", action="store_true")
    add_input_hashes_option(p)
    p.add_argument("--to-lora", action="store_true",
                   help="write base + L * combine(...) minus the base as a kohya-format LoRA (truncated SVD per key, merged "
                        "in fp32) instead of the checkpoint; needs --rank")
    p.add_argument("--rank", type=positive_int, default=None, metavar="R", help="--to-lora: rank of linear modules (max rank with --energy)")
    p.add_argument("--conv-rank", type=positive_int, default=None, metavar="R2", help="--to-lora: rank of 3x3 convs (default: no 3x3 convs)")
    p.add_argument("--energy", type=fraction, default=None, metavar="F",
                   help="--to-lora: per module, the smallest rank keeping this fraction of the squared singular values")
    p.add_argument("--lora-dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="--to-lora: dtype of the LoRA's factors")
    p.add_argument("--threads", type=int, default=0, metavar="K",
                   help="merge workers on the CPU (default: $MODEL_MERGER_THREADS, else one less than the CPUs this process may use); "
                        "the output is the same for every K")


def request_from_args(args) -> CrossMergeRequest:
    te = {}
    for item in args.te:
        name, sep, choice = item.partition("=")
        if not sep:
            raise ManifestError(f"--te {item!r}: expected NAME=CHOICE, e.g. clip_g=base")
        te[name.strip()] = choice.strip()
    return CrossMergeRequest(
        models=args.models,
        base=args.base,
        combine=args.combine,
        weights=_floats(args.weights, "--weights") if args.weights else None,
        scale=args.scale,
        density=args.density,
        drop=args.drop,
        text_encoder=args.text_encoder,
        text_encoders=te,
        vae=args.vae,
        scale_blocks=args.scale_blocks,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        title=args.title,
    )


def run(args) -> int:
    if not args.dry_run and not args.output:
        raise ManifestError("cross-merge needs -o OUTPUT (or --dry-run)")
    to_lora = getattr(args, "to_lora", False)
    if to_lora and getattr(args, "rank", None) is None:
        raise ManifestError("cross-merge --to-lora needs --rank R (and optionally --conv-rank R2 or --energy F)")
    if not to_lora and any(getattr(args, a, None) is not None for a in ("rank", "conv_rank", "energy")):
        raise ManifestError("--rank, --conv-rank and --energy go with --to-lora")
    cp = plan_cross_merge(request_from_args(args))
    cp.plan.threads = max(0, getattr(args, "threads", 0))
    prep = prepare(cp.plan)
    print(cp.describe(), file=sys.stderr)
    if args.dry_run:
        print(f"dry run: would write {human_bytes(prep.output_bytes)} ({len(prep.jobs)} tensors)"
              + (" as a checkpoint; with --to-lora only the LoRA" if to_lora else ""))
        return 0
    if to_lora:
        from ..merge.lora_sink import merge_to_lora

        with ProgressBar("cross-merge --to-lora", enabled=not args.no_progress) as bar:
            with signals_of(args).polling():
                lr = merge_to_lora(cp.plan, args.output, args.rank, args.conv_rank, args.energy, dtype=args.lora_dtype,
                                   overwrite=args.overwrite, progress=bar, cancel=signals_of(args))
        for note in lr.notes:
            print(f"note: {note}", file=sys.stderr)
        for line in lr.summary_lines():
            print(line)
        print(f"wrote {lr.output} ({human_bytes(lr.extract.output_bytes)}, {len(lr.extract.modules)} modules, "
              f"{lr.seconds:.1f} s)")
        return 0
    with ProgressBar("cross-merge", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            res = merge_to_file(cp.plan, args.output, overwrite=args.overwrite, progress=bar, prepared=prep,
                                input_hashes=args.input_hashes,
                                cancel=signals_of(args))
    print(f"wrote {res.output} ({human_bytes(res.output_bytes)}, {res.keys} tensors, {res.seconds:.1f} s)")
    return 0

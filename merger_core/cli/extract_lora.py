"""``model-merger extract-lora TUNED --base BASE --rank R -o LORA``: a fine-tune's difference from its base as a LoRA."""

from __future__ import annotations

import sys

from ..lora.extract import extract_lora
from ..units import human_bytes
from ._progress import ProgressBar
from ._signals import signals_of

NAME = "extract-lora"
HELP = "extract a LoRA (kohya format) from a fine-tune and its base by truncated SVD of the difference"
DESCRIPTION = (
    "Writes TUNED - BASE as a kohya-format LoRA (lora_unet_*/lora_te*_ modules, lora_up/lora_down/alpha, ss_* "
    "metadata), key by key: per key a truncated SVD of the fp32 difference, deterministic (same inputs, same bytes). "
    "--rank caps linear weights (and 1x1 convs); 3x3 convs are extracted only with --conv-rank (or --energy). "
    "--energy F keeps, per module, the smallest rank that retains the fraction F of the difference's squared "
    "singular values (capped by --rank / --conv-rank). Prints the retained energy of the worst modules."
)


def positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def fraction(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {v}")
    return v


def add_arguments(p) -> None:
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned (or merged) checkpoint")
    p.add_argument("--base", required=True, help="the checkpoint TUNED was trained from")
    p.add_argument("--rank", required=True, type=positive_int, metavar="R", help="rank of linear modules (max rank with --energy)")
    p.add_argument("--conv-rank", type=positive_int, default=None, metavar="R2", help="rank of 3x3 conv modules (default: no 3x3 convs)")
    p.add_argument("--energy", type=fraction, default=None, metavar="F",
                   help="per module, the smallest rank keeping this fraction of the squared singular values (e.g. 0.9)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors LoRA")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--device", default="cpu", help="where the differences are computed (the SVD runs on the CPU)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worst", type=int, default=10, metavar="N", help="modules shown in the energy table (default 10)")


def run(args) -> int:
    with ProgressBar("extract-lora", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            res = extract_lora(args.tuned, args.base, args.rank, conv_rank=args.conv_rank, energy=args.energy,
                               out_path=args.output, progress=bar, cancel=signals_of(args), dtype=args.dtype,
                               overwrite=args.overwrite, device=args.device)
    for line in res.summary_lines(args.worst):
        print(line)
    print(f"wrote {res.output} ({human_bytes(res.output_bytes)}, {len(res.modules)} modules, {res.seconds:.1f} s)")
    return 0

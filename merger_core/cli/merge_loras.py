"""``model-merger merge-loras A.safetensors:0.7 B.safetensors:0.3 --rank R -o OUT``: LoRAs merged into one."""

from __future__ import annotations

import os
import sys

from ..lora.formats import LoraError
from ..lora.merge_loras import merge_loras
from ..units import human_bytes
from ._progress import ProgressBar
from ._signals import signals_of
from .extract_lora import fraction, positive_int

NAME = "merge-loras"
HELP = "merge LoRAs into one: weighted sum of their deltas, re-factorised to rank R"
DESCRIPTION = (
    "Each LoRA is given as PATH or PATH:WEIGHT (weight 1.0 when left out; the last ':' splits, so "
    "'C:\\loras\\a.safetensors:0.5' works). The output is sum(WEIGHT * delta) per module, re-factorised by a "
    "deterministic truncated SVD to --rank (3x3 convs to --conv-rank, default --rank; or per module the smallest "
    "rank keeping --energy of the squared singular values). Without --checkpoint, modules are lined up by name (one "
    "naming for all LoRAs); with --checkpoint MODEL (only its header is read) every LoRA is mapped to the model's "
    "keys, so kohya, PEFT and LyCORIS namings mix, and modules that match no key are listed."
)


def parse_lora_arg(text: str):
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not os.path.exists(text):
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    return path, weight


def add_arguments(p) -> None:
    p.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="LoRA files, each with an optional :weight")
    p.add_argument("--rank", required=True, type=positive_int, metavar="R")
    p.add_argument("--conv-rank", type=positive_int, default=None, metavar="R2")
    p.add_argument("--energy", type=fraction, default=None, metavar="F")
    p.add_argument("--checkpoint", default=None, metavar="MODEL", help="line modules up through this model's keys")
    p.add_argument("-o", "--output", required=True, help="output .safetensors LoRA")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worst", type=int, default=10, metavar="N")


def run(args) -> int:
    loras = [parse_lora_arg(a) for a in args.loras]
    with ProgressBar("merge-loras", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            res, report = merge_loras(loras, args.rank, args.output, conv_rank=args.conv_rank, energy=args.energy,
                                      dtype=args.dtype, overwrite=args.overwrite, checkpoint=args.checkpoint,
                                      progress=bar, cancel=signals_of(args))
    if report is not None:
        for line in report.lines():
            print(line, file=sys.stderr if "not applied" in line else sys.stdout)
    for line in res.summary_lines(args.worst):
        print(line)
    print(f"wrote {res.output} ({human_bytes(res.output_bytes)}, {len(res.modules)} modules, {res.seconds:.1f} s)")
    return 0

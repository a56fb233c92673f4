"""``model-merger train-diff A B C -o OUT``: A plus the training B received over C (SuperMerger's train difference)."""

from __future__ import annotations

import sys

from ..merge.runner import merge_to_file
from ..merge.plan import prepare
from ..merge.train import plan_difference
from ..units import human_bytes
from ._options import add_input_hashes_option
from ..manifest.model import DTYPES
from ._signals import signals_of
from ._progress import ProgressBar

NAME = "train-diff"
HELP = "A + train difference of (B - C): transfer what B learned over C onto A"
DESCRIPTION = (
    "Writes A + 1.8*alpha*(B - C)*|B - A|/(|B - A| + |B - C|), element-wise (SuperMerger's train difference): "
    "B's change over C is added to A, damped where A already differs from B. --method add_difference gives the "
    "plain A + alpha*(B - C). Alpha may be given per UNet block with --alpha-blocks (a preset such as GRAD_V, one "
    "value per block, or NAME=value pairs such as '*=0.5,OUT=1')."
)


def add_arguments(p) -> None:
    p.add_argument("a", metavar="A", help="the model that receives the difference")
    p.add_argument("b", metavar="B", help="the trained model")
    p.add_argument("c", metavar="C", help="what B was trained from")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--alpha", type=float, default=1.0, help="strength (default 1.0; range -2..3)")
    p.add_argument("--alpha-blocks", default=None, metavar="SPEC", help="alpha per block (preset, list or NAME=value pairs)")
    p.add_argument("--method", choices=["train_difference", "add_difference"], default="train_difference")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_input_hashes_option(p)
    p.add_argument("--threads", type=int, default=0, metavar="K",
                   help="merge workers on the CPU (default: $MODEL_MERGER_THREADS, else one less than the CPUs this process may use); "
                        "the output is the same for every K")


def run(args) -> int:
    plan = plan_difference(
        args.method, args.a, args.b, args.c, args.alpha, args.alpha_blocks, dtype=args.dtype, device=args.device,
        title=args.title,
    )
    plan.threads = max(0, getattr(args, "threads", 0))
    prep = prepare(plan)
    with ProgressBar("train-diff", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            res = merge_to_file(plan, args.output, overwrite=args.overwrite, progress=bar, prepared=prep,
                                input_hashes=args.input_hashes,
                                cancel=signals_of(args))
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {res.output} ({human_bytes(res.output_bytes)}, {res.keys} tensors, {res.seconds:.1f} s)")
    return 0

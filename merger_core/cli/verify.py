"""``model-merger verify OUT [--search DIR ...]``: re-run the merge a model-merger output records and compare."""

from __future__ import annotations

import os
import sys

from ._signals import signals_of
from ._progress import ProgressBar

NAME = "verify"
HELP = "check that a model-merger output is exactly what its recorded inputs and recipe give"
DESCRIPTION = """\
Read the record a model-merger output carries (planner, options, and each input's SHA-256), find every input by
its hash (the hash cache, the output's folder, and the folders given with --search), merge them again without
writing anything, and compare every tensor's bytes with the file.

Exit status: 0 verified; 1 the file differs (the first key that differs is named); 2 it cannot be verified (no
record, an input not found, a bad file). Merges recorded on a GPU may differ from a CPU re-run by rounding: give
--device to re-run where the file was made."""


def add_arguments(p) -> None:
    p.add_argument("output", metavar="OUT", help="the merged .safetensors file to verify")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="a folder holding inputs (searched a few levels deep, by file size then SHA-256); repeatable")
    p.add_argument("--device", default=None,
                   help="where to re-run the merge (default: where the record says it ran, usually cpu)")
    p.add_argument("--threads", type=int, default=0, metavar="K", help="merge workers on the CPU (the bytes never depend on K)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..merge.verify import verify_file

    out = sys.stdout
    with ProgressBar("verifying", enabled=not args.no_progress) as bar:
        with signals_of(args).polling():
            res = verify_file(
                args.output, args.search, device=args.device, threads=max(0, args.threads), progress=bar,
                cancel=signals_of(args),
                on_search=lambda p: print(f"hashing {p} (a candidate input)", file=sys.stderr),
            )
    print(f"{os.path.basename(res.output)}: {res.planner} merge ({res.method}) of", file=out)
    for x in res.inputs:
        print(f"  {x['name']}  sha256 {x['sha256'][:10]}  found at {x['path']}", file=out)
    for note in res.notes:
        print(f"note: {note}", file=out)
    if res.verified:
        print(f"verified: all {res.keys} tensors are byte for byte what a fresh merge of these inputs gives "
              f"({res.seconds:.1f} s)", file=out)
        return 0
    if res.first_difference is not None:
        print(f"differs: {res.first_difference}: {res.detail} ({res.checked_keys} of {res.keys} tensors matched before it)",
              file=out)
    else:
        print(f"differs: {res.detail}", file=out)
    return 1

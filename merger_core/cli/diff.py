"""``model-merger diff A B``: how far two models are apart, per block and per component."""

from __future__ import annotations

import json
import sys

NAME = "diff"
HELP = "compare two models per block and component (relative L2 distance, cosine similarity)"
DESCRIPTION = """\
Stream both files key by key (bounded memory) and report, per block of the architecture's block map and per
component, the relative L2 distance |A-B|/|A| and the cosine similarity of the weights. --image saves a
heatmap (blocks by metric)."""


def add_arguments(p) -> None:
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--image", metavar="PNG", default=None, help="save a heatmap picture")
    p.add_argument("--arch", default=None, help="block map to use when the architecture is not detected (e.g. sdxl_base)")
    p.add_argument("--top", type=int, default=10, help="list this many most-changed keys (default 10)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..arch import diff_models
    from ..report.images import diff_heatmap
    from ..report.text import render_diff

    bar = None

    def progress(done, total, key):
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="key", file=sys.stderr, desc="diff")
        bar.update(done - bar.n)

    try:
        rep = diff_models(args.a, args.b, progress=progress, top=args.top, arch=args.arch)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(render_diff(rep))
    if args.image:
        diff_heatmap(rep).save(args.image)
    return 0

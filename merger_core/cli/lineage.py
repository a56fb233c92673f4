"""``model-merger lineage MODEL [BASE...]``: which base a model was most likely fine-tuned from."""

from __future__ import annotations

import json
import math
import os

from ..errors import ModelMergerError

NAME = "lineage"
HELP = "rank candidate base models by how small the model's difference from each is"
DESCRIPTION = """\
Read the same small sample of tensors from the model and from each candidate base and rank the bases by the
relative L2 distance of the model from them (smallest first: the likely ancestor). Without BASE arguments the
registered bases (`model-merger bases list`) of the model's family are used."""


def add_arguments(p) -> None:
    p.add_argument("model")
    p.add_argument("bases", nargs="*", metavar="BASE")
    p.add_argument("--sample", type=int, default=48, help="number of tensors sampled (default 48)")
    p.add_argument("--max-elements", type=int, default=1 << 16, help="values read per sampled tensor (default 65536)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..arch import detect, rank_bases

    bases = list(args.bases)
    if not bases:
        from ..identity.bases import list_bases

        det = detect(args.model, read_probe=False)
        bases = [b.path for b in list_bases() if b.exists and b.family == det.family and os.path.abspath(b.path) != os.path.abspath(args.model)]
        if not bases:
            raise ModelMergerError(
                f"no registered base of the {det.family} family; name candidate files or register some with "
                "`model-merger bases add FILE`"
            )
    ranking = rank_bases(args.model, bases, sample=args.sample, max_elements=args.max_elements)
    if args.json:
        print(json.dumps([{"base": b, "score": (s if math.isfinite(s) else None), "evidence": e} for b, s, e in ranking], indent=1))
        return 0
    for i, (b, s, e) in enumerate(ranking, 1):
        score = f"{s:.5f}" if math.isfinite(s) else "n/a"
        print(f"{i}. {score:>9}  {os.path.basename(b)}")
        for line in e:
            print(f"              {line}")
    return 0

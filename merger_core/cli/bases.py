"""``model-merger bases list|add|remove|download``: the base models cross-merges take differences from."""

from __future__ import annotations

import json
import sys

from ..identity import bases as B
from ..units import human_bytes

NAME = "bases"
HELP = "list, add, remove or download base models for cross-merges"
DESCRIPTION = (
    "Bases are the checkpoints fine-tunes were trained from (SDXL base 1.0 for Pony and Illustrious). They live in "
    "the bases folder (`bases list` prints it; MODEL_MERGER_BASES_DIR overrides it) or anywhere, registered with "
    "`bases add FILE`. `bases download` fetches one by CivitAI model-version id or address into the bases folder, "
    "resuming a broken download and checking its SHA-256."
)


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="bases_cmd", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="list the bases and their architectures")
    ls.add_argument("--json", action="store_true")
    add = sub.add_parser("add", help="register a base file (kept where it is unless --copy)")
    add.add_argument("file")
    add.add_argument("--name", default=None)
    add.add_argument("--copy", action="store_true", help="copy it into the bases folder instead")
    rm = sub.add_parser("remove", help="forget a registered base (the file is not deleted)")
    rm.add_argument("name")
    dl = sub.add_parser("download", help="download a base by CivitAI model-version id or address")
    dl.add_argument("ref", metavar="VERSION_ID|URL")
    dl.add_argument("--sha256", default=None, help="expected SHA-256 (for a plain address)")
    dl.add_argument("--filename", default=None)
    dl.add_argument("--base-url", default=None, help="CivitAI API base address (default https://civitai.com/api/v1)")
    dl.add_argument("--no-progress", action="store_true")


def _row(b: B.BaseEntry) -> str:
    state = "" if b.exists and not b.problem else f"  [{b.problem or 'missing'}]"
    return f"{b.name:<32} {b.arch_name:<24} {human_bytes(b.size):>10}  {b.source:<10} {b.path}{state}"


def run(args) -> int:
    cmd = args.bases_cmd
    if cmd == "list":
        items = B.list_bases()
        if args.json:
            print(json.dumps({"folder": B.bases_dir(create=False), "bases": [b.to_dict() for b in items]}, indent=1))
            return 0
        print(f"bases folder: {B.bases_dir(create=False)}")
        if not items:
            print("no bases yet: `model-merger bases add FILE` or `model-merger bases download VERSION_ID`")
        for b in items:
            print(_row(b))
        return 0
    if cmd == "add":
        b = B.add_base(args.file, name=args.name, copy=args.copy)
        print(f"added {b.name}: {b.arch_name} ({b.path})")
        return 0
    if cmd == "remove":
        B.remove_base(args.name)
        print(f"removed {args.name} from the registry (the file is untouched)")
        return 0
    if cmd == "download":
        bar = None

        def progress(done, total):
            nonlocal bar
            if args.no_progress:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="download")
            bar.update(done - bar.n)

        try:
            b = B.download_base(args.ref, sha256=args.sha256, progress=progress, filename=args.filename, base_url=args.base_url)
        finally:
            if bar is not None:
                bar.close()
        print(f"downloaded {b.path}: {b.arch_name}" + (f" [{b.problem}]" if b.problem else ""))
        return 0
    return 2

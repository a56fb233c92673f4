"""``model-merger analyze``: architecture, components, dtypes and metadata disagreements of safetensors files."""

from __future__ import annotations

import json
import os
import sys

from ..errors import BadFileError, ModelMergerError

NAME = "analyze"
HELP = "tell the architecture of safetensors files from their structure (headers only)"
DESCRIPTION = """\
Read each file's header (a few kilobytes; no weights, except one small tensor for SD2's prediction type) and
report the architecture, variant (inpaint, pix2pix), prediction type, components present or missing, dtypes,
parameter counts, file size versus the expected size, and what the metadata claims, with any disagreement.
Folders are expanded to the .safetensors files in them. With --compat the files are also checked against each
other for a merge (per component; exit status 1 when they cannot be merged)."""


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--brief", action="store_true", help="one line per file")
    p.add_argument("--compat", action="store_true", help="also check whether the files can be merged together")
    p.add_argument("--device", default="cpu", help="device of the planned merge, for the --compat estimates")
    p.add_argument("--output", default=None, help="planned output file, for the --compat free-disk check")
    p.add_argument("--dtype", default="keep", choices=["fp16", "bf16", "fp32", "keep"],
                   help="planned output dtype, for the --compat size estimate")
    p.add_argument("--image", metavar="PNG", default=None, help="also save the report as a picture")
    p.add_argument("--no-probe", action="store_true", help="read headers only (SD2's prediction type stays unknown)")
    p.add_argument("--no-evidence", action="store_true", help="leave out the evidence lines")


def expand(items):
    out = []
    for it in items:
        if os.path.isdir(it):
            out.extend(sorted(os.path.join(it, n) for n in os.listdir(it) if n.lower().endswith((".safetensors", ".sft"))))
        else:
            out.append(it)
    return out


def run(args) -> int:
    from ..arch import check_compatibility, detect
    from ..report.images import compat_image, detection_image, stack_images
    from ..report.text import render_compat, render_detection, render_detections

    files = expand(args.files)
    if not files:
        raise BadFileError("no .safetensors files found in " + ", ".join(args.files))
    dets, errors = [], []
    for f in files:
        try:
            dets.append(detect(f, read_probe=not args.no_probe))
        except ModelMergerError as exc:
            errors.append((f, str(exc)))
    rep = None
    if args.compat and len(dets) >= 2:
        rep = check_compatibility([d.path for d in dets], device=args.device, output_path=args.output, out_dtype=args.dtype)
    if args.json:
        doc = {"files": [d.to_dict() for d in dets], "errors": [{"file": f, "error": e} for f, e in errors]}
        if rep is not None:
            doc["compatibility"] = rep.to_dict()
            doc["compatibility"].pop("detections", None)
        print(json.dumps(doc, indent=1, default=str))
    else:
        blocks = []
        if args.brief or len(dets) > 1:
            blocks.append(render_detections(dets))
        if not args.brief:
            blocks.extend(render_detection(d, evidence=not args.no_evidence) for d in dets)
        if blocks:
            print("\n\n".join(blocks))
        if rep is not None:
            print("\n== compatibility")
            print(render_compat(rep))
    for f, e in errors:
        print(f"error: {e}", file=sys.stderr)
    if args.image and dets:
        imgs = [detection_image(d) for d in dets]
        if rep is not None:
            imgs.append(compat_image(rep))
        stack_images(imgs).save(args.image)
    if errors:
        return 2
    if rep is not None and rep.verdict == "incompatible":
        return 1
    return 0

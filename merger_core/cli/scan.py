"""``model-merger scan``: find models by folder or glob pattern and write a manifest for them."""

from __future__ import annotations

from ..manifest.model import DTYPES

import os
import sys
from typing import Dict, List, Optional, Union

from ..errors import ManifestError, OutputError
from ..units import human_bytes

NAME = "scan"
HELP = "find .safetensors models (folders, glob patterns) and write a manifest"
DESCRIPTION = """\
Find the .safetensors models named by folders and glob patterns and write a manifest (JSON) for them.

Patterns are expanded by model-merger itself, the same way on every OS: quote them so the shell leaves them
alone. '*' and '?' match inside one name, '**' matches any number of folders, '[abc]' one character from a set.
A path that exists is taken literally, even with '[' or '*' in its name; in a pattern, write '[[]' for a
literal '['. .ckpt/.pt/.bin files are listed as skipped (pickle can run code).

Without -o the manifest goes to manifest.json in the deepest folder that contains every match."""


def add_arguments(p) -> None:
    p.add_argument("patterns", nargs="+", metavar="PATTERN_OR_FOLDER",
                   help="a folder, a file, or a quoted glob pattern such as 'models/**/pony*.safetensors'")
    p.add_argument("-o", "--output", metavar="MANIFEST",
                   help="where to write the manifest (default: manifest.json in the deepest common folder of the matches)")
    p.add_argument("--filter", metavar="GLOB", default=None,
                   help="file-name pattern used inside folder arguments (default: *.safetensors)")
    p.add_argument("-r", "--recursive", action="store_true", help="also look in sub-folders of folder arguments")
    p.add_argument("--weights", nargs="+", metavar="W",
                   help="weights, one per match in the listed order (0.5 0.3 0.2 or 0.5,0.3,0.2), or by file "
                        "name (a.safetensors=2 b.safetensors=1; unnamed models get 1); default: equal weights")
    p.add_argument("--method", default=None, help="merge method written into the manifest (default: weighted_sum)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="output dtype written into the manifest (default: fp16)")
    p.add_argument("--device", default=None, help="device written into the manifest (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest file")
    p.add_argument("-n", "--dry-run", action="store_true", help="list what was found; write nothing")
    p.add_argument("--civitai", action="store_true",
                   help="hash every match (cached) and record its sha256 and what CivitAI says about it in the "
                        "manifest; warns where CivitAI's base model and the file's structure disagree "
                        "(API key, if any, from CIVITAI_API_KEY; see docs/civitai.md)")
    p.add_argument("--offline", action="store_true", help="with --civitai: answer from the local cache only")


def parse_weights(tokens: Optional[List[str]]) -> Union[None, List[float], Dict[str, float]]:
    """``["0.5", "0.3,0.2"]`` -> [0.5, 0.3, 0.2]; ``["a.safetensors=2", "b=1"]`` -> {name: weight}."""
    if not tokens:
        return None
    items = [t.strip() for tok in tokens for t in tok.split(",") if t.strip()]
    named = [t for t in items if "=" in t]
    if named and len(named) != len(items):
        raise ManifestError("--weights: give either plain weights in order or name=weight pairs, not both")

    def number(text: str, what: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ManifestError(f"--weights: {what} {text!r} is not a number") from None

    if named:
        out: Dict[str, float] = {}
        for t in named:
            name, _, value = t.rpartition("=")
            out[name.strip()] = number(value.strip(), f"weight of {name.strip()}")
        return out
    return [number(t, "weight") for t in items]


def run(args) -> int:
    from ..manifest.scan import manifest_from_scan
    from ..manifest.parse import save_manifest
    from ..manifest.scan import scan

    out = sys.stdout
    result = scan(args.patterns, args.filter, recursive=args.recursive)
    for path in result.matches:
        try:
            size = human_bytes(os.path.getsize(path))
        except OSError:
            size = "?"
        print(f"  {path}  ({size})", file=out)
    print(f"{len(result.matches)} model(s) found", file=out)
    for dropped, kept in result.duplicates:
        print(f"  same file listed twice: {dropped} (kept {kept})", file=out)
    if result.skipped:
        print(f"{len(result.skipped)} skipped:", file=out)
        for path, reason in result.skipped:
            print(f"  {path}: {reason}", file=out)
    fields = {k: v for k, v in (("method", args.method), ("dtype", args.dtype), ("device", args.device)) if v is not None}
    manifest = manifest_from_scan(result, weights=parse_weights(args.weights), **fields)
    if getattr(args, "civitai", False) and manifest.models:
        from ..identity.civitai import enrich_manifest

        print(f"hashing {len(manifest.models)} model(s) (cached) and looking them up on CivitAI"
              + (" (offline: local cache only)" if args.offline else ""), file=sys.stderr)
        for warning in enrich_manifest(manifest, offline=args.offline):
            print(f"warning: {warning}", file=out)
        found = sum(1 for e in manifest.models if (e.civitai or {}).get("status") == "found")
        print(f"CivitAI: {found} of {len(manifest.models)} model(s) found", file=out)
    if len(result.matches) < 2:
        print("note: a merge needs at least 2 models; add more before running 'model-merger merge'", file=out)
    if args.dry_run:
        print("dry run: no manifest written", file=out)
        return 0
    target = args.output or result.default_manifest_path
    if target is None:
        raise OutputError("the matches share no folder (different drives); give the manifest's path with -o")
    target = os.path.abspath(target)
    if os.path.exists(target) and not args.overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it, or choose another name with -o")
    save_manifest(manifest, target, overwrite=True)
    total = sum(manifest.weights)
    shown = ", ".join(f"{e.name}={e.weight:g}" for e in manifest.entries)
    print(f"manifest written: {target}", file=out)
    print(f"weights: {shown}" + (f" (normalised by their sum, {total:g})" if manifest.normalize and total != 1 else ""),
          file=out)
    print(f"next: model-merger merge {_quote(target)} -o merged.safetensors", file=out)
    return 0


def _quote(path: str) -> str:
    return f'"{path}"' if any(c in path for c in " '[]*?&;$") else path

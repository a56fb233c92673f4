"""``model-merger lookup``: what CivitAI says about model files (by SHA-256), with a local cache."""

from __future__ import annotations

import json
import os
import sys

from ..errors import ModelMergerError

NAME = "lookup"
HELP = "look model files (or SHA-256 hashes) up on CivitAI: names, base model, trained words, page"
DESCRIPTION = """\
Hash each file (through the cache) and ask CivitAI which model version it is: model and version names and ids,
base model, type, trained words, file format and precision, the page address and image addresses. Several files
are looked up in batches. Answers are cached by SHA-256 ("not found" for --not-found-days), so --offline can
answer from the cache without any network access.

An API key is optional (some versions are only shown to signed-in users): it is read from the environment
variable CIVITAI_API_KEY (or the one named by --api-key-env), never from the command line, and never printed."""


def add_arguments(p) -> None:
    p.add_argument("items", nargs="+", metavar="FILE_OR_SHA256", help="model files, or full SHA-256 hashes")
    p.add_argument("--offline", action="store_true", help="answer from the local cache only; no network")
    p.add_argument("--refresh", action="store_true", help="ask CivitAI again even when the cache has an answer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--base-url", default=None,
                   help="API address (default: $MODEL_MERGER_CIVITAI_URL or https://civitai.com/api/v1)")
    p.add_argument("--api-key-env", default="CIVITAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default: CIVITAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default 30)")
    p.add_argument("--not-found-days", type=float, default=7.0,
                   help="how long a 'not on CivitAI' answer is remembered (default 7 days)")


def run(args) -> int:
    from ..identity.cache import open_cache
    from ..identity.civitai import format_result, lookup_files, lookup_hashes
    from ..identity.hashing import FileHashes, normalize_sha256

    key = os.environ.get(args.api_key_env, "").strip() or None
    cache = open_cache()
    ttl = args.not_found_days * 86400.0
    files, hashes = [], []
    for item in args.items:
        if os.path.exists(item):
            files.append(item)
        elif normalize_sha256(item):
            hashes.append(normalize_sha256(item))
        else:
            raise ModelMergerError(f"{item}: no such file, and not a SHA-256 hash (64 hex digits)")
    common = dict(offline=args.offline, refresh=args.refresh, api_key=key, base_url=args.base_url,
                  timeout=args.timeout, negative_ttl=ttl)
    rows = []
    if files:
        rows.extend(lookup_files(files, cache=cache, **common))
    if hashes:
        res = lookup_hashes(hashes, cache=cache, **common)
        rows.extend((h, FileHashes(size=0, sha256=h), res[h]) for h in hashes)
    failed = sum(1 for _, _, r in rows if r.status == "error")
    if args.json:
        print(json.dumps([{"item": name, "sha256": h.sha256, "civitai": r.to_dict()} for name, h, r in rows],
                         indent=2))
    else:
        if args.offline:
            print("offline: answers from the local cache only")
        print("\n\n".join(format_result(os.path.basename(n) if os.path.exists(n) else n, h, r) for n, h, r in rows))
    if failed:
        print(f"{failed} lookup(s) failed", file=sys.stderr)
        return 1
    return 0

"""``model-merger hash``: SHA256, AutoV2, AutoV1, AutoV3, CRC32 and BLAKE3 of files, in one read, cached."""

from __future__ import annotations

import json
import os
import sys

from ..identity.hashing import ALGORITHMS, normalize_algorithms

NAME = "hash"
HELP = "hash model files (SHA256, AutoV2, AutoV1, AutoV3, CRC32, BLAKE3) in one read, with a cache"
DESCRIPTION = """\
Print the hashes CivitAI, A1111, Forge and SwarmUI use to identify models. Every file is read once, whichever
hashes are asked for, and the results are kept in a local cache (keyed by path, size and modification time), so
asking again is instant; a moved file is recognised without reading it all.

Hashes: sha256 (full file), autov2 (first 10 hex of sha256), autov1 (A1111 legacy: 64 KiB at 1 MiB), autov3
(safetensors tensor data only; metadata changes keep it), crc32 (printed in both byte orders), blake3."""


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="files to hash")
    p.add_argument("-a", "--algo", default="sha256,autov2,autov3",
                   help=f"comma-separated hashes from {', '.join(ALGORITHMS)}, or 'all' (default: sha256,autov2,autov3)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the hash cache")
    p.add_argument("--json", action="store_true", help="print JSON (one object per file, in a list)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _progress_bar(name: str, enabled: bool):
    state = {"bar": None, "last": 0}

    def cb(done: int, total: int) -> None:
        if not enabled or total < 64 * 1024 * 1024:
            return
        if state["bar"] is None:
            from tqdm import tqdm

            state["bar"] = tqdm(total=total, desc=name[:40], unit="B", unit_scale=True, unit_divisor=1024,
                                file=sys.stderr, dynamic_ncols=True, mininterval=0.2, leave=False)
        state["bar"].update(done - state["last"])
        state["last"] = done

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return cb, close


def run(args) -> int:
    algos = normalize_algorithms(args.algo)
    cache = None
    if not args.no_cache:
        from ..identity.cache import open_cache

        cache = open_cache()
    rows = []
    for path in args.files:
        cb, close = _progress_bar(os.path.basename(path), not args.quiet and sys.stderr.isatty())
        try:
            if cache is not None:
                h = cache.hashes(path, algos, progress=cb)
            else:
                from ..identity.hashing import hash_file

                h = hash_file(path, algos, progress=cb)
        finally:
            close()
        rows.append((path, h))
    if args.json:
        out = []
        for path, h in rows:
            d = {"file": path, "size": h.size}
            for a in algos:
                if a == "crc32":
                    d["crc32"] = h.crc32.upper() if h.crc32 else None
                    d["crc32_le"] = h.crc32_le.upper() if h.crc32_le else None
                elif a == "autov3":
                    d["autov3"] = h.autov3_short.upper() if h.autov3 else None
                    d["autov3_full"] = h.autov3.upper() if h.autov3 else None
                else:
                    v = h.get(a)
                    d[a] = v.upper() if v else None
            out.append(d)
        print(json.dumps(out, indent=2))
        return 0
    labels = {"sha256": "SHA256", "autov2": "AutoV2", "autov1": "AutoV1", "autov3": "AutoV3", "crc32": "CRC32",
              "blake3": "BLAKE3"}
    for path, h in rows:
        print(path)
        for a in algos:
            if a == "crc32":
                value = f"{h.crc32.upper()} (little-endian {h.crc32_le.upper()})"
            elif a == "autov3":
                value = (f"{h.autov3_short.upper()} (full {h.autov3.upper()})" if h.autov3
                         else "- (not a safetensors file)")
            elif a == "autov1":
                value = h.autov1.upper() if h.autov1 else "- (file too small)"
            else:
                value = (h.get(a) or "-").upper()
            print(f"  {labels[a]:<7}{value}")
    return 0

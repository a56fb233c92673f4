"""Hashing and cache benchmark: prints markdown tables.

1. One big safetensors file (default 6.9 GB of random data, created under /work/bench-data if missing): our hasher
   (SHA256 alone, BLAKE3 alone, CRC32 alone, AutoV3 alone, all six in one pass, all six fed without worker threads)
   against ``sha256sum``, ``openssl dgst -sha256`` (which uses the CPU's SHA instructions where a distribution's
   sha256sum may not) and ``b3sum`` (or the blake3 package's multithreaded mmap hasher when b3sum is missing) on the
   same file, warm (file in the page cache) and cold (evicted with posix_fadvise before each run).
2. ``scan --civitai`` over a folder of 20 full-size (sparse) SD1.5 checkpoints against a local CivitAI stub: first
   run (hash everything, ask the stub), then a second run in a fresh process served from the cache.

Run under the shared lock so benchmarks never overlap::

    flock /tmp/bench.lock .venv/bin/python bench/hash_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from common import machine_description  # noqa: E402

DATA = "/work/bench-data"
MiB = 1024 * 1024


def make_big(path: str, size: int) -> None:
    """A safetensors file: a small header and one U8 tensor of random bytes."""
    data_len = size - 8 - 4096
    header = {"__metadata__": {"note": "hash benchmark, random data"},
              "blob": {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}}
    body = json.dumps(header).encode()
    body += b" " * (4096 - len(body))
    tmp = path + ".partial"
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        left = data_len
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
    os.replace(tmp, path)
    print(f"created {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        while f.readinto(buf):
            pass


def timed_cmd(cmd) -> tuple:
    r0 = os.times()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return wall, cpu, out.split()[0] if out else ""


def timed_ours(path: str, algos, **kw) -> tuple:
    from merger_core.identity.hashing import hash_file

    c0 = time.process_time()
    t0 = time.perf_counter()
    h = hash_file(path, algos, **kw)
    return time.perf_counter() - t0, time.process_time() - c0, h


def big_file_table(path: str, repeat: int, modes) -> list:
    size = os.path.getsize(path)
    b3 = shutil.which("b3sum")
    runs = [
        ("sha256sum", lambda: timed_cmd(["sha256sum", path])),
        *([("openssl dgst -sha256", lambda: timed_cmd(["openssl", "dgst", "-sha256", "-r", path]))]
          if shutil.which("openssl") else []),
        ("b3sum" if b3 else "blake3 (python, mmap, threads)",
         (lambda: timed_cmd([b3, path])) if b3 else (lambda: _py_b3(path))),
        ("ours: SHA256", lambda: timed_ours(path, ["sha256"])),
        ("ours: BLAKE3", lambda: timed_ours(path, ["blake3"])),
        ("ours: CRC32", lambda: timed_ours(path, ["crc32"])),
        ("ours: AutoV3", lambda: timed_ours(path, ["autov3"])),
        ("ours: all six, one pass", lambda: timed_ours(path, "all")),
        ("ours: all six, no threads", lambda: timed_ours(path, "all", threads=False)),
    ]
    rows = []
    for mode in modes:
        best = {}
        # rounds: every tool once per round, so a busy spell on the machine hits all tools alike
        for _ in range(repeat if mode == "warm" else 1):
            for name, fn in runs:
                if mode == "cold":
                    evict(path)
                else:
                    warm(path)
                wall, cpu, value = fn()
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu, value)
        ref = best["sha256sum"][0]
        want_sha = best["sha256sum"][2]
        want_b3 = next(v[2] for k, v in best.items() if k.startswith(("b3sum", "blake3")))
        mine = best["ours: all six, one pass"][2]
        assert mine.sha256 == want_sha, "SHA256 differs from sha256sum"
        assert mine.blake3 == want_b3, "BLAKE3 differs from b3sum"
        for name, _ in runs:
            wall, cpu, _v = best[name]
            rows.append({
                "mode": mode, "tool": name, "s": f"{wall:.2f}", "GB/s": f"{size / wall / 1e9:.2f}",
                "CPU s": f"{cpu:.1f}", "speed vs sha256sum": f"{ref / wall:.2f}x",
            })
            print(f"  {mode:<4} {name:<32} {wall:7.2f} s  {size / wall / 1e9:5.2f} GB/s  cpu {cpu:5.1f} s", flush=True)
    return rows


def _py_b3(path: str):
    import blake3

    c0 = time.process_time()
    t0 = time.perf_counter()
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return time.perf_counter() - t0, time.process_time() - c0, h.hexdigest()


def fmt(rows, cols) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# ---------------------------------------------------------------------------------------------------------------
# scan --civitai from the cache

SCAN_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
from merger_core.manifest.scan import scan
from merger_core.manifest import manifest_from_scan
from merger_core.identity.civitai import enrich_manifest, RetryPolicy
from merger_core.identity.cache import HashCache
from merger_core.host import userdirs
t1 = time.perf_counter()
res = scan([sys.argv[1]])
m = manifest_from_scan(res)
cache = HashCache(userdirs.cache_db_path())
warnings = enrich_manifest(m, cache=cache, base_url=sys.argv[2], retry=RetryPolicy(max_retries=2, backoff_start=0.1))
t2 = time.perf_counter()
found = sum(1 for e in m.models if e.civitai and e.civitai.get("status") == "found")
print(json.dumps({"import_s": t1 - t0, "scan_enrich_s": t2 - t1, "n": len(m.models), "found": found,
                  "warnings": len(warnings)}))
"""


def make_folder(folder: str, n: int) -> None:
    from merger_core.merge.demo import sd15_full_layout

    os.makedirs(folder, exist_ok=True)
    layout = sd15_full_layout()
    for i in range(n):
        path = os.path.join(folder, f"ckpt_{i:02d}.safetensors")
        if os.path.exists(path):
            continue
        header = {"__metadata__": {"bench_index": str(i)}}
        pos = 0
        from merger_core.io.safetensors import DTYPE_SIZES
        import math

        for k in sorted(layout):
            dt, shape = layout[k]
            nb = math.prod(shape) * DTYPE_SIZES[dt]
            header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nb]}
            pos += nb
        body = json.dumps(header).encode()
        body += b" " * (-(8 + len(body)) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(body)) + body)
            # a little non-zero data at the start and end so files differ in their samples, then holes
            f.write(os.urandom(1 * MiB))
            f.truncate(8 + len(body) + pos)
            f.seek(8 + len(body) + pos - MiB)
            f.write(os.urandom(MiB))


def scan_table(folder: str, n: int) -> list:
    from civitai_stub import CivitaiStub, make_version

    make_folder(folder, n)
    home = tempfile.mkdtemp(prefix="mm-hashbench-")
    env = dict(os.environ, MODEL_MERGER_HOME=home, PYTHONPATH=REPO)
    rows = []
    try:
        from merger_core.identity.cache import HashCache
        from merger_core.host import userdirs

        os.environ["MODEL_MERGER_HOME"] = home
        with CivitaiStub() as stub:
            # the stub knows half of the files (so both found and not-found answers get cached)
            cache = HashCache(userdirs.cache_db_path())
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))[:n]
            t0 = time.perf_counter()
            shas = [cache.hashes(p, ["sha256"]).sha256 for p in files]
            first_hash = time.perf_counter() - t0
            cache.close()
            for i, s in enumerate(shas[::2]):
                stub.add_version(make_version(100 + i, 200 + i, s, base_model="SD 1.5"))
            for label in ("first --civitai run (hashes cached, CivitAI asked)", "second run (all from the cache)"):
                before = len(stub.requests)
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", SCAN_SCRIPT, folder, stub.base_url], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
                wall = time.perf_counter() - t0
                d = json.loads(out.strip().splitlines()[-1])
                rows.append({"step": label, "files": d["n"], "found": d["found"],
                             "scan+hash+lookup s": f"{d['scan_enrich_s']:.3f}", "process s": f"{wall:.2f}",
                             "requests": len(stub.requests) - before})
                print(f"  {label}: {d['scan_enrich_s']:.3f} s in-process, {wall:.2f} s whole process, "
                      f"{len(stub.requests) - before} requests", flush=True)
            total = sum(os.path.getsize(p) for p in files)
            rows.insert(0, {"step": f"hash {n} files ({total / 1e9:.1f} GB, sparse) the first time", "files": n,
                            "found": "-", "scan+hash+lookup s": f"{first_hash:.2f}", "process s": "-",
                            "requests": 0})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", default=os.path.join(DATA, "hash_6g9.safetensors"), help="the big file")
    ap.add_argument("--size-gb", type=float, default=6.9, help="size of the big file if it must be created")
    ap.add_argument("--repeat", type=int, default=2, help="warm runs per tool (best is shown)")
    ap.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    ap.add_argument("--folder", default=os.path.join(DATA, "hash20"), help="folder for the 20 checkpoints")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--results", default=os.path.join(DATA, "RESULTS-hash.txt"))
    args = ap.parse_args(argv)

    lines = [f"=== hash_bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", f"machine: {machine_description()}, Python {platform.python_version()}"]
    lines.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(lines), flush=True)
    if not args.skip_big:
        os.makedirs(os.path.dirname(args.big), exist_ok=True)
        if not os.path.exists(args.big):
            make_big(args.big, int(args.size_gb * 1e9))
        rows = big_file_table(args.big, args.repeat, args.modes)
        lines += ["", f"Big file: {args.big} ({os.path.getsize(args.big) / 1e9:.2f} GB)",
                  fmt(rows, ["mode", "tool", "s", "GB/s", "CPU s", "speed vs sha256sum"])]
    if not args.skip_scan:
        rows = scan_table(args.folder, args.n)
        lines += ["", f"scan --civitai over {args.n} checkpoints (local CivitAI stub)",
                  fmt(rows, ["step", "files", "found", "scan+hash+lookup s", "process s", "requests"])]
    lines.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

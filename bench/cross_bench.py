#!/usr/bin/env python3
"""Benchmark: cross-merge of N SDXL-layout models over an SDXL base, against the I/O floor.

Inputs are full-size SDXL checkpoints (6.9 GB fp16 each, random values; ``sdxl_0`` is the base, ``sdxl_1..N`` the
models), generated once under ``--data-dir`` by ``bench/common.py`` and shared with the merge benchmark.

For each N and combine method the script measures, after dropping the page cache (``--mode cold``, default) or
after reading the inputs once (``--mode warm``; 3+ SDXL inputs do not all fit in 24 GiB of page cache):

* the I/O floor: read the N+1 inputs once with 16 MiB sequential reads, write one output-sized file and fsync;
* the merge: ``python -m merger_core cross-merge MODELS --base BASE --combine C -o OUT --no-progress`` as a
  subprocess; wall time, CPU time, and peak private memory (``RssAnon`` of the process tree, sampled every 20 ms).

The whole run holds ``/tmp/bench.lock``. Outputs are deleted. Example::

    .venv/bin/python bench/cross_bench.py --n 2 3 --combine ties
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import GiB  # noqa: E402

PY = sys.executable
MEM_TARGET_GIB = 2.0
COLUMNS = ["N models", "combine", "mode", "input GB", "floor read s", "floor write s", "floor s", "merge s", "ratio",
           "CPU s", "others CPU", "peak private GiB", "target"]


class Log:
    def __init__(self, path: Optional[str]):
        self.path = path

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def measure(n: int, combine: str, mode: str, paths: List[str], data_dir: str, log: Log, wait_idle: float) -> Dict[str, object]:
    base, models = paths[0], paths[1 : n + 1]
    inputs = [base] + models
    out = os.path.join(data_dir, f"cross_bench_out_{os.getpid()}.safetensors")
    scratch = os.path.join(data_dir, f"cross_bench_floor_{os.getpid()}.tmp")
    out_bytes = os.path.getsize(base)
    if shutil.disk_usage(data_dir).free < out_bytes + 2 * GiB:
        raise SystemExit(f"not enough free disk in {data_dir} for the output")
    try:
        if wait_idle:
            common.wait_for_quiet(timeout=wait_idle, log=log)
        common.read_all(inputs) if mode == "warm" else common.drop_caches()
        floor = common.io_floor(inputs, out_bytes, scratch)
        if os.path.exists(scratch):
            os.unlink(scratch)
        common.read_all(inputs) if mode == "warm" else common.drop_caches()
        if wait_idle:
            common.wait_for_quiet(timeout=wait_idle, log=log)
        cmd = [PY, "-m", "merger_core", "cross-merge", *models, "--base", base, "--combine", combine, "-o", out,
               "--overwrite", "--no-progress"]
        m = common.run_measured(cmd, cwd=common.REPO)
        ok = m.returncode == 0 and os.path.isfile(out)
        if not ok:
            log(f"!! cross-merge failed ({m.returncode}): {m.stderr.strip()[-3000:]}")
    finally:
        for p in (out, scratch):
            if os.path.exists(p):
                os.unlink(p)
    ncpu = os.cpu_count() or 1
    peak = m.peak_anon
    return {
        "N models": n,
        "combine": combine,
        "mode": mode,
        "input GB": f"{sum(os.path.getsize(p) for p in inputs) / 1e9:.1f}",
        "floor read s": f"{floor.read_s:.1f}",
        "floor write s": f"{floor.write_s:.1f}",
        "floor s": f"{floor.total_s:.1f}",
        "merge s": f"{m.wall_s:.1f}" if ok else "FAILED",
        "ratio": f"{m.wall_s / floor.total_s:.2f}x" if ok else "",
        "CPU s": f"{m.cpu_s:.1f}",
        "others CPU": f"{m.others_cpu_s / (m.wall_s * ncpu) * 100:.0f}%",
        "peak private GiB": f"{peak / GiB:.2f}",
        "target": ("ok" if peak <= MEM_TARGET_GIB * GiB else "OVER") + f" (<= {MEM_TARGET_GIB} GiB)",
        "_peak": peak,
        "_ok": ok,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", nargs="+", type=int, default=[2], help="numbers of models merged over the base")
    ap.add_argument("--combine", nargs="+", default=["ties"], choices=["sum", "ties", "dare"])
    ap.add_argument("--mode", nargs="+", default=["cold"], choices=["cold", "warm"])
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--layouts", default=common.DEFAULT_LAYOUTS)
    ap.add_argument("--results", default=None, help="append the log and table to this file")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S", help="wait up to S s for quiet CPUs first")
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    log = Log(args.results)
    lock = common.BenchLock() if not args.no_lock else None
    if lock:
        lock.__enter__()
    try:
        log(f"=== cross_bench {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC: {' '.join(sys.argv[1:])}")
        log(f"machine: {common.machine_description()}")
        paths = common.ensure_inputs("sdxl", max(args.n) + 1, args.data_dir, args.layouts, log=log)
        rows = []
        for n in args.n:
            for combine in args.combine:
                for mode in args.mode:
                    row = measure(n, combine, mode, paths, args.data_dir, log, args.wait_idle)
                    rows.append(row)
                    log(common.format_table([row], COLUMNS).splitlines()[-1])
        log(common.format_table(rows, COLUMNS))
        good = [r for r in rows if r["_ok"]]
        for combine in args.combine:
            rs = [r for r in good if r["combine"] == combine]
            if len({r["N models"] for r in rs}) > 1:
                peaks = [r["_peak"] for r in rs]
                log(f"memory flatness ({combine}): peak private {min(peaks) / GiB:.3f}..{max(peaks) / GiB:.3f} GiB over "
                    f"N = {', '.join(str(r['N models']) for r in rs)}")
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

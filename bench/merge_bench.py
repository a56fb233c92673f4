#!/usr/bin/env python3
"""Benchmark: equal-weight merge of N full-size checkpoints against the I/O floor.

For each layout (sd15: 2.1 GB, sdxl: 6.9 GB, fp16) and each N, and for each mode:

* warm: the inputs are read once first (so they are in the page cache, where they fit), then the I/O floor and the
  merge are measured;
* cold: ``sync; echo 3 > /proc/sys/vm/drop_caches`` before the floor and again before the merge.

The I/O floor is: read every input once with 16 MiB sequential ``readinto`` calls, plus write one output-sized file
and fsync it. The merge is ``python -m merger_core merge manifest.json -o OUT --overwrite --no-progress`` as a
subprocess (manifest made by ``python -m merger_core scan``), or, when the CLI is not available,
``merger_core.merge_to_file`` called from ``python -c``. Peak private memory is the largest ``RssAnon`` summed over
the subprocess tree, sampled every 20 ms. ``--naive`` adds a load-everything baseline (``safetensors.torch.load_file``
of every input, fp32 average, ``save_file``) where it fits in RAM.

The whole run holds ``/tmp/bench.lock`` (pass ``--no-lock`` when wrapping it in ``flock /tmp/bench.lock`` yourself).
Inputs are generated once under ``--data-dir`` as ``{layout}_{i}.safetensors`` and reused; outputs are deleted.

Example::

    .venv/bin/python bench/merge_bench.py --layout sd15 --n 4 --modes warm cold
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import GiB  # noqa: E402

PY = sys.executable

# targets from the issue (2-core machine): (warm ratio, cold ratio, peak private GiB) at N=4
TARGETS = {"sd15": (2.5, 1.5, 1.0), "sdxl": (2.5, 1.5, 1.5)}

API_SCRIPT = r"""
import os, sys, time
from merger_core.merge import MergeInput, MergePlan, merge_to_file
out = sys.argv[-1]
method = os.environ.get("MM_BENCH_METHOD", "weighted_sum")
params = {"ties": {"density": 0.2}}.get(method, {})
plan = MergePlan([MergeInput(p, 1.0) for p in sys.argv[1:-1]], method=method, params=params, dtype="fp16", device="cpu",
                 threads=int(os.environ.get("MM_BENCH_THREADS", "0")))
t0 = time.monotonic()
r = merge_to_file(plan, out, overwrite=True, input_hashes=os.environ.get("MM_BENCH_HASHES") != "off")
print("engine_seconds", round(time.monotonic() - t0, 3))
"""

NAIVE_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
paths, out = sys.argv[1:-1], sys.argv[-1]
sds = [load_file(p) for p in paths]
res = {}
for k in sds[0]:
    t = sds[0][k]
    if t.is_floating_point():
        acc = sds[0][k].float()
        for sd in sds[1:]:
            acc = acc + sd[k].float()
        res[k] = (acc / len(sds)).to(t.dtype)
    else:
        res[k] = t.clone()
save_file(res, out)
"""


class Log:
    def __init__(self, results_path: Optional[str]):
        self.results_path = results_path

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.results_path:
            with open(self.results_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def cli_available() -> bool:
    """True when ``python -m merger_core merge`` and ``scan`` exist in this checkout."""
    cli_dir = os.path.join(common.REPO, "merger_core", "cli")
    if not (os.path.isfile(os.path.join(cli_dir, "merge.py")) and os.path.isfile(os.path.join(cli_dir, "scan.py"))):
        return False
    r = subprocess.run([PY, "-m", "merger_core", "merge", "--help"], cwd=common.REPO, capture_output=True, text=True)
    return r.returncode == 0 and "--no-progress" in r.stdout


def make_manifest(inputs: List[str], path: str, method: str = "weighted_sum") -> None:
    r = subprocess.run([PY, "-m", "merger_core", "scan", *inputs, "-o", path, "--method", method], cwd=common.REPO,
                       capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"model-merger scan failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    if method == "ties":  # the first input is the base; density 0.2 as in issue 10's measurements
        with open(path) as f:
            doc = json.load(f)
        doc["params"] = {"density": 0.2}
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)


def merge_command(runner: str, inputs: List[str], out: str, manifest: str, hashes: str = "run", threads: int = 0) -> List[str]:
    if runner == "cli":
        return [PY, "-m", "merger_core", "merge", manifest, "-o", out, "--overwrite", "--no-progress"] + (
            ["--no-input-hashes"] if hashes == "off" else []) + (["--threads", str(threads)] if threads else [])
    if runner == "api":
        return [PY, "-c", API_SCRIPT, *inputs, out]
    if runner == "naive":
        return [PY, "-c", NAIVE_SCRIPT, *inputs, out]
    raise ValueError(runner)


def output_bytes_for(inputs: List[str]) -> int:
    """Size of the merged file: the same tensors as one input (fp16 layouts stay fp16), so one input's size."""
    return os.path.getsize(inputs[0])


def measure_one(layout: str, n: int, mode: str, runner: str, inputs: List[str], data_dir: str, log: Log,
                pyspy: Optional[str] = None, repeat: int = 1, wait_idle: float = 0,
                out_dir: Optional[str] = None, hashes: str = "run", threads: int = 0,
                method: str = "weighted_sum") -> Dict[str, object]:
    """Floor and merge, ``repeat`` times each; the fastest floor and the fastest merge are kept, the peak memory
    is the largest seen. ``out_dir`` (e.g. a tmpfs such as /dev/shm) receives the output and the floor's write:
    warm and on a tmpfs, the floor is the memory floor that no disk hides. ``hashes``: ``run`` merges with an empty
    hash cache (every input is hashed during the merge, the default for a first merge), ``off`` with
    ``--no-input-hashes``."""
    out_dir = out_dir or data_dir
    out = os.path.join(out_dir, f"merge_bench_out_{os.getpid()}.safetensors")
    scratch = os.path.join(out_dir, f"merge_bench_floor_{os.getpid()}.tmp")
    manifest = os.path.join(data_dir, f"merge_bench_{layout}_{n}_{os.getpid()}.json")
    out_bytes = output_bytes_for(inputs)
    needed = out_bytes + 2 * GiB
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise SystemExit(f"not enough free space in {out_dir} for the output ({free / GiB:.1f} GiB free)")
    floors: List[common.Floor] = []
    merges: List[common.Measured] = []
    cached = None
    ok = True
    engine_s = ""
    try:
        if runner == "cli":
            make_manifest(inputs, manifest, method)
        for _ in range(repeat):
            # --- floor
            if wait_idle:
                common.wait_for_quiet(timeout=wait_idle, log=log)
            if mode == "warm":
                common.read_all(inputs)  # bring the inputs into the page cache (where they fit)
            else:
                common.drop_caches()
            floors.append(common.io_floor(inputs, out_bytes, scratch))
            # --- merge
            if mode == "warm":
                common.read_all(inputs)  # the floor's write may have pushed some inputs out
            else:
                common.drop_caches()
            cached = common.cached_fraction(inputs)
            if wait_idle:
                common.wait_for_quiet(timeout=wait_idle, log=log)
            cmd = merge_command(runner, inputs, out, manifest, hashes, threads)
            if pyspy:
                cmd = ["py-spy", "record", "-o", pyspy, "-r", "50", "--idle", "-t", "-f", "raw", "--", *cmd]
            import tempfile

            with tempfile.TemporaryDirectory(prefix="merge-bench-home-") as home:  # an empty hash cache each run
                env = dict(os.environ, MODEL_MERGER_HOME=home, MM_BENCH_HASHES=hashes, MM_BENCH_METHOD=method,
                           MM_BENCH_THREADS=str(threads))
                m = common.run_measured(cmd, cwd=common.REPO, env=env)
            if m.returncode != 0:
                log(f"!! {runner} merge failed (exit {m.returncode}):\n{m.stderr.strip()[-3000:]}")
            ok = ok and m.returncode == 0 and os.path.isfile(out) and os.path.getsize(out) > 0
            for line in m.stdout.splitlines():
                if line.startswith("engine_seconds"):
                    m.engine_s = float(line.split()[1])
            merges.append(m)
            if os.path.exists(out):
                os.unlink(out)
    finally:
        for p in (out, scratch, manifest):
            if os.path.exists(p):
                os.unlink(p)
    floor = min(floors, key=lambda f: f.total_s)
    best = min(merges, key=lambda m: m.wall_s)
    peak = max(m.peak_anon for m in merges)
    ncpu = os.cpu_count() or 1
    row = {
        "layout": layout,
        "method": method,
        "N": n,
        "K": threads or "default",
        "mode": mode,
        "runner": runner,
        "hashes": hashes if runner != "naive" else "",
        "runs": repeat,
        "input GB": f"{sum(os.path.getsize(p) for p in inputs) / 1e9:.1f}",
        "cached": "" if cached is None else f"{cached * 100:.0f}%",
        "floor read s": f"{floor.read_s:.1f}",
        "floor write s": f"{floor.write_s:.1f}",
        "floor s": f"{floor.total_s:.1f}",
        "merge s": f"{best.wall_s:.1f}" if ok else "FAILED",
        "engine s": f"{best.engine_s:.1f}" if getattr(best, "engine_s", None) else "",
        "ratio": f"{best.wall_s / floor.total_s:.2f}x" if ok else "",
        "CPU s": f"{best.cpu_s:.1f}",
        "user CPU s": f"{best.user_s:.1f}",
        "others CPU": f"{best.others_cpu_s / (best.wall_s * ncpu) * 100:.0f}%",
        "peak private GiB": f"{peak / GiB:.2f}",
        "_ratio": best.wall_s / floor.total_s if ok else None,
        "_peak": peak,
        "_ok": ok,
    }
    if repeat > 1:
        log("  runs: floor " + ", ".join(f"{f.total_s:.1f}" for f in floors) + " s; merge "
            + ", ".join(f"{m.wall_s:.1f}" for m in merges) + " s; peak "
            + ", ".join(f"{m.peak_anon / GiB:.2f}" for m in merges) + " GiB")
    return row


def verdict(row: Dict[str, object]) -> str:
    if not row["_ok"] or row["runner"] == "naive" or row["layout"] not in TARGETS:
        return ""
    warm_t, cold_t, mem_t = TARGETS[row["layout"]]
    limit = warm_t if row["mode"] == "warm" else cold_t
    parts = []
    parts.append(("ok" if row["_ratio"] <= limit else "OVER") + f" (<= {limit}x)")
    parts.append(("ok" if row["_peak"] <= mem_t * GiB else "OVER") + f" (<= {mem_t} GiB)")
    return ", ".join(parts)


COLUMNS = ["layout", "method", "N", "K", "mode", "runner", "hashes", "runs", "input GB", "cached", "floor read s",
           "floor write s", "floor s", "merge s", "engine s", "ratio", "CPU s", "user CPU s", "others CPU",
           "peak private GiB", "target"]


def scaling(rows: List[Dict[str, object]]) -> List[str]:
    """Issue 10's lines: K = 2 against K = 1 (same layout, method, N, mode, hashes), and cold user CPU against warm."""
    lines = []
    key = lambda r: (r["layout"], r["method"], r["N"], r["mode"], r["hashes"])  # noqa: E731
    by = {}
    for r in rows:
        if r["runner"] != "naive" and r["_ok"]:
            by.setdefault(key(r), {})[r["K"]] = r
    for k, ks in by.items():
        if 1 in ks and 2 in ks:
            a, b = float(ks[1]["merge s"]), float(ks[2]["merge s"])
            want = " (target >= 1.6x)" if k[1] == "ties" else ""
            lines.append(f"{k[0]} {k[1]} N={k[2]} {k[3]} hashes={k[4]}: K=2 is {a / b:.2f}x as fast as K=1{want}")
    for k, ks in by.items():
        if k[3] == "cold":
            warm = by.get((k[0], k[1], k[2], "warm", k[4]), {})
            for kk, r in ks.items():
                if kk in warm:
                    cu, wu = float(r["user CPU s"]), float(warm[kk]["user CPU s"])
                    lines.append(f"{k[0]} {k[1]} N={k[2]} K={kk} hashes={k[4]}: user CPU cold {cu:.1f} s / warm {wu:.1f} s"
                                 f" = {cu / wu:.2f}x (target <= 1.2x)")
    return lines


def flatness(rows: List[Dict[str, object]]) -> List[str]:
    lines = []
    by_layout: Dict[str, List[Dict[str, object]]] = {}
    for r in rows:
        if r["_ok"] and r["runner"] != "naive":
            by_layout.setdefault(r["layout"], []).append(r)
    for layout, rs in by_layout.items():
        ns = sorted({r["N"] for r in rs})
        if len(ns) < 2:
            continue
        peaks = [r["_peak"] for r in rs]
        lo, hi = min(peaks), max(peaks)
        spread = (hi - lo) / lo if lo else 0.0
        lines.append(
            f"memory flatness {layout} N={','.join(map(str, ns))}: peak private {lo / GiB:.3f}..{hi / GiB:.3f} GiB, "
            f"spread {spread * 100:.1f}% ({'ok' if spread <= 0.10 else 'OVER'} <= 10%)"
        )
    return lines


def parse_cases(args, ap) -> List[tuple]:
    """[(layout, [n, ...]), ...] from --case LAYOUT:N,N or from --layout/--n."""
    if not args.case:
        return [(layout, sorted(set(args.n))) for layout in args.layout]
    cases = []
    for spec in args.case:
        layout, _, ns = spec.partition(":")
        if layout not in common.LAYOUT_FILES or not ns:
            ap.error(f"--case {spec!r}: expected LAYOUT:N[,N...] with LAYOUT one of {', '.join(sorted(common.LAYOUT_FILES))}")
        try:
            cases.append((layout, sorted({int(x) for x in ns.split(",")})))
        except ValueError:
            ap.error(f"--case {spec!r}: N must be whole numbers")
    return cases


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", nargs="+", default=["sd15"], choices=sorted(common.LAYOUT_FILES), help="layouts to run")
    ap.add_argument("--n", nargs="+", type=int, default=[4], help="numbers of models to merge (each >= 2)")
    ap.add_argument("--case", action="append", metavar="LAYOUT:N[,N...]",
                    help="run this layout at these N (repeatable; overrides --layout/--n), e.g. sd15:2,4,8")
    ap.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    ap.add_argument("--runner", default="auto", choices=["auto", "cli", "api"],
                    help="cli: python -m merger_core merge; api: merge_to_file via python -c; auto: cli if present")
    ap.add_argument("--naive", action="store_true",
                    help="also run the load-everything baseline (at the N of --naive-n, where it fits in RAM)")
    ap.add_argument("--naive-n", nargs="+", type=int, default=[4])
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--layouts", default=common.DEFAULT_LAYOUTS, help="folder of layout JSON files")
    ap.add_argument("--results", default=None, help="append the log and tables to this file")
    ap.add_argument("--generate-only", action="store_true", help="only make sure the inputs exist")
    ap.add_argument("--keep-inputs", type=int, default=None, metavar="K",
                    help="after each layout, delete the inputs this run generated whose index is >= K (saves disk)")
    ap.add_argument("--pyspy", default=None, help="profile each merge with py-spy into PREFIX_<layout>_<n>_<mode>.txt")
    ap.add_argument("--repeat", type=int, default=1, help="measure each case this many times, keep the fastest")
    ap.add_argument("--wait-idle", type=float, default=60, metavar="S",
                    help="before each measurement wait up to S seconds for the CPUs to be <= 15%% busy (0: never)")
    ap.add_argument("--no-lock", action="store_true", help="do not take /tmp/bench.lock (you hold it already)")
    ap.add_argument("--hashes", nargs="+", default=["run", "off"], choices=["run", "off"],
                    help="run: an empty hash cache, so the inputs are hashed during the merge (SHA-256 for the recipe); "
                         "off: --no-input-hashes (default: both)")
    ap.add_argument("--threads", nargs="+", type=int, default=[0], metavar="K",
                    help="merge workers to measure (0: the engine's default), e.g. --threads 1 2")
    ap.add_argument("--method", default="weighted_sum", choices=["weighted_sum", "ties"],
                    help="ties: the first input is the base, density 0.2")
    ap.add_argument("--out-dir", default=None, metavar="DIR",
                    help="write the output (and the floor's write) here, e.g. /dev/shm for the memory floor")
    args = ap.parse_args(argv)
    cases = parse_cases(args, ap)
    if any(n < 2 for _, ns in cases for n in ns) and not args.generate_only:
        ap.error("N must be >= 2")
    log = Log(args.results)
    # a plain `kill` should still remove the output and scratch files (the finally blocks run on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    lock = common.BenchLock() if not args.no_lock else None
    if lock:
        lock.__enter__()
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        log(f"\n=== merge_bench {started}: {' '.join(sys.argv[1:])}")
        log(f"machine: {common.machine_description()}")
        if args.generate_only:
            for layout, ns in cases:
                common.ensure_inputs(layout, max(ns), args.data_dir, args.layouts, log=log)
            return 0
        runner = args.runner
        if runner == "auto":
            runner = "cli" if cli_available() else "api"
        log(f"runner: {runner}" + ("" if runner == "cli" else " (merger_core.merge_to_file in a python -c subprocess)"))
        rows: List[Dict[str, object]] = []
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        for layout, ns in cases:
            generated: List[str] = []
            try:
                inputs = common.ensure_inputs(layout, max(ns), args.data_dir, args.layouts, log=log, generated=generated)
                for n in ns:
                    for mode in args.modes:
                        runners = [runner]
                        if args.naive and n in args.naive_n:
                            need = n * os.path.getsize(inputs[0]) * 1.6
                            if need < 0.8 * mem_total:
                                runners.append("naive")
                            else:
                                log(f"(naive baseline skipped for {layout} N={n}: needs ~{need / GiB:.0f} GiB of RAM)")
                        for rn in runners:
                            for hashes in (args.hashes if rn != "naive" else ["off"]):
                              for k in (args.threads if rn != "naive" else [0]):
                                prof = f"{args.pyspy}_{layout}_{n}_{mode}_{hashes}_k{k}.txt" if (args.pyspy and rn != "naive") else None
                                row = measure_one(layout, n, mode, rn, inputs[:n], args.data_dir, log, prof, args.repeat,
                                                  args.wait_idle, out_dir=args.out_dir, hashes=hashes, threads=k,
                                                  method=args.method if rn != "naive" else "weighted_sum")
                                row["target"] = verdict(row) if n == 4 and args.method == "weighted_sum" else ""
                                rows.append(row)
                                log(common.format_table([row], COLUMNS).splitlines()[-1])
            finally:
                if args.keep_inputs is not None:
                    for p in generated:
                        idx = int(os.path.basename(p).rsplit("_", 1)[1].split(".")[0])
                        if idx >= args.keep_inputs and os.path.exists(p):
                            os.unlink(p)
                            log(f"deleted {p} (--keep-inputs {args.keep_inputs})")
        log("")
        log(common.format_table(rows, COLUMNS))
        for line in flatness(rows):
            log(line)
        for line in scaling(rows):
            log(line)
        return 0
    finally:
        if lock:
            lock.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: what checking every merged chunk for values that do not fit costs (issue 12 item 6).

The merge checks each chunk before it is narrowed to the output dtype: one sum for fp32 outputs, a min and a max for
narrower ones (`merger_core/merge/runner.py` `_Runner.guard`). This script merges N full-size inputs (default 4 x
SD1.5, warm, output to /dev/shm) through `merge_to_file` in a subprocess, once as shipped and once with the check
replaced by a pass-through, alternating, best of ``--repeat``; it prints wall and CPU time of both and the
difference. The two outputs must have the same bytes (the inputs are finite): the script checks it.

    .venv/bin/python bench/nonfinite_bench.py --layout sd15 --n 4 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PY = sys.executable

SCRIPT = r"""
import os, sys
from merger_core.merge import MergeInput, MergePlan, merge_to_file
from merger_core.merge import runner
if os.environ.get("MM_BENCH_GUARD") == "off":
    runner._Runner.guard = lambda self, job, values, start, views: values
out, dtype = sys.argv[-1], os.environ.get("MM_BENCH_DTYPE", "fp16")
plan = MergePlan([MergeInput(p, 1.0) for p in sys.argv[1:-1]], method="weighted_sum", dtype=dtype, device="cpu")
merge_to_file(plan, out, overwrite=True, input_hashes=False)
"""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="sd15", choices=sorted(common.LAYOUT_FILES))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--layouts", default=common.DEFAULT_LAYOUTS)
    ap.add_argument("--out-dir", default="/dev/shm")
    ap.add_argument("--wait-idle", type=float, default=30)
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    lock = None if args.no_lock else common.BenchLock()
    if lock:
        lock.__enter__()
    try:
        print(f"machine: {common.machine_description()}")
        inputs = common.ensure_inputs(args.layout, args.n, args.data_dir, args.layouts)[: args.n]
        rows: List[Dict[str, object]] = []
        for dtype in args.dtype:
            best: Dict[str, common.Measured] = {}
            digests: Dict[str, str] = {}
            for _ in range(args.repeat):
                for guard in ("on", "off"):
                    common.read_all(inputs)
                    if args.wait_idle:
                        common.wait_for_quiet(timeout=args.wait_idle)
                    with tempfile.TemporaryDirectory(dir=args.out_dir) as d:
                        out = os.path.join(d, "out.safetensors")
                        env = dict(os.environ, MM_BENCH_GUARD=guard, MM_BENCH_DTYPE=dtype)
                        m = common.run_measured([PY, "-c", SCRIPT, *inputs, out], cwd=common.REPO, env=env)
                        if m.returncode != 0:
                            raise SystemExit(f"merge failed: {m.stderr[-2000:]}")
                        digests[guard] = sha256(out)
                    if guard not in best or m.wall_s < best[guard].wall_s:
                        best[guard] = m
            same = digests["on"] == digests["off"]
            on, off = best["on"], best["off"]
            rows.append({
                "layout": args.layout, "N": args.n, "dtype": dtype, "runs": args.repeat,
                "check on s": f"{on.wall_s:.2f}", "check off s": f"{off.wall_s:.2f}",
                "wall cost": f"{(on.wall_s - off.wall_s) / off.wall_s * 100:+.1f}%",
                "CPU on s": f"{on.cpu_s:.1f}", "CPU off s": f"{off.cpu_s:.1f}",
                "CPU cost s": f"{on.cpu_s - off.cpu_s:+.1f}",
                "same bytes": "yes" if same else "NO",
            })
        print(common.format_table(rows, list(rows[0])))
        return 0
    finally:
        if lock:
            lock.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the weighted sum's arithmetic on one core, from the cache and from files in the page cache.

    python bench/step_bench.py [--data-dir /work/bench-data] [--n 4]

The engine's linear step for one 64 Ki-element slice of N fp16 inputs is: widen the lead input into an fp32
accumulator, widen each other input into a scratch buffer and add it, scale, check the range (``aminmax``), narrow
to fp16. This script times those same torch ops, on one thread, four ways:

1. ``L2``: the same slice of every input again and again (all data in the core's cache): the arithmetic alone.
2. ``mmap fresh``: the whole files through a new read-only memory map (every page faulted in by this thread).
3. ``mmap populated``: the same map a second time (page tables already filled).
4. ``pread``: each slice read with ``pread`` into a per-input buffer, then the step.

The inputs are the SD1.5 files of ``merge_bench.py`` (generated when missing) and are read once before timing, so
they come from the page cache. It prints G input values per second and the user and system CPU of each way: the
gap between 1 and 2-4 is what reaching memory costs, the gap between those and the engine's own rate (merge_bench)
is the engine's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEP = 1 << 16
SKIP = 1 << 20  # past the header


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with (common.BenchLock() if not args.no_lock else contextlib.nullcontext()):
        paths = common.ensure_inputs("sd15", args.n, args.data_dir)
        common.read_all(paths)
        count = (min(os.path.getsize(p) for p in paths) - SKIP) // 2 // STEP * STEP
        acc, tmp = torch.empty(STEP), torch.empty(STEP)
        out = torch.empty(STEP, dtype=torch.float16)

        def step(xs):
            acc.copy_(xs[0])
            for x in xs[1:]:
                tmp.copy_(x)
                acc.add_(tmp, alpha=1.0)
            acc.mul_(1.0 / len(xs))
            torch.aminmax(acc)
            out.copy_(acc)

        rows = []

        def measure(name, body, values):
            c0, t0 = os.times(), time.perf_counter()
            body()
            wall = time.perf_counter() - t0
            c1 = os.times()
            rows.append({"way": name, "G values": f"{values / 1e9:.2f}", "wall s": f"{wall:.2f}",
                         "user s": f"{c1.user - c0.user:.2f}", "sys s": f"{c1.system - c0.system:.2f}",
                         "G values/s": f"{values / wall / 1e9:.2f}"})

        hot = [torch.randn(STEP).half() for _ in paths]
        reps = 20000
        measure("L2 (one slice, again and again)", lambda: [step(hot) for _ in range(reps)], reps * STEP * len(paths))

        files = [open(p, "rb") for p in paths]
        maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in files]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffers: nothing writes into them here
            views = [torch.frombuffer(m, dtype=torch.float16, count=count, offset=SKIP) for m in maps]

        def over_map():
            for s in range(0, count, STEP):
                step([v[s : s + STEP] for v in views])

        measure("mmap fresh", over_map, count * len(paths))
        measure("mmap populated", over_map, count * len(paths))
        views.clear()  # the maps can close only once no tensor holds them
        bufs = [torch.empty(STEP, dtype=torch.float16) for _ in paths]
        mvs = [memoryview(b.numpy()).cast("B") for b in bufs]
        fds = [f.fileno() for f in files]

        def over_pread():
            for s in range(0, count, STEP):
                for fd, mv in zip(fds, mvs):
                    os.preadv(fd, [mv], SKIP + 2 * s)
                step(bufs)

        measure("pread per step", over_pread, count * len(paths))
        for m in maps:
            m.close()
        for f in files:
            f.close()
    print(common.machine_description())
    print(f"{len(paths)} x SD1.5 fp16 inputs, weighted-sum step of {STEP} elements, one thread")
    print(common.format_table(rows, ["way", "G values", "wall s", "user s", "sys s", "G values/s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

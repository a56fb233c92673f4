"""Benchmark: where a merge's CPU time goes, thread by thread, inside one process.

    python bench/thread_cpu_bench.py [--method weighted_sum|ties|dare|train_difference|slerp] [--n N]
                                     [--threads 1 2] [--repeat 2]
                                     [--out-dir /dev/shm]

Runs ``merge_to_file`` on the SD1.5 inputs of ``merge_bench.py`` (generated when missing; read once first, so they
come from the page cache) with no input hashes, and samples ``/proc/self/task/*/stat`` every 50 ms: the user and
system CPU of every thread, named by its Python thread name (the main thread runs the key loop, and at K = 1 the
merge itself; ``model-merger-slices``/``-merge`` are the workers; ``-hash`` is the output's SHA-256, ``-writer`` the
copy into the output file, ``-readahead`` the read-ahead). Also the time inside the method's ``merge_tensor``
(tensor methods), by key size. Prints one table per run.
"""

from __future__ import annotations

import argparse
import contextlib
import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PARAMS = {"weighted_sum": {}, "ties": {"density": 0.2}, "dare": {"drop": 0.5}, "train_difference": {"alpha": 1.0},
          "slerp": {"t": 0.5}}


class ThreadSampler:
    """Per-thread user and system CPU seconds of this process, sampled until :meth:`stop`."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.cpu = {}  # native thread id -> (user s, sys s), the last sample
        self.names = {}  # native thread id -> Python thread name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self):
        for t in threading.enumerate():
            if t.native_id is not None:
                self.names[t.native_id] = t.name
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            self.cpu[int(tid)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._sample()
        self.start = dict(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_name(self):
        """{thread name without its index: [user s, sys s]} over the run (the sampler itself left out)."""
        out = collections.defaultdict(lambda: [0.0, 0.0])
        for tid, (u, s) in self.cpu.items():
            u0, s0 = self.start.get(tid, (0.0, 0.0))
            name = self.names.get(tid, f"thread {tid}")
            if name == "bench-sampler":
                continue
            base = name.rstrip("0123456789").rstrip("_")
            out[base][0] += u - u0
            out[base][1] += s - s0
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="weighted_sum", choices=sorted(PARAMS))
    ap.add_argument("--n", type=int, default=None, help="inputs (default 4; TIES, DARE, train difference 3; SLERP 2)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--out-dir", default="/dev/shm")
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    n = args.n or {"weighted_sum": 4, "slerp": 2}.get(args.method, 3)

    from merger_core.merge import MergeInput, MergePlan, merge_to_file
    from merger_core.methods import get_method

    method = get_method(args.method)
    spent = collections.defaultdict(lambda: [0, 0.0])
    if method.kind == "tensor":
        real = type(method).merge_tensor

        def timed(self, tensors, *a, **kw):
            size = tensors[0].numel()
            band = "keys < 2^18" if size < 1 << 18 else "keys < 2^19" if size < 1 << 19 else "keys >= 2^19"
            t0 = time.perf_counter()
            try:
                return real(self, tensors, *a, **kw)
            finally:
                spent[band][0] += 1
                spent[band][1] += time.perf_counter() - t0

        type(method).merge_tensor = timed

    with (common.BenchLock() if not args.no_lock else contextlib.nullcontext()):
        paths = common.ensure_inputs("sd15", n, args.data_dir)
        common.read_all(paths)
        params = PARAMS[args.method]
        out = os.path.join(args.out_dir, "thread_cpu_bench.safetensors")
        print(common.machine_description())
        for k in args.threads:
            for r in range(args.repeat):
                spent.clear()
                plan = MergePlan([MergeInput(p, 1.0) for p in paths], method=args.method, params=params, threads=k,
                                 seed=1)
                common.wait_for_quiet()
                t0, c0 = time.perf_counter(), os.times()
                with ThreadSampler() as sampler:
                    merge_to_file(plan, out, overwrite=True, input_hashes=False)
                wall, c1 = time.perf_counter() - t0, os.times()
                os.unlink(out)
                print(f"\n{n} x SD1.5 {args.method}, K = {k}, run {r + 1}: wall {wall:.2f} s, user {c1.user - c0.user:.2f} s,"
                      f" sys {c1.system - c0.system:.2f} s")
                rows = [{"thread": name, "user s": f"{u:.2f}", "sys s": f"{s:.2f}"}
                        for name, (u, s) in sorted(sampler.by_name().items(), key=lambda x: -sum(x[1])) if u + s >= 0.05]
                print(common.format_table(rows, ["thread", "user s", "sys s"]))
                if spent:
                    print(common.format_table([{"merge_tensor": b, "keys": c, "s": f"{t:.2f}"} for b, (c, t) in sorted(spent.items())],
                                              ["merge_tensor", "keys", "s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

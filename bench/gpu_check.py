"""The device check: merges on ``cuda`` against the same merges on ``cpu``, in one go (at most ~5 minutes on a CUDA
box with 16 cores; ``--budget`` seconds, default 280, after which the remaining cases are skipped and named).

    python bench/gpu_check.py [--data-dir /dev/shm/mm-gpu] [--budget 280] [--quick] [--cpu-only]

What it does, most important first (so a short budget still checks the essentials):

1. ``cuda:1`` on a one-GPU machine must be a clear error listing the devices.
2. Generates full-size fp16 inputs (bench/common.py): SD1.5 layout (up to 8) and SDXL layout (4) from
   ``../shared/layouts`` (without that folder SD1.5 comes from the packaged key list and SDXL is skipped), under
   ``--data-dir`` (a tmpfs by default, so the disk is not what is measured).
3. Merges 4 and 8 SD1.5 models and 4 SDXL models with weighted sum, TIES and DARE on ``cuda`` and on ``cpu`` (every
   core), compares each pair of outputs tensor by tensor: the same bytes, or the largest difference in fp16 ulps and
   how many tensors differ (say which), and prints wall time, GB/s of input read and peak VRAM
   (``torch.cuda.max_memory_allocated``) for each.
4. Prints the memory floor of the SD1.5 N=4 inputs (read from the page cache + an output-sized write to the data
   dir) measured in the same run, and the CPU scaling table: weighted sum (N=4) and TIES (base + 2) at
   K = 1, 2, 4, 8, 16 merge workers (``MergePlan.threads``), with the output's SHA-256 (the same for every K).

Nothing here is a test (the CUDA tests are in tests/test_device_pipeline.py and run with ``pytest`` wherever CUDA
exists); the tables go into docs/performance.md with the date and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository on sys.path)

from merger_core.errors import DeviceError  # noqa: E402
from merger_core.merge import MergeInput, MergePlan, merge_to_file  # noqa: E402
from merger_core.merge.device import available_devices, resolve_device  # noqa: E402


def _plan(paths: List[str], method: str, device: str, threads: int = 0) -> MergePlan:
    params = {"ties": {"density": 0.2}, "dare": {"drop": 0.5}}.get(method, {})
    return MergePlan([MergeInput(p, 1.0) for p in paths], method=method, params=params, device=device, seed=1,
                     threads=threads)


def _merge(paths, method, device, out, threads: int = 0) -> Dict[str, object]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    res = merge_to_file(_plan(paths, method, device, threads), out, overwrite=True, input_hashes=False)
    wall = time.monotonic() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    gb_in = sum(os.path.getsize(p) for p in paths) / 1e9
    return {"wall s": f"{wall:.1f}", "GB/s in": f"{gb_in / wall:.2f}",
            "peak VRAM GiB": "" if peak is None else f"{peak / 2**30:.2f}", "_sha": res.tensor_sha256}


def _compare(a: str, b: str) -> str:
    """'same bytes', or the largest difference in ulps of the output dtype, and how many tensors differ."""
    import torch
    from safetensors import safe_open

    worst, differ, total = 0, 0, 0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            total += 1
            if torch.equal(x.view(torch.uint8) if x.dtype == torch.bool else x, y):
                continue
            differ += 1
            if x.dtype in (torch.float16, torch.bfloat16):
                ix, iy = x.view(torch.int16).to(torch.int32), y.view(torch.int16).to(torch.int32)
                # ulp distance of same-signed values; a sign change counts as the distance through zero
                sx = torch.where(ix < 0, -(ix & 0x7FFF), ix)
                sy = torch.where(iy < 0, -(iy & 0x7FFF), iy)
                worst = max(worst, int((sx - sy).abs().max()))
            else:
                worst = max(worst, 10 ** 9)
    if not differ:
        return "same bytes"
    return f"{differ}/{total} tensors differ, at most {worst} ulp"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="/dev/shm/model-merger-gpu-check")
    ap.add_argument("--layouts", default=common.DEFAULT_LAYOUTS)
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; cases not started by then are skipped")
    ap.add_argument("--quick", action="store_true", help="TIES and DARE on SD1.5 N=4 only; scaling K = 1, 4, 16")
    ap.add_argument("--cpu-only", action="store_true", help="no CUDA rows (a dry run on a machine without a GPU)")
    args = ap.parse_args(argv)
    import torch

    start = time.monotonic()
    skipped: List[str] = []

    def time_left(what: str) -> bool:
        if time.monotonic() - start < args.budget:
            return True
        skipped.append(what)
        return False

    log = print
    log(f"=== gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {common.machine_description()}")
    log(f"torch {torch.__version__}; devices here: {', '.join(available_devices())}")
    have_cuda = torch.cuda.is_available() and not args.cpu_only
    if not have_cuda and not args.cpu_only:
        log("no CUDA device: nothing to check here (use --cpu-only for a dry run)")
        return 1
    if have_cuda:
        log(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    out_dir = os.path.join(args.data_dir, "out")
    os.makedirs(out_dir, exist_ok=True)

    # 1. cuda:N beyond the devices
    if have_cuda:
        bad = f"cuda:{torch.cuda.device_count()}"
        try:
            resolve_device(bad)
            log(f"!! {bad} was accepted with {torch.cuda.device_count()} GPU(s)")
        except DeviceError as exc:
            log(f"{bad} refused as it should be: {exc}")

    # 2-3. CUDA against CPU
    layouts_ok = os.path.isdir(args.layouts)
    full = ["weighted_sum", "ties", "dare"]
    cases = [("sd15", 4, full), ("sd15", 8, ["weighted_sum"] if args.quick else full)]
    if layouts_ok:
        cases.append(("sdxl", 4, ["weighted_sum"] if args.quick else full))
    else:
        log(f"(no layouts at {args.layouts}: SDXL skipped)")
    rows = []
    devices = (["cuda"] if have_cuda else []) + ["cpu"]
    for layout, n, methods in cases:
        if not time_left(f"{layout} N={n}"):
            continue
        paths = common.ensure_inputs(layout, n, args.data_dir, args.layouts, log=log)
        for method in methods:
            if not time_left(f"{layout} N={n} {method}"):
                continue
            outs = {}
            for dev in devices:
                out = os.path.join(out_dir, f"{layout}_{n}_{method}_{dev}.safetensors")
                r = _merge(paths, method, dev, out)
                outs[dev] = out
                rows.append({"layout": layout, "N": n, "method": method, "device": dev, **r, "vs cpu": ""})
            if "cuda" in outs:
                rows[-2]["vs cpu"] = _compare(outs["cuda"], outs["cpu"])
            for o in outs.values():
                os.unlink(o)
    cols = ["layout", "N", "method", "device", "wall s", "GB/s in", "peak VRAM GiB", "vs cpu"]
    log("\n" + common.format_table(rows, cols))

    # 4. the memory floor and the CPU scaling over merge workers
    paths4 = common.ensure_inputs("sd15", 4, args.data_dir, args.layouts, log=log)
    common.read_all(paths4)  # into the page cache
    floor = common.io_floor(paths4, os.path.getsize(paths4[0]), os.path.join(out_dir, "floor.bin"))
    log(f"memory floor, 4 x SD1.5: read {floor.read_s:.2f} s + write {floor.write_s:.2f} s = {floor.total_s:.2f} s")
    scale = []
    cpus = os.cpu_count() or 1
    for method, paths in (("weighted_sum", paths4), ("ties", paths4[:3])):
        base_wall = None
        for k in ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16]):
            if k > cpus or not time_left(f"scaling {method} K={k}"):
                continue
            r = _merge(paths, method, "cpu", os.path.join(out_dir, "scale.safetensors"), threads=k)
            wall = float(r["wall s"])
            base_wall = base_wall or wall
            scale.append({"method": method, "K": k, "wall s": r["wall s"], "speed-up": f"{base_wall / wall:.2f}x",
                          "vs memory floor": f"{wall / floor.total_s:.2f}x" if method == "weighted_sum" else "",
                          "sha256": r["_sha"][:16]})
    if os.path.exists(os.path.join(out_dir, "scale.safetensors")):
        os.unlink(os.path.join(out_dir, "scale.safetensors"))
    log("\n" + common.format_table(scale, ["method", "K", "wall s", "speed-up", "vs memory floor", "sha256"]))
    for method in ("weighted_sum", "ties"):
        shas = {s["sha256"] for s in scale if s["method"] == method}
        if shas:
            log(f"{method} output identical for every K: {'yes' if len(shas) == 1 else 'NO'}")
    if skipped:
        log(f"skipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}")
    log(f"gpu_check took {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

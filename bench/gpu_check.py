"""The device check: merges on ``cuda`` against the same merges on ``cpu``, in one go (a few minutes on a CUDA box).

    python bench/gpu_check.py [--data-dir /dev/shm/mm-gpu] [--quick] [--cpu-only]

What it does:

1. Generates full-size fp16 inputs (bench/common.py): 8 x SD1.5 layout and 4 x SDXL layout (from
   ``../shared/layouts``; without that folder, SD1.5 comes from the packaged key list and SDXL is skipped).
2. Merges 4 and 8 SD1.5 models and 4 SDXL models with weighted sum, TIES and DARE (TIES and DARE on SD1.5 N=4
   only with ``--quick``) on ``cuda`` and on ``cpu``, and compares each pair of outputs tensor by tensor: the same
   bytes, or the largest difference in fp16 ulps (say which).
3. Prints wall time, GB/s of input read and peak VRAM (``torch.cuda.max_memory_allocated``) per merge, and checks
   that ``cuda:1`` on a one-GPU machine is a clear error listing the devices.
4. Prints the CPU scaling table for TIES over ``MODEL_MERGER_THREADS`` = 1, 2, 4, 8, 16 (the slice threads that
   exist today; weighted sum runs on one merging thread, see issue 10).

Nothing here is a test; the table goes into docs/performance.md with the date and the machine.
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


def _plan(paths: List[str], method: str, device: str) -> MergePlan:
    params = {"ties": {"density": 0.2}, "dare": {"drop": 0.5}}.get(method, {})
    return MergePlan([MergeInput(p, 1.0) for p in paths], method=method, params=params, device=device, seed=1)


def _merge(paths, method, device, out) -> Dict[str, object]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    res = merge_to_file(_plan(paths, method, device), out, overwrite=True)
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
    ap.add_argument("--quick", action="store_true", help="TIES and DARE on SD1.5 N=4 only; scaling K = 1, 4, 16")
    ap.add_argument("--cpu-only", action="store_true", help="no CUDA rows (a dry run on a machine without a GPU)")
    args = ap.parse_args(argv)
    import torch

    log = print
    log(f"=== gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {common.machine_description()}")
    log(f"torch {torch.__version__}; devices here: {', '.join(available_devices())}")
    have_cuda = torch.cuda.is_available() and not args.cpu_only
    if not have_cuda and not args.cpu_only:
        log("no CUDA device: nothing to check here (use --cpu-only for a dry run)")
        return 1
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out_dir = os.path.join(args.data_dir, "out")
    os.makedirs(out_dir, exist_ok=True)

    # 3. cuda:1 on a one-GPU machine
    if have_cuda and torch.cuda.device_count() == 1:
        try:
            resolve_device("cuda:1")
            log("!! cuda:1 was accepted on a one-GPU machine")
        except DeviceError as exc:
            log(f"cuda:1 refused as it should be: {exc}")

    layouts_ok = os.path.isdir(args.layouts)
    cases = [("sd15", 4, ["weighted_sum", "ties", "dare"]), ("sd15", 8, ["weighted_sum"] if args.quick else ["weighted_sum", "ties", "dare"])]
    if layouts_ok:
        cases.append(("sdxl", 4, ["weighted_sum"] if args.quick else ["weighted_sum", "ties", "dare"]))
    else:
        log(f"(no layouts at {args.layouts}: SDXL skipped)")
    rows = []
    devices = (["cuda"] if have_cuda else []) + ["cpu"]
    for layout, n, methods in cases:
        paths = common.ensure_inputs(layout, n, args.data_dir, args.layouts, log=log)
        for method in methods:
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

    # 4. CPU scaling of the slice threads (TIES, SD1.5 base + 2)
    paths = common.ensure_inputs("sd15", 3, args.data_dir, args.layouts, log=log)
    scale = []
    base_wall = None
    for k in ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16]):
        if k > (os.cpu_count() or 1):
            continue
        os.environ["MODEL_MERGER_THREADS"] = str(k)
        r = _merge(paths, "ties", "cpu", os.path.join(out_dir, "scale.safetensors"))
        wall = float(r["wall s"])
        base_wall = base_wall or wall
        scale.append({"K": k, "TIES wall s": r["wall s"], "speed-up": f"{base_wall / wall:.2f}x", "sha256": r["_sha"][:16]})
    os.unlink(os.path.join(out_dir, "scale.safetensors"))
    log("\n" + common.format_table(scale, ["K", "TIES wall s", "speed-up", "sha256"]))
    same = len({s["sha256"] for s in scale}) == 1
    log(f"TIES output identical for every K: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

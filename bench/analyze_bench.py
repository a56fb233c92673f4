"""Benchmark Analyze Structure: detection over 100 full-size headers, and lineage ranking of one SDXL model
against three SDXL bases (plus a full diff of the model against its base, for scale).

    flock /tmp/bench.lock .venv/bin/python bench/analyze_bench.py [--data-dir /work/bench-data] [--skip-lineage]

Analyze inputs: 100 sparse full-size files (real headers, zero data that takes no disk) built from every
reference layout in ../shared/layouts (when present) and from the compact fingerprints, with variants (inpaint,
UNet-only, fp32, fp8), in <data-dir>/analyze_headers/.

Lineage inputs: three SDXL-layout fp16 checkpoints with random values (the merge benchmark's
``sdxl_0..2.safetensors``, generated here with the same code if absent) and a "fine-tune",
``analyze_sdxl_finetune.safetensors`` = ``sdxl_1`` + a small random delta, written full size.

Cold runs first evict the files from the page cache with POSIX_FADV_DONTNEED (no root needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from merger_core.arch import check_compatibility, detect, diff_models, rank_bases
from merger_core.report.images import detection_image
from synth import layout_from_fingerprint, layout_from_json, write_sparse
from merger_core.arch.fingerprints import load_fingerprints

UNET = "model.diffusion_model."


def build_headers(folder: str, n: int = 100):
    os.makedirs(folder, exist_ok=True)
    specs = []
    if os.path.isdir(C.DEFAULT_LAYOUTS):
        for f in sorted(os.listdir(C.DEFAULT_LAYOUTS)):
            if f.endswith(".json"):
                with open(os.path.join(C.DEFAULT_LAYOUTS, f)) as fh:
                    specs.append((f[:-5], layout_from_json(json.load(fh))))
    for arch in load_fingerprints():
        specs.append((f"fp_{arch}", layout_from_fingerprint(arch)))
    base = [s for s in specs]
    variants = []
    for name, spec in base:
        if UNET + "input_blocks.0.0.weight" in spec:
            v = dict(spec)
            d, s = v[UNET + "input_blocks.0.0.weight"]
            v[UNET + "input_blocks.0.0.weight"] = (d, (s[0], 9) + tuple(s[2:]))
            variants.append((name + "_inpaint", v))
        if any(k.startswith(UNET) for k in spec) and not all(k.startswith(UNET) for k in spec):
            variants.append((name + "_unet", {k: v for k, v in spec.items() if k.startswith(UNET)}))
        variants.append((name + "_fp32", {k: ("F32" if d in ("F16", "BF16") else d, s) for k, (d, s) in spec.items()}))
        variants.append((name + "_fp8", {k: ("F8_E4M3" if d in ("F16", "BF16") and k.startswith(UNET) else d, s) for k, (d, s) in spec.items()}))
    pool = base + variants
    paths = []
    for i in range(n):
        name, spec = pool[i % len(pool)]
        p = os.path.join(folder, f"{i:03d}_{name}.safetensors")
        if not os.path.exists(p):
            write_sparse(p, spec)
        paths.append(p)
    return paths


def bench_analyze(paths):
    rows = []
    total_bytes = sum(os.path.getsize(p) for p in paths)
    for mode in ("cold", "warm"):
        if mode == "cold":
            C.evict(paths)
        t0 = time.perf_counter()
        dets = [detect(p) for p in paths]
        t = time.perf_counter() - t0
        known = sum(d.known for d in dets)
        rows.append({"what": f"detect() x {len(paths)} full-size headers", "mode": mode, "seconds": f"{t:.2f}",
                     "per file ms": f"{1000 * t / len(paths):.1f}", "notes": f"{total_bytes / 2**30:.0f} GiB of files; {known} recognised"})
    # the CLI, including interpreter start-up
    folder = os.path.dirname(paths[0])
    C.evict(paths)
    m = C.run_measured([sys.executable, "-m", "merger_core", "analyze", folder, "--brief"], cwd=C.REPO)
    rows.append({"what": f"model-merger analyze DIR --brief ({len(paths)} files)", "mode": "cold",
                 "seconds": f"{m.wall_s:.2f}", "per file ms": f"{1000 * m.wall_s / len(paths):.1f}",
                 "notes": f"whole command incl. Python start; rc {m.returncode}; peak private {m.peak_anon / 2**20:.0f} MiB"})
    two = [p for p in paths if os.path.basename(p).endswith("_sdxl_base.safetensors")][:2]
    if len(two) == 2:
        t0 = time.perf_counter()
        rep = check_compatibility(two)
        rows.append({"what": "check_compatibility(2 x SDXL)", "mode": "warm", "seconds": f"{time.perf_counter() - t0:.3f}",
                     "per file ms": "", "notes": f"verdict {rep.verdict}"})
        d = detect(two[0])
        t0 = time.perf_counter()
        for _ in range(10):
            detection_image(d)
        rows.append({"what": "detection_image() (PIL)", "mode": "warm", "seconds": f"{(time.perf_counter() - t0) / 10:.3f}",
                     "per file ms": "", "notes": "one picture"})
    return rows


def make_finetune(base_path: str, out_path: str, scale: float = 0.1):
    """base + scale * (another random tile) for every fp16 tensor, written with the engine's writer."""
    import numpy as np
    from safetensors import safe_open

    from merger_core.io.writer import OutTensor, StreamingWriter
    from merger_core.io.safetensors import read_header

    h = read_header(base_path)
    if os.path.exists(out_path) and os.path.getsize(out_path) == h.file_size:
        return False
    outs = [OutTensor(k, t.dtype, t.shape) for k, t in h.tensors.items()]
    with safe_open(base_path, framework="numpy") as f, StreamingWriter(out_path, outs, {"bench.note": "sdxl_1 + delta"}, overwrite=True) as w:
        for name in w.names:
            t = h.tensors[name]
            x = f.get_tensor(name)
            if t.dtype == "F16":
                lt = C.LayoutTensor(name, t.dtype, t.shape)
                delta = np.concatenate([np.frombuffer(c, dtype=np.float16) for c in C._tensor_chunks(lt, 9)]).reshape(x.shape)
                x = (x.astype(np.float32) + scale * delta.astype(np.float32)).astype(np.float16)
            w.write_raw(memoryview(np.ascontiguousarray(x)).cast("B"))
    return True


def bench_lineage(data_dir: str, log):
    bases = C.ensure_inputs("sdxl", 3, data_dir=data_dir, log=log)
    model = os.path.join(data_dir, "analyze_sdxl_finetune.safetensors")
    t0 = time.monotonic()
    if make_finetune(bases[1], model):
        log(f"wrote {model} in {time.monotonic() - t0:.1f} s")
    rows = []
    files = bases + [model]
    for mode in ("cold", "warm"):
        if mode == "cold":
            C.evict(files)
        t0 = time.perf_counter()
        ranking = rank_bases(model, bases)
        t = time.perf_counter() - t0
        order = ", ".join(f"{os.path.basename(b)} {s:.3f}" for b, s, _ in ranking)
        ok = os.path.basename(ranking[0][0]) == os.path.basename(bases[1])
        rows.append({"what": "rank_bases(SDXL model, 3 SDXL bases), 48 tensors x 64K values", "mode": mode,
                     "seconds": f"{t:.2f}", "per file ms": f"{1000 * t / 4:.0f}",
                     "notes": f"{'true base first' if ok else 'WRONG ORDER'}: {order}"})
    C.evict(files)
    t0 = time.perf_counter()
    rep = diff_models(bases[1], model)
    t = time.perf_counter() - t0
    gb = 2 * os.path.getsize(model) / 1e9
    rows.append({"what": "diff_models(sdxl_1, fine-tune), full read", "mode": "cold", "seconds": f"{t:.1f}",
                 "per file ms": "", "notes": f"{gb:.1f} GB read, {gb / t:.2f} GB/s; total rel L2 {rep.total.rel_l2:.4f}"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=C.DEFAULT_DATA_DIR)
    ap.add_argument("--skip-lineage", action="store_true")
    ap.add_argument("--results", default=None, help="append the table to this file")
    args = ap.parse_args(argv)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    with C.BenchLock():
        log(f"=== analyze_bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        log(f"machine: {C.machine_description()}")
        paths = build_headers(os.path.join(args.data_dir, "analyze_headers"))
        rows = bench_analyze(paths)
        if not args.skip_lineage:
            rows += bench_lineage(args.data_dir, log)
    table = C.format_table(rows, ["what", "mode", "seconds", "per file ms", "notes"])
    log(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

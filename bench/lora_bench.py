#!/usr/bin/env python3
"""Benchmark: baking LoRAs into a merge, and extracting a LoRA, against kohya's sd-scripts.

Two parts (issue 14, Checks, "Memory" and "Time"):

* **bake**: a 2-model SD1.5 weighted merge (``sd15_0``/``sd15_1``, full-size 2.1 GB fp16 layouts) with 0, 1, 4 and
  8 baked LoRAs, through ``model-merger merge MANIFEST --no-input-hashes`` (the manifest has a ``loras`` list).
  The LoRAs are real kohya-format files (``lora_up``/``lora_down``/``alpha``, kohya's diffusers-style module names
  where the key map has them, ``ss_*`` metadata) of rank 32 with random factors, one module for every linear and
  conv weight of the diffusion model and for every attention/MLP weight of the text encoder (LoCon-style for 3x3
  convs). Reported: wall, CPU, peak private memory, and the peak minus the 0-LoRA peak beside the size of the
  largest key's LoRA factors (target: the extra memory is at most those factors, and flat in the number of LoRAs).
* **extract**: ``model-merger extract-lora TUNED --base BASE --rank 64 -o OUT`` on two fp16 checkpoints of the SDXL
  layout (6.9 GB each; ``--layout sd15`` for a quicker run): once with TUNED differing from BASE in every key, once
  with TUNED differing only in the K largest extractable keys (memory should be flat in the number of keys), and the
  same first pair through kohya's ``networks/extract_lora_from_models.py`` (``--kohya DIR``: a checkout of
  sd-scripts under ``DIR/sd-scripts`` with its venv in ``DIR/.venv``).

Memory is the peak private memory (``RssAnon`` summed over the process tree, sampled every 20 ms, see
``common.run_measured``); memory-mapped input pages are file-backed and not counted. The whole run holds
``/tmp/bench.lock``. Inputs are generated once under ``--data-dir`` and reused; outputs go to ``--out-dir``
(default ``/dev/shm``) and are deleted after each measurement.

Example::

    .venv/bin/python bench/lora_bench.py --kohya /work/kohya            # bake on SD1.5, extract on SDXL + kohya
    .venv/bin/python bench/lora_bench.py --quick                         # smoke run: a few modules / keys
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import signal
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import GiB, MiB  # noqa: E402

PY = sys.executable
ARCH = {"sd15": "sd15", "sdxl": "sdxl_base"}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
LORA_FORMAT_VERSION = "1"  # bump when the generated LoRA files change
EXTRACT_TARGET_MIB = 500  # "a few hundred MiB" for the largest SDXL key


class Log:
    def __init__(self, results_path: Optional[str]):
        self.results_path = results_path

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.results_path:
            with open(self.results_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def mib(b: float) -> str:
    return f"{b / MiB:.0f}"


# ---------------------------------------------------------------------------------------------------------------
# LoRA modules of a layout


def lora_modules(layout: str, rank: int, limit: Optional[int] = None) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """[(kohya module name, checkpoint key, (out, in[, kh, kw]) of the module)] for every linear/conv weight that a
    kohya LoRA can patch (``merger_core.lora.keymap.kohya_modules``), sorted by name. Diffusion-model modules get
    kohya's diffusers-style name (``lora_unet_down_blocks_0_attentions_0_...``) where ComfyUI's map has one, else
    the LDM-style name. ``limit`` keeps that many modules, spread over the list (smoke runs)."""
    from merger_core.lora.keymap import Target, build_key_map, kohya_modules

    arch = ARCH[layout]
    shapes = {t.name: t.shape for t in common.load_layout(layout)}
    km = build_key_map(arch, shapes)
    out = []
    for key, mods in kohya_modules(arch, shapes).items():
        shape = shapes[key]
        if len(shape) not in (2, 4):
            continue  # norms and biases: no LoRA module
        for name, rows in mods:
            if name.startswith("lora_unet_"):
                t = Target(key)
                diffusers = [a for a, tg in km.items() if tg == t and a.startswith("lycoris_")]
                for a in sorted(diffusers):
                    cand = "lora_unet_" + a[len("lycoris_"):]
                    if km.get(cand) == t:
                        name = cand
                        break
            mshape = ((rows[1],) if rows else (shape[0],)) + tuple(shape[1:])
            out.append((name, key, mshape))
    out.sort()
    if limit is not None and limit < len(out):
        step = len(out) / limit
        out = [out[int(i * step)] for i in range(limit)]
    return out


def factor_shapes(mshape: Tuple[int, ...], rank: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(down, up) shapes of a kohya LoRA/LoCon module of ``rank`` for a module of shape ``mshape``."""
    out_f, in_f = mshape[0], mshape[1]
    r = min(rank, out_f, in_f * math.prod(mshape[2:]))
    if len(mshape) == 2:
        return (r, in_f), (out_f, r)
    return (r, in_f, *mshape[2:]), (out_f, r, 1, 1)


def largest_key_factors(modules, rank: int, elem_bytes: int = 2) -> Tuple[str, int]:
    """(key, bytes) of the checkpoint key whose LoRA factors (all its modules) are largest, at ``elem_bytes``."""
    per_key: Dict[str, int] = {}
    for _, key, mshape in modules:
        down, up = factor_shapes(mshape, rank)
        per_key[key] = per_key.get(key, 0) + (math.prod(down) + math.prod(up)) * elem_bytes
    key = max(per_key, key=per_key.get)
    return key, per_key[key]


def lora_path(data_dir: str, layout: str, rank: int, index: int, limit: Optional[int]) -> str:
    tag = f"_m{limit}" if limit else ""
    return os.path.join(data_dir, "lora_bench", f"{layout}_r{rank}{tag}_{index}.safetensors")


def lora_is_current(path: str, expect: Dict[str, str]) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return all(meta.get(k) == v for k, v in expect.items())


def ensure_loras(layout: str, rank: int, count: int, data_dir: str, limit: Optional[int], log) -> List[str]:
    """``count`` kohya LoRA files for ``layout`` (random fp16 factors, seed = index), generated once and reused."""
    import time

    import torch
    from safetensors.torch import save_file

    modules = lora_modules(layout, rank, limit)
    paths = []
    for i in range(count):
        p = lora_path(data_dir, layout, rank, i, limit)
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
                "ss_base_model_version": BASE_MODEL_VERSION[layout], "ss_v2": "False",
                "ss_network_args": "{}", "bench.modules": str(len(modules)), "bench.index": str(i),
                "bench.version": LORA_FORMAT_VERSION, "bench.note": "random factors for benchmarks only"}
        if not lora_is_current(p, {k: meta[k] for k in ("bench.modules", "bench.index", "bench.version", "ss_network_dim")}):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            t0 = time.monotonic()
            g = torch.Generator().manual_seed(1000 + i)
            tensors = {}
            for name, _, mshape in modules:
                down, up = factor_shapes(mshape, rank)
                # scale so that the delta (up @ down, alpha / rank = 1) stays small against the weights
                tensors[f"{name}.lora_down.weight"] = (torch.randn(down, generator=g) * 0.02).half()
                tensors[f"{name}.lora_up.weight"] = (torch.randn(up, generator=g) * 0.02).half()
                tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
            tmp = p + ".tmp"
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, p)
            log(f"generated {p} ({len(modules)} modules, {os.path.getsize(p) / MiB:.0f} MiB) in "
                f"{time.monotonic() - t0:.1f} s")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Extraction inputs


def extractable_keys(layout: str, conv: bool = False) -> List[Tuple[str, int]]:
    """(key, elements) of the keys extract-lora makes modules for at --rank without --conv-rank (linear weights,
    1x1 convs), largest first."""
    from merger_core.lora.keymap import kohya_modules

    shapes = {t.name: t.shape for t in common.load_layout(layout)}
    keys = []
    for key in kohya_modules(ARCH[layout], shapes):
        s = shapes[key]
        if len(s) == 2 or (len(s) == 4 and (conv or tuple(s[2:]) == (1, 1))):
            keys.append((key, math.prod(s)))
    keys.sort(key=lambda kv: (-kv[1], kv[0]))
    return keys


def ensure_partial_tuned(layout: str, k: int, data_dir: str, log) -> str:
    """``{layout}_k{K}.safetensors``: model 0's values except the K largest extractable keys, which are model 1's.
    So extract-lora against ``{layout}_0`` has K modules to factorise, the largest key among them."""
    import time

    from merger_core.io.writer import OutTensor, StreamingWriter

    tensors = common.load_layout(layout)
    differ = {key for key, _ in extractable_keys(layout)[:k]}
    p = os.path.join(data_dir, f"{layout}_k{k}.safetensors")
    meta = {"bench.layout": layout, "bench.index": f"k{k}", "bench.note": "model 0 with the K largest keys of model 1"}
    from merger_core.io.writer import build_header

    out = [OutTensor(t.name, t.dtype, t.shape) for t in tensors]
    header, _, _ = build_header(out, meta)
    size = len(header) + sum(o.nbytes for o in out)
    if os.path.isfile(p) and os.path.getsize(p) == size:
        return p
    free = shutil.disk_usage(data_dir).free
    if free < size + 2 * GiB:
        raise SystemExit(f"not enough disk for {p}: needs {size / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
    t0 = time.monotonic()
    by_name = {t.name: t for t in tensors}
    with StreamingWriter(p, out, meta, overwrite=True) as w:
        for name in w.names:
            for chunk in common._tensor_chunks(by_name[name], 1 if name in differ else 0):
                w.write_raw(chunk)
    log(f"generated {p} ({size / GiB:.2f} GiB, {k} keys differ from {layout}_0) in {time.monotonic() - t0:.1f} s")
    return p


def check_disk(path: str, need: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise SystemExit(f"not enough free space in {path} for {what}: needs {need / GiB:.1f} GiB, "
                         f"{free / GiB:.1f} GiB free")


def missing_inputs_bytes(layout: str, n: int, data_dir: str) -> int:
    tensors = common.load_layout(layout)
    need = 0
    for i in range(n):
        p = common.input_path(data_dir, layout, i)
        size = common.expected_size(tensors, layout, i)
        if not (os.path.isfile(p) and os.path.getsize(p) == size):
            need += size
    return need


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def measure(cmd: List[str], out: str, log, repeat: int, wait_idle: float, cwd: Optional[str] = None,
            env: Optional[dict] = None, label: str = "") -> Tuple[Optional[common.Measured], int, bool]:
    """Run ``cmd`` ``repeat`` times; (fastest run, largest peak, all ok). ``out`` is deleted after each run."""
    runs: List[common.Measured] = []
    ok = True
    for _ in range(repeat):
        if wait_idle:
            common.wait_for_quiet(timeout=wait_idle, log=log)
        try:
            with tempfile.TemporaryDirectory(prefix="lora-bench-home-") as home:
                e = dict(env or os.environ)
                e.setdefault("MODEL_MERGER_HOME", home)
                m = common.run_measured(cmd, cwd=cwd or common.REPO, env=e)
            good = m.returncode == 0 and os.path.isfile(out) and os.path.getsize(out) > 0
            if not good:
                log(f"!! {label} failed (exit {m.returncode}):\n{(m.stderr or m.stdout).strip()[-3000:]}")
            ok = ok and good
            runs.append(m)
        finally:
            if os.path.exists(out):
                os.unlink(out)
    best = min(runs, key=lambda m: m.wall_s) if runs else None
    return best, max((m.peak_anon for m in runs), default=0), ok


def row_times(m: common.Measured, peak: int, ok: bool) -> Dict[str, object]:
    ncpu = os.cpu_count() or 1
    return {
        "wall s": f"{m.wall_s:.1f}" if ok else "FAILED",
        "CPU s": f"{m.cpu_s:.1f}",
        "others CPU": f"{m.others_cpu_s / (m.wall_s * ncpu) * 100:.0f}%" if m.wall_s else "",
        "peak private MiB": mib(peak),
        "_peak": peak,
        "_ok": ok,
    }


BAKE_COLUMNS = ["LoRAs", "modules each", "runs", "wall s", "CPU s", "others CPU", "peak private MiB",
                "extra vs 0 MiB", "largest key's factors MiB", "target"]


def run_bake(args, log) -> List[Dict[str, object]]:
    from merger_core.manifest.model import LoraEntry, Manifest, ManifestEntry
    from merger_core.manifest.parse import save_manifest

    inputs = common.ensure_inputs("sd15", 2, args.data_dir, args.layouts, log=log)
    counts = sorted(set(args.loras))
    modules = lora_modules("sd15", args.bake_rank, args.lora_modules)
    loras = ensure_loras("sd15", args.bake_rank, max(counts), args.data_dir, args.lora_modules, log)
    big_key, big16 = largest_key_factors(modules, args.bake_rank, 2)
    big32 = big16 * 2
    log(f"bake: 2 x SD1.5 weighted sum (0.5/0.5, fp16 out, --no-input-hashes) + N kohya LoRAs of rank "
        f"{args.bake_rank}, {len(modules)} modules each; largest key's factors: {big_key} "
        f"{big16 / MiB:.2f} MiB fp16 / {big32 / MiB:.2f} MiB fp32 per LoRA")
    check_disk(args.out_dir, os.path.getsize(inputs[0]) + GiB, "the merged output")
    out = os.path.join(args.out_dir, f"lora_bench_bake_{os.getpid()}.safetensors")
    rows: List[Dict[str, object]] = []
    for n in counts:
        manifest = os.path.join(args.data_dir, f"lora_bench_bake_{n}_{os.getpid()}.json")
        try:
            save_manifest(Manifest(models=[ManifestEntry(p, 0.5) for p in inputs], dtype="fp16",
                                   loras=[LoraEntry(p, 1.0, 1.0) for p in loras[:n]]), manifest)
            cmd = [PY, "-m", "merger_core", "merge", manifest, "-o", out, "--overwrite", "--no-progress",
                   "--no-input-hashes"]
            m, peak, ok = measure(cmd, out, log, args.repeat, args.wait_idle, label=f"bake with {n} LoRAs")
        finally:
            if os.path.exists(manifest):
                os.unlink(manifest)
        for line in (m.stdout + m.stderr).splitlines():
            if "modules matched" in line or "unmatched" in line:
                log("  " + line.strip())
        row = {"LoRAs": n, "modules each": len(modules) if n else "", "runs": args.repeat, **row_times(m, peak, ok)}
        row["_n"] = n
        rows.append(row)
        log(common.format_table([row], BAKE_COLUMNS).splitlines()[-1])
    zero = next((r for r in rows if r["_n"] == 0 and r["_ok"]), None)
    for r in rows:
        if r["_n"] == 0:
            r["largest key's factors MiB"] = ""
            continue
        bound = r["_n"] * big32
        r["largest key's factors MiB"] = f"{bound / MiB:.1f} ({r['_n']} x {big32 / MiB:.2f} fp32)"
        if zero is not None and r["_ok"]:
            extra = r["_peak"] - zero["_peak"]
            r["extra vs 0 MiB"] = f"{extra / MiB:+.0f}"
            tol = args.tolerance_mib * MiB
            r["target"] = ("ok" if extra <= bound + tol else "OVER") + f" (<= factors + {args.tolerance_mib} MiB)"
    log("")
    log(common.format_table(rows, BAKE_COLUMNS))
    with_loras = [r for r in rows if r["_n"] > 0 and r["_ok"]]
    if len(with_loras) >= 2:
        peaks = [r["_peak"] for r in with_loras]
        lo, hi = min(peaks), max(peaks)
        log(f"bake memory over N = {','.join(str(r['_n']) for r in with_loras)} LoRAs: peak private "
            f"{lo / MiB:.0f}..{hi / MiB:.0f} MiB, spread {(hi - lo) / MiB:.0f} MiB "
            f"(flat in the number of LoRAs: the spread should be about (N_max - N_min) x {big32 / MiB:.2f} MiB or less)")
    return rows


EXTRACT_COLUMNS = ["layout", "tool", "keys differing", "rank", "runs", "wall s", "CPU s", "others CPU",
                   "peak private MiB", "largest key", "target"]


def kohya_command(args, base: str, tuned: str, out: str, layout: str) -> Tuple[Optional[List[str]], str, dict]:
    """(command, label, env) for kohya's extract_lora_from_models.py, or (None, reason, {})."""
    if not args.kohya:
        return None, "kohya: not run (pass --kohya DIR: DIR/sd-scripts with DIR/.venv, see bench/README.md)", {}
    root = os.path.abspath(args.kohya)
    script = os.path.join(root, "sd-scripts", "networks", "extract_lora_from_models.py")
    py = os.path.join(root, ".venv", "bin", "python")
    if not (os.path.isfile(script) and os.path.isfile(py)):
        return None, f"kohya: not run ({script} or {py} is missing)", {}
    precision = args.kohya_load_precision
    if precision == "auto":
        # kohya loads both models whole, in fp32 (SDXL: about 13.6 GB each), before it subtracts them
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need = 2 * os.path.getsize(base) * 2 * 1.1
        precision = "fp16" if need > 0.8 * mem_total else "none"
    cmd = [py, script, "--model_org", base, "--model_tuned", tuned, "--save_to", out, "--dim", str(args.rank),
           "--device", "cpu", "--save_precision", "fp16"]
    if layout == "sdxl":
        cmd.append("--sdxl")
    if precision != "none":
        cmd += ["--load_precision", precision]
    label = "kohya" + ("" if precision == "none" else f" (--load_precision {precision})")
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "sd-scripts"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    return cmd, label, env


def run_extract(args, log) -> List[Dict[str, object]]:
    layout = args.layout
    size = common.expected_size(common.load_layout(layout, args.layouts), layout, 0)
    # disk: the two inputs (when missing), the K-key tuned file (when missing), one LoRA output
    need = missing_inputs_bytes(layout, 2, args.data_dir)
    ks = [k for k in args.extract_keys if k != "all"]
    for k in ks:
        p = os.path.join(args.data_dir, f"{layout}_k{k}.safetensors")
        if not os.path.isfile(p):
            need += size
    os.makedirs(args.data_dir, exist_ok=True)
    if need:
        check_disk(args.data_dir, need + 2 * GiB, f"the {layout} extract inputs ({need / GiB:.1f} GiB to generate)")
    inputs = common.ensure_inputs(layout, 2, args.data_dir, args.layouts, log=log)
    base = inputs[0]
    cases = []
    for k in args.extract_keys:
        if k == "all":
            cases.append(("all", inputs[1]))
        else:
            cases.append((str(k), ensure_partial_tuned(layout, int(k), args.data_dir, log)))
    big_key, big_el = extractable_keys(layout)[0]
    big_label = f"{big_key.split('.', 1)[1] if big_key.startswith('model.') else big_key} ({big_el * 4 / MiB:.0f} MiB fp32)"
    log(f"extract: {layout} fp16, rank {args.rank}, no --conv-rank (3x3 convs left out, as kohya without --conv_dim); "
        f"largest extracted key: {big_key}, {big_el * 4 / MiB:.0f} MiB in fp32")
    out = os.path.join(args.out_dir, f"lora_bench_extract_{os.getpid()}.safetensors")
    check_disk(args.out_dir, GiB, "the extracted LoRA")
    rows: List[Dict[str, object]] = []
    for keys, tuned in cases:
        cmd = [PY, "-m", "merger_core", "extract-lora", tuned, "--base", base, "--rank", str(args.rank), "-o", out,
               "--overwrite", "--no-progress"]
        m, peak, ok = measure(cmd, out, log, args.repeat, args.wait_idle, label=f"extract-lora ({keys} keys)")
        row = {"layout": layout, "tool": "model-merger", "keys differing": keys, "rank": args.rank,
               "runs": args.repeat, **row_times(m, peak, ok), "largest key": big_label}
        if ok and layout == "sdxl":
            row["target"] = ("ok" if peak <= EXTRACT_TARGET_MIB * MiB else "OVER") + f" (<= {EXTRACT_TARGET_MIB} MiB)"
        rows.append(row)
        log(common.format_table([row], EXTRACT_COLUMNS).splitlines()[-1])
    # kohya on the first pair (every key differs, unless --extract-keys says otherwise)
    keys, tuned = cases[0]
    if args.quick and not args.kohya:
        log("kohya: not run (--quick without --kohya)")
    else:
        kout = os.path.join(args.out_dir, f"lora_bench_kohya_{os.getpid()}.safetensors")
        cmd, label, env = kohya_command(args, base, tuned, kout, layout)
        if cmd is None:
            log(label)
        else:
            log(f"{label}: {' '.join(cmd)}")
            m, peak, ok = measure(cmd, kout, log, args.kohya_repeat, args.wait_idle,
                                  cwd=os.path.join(os.path.abspath(args.kohya), "sd-scripts"), env=env, label=label)
            row = {"layout": layout, "tool": label, "keys differing": keys, "rank": args.rank,
                   "runs": args.kohya_repeat, **row_times(m, peak, ok), "largest key": ""}
            rows.append(row)
            log(common.format_table([row], EXTRACT_COLUMNS).splitlines()[-1])
    log("")
    log(common.format_table(rows, EXTRACT_COLUMNS))
    ours = [r for r in rows if r["tool"] == "model-merger" and r["_ok"]]
    if len(ours) >= 2:
        peaks = [r["_peak"] for r in ours]
        lo, hi = min(peaks), max(peaks)
        log(f"extract memory over keys differing = {', '.join(str(r['keys differing']) for r in ours)}: peak private "
            f"{lo / MiB:.0f}..{hi / MiB:.0f} MiB, spread {(hi - lo) / lo * 100 if lo else 0:.1f}% (flat in the number of keys)")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["bake", "extract"], choices=["bake", "extract"])
    ap.add_argument("--loras", nargs="+", type=int, default=[0, 1, 4, 8], help="numbers of LoRAs baked (bake)")
    ap.add_argument("--bake-rank", type=int, default=32, help="rank of the generated LoRAs (bake)")
    ap.add_argument("--lora-modules", type=int, default=None, metavar="M",
                    help="generate LoRAs with only M modules (spread over the model; smoke runs)")
    ap.add_argument("--tolerance-mib", type=float, default=32,
                    help="bake target: extra memory <= N x the largest key's fp32 factors + this (sampling noise)")
    ap.add_argument("--layout", default="sdxl", choices=sorted(ARCH), help="layout of the extract pair")
    ap.add_argument("--rank", type=int, default=64, help="rank extracted (model-merger --rank, kohya --dim)")
    ap.add_argument("--extract-keys", nargs="+", default=["all", "8"],
                    help="extract cases: 'all' (TUNED = {layout}_1, every key differs) and/or K (TUNED differs from "
                         "the base only in the K largest extractable keys; one more full-size file)")
    ap.add_argument("--kohya", default=None, metavar="DIR",
                    help="kohya's sd-scripts: DIR/sd-scripts (checkout) and DIR/.venv (its venv); row skipped without")
    ap.add_argument("--kohya-load-precision", default="auto", choices=["auto", "none", "fp16", "bf16"],
                    help="kohya --load_precision; auto: fp16 where two fp32 models would not fit in 80%% of RAM")
    ap.add_argument("--kohya-repeat", type=int, default=1, help="runs of kohya's script (it is slow)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: SD1.5 only, LoRAs of 12 modules, counts 0 1 2, extract of 1 key (the largest), no kohya "
                         "unless --kohya is given")
    ap.add_argument("--repeat", type=int, default=1, help="measure each case R times (fastest time, largest peak)")
    ap.add_argument("--wait-idle", type=float, default=60, metavar="S",
                    help="before each measurement wait up to S seconds for the CPUs to be <= 15%% busy (0: never)")
    ap.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    ap.add_argument("--out-dir", default="/dev/shm", help="where outputs are written (and deleted after each run)")
    ap.add_argument("--layouts", default=common.DEFAULT_LAYOUTS, help="folder of layout JSON files")
    ap.add_argument("--results", default=None, help="append the log and tables to this file")
    ap.add_argument("--generate-only", action="store_true", help="only make the inputs and LoRA files")
    ap.add_argument("--no-lock", action="store_true", help="do not take /tmp/bench.lock (you hold it already)")
    args = ap.parse_args(argv)
    if args.quick:
        args.layout = "sd15"
        if args.lora_modules is None:
            args.lora_modules = 12
        if args.loras == [0, 1, 4, 8]:
            args.loras = [0, 1, 2]
        if args.extract_keys == ["all", "8"]:
            args.extract_keys = ["1"]
    for k in args.extract_keys:
        if k != "all" and not k.isdigit():
            ap.error(f"--extract-keys: expected 'all' or a number, not {k!r}")
    log = Log(args.results)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = common.BenchLock() if not args.no_lock else None
    if lock:
        lock.__enter__()
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        log(f"\n=== lora_bench {started}: {' '.join(sys.argv[1:] if argv is None else argv)}")
        log(f"machine: {common.machine_description()}")
        if args.generate_only:
            if "bake" in args.parts:
                common.ensure_inputs("sd15", 2, args.data_dir, args.layouts, log=log)
                ensure_loras("sd15", args.bake_rank, max(args.loras), args.data_dir, args.lora_modules, log)
            if "extract" in args.parts:
                common.ensure_inputs(args.layout, 2, args.data_dir, args.layouts, log=log)
                for k in args.extract_keys:
                    if k != "all":
                        ensure_partial_tuned(args.layout, int(k), args.data_dir, log)
            return 0
        if "bake" in args.parts:
            run_bake(args, log)
        if "extract" in args.parts:
            log("")
            run_extract(args, log)
        return 0
    finally:
        if lock:
            lock.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())

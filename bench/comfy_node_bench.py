#!/usr/bin/env python3
"""The ComfyUI nodes in a real ComfyUI: peak memory of merge-to-graph, and merge-to-disk time against the CLI.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/python python bench/comfy_node_bench.py [--repeat 2]

Inputs: four full-size SD1.5-layout fp16 checkpoints (tests/comfy_fixtures.py writes them once to
MODEL_MERGER_BENCH_DATA, default /work/bench-data/comfy). One ComfyUI server (CPU) runs everything:

1. Memory (same server, page cache warm for both): the server process's peak RSS (VmHWM, reset before each
   run through /proc/PID/clear_refs) and peak anonymous RSS (RssAnon, sampled every 20 ms) while running
   (a) CheckpointLoaderSimple of one checkpoint -> 2 prompts -> KSampler (64x64, 1 step) -> VAE Decode -> Save Image,
   (b) Add Model To Manifest x4 -> Weighted Merge (graph) -> the same sampling chain.
2. Merge to disk of the four checkpoints, equal weights, fp16: the node (queue to finished, measured from outside,
   plus the engine time in the report) against `model-merger merge` run with the same Python as ComfyUI, alternating,
   --repeat times each; the table shows every run and the medians.

Runs under the shared benchmark lock (/tmp/bench.lock).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import common  # noqa: E402
import comfy_fixtures  # noqa: E402
import comfy_server as cs  # noqa: E402

NAMES = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors", "model_d.safetensors"]
GIB = 1024 ** 3


def sampling_chain(model, clip, vae, prefix):
    return {
        "s4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": clip}},
        "s5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "s6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "s7": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["s4", 0], "negative": ["s5", 0],
                                                     "latent_image": ["s6", 0], "seed": 1, "steps": 1, "cfg": 7.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "s8": {"class_type": "VAEDecode", "inputs": {"samples": ["s7", 0], "vae": vae}},
        "s9": {"class_type": "SaveImage", "inputs": {"images": ["s8", 0], "filename_prefix": prefix}},
    }


def loader_prompt():
    wf = {"l1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": NAMES[0]}}}
    wf.update(sampling_chain(["l1", 0], ["l1", 1], ["l1", 2], "bench/loader"))
    return wf


def merge_graph_prompt():
    wf = {}
    prev = None
    for i, n in enumerate(NAMES):
        inputs = {"ckpt_name": n, "weight": 1.0}
        if prev:
            inputs["manifest"] = [prev, 0]
        wf[f"m{i}"] = {"class_type": "ModelMergerAddModel", "inputs": inputs}
        prev = f"m{i}"
    wf["mw"] = {"class_type": "ModelMergerWeightedMerge", "inputs": {
        "manifest": [prev, 0], "device": "cpu", "dtype": "fp16", "output_mode": "graph", "filename_prefix": "x"}}
    wf.update(sampling_chain(["mw", 0], ["mw", 1], ["mw", 2], "bench/merge"))
    return wf


def clear_cache(server):
    """Make ComfyUI drop the previous prompt's cached outputs (a new prompt replaces them) and free models."""
    server.run({"c1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "c2": {"class_type": "PreviewImage", "inputs": {"images": ["c1", 0]}}})
    server.free()
    time.sleep(3)


def measure_prompt(server, prompt):
    pid = server.proc.pid
    before = cs.proc_status(pid)
    cs.reset_peak_rss(pid)
    sampler = common.AnonRssSampler(pid, 0.02).start()
    t0 = time.perf_counter()
    entry = server.run(prompt, timeout=3600)
    wall = time.perf_counter() - t0
    sampler.stop()
    after = cs.proc_status(pid)
    ok = entry["status"]["status_str"]
    return {"status": ok, "wall_s": wall, "rss_before": before["VmRSS"], "hwm": after["VmHWM"],
            "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file}


def node_disk_merge(server, prefix):
    wf = cs.load_api("scan_and_merge_to_disk.json", **{"2.filename_prefix": prefix})
    t0 = time.perf_counter()
    entry = server.run(wf, timeout=3600)
    wall = time.perf_counter() - t0
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"]["4"]["text"][0]
    m = re.search(r"time: ([0-9.]+) s", report)
    return wall, (float(m.group(1)) if m else None)


def cli_disk_merge(manifest, out):
    cmd = [cs.comfyui_python(), "-m", "merger_core", "merge", manifest, "-o", out, "--dtype", "fp16", "--device", "cpu",
           "--no-progress"]
    r = common.run_measured(cmd, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"CLI failed: {r.stderr[-2000:]}")
    m = re.search(r" in ([0-9.]+) s \(", r.stdout + r.stderr)
    return r.wall_s, (float(m.group(1)) if m else None)


def gib(n):
    return f"{n / GIB:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--data", default=comfy_fixtures.DEFAULT_DIR)
    args = p.parse_args(argv)
    if cs.comfyui_dir() is None:
        print("COMFYUI_DIR is not set to a ComfyUI checkout", file=sys.stderr)
        return 2
    files = comfy_fixtures.ensure_checkpoints(args.data, 4)
    links = {n: f for n, f in zip(NAMES, files)}
    links.update({f"to_merge/{n}": f for n, f in zip(NAMES, files)})
    with common.BenchLock():
        work = tempfile.mkdtemp(prefix="comfy_bench_", dir=args.data)
        base = cs.make_base(os.path.join(work, "base"), links)
        server = cs.ComfyServer(base).start()
        try:
            print(common.machine_description())
            common.read_all(files)  # warm the page cache for every run alike
            common.wait_for_quiet(log=print)
            rows = []
            a = measure_prompt(server, loader_prompt())
            rows.append({"run": "CheckpointLoaderSimple (1 model) + sample", **a})
            clear_cache(server)
            common.read_all(files)
            b = measure_prompt(server, merge_graph_prompt())
            rows.append({"run": "Weighted Merge to graph (4 models) + sample", **b})
            clear_cache(server)
            common.read_all(files)
            a2 = measure_prompt(server, loader_prompt())
            rows.append({"run": "CheckpointLoaderSimple again (after the merge)", **a2})
            print("\nMemory of the ComfyUI server process (GiB):")
            print(common.format_table([{
                "run": r["run"], "status": r["status"], "wall s": f"{r['wall_s']:.1f}",
                "RSS before": gib(r["rss_before"]), "peak RSS (VmHWM)": gib(r["hwm"]),
                "peak RssAnon": gib(r["peak_anon"]), "peak RssFile": gib(r["peak_file"]),
            } for r in rows], ["run", "status", "wall s", "RSS before", "peak RSS (VmHWM)", "peak RssAnon", "peak RssFile"]))
            la = max(a["hwm"], a2["hwm"]), max(a["peak_anon"], a2["peak_anon"])
            print(f"merge-to-graph minus loader (larger of the two loader runs): peak RSS {gib(b['hwm'] - la[0])} GiB, "
                  f"peak RssAnon {gib(b['peak_anon'] - la[1])} GiB")
            if os.environ.get("MM_BENCH_MEMORY_ONLY"):
                return 0

            # merge to disk: node vs CLI, alternating, same inputs, same output folder
            from merger_core.manifest.scan import manifest_from_scan
            from merger_core.manifest.parse import save_manifest

            manifest = os.path.join(work, "manifest.json")
            save_manifest(manifest_from_scan(files, dtype="fp16"), manifest)
            out_dir = os.path.join(base, "output", "checkpoints")
            os.makedirs(out_dir, exist_ok=True)
            timings = []
            for i in range(args.repeat):
                for kind in ("node", "cli"):
                    common.read_all(files)
                    common.wait_for_quiet(log=print)
                    if kind == "node":
                        wall, engine = node_disk_merge(server, f"checkpoints/bench_node_{i}")
                    else:
                        wall, engine = cli_disk_merge(manifest, os.path.join(out_dir, f"bench_cli_{i}.safetensors"))
                    timings.append({"run": f"{kind} #{i + 1}", "kind": kind, "wall s": wall, "engine s": engine})
                    for f in os.listdir(out_dir):  # keep the disk free for the next run
                        os.unlink(os.path.join(out_dir, f))
            print("\nMerge to disk, 4 x SD1.5 fp16 -> fp16, warm page cache:")
            print(common.format_table([{
                "run": t["run"], "wall s": f"{t['wall s']:.1f}",
                "engine s (reported)": f"{t['engine s']:.1f}" if t["engine s"] else "",
            } for t in timings], ["run", "wall s", "engine s (reported)"]))
            node = statistics.median(t["wall s"] for t in timings if t["kind"] == "node")
            cli = statistics.median(t["wall s"] for t in timings if t["kind"] == "cli")
            print(f"median wall: node {node:.1f} s, CLI {cli:.1f} s (CLI process incl. Python start), "
                  f"node/CLI = {node / cli:.2f}")
        finally:
            server.stop()
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

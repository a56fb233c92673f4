"""Weighted Merge, and the run-a-plan helper that every merging node shares (graph, disk or both)."""

from __future__ import annotations

import gc
import os
import time
from typing import List, Optional, Sequence

from ..merger_core.merge import runner as engine
from ..merger_core.merge.plan import plan_from_manifest
from ..merger_core.merge.device import available_devices
from ..merger_core.errors import ManifestError, MergeCancelled, ModelMergerError
from ..merger_core.manifest.model import DTYPES as _DTYPES
from . import _host as host
from .manifest_nodes import check_manifest_paths

OUTPUT_MODES = ["graph", "disk", "both"]
DTYPES = list(_DTYPES)
DEFAULT_PREFIX = "checkpoints/merged"


def device_choices() -> List[str]:
    try:
        return available_devices()
    except Exception:  # torch problems must not keep the node from loading
        return ["cpu"]


def default_device(choices: Sequence[str]) -> str:
    for d in choices:
        if d != "cpu":
            return d
    return choices[0]


def common_inputs() -> dict:
    """The device / dtype / output inputs every merging node has."""
    devices = device_choices()
    return {
        "device": (devices, {
            "default": default_device(devices),
            "tooltip": "Where the arithmetic runs. The merge streams key by key, so a GPU needs only a few tensors "
                       "of memory, never a whole model. cpu always works.",
        }),
        "dtype": (DTYPES, {
            "default": "fp16",
            "tooltip": "Data type of the merged weights: fp16 (usual, half the size of fp32), bf16, fp32, or keep "
                       "(the first model's type per key). The arithmetic is always fp32.",
        }),
        "output_mode": (OUTPUT_MODES, {
            "default": "graph",
            "tooltip": "graph: load the merged model straight into this workflow (nothing written to disk). disk: "
                       "stream it into a .safetensors file under the output folder (MODEL/CLIP/VAE are then not "
                       "available). both: write the file, then load it into the workflow.",
        }),
        "filename_prefix": ("STRING", {
            "default": DEFAULT_PREFIX,
            "tooltip": "File name for disk/both, under ComfyUI's output folder; sub-folders allowed. The default "
                       "'checkpoints/merged' saves into output/checkpoints, which the checkpoint loaders list. "
                       "A prefix that leaves the output folder is refused.",
        }),
    }


MAX_THREADS = 256


def optional_inputs() -> dict:
    """The optional inputs every merging node has, after its required ones. Optional, so saved workflows and API
    prompts made before an input existed still run: the UI stores widget values by position and appends a new
    widget's value at the end, and an API prompt without the input runs with the function's default (0)."""
    return {
        "threads": ("INT", {
            "default": 0, "min": 0, "max": MAX_THREADS, "step": 1,
            "tooltip": "Merge worker threads on the CPU. 0 = auto: $MODEL_MERGER_THREADS if set, else the CPUs "
                       "available to ComfyUI less one (left for hashing and writing the output). Only affects a CPU "
                       "merge's speed; it never changes the output bytes.",
        }),
    }


def thread_count(threads) -> int:
    """The ``threads`` input as MergePlan.threads: a whole number 0..MAX_THREADS (None, a missing input: 0, auto)."""
    if threads is None:
        return 0
    try:
        value = int(threads)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or isinstance(threads, bool) or value != threads or not 0 <= value <= MAX_THREADS:
        raise ModelMergerError(f"threads must be a whole number from 0 (auto) to {MAX_THREADS}, not {threads!r}")
    return value


COMMON_RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
COMMON_RETURN_NAMES = ("MODEL", "CLIP", "VAE", "report")
COMMON_OUTPUT_TOOLTIPS = (
    "The merged diffusion model (graph and both modes).",
    "The merged text encoder(s) (graph and both modes).",
    "The merged VAE (graph and both modes).",
    "What was merged: inputs and weights, architecture, saved file, output hash, time.",
)


def validate_prefix(filename_prefix=None):
    """VALIDATE_INPUTS for the merging nodes: the prefix is checked in every mode (before anything runs)."""
    if filename_prefix is None:
        return True
    problem = host.prefix_problem(filename_prefix)
    return problem or True


class MergeEvent:
    """The ``model_merger.done`` event of one merging node's run, sent on every way out of the node: done, failed
    (also before the merge starts: a refused path, a missing base, a bad block string, missing requirements) or
    cancelled. Its ``seconds`` is the merge's time; the garbage-collection pass after it is not counted.

        with MergeEvent(title, node_id) as ev:
            ...checks...
            return run_plan(plan, ..., event=ev)
    """

    def __init__(self, title: str, node_id=None):
        self.title = title
        self.node_id = node_id
        self.t0 = time.monotonic()
        self.status = "failed"
        self.message = ""
        self.saved: Optional[str] = None
        self.seconds: Optional[float] = None

    def __enter__(self) -> "MergeEvent":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                if issubclass(exc_type, host.interrupt_exception_types() + (MergeCancelled,)):
                    self.status, self.message = "cancelled", "merge cancelled; no output was written"
                    host.send_text(self.node_id, self.message)
                elif issubclass(exc_type, ModelMergerError):
                    self.status, self.message = "failed", str(exc)
                    host.send_text(self.node_id, f"error: {self.message}")
                else:
                    self.status, self.message = "failed", f"{exc_type.__name__}: {exc}"
            seconds = self.seconds if self.seconds is not None else time.monotonic() - self.t0
            host.send_event({
                "status": self.status,
                "ok": self.status == "done",
                "title": self.title,
                "message": self.message,
                "seconds": round(seconds, 3),
                "node": None if self.node_id is None else str(self.node_id),
                "output": host.rel_to_output(self.saved) if self.saved else None,
            })
        finally:
            gc.collect()
        return False


def run_plan(
    plan: "engine.MergePlan",
    *,
    node_id,
    output_mode: str,
    filename_prefix: str,
    title: str,
    header_lines: Sequence[str] = (),
    to_file=None,
    to_state_dict=None,
    event: Optional[MergeEvent] = None,
) -> tuple:
    """Run a merge plan in the chosen mode, with ComfyUI progress, cancel and the done event.

    ``to_file(output, progress, cancel)`` and ``to_state_dict(progress, cancel)`` default to the engine's
    ``merge_to_file`` / ``merge_to_state_dict`` on ``plan`` (other nodes pass their own, e.g. a cross-merge).
    ``event``: the node's MergeEvent when the node made one around its own checks; else one is made here.
    Returns (MODEL, CLIP, VAE, report).
    """
    if event is None:
        with MergeEvent(title, node_id) as ev:
            return run_plan(plan, node_id=node_id, output_mode=output_mode, filename_prefix=filename_prefix,
                            title=title, header_lines=header_lines, to_file=to_file, to_state_dict=to_state_dict,
                            event=ev)
    event.title = title
    if output_mode not in OUTPUT_MODES:
        raise ManifestError(f"output_mode {output_mode!r} is not one of {', '.join(OUTPUT_MODES)}")
    t0 = event.t0
    progress = host.NodeProgress(node_id)
    saved = None
    prep = engine.prepare(plan)  # headers and preflight only: errors here cost nothing
    notes: List[str] = []
    model = clip = vae = None
    out_path = None
    if output_mode in ("disk", "both"):
        out_path = host.output_path(filename_prefix)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    if output_mode == "graph":
        room = host.make_room(2 * prep.output_bytes)
        if room:
            notes.append(room)
        if to_state_dict is not None:
            sd, result = to_state_dict(progress, progress.cancel)
        else:
            sd, result = engine.merge_to_state_dict(plan, progress=progress, cancel=progress.cancel, prepared=prep)
        host.send_text(node_id, "loading the merged model into ComfyUI...")
        model, clip, vae = host.load_state_dict(sd)
        del sd
    else:
        if to_file is not None:
            result = to_file(out_path, progress, progress.cancel)
        else:
            result = engine.merge_to_file(plan, out_path, progress=progress, cancel=progress.cancel, prepared=prep)
        saved = event.saved = out_path
        if output_mode == "both":
            room = host.make_room(2 * prep.output_bytes)
            if room:
                notes.append(room)
            host.send_text(node_id, "loading the saved file into ComfyUI...")
            model, clip, vae = host.load_checkpoint(out_path)
        else:
            why = "Weighted Merge ran in disk mode: its MODEL/CLIP/VAE outputs are empty (use graph or both)"
            model = host.blocked(why)
            clip = host.blocked(why)
            vae = host.blocked(why)
    seconds = time.monotonic() - t0
    report = format_report(plan, prep, result, title, header_lines, notes, saved, seconds)
    event.seconds = seconds
    event.status = "done"
    event.message = report_summary(plan, saved, seconds)
    host.send_text(node_id, f"done in {host.human_seconds(seconds)}" + (f": {host.rel_to_output(saved)}" if saved else ""))
    return (model, clip, vae, report)


def report_summary(plan, saved, seconds) -> str:
    what = f"{len(plan.inputs)} models merged in {host.human_seconds(seconds)}"
    return what + (f", saved {host.rel_to_output(saved)}" if saved else ", loaded into the graph")


def format_report(plan, prep, result, title, header_lines, notes, saved, seconds) -> str:
    names = [i.display_name() for i in plan.inputs]
    weights = [float(i.weight) for i in plan.inputs]
    total = sum(weights)
    show_share = prep.method.uses_weights and plan.normalize and total > 0
    lines = [title]
    lines.extend(header_lines)
    lines.append(f"method: {plan.method}" + (f" {prep.params}" if prep.params else "") + f", normalize: {'on' if plan.normalize else 'off'}")
    lines.append("inputs:")
    for n, w in zip(names, weights):
        lines.append(f"  {w:g}" + (f" ({100 * w / total:.1f}%)" if show_share else "") + f"  {n}")
    lines.append(f"architecture: {result.structure} (modelspec {result.architecture})")
    lines.append(f"output: {len(prep.jobs)} keys, {host.human_bytes(prep.output_bytes)}, dtype {plan.dtype}, device {plan.device}")
    if saved:
        lines.append(f"saved: {host.rel_to_output(saved)} (in ComfyUI's output folder)")
    else:
        lines.append("saved: no (merged into the graph only)")
    if result.tensor_sha256:
        lines.append(f"tensor-data SHA-256 (modelspec.hash_sha256, AutoV3 {result.tensor_sha256[:12]}): {result.tensor_sha256}")
    rate = prep.output_bytes / seconds / 1e6 if seconds > 0 else 0
    lines.append(f"time: {host.human_seconds(seconds)} ({rate:.0f} MB/s of output)")
    run_notes = [n for n in result.notes if n not in prep.notes]  # what the run itself found (nonfinite warn/clamp)
    for n in list(prep.notes) + run_notes + list(notes):
        lines.append(f"note: {n}")
    return "\n".join(lines)


class WeightedMerge:
    DESCRIPTION = (
        "Merge the checkpoints of a manifest by weighted sum, key by key with bounded memory. Output straight into "
        "the graph (MODEL, CLIP, VAE), to a .safetensors file in the output folder, or both."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = COMMON_RETURN_TYPES
    RETURN_NAMES = COMMON_RETURN_NAMES
    OUTPUT_TOOLTIPS = COMMON_OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        req = {"manifest": (host.MANIFEST_TYPE, {
            "tooltip": "What to merge: from Scan Folder, Load Manifest or Add Model To Manifest. Its method, "
                       "normalize and per-model weights are used; device and dtype come from this node.",
        })}
        req.update(common_inputs())
        return {"required": req, "optional": optional_inputs(), "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return validate_prefix(filename_prefix)

    def merge(self, manifest, device, dtype, output_mode, filename_prefix, threads=0, unique_id=None):
        with MergeEvent("Model Merger: weighted merge", unique_id) as ev:
            if manifest is None:
                raise ManifestError("no manifest connected")
            check_manifest_paths(manifest)
            plan = plan_from_manifest(manifest, device=device, dtype=dtype)
            plan.threads = thread_count(threads)
            return run_plan(
                plan,
                node_id=unique_id,
                output_mode=output_mode,
                filename_prefix=filename_prefix,
                title=f"Model Merger: weighted merge of {len(plan.inputs)} models",
                event=ev,
            )

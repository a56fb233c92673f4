"""Extract LoRA, Merge LoRAs and Apply LoRA: the LoRA room of the engine (merger_core/lora) in the node graph.

Extract LoRA and Merge LoRAs write a kohya-format LoRA into ComfyUI's ``loras`` folder (so LoraLoader lists it after
a refresh) and also return it as a ``LORA_MODEL``: ComfyUI's own type for a LoRA held in memory (a state dict of
the LoRA's tensors, what core's *Train LoRA* outputs and *Load LoRA Model* / *Save LoRA Weights* take). Apply LoRA
patches a MODEL and a CLIP with such a LoRA at two strengths, the way LoraLoader does
(``comfy.sd.load_lora_for_models``); core's *Load LoRA Model* patches the MODEL only. Keeping extraction and
application in two nodes means changing a strength re-patches in a moment and never re-runs the SVD.
"""

from __future__ import annotations

import os
from typing import List, Optional

from ..merger_core.errors import ModelMergerError, OutputError
from ..merger_core.lora.extract import OUT_DTYPES, extract_lora
from ..merger_core.lora.merge_loras import merge_loras
from . import _host as host
from .merge_node import MergeEvent

LORA_TYPE = "LORA_MODEL"  # ComfyUI's type (comfy/comfy_types: IO.LORA_MODEL): a dict of the LoRA's tensors
LORAS_KIND = "loras"
NONE = "(none)"
MAX_LORAS = 4
DTYPES = list(OUT_DTYPES)
EXTRACT_PREFIX = "model_merger/extracted"
MERGE_PREFIX = "model_merger/merged"
WORST = 8  # modules shown in the report's energy table


# -------------------------------------------------------------------------------------------------------------------
# The loras folder


def lora_names() -> List[str]:
    return host.lora_names()


def lora_path(name: str) -> str:
    return host.check_allowed(host.lora_path(name), "LoRA")


def loras_dir() -> str:
    paths = host.folder_paths.get_folder_paths(LORAS_KIND)
    if not paths:
        raise OutputError("ComfyUI has no loras folder to write the LoRA into")
    return os.path.abspath(paths[0])


def lora_prefix_problem(prefix) -> Optional[str]:
    """Why a filename prefix for the loras folder is refused, or None (checked before anything runs)."""
    if not isinstance(prefix, str) or not prefix.strip():
        return "the filename prefix is empty"
    if "\x00" in prefix:
        return "the filename prefix contains a NUL character"
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or (len(prefix) > 1 and prefix[1] == ":"):
        return f"filename prefix {prefix!r} is an absolute path; give a path under ComfyUI's loras folder"
    root = loras_dir()
    target = os.path.abspath(os.path.join(root, os.path.normpath(prefix)))
    if os.path.commonpath([target, root]) != root or target == root:
        return f"filename prefix {prefix!r} points outside ComfyUI's loras folder"
    if os.path.basename(os.path.normpath(prefix)) in ("", ".", ".."):
        return f"filename prefix {prefix!r} has no file name part"
    return None


def lora_output_path(prefix: str) -> str:
    """A new file in the first loras folder: ``sub/name`` -> ``models/loras/sub/name_00001_.safetensors``."""
    problem = lora_prefix_problem(prefix)
    if problem:
        raise OutputError(problem)
    target = os.path.abspath(os.path.join(loras_dir(), os.path.normpath(prefix)))
    folder, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(folder, exist_ok=True)
    counter = 1
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


def lora_name_of(path: str) -> str:
    """The name LoraLoader shows for a file in the first loras folder."""
    return os.path.relpath(path, loras_dir()).replace(os.sep, "/")


def validate_lora_prefix(filename_prefix=None):
    if filename_prefix is None:
        return True
    return lora_prefix_problem(filename_prefix) or True


def load_lora_state_dict(path: str) -> dict:
    """The written LoRA as ComfyUI's LORA_MODEL (what comfy.utils.load_torch_file gives LoraLoader)."""
    from safetensors.torch import load_file

    return load_file(path)


def _settings(rank, conv_rank, energy):
    conv = int(conv_rank) if int(conv_rank) > 0 else None
    en = float(energy) if float(energy) > 0 else None
    return int(rank), conv, en


def _report(title: str, lines: List[str], res, path: str) -> str:
    out = [title] + list(lines) + res.summary_lines(WORST)
    out.append(f"saved: {lora_name_of(path)} in ComfyUI's loras folder ({host.human_bytes(res.output_bytes)}, "
               f"{len(res.modules)} modules); refresh the browser (R) for LoraLoader to list it")
    out.append(f"time: {host.human_seconds(res.seconds)}")
    return "\n".join(out)


RANK_INPUTS = {
    "rank": ("INT", {
        "default": 32, "min": 1, "max": 1024, "step": 1,
        "tooltip": "Rank of the linear modules (and 1x1 convs); with energy on, the largest rank a module may get.",
    }),
    "energy": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "0 = off (every module gets the rank). Else per module the smallest rank that keeps this fraction "
                   "of the difference's squared singular values (e.g. 0.9), capped by rank / conv_rank.",
    }),
    "dtype": (DTYPES, {"default": "fp16", "tooltip": "Data type of the LoRA's factors (the SVD is fp32)."}),
}


# -------------------------------------------------------------------------------------------------------------------
# Nodes


class ExtractLora:
    DESCRIPTION = (
        "Extract a fine-tune's difference from its base as a kohya-format LoRA: per key a deterministic truncated "
        "SVD of (tuned - base) in fp32, streamed key by key. Written into ComfyUI's loras folder and returned as a "
        "LORA_MODEL (connect it to Apply LoRA, or core's Load LoRA Model). The report lists the retained energy."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = (
        "The extracted LoRA, usable right away: Apply LoRA (Model Merger) patches MODEL and CLIP with it.",
        "The saved file's name, modules, retained energy (worst modules first) and time.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        names = host.checkpoint_names()
        req = {
            "tuned": (names, {"tooltip": "The fine-tuned (or merged) checkpoint."}),
            "base": (names, {"tooltip": "The checkpoint it was trained from (same architecture)."}),
            "rank": RANK_INPUTS["rank"],
            "conv_rank": ("INT", {
                "default": 0, "min": 0, "max": 1024, "step": 1,
                "tooltip": "Rank of the 3x3 convs. 0: 3x3 convs are left out (unless energy is on).",
            }),
            "energy": RANK_INPUTS["energy"],
            "dtype": RANK_INPUTS["dtype"],
            "filename_prefix": ("STRING", {
                "default": EXTRACT_PREFIX,
                "tooltip": "File name under ComfyUI's loras folder (sub-folders allowed), with a counter: "
                           "model_merger/extracted gives models/loras/model_merger/extracted_00001_.safetensors.",
            }),
        }
        return {"required": req, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return validate_lora_prefix(filename_prefix)

    @classmethod
    def IS_CHANGED(cls, tuned=None, base=None, **_inputs):
        try:
            return repr(host.file_signature([host.checkpoint_path(n) for n in (tuned, base)]))
        except Exception as exc:  # the run reports it
            return f"error: {exc}"

    def extract(self, tuned, base, rank, conv_rank, energy, dtype, filename_prefix, unique_id=None):
        title = "Model Merger: extract LoRA"
        with MergeEvent(title, unique_id) as ev:
            paths = [host.check_allowed(host.checkpoint_path(n), "model") for n in (tuned, base)]
            if os.path.realpath(paths[0]) == os.path.realpath(paths[1]):
                raise ModelMergerError("tuned and base are the same file: there is no difference to extract")
            r, conv, en = _settings(rank, conv_rank, energy)
            out = lora_output_path(filename_prefix)
            progress = host.NodeProgress(unique_id, label="extracting")
            res = extract_lora(paths[0], paths[1], r, conv_rank=conv, energy=en, out_path=out, progress=progress,
                               cancel=progress.cancel, dtype=dtype)
            lines = [f"tuned: {tuned}", f"base: {base}",
                     f"rank {r}" + (f", conv rank {conv}" if conv else ", no 3x3 convs" if en is None else "")
                     + (f", energy {en:g}" if en else "") + f", dtype {dtype}"]
            return _finish(ev, unique_id, title, lines, res, out, "LoRA extracted")


def _finish(ev, unique_id, title, lines, res, out, done: str):
    """The report, the done event and the node's outputs (the LoRA as LORA_MODEL, the report) after a LoRA is written."""
    report = _report(title, lines, res, out)
    ev.seconds = res.seconds
    ev.status, ev.message = "done", f"{done} in {host.human_seconds(res.seconds)}: {lora_name_of(out)}"
    host.send_text(unique_id, f"done: {lora_name_of(out)}")
    return (load_lora_state_dict(out), report)


class MergeLoras:
    DESCRIPTION = (
        "Merge up to four LoRAs into one: the weighted sum of their deltas per module, re-factorised to a rank by a "
        "deterministic truncated SVD. Written into ComfyUI's loras folder and returned as a LORA_MODEL."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = (
        "The merged LoRA, usable right away: Apply LoRA (Model Merger) patches MODEL and CLIP with it.",
        "The LoRAs and weights, the saved file, retained energy (worst modules first), unmatched modules.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        names = [NONE] + lora_names()
        req = {}
        for i in range(1, MAX_LORAS + 1):
            req[f"lora_{i}"] = (names, {"default": NONE, "tooltip": f"LoRA {i} from the loras folder; (none) skips it."})
            req[f"weight_{i}"] = ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                "tooltip": f"Weight of LoRA {i}'s delta in the sum (negative subtracts it).",
            })
        req["rank"] = RANK_INPUTS["rank"]
        req["conv_rank"] = ("INT", {
            "default": 0, "min": 0, "max": 1024, "step": 1,
            "tooltip": "Rank of the 3x3 conv modules. 0: the same as rank.",
        })
        req["energy"] = RANK_INPUTS["energy"]
        req["dtype"] = RANK_INPUTS["dtype"]
        req["checkpoint"] = ([NONE] + host.checkpoint_names(), {
            "default": NONE,
            "tooltip": "(none): modules are lined up by name (the LoRAs use one naming). A checkpoint of the LoRAs' "
                       "architecture (only its header is read): every LoRA is mapped to its keys, so kohya, PEFT and "
                       "LyCORIS namings mix; modules that match no key are listed in the report.",
        })
        req["filename_prefix"] = ("STRING", {
            "default": MERGE_PREFIX,
            "tooltip": "File name under ComfyUI's loras folder (sub-folders allowed), with a counter.",
        })
        return {"required": req, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return validate_lora_prefix(filename_prefix)

    @classmethod
    def IS_CHANGED(cls, **inputs):
        try:
            paths = [lora_path(inputs[f"lora_{i}"]) for i in range(1, MAX_LORAS + 1)
                     if inputs.get(f"lora_{i}") not in (None, NONE)]
            if inputs.get("checkpoint") not in (None, NONE):
                paths.append(host.checkpoint_path(inputs["checkpoint"]))
            return repr(host.file_signature(paths))
        except Exception as exc:  # the run reports it
            return f"error: {exc}"

    def merge(self, rank, conv_rank, energy, dtype, checkpoint, filename_prefix, unique_id=None, **slots):
        title = "Model Merger: merge LoRAs"
        with MergeEvent(title, unique_id) as ev:
            chosen = []
            for i in range(1, MAX_LORAS + 1):
                name = slots.get(f"lora_{i}", NONE)
                if name in (None, NONE):
                    continue
                chosen.append((name, lora_path(name), float(slots.get(f"weight_{i}", 1.0))))
            if not chosen:
                raise ModelMergerError("no LoRA chosen: pick at least one in lora_1 .. lora_4")
            ckpt = None if checkpoint in (None, NONE) else host.check_allowed(host.checkpoint_path(checkpoint), "model")
            r, conv, en = _settings(rank, conv_rank, energy)
            out = lora_output_path(filename_prefix)
            progress = host.NodeProgress(unique_id, label="merging LoRAs")
            res, lrep = merge_loras([(p, w) for _, p, w in chosen], r, out, conv_rank=conv, energy=en, dtype=dtype,
                                    checkpoint=ckpt, progress=progress, cancel=progress.cancel)
            lines = ["loras:"] + [f"  {w:g}  {n}" for n, _, w in chosen]
            lines.append(f"rank {r}, conv rank {conv or r}" + (f", energy {en:g}" if en else "") + f", dtype {dtype}"
                         + (f", lined up through {checkpoint}" if ckpt else ", lined up by module name"))
            if lrep is not None:
                lines += lrep.lines()
            return _finish(ev, unique_id, title, lines, res, out, "LoRAs merged")


class ApplyLora:
    DESCRIPTION = (
        "Apply a LORA_MODEL (from Extract LoRA or Merge LoRAs) to a MODEL and a CLIP at two strengths, as "
        "LoraLoader does with a file. Changing a strength re-patches only; the LoRA is not extracted again."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA applied.", "The text encoder(s) with the LoRA applied.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA is applied to."}),
                "lora": (LORA_TYPE, {"tooltip": "The LoRA, from Extract LoRA or Merge LoRAs."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly the diffusion model is changed (may be negative)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly the text encoder(s) are changed (may be negative)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder(s) the LoRA is applied to (optional)."}),
            },
        }

    def apply(self, model, lora, strength_model, strength_clip, clip=None):
        import comfy.sd

        if not isinstance(lora, dict):
            raise ModelMergerError("lora: expected a LoRA (LORA_MODEL) from Extract LoRA or Merge LoRAs")
        if strength_model == 0 and clip is not None and strength_clip == 0:
            return (model, clip)
        m, c = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip if clip is not None else 0)
        if clip is None:
            c = host.blocked("Apply LoRA (Model Merger) has no CLIP connected, so its CLIP output is empty")
        return (m, c)

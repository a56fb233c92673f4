"""Nodes that make a MANIFEST: Scan Folder, Load Manifest, Add Model To Manifest, Add LoRA To Manifest, Save
Manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Optional

from ..merger_core import manifest as mf
from ..merger_core.manifest import scan as sc
from ..merger_core.manifest.model import LoraEntry
from ..merger_core.errors import ManifestError
from . import _host as host

PASTED = "(use pasted JSON)"
LORA_KIND = host.LORA_KIND
lora_names = host.lora_names
lora_path = host.lora_path
STRENGTH_LIMIT = 100.0  # LoraLoader's range, -100..100
NO_LORA = host.NO_LORA


def strength_problem(what: str, value) -> Optional[str]:
    """Why a LoRA strength is refused (it must be a finite number within LoraLoader's -100..100), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{what} {value!r} must be a finite number"
    if abs(value) > STRENGTH_LIMIT:
        return f"{what} {value!r} must be between -{STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g}"
    return None


def copy_manifest(m: "mf.Manifest") -> "mf.Manifest":
    """A deep copy: node outputs are cached by ComfyUI and must never be changed by a later node."""
    return dataclasses.replace(
        m, models=[dataclasses.replace(e, civitai=json.loads(json.dumps(e.civitai)) if e.civitai else None) for e in m.models],
        params=json.loads(json.dumps(m.params, default=str)),
        loras=[dataclasses.replace(e) for e in m.loras],
    )


def describe_manifest(m: "mf.Manifest", extra_lines=()) -> str:
    """A readable summary: method, dtype, each model with its weight (and share of the total), each LoRA baked in
    with its strengths."""
    total = sum(e.weight for e in m.models)
    names = mf.display_names([e.path for e in m.models]) if m.models else []
    lines = [f"{len(m.models)} model(s), method {m.method}, normalize {'on' if m.normalize else 'off'}"]
    for e, name in zip(m.models, names):
        share = f" ({100.0 * e.weight / total:.1f}%)" if (m.normalize and total) else ""
        lines.append(f"  {e.weight:g}{share}  {name}")
    if m.loras:
        lines.append(f"{len(m.loras)} LoRA(s) baked in (strength model / clip):")
        for e, name in zip(m.loras, mf.display_names([e.path for e in m.loras])):
            lines.append(f"  {e.strength_model:g} / {e.strength_clip:g}  {name}")
    lines.extend(extra_lines)
    return "\n".join(lines)


def manifest_fingerprint(m: "mf.Manifest") -> str:
    """Content of the manifest plus each input's (models, base, LoRAs) size and mtime: what IS_CHANGED reports."""
    paths = [e.path for e in m.models] + ([m.base] if m.base else []) + [e.path for e in m.loras]
    sig = {"manifest": mf.manifest_to_dict(m), "files": host.file_signature(paths)}
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()


def check_manifest_paths(m: "mf.Manifest") -> None:
    """Every model, the base and every LoRA must lie in ComfyUI's model folders (the loras folders among them)
    unless the server owner opted out."""
    for i, e in enumerate(m.models):
        host.check_allowed(e.path, f"models[{i}] ({e.name}):")
    if m.base:
        host.check_allowed(m.base, "base:")
    for i, e in enumerate(m.loras):
        host.check_allowed(e.path, f"loras[{i}] ({e.name}):")


# -------------------------------------------------------------------------------------------------------------------


class ScanFolder:
    DESCRIPTION = (
        "Find the .safetensors checkpoints in a folder whose names match a pattern and make a manifest giving each "
        "the same weight. Only folders ComfyUI knows for models can be scanned, unless the server's owner set "
        f"{host.ALLOW_ANY_FOLDER_ENV}=1."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "scan"
    RETURN_TYPES = (host.MANIFEST_TYPE, "STRING")
    RETURN_NAMES = ("manifest", "summary")
    OUTPUT_TOOLTIPS = (
        "The models found, each with weight 1 (equal weights). Connect it to Weighted Merge, or to Add Model To "
        "Manifest to change weights.",
        "What was found: each file with its weight, and the files that were skipped and why.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {
                    "default": "",
                    "tooltip": "Folder to scan. Empty: every checkpoint folder ComfyUI knows. A relative path is "
                               "taken inside the checkpoint folders (for example 'pony'). Folders outside "
                               "ComfyUI's model folders are refused unless the server allows them.",
                }),
                "pattern": ("STRING", {
                    "default": "*.safetensors",
                    "tooltip": "File name pattern inside the folder: * any characters, ? one character, "
                               "**/ any sub-folders (for example 'pony*.safetensors' or '**/*v6*.safetensors'). "
                               "Write [[] for a literal [.",
                }),
                "recursive": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also look in every sub-folder (the same as starting the pattern with **/).",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, folder="", pattern="*.safetensors", recursive=False):
        try:
            m, _ = cls._scan(folder, pattern, recursive)
            return manifest_fingerprint(m)
        except Exception as exc:  # the run itself reports the error
            return f"error: {exc}"

    @classmethod
    def _roots(cls, folder: str):
        folder = (folder or "").strip()
        if not folder:
            return [p for p in host.checkpoint_folders() if os.path.isdir(p)]
        expanded = os.path.expanduser(folder)
        if os.path.isabs(expanded):
            return [host.check_allowed(expanded, "folder")]
        roots = []
        for base in host.checkpoint_folders():
            candidate = os.path.normpath(os.path.join(base, expanded))
            if os.path.isdir(candidate):
                roots.append(host.check_allowed(candidate, "folder"))
        if not roots:
            raise sc.ScanError(f"folder {folder!r} is not inside any checkpoint folder")
        return roots

    @classmethod
    def _scan(cls, folder, pattern, recursive):
        roots = cls._roots(folder)
        if not roots:
            raise sc.ScanError("ComfyUI has no checkpoint folder to scan")
        matches, skipped, failures = [], [], []
        for root in roots:
            try:
                res = sc.scan_folder(root, pattern or sc.DEFAULT_FILTER, recursive=recursive)
            except sc.ScanError as exc:
                failures.append(str(exc))
                continue
            for p in res.matches:
                host.check_allowed(p, "match")
                if p not in matches:
                    matches.append(p)
            skipped.extend(res.skipped)
        if not matches:
            raise sc.ScanError("\n".join(failures) or f"no .safetensors file matches {pattern!r}")
        matches.sort()
        return mf.manifest_from_scan(matches), skipped

    def scan(self, folder="", pattern="*.safetensors", recursive=False):
        m, skipped = self._scan(folder, pattern, recursive)
        extra = [f"skipped {os.path.basename(p) or p}: {why}" for p, why in skipped]
        return (m, describe_manifest(m, extra))


class LoadManifest:
    DESCRIPTION = (
        "Load a merge manifest (JSON) from ComfyUI's models/model_merger folder, or from JSON pasted into the text "
        "box. Relative model paths in a file are relative to the file; in pasted JSON they are checkpoint names (and "
        "LoRA paths LoRA names)."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (host.MANIFEST_TYPE, "STRING")
    RETURN_NAMES = ("manifest", "summary")
    OUTPUT_TOOLTIPS = ("The loaded manifest, checked (weights, files, method).", "The models and weights it holds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "manifest_file": ([PASTED] + host.manifest_files(), {
                    "default": PASTED,
                    "tooltip": "A .json manifest from the model_merger model folder (models/model_merger, plus "
                               "any 'model_merger' entry in extra_model_paths.yaml). Choose the first entry to "
                               "use the pasted JSON below instead.",
                }),
                "manifest_json": ("STRING", {
                    "default": "",
                    "multiline": True,
                    "tooltip": "Manifest JSON, used when no file is chosen. Example: {\"version\": 1, \"models\": "
                               "[{\"path\": \"a.safetensors\", \"weight\": 0.6}, {\"path\": \"b.safetensors\", "
                               "\"weight\": 0.4}]}",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, manifest_file=PASTED, manifest_json=""):
        try:
            return manifest_fingerprint(cls._load(manifest_file, manifest_json))
        except Exception as exc:
            return f"error: {exc}"

    @classmethod
    def _load(cls, manifest_file, manifest_json):
        if manifest_file and manifest_file != PASTED:
            path = host.manifest_file_path(manifest_file)
            m = mf.load_manifest(path)
        else:
            text = (manifest_json or "").strip()
            if not text:
                raise ManifestError("no manifest: choose a file or paste manifest JSON into the text box")
            folders = host.checkpoint_folders()
            m = mf.load_manifest(text, base_dir=folders[0] if folders else None)
            # relative paths in pasted JSON are checkpoint names: find them in any checkpoint folder
            # and LoRA paths are LoRA names (as LoraLoader shows them): find them in the loras folders
            try:
                raw = json.loads(text)
                raw_models = raw.get("models", []) if isinstance(raw, dict) else []
                raw_loras = raw.get("loras", []) if isinstance(raw, dict) else []
            except ValueError:
                raw_models = raw_loras = []
            for entries, raws, kind in ((m.models, raw_models, "checkpoints"), (m.loras, raw_loras, LORA_KIND)):
                for entry, r in zip(entries, raws if isinstance(raws, list) else []):
                    rp = r.get("path") if isinstance(r, dict) else None
                    if isinstance(rp, str) and not os.path.isabs(os.path.expanduser(rp)) and not os.path.exists(entry.path):
                        try:
                            found = host.folder_paths.get_full_path(kind, rp)
                        except KeyError:
                            found = None
                        if found:
                            entry.path = os.path.abspath(found)
        check_manifest_paths(m)
        mf.validate(m)
        return m

    def load(self, manifest_file=PASTED, manifest_json=""):
        m = self._load(manifest_file, manifest_json)
        return (m, describe_manifest(m))


class AddModelToManifest:
    DESCRIPTION = (
        "Add a checkpoint with a weight to a manifest (or start a new one). Chain as many as you like for any number "
        "of models. If the checkpoint is already in the incoming manifest its weight is replaced; weight 0 removes it."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = (host.MANIFEST_TYPE, "STRING")
    RETURN_NAMES = ("manifest", "summary")
    OUTPUT_TOOLTIPS = (
        "The manifest with this checkpoint added (or its weight changed). Chain into the next Add Model To Manifest "
        "or into Weighted Merge.",
        "The models and weights so far.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.checkpoint_names(), {
                    "tooltip": "A checkpoint from ComfyUI's checkpoint folders (.safetensors only: other formats "
                               "can run code when loaded).",
                }),
                "weight": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                    "tooltip": "Relative weight. With normalize on (the default) weights are divided by their sum, "
                               "so 1, 1, 2 means 25%, 25%, 50%. 0 removes this checkpoint from the manifest.",
                }),
            },
            "optional": {
                "manifest": (host.MANIFEST_TYPE, {
                    "tooltip": "The manifest to add to (from Scan Folder, Load Manifest or another Add Model To "
                               "Manifest). Leave empty to start a new manifest.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, ckpt_name=None, weight=1.0, manifest=None):
        try:
            return json.dumps([ckpt_name, weight, host.file_signature([host.checkpoint_path(ckpt_name)])])
        except Exception as exc:
            return f"error: {exc}"

    def add(self, ckpt_name, weight, manifest=None):
        path = os.path.abspath(host.checkpoint_path(ckpt_name))
        w = float(weight)
        if w != w or w < 0 or w in (float("inf"), float("-inf")):
            raise ManifestError(f"{ckpt_name}: weight {weight!r} must be a finite number >= 0")
        m = copy_manifest(manifest) if manifest is not None else mf.Manifest(models=[])
        same = [i for i, e in enumerate(m.models) if os.path.realpath(e.path) == os.path.realpath(path)]
        if w == 0:
            m.models = [e for i, e in enumerate(m.models) if i not in same]
        elif same:
            for i in same:
                m.models[i].weight = w
        else:
            m.models.append(mf.ManifestEntry(path=path, weight=w))
        return (m, describe_manifest(m))


class AddLoraToManifest:
    DESCRIPTION = (
        "Bake a LoRA into the merge: adds a LoRA from ComfyUI's loras folder with its strengths to the manifest. The "
        "merge then writes each key as the merged weight plus the LoRA's delta, in the same pass, as LoraLoader "
        "would apply it to the merged model. Chain it for several LoRAs. A LoRA already in the manifest gets the new "
        "strengths; both strengths 0 removes it."
    )
    CATEGORY = host.CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = (host.MANIFEST_TYPE, "STRING")
    RETURN_NAMES = ("manifest", "summary")
    OUTPUT_TOOLTIPS = (
        "The manifest with this LoRA added (or its strengths changed). Connect it to Weighted Merge, Save Manifest or "
        "another Add LoRA To Manifest.",
        "The models and LoRAs so far.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01}
        return {
            "required": {
                "manifest": (host.MANIFEST_TYPE, {
                    "tooltip": "The models to merge (from Add Model To Manifest, Scan Folder, Load Manifest or Merge "
                               "Models' manifest output).",
                }),
                "lora_name": (lora_names() or [NO_LORA], {
                    "tooltip": "A LoRA from ComfyUI's loras folders (.safetensors only: other formats can run code "
                               "when loaded). It must be made for the models' architecture (an SD1.5 LoRA for SD1.5 "
                               "checkpoints); another is refused before any weight is read.",
                }),
                "strength_model": ("FLOAT", dict(strength, tooltip=(
                    "How strongly the LoRA changes the diffusion model (as LoraLoader's strength_model); may be "
                    "negative."))),
                "strength_clip": ("FLOAT", dict(strength, tooltip=(
                    "How strongly the LoRA changes the text encoder(s) (as LoraLoader's strength_clip); may be "
                    "negative."))),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strength_model=None, strength_clip=None):
        for what, v in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            problem = v is not None and strength_problem(what, v)
            if problem:
                return problem
        return True

    @classmethod
    def IS_CHANGED(cls, manifest=None, lora_name=None, strength_model=1.0, strength_clip=1.0):
        try:
            return json.dumps([lora_name, strength_model, strength_clip, host.file_signature([lora_path(lora_name)])])
        except Exception as exc:
            return f"error: {exc}"

    def add(self, manifest, lora_name, strength_model=1.0, strength_clip=1.0):
        if manifest is None:
            raise ManifestError("Add LoRA To Manifest needs a manifest (the models the LoRA is baked into)")
        for what, v in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            problem = strength_problem(what, v)
            if problem:
                raise ManifestError(f"{lora_name}: {problem}")
        path = host.check_allowed(lora_path(lora_name), f"LoRA {lora_name}:")
        sm, sc = float(strength_model), float(strength_clip)
        m = copy_manifest(manifest)
        same = [i for i, e in enumerate(m.loras) if os.path.realpath(e.path) == os.path.realpath(path)]
        if sm == 0 and sc == 0:
            m.loras = [e for i, e in enumerate(m.loras) if i not in same]
        elif same:
            for i in same:
                m.loras[i].strength_model, m.loras[i].strength_clip = sm, sc
        else:
            m.loras.append(LoraEntry(path=path, strength_model=sm, strength_clip=sc))
        return (m, describe_manifest(m))


class SaveManifest:
    DESCRIPTION = "Save a manifest as JSON into the model_merger folder, so Load Manifest and the CLI can use it."
    CATEGORY = host.CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the manifest was written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "manifest": (host.MANIFEST_TYPE, {"tooltip": "The manifest to save."}),
                "name": ("STRING", {
                    "default": "my_merge",
                    "tooltip": "File name (without .json) in the first model_merger folder. An existing file with "
                               "this name is replaced.",
                }),
            }
        }

    def save(self, manifest, name):
        name = (name or "").strip()
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise ManifestError(f"manifest name {name!r} must be a plain file name (no folders)")
        if not name.lower().endswith(".json"):
            name += ".json"
        folder = host.folder_paths.get_folder_paths(host.FOLDER_KIND)[0]
        os.makedirs(folder, exist_ok=True)
        path = mf.save_manifest(manifest, os.path.join(folder, name), overwrite=True)
        return {"ui": {"text": [path]}, "result": (path,)}

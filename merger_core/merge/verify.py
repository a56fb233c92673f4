"""``verify``: re-run the merge a file's embedded record describes and compare every byte with the file.

A model-merger output carries ``model_merger.replay``: which planner built the merge (a manifest, a cross-merge,
a train/add difference), its arguments with inputs by index, and each input's name, size and SHA-256. Verifying finds
every input by its hash (the hash cache first, then ``.safetensors`` files of the recorded size in the output's
folder and the folders given), builds the same plan again, and runs it through the same runner into a
:class:`CompareSink`, which writes nothing: it compares each chunk with the bytes of the file at that place and stops
at the first key that differs. A fresh merge that gives the same bytes for every tensor (and the same tensor-data
SHA-256 as the file's ``modelspec.hash_sha256``) verifies the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import ModelMergerError
from ..identity.hashing import normalize_sha256
from ..io.files import open_regular
from ..io.reader import open_inputs
from ..io.safetensors import SafetensorsHeader, read_header
from ..io.writer import HASH_METADATA_KEY
from .metadata import REPLAY_KEY
from .plan import MergePlan, PreparedMerge, prepare
from .quantize import plan_fp8_output

PLANNERS = ("plan", "manifest", "cross_merge", "difference")
SEARCH_DEPTH = 4  # folders below a search folder that are looked in


class VerifyError(ModelMergerError):
    """The file cannot be verified: no record to replay, or an input that cannot be found."""


@dataclass
class VerifyResult:
    output: str
    verified: bool
    keys: int
    checked_keys: int
    first_difference: Optional[str] = None  # the key
    detail: str = ""
    inputs: List[Dict[str, str]] = field(default_factory=list)  # name, path, sha256
    planner: str = ""
    method: str = ""
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


class _Differs(Exception):
    """Raised inside the run by the comparing sink at the first byte that differs."""

    def __init__(self, key: str, detail: str):
        super().__init__(key)
        self.key = key
        self.detail = detail


class CompareSink:
    """A sink that writes nothing: each chunk is compared with the file's bytes of the same key (and hashed)."""

    def __init__(self, path: str, header: SafetensorsHeader, chunk_bytes: int):
        import numpy as np
        import torch

        self.np = np
        self.header = header
        self.chunk_bytes = chunk_bytes
        self.buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
        self._buf_np = self.buffer.numpy()
        self._file = open_regular(path, buffering=0)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if header.file_size else None
        self.hasher = hashlib.sha256()
        self.checked: List[str] = []
        self._key = None
        self._at = 0
        self._end = 0

    def begin_key(self, job) -> None:
        t = self.header.tensors[job.name]
        self._key = job.name
        self._at = self.header.data_start + t.begin
        self._end = self.header.data_start + t.end

    def chunk(self, nbytes: int, dtype):
        if nbytes > self.chunk_bytes:
            raise ValueError(f"a chunk of {nbytes} bytes does not fit the {self.chunk_bytes}-byte buffer")
        return self.buffer[:nbytes].view(dtype)

    def commit(self, nbytes: int) -> None:
        np = self.np
        produced = self._buf_np[:nbytes]
        if self._at + nbytes > self._end:
            raise _Differs(self._key, "the fresh merge gives more bytes for this key than the file holds")
        stored = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=self._at)
        if not np.array_equal(produced, stored):
            first = int(np.flatnonzero(produced != stored)[0])
            raise _Differs(self._key, f"byte {self._at + first - self.header.data_start - self.header.tensors[self._key].begin:,} "
                                      "of the tensor differs from a fresh merge of the inputs")
        self.hasher.update(memoryview(produced))
        self._at += nbytes

    def end_key(self, job) -> None:
        self.checked.append(job.name)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()


# -- the record ----------------------------------------------------------------------------------------------------
def read_replay(path: str) -> tuple:
    """(header, replay record) of a model-merger output; a clear error for any other file."""
    header = read_header(path)
    meta = header.metadata or {}
    raw = meta.get(REPLAY_KEY)
    name = os.path.basename(path)
    if raw is None:
        if "model_merger.manifest" in meta:
            raise VerifyError(f"{name} was written by an older model-merger that did not record how to re-run the merge; "
                              "it cannot be verified")
        raise VerifyError(f"{name} holds no model-merger record of how it was merged, so there is nothing to re-run "
                          "(only files written by model-merger can be verified)")
    try:
        rec = json.loads(raw)
    except ValueError:
        raise VerifyError(f"{name}: its {REPLAY_KEY} record is not valid JSON") from None
    problems = _record_problems(rec)
    if problems:
        raise VerifyError(f"{name}: its {REPLAY_KEY} record is damaged ({problems})")
    return header, rec


def _record_problems(rec) -> str:
    if not isinstance(rec, dict):
        return "not an object"
    if rec.get("planner") not in PLANNERS:
        return f"unknown planner {str(rec.get('planner'))[:40]!r}"
    if not isinstance(rec.get("args"), dict):
        return "no arguments"
    inputs = rec.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return "no inputs"
    for x in inputs:
        if not isinstance(x, dict) or not isinstance(x.get("name"), str) or not isinstance(x.get("size"), int):
            return "an input without name or size"
    return ""


# -- finding the inputs ------------------------------------------------------------------------------------------
def _candidates(folders: Sequence[str], size: int) -> List[str]:
    """``.safetensors`` regular files of exactly ``size`` bytes under the folders (a few levels deep)."""
    out: List[str] = []
    seen = set()
    for top in folders:
        top = os.path.abspath(top)
        if not os.path.isdir(top):
            continue
        base_depth = top.rstrip(os.sep).count(os.sep)
        for root, dirs, files in os.walk(top):
            if root.count(os.sep) - base_depth >= SEARCH_DEPTH:
                dirs[:] = []
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if not f.lower().endswith(".safetensors") or f.startswith("."):
                    continue
                p = os.path.join(root, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                real = os.path.realpath(p)
                if st.st_size == size and os.path.isfile(p) and real not in seen:
                    seen.add(real)
                    out.append(p)
    return out


def find_inputs(rec: dict, folders: Sequence[str], cache=None, exclude: Optional[str] = None,
                progress: Optional[Callable[[str], None]] = None, entries: str = "inputs") -> List[str]:
    """The path of every recorded input (``entries="loras"``: every LoRA), found by SHA-256; a clear error naming
    what was not found and where."""
    if cache is None:
        from ..identity.cache import open_cache

        cache = open_cache()
    found: List[str] = []
    missing: List[str] = []
    unhashed: List[str] = []
    skip = os.path.realpath(exclude) if exclude else None
    for x in rec.get(entries) or []:
        want = normalize_sha256(x.get("sha256"))
        if want is None:
            unhashed.append(x["name"])
            found.append("")
            continue
        hit = next((p for p in cache.paths_with_sha256(want) if os.path.realpath(p) != skip), None)
        if hit is None:
            cands = [p for p in _candidates(folders, x["size"]) if os.path.realpath(p) != skip]
            cands.sort(key=lambda p: os.path.basename(p) != os.path.basename(x["name"]))  # the recorded name first
            for p in cands:
                if progress is not None:
                    progress(p)
                try:
                    h = cache.hashes(p, ("sha256",))
                except ModelMergerError:
                    continue
                if h.sha256 == want:
                    hit = p
                    break
        if hit is None:
            missing.append(f"{x['name']} (sha256 {want[:10]}..., {x['size']:,} bytes)")
        found.append(hit or "")
    if unhashed:
        raise VerifyError(
            "the output records no hash for " + ", ".join(unhashed) + " (it was merged with --no-input-hashes), so "
            "that input cannot be found by its bytes; the file cannot be verified"
        )
    if missing:
        where = ", ".join(os.path.abspath(f) for f in folders) or "no folder"
        raise VerifyError(
            "cannot find " + "; ".join(missing) + f" by hash: not in the hash cache, nor in {where}. Give the folders "
            "that hold the inputs with --search DIR"
        )
    return found


# -- rebuilding the plan ---------------------------------------------------------------------------------------
def rebuild_plan(rec: dict, paths: Sequence[str], device: Optional[str] = None, lora_paths: Sequence[str] = ()) -> MergePlan:
    """The plan the record describes, over the found input (and LoRA) paths."""
    args = dict(rec["args"])
    planner = rec["planner"]

    def path(i) -> str:
        if not isinstance(i, int) or not 0 <= i < len(paths):
            raise VerifyError(f"the record names input {i!r}, which it does not list")
        return paths[i]

    def lora_path(i) -> str:
        if not isinstance(i, int) or not 0 <= i < len(lora_paths):
            raise VerifyError(f"the record names LoRA {i!r}, which it does not list")
        return lora_paths[i]

    if device is not None:
        args["device"] = device
    if planner == "plan":
        from .plan import MergeInput

        weights = args.pop("weights", None)
        if not isinstance(weights, list) or len(weights) != len(paths):
            raise VerifyError("the record's weights do not match its inputs")
        known = set(MergePlan.__dataclass_fields__) - {"inputs", "key_params", "key_source", "key_weights", "key_delta",
                                                         "headers", "replay", "threads"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise VerifyError(f"the record has plan fields this version does not know: {', '.join(unknown)}")
        from .bake import LoraInput

        loras = [LoraInput(lora_path(e.get("path")), float(e.get("strength_model", 1.0)), float(e.get("strength_clip", 1.0)),
                           name=rec["loras"][e.get("path")]["name"]) for e in args.pop("loras", None) or []]
        return MergePlan(inputs=[MergeInput(p, float(w), name=x["name"]) for p, w, x in zip(paths, weights, rec["inputs"])],
                         loras=loras, **args)
    if planner == "manifest":
        from ..manifest.parse import manifest_from_dict
        from .plan import plan_from_manifest

        doc = dict(args)
        doc["models"] = [dict(e, path=path(e.get("path"))) for e in doc.get("models", [])]
        if doc.get("loras"):
            doc["loras"] = [dict(e, path=lora_path(e.get("path"))) for e in doc["loras"]]
        if "base" in doc:
            doc["base"] = path(doc["base"])
        return plan_from_manifest(manifest_from_dict(doc))
    if planner == "cross_merge":
        from .cross import CrossMergeRequest, plan_cross_merge

        args["models"] = [path(i) for i in args.get("models", [])]
        args["base"] = path(args.get("base"))
        args["loras"] = [(lora_path(j), float(sm), float(sc)) for j, sm, sc in args.get("loras") or []]
        known = set(CrossMergeRequest.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise VerifyError(f"the record's cross-merge has options this version does not know: {', '.join(unknown)}")
        return plan_cross_merge(CrossMergeRequest(**args)).plan
    from .train import plan_difference

    return plan_difference(
        args.get("method"), path(args.get("a")), path(args.get("b")), path(args.get("c")), args.get("alpha", 1.0),
        args.get("alpha_blocks"), dtype=args.get("dtype", "fp16"), device=args.get("device", "cpu"),
        title=args.get("title"),
    )


# -- verify ------------------------------------------------------------------------------------------------------
def _layout_difference(prep: PreparedMerge, header: SafetensorsHeader) -> Optional[tuple]:
    """(key, what differs) for the first key whose name, dtype or shape differs between the file and a fresh merge."""
    want = {t.name: t for t in prep.out_tensors}
    have = header.tensors
    for key in sorted(set(want) | set(have)):
        if key not in have:
            return key, "a fresh merge of the inputs has this key; the file does not"
        if key not in want:
            return key, "the file has this key; a fresh merge of the inputs does not"
        w, h = want[key], have[key]
        if w.dtype != h.dtype or tuple(w.shape) != tuple(h.shape):
            return key, f"the file holds {h.dtype} {list(h.shape)}, a fresh merge gives {w.dtype} {list(w.shape)}"
    return None


def verify_file(
    path: str | os.PathLike,
    search: Sequence[str] = (),
    *,
    device: Optional[str] = None,
    threads: int = 0,
    progress=None,
    cancel=None,
    cache=None,
    on_search: Optional[Callable[[str], None]] = None,
) -> VerifyResult:
    """Verify a model-merger output; see the module's description. Raises :class:`VerifyError` when it cannot."""
    from .runner import CHUNK_ELEMENTS, _Runner, check_unchanged

    path = os.path.abspath(os.fspath(path))
    t0 = time.monotonic()
    header, rec = read_replay(path)
    folders = [os.path.dirname(path)] + [os.fspath(f) for f in search]
    paths = find_inputs(rec, folders, cache=cache, exclude=path, progress=on_search)
    lora_paths = find_inputs(rec, folders, cache=cache, exclude=path, progress=on_search, entries="loras")
    plan = rebuild_plan(rec, paths, device=device, lora_paths=lora_paths)
    plan.threads = threads
    prep = prepare(plan)
    plan_fp8_output(prep)
    inputs = [{"name": x["name"], "path": p, "sha256": x["sha256"]} for x, p in zip(rec["inputs"], paths)]
    inputs += [{"name": x["name"] + " (LoRA)", "path": p, "sha256": x["sha256"]} for x, p in zip(rec.get("loras") or [], lora_paths)]
    result = VerifyResult(path, False, len(header.tensors), 0, inputs=inputs, planner=rec["planner"], method=plan.method,
                          notes=list(prep.notes))
    diff = _layout_difference(prep, header)
    if diff is not None:
        result.first_difference, result.detail = diff
        result.seconds = time.monotonic() - t0
        return result
    sink = CompareSink(path, header, CHUNK_ELEMENTS * 4)
    try:
        with ExitStack() as stack:
            handles = open_inputs(stack, prep.headers)
            try:
                runner = _Runner(prep, sink, progress, cancel)
                runner.run(handles)
            except _Differs as d:
                result.first_difference, result.detail = d.key, d.detail
            check_unchanged(prep.headers + [header], "at the end")
    finally:
        sink.close()
    result.checked_keys = len(sink.checked)
    result.seconds = time.monotonic() - t0
    if result.first_difference is not None:
        return result
    digest = sink.hasher.hexdigest()
    stored = (header.metadata or {}).get(HASH_METADATA_KEY, "")
    if stored and stored.lower().removeprefix("0x") != digest:
        result.detail = (f"every tensor matches a fresh merge, but the file's {HASH_METADATA_KEY} ({stored[:14]}...) is "
                         f"not the SHA-256 of its tensor data ({digest[:12]}...): its metadata was edited")
        return result
    result.verified = True
    result.notes.extend(runner.nonfinite_notes())
    return result


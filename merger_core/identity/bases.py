"""Base models, the one registry: the common ancestors that cross-lineage merges take differences from.

Bases live in a folder (``bases_dir()``: ``$MODEL_MERGER_BASES_DIR``, else a folder the host sets with
:func:`use_bases_dirs` (ComfyUI's ``merge_bases`` model folder), else ``<data dir>/bases``) and in a small JSON
registry (``<data dir>/bases.json``) of files kept elsewhere, added with ``model-merger bases add FILE`` so that a
7 GB checkpoint need not be copied. Every base is described by its structure (the detector's answer, from the
header only), so a merge can pick the bases of its models' architecture.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

from ..arch.detect import detect
from ..errors import BadFileError, ManifestError, ModelMergerError
from ..host.userdirs import data_dir

ENV_VAR = "MODEL_MERGER_BASES_DIR"
REGISTRY_NAME = "bases.json"
SUFFIXES = (".safetensors", ".sft")

_host_dirs: List[str] = []


@dataclass
class BaseEntry:
    path: str
    name: str
    arch_id: str
    arch_name: str
    family: str
    variant: str
    size: int
    source: str  # "folder" or "registered"
    exists: bool = True
    problem: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def use_bases_dirs(folders: Sequence[str]) -> None:
    """Folders the host (ComfyUI's ``merge_bases`` kind) keeps bases in; the first one receives downloads."""
    global _host_dirs
    _host_dirs = [os.path.abspath(os.fspath(f)) for f in folders if f]


def bases_dir(create: bool = True) -> str:
    env = os.environ.get(ENV_VAR, "").strip()
    path = os.path.expanduser(env) if env else (_host_dirs[0] if _host_dirs else os.path.join(data_dir(create), "bases"))
    path = os.path.abspath(path)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def _folders() -> List[str]:
    out = [bases_dir(create=False)]
    for f in _host_dirs:
        if f not in out:
            out.append(f)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The registry file: {"version": 1, "bases": [{"name", "path", "arch_id", "family", "file_size", "added"}]}


def _registry_path() -> str:
    return os.path.join(data_dir(), REGISTRY_NAME)


def _load() -> List[dict]:
    path = _registry_path()
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        records = doc.get("bases", [])
        if not all(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("path"), str) for r in records):
            raise ValueError("an entry lacks its name or path")
        return records
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelMergerError(f"the base-model registry {path} cannot be read ({exc}); fix or delete it") from None


def _save(records: List[dict]) -> None:
    path = _registry_path()
    fd, tmp = tempfile.mkstemp(prefix=".bases.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "bases": records}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def register_base(path: str | os.PathLike, name: Optional[str] = None) -> BaseEntry:
    """Add (or replace, by name) a registered base. The file must be a recognised architecture."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise BadFileError(f"{path}: no such file")
    det = detect(path, read_probe=False)
    if not det.known:
        raise BadFileError(f"{os.path.basename(path)}: not a recognised architecture, so it cannot be a base ({det.refusal})")
    name = (name or os.path.splitext(os.path.basename(path))[0]).strip()
    if not name:
        raise ModelMergerError("a base model needs a non-empty name")
    record = {"name": name, "path": path, "arch_id": det.arch_id, "family": det.family, "file_size": det.file_size,
              "added": time.time()}
    records = [r for r in _load() if r["name"] != name] + [record]
    records.sort(key=lambda r: (r.get("family", ""), r["name"].lower()))
    _save(records)
    return describe(path, "registered", name)


# ---------------------------------------------------------------------------------------------------------------


def describe(path: str, source: str = "folder", name: Optional[str] = None) -> BaseEntry:
    """A base's facts from its header (no weight is read)."""
    path = os.path.abspath(path)
    nm = name or os.path.splitext(os.path.basename(path))[0]
    if not os.path.exists(path):
        return BaseEntry(path, nm, "unknown", "unknown", "unknown", "", 0, source, False, "file not found")
    try:
        det = detect(path, read_probe=False)
    except ModelMergerError as exc:
        return BaseEntry(path, nm, "unknown", "unknown", "unknown", "", os.path.getsize(path), source, True, str(exc))
    return BaseEntry(path, nm, det.arch_id, det.arch_name, det.family, det.variant, det.file_size, source)


def list_bases(family: Optional[str] = None) -> List[BaseEntry]:
    """Every base: files in the bases folders, then registered files (each path once); optionally one family."""
    seen = set()
    out: List[BaseEntry] = []
    for folder in _folders():
        if not os.path.isdir(folder):
            continue
        for n in sorted(os.listdir(folder)):
            p = os.path.join(folder, n)
            if n.lower().endswith(SUFFIXES) and os.path.isfile(p) and os.path.realpath(p) not in seen:
                seen.add(os.path.realpath(p))
                out.append(describe(p, "folder"))
    for record in _load():
        p = os.path.abspath(record["path"])
        if os.path.realpath(p) in seen:
            continue
        seen.add(os.path.realpath(p))
        out.append(describe(p, "registered", record["name"]))
    return [b for b in out if family is None or b.family == family]


def add_base(path: str, name: Optional[str] = None, copy: bool = False) -> BaseEntry:
    """Register ``path`` as a base, or copy it into the bases folder with ``copy``.
    Refuses files whose structure is not a known architecture."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise BadFileError(f"{path}: no such file")
    if copy:
        entry = describe(path, "folder", name)
        if entry.problem or entry.arch_id == "unknown":
            raise BadFileError(f"{os.path.basename(path)}: {entry.problem or 'not a recognised architecture'}; not copied")
        dest = os.path.join(bases_dir(), os.path.basename(path))
        if os.path.exists(dest):
            raise ManifestError(f"{dest} already exists in the bases folder")
        tmp = dest + ".partial"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return describe(dest, "folder", name)
    return register_base(path, name)


def remove_base(name: str) -> None:
    """Forget a registered base by name; files are never deleted."""
    records = _load()
    kept = [r for r in records if r["name"] != name]
    if len(kept) == len(records):
        raise ManifestError(f"no registered base is called {name!r} (see `model-merger bases list`)")
    _save(kept)


def download_base(
    ref: str,
    sha256: Optional[str] = None,
    progress: Optional[Callable] = None,
    dest_folder: Optional[str] = None,
    **kw,
) -> BaseEntry:
    """Fetch a base by CivitAI model-version id or URL into the bases folder (resumable, SHA-256 verified)."""
    from .civitai.download import download

    folder = dest_folder or bases_dir()
    path = download(ref, folder, sha256=sha256, progress=progress, **kw)
    path = getattr(path, "path", path)
    return describe(os.fspath(path), "folder")


def bases_for(arch_id: str) -> List[BaseEntry]:
    return [b for b in list_bases() if b.exists and b.arch_id == arch_id and not b.problem]

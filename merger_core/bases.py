"""Base models: the common ancestors that cross-lineage merges take differences from.

Bases live in a folder (``bases_dir()``: ``$MODEL_MERGER_BASES_DIR``, else a folder the host sets with
:func:`use_bases_dirs` — ComfyUI's ``merge_bases`` model folder —, else ``<data dir>/bases``) and in a small registry
(Analyze Structure's, ``<data dir>/bases.json``) of files kept elsewhere, added with ``model-merger bases add FILE`` so that a 7 GB
checkpoint need not be copied. Every base is described by its structure (Analyze Structure's detection, from the
header only), so a merge can pick the bases of its models' architecture.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

from .errors import BadFileError, ManifestError, ModelMergerError
from .userdirs import data_dir

ENV_VAR = "MODEL_MERGER_BASES_DIR"
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


def describe(path: str, source: str = "folder", name: Optional[str] = None) -> BaseEntry:
    """A base's facts from its header (no weight is read)."""
    from .analyze import detect

    path = os.path.abspath(path)
    nm = name or os.path.splitext(os.path.basename(path))[0]
    if not os.path.exists(path):
        return BaseEntry(path, nm, "unknown", "unknown", "unknown", "", 0, source, False, "file not found")
    try:
        det = detect(path, read_probe=False)
    except ModelMergerError as exc:
        return BaseEntry(path, nm, "unknown", "unknown", "unknown", "", os.path.getsize(path), source, True, str(exc))
    return BaseEntry(path, nm, det.arch_id, det.arch_name, det.family, det.variant, det.file_size, source)


def list_bases() -> List[BaseEntry]:
    """Every base: files in the bases folders, then registered files (each path once)."""
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
    from .analyze.lineage import list_bases as registered

    for item in registered():
        p = os.path.abspath(item.path)
        if os.path.realpath(p) in seen:
            continue
        seen.add(os.path.realpath(p))
        out.append(describe(p, "registered", item.name))
    return out


def add_base(path: str, name: Optional[str] = None, copy: bool = False) -> BaseEntry:
    """Register ``path`` as a base (Analyze Structure's registry), or copy it into the bases folder with ``copy``.
    Refuses files whose structure is not a known architecture."""
    from .analyze.lineage import register_base

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
    e = register_base(path, name)
    return describe(e.path, "registered", e.name)


def remove_base(name: str) -> None:
    """Forget a registered base by name; files are never deleted."""
    from .analyze.lineage import remove_base as unregister

    if not unregister(name):
        raise ManifestError(f"no registered base is called {name!r} (see `model-merger bases list`)")


def download_base(
    ref: str,
    sha256: Optional[str] = None,
    progress: Optional[Callable] = None,
    dest_folder: Optional[str] = None,
    **kw,
) -> BaseEntry:
    """Fetch a base by CivitAI model-version id or URL into the bases folder (resumable, SHA-256 verified)."""
    from . import civitai

    folder = dest_folder or bases_dir()
    path = civitai.download(ref, folder, sha256=sha256, progress=progress, **kw)
    path = getattr(path, "path", path)
    return describe(os.fspath(path), "folder")


def bases_for(arch_id: str) -> List[BaseEntry]:
    return [b for b in list_bases() if b.exists and b.arch_id == arch_id and not b.problem]

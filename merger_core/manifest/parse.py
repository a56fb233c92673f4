"""Reading and writing manifests: JSON in (file or pasted text), path resolution, canonical JSON out.

``docs/manifest.md`` documents the format; ``data/manifest.schema.json`` is its JSON Schema. Loading checks the
structure against the schema (unknown keys, wrong types, bad dtype or device strings); :func:`validate` adds the
checks a schema cannot express (finite weights, weights that sum to 0, known method and parameters, duplicate,
missing or non-safetensors files). Every problem names the entry (index and file name) and the field.

In memory, entry paths are absolute (relative paths in a file resolve against the file's folder, pasted JSON
against ``base_dir`` or the current folder). :func:`save_manifest` writes paths inside the manifest's folder as
relative paths with ``/`` separators, so a folder of models plus its manifest can be moved or shared as a whole.
A manifest written by :func:`save_manifest` is canonical: loading and saving it again gives the same bytes.
"""


from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Union

from ..errors import BadFileError, ManifestError, OutputError
from ..io.files import open_regular
from .model import MANIFEST_VERSION, MAX_MANIFEST_BYTES, MODEL_EXTENSION, LoraEntry, Manifest, ManifestEntry, ManifestValidationError, Problem, _entry_label, _problem_order
from .schema import _schema_problems

# ---------------------------------------------------------------------------------------------------------------
# Loading


class _Obj(dict):
    """A JSON object that remembers keys given twice."""

    dup_keys: List[str]


def _pairs_hook(pairs):
    obj = _Obj()
    obj.dup_keys = []
    for k, v in pairs:
        if k in obj:
            obj.dup_keys.append(k)
        obj[k] = v
    return obj


def _duplicate_key_problems(data: Any) -> List[Problem]:
    out: List[Problem] = []
    if isinstance(data, _Obj):
        for k in data.dup_keys:
            out.append(Problem("", k, "key given twice"))
        models = data.get("models")
        if isinstance(models, list):
            for i, e in enumerate(models):
                if isinstance(e, _Obj):
                    for k in e.dup_keys:
                        out.append(Problem(_entry_label(i, e.get("path")), k, "key given twice"))
    return out


def _looks_like_text(source: str) -> bool:
    """JSON text starts with ``{`` or ``[``; an existing file whose name starts so (``[pony] merge.json``) is a file."""
    if source.lstrip()[:1] not in ("{", "["):
        return False
    return "\n" in source or not os.path.exists(os.path.expanduser(source))


def load_manifest(
    path_or_text: Union[str, os.PathLike, bytes],
    *,
    base_dir: Optional[Union[str, os.PathLike]] = None,
) -> Manifest:
    """Read a manifest from a file or from pasted JSON text (anything starting with ``{``).

    Relative model paths resolve against the manifest file's folder; for pasted text, against ``base_dir``
    (default: the current folder). The structure is checked against the JSON Schema here; call :func:`validate`
    (or :func:`merger_core.merge.plan.plan_from_manifest`) for the remaining checks. Raises :class:`ManifestError`.
    """
    source_name: Optional[str] = None
    file_path: Optional[str] = None
    if isinstance(path_or_text, bytes):
        try:
            text = path_or_text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ManifestError("manifest text is not UTF-8") from None
    elif isinstance(path_or_text, str) and not path_or_text.strip():
        raise ManifestError("no manifest given: the text is empty")
    elif isinstance(path_or_text, str) and _looks_like_text(path_or_text):
        text = path_or_text
    else:
        file_path = os.path.abspath(os.path.expanduser(os.fspath(path_or_text)))
        source_name = os.path.basename(file_path)
        text = _read_manifest_file(file_path)
    try:
        data = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{source_name or 'manifest'}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if file_path is not None:
        folder = os.path.dirname(file_path)
    else:
        folder = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else os.getcwd()
    return manifest_from_dict(data, base_dir=folder, source=source_name, path=file_path)


def _read_manifest_file(path: str) -> str:
    name = os.path.basename(path)
    if name.lower().endswith(MODEL_EXTENSION):
        raise ManifestError(f"{name} is a model file, not a manifest (manifests are .json files)")
    try:
        if os.path.isdir(path):
            raise ManifestError(f"{path} is a folder, not a manifest file")
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{name} is {size} bytes, too large to be a manifest")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except BadFileError as exc:
        raise ManifestError(f"{exc}; a manifest must be a regular JSON file") from None
    except FileNotFoundError:
        raise ManifestError(f"manifest file not found: {path}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{name} is not UTF-8 text") from None


def _resolve(path: str, folder: str) -> str:
    p = os.path.expanduser(path)
    if not os.path.isabs(p):
        p = os.path.join(folder, p)
    return os.path.normpath(p)


def manifest_from_dict(
    data: Any,
    *,
    base_dir: Optional[Union[str, os.PathLike]] = None,
    source: Optional[str] = None,
    path: Optional[str] = None,
) -> Manifest:
    """Build a :class:`Manifest` from parsed JSON, checking its structure against the schema.

    Relative model paths resolve against ``base_dir`` (default: the current folder).
    """
    problems = _duplicate_key_problems(data) + _schema_problems(data)
    if problems:
        raise ManifestValidationError(sorted(problems, key=_problem_order), source)
    folder = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else os.getcwd()
    entries = []
    for e in data["models"]:
        w = e.get("weight", 1.0)
        entries.append(
            ManifestEntry(
                path=_resolve(e["path"], folder),
                weight=float(w),
                sha256=e.get("sha256"),
                notes=e.get("notes"),
                civitai=_plain(e.get("civitai")),
            )
        )
    base = data.get("base")
    return Manifest(
        models=entries,
        method=data.get("method", "weighted_sum"),
        normalize=data.get("normalize", True),
        dtype=data.get("dtype", "fp16"),
        device=data.get("device", "cpu"),
        params=_plain(data.get("params", {})),
        base=_resolve(base, folder) if base is not None else None,
        title=data.get("title"),
        seed=data.get("seed", 0),
        allow_missing=data.get("allow_missing", False),
        nonfinite=data.get("nonfinite", "error"),
        key_layout=data.get("key_layout"),
        notes=data.get("notes"),
        path=path,
        loras=[
            LoraEntry(path=_resolve(e["path"], folder), strength_model=float(e.get("strength_model", 1.0)),
                      strength_clip=float(e.get("strength_clip", 1.0)), sha256=e.get("sha256"))
            for e in data.get("loras") or []
        ],
    )


def _plain(obj: Any) -> Any:
    """Turn the loader's dict subclass back into plain dicts (for equality and for callers)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _write_path(path: str, relative_to: Optional[str]) -> str:
    if relative_to is None:
        return path
    folder = os.path.abspath(relative_to)
    p = os.path.abspath(path)
    try:
        inside = os.path.commonpath([folder, p]) == folder
    except ValueError:  # different Windows drives
        inside = False
    if not inside:
        return p
    return os.path.relpath(p, folder).replace(os.sep, "/")


def manifest_to_dict(manifest: Manifest, relative_to: Optional[str] = None) -> Dict[str, Any]:
    """The JSON form: key order fixed, optional fields left out when they have their default value.

    Paths inside ``relative_to`` are written relative to it with ``/`` separators.
    """
    d: Dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "method": manifest.method,
        "normalize": manifest.normalize,
        "dtype": manifest.dtype,
        "device": manifest.device,
        "params": manifest.params,
    }
    if manifest.base is not None:
        d["base"] = _write_path(manifest.base, relative_to)
    if manifest.title is not None:
        d["title"] = manifest.title
    if manifest.seed != 0:
        d["seed"] = manifest.seed
    if manifest.allow_missing:
        d["allow_missing"] = manifest.allow_missing
    if manifest.nonfinite != "error":
        d["nonfinite"] = manifest.nonfinite
    if manifest.key_layout not in (None, "first"):
        d["key_layout"] = manifest.key_layout
    if manifest.notes is not None:
        d["notes"] = manifest.notes
    models = []
    for e in manifest.models:
        m: Dict[str, Any] = {"path": _write_path(e.path, relative_to), "weight": e.weight}
        if e.sha256 is not None:
            m["sha256"] = e.sha256
        if e.notes is not None:
            m["notes"] = e.notes
        if e.civitai is not None:
            m["civitai"] = e.civitai
        models.append(m)
    d["models"] = models
    if manifest.loras:
        d["loras"] = [
            {"path": _write_path(e.path, relative_to), "strength_model": e.strength_model, "strength_clip": e.strength_clip,
             **({"sha256": e.sha256} if e.sha256 is not None else {})}
            for e in manifest.loras
        ]
    return d


def manifest_to_json(manifest: Manifest, relative_to: Optional[str] = None) -> str:
    """The canonical text: 2-space indent, UTF-8 (no ASCII escapes), ``\\n`` line ends, a final newline."""
    bad = [
        Problem(_entry_label(i, e.path), "weight", f"must be a finite number, got {e.weight!r}")
        for i, e in enumerate(manifest.models)
        if isinstance(e.weight, float) and not math.isfinite(e.weight)
    ]
    if bad:
        raise ManifestValidationError(bad, "manifest")
    try:
        return json.dumps(manifest_to_dict(manifest, relative_to), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest cannot be written as JSON: {exc}") from None


def save_manifest(manifest: Manifest, path: Union[str, os.PathLike], *, overwrite: bool = True) -> str:
    """Write ``manifest`` to ``path`` atomically (temporary file beside it, fsync, rename); returns the absolute
    path. Model paths inside the manifest's folder are written relative to it. With ``overwrite=False`` an
    existing file is refused (:class:`OutputError`)."""
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    folder = os.path.dirname(target)
    text = manifest_to_json(manifest, relative_to=folder)
    if os.path.isdir(target):
        raise OutputError(f"{target} is a folder; give a manifest file name")
    if not overwrite and os.path.lexists(target):
        raise OutputError(f"{target} exists; choose another name or allow overwriting")
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write manifest {target}: folder {folder} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a manifest is as readable as any file the user saves
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write manifest {target}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target

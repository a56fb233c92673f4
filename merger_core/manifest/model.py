"""The manifest: a versioned JSON file that says what to merge and how.

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

import dataclasses
import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ManifestError, OutputError
from ..data import data_path

MANIFEST_VERSION = 1
SCHEMA_PATH = data_path("manifest.schema.json")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MODEL_EXTENSION = ".safetensors"
DTYPES = ("fp16", "bf16", "fp32", "keep")

# order of keys in a saved manifest
_TOP_KEYS = ("version", "method", "normalize", "dtype", "device", "params", "base", "title", "seed", "allow_missing", "notes", "models")
_ENTRY_KEYS = ("path", "weight", "sha256", "notes", "civitai")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class ManifestEntry:
    """One input model. ``path`` is absolute once loaded; ``weight`` is a finite number >= 0."""

    path: str
    weight: float = 1.0
    sha256: Optional[str] = None
    notes: Optional[str] = None
    civitai: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class Manifest:
    """A merge recipe. ``path`` is where it was loaded from or saved to (not part of equality)."""

    models: List[ManifestEntry]
    method: str = "weighted_sum"
    normalize: bool = True
    dtype: str = "fp16"
    device: str = "cpu"
    params: Dict[str, Any] = field(default_factory=dict)
    base: Optional[str] = None
    title: Optional[str] = None
    seed: int = 0
    allow_missing: bool = False
    notes: Optional[str] = None
    path: Optional[str] = field(default=None, compare=False)

    @property
    def entries(self) -> List[ManifestEntry]:
        """Another name for :attr:`models`."""
        return self.models

    @property
    def weights(self) -> List[float]:
        return [e.weight for e in self.models]

    @property
    def folder(self) -> Optional[str]:
        """The folder relative paths resolve against (the manifest file's folder), if known."""
        return os.path.dirname(self.path) if self.path else None

    def to_dict(self, relative_to: Optional[str] = None) -> Dict[str, Any]:
        return manifest_to_dict(self, relative_to)

    def to_json(self, relative_to: Optional[str] = None) -> str:
        return manifest_to_json(self, relative_to)

    def validate(self, check_files: bool = True) -> None:
        validate(self, check_files=check_files)


def display_names(paths: Sequence[str]) -> List[str]:
    """Names shown for inputs: the file names, or, where two share a name, paths relative to their common folder
    (``/`` separators). Never absolute paths."""
    base = [os.path.basename(p) for p in paths]
    if len(set(base)) == len(base):
        return base
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        return base
    out = []
    for p in paths:
        out.append(os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One validation problem: ``where`` is ``models[2] (name.safetensors)`` or ``""`` for the top level."""

    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.where, self.field, self.message) if p)


class ManifestValidationError(ManifestError):
    """A manifest failed validation; :attr:`problems` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        head = source or "manifest"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            msg = f"{head} has {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


def _entry_label(index: int, path: Any) -> str:
    if isinstance(path, str) and path:
        return f"models[{index}] ({os.path.basename(path.replace(chr(92), '/')) or path})"
    return f"models[{index}]"


# ---------------------------------------------------------------------------------------------------------------
# Schema


_schema_cache: Optional[dict] = None
_validator_cache = None


def load_schema() -> dict:
    """The manifest's JSON Schema (a dict)."""
    global _schema_cache
    if _schema_cache is None:
        with open(SCHEMA_PATH, encoding="utf-8") as f:
            _schema_cache = json.load(f)
    return _schema_cache


def _validator():
    global _validator_cache
    if _validator_cache is None:
        import jsonschema

        schema = load_schema()
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _validator_cache = cls(schema)
    return _validator_cache


_TYPE_WORDS = {
    "number": "a number",
    "integer": "a whole number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a JSON object",
    "array": "a list",
    "null": "null",
}


def _jsonish(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_problems(data: Any) -> List[Problem]:
    problems: List[Tuple[tuple, Problem]] = []
    models = data.get("models") if isinstance(data, dict) else None

    def where_of(path: Sequence[Any]) -> Tuple[str, List[str]]:
        path = list(path)
        if len(path) >= 2 and path[0] == "models" and isinstance(path[1], int):
            entry = models[path[1]] if isinstance(models, list) and path[1] < len(models) else None
            label = _entry_label(path[1], entry.get("path") if isinstance(entry, dict) else None)
            return label, [str(p) for p in path[2:]]
        return "", [str(p) if not isinstance(p, int) else f"[{p}]" for p in path]

    def field_name(parts: List[str]) -> str:
        return ".".join(parts).replace(".[", "[")

    for err in _validator().iter_errors(data):
        where, parts = where_of(err.absolute_path)
        kind = err.validator
        inst = err.instance
        apath = list(err.absolute_path)
        entry_index = apath[1] if len(apath) >= 2 and apath[0] == "models" and isinstance(apath[1], int) else None
        head = (1, entry_index) if entry_index is not None else (0, 0)
        sort_key = (head,) + tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in apath)
        if kind == "additionalProperties" and isinstance(inst, dict):
            allowed = list(err.schema.get("properties", {}))
            for key in inst:
                if key not in allowed:
                    close = difflib.get_close_matches(key, allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    msg = f"unknown key{hint}; allowed keys: {', '.join(allowed)}"
                    problems.append((sort_key + ((1, key),), Problem(where, field_name(parts + [key]), msg)))
            continue
        if kind == "required" and isinstance(inst, dict):
            for key in err.validator_value:
                if key not in inst:
                    problems.append((sort_key + ((1, key),), Problem(where, field_name(parts + [key]), "missing (required)")))
            continue
        fname = field_name(parts)
        if kind == "type":
            types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
            if not parts and not where:
                msg = f"the manifest must be a JSON object, got {_jsonish(inst)}"
            else:
                msg = f"must be {' or '.join(_TYPE_WORDS.get(t, t) for t in types)}, got {_jsonish(inst)}"
        elif kind == "enum":
            msg = f"{_jsonish(inst)} is not one of {', '.join(map(str, err.validator_value))}"
        elif kind == "const" and fname == "version":
            if isinstance(inst, int) and not isinstance(inst, bool) and inst > MANIFEST_VERSION:
                msg = f"version {inst} is newer than this program reads ({MANIFEST_VERSION}); update model-merger"
            else:
                msg = f"must be {MANIFEST_VERSION}, got {_jsonish(inst)}"
        elif kind == "pattern" and fname == "device":
            msg = f"{_jsonish(inst)} is not a device; use cpu, cuda, cuda:N, mps or auto"
        elif kind == "pattern" and fname == "sha256":
            msg = f"must be 64 hexadecimal digits (a SHA-256), got {_jsonish(inst)}"
        elif kind == "minimum":
            msg = f"must be >= {err.validator_value}, got {_jsonish(inst)}"
        elif kind == "minItems" and fname == "models":
            msg = f"a merge needs at least {err.validator_value} models, got {len(inst)}"
        elif kind == "minLength":
            msg = "must not be empty"
        elif kind == "anyOf" and parts[:1] == ["params"]:
            msg = f"must be a number or a list of numbers, got {_jsonish(inst)}"
        else:
            msg = err.message
        problems.append((sort_key, Problem(where, fname, msg)))
    problems.sort(key=lambda kp: kp[0])
    return [p for _, p in problems]


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
        size = os.path.getsize(path)
        if os.path.isdir(path):
            raise ManifestError(f"{path} is a folder, not a manifest file")
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{name} is {size} bytes, too large to be a manifest")
        with open(path, "rb") as f:
            raw = f.read()
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
        notes=data.get("notes"),
        path=path,
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


# ---------------------------------------------------------------------------------------------------------------
# Building from a scan


def manifest_from_scan(
    scan_result,
    weights: Optional[Union[Sequence[float], Mapping[str, float]]] = None,
    **fields: Any,
) -> Manifest:
    """A manifest over the matches of a :class:`~merger_core.scan.ScanResult` (or a list of paths).

    ``weights``: ``None`` gives every model weight 1.0 (equal weights); a sequence gives one weight per match in
    order; a mapping gives weights by full path or file name (unnamed models get 1.0). ``fields`` set other
    manifest fields (``method``, ``dtype``...).
    """
    paths = list(getattr(scan_result, "matches", scan_result))
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if weights is None:
        ws = [1.0] * len(paths)
    elif isinstance(weights, Mapping):
        known = {p for p in paths} | {os.path.basename(p) for p in paths}
        unknown = [k for k in weights if k not in known]
        if unknown:
            raise ManifestError(f"weights given for files the scan did not find: {', '.join(map(str, unknown))}")
        ws = [float(weights.get(p, weights.get(os.path.basename(p), 1.0))) for p in paths]
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(paths):
            raise ManifestError(f"{len(ws)} weights given for {len(paths)} models")
    return Manifest(models=[ManifestEntry(path=p, weight=w) for p, w in zip(paths, ws)], **fields)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _source_name(manifest: Manifest) -> str:
    return os.path.basename(manifest.path) if manifest.path else "manifest"


def validate(manifest: Manifest, check_files: bool = True) -> None:
    """Check everything; raises :class:`ManifestValidationError` listing every problem, each naming the entry
    and field. ``check_files=False`` skips what needs the file system (existence, links to one file)."""
    from .. import methods as _methods

    source = _source_name(manifest)
    problems = _schema_problems(manifest_to_dict(manifest))
    if problems:
        raise ManifestValidationError(problems, source)

    models = manifest.models
    labels = [_entry_label(i, e.path) for i, e in enumerate(models)]

    # method, its parameters and its number of inputs
    method = None
    try:
        method = _methods.get_method(manifest.method)
    except ManifestError as exc:
        problems.append(Problem("", "method", str(exc)))
    if method is not None:
        try:
            method.check_inputs(len(models))
        except ManifestError as exc:
            problems.append(Problem("", "models", str(exc)))
        try:
            method.check_params(dict(manifest.params))
        except ManifestError as exc:
            problems.append(Problem("", "params", str(exc)))
        if manifest.base is not None and not getattr(method, "takes_base", False):
            problems.append(Problem("", "base", f"method {manifest.method!r} does not use a base model; remove 'base'"))

    # weights
    finite = True
    for label, e in zip(labels, models):
        if not math.isfinite(e.weight):
            finite = False
            problems.append(Problem(label, "weight", f"must be a finite number, got {e.weight!r}"))
    uses_weights = method.uses_weights if method is not None else True
    if finite and uses_weights and manifest.normalize and models and sum(e.weight for e in models) == 0:
        problems.append(
            Problem("", "models", "the weights sum to 0, so they cannot be normalised; give at least one model a weight above 0")
        )

    # files
    files = [(label, e.path) for label, e in zip(labels, models)]
    if manifest.base is not None:
        files.append(("base", manifest.base))
    problems.extend(_file_problems(files, check_files))
    if problems:
        raise ManifestValidationError(sorted(problems, key=_problem_order), source)


def _problem_order(p: Problem) -> Tuple[int, int]:
    """Top-level problems first, then by entry index (stable for problems of one entry)."""
    if p.where.startswith("models["):
        return (1, int(p.where[7 : p.where.index("]")]))
    return (0, 0)


def _file_problems(files: List[Tuple[str, str]], check_files: bool) -> List[Problem]:
    from .scan import SKIP_REASONS

    problems: List[Problem] = []
    stats: List[Tuple[str, str, Optional[os.stat_result]]] = []
    for label, path in files:
        where, fld = ("", "base") if label == "base" else (label, "path")
        ext = os.path.splitext(path)[1].lower()
        if ext != MODEL_EXTENSION:
            reason = SKIP_REASONS.get(ext, "only .safetensors files are merge inputs")
            problems.append(Problem(where, fld, f"{os.path.basename(path)} is not a .safetensors file: {reason}"))
            continue
        st = None
        if check_files:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                kind = "broken symbolic link" if os.path.islink(path) else "file not found"
                problems.append(Problem(where, fld, f"{kind}: {path}"))
                continue
            except OSError as exc:
                problems.append(Problem(where, fld, f"cannot read {path}: {exc.strerror or exc}"))
                continue
            if os.path.isdir(path):
                problems.append(Problem(where, fld, f"{path} is a folder, not a file"))
                continue
            if not os.access(path, os.R_OK):
                problems.append(Problem(where, fld, f"cannot read {path}: permission denied"))
                continue
        stats.append((label, path, st))
    # duplicates: the same path, the same real path, or the same file (hard links, via samestat)
    for j in range(len(stats)):
        lj, pj, sj = stats[j]
        for i in range(j):
            li, pi, si = stats[i]
            how = None
            if os.path.normcase(pi) == os.path.normcase(pj):
                how = "listed twice"
            elif check_files and os.path.normcase(os.path.realpath(pi)) == os.path.normcase(os.path.realpath(pj)):
                how = "through a symbolic link"
            elif si is not None and sj is not None and os.path.samestat(si, sj):
                how = "a hard link"
            if how is not None:
                if lj == "base":
                    problems.append(Problem("", "base", f"same file as {li} ({how}); the base cannot also be a model"))
                else:
                    problems.append(Problem(lj, "path", f"same file as {li} ({how}); each file may appear once"))
                break
    return problems

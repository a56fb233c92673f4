"""The checks a schema cannot express: finite weights that do not sum to 0, a known method and parameters, and
duplicate, missing, special or non-safetensors files; every problem names the entry and the field."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

from ..errors import ManifestError
from ..io.files import not_regular_reason
from .model import MODEL_EXTENSION, Manifest, ManifestValidationError, Problem, _entry_label, _problem_order
from .parse import manifest_to_dict
from .schema import _schema_problems

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
    if finite and models and not math.isfinite(sum(e.weight for e in models)):
        finite = False
        problems.append(Problem("", "models", f"the weights sum to {sum(e.weight for e in models)!r}, which is not a "
                                              "finite number; use smaller weights"))
    if finite and uses_weights and manifest.normalize and models and sum(e.weight for e in models) == 0:
        problems.append(
            Problem("", "models", "the weights sum to 0, so they cannot be normalised; give at least one model a weight above 0")
        )

    # LoRAs: finite strengths
    lora_labels = [f"loras[{i}] ({os.path.basename(e.path)})" for i, e in enumerate(manifest.loras)]
    for label, e in zip(lora_labels, manifest.loras):
        for fld in ("strength_model", "strength_clip"):
            if not math.isfinite(getattr(e, fld)):
                problems.append(Problem(label, fld, f"must be a finite number, got {getattr(e, fld)!r}"))

    # files
    files = [(label, e.path) for label, e in zip(labels, models)]
    if manifest.base is not None:
        files.append(("base", manifest.base))
    files.extend(zip(lora_labels, (e.path for e in manifest.loras)))
    problems.extend(_file_problems(files, check_files))
    if problems:
        raise ManifestValidationError(sorted(problems, key=_problem_order), source)


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
            special = not_regular_reason(path, st)
            if special is not None:
                problems.append(Problem(where, fld, special))
                continue
            if not os.access(path, os.R_OK):
                problems.append(Problem(where, fld, f"cannot read {path}: permission denied"))
                continue
        stats.append((label, path, st))
    # duplicates: the same path, the same real path, or the same file (hard links: device and inode), each looked
    # up in a table of the entries before it (one realpath per entry: linear in the number of models)
    kinds = ("listed twice", "through a symbolic link", "a hard link")  # in this order when one entry is all three
    seen: Dict[str, Dict[object, Tuple[int, str]]] = {how: {} for how in kinds}
    for n, (label, path, st) in enumerate(stats):
        keys = {"listed twice": os.path.normcase(path)}
        if check_files:
            keys["through a symbolic link"] = os.path.normcase(os.path.realpath(path))
        if st is not None and st.st_ino:
            keys["a hard link"] = (st.st_dev, st.st_ino)
        earlier = [(seen[how][k][0], kinds.index(how), seen[how][k][1], how) for how, k in keys.items() if k in seen[how]]
        for how, k in keys.items():
            seen[how].setdefault(k, (n, label))
        if earlier:
            _, _, first, how = min(earlier)
            if label == "base":
                problems.append(Problem("", "base", f"same file as {first} ({how}); the base cannot also be a model"))
            else:
                problems.append(Problem(label, "path", f"same file as {first} ({how}); each file may appear once"))
    return problems

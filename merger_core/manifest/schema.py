"""The manifest's JSON Schema (``data/manifest.schema.json``) and its errors in plain words, per entry and field."""

from __future__ import annotations

import difflib
import json
from typing import Any, List, Optional, Sequence, Tuple

from ..data import data_path
from .model import MANIFEST_VERSION, Problem, _entry_label

SCHEMA_PATH = data_path("manifest.schema.json")

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

"""Find merge inputs: folders and glob patterns, expanded by this program (not the shell), the same on every OS.

Rules (``docs/scan.md`` explains them for users):

* An argument that names an existing path is taken literally, whatever characters it holds: a file is a match,
  a folder means the ``.safetensors`` files directly inside it (``folder/**/`` or ``recursive=True`` goes down
  into sub-folders).
* Otherwise the argument is a pattern. ``*`` matches any run of characters inside one name, ``?`` one character,
  ``[abc]`` / ``[!abc]`` one character from (not from) a set, and a path part that is exactly ``**`` matches zero
  or more folders. ``/`` separates parts everywhere; on Windows ``\\`` does too. The backslash is never an
  escape: write ``[[]`` for a literal ``[``, ``[]]`` for ``]``, ``[*]`` and ``[?]`` (:func:`escape` does it).
  A name that equals a pattern part character for character is matched as well, so ``model [v2].safetensors``
  finds that file even inside a larger pattern.
* Wildcard parts match names ignoring case on every OS; parts without wildcards are looked up as written (the
  file system decides about case). Wildcards do not match a leading ``.`` (hidden files and folders) unless the
  pattern part itself starts with ``.``; ``**`` does not enter hidden folders.
* The filter is applied while walking: each folder is read once with ``os.scandir`` and every name is tested
  against patterns compiled once per scan.
* Only ``.safetensors`` files are merge inputs. Pickle-format checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``,
  ``.pkl``) are reported in :attr:`ScanResult.skipped` with the reason, both when the pattern matches them and
  when they would match with a ``.safetensors`` extension.
* Matches are de-duplicated by the file they point to (real path, device and inode: symbolic and hard links to
  one file count once) and sorted.
* A pattern that matches no ``.safetensors`` file raises :class:`~merger_core.errors.ScanError` naming it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ManifestError, ScanError
from ..io.files import not_regular_reason
from .model import Manifest, ManifestEntry

MODEL_EXTENSION = ".safetensors"
DEFAULT_FILTER = "*" + MODEL_EXTENSION
DEFAULT_MANIFEST_NAME = "manifest.json"

PICKLE_REASON = "pickle format: loading it can run arbitrary code, so it is never a merge input; convert it to .safetensors first"
SKIP_REASONS: Dict[str, str] = {
    ".ckpt": PICKLE_REASON,
    ".pt": PICKLE_REASON,
    ".pth": PICKLE_REASON,
    ".bin": PICKLE_REASON,
    ".pkl": PICKLE_REASON,
    ".gguf": "GGUF (quantised) file: not a merge input; only .safetensors files are merged",
}
NOT_SAFETENSORS_REASON = "not a .safetensors file; only .safetensors files are merge inputs"
BROKEN_LINK_REASON = "broken symbolic link: its target does not exist"

_MAGIC = re.compile(r"[*?[]")
_SEPS = "/\\" if os.name == "nt" else "/"
_SPLIT = re.compile("[" + re.escape(_SEPS) + "]+")


@dataclass
class ScanResult:
    """What a scan found.

    * ``matches``: absolute paths of the ``.safetensors`` files, one per distinct file, sorted.
    * ``skipped``: ``(path, reason)`` for files that were found but are not merge inputs, and for folders that
      could not be read.
    * ``patterns``: the arguments as given.
    * ``default_manifest_dir``: the deepest folder that contains every match (see :func:`common_folder`);
      ``None`` when there are no matches or they share no folder (different Windows drives).
    * ``duplicates``: ``(dropped, kept)`` for matches that are the same file as another match.
    """

    matches: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    patterns: List[str] = field(default_factory=list)
    default_manifest_dir: Optional[str] = None
    duplicates: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def default_manifest_path(self) -> Optional[str]:
        """``default_manifest_dir/manifest.json``, or ``None`` without a default folder."""
        if self.default_manifest_dir is None:
            return None
        return os.path.join(self.default_manifest_dir, DEFAULT_MANIFEST_NAME)


def escape(path: str) -> str:
    """Escape the wildcard characters of ``path`` so that a pattern matches it literally (``[`` -> ``[[]``)."""
    return glob.escape(path)


def has_magic(text: str) -> bool:
    """True when ``text`` contains a wildcard character (``*``, ``?`` or ``[``)."""
    return _MAGIC.search(text) is not None


def common_folder(paths: Sequence[str]) -> Optional[str]:
    """The deepest folder containing every path: the common leading folders of the files' parent folders.

    One file gives its own folder; files on different Windows drives give ``None``.
    """
    if not paths:
        return None
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Pattern compilation


class _Part:
    """One path part of a pattern, compiled once."""

    __slots__ = ("text", "recursive", "magic", "regex", "dot_ok")

    def __init__(self, text: str, case_sensitive: bool):
        self.text = text
        self.recursive = text == "**"
        self.magic = has_magic(text)
        self.dot_ok = text.startswith(".")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.regex = re.compile(fnmatch.translate(text), flags) if self.magic and not self.recursive else None

    def matches(self, name: str) -> bool:
        if name == self.text:
            return True
        if self.regex is None:
            return False
        if name.startswith(".") and not self.dot_ok:
            return False
        return self.regex.match(name) is not None


class _Walk:
    """State of one scan call: the folder-listing cache, matches and skips."""

    def __init__(self, case_sensitive: bool):
        self.case_sensitive = case_sensitive
        self.listings: Dict[str, Optional[List[os.DirEntry]]] = {}
        self.skipped: Dict[str, str] = {}
        self.found: Dict[str, bool] = {}  # candidate path -> is a symbolic link
        self.hits: set = set()  # .safetensors paths matched by the current argument

    # -- folder reading ----------------------------------------------------------------------------------------
    def listing(self, folder: str) -> List[os.DirEntry]:
        if folder not in self.listings:
            try:
                with os.scandir(folder) as it:
                    self.listings[folder] = list(it)
            except OSError as exc:
                self.listings[folder] = None
                self.skipped[folder] = f"cannot read folder: {exc.strerror or exc}"
        return self.listings[folder] or []

    def subfolders(self, folder: str, part: Optional[_Part]) -> List[str]:
        out = []
        for e in self.listing(folder):
            if part is not None and not part.matches(e.name):
                continue
            if part is None and e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    out.append(os.path.join(folder, e.name))
            except OSError:
                continue
        return out

    def recursive(self, folder: str) -> List[str]:
        """``folder`` and every non-hidden folder below it; symbolic links are followed once (no loops)."""
        out, seen, stack = [], set(), [folder]
        while stack:
            d = stack.pop()
            real = os.path.normcase(os.path.realpath(d))
            if real in seen:
                continue
            seen.add(real)
            out.append(d)
            stack.extend(reversed(self.subfolders(d, None)))
        return out

    # -- file matching ---------------------------------------------------------------------------------------
    def files(self, folder: str, part: _Part) -> None:
        for e in self.listing(folder):
            name = e.name
            ext = os.path.splitext(name)[1].lower()
            if not part.matches(name):
                # a pickle file that would match as .safetensors is reported, so users see why it is missing
                if not (ext in SKIP_REASONS and part.matches(name[: -len(ext)] + MODEL_EXTENSION)):
                    continue
            path = os.path.join(folder, name)
            try:
                if e.is_dir():
                    continue
                is_link = e.is_symlink()
            except OSError:
                continue
            self.consider(path, is_link, literal=False)

    def consider(self, path: str, is_link: bool, literal: bool) -> None:
        ext = os.path.splitext(path)[1].lower()
        if ext == MODEL_EXTENSION:
            try:
                special = not_regular_reason(path)
            except OSError:
                special = BROKEN_LINK_REASON if is_link else "cannot be read"
            if special == BROKEN_LINK_REASON or (is_link and not os.path.exists(path)):
                self.skipped[path] = BROKEN_LINK_REASON
            elif special is not None:
                self.skipped[path] = special.replace(path + " is ", "", 1)  # "a named pipe (FIFO), not a regular file"
            else:
                self.found[path] = is_link
                self.hits.add(path)
        elif ext in SKIP_REASONS:
            self.skipped[path] = SKIP_REASONS[ext]
        elif literal:
            self.skipped[path] = NOT_SAFETENSORS_REASON

    # -- patterns ----------------------------------------------------------------------------------------------
    def expand(self, anchor: str, parts: List[str]) -> None:
        """Match the pattern ``parts`` (the last one names files) below the existing folder ``anchor``."""
        compiled = [_Part(p, self.case_sensitive) for p in parts]
        folders = [anchor]
        for part in compiled[:-1]:
            nxt: List[str] = []
            for d in folders:
                if part.recursive:
                    nxt.extend(self.recursive(d))
                elif part.magic:
                    nxt.extend(self.subfolders(d, part))
                else:
                    p = os.path.join(d, part.text)
                    if os.path.isdir(p):
                        nxt.append(p)
            folders = _unique_folders(nxt)
            if not folders:
                return
        last = compiled[-1]
        for d in folders:
            if last.magic:
                self.files(d, last)
            else:
                p = os.path.join(d, last.text)
                if os.path.lexists(p) and not os.path.isdir(p):
                    self.consider(p, os.path.islink(p), literal=False)
                else:
                    # a pickle file named like the wanted .safetensors file
                    stem, ext = os.path.splitext(p)
                    if ext.lower() == MODEL_EXTENSION:
                        for pext in SKIP_REASONS:
                            if os.path.lexists(stem + pext):
                                self.consider(stem + pext, False, literal=False)


def _unique_folders(folders: Iterable[str]) -> List[str]:
    seen, out = set(), []
    for d in folders:
        real = os.path.normcase(os.path.realpath(d))
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out


def _split(pattern: str) -> List[str]:
    return [p for p in _SPLIT.split(pattern) if p not in ("", ".")]


def _anchor_and_parts(pattern: str, cwd: str) -> Tuple[str, List[str], bool]:
    """Split a pattern into the folder before its first wildcard part and the parts from there on.

    Returns ``(anchor, parts, ends_with_folder)``; ``ends_with_folder`` is True when the pattern ends with a
    separator or with ``**`` (the file filter is then added as the last part).
    """
    drive, rest = os.path.splitdrive(pattern)
    if rest[:1] and rest[0] in _SEPS:
        anchor = drive + os.sep
    elif drive:
        anchor = os.path.join(drive, os.sep)  # "C:foo" is treated as "C:\\foo"
    else:
        anchor = cwd
    parts = _split(rest)
    ends_with_folder = rest.endswith(tuple(_SEPS)) or (bool(parts) and parts[-1] == "**")
    i = 0
    while i < len(parts) and not has_magic(parts[i]):
        i += 1
    if not ends_with_folder and i == len(parts):
        i -= 1  # the last part names files even without a wildcard
    literal, parts = parts[:i], parts[i:]
    anchor = os.path.normpath(os.path.join(anchor, *literal)) if literal else os.path.normpath(anchor)
    return anchor, parts, ends_with_folder


def _check_filter(file_filter: str) -> List[str]:
    parts = _split(file_filter)
    if not parts or os.path.isabs(file_filter) or ".." in parts or os.path.splitdrive(file_filter)[0]:
        raise ScanError(f"file filter {file_filter!r} must be a pattern inside the folder (no '..', not absolute)")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Public API


def scan(
    patterns_or_folders: Sequence[str | os.PathLike],
    file_filter: Optional[str] = None,
    *,
    recursive: bool = False,
    case_sensitive: bool = False,
    allow_empty: bool = False,
    cwd: Optional[str | os.PathLike] = None,
) -> ScanResult:
    """Expand folders and glob patterns into the ``.safetensors`` files they name.

    ``file_filter`` (default ``*.safetensors``) is the pattern used inside folder arguments and after patterns
    that end with a separator or ``**``; ``recursive=True`` makes folder arguments go down into sub-folders, like
    ``folder/**/``. Relative patterns start at ``cwd`` (default: the current folder) and ``~`` is expanded.
    Raises :class:`ScanError` naming every argument that matched no ``.safetensors`` file, unless
    ``allow_empty``.
    """
    if isinstance(patterns_or_folders, (str, os.PathLike)):
        patterns_or_folders = [patterns_or_folders]
    filter_parts = _check_filter(file_filter or DEFAULT_FILTER)
    base = os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd()
    walk = _Walk(case_sensitive)
    patterns = [os.fspath(p) for p in patterns_or_folders]
    if not patterns:
        raise ScanError("nothing to scan: give at least one folder or pattern")
    failures: List[str] = []
    for pattern in patterns:
        before_skipped = set(walk.skipped)
        walk.hits = set()
        if not pattern.strip():
            failures.append(f"{pattern!r}: empty pattern")
            continue
        expanded = os.path.expanduser(pattern)
        literal = os.path.join(base, expanded)
        missing_anchor = None
        if os.path.lexists(literal):
            if os.path.isdir(literal):
                walk.expand(os.path.normpath(literal), (["**"] if recursive else []) + filter_parts)
            else:
                walk.consider(os.path.normpath(literal), os.path.islink(literal), literal=True)
        else:
            anchor, parts, to_folder = _anchor_and_parts(expanded, base)
            if to_folder:
                parts = parts + ([] if parts and parts[-1] == "**" or not recursive else ["**"]) + filter_parts
            if not os.path.isdir(anchor):
                missing_anchor = anchor
            else:
                walk.expand(anchor, parts)
        if not walk.hits:
            failures.append(_no_match_message(pattern, walk, before_skipped, missing_anchor))
    if failures and not allow_empty:
        raise ScanError("\n".join(failures))
    return _result(walk, patterns)


def _no_match_message(pattern: str, walk: _Walk, before_skipped, missing_anchor: Optional[str]) -> str:
    msg = f"no .safetensors file matches {pattern!r}"
    if missing_anchor is not None:
        return msg + f" (folder {missing_anchor} does not exist)"
    new_skips = [(p, r) for p, r in walk.skipped.items() if p not in before_skipped]
    if new_skips:
        shown = "; ".join(f"{os.path.basename(p) or p}: {r}" for p, r in new_skips[:3])
        more = f"; and {len(new_skips) - 3} more" if len(new_skips) > 3 else ""
        return msg + f" (skipped: {shown}{more})"
    if "[" in pattern:
        msg += " (to match '[', ']', '*' or '?' literally, write them as [[], []], [*], [?])"
    return msg


def _result(walk: _Walk, patterns: List[str]) -> ScanResult:
    groups: Dict[object, List[str]] = {}
    for path in walk.found:
        try:
            st = os.stat(path)
            key: object = (st.st_dev, st.st_ino) if st.st_ino else os.path.normcase(os.path.realpath(path))
        except OSError:
            key = os.path.normcase(os.path.realpath(path))
        groups.setdefault(key, []).append(path)
    matches, duplicates = [], []
    for paths in groups.values():
        # keep a path that is not a symbolic link if there is one, then the shortest, then the first in order
        paths.sort(key=lambda p: (walk.found[p], len(p), p))
        keep = os.path.abspath(paths[0])
        matches.append(keep)
        duplicates.extend((os.path.abspath(p), keep) for p in paths[1:])
    matches.sort()
    duplicates.sort()
    skipped = sorted((os.path.abspath(p), r) for p, r in walk.skipped.items())
    return ScanResult(matches, skipped, list(patterns), common_folder(matches), duplicates)


def scan_folder(
    root: str | os.PathLike,
    file_filter: str = DEFAULT_FILTER,
    recursive: bool = False,
    *,
    case_sensitive: bool = False,
    allow_empty: bool = False,
) -> ScanResult:
    """The ``.safetensors`` files in ``root`` whose names match ``file_filter`` (a pattern relative to ``root``,
    which may itself contain ``**/``); ``recursive=True`` also looks in every sub-folder.

    ``root`` is always taken literally (no wildcards) and the filter may not leave it (no ``..``, not absolute),
    so a caller can restrict scans to known folders. Raises :class:`ScanError` if ``root`` is not a folder or
    nothing matches (unless ``allow_empty``).
    """
    root_s = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(root_s):
        raise ScanError(f"folder {root_s} does not exist")
    if not os.path.isdir(root_s):
        raise ScanError(f"{root_s} is not a folder")
    file_filter = file_filter or DEFAULT_FILTER
    parts = _check_filter(file_filter)
    if parts[-1] == "**" or file_filter.endswith(tuple(_SEPS)):
        parts = parts + _split(DEFAULT_FILTER)
    if recursive and parts[0] != "**":
        parts = ["**"] + parts
    walk = _Walk(case_sensitive)
    walk.expand(root_s, parts)
    shown = os.path.join(root_s, file_filter)
    if not walk.found and not allow_empty:
        raise ScanError(_no_match_message(shown, walk, set(), None))
    return _result(walk, [shown])


# ---------------------------------------------------------------------------------------------------------------
# Building from a scan


def manifest_from_scan(
    scan_result,
    weights: Optional[Union[Sequence[float], Mapping[str, float]]] = None,
    **fields: Any,
) -> Manifest:
    """A manifest over the matches of a :class:`~merger_core.manifest.scan.ScanResult` (or a list of paths).

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

"""Who the inputs of a merge are, by their bytes: each input's full-file SHA-256 (AutoV2 is its first 10 hex
digits) and A1111's legacy AutoV1, for the recipe an output carries.

Hashes come from the hash cache when it knows the file unchanged; the rest are computed in the same run, in
background threads that read each input once from the start while the merge reads it key by key (the two share the
page cache, so on a machine with the RAM for it the disk is read once). The header is written before any tensor data,
so the recipe holds fixed-width placeholders for hashes still being computed; the writer replaces them with the real
values before it renames the file into place (:meth:`InputHashes.fill`). A hash is recorded in the cache once the
file is known not to have changed while it was read.

A manifest's ``sha256`` is taken as a hint only: the cache's value, or the one computed here, is what the recipe
records, and a mismatch is reported in the notes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..errors import BadFileError, ModelMergerError
from ..identity.hashing import AUTOV1_LENGTH, AUTOV1_OFFSET, FileHashes, HashCancelled, hash_file, normalize_sha256


def sha256_placeholder(i: int) -> str:
    """The 64 characters the recipe holds for input ``i``'s SHA-256 until it is known (no JSON escaping needed)."""
    return f"@model-merger-pending-sha256-of-input-{i:05d}@".ljust(64, "@")


def autov2_placeholder(i: int) -> str:
    """The 10 characters the recipe holds for input ``i``'s AutoV2 until it is known."""
    return f"@av2{i:05d}@"


def autov1_of(path: str) -> Optional[str]:
    """A1111's legacy hash: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits (None for a smaller file)."""
    try:
        with open(path, "rb") as f:
            f.seek(AUTOV1_OFFSET)
            data = f.read(AUTOV1_LENGTH)
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()[:8] if data else None


@dataclass
class InputIdentity:
    name: str
    path: str
    size: int
    sha256: Optional[str] = None  # known (cache, or computed in this run once finished)
    autov1: Optional[str] = None
    pending: bool = False  # being computed in this run
    claimed: Optional[str] = None  # a manifest's sha256, checked against the file's


class InputHashes:
    """The identities of a plan's inputs, and the hashing of those not yet known.

    ``enabled=False`` (``--no-input-hashes``) hashes nothing: the recipe records what the cache or the manifest
    already knows and ``null`` for the rest.
    """

    def __init__(self, plan, headers, *, enabled: bool = True, cache=None):
        self.enabled = enabled
        self._cache = cache
        self.notes: List[str] = []
        self.inputs: List[InputIdentity] = []
        self._jobs: Dict[str, Future] = {}  # real path -> its hash
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stop = threading.Event()
        self._first_of: Dict[str, int] = {}
        self.fills: Dict[str, str] = {}  # placeholder -> value, once the run's hashes are known
        entries = [(inp.display_name(), inp.path, header.file_size, inp.sha256) for inp, header in zip(plan.inputs, headers)]
        for lora in getattr(plan, "loras", None) or []:
            try:
                size = os.stat(lora.path).st_size
            except OSError as exc:
                raise BadFileError(f"{lora.display_name()}: cannot be read ({exc.strerror or exc})") from exc
            entries.append((lora.display_name(), lora.path, size, lora.sha256))
        n_models = len(plan.inputs)
        for i, (name, path, size, claimed) in enumerate(entries):
            real = os.path.realpath(path)
            ident = InputIdentity(name, real, size, claimed=normalize_sha256(claimed))
            known = self._cached(real)
            if known is not None:
                ident.sha256, ident.autov1 = known.sha256, known.autov1
                if ident.claimed and ident.claimed != ident.sha256:
                    self.notes.append(
                        f"{ident.name}: the manifest's sha256 ({ident.claimed[:10]}...) is not this file's "
                        f"({ident.sha256[:10]}...); the recipe records the file's"
                    )
            elif enabled:
                ident.pending = True
            else:
                ident.sha256 = ident.claimed
            if ident.autov1 is None:
                ident.autov1 = autov1_of(real)
            self._first_of.setdefault(real, i)
            self.inputs.append(ident)
        self.loras = self.inputs[n_models:]  # the LoRAs' identities (indexes after the models')
        self.inputs = self.inputs[:n_models]

    # -- the cache --------------------------------------------------------------------------------------------
    def cache(self):
        if self._cache is None:
            from ..identity.cache import open_cache

            try:
                self._cache = open_cache()
            except Exception:  # the cache is an optimisation: no cache, no lookups
                self._cache = False
        return self._cache or None

    def _cached(self, path: str) -> Optional[FileHashes]:
        cache = self.cache()
        if cache is None:
            return None
        try:
            return cache.lookup(path, ("sha256",))
        except ModelMergerError:
            return None

    # -- what the recipe holds ------------------------------------------------------------------------------
    @property
    def everything(self) -> List[InputIdentity]:
        return self.inputs + self.loras

    def sha256_field(self, i: int) -> Optional[str]:
        """The recipe's SHA-256 of entry ``i`` (the models, then the LoRAs): the value, or its placeholder."""
        ident = self.everything[i]
        return sha256_placeholder(self._first_of[ident.path]) if ident.pending else ident.sha256

    def autov2_field(self, i: int) -> Optional[str]:
        ident = self.everything[i]
        if ident.pending:
            return autov2_placeholder(self._first_of[ident.path])
        return ident.sha256[:10] if ident.sha256 else None

    @property
    def pending(self) -> List[InputIdentity]:
        return [x for x in self.everything if x.pending]

    # -- hashing in the run -------------------------------------------------------------------------------------
    def start(self, threads: Optional[int] = None) -> None:
        """Start hashing the inputs not yet known, each in its own thread (at most ``threads`` at once: default the
        CPUs, as hashlib releases the GIL)."""
        todo = sorted({x.path for x in self.pending})
        if not todo:
            return
        n = max(1, min(len(todo), threads or os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="model-merger-input-hash")
        for path in todo:
            self._jobs[path] = self._pool.submit(self._hash, path)

    def _hash(self, path: str) -> FileHashes:
        return hash_file(path, ("sha256",), cancel=self._stop.is_set, threads=False)

    def finish(self, headers) -> Dict[str, str]:
        """Wait for the hashes, record them in the cache, and return {placeholder: value} for the writer."""
        fills: Dict[str, str] = {}
        try:
            for path, fut in self._jobs.items():
                try:
                    result = fut.result()
                except HashCancelled:
                    raise
                except OSError as exc:
                    raise BadFileError(f"{os.path.basename(path)}: read failed while hashing ({exc.strerror or exc})") from exc
                i = self._first_of[path]
                fills[sha256_placeholder(i)] = result.sha256
                fills[autov2_placeholder(i)] = result.sha256[:10]
                for ident in self.everything:
                    if ident.path == path:
                        ident.sha256, ident.pending = result.sha256, False
                        if ident.claimed and ident.claimed != result.sha256:
                            self.notes.append(
                                f"{ident.name}: the manifest's sha256 ({ident.claimed[:10]}...) is not this file's "
                                f"({result.sha256[:10]}...); the recipe records the file's"
                            )
                self._record(path, result, headers)
        finally:
            self.close()
        self.fills = fills
        return fills

    def _record(self, path: str, result: FileHashes, headers) -> None:
        cache = self.cache()
        if cache is None:
            return
        for h in headers:  # only a file that did not change while it was read (the merge checks it too)
            if os.path.realpath(h.path) == path and h.changed() is not None:
                return
        try:
            if result.autov1 is None:
                result.autov1 = next((x.autov1 for x in self.everything if x.path == path), None)
            cache.record(path, result)
        except Exception:  # the cache is an optimisation
            pass

    def abort(self) -> None:
        """Stop the hashing threads (the merge failed or was cancelled)."""
        self._stop.set()
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


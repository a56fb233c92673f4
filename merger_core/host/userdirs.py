"""Where Model Merger keeps its own data (the hash and CivitAI cache).

Order of precedence:

1. the ``MODEL_MERGER_HOME`` environment variable, if set and not empty;
2. a folder set by the host at start-up with :func:`use_comfyui_user_dir` (the ComfyUI nodes call it with ComfyUI's
   user directory, so the data lives in ``<ComfyUI user dir>/model_merger``);
3. the platform's user data folder (``platformdirs.user_data_dir("model-merger")``: ``~/.local/share/model-merger``
   on Linux, ``~/Library/Application Support/model-merger`` on macOS, ``%LOCALAPPDATA%\\model-merger`` on Windows).

A folder that cannot be created (a file is in the way, no permission) is a :class:`~merger_core.errors.ModelMergerError`
from :func:`data_dir`; the hash cache does not ask for the folder to exist (:func:`cache_db_path` with
``create_dir=False``) and falls back to a temporary in-memory cache instead (see :mod:`merger_core.identity.cache`).
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import ModelMergerError

ENV_VAR = "MODEL_MERGER_HOME"
APP_NAME = "model-merger"
COMFYUI_SUBDIR = "model_merger"
CACHE_DB_NAME = "cache.sqlite3"

_host_dir: Optional[str] = None


def use_comfyui_user_dir(user_dir: str | os.PathLike | None) -> Optional[str]:
    """Keep the data under ``<user_dir>/model_merger`` (the ComfyUI user directory). ``None`` undoes it.

    Returns the folder that will be used (not created here). The environment variable still wins.
    """
    global _host_dir
    _host_dir = os.path.join(os.fspath(user_dir), COMFYUI_SUBDIR) if user_dir else None
    return _host_dir


def data_dir(create: bool = True) -> str:
    """The folder for Model Merger's own data, created if asked (default)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = os.path.expanduser(env)
    elif _host_dir:
        path = _host_dir
    else:
        import platformdirs

        path = platformdirs.user_data_dir(APP_NAME, appauthor=False)
    path = os.path.abspath(path)
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            where = f" (set by {ENV_VAR})" if env else ""
            raise ModelMergerError(
                f"Model Merger's data folder {path}{where} cannot be created: {folder_problem(path, exc)}"
            ) from None
    return path


def folder_problem(path: str, exc: OSError) -> str:
    """Why the folder ``path`` could not be created, in plain words (``exc`` is what ``os.makedirs`` raised)."""
    probe = os.path.abspath(path)
    while True:
        if os.path.lexists(probe):
            if os.path.islink(probe) and not os.path.exists(probe):
                return f"{probe} is a link to nothing"
            if not os.path.isdir(probe):
                return f"{probe} is a file, not a folder"
            break
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def cache_db_path(create_dir: bool = True) -> str:
    """Path of the SQLite cache database."""
    return os.path.join(data_dir(create=create_dir), CACHE_DB_NAME)

"""The pack's Python requirements, checked once at import (no ComfyUI import, nothing imported but the check).

A ``git clone`` install without ``pip install -r requirements.txt`` would otherwise load silently and fail at the
first merge with a bare ``No module named 'jsonschema'``. Here the pack still loads (so the workflow opens and its
nodes are known), one log line names what is missing with the exact command for this Python, and every node fails
with the same message.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
from typing import List, Optional

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(PACK_ROOT, "requirements.txt")
# distribution name -> module name, where they differ
MODULE_NAMES = {"pillow": "PIL"}
FALLBACK = ["safetensors", "numpy", "aiohttp", "tqdm", "blake3", "platformdirs", "pillow", "jsonschema"]


def requirement_names(path: str = REQUIREMENTS) -> List[str]:
    """Distribution names from requirements.txt (comments, versions and markers dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return list(FALLBACK)
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if m:
            names.append(m.group(0))
    return names


def _present(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: a blocked import (import raises ImportError)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(path: str = REQUIREMENTS) -> List[str]:
    return [n for n in requirement_names(path) if not _present(MODULE_NAMES.get(n.lower(), n).replace("-", "_"))]


def install_command() -> str:
    """The command that installs the requirements into the Python running ComfyUI."""
    quote = (lambda s: f'"{s}"' if " " in s else s) if os.name == "nt" else shlex.quote
    return f"{quote(sys.executable)} -m pip install -r {quote(REQUIREMENTS)}"


def message(missing: List[str]) -> Optional[str]:
    if not missing:
        return None
    what = ", ".join(missing)
    return (
        f"Model Merger cannot run: the Python package{'s' if len(missing) > 1 else ''} {what} "
        f"{'are' if len(missing) > 1 else 'is'} not installed in ComfyUI's Python. Install the pack's requirements "
        f"with: {install_command()} and restart ComfyUI."
    )


MISSING = missing_requirements()
MESSAGE = message(MISSING)

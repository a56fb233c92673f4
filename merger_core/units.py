"""Human-readable sizes and durations, and the machine's available memory: one answer each for every room."""

from __future__ import annotations

import os
from typing import Optional

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``"1.50 KiB"``; binary units, two decimals, whole bytes below 1 KiB; ``None`` -> ``"?"``."""
    if n is None:
        return "?"
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in _BINARY_UNITS:
        n /= 1024.0
        if abs(n) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{n:.2f} {unit}"
    return f"{n:.2f} TiB"  # not reached


def human_seconds(s: float) -> str:
    """``42.0`` -> ``"42.0 s"``, ``125`` -> ``"2 min 05 s"``, ``7300`` -> ``"2 h 01 min"``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def mem_available() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

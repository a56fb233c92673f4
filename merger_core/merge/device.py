"""Device strings (cpu, cuda, cuda:N, mps, auto) checked against what exists on this machine."""

from __future__ import annotations

from typing import List

from ..errors import DeviceError


def available_devices() -> List[str]:
    """Devices that exist here, in the order a user would pick them: cpu, cuda:0..N-1, mps."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | None):
    """Turn a device string into a ``torch.device`` that exists, or raise :class:`DeviceError`.

    ``auto`` picks the first GPU (cuda:0, then mps) and falls back to cpu; ``cuda`` means ``cuda:0``.
    """
    import torch

    name = (name or "cpu").strip().lower()
    have = available_devices()
    if name == "auto":
        for d in have:
            if d != "cpu":
                return torch.device(d)
        return torch.device("cpu")
    if name == "cuda":
        name = "cuda:0"
    if name not in have:
        try:
            torch.device(name)
        except RuntimeError:
            raise DeviceError(f"{name!r} is not a device name; available here: {', '.join(have)}") from None
        raise DeviceError(f"device {name!r} does not exist on this machine; available here: {', '.join(have)}")
    return torch.device(name)

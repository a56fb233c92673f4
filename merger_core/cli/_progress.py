"""Command-line helpers shared by the subcommands: a tqdm progress bar fed by the engine's progress callback,
and the end-of-run notification."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from ..host.notify import notify_done

DEFAULT_NOTIFY_AFTER = 30.0


class ProgressBar:
    """A progress callback for the engine: ``progress(ProgressInfo)``. Shows bytes written (with rate and ETA)
    and keys done. Does nothing when ``enabled`` is false. Use as a context manager, or call :meth:`close`."""

    def __init__(self, desc: str = "merging", enabled: bool = True, stream: Optional[TextIO] = None):
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.last_bytes = 0

    def __call__(self, info) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=info.bytes_total,
                desc=self.desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.2,
            )
        self.bar.update(info.bytes_done - self.last_bytes)
        self.last_bytes = info.bytes_done
        self.bar.set_postfix_str(f"keys {info.keys_done}/{info.keys_total}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunNotifier:
    """Sends one notification when a run that took at least ``after`` seconds ends (if ``enabled``)."""

    def __init__(self, enabled: bool, after: float = DEFAULT_NOTIFY_AFTER, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.after = after
        self.stream = stream
        self.start = time.monotonic()
        self.sent: Optional[str] = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def finish(self, ok: bool, message: str) -> Optional[str]:
        """Notify if enabled and the run was long enough; returns how (``desktop``/``bell``/``none``) or None."""
        if not self.enabled or self.sent is not None or self.elapsed() < self.after:
            return None
        title = "Model Merger: merge finished" if ok else "Model Merger: merge failed"
        self.sent = notify_done(title, message, stream=self.stream)
        return self.sent

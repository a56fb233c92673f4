"""Signals for the command line: SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, systemd, ``docker stop``) and SIGHUP
(the terminal closed) all stop a run the same way.

While an engine call is running (inside :meth:`Signals.polling`) the first signal only sets the cancel flag: the
engine stops at the next key, removes its temporary file and raises
:class:`~merger_core.errors.MergeCancelled`, and the command exits with 128 + the signal number (130 for Ctrl-C). A
second signal forces: the temporary files still open are removed and the process exits at once. Outside an engine
call a signal interrupts the command straight away (nothing is being written then).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Optional

from ..io.writer import LIVE_PARTIALS

NAMES = {getattr(signal, n): n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command outside an engine call."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum = signum


class Signals:
    """Installed for the duration of one command (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._polling = 0
        self._old = {}

    # the engine's cancel callback
    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return NAMES.get(self.signum or signal.SIGINT, "a signal")

    @contextmanager
    def polling(self):
        """Around an engine call that polls :meth:`__call__`: a first signal is then only a request to stop."""
        self._polling += 1
        try:
            yield self
        finally:
            self._polling -= 1

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            for path in list(LIVE_PARTIALS):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            try:
                os.write(2, f"\n{NAMES.get(signum, signum)} again: stopped at once; no output was written\n".encode())
            finally:
                os._exit(128 + signum)
        self.signum = signum
        if self._polling:
            try:
                os.write(2, f"\n{NAMES.get(signum, signum)}: stopping after the current tensor "
                            "(send it again to stop at once)\n".encode())
            except OSError:
                pass
            return
        raise Interrupted(signum)

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in NAMES:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            # once stopped by a signal, the command is finishing: a late repeat must not turn its clean exit into
            # a death by signal (KeyboardInterrupt at interpreter exit), so such signals are ignored from here on
            signal.signal(signum, signal.SIG_IGN if self.signum is not None else old)
        self._old.clear()


def interrupted_message(sig: Signals) -> str:
    return f"interrupted ({sig.name}); no output was written"



def signals_of(args) -> Signals:
    """The command's :class:`Signals` (set by ``main``), or an idle one for a command run without ``main``."""
    return getattr(args, "_signals", None) or Signals()

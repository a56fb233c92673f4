"""Tell the user that a long job ended: a desktop notification, or the terminal bell.

Desktop notifications use the optional package ``desktop-notifier`` (``pip install "model-merger[notify]"``).
Without it, or when it cannot reach a notification service (a headless machine, an SSH session), the fallback
is the terminal bell plus a one-line explanation written once per process. Nothing here ever raises or closes
the caller's streams: a notification is never worth a failed merge or lost console output (the old win10toast
did both).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Optional, TextIO

APP_NAME = "Model Merger"
INSTALL_HINT = 'pip install "model-merger[notify]"'
SEND_TIMEOUT = 5.0

_explained = False
_lock = threading.Lock()


def desktop_notifier_installed() -> bool:
    """True when the optional ``desktop-notifier`` package can be imported."""
    try:
        return importlib.util.find_spec("desktop_notifier") is not None
    except (ImportError, ValueError):
        return False


def send_desktop_notification(title: str, message: str, timeout: float = SEND_TIMEOUT) -> None:
    """Send one desktop notification through ``desktop-notifier``; raises if the package is missing, the
    platform's notification service fails, or nothing answers within ``timeout`` seconds.

    The package's API is asynchronous; it runs here on a private event loop in a daemon thread, so a caller
    that has its own loop running (ComfyUI's server) is not disturbed, and a hung service cannot hang the caller.
    """
    if not desktop_notifier_installed():
        raise ModuleNotFoundError(f"desktop notifications need the optional package desktop-notifier ({INSTALL_HINT})")
    outcome: dict = {}
    # desktop-notifier does not raise when the platform refuses (no D-Bus session, no notification centre): it
    # logs "Notification failed" with a traceback and returns. Catch its log records instead of letting the
    # traceback reach the console, and turn a failure into an exception.
    catcher = _LogCatcher()
    pkg_logger = logging.getLogger("desktop_notifier")
    old_propagate = pkg_logger.propagate
    pkg_logger.addHandler(catcher)
    pkg_logger.propagate = False

    def target():
        try:
            import asyncio

            from desktop_notifier import DesktopNotifier

            async def go():
                notifier = DesktopNotifier(app_name=APP_NAME)
                await notifier.send(title=title, message=message)

            asyncio.run(asyncio.wait_for(go(), timeout))
        except BaseException as exc:  # reported to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="model-merger-notify", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not thread.is_alive():
        pkg_logger.removeHandler(catcher)
        pkg_logger.propagate = old_propagate
    if thread.is_alive():
        raise TimeoutError(f"the desktop notification service did not answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    failure = catcher.failure()
    if failure is not None:
        raise failure


class _LogCatcher(logging.Handler):
    """Collects the warnings desktop-notifier logs while sending."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def failure(self) -> Optional[BaseException]:
        for r in self.records:
            if r.exc_info and r.exc_info[1] is not None:
                return r.exc_info[1]
            if "fail" in r.getMessage().lower():
                return RuntimeError(r.getMessage())
        return None


def _explain_once(stream: TextIO, text: str) -> None:
    global _explained
    with _lock:
        if _explained:
            return
        _explained = True
    try:
        stream.write(text + "\n")
    except Exception:
        pass


def notify_done(title: str, message: str, *, stream: Optional[TextIO] = None, bell: bool = True) -> str:
    """Tell the user that a job ended. Returns how: ``"desktop"``, ``"bell"`` or ``"none"``. Never raises.

    Tries a desktop notification first. If that is impossible, and ``bell`` is true, writes the terminal bell
    (``\\a``) to ``stream`` (default ``sys.stderr``), preceded once per process by a line saying why there was no
    desktop notification. With ``bell=False`` nothing is written.
    """
    try:
        send_desktop_notification(title, message)
        return "desktop"
    except ModuleNotFoundError:
        reason = f"note: desktop notifications need the optional package desktop-notifier ({INSTALL_HINT}); ringing the terminal bell instead"
    except Exception as exc:
        reason = f"note: desktop notification failed ({type(exc).__name__}: {exc}); ringing the terminal bell instead"
    if not bell:
        return "none"
    out = stream if stream is not None else sys.stderr
    _explain_once(out, reason)
    try:
        out.write("\a")
        out.flush()
    except Exception:
        return "none"
    return "bell"


def reset_for_tests() -> None:
    """Forget that the one-time explanation was shown (for tests)."""
    global _explained
    with _lock:
        _explained = False

"""Opening files that must be regular files. A FIFO blocks a reader forever, a device such as ``/dev/zero`` never
ends, a socket cannot be read: each is refused with a message that names what the path really is, before any read.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Optional

from ..errors import BadFileError


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def not_regular_reason(path: str, st: Optional[os.stat_result] = None) -> Optional[str]:
    """``None`` for a regular file (a symbolic link is followed), else why ``path`` cannot be a model or manifest.
    Raises OSError as ``os.stat`` does."""
    st = st if st is not None else os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return None
    return f"{path} is {kind_of(st.st_mode)}, not a regular file"


def open_regular(path: str, buffering: int = -1) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file without blocking on it.

    The file is opened non-blocking (a FIFO's open returns at once) and checked with ``fstat`` on the open
    descriptor, so a path swapped between a check and the open is caught too. OSError propagates as from ``open``;
    a special file raises :class:`BadFileError`.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        reason = not_regular_reason(path, st)
        if reason is not None:
            raise BadFileError(reason)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise

"""An exclusive lock on a folder for as long as a process works in it: an `flock` on a
lock file that records its holder.

The OS releases an `flock` when the process ends, however it ends, so a killed run never
leaves a folder locked; the holder record (pid, host, purpose, start, command) is only
there to name the process in the message another run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import sys
import time

from keras_progdist.errors import KerasProgdistError


class BadLockFile(KerasProgdistError, ValueError):
    """The lock file is a link, not a regular file, or cannot be opened."""


class Busy(KerasProgdistError, RuntimeError):
    """Another live process holds the lock; `holder` is its record."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _open(path: str, advice: str) -> int:
    """Opens (creating it if needed) the lock file for the holder record.

    The holder record truncates and rewrites the file, so a lock file planted as a
    symbolic link (or hard link) would have a run overwrite its target, and a dangling
    link would create a file elsewhere: the open never follows a link (`O_NOFOLLOW`),
    and only a regular file with one link is used. `O_NONBLOCK` keeps a FIFO planted
    there from blocking the open.

    Returns:
        The open file descriptor (the caller closes it).

    Raises:
        BadLockFile: naming the file, what is wrong with it, and `advice`.
    """
    flags = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        kind = "a symbolic link" if os.path.islink(path) else f"not usable ({e.strerror})"
        raise BadLockFile(f"Lock file {path} is {kind}; the lock must be a regular file in "
                          "the work directory. Remove it (no run holds a lock file that "
                          f"is not a regular file), {advice}.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = ("has other hard links" if stat.S_ISREG(info.st_mode)
                else "is not a regular file")
        raise BadLockFile(f"Lock file {path} {kind}; the lock must be a regular file of "
                          f"its own. Remove it, {advice}.")
    return fd


@contextlib.contextmanager
def hold(path: str, purpose: str, advice: str = "or use another folder"):
    """Holds the lock file `path` exclusively for the `with` block.

    Args:
        path: the lock file (its folder must exist).
        purpose: what the holder does, for the holder record.
        advice: what to do instead, closing the messages of `BadLockFile`.

    Raises:
        Busy: another process holds it.
        BadLockFile: see `_open`.
    """
    fd = _open(path, advice)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise Busy(holder or "holder unknown") from None
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "purpose": purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "command": " ".join(sys.argv)[:500]})
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

"""Durable file writes, hashes and stale-temp cleanup: the one owner of how files are written.

Every file the library writes goes through `atomic_write`: the bytes go to a temporary file
with a name unique to this process and call (`<name>.tmp-<pid>-<random>`), are flushed and
fsynced, and are renamed over the target. A reader therefore sees the old file or the new
one, never a half-written one, and two writers of one path never share a temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
from typing import Callable

TMP_MARK = ".tmp-"


def temp_name(path: str) -> str:
    """A temporary path beside `path`, unique to this process and call."""
    return f"{path}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write(path: str, write: Callable) -> None:
    """Writes `path` atomically: `write(f)` fills a binary file that replaces `path`.

    Args:
        path: the target file; its folder must exist.
        write: called once with an open binary file object.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


@contextlib.contextmanager
def temporary(path: str, suffix: str = ""):
    """A temporary name next to `path` (`temp_name(path) + suffix`) for a writer that
    must name its own file (`np.savez`, `keras.Model.save`); the block moves it into
    place (`os.replace`), and whatever is left under the name when the block ends,
    normally or not, is removed.

    Args:
        path: the file the temporary stands for; its folder must exist.
        suffix: appended to the name (Keras insists on `.keras`).
    """
    tmp = temp_name(path) + suffix
    try:
        yield tmp
    finally:
        with _ignore_missing():
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, value, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def read_keyed_json(path: str, key) -> dict | None:
    """The JSON record at `path` when its `"key"` equals `key`; None otherwise (no file,
    another key, or a torn or foreign file: the caller computes the record again).

    Cached results (scores, probes) are saved as `{"key": ..., ...}` with everything
    their value depends on in the key, so a changed setting never reuses one."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(path: str) -> int | None:
    """The process id in a temporary name made by `temp_name` (`<name>.tmp-<pid>-<hex>`,
    or `<name>.tmp-<pid>`), else None."""
    tail = os.path.basename(path).rsplit(TMP_MARK, 1)
    if len(tail) != 2:
        return None
    head = tail[1].split("-", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_temps(directory: str, pattern: str = "*") -> list:
    """Removes temporaries under `directory` matching `pattern` whose writer is dead.

    A temporary whose process still runs belongs to a live writer (maybe another run)
    and is left alone; one of this process is left alone too (it is being written).

    Returns:
        The paths removed.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"{pattern}{TMP_MARK}*")):
        pid = temp_owner(path)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        with _ignore_missing():
            if os.path.isdir(path) and not os.path.islink(path):
                import shutil
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the folder's entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ignore_missing:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, OSError) and \
            getattr(exc, "errno", None) == errno.ENOENT

"""Checks of `bin/run.py`'s command line that need neither Keras nor TensorFlow.

They run before the heavy imports (tens of seconds on a loaded machine), so a missing
gin file, a gin include loop, an import in a binding, an unusable work directory or
export folder, or a work directory held by another run is refused at once, and before
anything is created. Each check raises `PreflightError`, whose message `bin/run.py`
prints as one `error: ...` line.

Standard library only: importing the `keras_progdist` package imports Keras.
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import os
import re
import tempfile

# Modes that only read the work directory, and modes that need one trained before.
READ_ONLY_MODES = ("export",)
NEEDS_WORKDIR = ("distill", "sample", "eval", "export")
EXPORTING_MODES = ("export", "all")

_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(#.*)?$""")
_IMPORT = re.compile(r"^\s*(import\s|from\s+\S+\s+import\s)")


class PreflightError(Exception):
    """A command-line setting refused before any import or work; one-line message."""


def did_you_mean(word: str, choices) -> str:
    """`" Did you mean 'x'?"` for the closest of `choices` to `word`, else ``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def resolve_gin_file(name: str, gin_dir: str) -> str:
    """`name` as a path, else `gin_dir/<name>` (adding `.gin` when missing).

    Raises:
        PreflightError: no such file; names the closest file of `gin_dir`.
    """
    candidates = [name, os.path.join(gin_dir, name)]
    if not name.endswith(".gin"):
        candidates += [c + ".gin" for c in candidates]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    available = sorted(f for f in os.listdir(gin_dir) if f.endswith(".gin"))
    base = os.path.basename(name)
    hint = did_you_mean(base if base.endswith(".gin") else base + ".gin", available)
    raise PreflightError(f"--gin_file={name}: no such file here or in gin/.{hint} "
                         f"Available: {', '.join(available)}.")


def _resolve_include(include: str, including_file: str, gin_dir: str) -> str | None:
    for folder in ("", os.path.dirname(os.path.abspath(including_file)), gin_dir):
        candidate = os.path.join(folder, include) if folder else include
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def include_folders(files, gin_dir: str) -> list:
    """Follows every gin file's `include` statements; returns the folders gin must
    search for them (each including file's own folder, then `gin_dir`).

    An include is looked up as given (relative to the current folder), then next to
    the file that includes it, then in `gin_dir`.

    Raises:
        PreflightError: an include that is found nowhere, or an include loop.
    """
    folders = []

    def visit(path, chain):
        if path in chain:
            loop = " -> ".join(os.path.basename(p) for p in chain[chain.index(path):])
            raise PreflightError(f"gin include loop: {loop} -> {os.path.basename(path)}.")
        folder = os.path.dirname(path)
        if folder not in folders:
            folders.append(folder)
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                match = _INCLUDE.match(line)
                if not match:
                    continue
                found = _resolve_include(match.group(2), path, gin_dir)
                if found is None:
                    raise PreflightError(
                        f"{path}:{number}: include {match.group(2)!r} found neither in "
                        f"the current folder, nor next to {os.path.basename(path)}, nor "
                        "in gin/.")
                visit(found, chain + [path])

    for file in files:
        visit(os.path.abspath(file), [])
    return folders + [gin_dir]


def check_bindings(bindings) -> None:
    """Refuses `--gin_param` values that import a module: a binding sets values, and
    gin would run the import.

    Raises:
        PreflightError: naming the binding.
    """
    for binding in bindings:
        for line in binding.splitlines() or [""]:
            if _IMPORT.match(line):
                raise PreflightError(f"--gin_param={binding!r}: imports are not allowed "
                                     "in bindings; bind values, e.g. "
                                     "'teacher.train_steps=100'.")


def _probe_writable(folder: str) -> None:
    """Raises `OSError` if no file can be created in `folder` (for root too: a
    read-only file system refuses it, where `os.access` would say yes)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_workdir(workdir: str, mode: str, probe_lock: bool = True) -> None:
    """The work directory can serve `mode`: it exists if the mode needs a trained one,
    is a folder, can be written (all modes but export) and (with `probe_lock`) is not
    held by a live run.

    Args:
        workdir, mode: as given to `bin/run.py`.
        probe_lock: False in a multi-process run, whose other processes share the
            folder with the one that holds the lock (only that one takes it). Such a
            run's writability is not probed here either: the probe creates a
            temporary file, and only the chief may write into a shared folder (its
            lock, taken later, fails with a library error if it cannot).

    Raises:
        PreflightError: the one line to print.
    """
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise PreflightError(f"--workdir={workdir} exists and is not a folder.")
    if mode in NEEDS_WORKDIR and not os.path.isdir(workdir):
        raise PreflightError(f"Work directory {workdir} does not exist: nothing has been "
                             "trained there (check --workdir).")
    if mode in READ_ONLY_MODES:
        return
    existing = _nearest_existing(workdir)
    if not os.path.isdir(existing):
        raise PreflightError(f"--workdir={workdir}: {existing} is not a folder.")
    if not probe_lock:
        return
    try:
        _probe_writable(existing)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise PreflightError(f"--workdir={workdir}: cannot write in {existing} "
                             f"({reason}); --mode={mode} writes its lock and results "
                             "there. Use a writable --workdir.") from None
    _check_not_busy(workdir)


def _check_not_busy(workdir: str) -> None:
    """Refuses a work directory whose lock a live process holds (the lock itself is
    taken later, by `WorkDir.lock`; this only answers early). Never creates the lock
    and never follows a symbolic link to it."""
    path = os.path.join(workdir, ".lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP):
            return  # no lock yet, or a symlink: `WorkDir.lock` decides
        raise PreflightError(f"--workdir={workdir}: cannot read {path} "
                             f"({os.strerror(e.errno)}).") from None
    try:
        # Shared: it conflicts only with a run's exclusive lock, never with another probe.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        raise PreflightError(
            f"Work directory {workdir} is in use by another run "
            f"({holder or 'holder unknown'}). Wait for it to end, stop it, or use "
            "another --workdir.") from None
    finally:
        os.close(fd)  # closing releases a lock we took


def check_export_dir(export_dir: str, mode: str) -> None:
    """The export root is a folder, or can become one.

    Raises:
        PreflightError: it (or the nearest existing part of its path) is a file.
    """
    if mode not in EXPORTING_MODES:
        return
    existing = _nearest_existing(export_dir)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(export_dir) else f": {existing}"
        raise PreflightError(f"--export_dir={export_dir}{where} is a file, not a folder.")

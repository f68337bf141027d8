"""`python audit_writes.py DIR SCRIPT ARGS...`: runs `SCRIPT ARGS` (as `__main__`) and
prints one line `[audit] writes under DIR: [...]` at exit, listing every path under
`DIR` that the process opened for writing, created, renamed, replaced or removed
(Python's audit events `open`, `os.rename`, `os.replace`, `os.remove`, `os.mkdir`).

What the multi-worker test uses to show that a process that is not the chief writes
nothing into the shared work directory. (Writes made from C++ without Python, such as
TensorFlow's event files, are not seen; only the chief adds the TensorBoard callback.)
"""

import atexit
import os
import runpy
import sys

WATCHED = os.path.realpath(sys.argv[1])
WRITES = []
EVENTS = {"os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "os.unlink",
          "shutil.rmtree"}


def _under(path) -> bool:
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == WATCHED or real.startswith(WATCHED + os.sep)


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and path is not None and not isinstance(path, int) and _under(path):
            WRITES.append(f"open {path}")
    elif event in EVENTS and args and _under(args[0]):
        WRITES.append(f"{event} {args[0]}")


atexit.register(lambda: print(f"[audit] writes under {WATCHED}: {WRITES}", flush=True))
sys.addaudithook(_hook)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")

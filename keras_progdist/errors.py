"""`KerasProgdistError`, the base of every error this library raises on purpose, and
`Interrupted`, the one form of every early stop.

A `KerasProgdistError` means a problem with the settings, the data or the files that
the user can act on (its message says how); anything else is a bug. `bin/run.py`
prints the former as one `error: ...` line and exits 1, and lets the latter keep its
traceback. Each concrete error also subclasses the built-in exception it stands for
(`ValueError`, `FileNotFoundError`, ...), so existing `except` clauses keep working.

This module imports nothing, so any module can subclass it without import cycles.
"""


class KerasProgdistError(Exception):
    """A problem with settings, data or files, reported to the user in one line."""


class Interrupted(SystemExit):
    """A stop before the work was done that keeps everything finished so far: SIGTERM,
    Ctrl-C, the time budget (`--time_budget_s`) or an evaluation deadline. Training
    saved a checkpoint at the exact step; evaluation and sampling kept every model and
    file they finished. The same command goes on from there.

    A `SystemExit` with code 143 (128 + SIGTERM, what a job scheduler expects of a
    preempted job), so that `except Exception` on the way up does not swallow it and
    an uncaught one ends the process with that code; `bin/run.py` prints its message.

    Args:
        message: what stopped and where, and that re-running goes on.
    """

    EXIT_CODE = 143

    def __init__(self, message: str):
        super().__init__(self.EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message

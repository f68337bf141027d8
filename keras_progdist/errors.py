"""`KerasProgdistError`, the base of every error this library raises on purpose.

A `KerasProgdistError` means a problem with the settings, the data or the files that
the user can act on (its message says how); anything else is a bug. `bin/run.py`
prints the former as one `error: ...` line and exits 1, and lets the latter keep its
traceback. Each concrete error also subclasses the built-in exception it stands for
(`ValueError`, `FileNotFoundError`, ...), so existing `except` clauses keep working.

This module imports nothing, so any module can subclass it without import cycles.
"""


class KerasProgdistError(Exception):
    """A problem with settings, data or files, reported to the user in one line."""

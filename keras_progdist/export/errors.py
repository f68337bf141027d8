"""The two errors of an export (the CLI maps them to exit codes 3 and 4)."""

from __future__ import annotations

from keras_progdist.errors import KerasProgdistError


class ExportError(KerasProgdistError, ValueError):
    """A work directory or export target that cannot be exported (to)."""


class ExportExistsError(KerasProgdistError, FileExistsError):
    """The export folder holds that version with other weights; pass `overwrite=True`
    to replace it, or leave `version` unset to get the next number."""

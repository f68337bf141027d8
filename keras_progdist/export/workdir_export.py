"""Exporting a run: its finished stages read through `WorkDir` (no gin, no training
data), then `export_stages`, in a TensorFlow subprocess when the backend is another one.

Export only reads the work directory: a missing one is an `ExportError`, never created.
"""

from __future__ import annotations

import keras

from keras_progdist.export.errors import ExportError
from keras_progdist.export.settings import ExportOptions, check_name, default_name
from keras_progdist.export.stages import export_with_options
from keras_progdist.export.subprocess_export import export_in_subprocess
from keras_progdist.workdir import WorkDir, WorkDirError


def _existing_workdir(workdir: str) -> WorkDir:
    # A typo'd workdir must not be created (nor exported as "nothing"): export only reads.
    wd = WorkDir(workdir)
    if not wd.exists():
        raise ExportError(f"Work directory {workdir} does not exist (or is not a folder); "
                          "export reads a finished run and never creates one.")
    return wd


def load_workdir_stages(workdir: str) -> list:
    """`[(stage, num_steps, DiffusionModel)]` of a work directory, without gin.

    `WorkDir.stage_models`: the network rebuilt from `config.json`, each finished
    stage's `final` checkpoint loaded (teacher, a guided run's stage one, then
    students from most to fewest steps). Only reads the work directory.

    Raises:
        ExportError: a missing work directory, one without a (readable) config record,
            or one without a finished teacher.
    """
    wd = _existing_workdir(workdir)
    try:
        return wd.stage_models(with_guidance=True)
    except WorkDirError as e:
        raise ExportError(str(e)) from None


def export_workdir(workdir: str, export_dir: str, name: str | None = None,
                   overwrite: bool = False, options: ExportOptions | None = None,
                   **settings) -> dict:
    """Exports every finished stage of `workdir` (see the package docstring).

    Needs no gin config and no training data: the models come from `config.json` and
    the `final` checkpoints. Only reads `workdir`. On a backend other than TensorFlow
    it runs in a TensorFlow subprocess. Re-running it on a finished run is a no-op
    (every stage up to date).

    Args:
        workdir: a run's work directory (must exist).
        export_dir: the export root; name: the export name (default: the workdir's).
        overwrite: as `ExportOptions.overwrite`.
        options: an `ExportOptions`; or its other fields (`version`, `serving_root`,
            `max_steps`, `max_batch`, `warmup_batch_sizes`) as keywords.

    Returns:
        `export_stages`' result.
    """
    options = options or ExportOptions(overwrite=overwrite, **settings)
    name = check_name(name or default_name(workdir))
    _existing_workdir(workdir)
    if keras.backend.backend() != "tensorflow":
        # The checkpoints are backend-neutral npz; TensorFlow writes the SavedModels.
        return export_in_subprocess(workdir, export_dir, name, options)
    return export_with_options(load_workdir_stages(workdir), export_dir, name, options)

"""What an evaluation takes, checked: its settings, its work directory, and the models
of that work directory it covers.

`--mode=eval` (`report`) and `--mode=sample` (`samples`) both start here, so that the
models they score and sample are the same, in the same order, under the same settings.
The settings are a `settings.EvaluateSettings` (made and checked by
`training.config.evaluate()`); nothing here reads gin.
"""

from __future__ import annotations

from keras_progdist.errors import KerasProgdistError
from keras_progdist.settings import EvaluateSettings
from keras_progdist.workdir import WorkDir, WorkDirError


class EvaluationError(KerasProgdistError, ValueError):
    """An evaluation that cannot run (nothing trained, bad settings, no data)."""


def check_settings(cfg) -> EvaluateSettings:
    """`cfg`, if it is the evaluation settings.

    Args:
        cfg: a `settings.EvaluateSettings`.

    Returns:
        `cfg`.

    Raises:
        EvaluationError: anything else (a plain dict included): make the settings with
            `training.config.evaluate()`, which also checks their values.
    """
    if not isinstance(cfg, EvaluateSettings):
        raise EvaluationError(f"Evaluation settings must be a settings.EvaluateSettings "
                              f"(what `training.config.evaluate()` returns), got "
                              f"{type(cfg).__name__}.")
    return cfg


def as_workdir(workdir) -> WorkDir:
    """A `WorkDir`, given one or its folder."""
    return workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)


def evaluation_runs(workdir, cfg: EvaluateSettings) -> list:
    """The models an evaluation scores, in report order.

    Undistilled DDIM of the teacher at `cfg.ddim_steps` below its full step count, the
    teacher at `cfg.teacher_steps` not already on that curve, the teacher at its full
    count, then every finished student, most steps first.

    Args:
        workdir: a `WorkDir` (or its folder) with at least a finished teacher.
        cfg: the evaluation settings.

    Returns:
        dicts with `kind` (`ddim`, `teacher`, `distilled`), `num_steps`, `stage`,
        `model` (a `DiffusionModel`) and `weights_sha256` (of the stage's `final`
        weights: a cached score belongs to those weights).

    Raises:
        EvaluationError: no config record or no finished teacher.
    """
    workdir = as_workdir(workdir)
    try:
        stage_models = workdir.stage_models()
    except WorkDirError as e:
        raise EvaluationError(f"Nothing to evaluate in {workdir.root}: {e}") from None
    _, teacher_full, teacher_model = stage_models[0]
    runs = [("ddim", s, "teacher", teacher_model) for s in cfg.ddim_steps
            if s < teacher_full]
    runs += [("teacher", s, "teacher", teacher_model)
             for s in sorted(set(cfg.teacher_steps))
             if s < teacher_full and s not in cfg.ddim_steps]
    runs.append(("teacher", teacher_full, "teacher", teacher_model))
    runs += [("distilled", n, stage, model) for stage, n, model in stage_models[1:]]
    return [{"kind": kind, "num_steps": steps, "stage": stage, "model": model,
             "weights_sha256": workdir.final_sha256(stage)}
            for kind, steps, stage, model in runs]

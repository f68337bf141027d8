"""`run`: the modes of a gin-configured experiment, in order, under one lock.

    train_teacher -> distill -> export -> (sample) -> eval

Everything a requested mode will use is validated before the first one starts. Only
the training modes build an `Experiment` (and with it the training data); export,
sampling and evaluation read the work directory through `WorkDir` and take plain
settings, so they run where the training data is not.
"""

from __future__ import annotations

import contextlib
import time

import keras

from keras_progdist import cluster, data, distribute, tensorboard_log, validation
from keras_progdist.evaluation import report, samples
from keras_progdist.training.config import (
    MODES,
    PipelineError,
    dataset_settings,
    diffusion,
    distill,
    evaluate,
    guidance,
    sample_grid,
    teacher,
)
from keras_progdist.training.experiment import Experiment
from keras_progdist.training.preemption import PreemptionGuard
from keras_progdist.workdir import WorkDir

TRAINING_MODES = ("train_teacher", "distill", "all")


def _validate_run_settings(mode: str, experiment_name: str | None, workdir: str):
    """Checks every setting the requested modes will use, before any of them runs.

    Returns:
        The evaluation settings, or None when no evaluation or sampling is asked for.
    """
    diffusion(), teacher(), distill(), sample_grid()  # each raises on a bad value
    if guidance().enabled and mode in ("eval", "sample", "all"):
        raise PipelineError(
            f"--mode={mode} is not available for guided distillation (guidance.enabled) "
            "yet: evaluation and sample files do not pass a guidance strength. Run "
            "--mode=train_teacher, --mode=distill, then --mode=export (each stage writes "
            "a guided sample grid under samples/; the exports take label and guidance).")
    settings = evaluate() if mode in ("eval", "sample", "all") else None
    if mode in ("export", "all"):
        from keras_progdist import export

        export.check_name(experiment_name or export.default_name(workdir))
    return settings


def _report_agreement(guard: PreemptionGuard, verbose: int) -> None:
    """With `--verbose=2`, one line on what agreeing on the stop cost this process."""
    times = guard.agreement_seconds
    if verbose == 2 and times:
        # The first check builds (traces, compiles) the all-reduce; the rest is what
        # each chunk pays.
        rest = times[1:] or times
        print(f"[run] stop agreement: {len(times)} checks, the first {1000 * times[0]:.1f}"
              f" ms, then mean {1000 * sum(rest) / len(rest):.2f} ms, max "
              f"{1000 * max(rest):.2f} ms", flush=True)


def _input_kind(dataset) -> str:
    return "numpy batches" if isinstance(dataset, data.ArrayBatches) else "tf.data"


def _train(experiment: Experiment, mode: str, strategy, verbose: int) -> None:
    """The training modes: teacher, then the ladder, with every process agreeing on a
    stop (SIGTERM, Ctrl-C, the budget) so that all stop at the same step."""
    with experiment.guard:
        experiment.check_workdir(write=True)
        print(f"[run] {mode} in {experiment.wd.root}: network "
              f"{experiment.param_count:,} parameters, images {experiment.image_shape}, "
              f"batch {experiment.batch_size}, stages {list(experiment.distill_cfg.ladder)}"
              f", backend {keras.backend.backend()}, "
              f"input {_input_kind(experiment.dataset)}", flush=True)
        # A peer that dies ends this process with one `error:` line instead of a hang
        # or a traceback (nothing changes for one process).
        with cluster.exit_on_lost_peer(strategy):
            try:
                if mode in ("train_teacher", "all"):
                    experiment.train_teacher(verbose)
                if mode == "all":
                    # The other processes read the teacher's `final` next, which the
                    # chief may still be writing.
                    cluster.barrier(strategy)
                if mode in ("distill", "all"):
                    experiment.distill(verbose)
            finally:
                _report_agreement(experiment.guard, verbose)


def _read_only_line(wd: WorkDir, mode: str) -> str:
    stages = wd.finished_stages()
    steps = [s["num_steps"] for s in stages]
    return (f"[run] {mode} in {wd.root}: {len(stages)} finished stage(s), steps {steps}, "
            f"backend {keras.backend.backend()}")


def _sample_and_score(wd: WorkDir, mode: str, settings, verbose: int, deadline) -> None:
    """`--mode=sample` writes the sample files; `eval` and `all` score every model.

    SIGTERM or Ctrl-C here ends the process as usual: each result is written
    atomically as it is made, and a re-run reuses them. A spent time budget stops
    them before the next model (`errors.Interrupted`)."""
    if mode == "sample":
        samples.write_workdir_samples(wd, settings, verbose=verbose, deadline=deadline)
    if mode in ("eval", "all"):
        scores = report.evaluate_workdir(wd, settings, dataset_settings(),
                                         verbose=verbose, deadline=deadline)
        tensorboard_log.write_eval_scores(wd.eval_log_dir, scores["results"])


def run(workdir: str, mode: str = "all", strategy=None, export_dir: str = "saved_models",
        overwrite: bool = False, experiment_name: str | None = None,
        verbose: int = 1, time_budget_s: float | None = None) -> WorkDir:
    """Runs `mode` (one of `MODES`) of the gin-configured experiment in `workdir`.

    Every setting the requested modes use is checked first, so a bad one fails before
    any training. Modes that write the workdir (training, sampling, evaluation) hold
    its lock for the whole run; `export` only reads it.

    With `time_budget_s`, training checkpoints and stops (`errors.Interrupted`, exit
    code 143) once the budget is spent, and sampling and evaluation start no new model
    after it; the same call again goes on from there, so each piece fits a fixed job
    slot.

    Returns:
        The run's `WorkDir`.

    Raises:
        PipelineError, validation.ConfigError, WorkDirError: bad settings, a busy or
            missing workdir, or a workdir trained with another config.
        errors.Interrupted: SIGTERM, Ctrl-C or the time budget stopped the run; what
            was finished is kept.
    """
    if mode not in MODES:
        raise PipelineError(f"Unknown mode {mode!r}; allowed: {', '.join(MODES)}.")
    if time_budget_s is not None:
        validation.positive_float("time_budget_s", time_budget_s)
    deadline = None if time_budget_s is None else time.time() + time_budget_s
    eval_settings = _validate_run_settings(mode, experiment_name, workdir)
    wd = WorkDir(workdir)
    if mode not in ("train_teacher", "all"):
        # These modes need what an earlier run trained: never create the folder.
        wd.require()
    experiment = None
    if mode in TRAINING_MODES:
        # The data and the network are checked (files found, sizes the U-Net can take)
        # before the lock, which creates a new workdir: a bad setting leaves nothing.
        experiment = Experiment(workdir, strategy, deadline,
                                PreemptionGuard(deadline, agree=cluster.agreement(strategy)))
        distribute.configure_input(experiment.dataset)
    # Only the writing process locks: the others of a multi-process run share the folder.
    chief = distribute.is_chief(strategy)
    lock = wd.lock(mode) if mode != "export" and chief else contextlib.nullcontext()
    with lock:
        if experiment is not None:
            _train(experiment, mode, strategy, verbose)
        if not chief:
            print(f"[run] process is not the chief: {mode} leaves export, sampling and "
                  "evaluation to it", flush=True)
            return wd
        if experiment is None:
            print(_read_only_line(wd, mode), flush=True)
        if mode in ("export", "all"):
            from keras_progdist import export
            export.export_workdir(workdir, export_dir, experiment_name, overwrite)
        _sample_and_score(wd, mode, eval_settings, verbose, deadline)
    return wd

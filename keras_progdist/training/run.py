"""`run`: the modes of a gin-configured experiment, in order, under one lock.

    train_teacher -> distill -> export -> (sample) -> eval

Everything a requested mode will use is validated before the first one starts.
"""

from __future__ import annotations

import contextlib
import time

import keras

from keras_progdist import cluster, data, distribute, tensorboard_log, validation
from keras_progdist.evaluation import report, samples
from keras_progdist.training.config import (MODES, PipelineError, dataset_settings,
                                            diffusion, distill, evaluate, guidance,
                                            sample_grid, teacher)
from keras_progdist.training.experiment import Experiment
from keras_progdist.training.preemption import PreemptionGuard
from keras_progdist.errors import Interrupted
from keras_progdist.workdir import WorkDir


def _validate_run_settings(mode: str, experiment_name: str | None, workdir: str) -> dict:
    """Checks every setting the requested modes will use, before any of them runs.

    Returns:
        The evaluation settings (empty when no evaluation is asked for).
    """
    diffusion(), teacher(), distill(), sample_grid()  # each raises on a bad value
    if guidance()["enabled"] and mode in ("eval", "sample", "all"):
        raise PipelineError(
            f"--mode={mode} is not available for guided distillation (guidance.enabled) "
            "yet: evaluation and sample files do not pass a guidance strength. Run "
            "--mode=train_teacher, --mode=distill, then --mode=export (each stage writes "
            "a guided sample grid under samples/; the exports take label and guidance).")
    cfg = {}
    if mode in ("eval", "sample", "all"):
        cfg = evaluate()
    if mode in ("export", "all"):
        from keras_progdist import export

        export.check_name(experiment_name or export.default_name(workdir))
    return cfg


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


def run(workdir: str, mode: str = "all", strategy=None, export_dir: str = "saved_models",
        overwrite: bool = False, experiment_name: str | None = None,
        verbose: int = 1, time_budget_s: float | None = None) -> Experiment:
    """Runs `mode` (one of `MODES`) of the gin-configured experiment in `workdir`.

    Every setting the requested modes use is checked first, so a bad one fails before
    any training. Modes that write the workdir (training, sampling, evaluation) hold
    its lock for the whole run; `export` only reads it.

    With `time_budget_s`, training checkpoints and stops (`errors.Interrupted`, code 143) once
    the budget is spent, and sampling and evaluation start no new model after it; the
    same call again goes on from there, so each piece fits a fixed job slot.

    Raises:
        PipelineError, validation.ConfigError, WorkDirError: bad settings, a busy or
            missing workdir, or a workdir trained with another config.
    """
    if mode not in MODES:
        raise PipelineError(f"Unknown mode {mode!r}; allowed: {', '.join(MODES)}.")
    if time_budget_s is not None:
        validation.positive_float("time_budget_s", time_budget_s)
    deadline = None if time_budget_s is None else time.time() + time_budget_s
    eval_cfg = _validate_run_settings(mode, experiment_name, workdir)
    writes = mode != "export"
    if not writes or mode in ("distill", "eval", "sample"):
        # These modes need what an earlier run trained: never create the folder.
        WorkDir(workdir).require()
    # The data and the network are checked (files found, sizes the U-Net can take)
    # before the lock, which creates a new workdir: a bad setting leaves nothing behind.
    experiment = Experiment(workdir, strategy, deadline,
                            PreemptionGuard(deadline, agree=cluster.agreement(strategy)))
    distribute.configure_input(experiment.dataset)
    # Only the writing process locks: the others of a multi-process run share the folder.
    chief = distribute.is_chief(strategy)
    lock = WorkDir(workdir).lock(mode) if writes and chief else contextlib.nullcontext()
    with lock:
        # SIGTERM or Ctrl-C during training stops at the next step with a checkpoint;
        # elsewhere (export, sampling, evaluation: each result written atomically as it
        # is made) it ends the process as usual. With several processes the stop is
        # agreed by all of them, so they all stop at the same step.
        with experiment.guard:
            experiment.check_workdir(write=mode in ("train_teacher", "distill", "all"))
            print(f"[run] {mode} in {workdir}: network {experiment.param_count:,} "
                  f"parameters, images {experiment.image_shape}, batch "
                  f"{experiment.batch_size}, stages {experiment.distill_cfg['ladder']}, "
                  f"backend {keras.backend.backend()}, "
                  f"input {_input_kind(experiment.dataset)}", flush=True)
            # A peer that dies ends this process with one `error:` line instead of a
            # hang or a traceback (nothing changes for one process).
            with cluster.exit_on_lost_peer(strategy):
                try:
                    if mode in ("train_teacher", "all"):
                        experiment.train_teacher(verbose)
                    if mode == "all":
                        # The other processes read the teacher's `final` next, which
                        # the chief may still be writing.
                        cluster.barrier(strategy)
                    if mode in ("distill", "all"):
                        experiment.distill(verbose)
                finally:
                    _report_agreement(experiment.guard, verbose)
        if not chief:
            print(f"[run] process is not the chief: {mode} leaves export, sampling and "
                  "evaluation to it", flush=True)
            return experiment
        if mode in ("export", "all"):
            from keras_progdist import export
            export.export_experiment(experiment, export_dir, experiment_name, overwrite)
        # Evaluation reads the work directory and plain settings, never gin.
        try:
            if mode == "sample":
                samples.write_workdir_samples(experiment.wd, eval_cfg, verbose=verbose,
                                              deadline=deadline)
            if mode in ("eval", "all"):
                scores = report.evaluate_workdir(experiment.wd, eval_cfg,
                                                 dataset_settings(), verbose=verbose,
                                                 deadline=deadline)
                tensorboard_log.write_eval_scores(experiment.path("logs", "eval"),
                                                  scores["results"])
        except report.EvaluationInterrupted as e:
            raise Interrupted(str(e)) from None
    return experiment

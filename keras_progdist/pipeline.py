"""The whole job, resumable: teacher -> distillation stages -> export -> evaluation.

Work directory layout (every file written atomically):

    <workdir>/config.json              network/diffusion config of this run (checked on resume)
    <workdir>/operative_config.gin     the gin config as run
    <workdir>/teacher/ckpt.json (+ ckpt-<sha>.npz)   in-progress teacher: weights, EMA,
                                       optimizer, RNG, step
    <workdir>/teacher/final.json (+ final-<sha>.npz) the finished teacher's sampling
                                       (EMA) network
    <workdir>/student_<N>/ckpt|final   the same for each distillation stage
    <workdir>/stages.json              one line per finished stage (steps, updates, loss,
                                       seconds of the process that finished it), derived
                                       from the `final` checkpoints' metadata
    <workdir>/samples/*.png            sample grids, all stages from the same noise
    <workdir>/logs/                    TensorBoard

A run killed at any moment and restarted with the same command continues from the last
checkpoint of the stage it was in; finished stages are never redone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import gin
import keras
import numpy as np

from keras_progdist import (checkpoint, data, distribute, fileio, images, losses,
                            parameterizations, validation)
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.distillation import Distiller
from keras_progdist.evaluation import report  # registers the evaluate.* gin bindings
from keras_progdist.networks.unet import UNet
from keras_progdist.optimizers import make_optimizer
from keras_progdist.schedules import Schedule
from keras_progdist.workdir import WorkDir, stage_name

import inspect

# UNet takes **kwargs (Keras' name/dtype/...), so without an allowlist gin would accept a
# misspelled binding such as `UNet.chanels` and silently ignore it.
UNetConfigurable = gin.external_configurable(
    UNet, name="UNet",
    allowlist=[p for p in inspect.signature(UNet.__init__).parameters
               if p not in ("self", "kwargs", "image_shape", "output_channels")])
ScheduleConfigurable = gin.external_configurable(Schedule, name="Schedule")

SAMPLE_SEED = 1234
MODES = ("train_teacher", "distill", "sample", "export", "eval", "all")


class PipelineError(ValueError):
    """A configuration or work-directory problem found before any training."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


# -- configuration ---------------------------------------------------------------------
@gin.configurable
def diffusion(parameterization: str = "v", weighting: str = "snr_trunc",
              ema_decay: float | None = 0.9999, seed: int = 0) -> dict:
    """The diffusion settings of the teacher (DESIGN.md §1)."""
    parameterizations.check_parameterization(parameterization)
    losses.check_weighting(weighting)
    if ema_decay is not None:
        ema_decay = validation.fraction("diffusion.ema_decay", ema_decay)
    validation.nonnegative_int("diffusion.seed", seed)
    return dict(parameterization=parameterization, weighting=weighting,
                ema_decay=ema_decay, seed=seed)


@gin.configurable
def teacher(train_steps: int = 1000, learning_rate: float = 2e-4, warmup_steps: int = 0,
            global_clipnorm: float = 1.0, weight_decay: float = 0.0,
            checkpoint_every: int = 100, steps_per_execution: int = 10,
            jit_compile: bool = True) -> dict:
    """Teacher training settings (paper, CIFAR-10: lr 2e-4, 1000 warm-up, clip 1)."""
    _positive("teacher", train_steps=train_steps, checkpoint_every=checkpoint_every,
              steps_per_execution=steps_per_execution)
    validation.positive_float("teacher.learning_rate", learning_rate)
    validation.nonnegative_int("teacher.warmup_steps", warmup_steps)
    validation.optional_positive_float("teacher.global_clipnorm", global_clipnorm)
    validation.nonnegative_float("teacher.weight_decay", weight_decay)
    validation.boolean("teacher.jit_compile", jit_compile)
    if train_steps % checkpoint_every:
        raise PipelineError(f"teacher.train_steps ({train_steps}) must be a multiple of "
                            f"teacher.checkpoint_every ({checkpoint_every}).")
    return dict(train_steps=train_steps, learning_rate=learning_rate,
                warmup_steps=warmup_steps, global_clipnorm=global_clipnorm,
                weight_decay=weight_decay, checkpoint_every=checkpoint_every,
                steps_per_execution=steps_per_execution, jit_compile=jit_compile)


@gin.configurable
def distill(teacher_steps: int = 1024, min_steps: int = 1, updates_per_stage: int = 1000,
            updates_overrides: dict | None = None, learning_rate: float = 5e-5,
            weighting: str = "snr_trunc", checkpoint_every: int = 100,
            steps_per_execution: int = 10, jit_compile: bool = True,
            student_dropout: float = 0.0) -> dict:
    """Distillation settings.

    Args:
        teacher_steps: the teacher's DDIM step count; the first student takes half.
        min_steps: the last stage's step count (default 1).
        updates_per_stage: optimizer updates per stage (paper: 50k).
        updates_overrides: `{num_steps: updates}` for particular stages (paper: 100k
            for 2 and 1 steps).
        learning_rate: start of the linear decay to 0 over each stage.
        student_dropout: the students' dropout rate (the paper: 0, whatever the
            teacher used).
    """
    if not _is_power_of_two(teacher_steps):
        raise PipelineError(f"distill.teacher_steps must be a power of two, got "
                            f"{teacher_steps}.")
    if not _is_power_of_two(min_steps):
        raise PipelineError(f"distill.min_steps must be a power of two, got {min_steps}.")
    if min_steps >= teacher_steps:
        raise PipelineError(f"distill.min_steps ({min_steps}) must be below "
                            f"distill.teacher_steps ({teacher_steps}).")
    losses.check_weighting(weighting)
    validation.positive_float("distill.learning_rate", learning_rate)
    validation.fraction("distill.student_dropout", student_dropout)
    validation.boolean("distill.jit_compile", jit_compile)
    if not isinstance(updates_overrides, (dict, type(None))):
        raise PipelineError(f"distill.updates_overrides must be a dict {{num_steps: "
                            f"updates}}, got {updates_overrides!r}.")
    overrides = {validation.positive_int("distill.updates_overrides key", k): v
                 for k, v in (updates_overrides or {}).items()}
    ladder = stage_ladder(teacher_steps, min_steps)
    unknown = sorted(set(overrides) - set(ladder))
    if unknown:
        raise PipelineError(f"distill.updates_overrides names step counts {unknown} that "
                            f"are not stages; the stages are {ladder}.")
    _positive("distill", updates_per_stage=updates_per_stage,
              checkpoint_every=checkpoint_every, steps_per_execution=steps_per_execution)
    for n, u in overrides.items():
        validation.positive_int(f"distill.updates_overrides[{n}]", u)
    updates = {n: overrides.get(n, updates_per_stage) for n in ladder}
    for n, u in updates.items():
        if u % checkpoint_every:
            raise PipelineError(f"The stage to {n} steps has {u} updates, not a multiple "
                                f"of distill.checkpoint_every ({checkpoint_every}).")
    return dict(teacher_steps=teacher_steps, min_steps=min_steps, ladder=ladder,
                updates=updates, learning_rate=learning_rate, weighting=weighting,
                checkpoint_every=checkpoint_every, student_dropout=student_dropout,
                steps_per_execution=steps_per_execution, jit_compile=jit_compile)


def stage_ladder(teacher_steps: int, min_steps: int = 1) -> list:
    """Student step counts `[T/2, T/4, ..., min_steps]`."""
    ladder, n = [], teacher_steps // 2
    while n >= min_steps:
        ladder.append(n)
        n //= 2
    return ladder


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def _positive(scope: str, **values):
    for name, value in values.items():
        validation.positive_int(f"{scope}.{name}", value)


class Experiment:
    """Everything a run needs, built and checked up front from the gin config."""

    def __init__(self, workdir: str, strategy=None, deadline: float | None = None,
                 guard: "PreemptionGuard | None" = None):
        self.workdir = workdir
        # `run` installs the guard's SIGTERM handler for the whole run, so a signal at
        # any moment (between stages too) ends in a clean stop.
        self.guard = guard if guard is not None else PreemptionGuard(deadline)
        # One writer per run: with several processes (multi-host JAX, multi-worker or
        # TPU pods) the others train in lockstep but write nothing.
        self.chief = distribute.is_chief(strategy)
        self.wd = WorkDir(workdir)
        self.strategy = strategy
        self.deadline = deadline
        self.diffusion = diffusion()
        # Every process of a multi-process run must build identical initial weights
        # (a replicated variable is checked for that), and a re-run the same ones.
        keras.utils.set_random_seed(self.diffusion["seed"])
        self.teacher_cfg = teacher()
        self.distill_cfg = distill()
        self.schedule = ScheduleConfigurable()
        self.dataset = data.make_dataset()
        self.image_shape, self.batch_size, self.with_labels = data.batch_spec(self.dataset)
        self.network_config = self._network_config()

    def _network_config(self) -> dict:
        channels = self.image_shape[-1]
        out = parameterizations.output_channels(self.diffusion["parameterization"],
                                                channels)
        network = UNetConfigurable(image_shape=self.image_shape, output_channels=out,
                                   name="network")
        config = network.get_config()
        if config["num_classes"] and not self.with_labels:
            raise PipelineError(
                f"UNet.num_classes={config['num_classes']} needs labelled data: set "
                "dataset.with_labels = True.")
        if self.with_labels and not config["num_classes"]:
            raise PipelineError("dataset.with_labels = True but the UNet is "
                                "unconditional: set UNet.num_classes.")
        self.param_count = network.count_params()
        return config

    # -- work directory ------------------------------------------------------------
    def path(self, *parts) -> str:
        return self.wd.path(*parts)

    def check_workdir(self, write: bool = True) -> None:
        """Checks the run's config against the one recorded in the workdir.

        Args:
            write: record the config (and the operative gin config) when training; a
                run that only reads the workdir (export, eval) writes nothing there.
        """
        record = {"network": self.network_config, "diffusion": self.diffusion,
                  "schedule": self.schedule.get_config()}
        path = self.path("config.json")
        existing = self.wd.read_config()
        if existing is not None:
            for key in ("network", "diffusion", "schedule"):
                if _canon(existing.get(key)) != _canon(record[key]):
                    diff = {k: (existing[key].get(k), record[key].get(k))
                            for k in record[key] if existing[key].get(k) != record[key].get(k)}
                    raise PipelineError(
                        f"The {key} config in {path} (written by the run that trained "
                        f"this workdir) does not match the gin config: (workdir, gin) = "
                        f"{diff}. Use a new --workdir or the original config.")
        if not write or not self.chief:
            return
        if existing is None:
            self.wd.write_json("config.json", record)
        fileio.atomic_write_text(self.path("operative_config.gin"),
                                 gin.operative_config_str() or gin.config_str())

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else \
            contextlib.nullcontext()

    def new_network(self, name="network") -> UNet:
        return UNet.from_config({**self.network_config, "name": name})

    def sampling_model(self, network: UNet, num_steps: int) -> DiffusionModel:
        """An EMA-free `DiffusionModel` around `network` that samples in `num_steps`."""
        return DiffusionModel(network, schedule=self.schedule,
                              parameterization=self.diffusion["parameterization"],
                              weighting=self.diffusion["weighting"], ema_decay=None,
                              num_steps=num_steps, name=f"sampler_{num_steps}")

    def sample_grid(self, model: DiffusionModel, num_steps: int, filename: str,
                    count: int = 16) -> str:
        noise = keras.random.normal((count,) + self.image_shape, seed=SAMPLE_SEED)
        label = np.arange(count) % self.network_config["num_classes"] \
            if self.network_config["num_classes"] else None
        samples = model.sample(noise=noise, num_steps=num_steps, label=label)
        return images.save_grid(samples, self.path("samples", filename))

    def load_final(self, stage: str, num_steps: int) -> DiffusionModel:
        """The finished network of `stage` (`teacher` or `student_<N>`) as a sampler."""
        directory = self.path(stage)
        if not checkpoint.exists(directory, "final"):
            raise PipelineError(f"Stage {stage!r} has not finished in {self.workdir} "
                                f"({directory}/final.json is missing).")
        network = self.new_network()
        checkpoint.restore(directory, "final", network)
        return self.sampling_model(network, num_steps)

    def finished_stages(self) -> list:
        """One entry per finished stage, in ladder order, read from the `final`
        checkpoints themselves (so a kill between two writes cannot lose a stage)."""
        entries = []
        for stage in ["teacher"] + [stage_name(n) for n in self.distill_cfg["ladder"]]:
            if checkpoint.exists(self.path(stage), "final"):
                meta = checkpoint.read_meta(self.path(stage), "final")
                entries.append({k: meta[k] for k in
                                ("stage", "num_steps", "updates", "loss", "seconds")})
        return entries

    def _finish_stage(self, stage: str, network, num_steps: int, updates: int, loss: float,
                      seconds: float) -> DiffusionModel:
        """Saves the stage's network (its completion marker), grid, and summary line."""
        entry = {"stage": stage, "num_steps": num_steps, "updates": updates,
                 "loss": loss, "seconds": seconds}
        if not self.chief:
            # The chief may still be writing `final`: go on from this process's copy.
            copy = self.new_network()
            copy.set_weights(network.get_weights())
            return self.sampling_model(copy, num_steps)
        checkpoint.save(self.path(stage), "final", network, meta={"step": updates, **entry},
                        include_optimizer=False)
        # The resume checkpoint (weights, optimizer slots: ~4x the final weights) has
        # served its purpose once the stage is final.
        checkpoint.remove(self.path(stage), "ckpt")
        print(f"[stage] {stage}: {num_steps} steps, {updates} updates, loss {loss:.5f}, "
              f"{seconds:.1f} s", flush=True)
        return self._finished(stage, num_steps)

    def _finished(self, stage: str, num_steps: int) -> DiffusionModel:
        """Loads a finished stage; (re)writes its sample grid and stages.json if missing."""
        sampler = self.load_final(stage, num_steps)
        if not self.chief:
            return sampler
        grid = f"teacher_{num_steps:05d}steps.png" if stage == "teacher" else f"{stage}.png"
        if not os.path.exists(self.path("samples", grid)):
            self.sample_grid(sampler, num_steps, grid)
        self.wd.write_json("stages.json", self.finished_stages())
        return sampler

    def callbacks(self, checkpointer: StepCheckpoint, stage: str):
        callbacks = [checkpointer]
        if not self.chief:
            return callbacks
        try:
            import tensorboard  # noqa: F401  The callback needs TF and TensorBoard.
            import tensorflow  # noqa: F401
            callbacks.append(keras.callbacks.TensorBoard(self.path("logs", stage)))
        except ImportError:
            pass
        return callbacks

    # -- stages --------------------------------------------------------------------
    def train_teacher(self, verbose: int = 1) -> DiffusionModel:
        """Trains (or resumes, or skips) the teacher; returns its sampling model."""
        cfg = self.teacher_cfg
        steps = self.distill_cfg["teacher_steps"]
        directory = self.path("teacher")
        if checkpoint.exists(directory, "final"):
            print("[stage] teacher: finished earlier, skipping", flush=True)
            return self._finished("teacher", steps)
        start = time.time()
        # Seeded initialization: a run and its re-run start from the same weights (a
        # resumed run restores them anyway).
        keras.utils.set_random_seed(self.diffusion["seed"])
        with self.scope():
            model = DiffusionModel(self.new_network(), schedule=self.schedule,
                                   num_steps=steps, name="teacher_model", **self.diffusion)
            model.compile(optimizer=make_optimizer(
                cfg["learning_rate"], warmup_steps=cfg["warmup_steps"],
                global_clipnorm=cfg["global_clipnorm"], weight_decay=cfg["weight_decay"]),
                **distribute.fit_settings(self.strategy, cfg["jit_compile"],
                                          cfg["steps_per_execution"]))
            model.optimizer.build(model.trainable_variables)
        done = 0
        if checkpoint.exists(directory, "ckpt"):
            done = checkpoint.restore(directory, "ckpt", model)["step"]
            print(f"[stage] teacher: resuming at step {done}/{cfg['train_steps']}",
                  flush=True)
        every = cfg["checkpoint_every"]
        saver = StepCheckpoint(directory, model, every, "teacher", done, self.guard,
                               write=self.chief)
        history = resumable_fit(model, self.dataset, cfg["train_steps"], every, done,
                                self.callbacks(saver, "teacher"), saver, verbose)
        loss = _last_loss(history, directory)
        return self._finish_stage("teacher", model.sampling_network, steps,
                                  cfg["train_steps"], loss, time.time() - start)

    def distill(self, verbose: int = 1) -> list:
        """Runs (or resumes) every distillation stage; returns the finished ladder."""
        cfg = self.distill_cfg
        if not checkpoint.exists(self.path("teacher"), "final"):
            raise PipelineError(
                f"No trained teacher in {self.workdir} (teacher/final.json is missing): "
                "run --mode=train_teacher first, or --mode=all.")
        previous = self.load_final("teacher", cfg["teacher_steps"]).network
        distiller = None
        for n in cfg["ladder"]:
            stage = stage_name(n)
            directory = self.path(stage)
            if checkpoint.exists(directory, "final"):
                print(f"[stage] {stage}: finished earlier, skipping", flush=True)
                previous = self._finished(stage, n).network
                continue
            if self.guard.requested:
                raise Preempted(f"[preempted] SIGTERM or time budget before {stage}; "
                                "finished stages are saved. Re-run the same command to "
                                "go on.")
            start = time.time()
            updates = cfg["updates"][n]
            if distiller is None:
                with self.scope():
                    distiller = Distiller(previous, schedule=self.schedule,
                                          parameterization=self.diffusion["parameterization"],
                                          weighting=cfg["weighting"], num_steps=n,
                                          seed=self.diffusion["seed"] + 1,
                                          student_dropout=cfg["student_dropout"],
                                          name="distiller")
            with self.scope():
                distiller.prepare_stage(
                    previous, n, updates, cfg["learning_rate"], global_clipnorm=1.0,
                    **distribute.fit_settings(self.strategy, cfg["jit_compile"],
                                              cfg["steps_per_execution"]))
            done = 0
            if checkpoint.exists(directory, "ckpt"):
                done = checkpoint.restore(directory, "ckpt", distiller)["step"]
                print(f"[stage] {stage}: resuming at update {done}/{updates}", flush=True)
            every = cfg["checkpoint_every"]
            print(f"[stage] {stage}: distilling {2 * n} -> {n} steps", flush=True)
            saver = StepCheckpoint(directory, distiller, every, stage, done, self.guard,
                                   write=self.chief)
            history = resumable_fit(distiller, self.dataset, updates, every, done,
                                    self.callbacks(saver, stage), saver, verbose)
            loss = _last_loss(history, directory)
            previous = self._finish_stage(stage, distiller.student, n, updates, loss,
                                          time.time() - start).network
        return self.finished_stages()

    def stage_models(self) -> list:
        """`[(stage, num_steps, DiffusionModel)]` for the teacher and finished students."""
        models = [("teacher", self.distill_cfg["teacher_steps"],
                   self.load_final("teacher", self.distill_cfg["teacher_steps"]))]
        for n in self.distill_cfg["ladder"]:
            stage = stage_name(n)
            if checkpoint.exists(self.path(stage), "final"):
                models.append((stage, n, self.load_final(stage, n)))
        return models


class Preempted(SystemExit):
    """SIGTERM arrived or the time budget ran out: a checkpoint at the exact step was
    written; exit code 143 (re-run the same command to go on)."""

    def __init__(self, message: str):
        print(message, flush=True)
        super().__init__(143)


class PreemptionGuard:
    """Turns SIGTERM, or passing `deadline` (a `time.time()`), into a flag that the
    checkpoint callback acts on after a step."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self._signalled = False
        self._previous = None

    @property
    def requested(self) -> bool:
        return self._signalled or (self.deadline is not None and time.time() > self.deadline)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._signalled = True

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints `model` (+ optimizer, RNG) every `every` steps and on SIGTERM.

    Counts the exact global step (`steps_per_execution` chunks included), refuses to
    save a NaN/inf loss (the last good checkpoint stays), and on preemption saves at
    the current step and stops training.
    """

    def __init__(self, directory: str, model, every: int, stage: str, start_step: int,
                 guard: PreemptionGuard | None = None, write: bool = True):
        super().__init__()
        self.write = write
        self.directory = directory
        self.target = model
        self.every = every
        self.stage = stage
        self.step = start_step
        self.guard = guard
        self.preempted = False
        self._epoch_start = start_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def _save(self, logs):
        loss = float((logs or {}).get("loss", float("nan")))
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"{self.stage}: the loss became {loss} by step {self.step}; the last "
                f"good checkpoint in {self.directory} is kept. Lower the learning rate "
                "or check the data.")
        if self.write:
            checkpoint.save(self.directory, "ckpt", self.target,
                            meta={"step": self.step, "loss": loss})

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + int(batch) + 1
        if self.guard is not None and self.guard.requested and not self.preempted:
            self._save(logs)
            self.preempted = True
            self.target.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not self.preempted:
            self._save(logs)


def input_at(dataset, step: int):
    """The stage's training input from its batch `step` on.

    Batch `k` of a stage is the same whether the stage ran in one piece or was stopped
    and resumed (a new process, a new `fit`), so a resumed stage reproduces the
    uninterrupted one. A numpy stream is a pure function of its seed and is advanced
    by arithmetic; a tf.data pipeline (seeded) skips `step` batches.
    """
    if isinstance(dataset, data.ArrayBatches):
        return dataset.stream(start_batch=step)
    return dataset.skip(step) if step else dataset


def resumable_fit(model, dataset, total_steps: int, every: int, done: int, callbacks,
                  checkpointer: StepCheckpoint, verbose: int):
    """`model.fit` from step `done` to `total_steps` in epochs of `every` steps.

    A run preempted mid-epoch first finishes that epoch's remainder, so checkpoints
    stay on multiples of `every` afterwards. Each `fit` reads `input_at(dataset,
    step)`: Keras may read ahead of the steps it runs, so a stream is never shared.
    """
    history = None
    remainder = (every - done % every) % every
    if remainder and done < total_steps:
        history = model.fit(input_at(dataset, done), epochs=1, steps_per_epoch=remainder,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
        done += remainder
    if done < total_steps and not checkpointer.preempted:
        # Epoch numbering keeps `done // every` epochs behind it, so the input starts
        # at the first batch of epoch `done // every`, which is `done`.
        history = model.fit(input_at(dataset, done), epochs=total_steps // every,
                            steps_per_epoch=every, initial_epoch=done // every,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
    if checkpointer.preempted:
        raise Preempted(f"[preempted] {checkpointer.stage}: SIGTERM or time budget; "
                        f"checkpoint saved at step {checkpointer.step}. Re-run the same "
                        "command to resume.")
    return history


def _last_loss(history, directory: str) -> float:
    losses = (history.history.get("loss") or []) if history is not None else []
    if losses:
        return float(losses[-1])
    return float(checkpoint.read_meta(directory, "ckpt").get("loss", float("nan")))


def _canon(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _validate_run_settings(mode: str, experiment_name: str | None, workdir: str) -> dict:
    """Checks every setting the requested modes will use, before any of them runs.

    Returns:
        The evaluation settings (empty when no evaluation is asked for).
    """
    diffusion(), teacher(), distill()  # each raises on a bad value
    cfg = {}
    if mode in ("eval", "sample", "all"):
        cfg = report.settings()
    if mode in ("export", "all"):
        from keras_progdist import export

        export._check_name(experiment_name or export._default_name(workdir))
    return cfg


def _input_kind(dataset) -> str:
    return "numpy batches" if isinstance(dataset, data.ArrayBatches) else "tf.data"


def run(workdir: str, mode: str = "all", strategy=None, export_dir: str = "saved_models",
        overwrite: bool = False, experiment_name: str | None = None,
        verbose: int = 1, time_budget_s: float | None = None) -> Experiment:
    """Runs `mode` (one of `MODES`) of the gin-configured experiment in `workdir`.

    Every setting the requested modes use is checked first, so a bad one fails before
    any training. Modes that write the workdir (training, sampling, evaluation) hold
    its lock for the whole run; `export` only reads it.

    With `time_budget_s`, training checkpoints and exits (`Preempted`, code 143) once
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
    _validate_run_settings(mode, experiment_name, workdir)
    writes = mode != "export"
    if not writes or mode in ("distill", "eval", "sample"):
        # These modes need what an earlier run trained: never create the folder.
        WorkDir(workdir).require()
    # Only the writing process locks: the others of a multi-process run share the folder.
    chief = distribute.is_chief(strategy)
    lock = WorkDir(workdir).lock(mode) if writes and chief else contextlib.nullcontext()
    with lock:
        # SIGTERM during training stops at the next step with a checkpoint; elsewhere
        # (export, sampling, evaluation: each result written atomically as it is made)
        # it ends the process as usual.
        with PreemptionGuard(deadline) as guard:
            experiment = Experiment(workdir, strategy, deadline, guard)
            experiment.check_workdir(write=mode in ("train_teacher", "distill", "all"))
            print(f"[run] {mode} in {workdir}: network {experiment.param_count:,} "
                  f"parameters, images {experiment.image_shape}, batch "
                  f"{experiment.batch_size}, stages {experiment.distill_cfg['ladder']}, "
                  f"backend {keras.backend.backend()}, "
                  f"input {_input_kind(experiment.dataset)}", flush=True)
            if mode in ("train_teacher", "all"):
                experiment.train_teacher(verbose)
            if mode in ("distill", "all"):
                experiment.distill(verbose)
        if not chief:
            print(f"[run] process is not the chief: {mode} leaves export, sampling and "
                  "evaluation to it", flush=True)
            return experiment
        if mode in ("export", "all"):
            from keras_progdist import export
            export.export_experiment(experiment, export_dir, experiment_name, overwrite)
        try:
            if mode == "sample":
                from keras_progdist.evaluation import samples
                samples.write_experiment_samples(experiment, verbose=verbose,
                                                 deadline=deadline)
            if mode in ("eval", "all"):
                report.evaluate_experiment(experiment, verbose=verbose, deadline=deadline)
        except report.EvaluationInterrupted as e:
            raise Preempted(str(e)) from None
    return experiment

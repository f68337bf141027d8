"""`Experiment`: the teacher and the distillation ladder of one gin-configured run.

Only the training modes build one (it builds the training data); export, sampling and
evaluation read the work directory through `WorkDir` and take plain settings.

Every stage, teacher or student, goes through `run_stage`: resume from the stage's
checkpoint if there is one, train to its last update with checkpoints (and preemption)
on the way, then finish it (its `final` network, sample grid and `stages.json` entry).
Finished stages are never redone.
"""

from __future__ import annotations

import contextlib
import os

import keras
import numpy as np

import gin
from keras_progdist import data, distribute, images, parameterizations, tensorboard_log
from keras_progdist._keras_compat import set_random_seed
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.distillation import Distiller
from keras_progdist.errors import Interrupted
from keras_progdist.guided_distillation import GuidanceDistiller
from keras_progdist.networks.unet import UNet
from keras_progdist.optimizers import make_optimizer
from keras_progdist.sampling_model import sampling_model
from keras_progdist.settings import as_record
from keras_progdist.training.config import (
    PipelineError,
    ScheduleConfigurable,
    UNetConfigurable,
    diffusion,
    distill,
    guidance,
    sample_grid,
    teacher,
)
from keras_progdist.training.preemption import (
    PreemptionGuard,
    StepCheckpoint,
    last_loss,
    resumable_fit,
    seconds_before,
)
from keras_progdist.workdir import GUIDANCE, TEACHER, WorkDir, stage_name

SAMPLE_SEED = 1234


class Experiment:
    """Everything a run needs, built and checked up front from the gin config.

    Args:
        workdir: the run's work directory (see `WorkDir`).
        strategy: a `tf.distribute` strategy, or None.
        deadline: a `time.time()` after which training stops at the next chunk (held
            by the guard; used only when no `guard` is given).
        guard: the run's preemption flag (`run` installs its SIGTERM handler).
    """

    def __init__(self, workdir: str, strategy=None, deadline: float | None = None,
                 guard: PreemptionGuard | None = None):
        self.wd = WorkDir(workdir)
        self.strategy = strategy
        self.guard = guard if guard is not None else PreemptionGuard(deadline)
        # One writer per run: with several processes (multi-host JAX, multi-worker or
        # TPU pods) the others train in lockstep but write nothing.
        self.chief = distribute.is_chief(strategy)
        self.diffusion = diffusion()
        # Every process of a multi-process run must build identical initial weights
        # (a replicated variable is checked for that), and a re-run the same ones.
        set_random_seed(self.diffusion.seed)
        self.teacher_cfg = teacher()
        self.distill_cfg = distill()
        self.guidance_cfg = guidance()
        self.guided = self.guidance_cfg.enabled
        self.grid_count = sample_grid().count
        self.schedule = ScheduleConfigurable()
        self.dataset = data.make_dataset()
        self.image_shape, self.batch_size, self.with_labels = data.batch_spec(self.dataset)
        self.network_config = self._network_config()
        # Guided distillation: stage one and every student take the guidance input w.
        self.student_network_config = self.network_config
        if self.guided:
            self.student_network_config = {
                **self.network_config, "guidance_conditioned": True,
                "guidance_embedding_scale": self.guidance_cfg.embedding_scale}

    def _network_config(self) -> dict:
        channels = self.image_shape[-1]
        out = parameterizations.output_channels(self.diffusion.parameterization, channels)
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
        if self.diffusion.label_dropout and not config.get("null_class"):
            raise PipelineError(
                f"diffusion.label_dropout={self.diffusion.label_dropout} replaces "
                "labels by the null class: set UNet.num_classes and UNet.null_class = "
                "True.")
        if self.guided and not self.diffusion.label_dropout:
            raise PipelineError(
                "guidance.enabled distills a classifier-free guided teacher: set "
                "diffusion.label_dropout (e.g. 0.1), UNet.num_classes and "
                "UNet.null_class = True.")
        self.param_count = network.count_params()
        return config

    # -- work directory ------------------------------------------------------------
    def check_workdir(self, write: bool = True) -> None:
        """Checks the run's config against the one recorded in the workdir.

        Args:
            write: record the config (and the operative gin config) when training; a
                run that only reads the workdir (export, eval) writes nothing there.

        Raises:
            PipelineError: the workdir was trained with another config.
        """
        record = {"network": self.network_config, "diffusion": as_record(self.diffusion),
                  "schedule": self.schedule.get_config()}
        if self.guided:
            # What export rebuilds the w-conditioned stages from.
            record["student_network"] = self.student_network_config
        mismatch = self.wd.config_mismatch(record)
        if mismatch:
            raise PipelineError(f"{mismatch}. Use a new --workdir or the original config.")
        if write and self.chief:
            self.wd.record_config(record, gin.operative_config_str() or gin.config_str())

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else \
            contextlib.nullcontext()

    def new_network(self, name="network", stage: str = TEACHER) -> UNet:
        """A freshly initialized network of `stage`'s architecture (the teacher's, or
        in a guided run for every other stage the w-conditioned one)."""
        config = self.network_config if stage == TEACHER else self.student_network_config
        return UNet.from_config({**config, "name": name})

    def sampling_model(self, network: UNet, num_steps: int) -> DiffusionModel:
        """An EMA-free `DiffusionModel` around `network` that samples in `num_steps`."""
        return sampling_model(network, num_steps, self.schedule,
                              self.diffusion.parameterization, self.diffusion.weighting)

    def sample_grid(self, model: DiffusionModel, num_steps: int, path: str) -> str:
        """Writes the grid at `path`: `sample_grid.count` samples of `model` in
        `num_steps` from the fixed noise of every stage's grid.

        Returns:
            The grid's path.
        """
        count = self.grid_count
        noise = keras.random.normal((count,) + self.image_shape, seed=SAMPLE_SEED)
        label = np.arange(count) % self.network_config["num_classes"] \
            if self.network_config["num_classes"] else None
        # A guided run's grids, the teacher's included, are guided at guidance.sample_w.
        guidance = self.guidance_cfg.sample_w if self.guided else None
        samples = model.sample(noise=noise, num_steps=num_steps, label=label,
                               guidance=guidance)
        return images.save_grid(samples, path)

    def load_final(self, stage: str, num_steps: int) -> DiffusionModel:
        """The finished network of `stage` (`teacher` or `student_<N>`) as a sampler in
        `num_steps` (`WorkDir.stage_model`, the one loader of finished stages)."""
        if not self.wd.is_finished(stage):
            raise PipelineError(f"Stage {stage!r} has not finished in {self.wd.root} "
                                f"({self.wd.final_checkpoint(stage)} is missing).")
        model = self.wd.stage_model(stage)
        if model.num_steps != num_steps:
            raise PipelineError(f"Stage {stage!r} in {self.wd.root} samples in "
                                f"{model.num_steps} steps, not {num_steps}: the ladder "
                                "changed after it was trained; use a new --workdir.")
        return model

    def stages(self) -> list:
        """`[(stage, num_steps)]`: the teacher, (in a guided run) the guidance stage,
        then every stage of the ladder."""
        teacher_steps = self.distill_cfg.teacher_steps
        guided = [(GUIDANCE, teacher_steps)] if self.guided else []
        return [(TEACHER, teacher_steps)] + guided + \
            [(stage_name(n), n) for n in self.distill_cfg.ladder]

    def finished_stages(self) -> list:
        """One entry per finished stage, in ladder order, read from the `final`
        checkpoints themselves (so a kill between two writes cannot lose a stage)."""
        return self.wd.finished_stages([stage for stage, _ in self.stages()])

    # -- finishing a stage ---------------------------------------------------------
    def _finish_stage(self, stage: str, network, num_steps: int, updates: int, loss: float,
                      seconds: float) -> DiffusionModel:
        """Saves the stage's network (its completion marker), grid, and summary line."""
        entry = {"stage": stage, "num_steps": num_steps, "updates": updates,
                 "loss": loss, "seconds": seconds}
        if not self.chief:
            # The chief may still be writing `final`: go on from this process's copy.
            copy = UNet.from_config({**network.get_config(), "name": "network"})
            copy.set_weights(network.get_weights())
            return self.sampling_model(copy, num_steps)
        self.wd.final_checkpoint(stage).save(
            network, meta={"step": updates, "dropout": network.dropout, **entry},
            include_optimizer=False)
        # The resume checkpoint (weights, optimizer slots: ~4x the final weights) has
        # served its purpose once the stage is final.
        self.wd.resume_checkpoint(stage).remove()
        print(f"[stage] {stage}: {num_steps} steps, {updates} updates, loss {loss:.5f}, "
              f"{seconds:.1f} s", flush=True)
        return self._finished(stage, num_steps)

    def _finished(self, stage: str, num_steps: int) -> DiffusionModel:
        """Loads a finished stage; (re)writes its sample grid, its TensorBoard image and
        stages.json when missing."""
        sampler = self.load_final(stage, num_steps)
        if not self.chief:
            return sampler
        grid = self.wd.grid_path(stage, num_steps)
        if self.grid_count and not os.path.exists(grid):
            self.sample_grid(sampler, num_steps, grid)
            tensorboard_log.write_image(self.wd.grid_log_dir, stage, grid,
                                        step=num_steps)
        self.wd.write_stages(self.finished_stages())
        return sampler

    def callbacks(self, checkpointer: StepCheckpoint, stage: str) -> list:
        callbacks = [checkpointer]
        if self.chief and tensorboard_log.available():
            callbacks.append(keras.callbacks.TensorBoard(self.wd.log_dir(stage)))
        return callbacks

    # -- stages --------------------------------------------------------------------
    def run_stage(self, stage: str, model, total_steps: int, every: int,
                  verbose: int) -> tuple:
        """Trains `model` for `stage` from its checkpoint (if any) to `total_steps`.

        Returns:
            `(loss, seconds)`: the last loss and the stage's training time, summed over
            the processes that ran it (each resume checkpoint records the total so
            far; a hard kill loses the time since the last one, as it loses its steps).

        Raises:
            Interrupted: SIGTERM or the deadline; a checkpoint at the exact step is saved.
        """
        resume = self.wd.resume_checkpoint(stage)
        done, before = 0, 0.0
        if resume.exists():
            meta = resume.restore(model)
            done, before = meta["step"], seconds_before(meta)
            print(f"[stage] {stage}: resuming at step {done}/{total_steps}", flush=True)
        saver = StepCheckpoint(resume, model, every, stage, done, self.guard,
                               write=self.chief, total_steps=total_steps,
                               log_lines=verbose == 2, seconds_before=before)
        history = resumable_fit(model, self.dataset, total_steps, every, done,
                                self.callbacks(saver, stage), saver, verbose)
        return last_loss(history, resume), saver.seconds()

    def train_teacher(self, verbose: int = 1) -> DiffusionModel:
        """Trains (or resumes, or skips) the teacher; returns its sampling model."""
        cfg = self.teacher_cfg
        steps = self.distill_cfg.teacher_steps
        if self.wd.is_finished(TEACHER):
            print("[stage] teacher: finished earlier, skipping", flush=True)
            return self._finished(TEACHER, steps)
        # Seeded initialization: a run and its re-run start from the same weights (a
        # resumed run restores them anyway).
        set_random_seed(self.diffusion.seed)
        with self.scope():
            model = DiffusionModel(self.new_network(), schedule=self.schedule,
                                   num_steps=steps, name="teacher_model",
                                   **as_record(self.diffusion))
            model.compile(optimizer=make_optimizer(
                cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                global_clipnorm=cfg.global_clipnorm, weight_decay=cfg.weight_decay),
                **distribute.fit_settings(self.strategy, cfg.jit_compile,
                                          cfg.steps_per_execution))
            model.optimizer.build(model.trainable_variables)
        print(f"[stage] teacher: training {cfg.train_steps} updates", flush=True)
        loss, seconds = self.run_stage(TEACHER, model, cfg.train_steps,
                                       cfg.checkpoint_every, verbose)
        return self._finish_stage(TEACHER, model.sampling_network, steps,
                                  cfg.train_steps, loss, seconds)

    def train_guidance(self, verbose: int = 1) -> DiffusionModel:
        """Guided distillation's stage one (or its resume, or skip): the w-conditioned
        network that gives the guided teacher's `x_hat_w` in one evaluation; returns
        its sampling model."""
        cfg = self.guidance_cfg
        steps = self.distill_cfg.teacher_steps
        if self.wd.is_finished(GUIDANCE):
            print(f"[stage] {GUIDANCE}: finished earlier, skipping", flush=True)
            return self._finished(GUIDANCE, steps)
        teacher_network = self.load_final(TEACHER, steps).network
        set_random_seed(self.diffusion.seed)
        with self.scope():
            trainer = GuidanceDistiller(
                teacher_network, schedule=self.schedule,
                parameterization=self.diffusion.parameterization,
                weighting=cfg.weighting, w_min=cfg.w_min, w_max=cfg.w_max,
                seed=self.diffusion.seed + 2,
                student_dropout=self.distill_cfg.student_dropout,
                guidance_embedding_scale=cfg.embedding_scale,
                name="guidance_distiller")
            trainer.compile(optimizer=make_optimizer(
                cfg.learning_rate, decay_to_zero_steps=cfg.updates,
                global_clipnorm=1.0),
                **distribute.fit_settings(self.strategy, cfg.jit_compile,
                                          cfg.steps_per_execution))
            trainer.optimizer.build(trainer.trainable_variables)
        print(f"[stage] {GUIDANCE}: training the w-conditioned network, w in "
              f"[{cfg.w_min}, {cfg.w_max}], {cfg.updates} updates", flush=True)
        loss, seconds = self.run_stage(GUIDANCE, trainer, cfg.updates,
                                       cfg.checkpoint_every, verbose)
        return self._finish_stage(GUIDANCE, trainer.student, steps, cfg.updates, loss,
                                  seconds)

    def distill(self, verbose: int = 1) -> list:
        """Runs (or resumes) every distillation stage; returns the finished ladder.

        In a guided run (`guidance.enabled`) the guidance stage comes first and the
        ladder distills its w-conditioned network."""
        cfg = self.distill_cfg
        if not self.wd.is_finished(TEACHER):
            raise PipelineError(
                f"No trained teacher in {self.wd.root} ({self.wd.final_checkpoint(TEACHER)} "
                "is missing): run --mode=train_teacher first, or --mode=all.")
        if self.guided:
            previous = self.train_guidance(verbose).network
        else:
            previous = self.load_final(TEACHER, cfg.teacher_steps).network
        distiller = None
        for n in cfg.ladder:
            stage = stage_name(n)
            if self.wd.is_finished(stage):
                print(f"[stage] {stage}: finished earlier, skipping", flush=True)
                previous = self._finished(stage, n).network
                continue
            if self.guard.requested:
                raise Interrupted(f"[preempted] SIGTERM or time budget before {stage}; "
                                "finished stages are saved. Re-run the same command to "
                                "go on.")
            updates = cfg.updates[n]
            # Keras' global random stream (any layer built from here on draws from it)
            # at the same place whichever stages ran before in this process.
            set_random_seed(self.diffusion.seed)
            with self.scope():
                if distiller is None:
                    distiller = Distiller(
                        previous, schedule=self.schedule,
                        parameterization=self.diffusion.parameterization,
                        weighting=cfg.weighting, num_steps=n,
                        seed=self.diffusion.seed + 1,
                        student_dropout=cfg.student_dropout,
                        w_min=self.guidance_cfg.w_min, w_max=self.guidance_cfg.w_max,
                        name="distiller")
                distiller.prepare_stage(
                    previous, n, updates, cfg.learning_rate, global_clipnorm=1.0,
                    learning_rate_schedule=cfg.learning_rate_schedule,
                    **distribute.fit_settings(self.strategy, cfg.jit_compile,
                                              cfg.steps_per_execution))
            print(f"[stage] {stage}: distilling {2 * n} -> {n} steps", flush=True)
            loss, seconds = self.run_stage(stage, distiller, updates,
                                           cfg.checkpoint_every, verbose)
            previous = self._finish_stage(stage, distiller.student, n, updates, loss,
                                          seconds).network
        return self.finished_stages()


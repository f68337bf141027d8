"""The experiment's configuration schema: the gin configurables and their checks.

This is the one place gin is bound besides the classes users bind directly (`UNet`,
`Schedule`, `dataset`). Each configurable checks every value (type and range, with the
binding's name in the message) and returns a frozen settings object
(`keras_progdist.settings`), so a run validates all the settings its modes will use
before any work starts, and nothing downstream reads gin.
"""

from __future__ import annotations

import difflib
import inspect
import re

import gin
from keras_progdist import losses, parameterizations, validation
from keras_progdist.errors import KerasProgdistError
from keras_progdist.networks.unet import UNet
from keras_progdist.schedules import Schedule
from keras_progdist.settings import (
    DEFAULT_MAX_FILE_MB,
    LEARNING_RATE_SCHEDULES,
    DiffusionSettings,
    DistillSettings,
    EvaluateSettings,
    GuidanceSettings,
    SampleGridSettings,
    TeacherSettings,
)

# UNet takes **kwargs (Keras' name/dtype/...), so without an allowlist gin would accept a
# misspelled binding such as `UNet.chanels` and silently ignore it. The guidance input
# `w` belongs to guided distillation's students, never to the teacher gin configures.
UNET_PARAMETERS = [p for p in inspect.signature(UNet.__init__).parameters
                   if p not in ("self", "kwargs", "image_shape", "output_channels",
                                "guidance_conditioned", "guidance_embedding_scale")]
UNetConfigurable = gin.external_configurable(UNet, name="UNet", allowlist=UNET_PARAMETERS)
ScheduleConfigurable = gin.external_configurable(Schedule, name="Schedule")

MODES = ("train_teacher", "distill", "sample", "export", "eval", "all")


class PipelineError(KerasProgdistError, ValueError):
    """A configuration or work-directory problem found before any training."""


# -- configuration ---------------------------------------------------------------------
@gin.configurable
def diffusion(parameterization: str = "v", weighting: str = "snr_trunc",
              ema_decay: float | None = 0.9999, seed: int = 0,
              label_dropout: float = 0.0) -> DiffusionSettings:
    """The teacher's diffusion settings: output parameterization, loss weighting, EMA.

    Args:
        label_dropout: probability that a training label is replaced by the null class
            (classifier-free guidance; 0.1-0.2 is usual). Needs `UNet.num_classes` and
            `UNet.null_class = True`.
    """
    parameterizations.check_parameterization(parameterization)
    losses.check_weighting(weighting)
    if ema_decay is not None:
        ema_decay = validation.fraction("diffusion.ema_decay", ema_decay)
    validation.nonnegative_int("diffusion.seed", seed)
    label_dropout = validation.fraction("diffusion.label_dropout", label_dropout)
    return DiffusionSettings(parameterization=parameterization, weighting=weighting,
                             ema_decay=ema_decay, seed=seed, label_dropout=label_dropout)


@gin.configurable
def teacher(train_steps: int = 1000, learning_rate: float = 2e-4, warmup_steps: int = 0,
            global_clipnorm: float = 1.0, weight_decay: float = 0.0,
            checkpoint_every: int = 100, steps_per_execution: int = 10,
            jit_compile: bool = True) -> TeacherSettings:
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
    return TeacherSettings(train_steps=train_steps, learning_rate=learning_rate,
                           warmup_steps=warmup_steps, global_clipnorm=global_clipnorm,
                           weight_decay=weight_decay, checkpoint_every=checkpoint_every,
                           steps_per_execution=steps_per_execution,
                           jit_compile=jit_compile)


@gin.configurable
def distill(teacher_steps: int = 1024, min_steps: int = 1, updates_per_stage: int = 1000,
            updates_overrides: dict | None = None, learning_rate: float = 5e-5,
            weighting: str = "snr_trunc", checkpoint_every: int = 100,
            steps_per_execution: int = 10, jit_compile: bool = True,
            student_dropout: float = 0.0,
            learning_rate_schedule: str = "linear") -> DistillSettings:
    """Distillation settings.

    Args:
        teacher_steps: the teacher's DDIM step count; the first student takes half.
        min_steps: the last stage's step count (default 1).
        updates_per_stage: optimizer updates per stage (paper: 50k).
        updates_overrides: `{num_steps: updates}` for particular stages (paper: 100k
            for 2 and 1 steps).
        learning_rate: each stage's Adam rate: where its linear decay to 0 starts,
            or the whole stage's rate with `learning_rate_schedule="constant"`.
        student_dropout: the students' dropout rate (the paper: 0, whatever the
            teacher used).
        learning_rate_schedule: `linear` (decay to 0 over each stage) or `constant`
            (the official code's shape: no decay, no warm-up).
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
    if learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
        raise PipelineError(f"distill.learning_rate_schedule must be one of "
                            f"{', '.join(LEARNING_RATE_SCHEDULES)}, got "
                            f"{learning_rate_schedule!r}.")
    ladder = stage_ladder(teacher_steps, min_steps)
    _positive("distill", updates_per_stage=updates_per_stage,
              checkpoint_every=checkpoint_every, steps_per_execution=steps_per_execution)
    updates = _stage_updates(ladder, updates_per_stage, updates_overrides, checkpoint_every)
    return DistillSettings(teacher_steps=teacher_steps, min_steps=min_steps,
                           ladder=tuple(ladder), updates=updates,
                           learning_rate=learning_rate,
                           learning_rate_schedule=learning_rate_schedule,
                           weighting=weighting, checkpoint_every=checkpoint_every,
                           student_dropout=student_dropout,
                           steps_per_execution=steps_per_execution,
                           jit_compile=jit_compile)


def _stage_updates(ladder: list, updates_per_stage: int, overrides, checkpoint_every: int
                   ) -> dict:
    """`{num_steps: updates}` for every stage of `ladder`: `updates_per_stage`, or the
    stage's entry in `distill.updates_overrides` (raises `PipelineError` on a bad one)."""
    if not isinstance(overrides, (dict, type(None))):
        raise PipelineError(f"distill.updates_overrides must be a dict {{num_steps: "
                            f"updates}}, got {overrides!r}.")
    overrides = {validation.positive_int("distill.updates_overrides key", k): v
                 for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - set(ladder))
    if unknown:
        raise PipelineError(f"distill.updates_overrides names step counts {unknown} that "
                            f"are not stages; the stages are {ladder}.")
    for n, u in overrides.items():
        validation.positive_int(f"distill.updates_overrides[{n}]", u)
    updates = {n: overrides.get(n, updates_per_stage) for n in ladder}
    for n, u in updates.items():
        if u % checkpoint_every:
            raise PipelineError(f"The stage to {n} steps has {u} updates, not a multiple "
                                f"of distill.checkpoint_every ({checkpoint_every}).")
    return updates


# The gin module stays the evaluation report's (where `evaluate` was registered before
# the schema moved here), so full selectors in saved operative configs keep working.
@gin.configurable("evaluate", module="keras_progdist.evaluation.report")
def evaluate(num_samples: int = 1000, num_reference: int = 5000,
             ddim_steps=(1, 2, 4, 8), teacher_steps=None, batch_size: int = 100,
             split: str = "train", seed: int = 2024, cache_dir: str | None = None,
             max_file_mb: float = DEFAULT_MAX_FILE_MB,
             bootstrap: int = 50, digit_scores: bool = True) -> EvaluateSettings:
    """Evaluation settings (`--mode=eval` and `--mode=sample`).

    Args:
        num_samples: generated images per model (FID needs >= 2048; fewer reports KID).
        num_reference: real images for the reference statistics (all when larger).
        ddim_steps: step counts of the undistilled teacher DDIM curve.
        teacher_steps: extra teacher step counts (its full count is always added).
        batch_size: sampling and feature batch size (the noise of sample `i` is drawn
            in the batch `i // batch_size`, so this is part of the protocol).
        split: the real split the statistics come from (the paper: training set).
        seed: first seed of the generated noise (all models see the same noise).
        cache_dir: root of the reference-statistics cache (default
            `evaluation.caches.default_cache_dir()`).
        max_file_mb: the largest sample file `--mode=sample` writes, in MiB.
        bootstrap: paired-bootstrap replicates behind every standard error and
            comparison (`evaluation.bootstrap`); 0 reports none. 50 replicates put
            the standard error itself within about ±10%.
        digit_scores: on the embedded digits (`dataset.name='mnist_embedded'`), also
            score every model's first samples with a small digit classifier
            (`evaluation.digits.score_probes`; trained in about 15 s when a score is
            missing). Ignored on other data.

    Returns:
        The checked settings (what `evaluation.report` and `evaluation.samples`
        take).
    """
    for name, value in (("num_samples", num_samples), ("num_reference", num_reference),
                        ("batch_size", batch_size)):
        validation.int_at_least(f"evaluate.{name}", value, 2)
    num_samples, num_reference, batch_size = int(num_samples), int(num_reference), \
        int(batch_size)
    steps = {}
    for name, value in (("ddim_steps", ddim_steps), ("teacher_steps", teacher_steps or ())):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"evaluate.{name} must be a tuple of step counts, got "
                                f"{value!r}.")
        steps[name] = tuple(validation.positive_int(f"evaluate.{name}[{i}]", s)
                            for i, s in enumerate(value))
    if not isinstance(split, str) or not split:
        raise PipelineError(f"evaluate.split must be a split name, got {split!r}.")
    seed = validation.nonnegative_int("evaluate.seed", seed)
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise PipelineError(f"evaluate.cache_dir must be a folder name or None, got "
                            f"{cache_dir!r}.")
    max_file_mb = validation.positive_float("evaluate.max_file_mb", max_file_mb)
    bootstrap = validation.nonnegative_int("evaluate.bootstrap", bootstrap)
    if bootstrap == 1:
        raise PipelineError("evaluate.bootstrap must be 0 (none) or at least 2 replicates.")
    digit_scores = validation.boolean("evaluate.digit_scores", digit_scores)
    return EvaluateSettings(num_samples=num_samples, num_reference=num_reference,
                            ddim_steps=steps["ddim_steps"],
                            teacher_steps=steps["teacher_steps"], batch_size=batch_size,
                            split=split, seed=seed, cache_dir=cache_dir,
                            max_file_mb=max_file_mb, bootstrap=bootstrap,
                            digit_scores=digit_scores)


def parse_gin(files, bindings=()) -> None:
    """Parses gin files and bindings, with `data`'s `dataset` registered too (for
    entry points that need the settings but build no `Experiment`)."""
    from keras_progdist import data  # noqa: F401  registers `dataset`

    gin.parse_config_files_and_bindings(list(files), list(bindings))


def dataset_settings() -> dict:
    """The `dataset.*` bindings in force, as a plain dict (only those set: the
    evaluation fills in `data.make_dataset`'s defaults and records these as given)."""
    return dict(gin.get_bindings("dataset"))


@gin.configurable
def guidance(enabled: bool = False, w_min: float = 0.0, w_max: float = 4.0,
             updates: int = 1000, learning_rate: float = 1e-4,
             weighting: str = "snr_trunc", embedding_scale: float = 250.0,
             sample_w: float = 2.0, checkpoint_every: int = 100,
             steps_per_execution: int = 10, jit_compile: bool = True) -> GuidanceSettings:
    """Guided distillation (Meng et al. 2023): stage one, then the ladder on its network.

    With `enabled`, the teacher must be classifier-free guided (`UNet.null_class`,
    `diffusion.label_dropout > 0`). Stage one (`guidance/`) trains a w-conditioned
    student to give the guided teacher's
    `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)` in one evaluation for
    `w ~ U[w_min, w_max]`; the distillation ladder then distills that network, each
    example with its own `w` (`distill.*` settings as usual).

    Args:
        enabled: run guided distillation instead of plain distillation.
        w_min, w_max: the range of guidance strengths trained (the paper: [0, 4]).
        updates: stage one's optimizer updates.
        learning_rate: stage one's Adam rate, decayed linearly to 0 over the stage.
        weighting: stage one's x-MSE weighting.
        embedding_scale: `UNet.guidance_embedding_scale` of the w-conditioned networks.
        sample_w: the guidance strength of the sample grids.
        checkpoint_every, steps_per_execution, jit_compile: as for the teacher.
    """
    validation.boolean("guidance.enabled", enabled)
    w_min = validation.finite_float("guidance.w_min", w_min)
    w_max = validation.finite_float("guidance.w_max", w_max)
    if not w_min <= w_max:
        raise PipelineError(f"guidance.w_min ({w_min}) must not be above guidance.w_max "
                            f"({w_max}).")
    _positive("guidance", updates=updates, checkpoint_every=checkpoint_every,
              steps_per_execution=steps_per_execution)
    validation.positive_float("guidance.learning_rate", learning_rate)
    losses.check_weighting(weighting)
    validation.positive_float("guidance.embedding_scale", embedding_scale)
    sample_w = validation.finite_float("guidance.sample_w", sample_w)
    validation.boolean("guidance.jit_compile", jit_compile)
    if updates % checkpoint_every:
        raise PipelineError(f"guidance.updates ({updates}) must be a multiple of "
                            f"guidance.checkpoint_every ({checkpoint_every}).")
    return GuidanceSettings(enabled=enabled, w_min=w_min, w_max=w_max, updates=updates,
                            learning_rate=learning_rate, weighting=weighting,
                            embedding_scale=float(embedding_scale), sample_w=sample_w,
                            checkpoint_every=checkpoint_every,
                            steps_per_execution=steps_per_execution,
                            jit_compile=jit_compile)


# The most samples one stage's grid may hold: the grid is drawn in one batch after the
# stage's training, so a typo (1e9) must fail before any training, not after it.
MAX_GRID_COUNT = 1024


@gin.configurable
def sample_grid(count: int = 16) -> SampleGridSettings:
    """The sample grid written for each finished stage (`samples/`, and TensorBoard).

    Args:
        count: samples in each grid, drawn from the same fixed noise for every stage so
            the grids compare stage by stage; at most `MAX_GRID_COUNT` (1024). 0 writes
            no grids: each grid compiles a sampler, a cost that only very short runs
            notice.

    Returns:
        The checked `SampleGridSettings`.
    """
    count = validation.nonnegative_int("sample_grid.count", count)
    if count > MAX_GRID_COUNT:
        raise validation.ConfigError(f"sample_grid.count must be at most "
                                     f"{MAX_GRID_COUNT}, got {count}.")
    return SampleGridSettings(count=count)


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
    """Every value a positive int; and `checkpoint_every`, when given with
    `steps_per_execution`, a multiple of it (raises `PipelineError`)."""
    for name, value in values.items():
        validation.positive_int(f"{scope}.{name}", value)
    every, chunk = values.get("checkpoint_every"), values.get("steps_per_execution")
    if every is not None and chunk is not None and every % chunk:
        # Keras runs whole chunks of `steps_per_execution` updates: an epoch (here a
        # checkpoint interval) shorter than or out of step with them overshoots, and
        # the stage would train more updates than configured and recorded.
        raise PipelineError(f"{scope}.checkpoint_every ({every}) must be a multiple of "
                            f"{scope}.steps_per_execution ({chunk}): Keras runs "
                            f"{chunk} updates at a time.")


def configurable_parameters() -> dict:
    """`{configurable: [parameter, ...]}`: every gin configurable of the schema (and
    `dataset`) with the parameters a binding may set."""
    from keras_progdist.data.api import make_dataset

    functions = {"dataset": make_dataset, "diffusion": diffusion, "teacher": teacher,
                 "distill": distill, "evaluate": evaluate, "guidance": guidance,
                 "sample_grid": sample_grid}
    names = {name: list(inspect.signature(fn).parameters) for name, fn in functions.items()}
    names["UNet"] = list(UNET_PARAMETERS)
    names["Schedule"] = [p for p in inspect.signature(Schedule.__init__).parameters
                         if p not in ("self", "kwargs")]
    return names


def binding_hint(message: str) -> str:
    """A `" Did you mean 'teacher.train_steps'?"` for gin's error about an unknown
    configurable or parameter (`message`), or `""` when nothing is close.

    Args:
        message: the text of the `ValueError` gin raised while parsing.
    """
    parameters = configurable_parameters()
    unknown_parameter = re.match(r"Configurable '([^']+)' doesn't (?:have a parameter "
                                 r"named|include kwarg) '([^']+)'", message)
    if unknown_parameter:
        configurable = re.split(r"[./]", unknown_parameter.group(1))[-1]
        close = difflib.get_close_matches(unknown_parameter.group(2),
                                          parameters.get(configurable, []), n=1)
        return f" Did you mean '{configurable}.{close[0]}'?" if close else ""
    unknown_configurable = re.match(r"No configurable matching '([^']+)'", message)
    if unknown_configurable:
        close = difflib.get_close_matches(
            re.split(r"[./]", unknown_configurable.group(1))[-1], list(parameters), n=1)
        return f" Did you mean '{close[0]}'?" if close else ""
    return ""

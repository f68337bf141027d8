"""The experiment's settings as typed, immutable values.

`training.config` makes each of these once from gin, after checking every value (type
and range, with the binding's name in the message); everything else takes them as
arguments and reads no gin. This module imports nothing of the library, so any layer
(training, evaluation, export) can use the types without reaching up into `training`.

A settings object is a frozen dataclass: `dataclasses.replace(settings, field=value)`
makes a changed copy, and `dataclasses.asdict(settings)` the plain dict that records
(`config.json`, an evaluation's protocol key) store.
"""

from __future__ import annotations

import dataclasses

# The largest sample file `--mode=sample` writes by default, in MiB.
DEFAULT_MAX_FILE_MB = 256.0

# How a distillation stage's learning rate moves over its updates.
LEARNING_RATE_SCHEDULES = ("linear", "constant")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The teacher's diffusion model: output parameterization, loss weighting, EMA.

    `label_dropout` is the probability that a training label becomes the null class
    (classifier-free guidance)."""

    parameterization: str = "v"
    weighting: str = "snr_trunc"
    ema_decay: float | None = 0.9999
    seed: int = 0
    label_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
    """How the teacher trains (the paper, CIFAR-10: lr 2e-4, 1000 warm-up, clip 1)."""

    train_steps: int = 1000
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    global_clipnorm: float | None = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    steps_per_execution: int = 10
    jit_compile: bool = True


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """The halving ladder: `ladder` holds the students' step counts
    (`teacher_steps / 2, ..., min_steps`), `updates` each stage's update count.

    `learning_rate_schedule`: `linear` decays `learning_rate` to 0 over each stage;
    `constant` keeps it (the official code's shape)."""

    teacher_steps: int = 1024
    min_steps: int = 1
    ladder: tuple = ()
    updates: dict = dataclasses.field(default_factory=dict)
    learning_rate: float = 5e-5
    learning_rate_schedule: str = "linear"
    weighting: str = "snr_trunc"
    checkpoint_every: int = 100
    student_dropout: float = 0.0
    steps_per_execution: int = 10
    jit_compile: bool = True


@dataclasses.dataclass(frozen=True)
class GuidanceSettings:
    """Guided distillation's stage one (the w-conditioned network) and its grids."""

    enabled: bool = False
    w_min: float = 0.0
    w_max: float = 4.0
    updates: int = 1000
    learning_rate: float = 1e-4
    weighting: str = "snr_trunc"
    embedding_scale: float = 250.0
    sample_w: float = 2.0
    checkpoint_every: int = 100
    steps_per_execution: int = 10
    jit_compile: bool = True


@dataclasses.dataclass(frozen=True)
class SampleGridSettings:
    """`count` samples in each finished stage's grid (0: no grids)."""

    count: int = 16


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """The evaluation protocol (`--mode=eval` and `--mode=sample`).

    The noise of generated sample `i` is drawn in batch `i // batch_size` from `seed`,
    so `batch_size` and `seed` are part of the protocol: every model sees the same
    noise. `bootstrap` replicates (0: none) give every score and comparison its
    standard error. `digit_scores`: score every model's samples with the digit
    classifier too, where the data are the embedded digits
    (`evaluation.digits.score_probes`)."""

    num_samples: int = 1000
    num_reference: int = 5000
    ddim_steps: tuple = (1, 2, 4, 8)
    teacher_steps: tuple = ()
    batch_size: int = 100
    split: str = "train"
    seed: int = 2024
    cache_dir: str | None = None
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    bootstrap: int = 50
    digit_scores: bool = True


def as_record(settings) -> dict:
    """The settings as the plain dict a JSON record stores."""
    return dataclasses.asdict(settings)

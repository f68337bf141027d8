"""Optimizers and learning-rate schedules for the teacher and the students."""

from __future__ import annotations

import keras
from keras import ops

from keras_progdist._keras_compat import learning_rate_variable


@keras.saving.register_keras_serializable(package="keras_progdist")
class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """`lr(step) = peak * min(1, step / warmup_steps)` (the teacher's schedule)."""

    def __init__(self, peak: float, warmup_steps: int = 0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        if self.warmup_steps <= 0:
            return ops.convert_to_tensor(self.peak, "float32")
        frac = ops.cast(step, "float32") / float(self.warmup_steps)
        return self.peak * ops.minimum(1.0, frac)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="keras_progdist")
class LinearToZero(keras.optimizers.schedules.LearningRateSchedule):
    """`lr(step) = initial * max(0, 1 - step / total_steps)` (each distillation stage)."""

    def __init__(self, initial: float, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.initial = float(initial)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        frac = ops.cast(step, "float32") / float(self.total_steps)
        return self.initial * ops.maximum(0.0, 1.0 - frac)

    def get_config(self):
        return {"initial": self.initial, "total_steps": self.total_steps}


def make_optimizer(learning_rate=2e-4, warmup_steps: int = 0, decay_to_zero_steps=None,
                   global_clipnorm: float | None = 1.0, weight_decay: float = 0.0,
                   beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8):
    """Adam (AdamW when `weight_decay > 0`) with global-norm clipping.

    Args:
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up length (teacher: 1000 in the paper's CIFAR run).
        decay_to_zero_steps: if set, the rate decays linearly from `learning_rate`
            to 0 over this many steps instead (distillation stages).
        global_clipnorm: clip the global gradient norm (1.0 in the paper).
        weight_decay: decoupled weight decay.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
    if decay_to_zero_steps:
        lr = LinearToZero(learning_rate, decay_to_zero_steps)
    else:
        lr = WarmupConstant(learning_rate, warmup_steps)
    kwargs = dict(learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                  global_clipnorm=global_clipnorm or None)
    if weight_decay:
        return keras.optimizers.AdamW(weight_decay=weight_decay, **kwargs)
    return keras.optimizers.Adam(**kwargs)


def reset_optimizer(optimizer) -> None:
    """Zeroes the optimizer's slots and step counter (a fresh start for a new stage).

    A float learning rate is itself one of `optimizer.variables`; it is kept.
    """
    learning_rate = learning_rate_variable(optimizer)
    for variable in optimizer.variables:
        if variable is not learning_rate:
            variable.assign(ops.zeros(variable.shape, variable.dtype))

"""Noise schedules in logSNR form.

Time `t` runs over [0, 1]; `logsnr(t)` decreases from `logsnr_max` (almost clean data)
at `t = 0` to `logsnr_min` (almost pure noise) at `t = 1`. The latent is
`z_t = alpha_t x + sigma_t eps` with the variance-preserving identities
`alpha^2 = sigmoid(logsnr)` and `sigma^2 = sigmoid(-logsnr)`.

Everything here is a pure function of tensors written with `keras.ops`, so the
teacher step, the distillation step, the samplers and the export share it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

SCHEDULES = ("cosine", "linear")


def _check_range(logsnr_min: float, logsnr_max: float) -> None:
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"logsnr_min must be below logsnr_max, got logsnr_min={logsnr_min}, "
            f"logsnr_max={logsnr_max}."
        )


@keras.saving.register_keras_serializable(package="keras_progdist")
class Schedule:
    """A logSNR schedule `t -> logsnr(t)` with its inverse.

    `cosine` (Nichol & Dhariwal; the paper's choice):
    `logsnr(t) = -2 log tan(a t + b)`, `b = arctan(exp(-logsnr_max / 2))`,
    `a = arctan(exp(-logsnr_min / 2)) - b`.
    `linear`: `logsnr(t) = logsnr_max + t (logsnr_min - logsnr_max)`.

    Args:
        name: one of `SCHEDULES`.
        logsnr_min: logSNR at `t = 1`.
        logsnr_max: logSNR at `t = 0`.

    Example:
        >>> s = Schedule("cosine")
        >>> float(s.logsnr(keras.ops.convert_to_tensor(0.0)))  # doctest: +SKIP
        20.0
    """

    def __init__(self, name: str = "cosine", logsnr_min: float = -20.0,
                 logsnr_max: float = 20.0):
        if name not in SCHEDULES:
            raise ValueError(
                f"Unknown schedule {name!r}; allowed schedules: {', '.join(SCHEDULES)}."
            )
        _check_range(logsnr_min, logsnr_max)
        self.name = name
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self._b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self._a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b
        # Complementary angle: tan(a t + b) = 1 / tan(c + a (1 - t)).
        self._c = math.atan(math.exp(0.5 * self.logsnr_min))

    def logsnr(self, t):
        """logSNR at time `t`.

        cosine: `-2 log tan(a t + b)` (for `t >= 0.5` as `2 log tan(c + a (1 - t))`,
        `c = arctan(exp(logsnr_min / 2))`, the same value); linear:
        `logsnr_max + t (logsnr_min - logsnr_max)`.

        Args:
            t: times in [0, 1], any shape.

        Returns:
            float32 logSNR, the shape of `t`.
        """
        t = ops.cast(t, "float32")
        if self.name == "cosine":
            # Near t = 1 the angle a t + b is within 5e-5 of pi/2 and float32 rounding
            # of it moves log tan by 1e-3; the complementary angle keeps it small.
            near_zero = -2.0 * ops.log(ops.tan(self._a * t + self._b))
            near_one = 2.0 * ops.log(ops.tan(self._c + self._a * (1.0 - t)))
            return ops.where(t < 0.5, near_zero, near_one)
        return self.logsnr_max + t * (self.logsnr_min - self.logsnr_max)

    def t(self, logsnr):
        """The inverse map, `t` from `logsnr`: `t = (arctan(exp(-logsnr / 2)) - b) / a`."""
        logsnr = ops.cast(logsnr, "float32")
        if self.name == "cosine":
            return (ops.arctan(ops.exp(-0.5 * logsnr)) - self._b) / self._a
        return (logsnr - self.logsnr_max) / (self.logsnr_min - self.logsnr_max)

    def alpha_sigma(self, t):
        """`(alpha_t, sigma_t)` at time `t`."""
        return alpha_sigma(self.logsnr(t))

    def get_config(self) -> dict:
        return {"name": self.name, "logsnr_min": self.logsnr_min,
                "logsnr_max": self.logsnr_max}

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        return cls(**config)

    def __repr__(self) -> str:
        return (f"Schedule({self.name!r}, logsnr_min={self.logsnr_min}, "
                f"logsnr_max={self.logsnr_max})")


def alpha_sigma(logsnr):
    """`alpha = sqrt(sigmoid(logsnr))`, `sigma = sqrt(sigmoid(-logsnr))`.

    Sigmoid identities keep both finite and accurate at |logsnr| = 20.

    Args:
        logsnr: tensor of logSNR values.

    Returns:
        `(alpha, sigma)`, tensors of the same shape.
    """
    logsnr = ops.cast(logsnr, "float32")
    return ops.sqrt(ops.sigmoid(logsnr)), ops.sqrt(ops.sigmoid(-logsnr))


def log_sigma_ratio(logsnr_s, logsnr_t):
    """`log(sigma_s / sigma_t)` computed in log space.

    `log sigma^2 = log sigmoid(-logsnr) = -softplus(logsnr)`, so
    `log(sigma_s / sigma_t) = (softplus(logsnr_t) - softplus(logsnr_s)) / 2`,
    finite even where `sigma_s` underflows in float32.

    Args:
        logsnr_s, logsnr_t: logSNR at times `s` and `t`, broadcastable.

    Returns:
        float32 `log(sigma_s / sigma_t)`.
    """
    return 0.5 * (ops.softplus(ops.cast(logsnr_t, "float32"))
                  - ops.softplus(ops.cast(logsnr_s, "float32")))


def get_schedule(schedule) -> Schedule:
    """Accepts a `Schedule`, a name, or a config dict."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return Schedule(schedule)
    if isinstance(schedule, dict):
        return Schedule.from_config(schedule)
    raise TypeError(f"Expected a Schedule, a name or a config dict, got {schedule!r}.")

"""Samplers over any denoiser `f(z, t) -> x_hat` (or `-> (x_hat, eps_hat)`).

The step loop is a `keras.ops.fori_loop`, so it compiles (XLA), runs with a step count
given as a tensor, and exports inside a SavedModel. Time runs on the uniform grid
`t_i = i / N`, from `t = 1` down to `t = 0`; the last step returns `x_hat`.

Teacher, student, a loaded `.keras` model and the exported SavedModel all sample
through these functions.
"""

from __future__ import annotations

from typing import Callable

import keras
from keras import ops

from keras_progdist import parameterizations
from keras_progdist.parameterizations import expand_to
from keras_progdist.random_utils import TensorSeed, fold_in
from keras_progdist.schedules import Schedule, alpha_sigma

VARIANCES = ("fixed_small", "fixed_large", "interpolated")


def _per_example(value, z):
    """`value` (a scalar) repeated for each of `z`'s `B` examples: shape `[B]`."""
    return ops.ones((ops.shape(z)[0],), "float32") * ops.cast(value, "float32")


def _denoise(denoise_fn, z, t, logsnr, clip):
    """`(x_hat, eps_hat)` from a denoiser at `(z, t)`.

    `eps_hat = (z - alpha x_hat) / sigma` when the denoiser returns `x_hat` only. With
    `clip`, `parameterizations.clip_x_hat` clips `x_hat` to [-1, 1] and recomputes
    `eps_hat` from it (the same rule as `predict(clip_x=True)`).

    Args:
        denoise_fn: `f(z, t) -> x_hat` or `(x_hat, eps_hat)`.
        z: `[B, H, W, C]`; t: `[B]`; logsnr: `[B]`, the schedule's logSNR at `t`.
        clip: clip `x_hat` to [-1, 1].

    Returns:
        `(x_hat, eps_hat)`, float32.
    """
    out = denoise_fn(z, t)
    if isinstance(out, (tuple, list)):
        x_hat, eps_hat = out[0], out[1]
    else:
        x_hat, eps_hat = out, None
    x_hat = ops.cast(x_hat, "float32")
    if clip:
        x_hat, eps_hat = parameterizations.clip_x_hat(x_hat, z, logsnr)
    elif eps_hat is None:
        eps_hat = parameterizations.eps_from_x(x_hat, z, logsnr)
    return x_hat, ops.cast(eps_hat, "float32")


def ddim_step(z_t, x_hat, eps_hat, logsnr_s, s):
    """One DDIM update `z_s = alpha_s x_hat + sigma_s eps_hat`; `x_hat` when `s = 0`.

    Args:
        z_t: the current latent `[B, H, W, C]` (gives the shape only).
        x_hat, eps_hat: the denoiser's predictions at `(z_t, t)`, same shape.
        logsnr_s: `[B]` logSNR at the target time `s`.
        s: `[B]` target time; where `s = 0` the step returns `x_hat` itself.

    Returns:
        `z_s`, `[B, H, W, C]`.
    """
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    z_s = expand_to(alpha_s, z_t) * x_hat + expand_to(sigma_s, z_t) * eps_hat
    return ops.where(expand_to(s, z_t) > 0.0, z_s, x_hat)


def ddim_sample(denoise_fn: Callable, noise, num_steps, schedule: Schedule,
                clip: bool = False):
    """Deterministic DDIM (eta = 0) from `noise = z_1` in `num_steps` uniform steps.

    For `i = 0 .. N-1`, `t = (N - i) / N`, `s = (N - i - 1) / N`:
    `z_s = alpha_s x_hat(z_t) + sigma_s eps_hat(z_t)`, and the last step (`s = 0`)
    returns `x_hat`.

    Args:
        denoise_fn: `f(z, t) -> x_hat` or `(x_hat, eps_hat)`, `t` of shape `[B]`.
        noise: `z_1`, `[B, H, W, C]`.
        num_steps: int or int scalar tensor, >= 1.
        schedule: the `Schedule` the denoiser was trained with.
        clip: clip `x_hat` to [-1, 1] at each step.

    Returns:
        Samples `[B, H, W, C]` (float32).
    """
    z = ops.cast(noise, "float32")
    n = ops.cast(num_steps, "float32")

    def body(i, z_t):
        i = ops.cast(i, "float32")
        t = _per_example((n - i) / n, z_t)
        s = _per_example((n - i - 1.0) / n, z_t)
        x_hat, eps_hat = _denoise(denoise_fn, z_t, t, schedule.logsnr(t), clip)
        return ddim_step(z_t, x_hat, eps_hat, schedule.logsnr(s), s)

    return ops.fori_loop(0, num_steps, body, z)


def ancestral_sample(denoise_fn: Callable, noise, num_steps, schedule: Schedule,
                     seed, variance: str = "fixed_small", gamma: float = 0.3,
                     clip: bool = True):
    """Ancestral (stochastic) sampling, `p(z_s | z_t) = q(z_s | z_t, x = x_hat)`.

    `r = exp(logsnr_t - logsnr_s)`, mean `= r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x_hat`,
    variance `(1 - r) sigma_s^2` (`fixed_small`), `(1 - r) sigma_t^2` (`fixed_large`), or
    `exp(gamma log small + (1 - gamma) log large)` (`interpolated`).

    Args:
        denoise_fn, noise, num_steps, schedule, clip: as in `ddim_sample`.
        seed: int or `[2]` int tensor; the same seed gives the same samples.
        variance: one of `VARIANCES`.
        gamma: interpolation weight for `interpolated`.

    Returns:
        Samples `[B, H, W, C]` (float32); the last step (`s = 0`) returns `x_hat`.
    """
    if variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}.")
    base_seed = ops.convert_to_tensor([seed, 0] if isinstance(seed, int) else seed)
    z = ops.cast(noise, "float32")
    n = ops.cast(num_steps, "float32")

    def body(i, z_t):
        t = _per_example((n - ops.cast(i, "float32")) / n, z_t)
        s = _per_example((n - ops.cast(i, "float32") - 1.0) / n, z_t)
        logsnr_t, logsnr_s = schedule.logsnr(t), schedule.logsnr(s)
        x_hat, _ = _denoise(denoise_fn, z_t, t, logsnr_t, clip)
        alpha_t, sigma_t = alpha_sigma(logsnr_t)
        alpha_s, sigma_s = alpha_sigma(logsnr_s)
        r = ops.exp(logsnr_t - logsnr_s)
        mean = (expand_to(r * alpha_s / alpha_t, z_t) * z_t
                + expand_to((1.0 - r) * alpha_s, z_t) * x_hat)
        log_small = ops.log1p(-r) + 2.0 * ops.log(sigma_s)
        log_large = ops.log1p(-r) + 2.0 * ops.log(sigma_t)
        if variance == "fixed_small":
            log_var = log_small
        elif variance == "fixed_large":
            log_var = log_large
        else:
            log_var = gamma * log_small + (1.0 - gamma) * log_large
        eps = keras.random.normal(ops.shape(z_t), seed=TensorSeed(fold_in(base_seed, i)))
        z_s = mean + expand_to(ops.exp(0.5 * log_var), z_t) * eps
        return ops.where(expand_to(s, z_t) > 0.0, z_s, x_hat)

    return ops.fori_loop(0, num_steps, body, z)


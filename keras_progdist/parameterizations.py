"""Parameterizations: the network's raw output -> `(x_hat, eps_hat, v_hat)`.

Given `z = alpha x + sigma eps` and `v = alpha eps - sigma x`
(so `x = alpha z - sigma v` and `eps = sigma z + alpha v`):

- `eps`:  `x_hat = (z - sigma eps_out) / alpha` (unstable as `alpha -> 0`; the paper's point).
- `x`:    `x_hat = x_out`.
- `v`:    `x_hat = alpha z - sigma v_out`.
- `both`: two output groups `(x_out, eps_out)` mixed by the noise level,
          `x_hat = sigma^2 x_out + alpha (z - sigma eps_out)`.

In every case `eps_hat = (z - alpha x_hat) / sigma` except for `eps`, where the
network's `eps_out` is used directly (division by `sigma` is what `eps` avoids).

Classifier-free guidance (`guide`) combines a conditional and an unconditional
prediction in x-space, `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`; `w = 0` is
the conditional model.
"""

from __future__ import annotations

from keras import ops

from keras_progdist.schedules import alpha_sigma

PARAMETERIZATIONS = ("eps", "x", "v", "both")


def check_parameterization(name: str) -> str:
    """Returns `name` if it is one of `PARAMETERIZATIONS`, else raises a `ValueError`."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"Unknown parameterization {name!r}; allowed: {', '.join(PARAMETERIZATIONS)}."
        )
    return name


def output_channels(name: str, image_channels: int) -> int:
    """Channels the network must produce: `2 * image_channels` for `both`, else
    `image_channels`."""
    check_parameterization(name)
    return 2 * image_channels if name == "both" else image_channels


def expand_to(v, like):
    """Reshape a per-example vector `[B]` to broadcast against `like` `[B, H, W, C]`.

    Returns:
        `v` as `[B, 1, 1, 1]` (one trailing 1 per axis of `like` after the first), in
        `like`'s dtype.
    """
    return ops.reshape(ops.cast(v, like.dtype), (-1,) + (1,) * (len(like.shape) - 1))


def eps_from_x(x_hat, z, logsnr):
    """The noise that `x_hat` implies for `z`: `eps_hat = (z - alpha x_hat) / sigma`.

    Args:
        x_hat: predicted clean images, `[B, H, W, C]`.
        z: the noisy input `z_t`, same shape.
        logsnr: `[B]` logSNR of `z`.

    Returns:
        `eps_hat`, float32, shape of `z`.
    """
    z = ops.cast(z, "float32")
    alpha, sigma = alpha_sigma(logsnr)
    return (z - expand_to(alpha, z) * ops.cast(x_hat, "float32")) / expand_to(sigma, z)


def clip_x_hat(x_hat, z, logsnr):
    """Clips `x_hat` to [-1, 1] and recomputes `eps_hat` from the clipped value.

    `x_c = clip(x_hat, -1, 1)`, `eps_hat = (z - alpha x_c) / sigma`, so that
    `z = alpha x_c + sigma eps_hat` still holds and a DDIM step
    `z_s = alpha_s x_c + sigma_s eps_hat` stays consistent. This is the one clipping
    rule of the package: `predict(clip_x=True)`, `DiffusionModel.denoise(clip=True)`
    and the samplers all go through it.

    Args:
        x_hat: predicted clean images, `[B, H, W, C]`.
        z: the noisy input `z_t`, same shape.
        logsnr: `[B]` logSNR of `z`.

    Returns:
        `(x_c, eps_hat)`, both float32.
    """
    x_clipped = ops.clip(ops.cast(x_hat, "float32"), -1.0, 1.0)
    return x_clipped, eps_from_x(x_clipped, z, logsnr)


def guide(x_hat_cond, eps_hat_cond, x_hat_null, eps_hat_null, z, logsnr, w,
          parameterization: str, clip_x: bool = False):
    """Classifier-free guidance in x-space: `x_hat_w = (1 + w) x_hat_c - w x_hat_null`.

    In this convention `w = 0` is the plain conditional model and `w > 0` pushes away
    from the unconditional one (Meng et al. 2023, eq. 2; Ho & Salimans' `w`).
    `eps_hat` then follows from `x_hat_w` and `z` as in `predict`:
    `eps_hat = (z - alpha x_hat_w) / sigma`, except for `eps`, whose noise prediction is
    the network's own, here `(1 + w) eps_hat_c - w eps_hat_null` (the same value in
    exact arithmetic, since the weights `1 + w` and `-w` sum to 1, without dividing by
    `sigma`).

    Args:
        x_hat_cond, eps_hat_cond: predictions given the label, `[B, H, W, C]`.
        x_hat_null, eps_hat_null: predictions given the null label, same shape.
        z: the noisy input `z_t`, same shape.
        logsnr: `[B]` logSNR of `z`.
        w: guidance strength, a scalar or `[B]` (one per example).
        parameterization: one of `PARAMETERIZATIONS` (the network's).
        clip_x: clip `x_hat_w` to [-1, 1] and recompute `eps_hat` from it (`clip_x_hat`).

    Returns:
        `(x_hat_w, eps_hat_w)`, float32 `[B, H, W, C]`.
    """
    check_parameterization(parameterization)
    z = ops.cast(z, "float32")
    w = expand_to(ops.ones((ops.shape(z)[0],), "float32") * ops.cast(w, "float32"), z)
    x_hat = (1.0 + w) * ops.cast(x_hat_cond, "float32") - w * ops.cast(x_hat_null,
                                                                       "float32")
    if clip_x:
        return clip_x_hat(x_hat, z, logsnr)
    if parameterization == "eps":
        eps_hat = (1.0 + w) * ops.cast(eps_hat_cond, "float32") - \
            w * ops.cast(eps_hat_null, "float32")
    else:
        eps_hat = eps_from_x(x_hat, z, logsnr)
    return x_hat, eps_hat


def predict(output, z, logsnr, parameterization: str, clip_x: bool = False):
    """Turns a network output into predictions of `x`, `eps` and `v`.

    Args:
        output: raw network output, `[B, H, W, C]` (`[B, H, W, 2C]` for `both`).
        z: the noisy input `z_t`, `[B, H, W, C]`.
        logsnr: `[B]` logSNR of `z`.
        parameterization: one of `PARAMETERIZATIONS`.
        clip_x: clip `x_hat` to [-1, 1] (sampling only; `eps_hat` is recomputed
            from the clipped `x_hat` so the DDIM update stays consistent; see
            `clip_x_hat`).

    Returns:
        `(x_hat, eps_hat, v_hat)`, with `v_hat = alpha eps_hat - sigma x_hat`.
    """
    check_parameterization(parameterization)
    output = ops.cast(output, "float32")
    z = ops.cast(z, "float32")
    alpha, sigma = alpha_sigma(logsnr)
    alpha, sigma = expand_to(alpha, z), expand_to(sigma, z)
    eps_hat = None
    if parameterization == "x":
        x_hat = output
    elif parameterization == "eps":
        eps_hat = output
        x_hat = (z - sigma * eps_hat) / alpha
    elif parameterization == "v":
        x_hat = alpha * z - sigma * output
    else:
        x_out, eps_out = ops.split(output, 2, axis=-1)
        x_hat = sigma**2 * x_out + alpha * (z - sigma * eps_out)
    if clip_x:
        x_hat, eps_hat = clip_x_hat(x_hat, z, logsnr)
    elif eps_hat is None:
        eps_hat = eps_from_x(x_hat, z, logsnr)
    v_hat = alpha * eps_hat - sigma * x_hat
    return x_hat, eps_hat, v_hat


def target(x, eps, logsnr, parameterization: str):
    """The network output that makes `predict` return exactly `(x, eps)`.

    `eps`: `eps`; `x`: `x`; `v`: `alpha eps - sigma x`. For `both` this is `(x, eps)`
    concatenated on channels:
    `sigma^2 x + alpha (alpha x + sigma eps - sigma eps) = (sigma^2 + alpha^2) x = x`.

    Args:
        x: clean images `[B, H, W, C]`; eps: the noise, same shape.
        logsnr: `[B]` logSNR of `z = alpha x + sigma eps`.
        parameterization: one of `PARAMETERIZATIONS`.

    Returns:
        The training target, `[B, H, W, C]` (`[B, H, W, 2C]` for `both`).
    """
    check_parameterization(parameterization)
    alpha, sigma = alpha_sigma(logsnr)
    alpha, sigma = expand_to(alpha, x), expand_to(sigma, x)
    if parameterization == "x":
        return x
    if parameterization == "eps":
        return eps
    if parameterization == "v":
        return alpha * eps - sigma * x
    return ops.concatenate([x, eps], axis=-1)

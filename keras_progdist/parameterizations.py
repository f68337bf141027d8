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
"""

from __future__ import annotations

from keras import ops

from keras_progdist.schedules import alpha_sigma

PARAMETERIZATIONS = ("eps", "x", "v", "both")


def check_parameterization(name: str) -> str:
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"Unknown parameterization {name!r}; allowed: {', '.join(PARAMETERIZATIONS)}."
        )
    return name


def output_channels(name: str, image_channels: int) -> int:
    """Channels the network must produce: doubled for `both`."""
    check_parameterization(name)
    return 2 * image_channels if name == "both" else image_channels


def expand_to(v, like):
    """Reshape a per-example vector `[B]` to broadcast against `like` `[B, H, W, C]`."""
    return ops.reshape(ops.cast(v, like.dtype), (-1,) + (1,) * (len(like.shape) - 1))


def predict(output, z, logsnr, parameterization: str, clip_x: bool = False):
    """Turns a network output into predictions of `x`, `eps` and `v`.

    Args:
        output: raw network output, `[B, H, W, C]` (`[B, H, W, 2C]` for `both`).
        z: the noisy input `z_t`, `[B, H, W, C]`.
        logsnr: `[B]` logSNR of `z`.
        parameterization: one of `PARAMETERIZATIONS`.
        clip_x: clip `x_hat` to [-1, 1] (sampling only; `eps_hat` is recomputed
            from the clipped `x_hat` so the DDIM update stays consistent).

    Returns:
        `(x_hat, eps_hat, v_hat)`.
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
        x_hat = ops.clip(x_hat, -1.0, 1.0)
        eps_hat = None
    if eps_hat is None:
        eps_hat = (z - alpha * x_hat) / sigma
    v_hat = alpha * eps_hat - sigma * x_hat
    return x_hat, eps_hat, v_hat


def target(x, eps, logsnr, parameterization: str):
    """The network output that makes `predict` return exactly `(x, eps)`.

    For `both` this is `(x, eps)` concatenated on channels:
    `sigma^2 x + alpha (alpha x + sigma eps - sigma eps) = (sigma^2 + alpha^2) x = x`.
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

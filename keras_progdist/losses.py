"""Loss weightings on the per-example x-space MSE `|x - x_hat|^2`.

With `SNR = exp(logsnr) = alpha^2 / sigma^2` and `eps - eps_hat = (alpha / sigma)(x_hat - x)`:

- `snr`:          weight `SNR`          -> eps-space MSE.
- `snr_trunc`:    weight `max(SNR, 1)`  -> `max(x-MSE, eps-MSE)` (the paper's choice).
- `snr_plus_one`: weight `SNR + 1`      -> v-space MSE (`v - v_hat = (x_hat - x) / sigma`).
- `constant`:     weight `1`            -> x-space MSE.
"""

from __future__ import annotations

from keras import ops

WEIGHTINGS = ("snr", "snr_trunc", "snr_plus_one", "constant")


def check_weighting(name: str) -> str:
    """Returns `name` if it is one of `WEIGHTINGS`, else raises a `ValueError` naming it."""
    if name not in WEIGHTINGS:
        raise ValueError(
            f"Unknown loss weighting {name!r}; allowed: {', '.join(WEIGHTINGS)}."
        )
    return name


def weight(logsnr, weighting: str):
    """Per-example weight `w(logsnr)` of the x-space MSE, as listed in the module docstring.

    `snr`: `exp(logsnr)`; `snr_trunc`: `exp(max(logsnr, 0)) = max(SNR, 1)`;
    `snr_plus_one`: `exp(logsnr) + 1`; `constant`: 1.

    Args:
        logsnr: `[B]` logSNR of each example.
        weighting: one of `WEIGHTINGS`.

    Returns:
        `[B]` float32 weights.
    """
    check_weighting(weighting)
    logsnr = ops.cast(logsnr, "float32")
    if weighting == "snr":
        return ops.exp(logsnr)
    if weighting == "snr_trunc":
        return ops.exp(ops.maximum(logsnr, 0.0))
    if weighting == "snr_plus_one":
        return ops.exp(logsnr) + 1.0
    return ops.ones_like(logsnr)


def weighted_x_mse(x, x_hat, logsnr, weighting: str):
    """Per-example loss `w(logsnr) * mean_pixels (x - x_hat)^2`, shape `[B]`.

    Args:
        x: target images `[B, H, W, C]`.
        x_hat: predictions, same shape.
        logsnr: `[B]`.
        weighting: one of `WEIGHTINGS`.

    Returns:
        `[B]` float32 losses.
    """
    x = ops.cast(x, "float32")
    x_hat = ops.cast(x_hat, "float32")
    mse = ops.mean(ops.square(x - x_hat), axis=tuple(range(1, len(x.shape))))
    return weight(logsnr, weighting) * mse

"""Each loss weighting on x-space MSE equals the MSE in the space it is named after
(`eps - eps_hat = (alpha / sigma)(x_hat - x)`, `v - v_hat = (x_hat - x) / sigma`):
snr -> eps, snr_trunc -> max(x, eps), snr_plus_one -> v, constant -> x."""

import numpy as np
import pytest
from keras import ops

from keras_progdist import losses
from keras_progdist import parameterizations as P

B, H, W, C = 32, 5, 5, 2


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
    eps = rng.standard_normal((B, H, W, C)).astype(np.float32)
    # Both sides of logsnr = 0 so that snr_trunc exercises both branches; |logsnr| <= 8
    # keeps the eps-from-x conversion (a division by sigma) accurate in float32.
    logsnr = np.linspace(-8.0, 8.0, B).astype(np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr.astype(np.float64))))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(logsnr.astype(np.float64))))[:, None, None, None]
    z = (alpha * x + sigma * eps).astype(np.float32)
    x_hat = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    # The eps and v predictions implied by x_hat at this z (what `predict` computes).
    eps_hat = (z - alpha * x_hat) / sigma
    v = alpha * eps - sigma * x
    v_hat = alpha * eps_hat - sigma * x_hat
    mse = lambda a, b: np.mean((np.asarray(a, np.float64) - b) ** 2, axis=(1, 2, 3))
    return dict(x=x, x_hat=x_hat, logsnr=logsnr, z=z,
                x_mse=mse(x, x_hat), eps_mse=mse(eps, eps_hat), v_mse=mse(v, v_hat))


def _loss(batch, weighting):
    return _np(losses.weighted_x_mse(batch["x"], batch["x_hat"], batch["logsnr"], weighting))


def test_snr_weighting_is_eps_mse(batch):
    np.testing.assert_allclose(_loss(batch, "snr"), batch["eps_mse"], rtol=1e-4)


def test_snr_trunc_weighting_is_max_of_x_and_eps_mse(batch):
    expected = np.maximum(batch["x_mse"], batch["eps_mse"])
    np.testing.assert_allclose(_loss(batch, "snr_trunc"), expected, rtol=1e-4)
    # Both branches occur: x-MSE wins at low SNR, eps-MSE at high SNR.
    assert (batch["x_mse"] > batch["eps_mse"]).any() and (batch["x_mse"] < batch["eps_mse"]).any()


def test_snr_plus_one_weighting_is_v_mse(batch):
    np.testing.assert_allclose(_loss(batch, "snr_plus_one"), batch["v_mse"], rtol=1e-4)


def test_constant_weighting_is_x_mse(batch):
    np.testing.assert_allclose(_loss(batch, "constant"), batch["x_mse"], rtol=1e-4)


def test_weightings_agree_with_library_predict_eps_and_v(batch):
    # Same identities with eps_hat, v_hat from `predict` (not hand-derived above).
    rng = np.random.default_rng(1)
    eps = rng.standard_normal(batch["x"].shape).astype(np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(-batch["logsnr"])))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(batch["logsnr"])))[:, None, None, None]
    z = (alpha * batch["x"] + sigma * eps).astype(np.float32)
    x_hat, eps_hat, v_hat = (_np(a) for a in P.predict(batch["x_hat"], z, batch["logsnr"], "x"))
    v = alpha * eps - sigma * batch["x"]
    eps_mse = np.mean((eps - eps_hat) ** 2, axis=(1, 2, 3))
    v_mse = np.mean((v - v_hat) ** 2, axis=(1, 2, 3))
    loss = lambda w: _np(losses.weighted_x_mse(batch["x"], x_hat, batch["logsnr"], w))
    assert loss("snr").shape == (B,)
    np.testing.assert_allclose(loss("snr"), eps_mse, rtol=1e-4)
    np.testing.assert_allclose(loss("snr_plus_one"), v_mse, rtol=1e-4)


def test_weights_are_finite_and_ordered_at_extremes():
    logsnr = ops.convert_to_tensor([-20.0, 0.0, 20.0])
    w = {n: _np(losses.weight(logsnr, n)) for n in losses.WEIGHTINGS}
    np.testing.assert_allclose(w["snr_trunc"], [1.0, 1.0, np.exp(20.0)], rtol=1e-5)
    np.testing.assert_allclose(w["snr_plus_one"], [1.0, 2.0, np.exp(20.0) + 1], rtol=1e-5)
    np.testing.assert_allclose(w["constant"], [1.0, 1.0, 1.0])
    assert all(np.all(np.isfinite(v)) for v in w.values())


def test_unknown_weighting_error_names_value_and_allowed():
    with pytest.raises(ValueError) as info:
        losses.weighted_x_mse(np.zeros((1, 2, 2, 1), np.float32),
                              np.zeros((1, 2, 2, 1), np.float32),
                              np.zeros((1,), np.float32), "lambda")
    msg = str(info.value)
    assert "'lambda'" in msg and all(n in msg for n in losses.WEIGHTINGS)

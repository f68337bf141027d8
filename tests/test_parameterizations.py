"""Parameterization identities, with `z = alpha x + sigma eps` and
`v = alpha eps - sigma x`: `target` is the exact inverse of `predict`,
`v_hat = alpha eps_hat - sigma x_hat`, clipping touches `x_hat` only."""

import numpy as np
import pytest
from keras import ops

from keras_progdist import parameterizations as P

# eps -> x recovery divides by alpha and x -> eps recovery divides by sigma, so float32
# round-off in z = alpha x + sigma eps (~6e-8 |z|) is amplified by 1/alpha or 1/sigma:
# at |logsnr| = 8 that is exp(4) ~ 55 -> ~3e-6 absolute, inside 1e-5. Beyond ~|12| it
# is not (the paper's point about eps at alpha -> 0), so the identity is tested on
# [-8, 8] for every parameterization and at the extremes only where no division occurs.
LOGSNR_RANGE = (-8.0, 8.0)
B, H, W, C = 16, 4, 4, 3


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def _data(seed=0, logsnr_range=LOGSNR_RANGE):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
    eps = rng.standard_normal((B, H, W, C)).astype(np.float32)
    logsnr = np.linspace(*logsnr_range, B).astype(np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None].astype(np.float32)
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None].astype(np.float32)
    z = alpha * x + sigma * eps
    return x, eps, logsnr, z, alpha, sigma


@pytest.mark.parametrize("name", ["eps", "x", "v", "both"])
def test_target_fed_to_predict_recovers_x_and_eps(name):
    x, eps, logsnr, z, _, _ = _data()
    out = P.target(x, eps, logsnr, name)
    assert tuple(out.shape) == (B, H, W, P.output_channels(name, C))
    x_hat, eps_hat, _ = P.predict(out, z, logsnr, name)
    np.testing.assert_allclose(_np(x_hat), x, atol=1e-5)
    np.testing.assert_allclose(_np(eps_hat), eps, atol=1e-5)


@pytest.mark.parametrize("name", ["x", "v", "both"])
def test_x_recovery_is_stable_at_logsnr_extremes_without_eps(name):
    # No division by alpha: x_hat stays accurate down to logsnr = -20 (alpha ~ 5e-5).
    x, eps, logsnr, z, _, _ = _data(1, (-20.0, 20.0))
    x_hat, _, _ = P.predict(P.target(x, eps, logsnr, name), z, logsnr, name)
    np.testing.assert_allclose(_np(x_hat), x, atol=1e-5)


def test_eps_parameterization_amplifies_error_as_alpha_goes_to_zero():
    # The paper's motivation: a 1e-3 error in eps_out becomes a sigma/alpha * 1e-3
    # error in x_hat, i.e. ~2e1 at logsnr = -20.
    x, eps, _, _, _, _ = _data()
    logsnr = np.full((B,), -20.0, np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(20.0)))
    z = alpha * x + np.sqrt(1 - alpha**2) * eps
    x_hat, _, _ = P.predict(eps + 1e-3, z.astype(np.float32), logsnr, "eps")
    err = np.abs(_np(x_hat) - x).mean()
    assert 10.0 < err < 40.0, err


@pytest.mark.parametrize("name", ["eps", "x", "v", "both"])
def test_v_hat_equals_alpha_eps_minus_sigma_x(name):
    x, eps, logsnr, z, alpha, sigma = _data(2)
    rng = np.random.default_rng(3)
    out = rng.standard_normal((B, H, W, P.output_channels(name, C))).astype(np.float32)
    x_hat, eps_hat, v_hat = (_np(a) for a in P.predict(out, z, logsnr, name))
    np.testing.assert_allclose(v_hat, alpha * eps_hat - sigma * x_hat, atol=1e-5)
    # And predict is consistent with z: z = alpha x_hat + sigma eps_hat.
    np.testing.assert_allclose(alpha * x_hat + sigma * eps_hat, z, atol=1e-4)
    # With the true target, v_hat is the true v.
    _, _, v_true = P.predict(P.target(x, eps, logsnr, name), z, logsnr, name)
    np.testing.assert_allclose(_np(v_true), alpha * eps - sigma * x, atol=1e-5)


def test_v_target_is_alpha_eps_minus_sigma_x():
    x, eps, logsnr, _, alpha, sigma = _data(4)
    np.testing.assert_allclose(_np(P.target(x, eps, logsnr, "v")), alpha * eps - sigma * x,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["eps", "x", "v", "both"])
def test_clip_x_clips_x_hat_only(name):
    x, eps, logsnr, z, alpha, sigma = _data(5)
    out = 3.0 * P.target(x, eps, logsnr, name) if name in ("x",) else None
    if out is None:
        rng = np.random.default_rng(6)
        out = 4.0 * rng.standard_normal((B, H, W, P.output_channels(name, C)))
        out = out.astype(np.float32)
    raw = [_np(a) for a in P.predict(out, z, logsnr, name)]
    clipped = [_np(a) for a in P.predict(out, z, logsnr, name, clip_x=True)]
    assert np.abs(raw[0]).max() > 1.0  # the case is non-trivial
    np.testing.assert_allclose(clipped[0], np.clip(raw[0], -1, 1), atol=1e-6)
    # eps_hat is recomputed from the clipped x_hat so that z is still reproduced
    # (the DDIM update stays consistent); it is not clipped itself.
    np.testing.assert_allclose(clipped[1], (z - alpha * clipped[0]) / sigma, atol=1e-4)
    assert np.abs(clipped[1]).max() > 1.0
    np.testing.assert_allclose(clipped[2], alpha * clipped[1] - sigma * clipped[0], atol=1e-5)
    unclipped = np.abs(raw[0]) <= 1.0
    np.testing.assert_allclose(clipped[1][unclipped], raw[1][unclipped], atol=1e-4)


def test_clip_x_hat_clips_and_returns_the_eps_hat_it_implies():
    x, eps, logsnr, z, alpha, sigma = _data(7)
    x_hat = 3.0 * x
    x_c, eps_c = (_np(a) for a in P.clip_x_hat(x_hat, z, logsnr))
    np.testing.assert_allclose(x_c, np.clip(x_hat, -1, 1), atol=0)
    np.testing.assert_allclose(eps_c, (z - alpha * x_c) / sigma, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_np(P.eps_from_x(x_hat, z, logsnr)),
                               (z - alpha * x_hat) / sigma, rtol=1e-5, atol=1e-4)
    # predict(clip_x=True) gives exactly these numbers.
    x_p, eps_p, _ = P.predict(x_hat, z, logsnr, "x", clip_x=True)
    np.testing.assert_array_equal(_np(x_p), x_c)
    np.testing.assert_array_equal(_np(eps_p), eps_c)


def test_output_channels_doubles_for_both_only():
    assert [P.output_channels(n, 3) for n in ("eps", "x", "v", "both")] == [3, 3, 3, 6]


@pytest.mark.parametrize("fn", [
    lambda: P.predict(np.zeros((1, 2, 2, 1), np.float32), np.zeros((1, 2, 2, 1), np.float32),
                      np.zeros((1,), np.float32), "score"),
    lambda: P.target(np.zeros((1, 2, 2, 1), np.float32), np.zeros((1, 2, 2, 1), np.float32),
                     np.zeros((1,), np.float32), "score"),
    lambda: P.output_channels("score", 3),
])
def test_unknown_parameterization_error_names_value_and_allowed(fn):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "'score'" in msg and all(n in msg for n in ("eps", "x", "v", "both"))

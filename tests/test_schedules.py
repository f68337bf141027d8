"""Identities of the logSNR schedules (`alpha^2 = sigmoid(logsnr)`,
`sigma^2 = sigmoid(-logsnr)`, cosine `logsnr(t) = -2 log tan(a t + b)`): endpoints,
variance preservation, monotonicity, the t <-> logsnr inverse and the log-space sigma
ratio."""

import numpy as np
import pytest
from keras import ops

from keras_progdist.schedules import Schedule, alpha_sigma, get_schedule, log_sigma_ratio


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


GRID = np.concatenate([[0.0, 1e-6, 1e-3], np.linspace(0.0, 1.0, 1001), [1 - 1e-3, 1.0]])
GRID = np.sort(GRID).astype(np.float32)


def test_cosine_endpoints_are_plus_and_minus_twenty():
    s = Schedule("cosine")
    ends = _np(s.logsnr(ops.convert_to_tensor([0.0, 1.0])))
    np.testing.assert_allclose(ends, [20.0, -20.0], atol=1e-4)


def test_cosine_logsnr_matches_float64_formula_across_t():
    # Near t = 1, a t + b is within 5e-5 of pi/2, where float32 rounding of the angle
    # alone moves log tan by ~1e-3; an accurate form uses tan(pi/2 - u) = 1 / tan(u).
    s = Schedule("cosine")
    t = np.linspace(0.0, 1.0, 10001).astype(np.float32)
    reference = -2.0 * np.log(np.tan(s._a * t.astype(np.float64) + s._b))
    np.testing.assert_allclose(_np(s.logsnr(ops.convert_to_tensor(t))), reference, atol=1e-4)


def test_linear_endpoints_follow_the_range():
    s = Schedule("linear", logsnr_min=-10.0, logsnr_max=6.0)
    np.testing.assert_allclose(_np(s.logsnr(ops.convert_to_tensor([0.0, 0.5, 1.0]))),
                               [6.0, -2.0, -10.0], atol=1e-6)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alpha_squared_plus_sigma_squared_is_one_on_grid_including_endpoints(name):
    alpha, sigma = Schedule(name).alpha_sigma(ops.convert_to_tensor(GRID))
    alpha, sigma = _np(alpha), _np(sigma)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    assert np.all(alpha > 0) and np.all(sigma > 0)
    # Neither underflows at the ends: sigma_0^2 and alpha_1^2 are ~2e-9, not 0.
    assert 1e-9 < sigma[0] ** 2 < 3e-9 and 1e-9 < alpha[-1] ** 2 < 3e-9


def test_alpha_sigma_matches_sigmoid_identities_at_extremes():
    logsnr = np.array([-20.0, -5.0, 0.0, 5.0, 20.0], np.float32)
    alpha, sigma = alpha_sigma(ops.convert_to_tensor(logsnr))
    sig = 1 / (1 + np.exp(-logsnr.astype(np.float64)))
    np.testing.assert_allclose(_np(alpha), np.sqrt(sig), rtol=1e-5)
    np.testing.assert_allclose(_np(sigma), np.sqrt(1 - sig), rtol=1e-4)
    # SNR = alpha^2 / sigma^2 = exp(logsnr).
    np.testing.assert_allclose(np.log(_np(alpha) ** 2 / _np(sigma) ** 2), logsnr, atol=1e-3)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_logsnr_is_strictly_decreasing_in_t(name):
    t = np.linspace(0.0, 1.0, 1001).astype(np.float32)
    logsnr = _np(Schedule(name).logsnr(ops.convert_to_tensor(t)))
    assert np.all(np.diff(logsnr) < 0), np.diff(logsnr).max()


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_t_to_logsnr_to_t_round_trip(name):
    s = Schedule(name)
    t = np.linspace(0.0, 1.0, 257).astype(np.float32)
    back = _np(s.t(s.logsnr(ops.convert_to_tensor(t))))
    np.testing.assert_allclose(back, t, atol=1e-5)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_logsnr_to_t_to_logsnr_round_trip(name):
    s = Schedule(name)
    logsnr = np.linspace(-19.0, 19.0, 77).astype(np.float32)
    back = _np(s.logsnr(s.t(ops.convert_to_tensor(logsnr))))
    # This direction is ill-conditioned near t = 1 whatever the formula: there
    # |dlogsnr/dt| ~ 3e4 for the cosine map and one float32 ulp of t is 6e-8, so one
    # ulp of t moves logsnr by ~2e-3. 5e-3 allows two ulps; the middle is tight.
    np.testing.assert_allclose(back, logsnr, atol=5e-3)
    middle = np.abs(logsnr) <= 10
    np.testing.assert_allclose(back[middle], logsnr[middle], atol=1e-4)


def test_log_sigma_ratio_equals_log_of_ratio_where_computable():
    rng = np.random.default_rng(0)
    ls = rng.uniform(-10, 10, 64).astype(np.float32)
    lt = rng.uniform(-10, 10, 64).astype(np.float32)
    got = _np(log_sigma_ratio(ops.convert_to_tensor(ls), ops.convert_to_tensor(lt)))
    ls64, lt64 = ls.astype(np.float64), lt.astype(np.float64)
    sigma_s = np.sqrt(1 / (1 + np.exp(ls64)))
    sigma_t = np.sqrt(1 / (1 + np.exp(lt64)))
    np.testing.assert_allclose(got, np.log(sigma_s / sigma_t), atol=1e-5)


def test_log_sigma_ratio_stays_finite_at_extremes():
    # logsnr = 100: sigma^2 = sigmoid(-100) ~ 4e-44 underflows float32, but its log is -100.
    ls = ops.convert_to_tensor([100.0, 20.0, -20.0, 100.0], "float32")
    lt = ops.convert_to_tensor([-20.0, -20.0, 20.0, 100.0], "float32")
    got = _np(log_sigma_ratio(ls, lt))
    assert np.all(np.isfinite(got))
    expected = 0.5 * (np.logaddexp(0, [-20.0, -20, 20, 100]) - np.logaddexp(0, [100.0, 20, -20, 100]))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got[0], -50.0, atol=1e-4)


def test_unknown_schedule_name_error_names_value_and_allowed():
    with pytest.raises(ValueError) as info:
        Schedule("sigmoid")
    msg = str(info.value)
    assert "'sigmoid'" in msg and "cosine" in msg and "linear" in msg


@pytest.mark.parametrize("lo,hi", [(20.0, -20.0), (5.0, 5.0)])
def test_logsnr_min_not_below_max_is_an_error(lo, hi):
    with pytest.raises(ValueError, match="logsnr_min must be below logsnr_max"):
        Schedule("cosine", logsnr_min=lo, logsnr_max=hi)


def test_get_schedule_accepts_name_config_and_instance():
    s = Schedule("linear", -8.0, 8.0)
    assert get_schedule(s) is s
    assert get_schedule(s.get_config()).get_config() == s.get_config()
    assert get_schedule("cosine").name == "cosine"
    with pytest.raises(TypeError):
        get_schedule(3)

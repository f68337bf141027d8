"""Samplers against analytic denoisers, where the right answer is known in closed form.

* Data = one fixed image `x0`: the optimal denoiser returns `x0`, so DDIM lands on it.
* Gaussian data `x ~ N(m, s^2)` per pixel: `E[x | z_t] = (alpha s^2 z + sigma^2 m) /
  (alpha^2 s^2 + sigma^2)`. The probability-flow ODE that DDIM discretizes is then the
  unique monotone affine map between the Gaussians `z_1 ~ N(alpha_1 m, alpha_1^2 s^2 +
  sigma_1^2)` and `N(m, s^2)`, so every noise sample has a known destination.
"""

import numpy as np
import pytest
from keras import ops

from keras_progdist import parameterizations, samplers
from keras_progdist.diffusion import compile_with_variables
from keras_progdist.schedules import Schedule

SCHEDULE = Schedule("cosine")
SHAPE = (4, 4, 1)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def _bcast(v):
    return ops.reshape(v, (-1, 1, 1, 1))


@pytest.fixture(scope="module")
def x0():
    return np.random.default_rng(0).uniform(-1, 1, (1,) + SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(1)
    m = rng.uniform(-0.5, 0.5, (1,) + SHAPE).astype(np.float32)
    s = rng.uniform(0.2, 0.6, (1,) + SHAPE).astype(np.float32)

    def denoise(z, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        alpha, sigma = _bcast(alpha), _bcast(sigma)
        return (alpha * s**2 * z + sigma**2 * m) / (alpha**2 * s**2 + sigma**2)

    # Noise standardized per pixel (mean 0, std 1 exactly over the 2000 samples), so the
    # sample statistics of an affine transport are set by the sampler, not by chance.
    noise = rng.standard_normal((2000,) + SHAPE)
    noise = ((noise - noise.mean(0)) / noise.std(0)).astype(np.float32)
    alpha_1, sigma_1 = (float(v) for v in SCHEDULE.alpha_sigma(1.0))
    destination = m + s * (noise - alpha_1 * m) / np.sqrt(alpha_1**2 * s**2 + sigma_1**2)
    return dict(m=m, s=s, denoise=denoise, noise=noise, destination=destination)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 16])
def test_ddim_lands_exactly_on_the_single_data_point(x0, num_steps):
    noise = np.random.default_rng(num_steps).standard_normal((8,) + SHAPE).astype(np.float32)
    denoise = lambda z, t: ops.broadcast_to(x0, ops.shape(z))
    out = _np(samplers.ddim_sample(denoise, noise, num_steps, SCHEDULE))
    np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=1e-5)


def test_ddim_accepts_a_denoiser_returning_x_hat_and_eps_hat(x0):
    noise = np.random.default_rng(9).standard_normal((8,) + SHAPE).astype(np.float32)

    def denoise(z, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        x_hat = ops.broadcast_to(x0, ops.shape(z))
        return x_hat, (z - _bcast(alpha) * x_hat) / _bcast(sigma)

    out = _np(samplers.ddim_sample(denoise, noise, 3, SCHEDULE))
    np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=1e-5)


def test_ddim_step_formula_and_final_step_returns_x_hat():
    rng = np.random.default_rng(2)
    z, x_hat, eps_hat = (rng.standard_normal((3,) + SHAPE).astype(np.float32) for _ in range(3))
    logsnr_s = np.array([2.0, -1.0, 20.0], np.float32)
    s = np.array([0.3, 0.6, 0.0], np.float32)
    out = _np(samplers.ddim_step(z, x_hat, eps_hat, logsnr_s, s))
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr_s)))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(logsnr_s)))[:, None, None, None]
    np.testing.assert_allclose(out[:2], (alpha * x_hat + sigma * eps_hat)[:2], atol=1e-6)
    np.testing.assert_array_equal(out[2], x_hat[2])


def test_many_step_ddim_transports_standard_noise_onto_gaussian_data(gaussian):
    g = gaussian
    out = _np(samplers.ddim_sample(g["denoise"], g["noise"], 256, SCHEDULE))
    # DDIM is first order: measured max transport error 0.013 at 256 steps (~3.3 / N).
    np.testing.assert_allclose(out, g["destination"], atol=0.02)
    # Affine map of exactly standardized noise: the mean is exact up to round-off,
    # the std carries the discretization error (0.0033 measured).
    np.testing.assert_allclose(out.mean(0), g["m"][0], atol=1e-4)
    np.testing.assert_allclose(out.std(0), g["s"][0], atol=0.006)


def test_ddim_transport_error_shrinks_linearly_with_steps(gaussian):
    g = gaussian
    noise, dest = g["noise"][:200], g["destination"][:200]
    err = [np.abs(_np(samplers.ddim_sample(g["denoise"], noise, n, SCHEDULE)) - dest).max()
           for n in (16, 64)]
    print("DDIM max transport error at 16 / 64 steps:", err)
    assert 3.0 < err[0] / err[1] < 5.0, err  # first order: 4x the steps, 1/4 the error


def _ancestral(g, seed, n=1000, steps=400, **kw):
    return _np(samplers.ancestral_sample(g["denoise"], g["noise"][:n], steps, SCHEDULE,
                                         seed=seed, clip=False, **kw))


def test_ancestral_same_seed_reproducible_different_seeds_differ(gaussian):
    a = _ancestral(gaussian, 3, n=64, steps=20)
    b = _ancestral(gaussian, 3, n=64, steps=20)
    c = _ancestral(gaussian, 4, n=64, steps=20)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.05


def test_ancestral_samples_match_gaussian_data_statistics(gaussian):
    g = gaussian
    out = _ancestral(g, 5)
    standardized = (out - g["m"]) / g["s"]
    print("ancestral standardized mean/std:", standardized.mean(), standardized.std())
    # 16000 values: sampling std of the pooled mean ~0.008 and of the pooled std ~0.006;
    # 400 steps leave a discretization bias of ~0.01 in the std (0.017 at 256 steps).
    assert abs(standardized.mean()) < 0.03
    assert abs(standardized.std() - 1.0) < 0.03
    # Per pixel over 1000 samples: 5 standard errors.
    np.testing.assert_allclose(out.mean(0), g["m"][0], atol=5 * g["s"].max() / np.sqrt(1000))
    np.testing.assert_allclose(out.std(0) / g["s"][0], 1.0, atol=0.12)
    # Stochastic: not the deterministic DDIM transport.
    assert np.abs(out - g["destination"][:1000]).mean() > 0.1


@pytest.mark.parametrize("variance", ["fixed_large", "interpolated"])
def test_ancestral_other_variances_give_finite_samples_near_the_data(gaussian, variance):
    out = _ancestral(gaussian, 6, n=500, steps=100, variance=variance)
    assert np.all(np.isfinite(out))
    assert abs(((out - gaussian["m"]) / gaussian["s"]).mean()) < 0.1


def test_ancestral_lands_on_single_data_point(x0):
    noise = np.random.default_rng(7).standard_normal((8,) + SHAPE).astype(np.float32)
    denoise = lambda z, t: ops.broadcast_to(x0, ops.shape(z))
    out = _np(samplers.ancestral_sample(denoise, noise, 4, SCHEDULE, seed=0))
    np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=1e-5)


def test_num_steps_given_as_a_tensor_inside_a_compiled_function(gaussian):
    g = gaussian
    noise = g["noise"][:32]
    reference = _np(samplers.ddim_sample(g["denoise"], noise, 8, SCHEDULE))
    eager = _np(samplers.ddim_sample(g["denoise"], noise, ops.convert_to_tensor(8), SCHEDULE))
    np.testing.assert_allclose(eager, reference, atol=1e-6)
    compiled = compile_with_variables(
        lambda z, n: samplers.ddim_sample(g["denoise"], z, n, SCHEDULE), [])
    for n in (8, 3):  # one compiled function, two step counts
        want = _np(samplers.ddim_sample(g["denoise"], noise, n, SCHEDULE))
        got = _np(compiled(ops.convert_to_tensor(noise), ops.convert_to_tensor(n, "int32")))
        np.testing.assert_allclose(got, want, atol=1e-5)
    anc = compile_with_variables(
        lambda z, n, seed: samplers.ancestral_sample(g["denoise"], z, n, SCHEDULE, seed,
                                                     clip=False), [])
    seed = ops.convert_to_tensor([1, 0], "int32")
    got = _np(anc(ops.convert_to_tensor(noise), ops.convert_to_tensor(8, "int32"), seed))
    assert got.shape == noise.shape and np.all(np.isfinite(got))


def test_unknown_variance_error_names_value_and_allowed(x0):
    with pytest.raises(ValueError) as info:
        samplers.ancestral_sample(lambda z, t: z, np.zeros((1,) + SHAPE, np.float32), 2,
                                  SCHEDULE, seed=0, variance="learned")
    msg = str(info.value)
    assert "'learned'" in msg and all(v in msg for v in samplers.VARIANCES)


def _out_of_range_denoiser(with_eps):
    """x_hat = 2 z (half its pixels outside [-1, 1]); eps_hat, when returned, is junk
    that clipping must replace."""
    def denoise(z, t):
        x_hat = 2.0 * z
        return (x_hat, ops.zeros_like(z) + 7.0) if with_eps else x_hat
    return denoise


@pytest.mark.parametrize("with_eps", [False, True])
def test_ddim_clip_uses_clipped_x_hat_and_the_eps_hat_it_implies(with_eps):
    # Two steps 1 -> 1/2 -> 0, written out: x1 = clip(2 z1), eps1 = (z1 - a1 x1) / s1,
    # z_half = a_half x1 + s_half eps1, and the result clip(2 z_half).
    z1 = 1.5 * np.random.default_rng(3).standard_normal((4,) + SHAPE).astype(np.float32)
    out = _np(samplers.ddim_sample(_out_of_range_denoiser(with_eps), z1, 2, SCHEDULE,
                                   clip=True))
    a1, s1 = (_np(v) for v in SCHEDULE.alpha_sigma(1.0))
    a_half, s_half = (_np(v) for v in SCHEDULE.alpha_sigma(0.5))
    x1 = np.clip(2.0 * z1, -1, 1)
    z_half = a_half * x1 + s_half * (z1 - a1 * x1) / s1
    np.testing.assert_allclose(out, np.clip(2.0 * z_half, -1, 1), atol=1e-5)
    assert np.abs(2.0 * z_half).max() > 1.0  # clipping mattered at the last step too


def test_samplers_and_predict_clip_through_one_function(monkeypatch):
    # One clipping rule: predict(clip_x=True), the samplers' clip and (through predict)
    # DiffusionModel.denoise(clip=True) all call parameterizations.clip_x_hat.
    calls = []
    original = parameterizations.clip_x_hat

    def spy(x_hat, z, logsnr):
        calls.append(tuple(z.shape))
        return original(x_hat, z, logsnr)

    monkeypatch.setattr(parameterizations, "clip_x_hat", spy)
    z = np.ones((2,) + SHAPE, np.float32)
    logsnr = np.zeros((2,), np.float32)
    parameterizations.predict(2.0 * z, z, logsnr, "x", clip_x=True)
    assert len(calls) == 1
    # Eagerly once per step; a traced loop body calls it once.
    samplers.ddim_sample(_out_of_range_denoiser(False), z, 3, SCHEDULE, clip=True)
    assert len(calls) > 1
    n = len(calls)
    samplers.ancestral_sample(_out_of_range_denoiser(False), z, 2, SCHEDULE, seed=0,
                              clip=True)
    assert len(calls) > n
    n = len(calls)
    samplers.ddim_sample(_out_of_range_denoiser(False), z, 3, SCHEDULE, clip=False)
    assert len(calls) == n

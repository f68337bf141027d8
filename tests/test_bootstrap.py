"""The paired bootstrap: exact at the full sample, and right about the spread a fresh
draw of the noise gives (checked against many independent draws, the known answer)."""

import numpy as np
import pytest

from keras_progdist.evaluation import bootstrap, metrics


def _gaussian(rng, n, dim, shift=0.0, scale=1.0):
    return shift + scale * rng.standard_normal((n, dim))


@pytest.mark.parametrize("n, dim", [(300, 16), (40, 64)])  # the yᵀy and the Gram branch
def test_fid_replicate_with_every_count_one_is_the_fid(n, dim):
    rng = np.random.default_rng(0)
    real = _gaussian(rng, 500, dim)
    fake = _gaussian(rng, n, dim, shift=0.3, scale=1.2)
    fid = metrics.frechet_distance(*metrics.feature_statistics(real),
                                   *metrics.feature_statistics(fake))
    ones = np.ones((1, n), np.int32)
    np.testing.assert_allclose(bootstrap.fid_replicates(real, fake, ones), [fid], rtol=1e-7)


def test_kid_replicate_with_every_count_one_is_the_full_u_statistic():
    rng = np.random.default_rng(1)
    real, fake = _gaussian(rng, 70, 8), _gaussian(rng, 50, 8, shift=0.2)

    def mean_off_diagonal(k):
        return (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))

    kernel = lambda a, b: (a @ b.T / 8 + 1.0) ** 3  # noqa: E731
    expected = mean_off_diagonal(kernel(fake, fake)) + mean_off_diagonal(kernel(real, real)) \
        - 2 * kernel(fake, real).mean()
    got = bootstrap.kid_replicates(real, fake, np.ones((1, 50)), block=16)
    np.testing.assert_allclose(got, [expected], rtol=1e-10)


def test_counts_are_the_same_in_every_process_and_sum_to_n():
    a = bootstrap.replicate_counts(100, 5, seed=3)
    np.testing.assert_array_equal(a, bootstrap.replicate_counts(100, 5, seed=3))
    assert a.shape == (5, 100) and (a.sum(axis=1) == 100).all()
    assert not np.array_equal(a, bootstrap.replicate_counts(100, 5, seed=4))


def test_bootstrap_standard_errors_match_the_spread_of_fresh_draws():
    # The known answer: score many independent sets of generated samples (fresh noise
    # each time) against one fixed real set; the spread of their FIDs and of the
    # difference between two models fed the same noise is what the bootstrap of ONE
    # set must estimate.
    rng = np.random.default_rng(2)
    dim, n, draws = 6, 400, 300
    real = _gaussian(rng, 4000, dim)

    def teacher(z):
        return 0.4 + 1.1 * z

    def student(z):  # a little worse than the teacher, from the same noise
        return teacher(z) + 0.15 * np.tanh(z)

    def fid(x):
        return metrics.frechet_distance(*metrics.feature_statistics(real),
                                        *metrics.feature_statistics(x))

    fresh = []
    for _ in range(draws):
        z = rng.standard_normal((n, dim))
        fresh.append((fid(teacher(z)), fid(student(z))))
    fresh = np.array(fresh)
    true_se_teacher = fresh[:, 0].std(ddof=1)
    true_se_delta = (fresh[:, 1] - fresh[:, 0]).std(ddof=1)
    true_se_ratio = (fresh[:, 1] / fresh[:, 0]).std(ddof=1)

    # One set's bootstrap estimate scatters by about ±25% around the truth; the mean
    # over a few independent sets must land within 20% of it.
    estimates = []
    for seed in range(6):
        z = rng.standard_normal((n, dim))
        counts = bootstrap.replicate_counts(n, 300, seed=seed)
        boot_t = bootstrap.fid_replicates(real, teacher(z), counts)
        boot_s = bootstrap.fid_replicates(real, student(z), counts)
        estimates.append((bootstrap.standard_error(boot_t),
                          bootstrap.paired(lambda s, t: s - t, boot_s, boot_t),
                          bootstrap.paired(lambda s, t: s / t, boot_s, boot_t),
                          np.hypot(bootstrap.standard_error(boot_t),
                                   bootstrap.standard_error(boot_s))))
    se_teacher, se_delta, se_ratio, independent = np.mean(estimates, axis=0)
    assert se_teacher == pytest.approx(true_se_teacher, rel=0.2)
    assert se_delta == pytest.approx(true_se_delta, rel=0.2)
    assert se_ratio == pytest.approx(true_se_ratio, rel=0.2)
    # Pairing is what makes the comparison precise: treating the two models as
    # independent overstates the error of their difference several times over.
    assert independent > 3 * se_delta


def test_kid_bootstrap_standard_error_matches_fresh_draws():
    rng = np.random.default_rng(5)
    dim, n, draws = 4, 200, 200
    real = _gaussian(rng, 1000, dim)
    ones = np.ones((1, n))
    fresh = [bootstrap.kid_replicates(real, _gaussian(rng, n, dim, shift=0.5), ones)[0]
             for _ in range(draws)]
    estimates = [bootstrap.standard_error(bootstrap.kid_replicates(
        real, _gaussian(rng, n, dim, shift=0.5), bootstrap.replicate_counts(n, 200, seed=s)))
        for s in range(6)]
    assert np.mean(estimates) == pytest.approx(np.std(fresh, ddof=1), rel=0.2)


def test_paired_needs_replicates_of_equal_length():
    assert bootstrap.paired(lambda a, b: a - b, [1.0, 2.0], [1.0, 2.0, 3.0]) is None
    assert bootstrap.paired(lambda a, b: a - b, None, [1.0, 2.0]) is None
    assert bootstrap.paired(lambda a, b: a - b, [1.0, 3.0], [1.0, 2.0]) == \
        pytest.approx(np.std([0.0, 1.0], ddof=1))

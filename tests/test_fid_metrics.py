"""FID / KID maths on synthetic features with known answers (numpy only, fast)."""

import dataclasses
import os

import numpy as np
import pytest

from keras_progdist.evaluation import metrics, reference_cache


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(method):
    rng = np.random.default_rng(0)
    dim = 32
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_of_scaled_full_covariance(method):
    # sigma2 = c^2 sigma1 gives tr((s1 s2)^1/2) = c tr(s1), so
    # d^2 = |dmu|^2 + (1 - c)^2 tr(s1), for a dense, non-diagonal sigma1.
    rng = np.random.default_rng(1)
    dim, c = 24, 1.7
    sigma1 = _random_spd(rng, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(sigma1)
    got = metrics.frechet_distance(mu1, sigma1, mu2, c * c * sigma1, method=method)
    assert got == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_is_symmetric_and_methods_agree():
    rng = np.random.default_rng(2)
    dim = 16
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_spd(rng, dim), _random_spd(rng, dim)
    d12 = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    d21 = metrics.frechet_distance(mu2, sigma2, mu1, sigma1)
    d_sqrtm = metrics.frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    assert d12 == pytest.approx(d21, abs=1e-9)
    assert d12 == pytest.approx(d_sqrtm, abs=1e-8)
    assert d12 > 0


def test_fid_of_a_set_with_itself_is_zero_even_when_covariance_is_singular():
    rng = np.random.default_rng(3)
    # Rank 19 of 64 in the second case: the square roots of the ~0 eigenvalues
    # amplify round-off (sqrt(1e-16 * lambda_max^2)), hence the looser bound.
    for num, dim, rel_tol in [(500, 32, 1e-9), (20, 64, 1e-6)]:
        features = rng.normal(size=(num, dim)) @ rng.normal(size=(dim, dim))
        mu, sigma = metrics.feature_statistics(features)
        fid = metrics.frechet_distance(mu, sigma, mu, sigma)
        assert abs(fid) < rel_tol * np.trace(sigma)


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], np.float32)
    mu, sigma = metrics.feature_statistics(features)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, [[4.0, 7.0], [7.0, 13.0]])


def _kid_brute_force(x, y):
    dim = x.shape[1]

    def k(a, b):
        return (a @ b / dim + 1.0) ** 3

    m = len(x)
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2.0 * cross / (m * m)


def test_kid_on_one_full_subset_equals_the_unbiased_mmd_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 5)), rng.normal(0.3, 1.0, size=(8, 5))
    mean, _ = metrics.kid(x, y, num_subsets=1, subset_size=8)
    assert mean == pytest.approx(_kid_brute_force(x, y), rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 64))
    b = rng.normal(size=(400, 64))
    shifted = rng.normal(size=(400, 64)) + 0.3
    same_kid, same_err = metrics.kid(a, b, num_subsets=20, subset_size=200)
    shift_kid, shift_err = metrics.kid(a, shifted, num_subsets=20, subset_size=200)
    # Two independent samples of one distribution: unbiased, so ~0.
    assert abs(same_kid) < max(4 * same_err, 0.02 * shift_kid)
    assert shift_kid > 10 * shift_err > 0
    # A set against itself: subsets drawn from one set of N share samples,
    # whose large k(x, x) enter only the cross term, so the estimate sits
    # O(1/N) below zero: about -0.036 here, and a quarter of that at 4N.
    self_kid, _ = metrics.kid(a, a, num_subsets=20, subset_size=200)
    a_big = rng.normal(size=(1600, 64))
    self_kid_big, _ = metrics.kid(a_big, a_big, num_subsets=20, subset_size=200)
    assert -0.15 * shift_kid < self_kid < 0
    assert abs(self_kid_big) < 0.4 * abs(self_kid)


def test_kid_from_whole_kernel_matrices_equals_the_per_subset_products(monkeypatch):
    # Sets small enough take their subsets' kernels from whole kernel matrices; large
    # ones compute each subset's. Both must be the same estimator on the same draws.
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(60, 16)), rng.normal(0.2, 1.0, size=(40, 16))
    whole = metrics.kid(a, b, num_subsets=7, subset_size=25, seed=3)
    monkeypatch.setattr(metrics, "_KID_FULL_KERNEL_MAX", 0)
    per_subset = metrics.kid(a, b, num_subsets=7, subset_size=25, seed=3)
    assert whole[0] != 0.0
    np.testing.assert_allclose(whole, per_subset, rtol=1e-12)


def test_kid_clips_the_subset_size_to_the_smaller_set():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(50, 8)) + 1.0
    clipped = metrics.kid(a, b, num_subsets=3, subset_size=1000, seed=7)
    explicit = metrics.kid(a, b, num_subsets=3, subset_size=30, seed=7)
    assert clipped == explicit


def test_fid_is_withheld_below_the_feature_dimension_and_kid_is_not():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(100, metrics.FEATURE_DIM)).astype(np.float32)
    fake = rng.normal(size=(100, metrics.FEATURE_DIM)).astype(np.float32)
    result = metrics.fid_and_kid(real, fake, kid_subsets=5)
    assert result["fid"] is None
    assert "2048" in result["fid_note"] and "100" in result["fid_note"]
    assert np.isfinite(result["kid"]) and np.isfinite(result["kid_std_err"])
    assert result["num_real"] == result["num_fake"] == 100


def test_fid_is_reported_once_both_sets_reach_the_feature_dimension():
    rng = np.random.default_rng(8)
    dim = 16
    real = rng.normal(size=(dim, dim))
    fake = rng.normal(size=(dim + 5, dim)) + 0.5
    result = metrics.fid_and_kid(real, fake, kid_subsets=5)
    mu_r, sigma_r = metrics.feature_statistics(real)
    mu_f, sigma_f = metrics.feature_statistics(fake)
    assert result["fid_note"] is None
    assert result["fid"] == pytest.approx(metrics.frechet_distance(mu_r, sigma_r, mu_f, sigma_f))
    too_few = metrics.fid_and_kid(real[: dim - 1], fake, kid_subsets=5)
    assert too_few["fid"] is None


def test_reference_stats_round_trip_keyed_by_dataset_split_and_protocol(tmp_path):
    rng = np.random.default_rng(9)
    features = rng.normal(size=(50, 8))
    mu, sigma = metrics.feature_statistics(features)
    path = reference_cache.save_reference_stats(
        "cifar10", "train", mu, sigma, len(features), cache_dir=str(tmp_path), features=features
    )
    loaded = reference_cache.load_reference_stats("cifar10", "train", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(loaded["mu"], mu)
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    assert loaded["num_samples"] == 50 and loaded["protocol"] == metrics.FID_PROTOCOL
    assert loaded["features"].shape == (50, 8)
    assert path.startswith(str(tmp_path))

    with pytest.raises(reference_cache.ReferenceStatsNotFoundError,
                       match="save_reference_stats"):
        reference_cache.load_reference_stats("cifar10", "test", cache_dir=str(tmp_path))
    with pytest.raises(reference_cache.ReferenceStatsNotFoundError, match="protocol='other'"):
        reference_cache.load_reference_stats("cifar10", "train", protocol="other",
                                             cache_dir=str(tmp_path))


# -- the reference-statistics cache -----------------------------------------------------
def _build_counter(features):
    calls = []

    def build():
        calls.append(1)
        return features

    return build, calls


def test_reference_stats_of_two_data_dirs_are_two_cache_entries(tmp_path):
    from keras_progdist.evaluation import reference
    from keras_progdist.settings import EvaluateSettings

    cfg = EvaluateSettings(split="train", num_reference=100)
    keys = [reference.reference_key(cfg, {"name": "fashion_mnist", "data_dir": d,
                                          "image_size": 16})
            for d in (str(tmp_path / "a"), str(tmp_path / "b"))]
    # The folder is resolved: a relative or symlinked spelling of one folder is one key.
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert reference.reference_key(cfg, {"name": "fashion_mnist", "image_size": 16,
                                         "data_dir": str(tmp_path / "link")}) == keys[0]
    assert keys[0]["data_dir"] == os.path.realpath(str(tmp_path / "a"))
    assert keys[0] != keys[1]
    rng = np.random.default_rng(10)
    paths = []
    for key, offset in zip(keys, (0.0, 1.0)):
        build, calls = _build_counter(rng.normal(size=(20, 4)) + offset)
        stats = reference_cache.cached_reference_stats("fmnist", "train", build, key=key,
                                               cache_dir=str(tmp_path))
        assert stats["built"] and calls == [1]
        paths.append(stats["path"])
    assert paths[0] != paths[1]
    assert len(os.listdir(os.path.dirname(paths[0]))) == 2
    for key, path, offset in zip(keys, paths, (0.0, 1.0)):
        build, calls = _build_counter(None)
        stats = reference_cache.cached_reference_stats("fmnist", "train", build, key=key,
                                               cache_dir=str(tmp_path))
        assert not stats["built"] and calls == [] and stats["path"] == path
        assert abs(stats["mu"].mean() - offset) < 0.5
    # Every setting that changes the images changes the key.
    base = {"name": "fashion_mnist", "image_size": 16}
    variants = [{"image_size": 32}, {"resize": "nearest"}, {"name": "mnist_embedded"},
                {"manual_dir": str(tmp_path)}]
    for variant in variants:
        assert reference.reference_key(cfg, {**base, **variant}) != \
            reference.reference_key(cfg, base), variant
    assert reference.reference_key(dataclasses.replace(cfg, num_reference=50), base) != \
        reference.reference_key(cfg, base)
    assert reference.reference_key(dataclasses.replace(cfg, split="test"), base) != \
        reference.reference_key(cfg, base)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "checksum", "empty"])
def test_unreadable_reference_stats_are_rebuilt_with_a_warning(tmp_path, damage):
    rng = np.random.default_rng(11)
    features = rng.normal(size=(40, 6)).astype(np.float32)
    key = {"data_dir": "/x", "num_reference": 40}
    build, calls = _build_counter(features)
    first = reference_cache.cached_reference_stats("ds", "train", build, key=key,
                                           cache_dir=str(tmp_path))
    path = first["path"]
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a zip file at all")
    elif damage == "empty":
        open(path, "wb").close()
    else:  # a well-formed npz whose contents no longer match the stored sha256
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
        arrays["mu"] = arrays["mu"] + 1.0
        np.savez(path[:-4], **arrays)
    with pytest.raises(reference_cache.CorruptReferenceStatsError):
        reference_cache.load_reference_stats("ds", "train", cache_dir=str(tmp_path), key=key)
    with pytest.warns(reference_cache.ReferenceStatsRebuiltWarning):
        again = reference_cache.cached_reference_stats("ds", "train", build, key=key,
                                               cache_dir=str(tmp_path))
    assert again["built"] and len(calls) == 2
    np.testing.assert_array_equal(again["mu"], first["mu"])
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    loaded = reference_cache.load_reference_stats("ds", "train", cache_dir=str(tmp_path),
                                                  key=key)
    np.testing.assert_array_equal(loaded["features"], features)


_WRITER = """
import sys
import os

import numpy as np
sys.path.insert(0, {root!r})
from keras_progdist.evaluation import reference_cache
features = np.full(({rows}, 256), float(sys.argv[1]), np.float32)
mu, sigma = features.mean(0).astype(np.float64), np.eye(256)
for _ in range({repeats}):
    reference_cache.save_reference_stats("ds", "train", mu, sigma, len(features),
                                         cache_dir={cache!r}, features=features,
                                         key={{"k": 1}})
"""


def test_concurrent_writers_of_one_key_never_leave_a_corrupt_file(tmp_path):
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _WRITER.format(root=root, rows=2000, repeats=15, cache=str(tmp_path))
    start = str(time.time() + 2.0)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(value), start],
                                stderr=subprocess.PIPE, text=True) for value in (1, 2)]
    loads, errors = 0, []
    while any(w.poll() is None for w in writers):
        try:
            stats = reference_cache.load_reference_stats(
                "ds", "train", cache_dir=str(tmp_path), key={"k": 1})
        except reference_cache.ReferenceStatsNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001  any failure is the bug this guards
            errors.append(repr(e))
            continue
        # One writer's file whole, never a mix of the two.
        assert np.unique(stats["features"]).size == 1
        loads += 1
    stderr = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], stderr
    assert not errors, errors[:3]
    assert loads > 0
    final = reference_cache.load_reference_stats("ds", "train", cache_dir=str(tmp_path),
                                                 key={"k": 1})
    assert final["features"].shape == (2000, 256)
    folder = os.path.dirname(final["path"])
    assert os.listdir(folder) == [os.path.basename(final["path"])], "temporaries left"

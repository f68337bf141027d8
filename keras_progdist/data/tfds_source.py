"""tfds sources (`cifar10`, `imagenet64`, `lsun_*`): read from a prepared local
`data_dir`, never downloading; prepared first from the original archives in
`manual_dir` where tfds can do that without a download.

tensorflow-datasets is heavy: it is imported only when a tfds source is read.
"""

import os

from keras_progdist.data.registry import check_not_empty


def tfds_builder(spec, data_dir, manual_dir):
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


def tfds_dataset(spec, split, data_dir, manual_dir, shuffle, seed, input_context):
    """(uint8 image HWC, int32 label) pairs of a tfds split (label -1 if unlabelled),
    the disjoint part `input_context` asks for (if any).

    Raises:
        EmptyDatasetError: the split is empty by tfds' metadata.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds_builder(spec, data_dir, manual_dir)
    try:  # tfds knows split sizes (slices included) from its metadata, for free.
        known = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError, AttributeError):
        known = None
    if known is not None:
        check_not_empty(spec, split, known, builder.data_dir)
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

    return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)

"""Compatibility alias: the numpy batches now live in `keras_progdist.data.numpy_pipeline`."""
from keras_progdist.data.errors import EmptyDatasetError  # noqa: F401
from keras_progdist.data.numpy_pipeline import ArrayBatches, default_shard, shard_slice  # noqa: F401

"""The errors of the data package, shared by the readers and both pipelines."""

from keras_progdist.errors import KerasProgdistError


class EmptyDatasetError(KerasProgdistError, ValueError):
    """A dataset (or this process's shard of it) has no examples: training on it would
    only produce `nan` losses, so it is refused when the pipeline is built."""


class IdxFormatError(KerasProgdistError, ValueError):
    """An idx file (the MNIST / Fashion-MNIST format) is truncated or corrupt."""


class CorruptImageError(KerasProgdistError, ValueError):
    """A file of an image folder is not a readable PNG/JPEG; the message names it."""


class DataSettingError(KerasProgdistError, ValueError):
    """A `dataset.*` setting the data cannot be served with (unknown name or split, an
    image size or batch size out of range, ...); the message names the setting."""


class DataFileError(KerasProgdistError, FileNotFoundError):
    """The data's files or folder are missing (a `data_dir` that does not exist, idx
    files not there); the message names the path."""


class ImageTooLargeError(CorruptImageError):
    """An image of an image folder has more pixels than the folder's pixel cap
    (`image_folder.MAX_IMAGE_PIXELS` by default); the message names the file and the
    cap. Decoding it would take memory in proportion to its pixels, which a small
    compressed file (a decompression bomb) can make arbitrarily large."""

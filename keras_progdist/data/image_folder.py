"""Reader of `image_folder`: your own PNG/JPEG files, flat or one subfolder per class.

`scan_image_folder` lists and checks the files before any is decoded; `decode_square`
decodes one with Pillow (on both pipelines, so tf.data and numpy serve the same pixels)
and crops its largest centered square.
"""

import dataclasses
import os

import numpy as np

from keras_progdist.data.errors import CorruptImageError, EmptyDatasetError

CHANNELS = (1, 3)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_IMAGE_FORMATS = ("PNG", "JPEG")
# Pillow modes that hold one channel; a first image in one of these makes the
# default `channels` 1, anything else (RGB, RGBA, CMYK, palette) 3.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The checked listing of an image folder (see `scan_image_folder`).

    Attributes:
        root: the folder.
        files: image paths in a fixed order (classes in sorted order, files
            sorted within each).
        labels: int32 class index of each file, -1 without class subfolders.
        class_names: the sorted class subfolder names (label i is
            `class_names[i]`), or () for a flat folder.
        channels: 1 (grayscale) or 3 (RGB): what every image is converted to.
    """

    root: str
    files: tuple
    labels: np.ndarray
    class_names: tuple
    channels: int

    @property
    def num_classes(self):
        return len(self.class_names) or None


def _visible(name):
    return not name.startswith(".")


def _is_image_name(name):
    return _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(folder):
    """Image files under `folder` (recursively), sorted, hidden entries skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if _is_image_name(f))
    return out


def _pillow_errors():
    from PIL import Image

    # UnidentifiedImageError and "image file is truncated" are OSErrors; a bad
    # PNG chunk CRC is a SyntaxError; DecompressionBombError is neither.
    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _probe_image(path):
    """Checks that `path` is a whole PNG or JPEG without decoding it at full size.

    PNG: `verify()` reads every chunk and checks its CRC. JPEG: a draft decode
    at 1/8 scale reads the whole entropy-coded stream, so a truncated file fails
    here, at a fraction of a full decode's cost.

    Returns:
        The image's Pillow mode (e.g. "L", "RGB").

    Raises:
        CorruptImageError: naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt, mode, size = im.format, im.mode, im.size
            if fmt == "PNG":
                im.verify()
            elif fmt == "JPEG":
                im.draft(im.mode, (1, 1))
                im.load()
    except _pillow_errors() as e:
        raise CorruptImageError(
            f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e}); "
            "remove or replace the file."
        ) from e
    if fmt not in _IMAGE_FORMATS:
        raise CorruptImageError(
            f"{path}: a {fmt} image under a PNG/JPEG name; image_folder reads only "
            "PNG and JPEG files."
        )
    if min(size) == 0:
        raise CorruptImageError(f"{path}: the image is empty ({size[0]}x{size[1]}).")
    return mode


def scan_image_folder(data_dir, with_labels=False, channels=None, check_all=True):
    """Lists and checks an image folder before any image is decoded.

    Layout: either image files directly in `data_dir` (unlabelled), or one
    subfolder per class holding that class's images (at any depth); labels are
    the sorted subfolder names numbered 0..K-1. Files ending in .png, .jpg or
    .jpeg (any case) are images; other files and hidden entries are ignored.

    Args:
        data_dir: the folder.
        with_labels: labels are wanted (requires class subfolders).
        channels: 1, 3, or None for the first image's: 1 if it is grayscale,
            else 3.
        check_all: check every file (`_probe_image`), so a corrupt one is named
            now rather than in the middle of training; False checks the first.

    Returns:
        An `ImageFolder`.

    Raises:
        ValueError: no data_dir, bad channels, with_labels without class
            subfolders, images beside class subfolders, class subfolders
            without images.
        FileNotFoundError: the folder does not exist.
        EmptyDatasetError: no image files.
        CorruptImageError: a file that is not a whole PNG/JPEG (named).
    """
    check_channels_value(channels)
    if data_dir is None:
        raise ValueError(
            "Dataset 'image_folder' needs data_dir: the folder of PNG/JPEG files "
            "(e.g. --gin_param=\"dataset.data_dir='/path/to/images'\")."
        )
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder data_dir={root!r} does not exist (or is not a folder)."
        )
    entries = sorted(e for e in os.listdir(root) if _visible(e))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_files = [os.path.join(root, e) for e in entries
                 if _is_image_name(e) and os.path.isfile(os.path.join(root, e))]
    per_class = {d: _image_files(os.path.join(root, d)) for d in subdirs}
    if any(per_class.values()):
        if top_files:
            raise ValueError(
                f"Image folder {root!r} has images both at its top level "
                f"({os.path.basename(top_files[0])!r}, ...) and in subfolders; use one "
                "subfolder per class, or put all images at the top level."
            )
        empty = [d for d, files in per_class.items() if not files]
        if empty:
            raise ValueError(
                f"Class subfolders {empty} of {root!r} hold no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images; every subfolder is a class, so "
                "add images or remove them."
            )
        class_names = tuple(subdirs)
        files, labels = [], []
        for k, d in enumerate(class_names):
            files += per_class[d]
            labels += [k] * len(per_class[d])
    else:
        class_names, files, labels = (), top_files, [-1] * len(top_files)
    if not files:
        raise EmptyDatasetError(
            f"Dataset 'image_folder' is empty: no {'/'.join(IMAGE_EXTENSIONS)} files "
            f"in {root!r} or its subfolders."
        )
    if with_labels and not class_names:
        raise ValueError(
            f"with_labels=True, but image folder {root!r} has no class subfolders "
            "(labels are the subfolder names); use with_labels=False or put each "
            "class in its own subfolder."
        )
    modes = [_probe_image(f) for f in (files if check_all else files[:1])]
    if channels is None:
        channels = 1 if modes[0] in _GRAY_MODES else 3
    return ImageFolder(root=root, files=tuple(files),
                       labels=np.asarray(labels, np.int32),
                       class_names=class_names, channels=int(channels))




def check_channels_value(channels):
    if channels is not None and (isinstance(channels, bool) or channels not in CHANNELS):
        raise ValueError(
            f"channels must be 1 (grayscale), 3 (RGB) or None, got channels={channels!r}."
        )


def decode_square(path, channels):
    """One image file as uint8 (side, side, channels): EXIF orientation applied,
    converted to `channels`, then the largest centered square cropped (the offsets
    of `tf.image.resize_with_crop_or_pad`). Pillow decodes on both pipelines, so
    tf.data and numpy see the same bytes (TensorFlow's own decoders differ from
    Pillow's in grayscale conversion and JPEG details)."""
    from PIL import ImageOps, Image

    path = os.fsdecode(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                # 16-bit grayscale PNG: Pillow's convert("L") clips at 255
                # instead of scaling, so scale 0..65535 to 0..255 here.
                gray = np.asarray(im, np.float64) / 257.0
                arr = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
                arr = arr if channels == 1 else np.repeat(arr, 3, axis=-1)
            else:
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
                arr = arr.reshape(arr.shape[:2] + (channels,))
    except _pillow_errors() as e:
        raise CorruptImageError(
            f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e}); "
            "remove or replace the file."
        ) from e
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(arr[top:top + side, left:left + side])


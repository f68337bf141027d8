"""Reader of `image_folder`: your own PNG/JPEG files, flat or one subfolder per class.

`scan_image_folder` lists and checks the files before any is decoded; `decode_square`
decodes one with Pillow (on both pipelines, so tf.data and numpy serve the same pixels),
crops its largest centered square and, given the output side, shrinks a square of 4 or
more times that side to 2 times it. Opening one file as untrusted input (regular files
only, the pixel cap, Pillow's errors) is `image_file`'s job.

Memory: one image is decoded at a time, after its header passed the pixel cap
(`MAX_IMAGE_PIXELS`, a setting of `scan_image_folder`). So a decode holds at most the
cap's pixels (4 bytes each for RGBA) for a moment, and what is kept of it is
O(image_size**2), however large the source files are.
"""

import dataclasses
import math
import os

import numpy as np

from keras_progdist.data.errors import EmptyDatasetError
from keras_progdist.data.image_file import (
    MAX_IMAGE_PIXELS,
    check_max_pixels_value,
    check_regular,
    open_image,
    pillow_errors,
    probe_image,
    unreadable_error,
)

CHANNELS = (1, 3)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Pillow modes that hold one channel; a first image in one of these makes the
# default `channels` 1, anything else (RGB, RGBA, CMYK, palette) 3.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# `decode_square` shrinks a large square (box filter) to this many times the output
# side, so the antialiased bilinear resize that follows (the same on both pipelines)
# still has two samples per output pixel; it moved the 16x16 result of a smooth
# 1500x1500 photo by under 1 level of 255 (tests/test_image_folder.py).
_KEEP_TIMES_OUTPUT = 2


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
        max_pixels: the pixel cap every decode of these files enforces.
    """

    root: str
    files: tuple
    labels: np.ndarray
    class_names: tuple
    channels: int
    max_pixels: int = MAX_IMAGE_PIXELS

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


def scan_image_folder(data_dir, with_labels=False, channels=None, check_all=True,
                      max_pixels=MAX_IMAGE_PIXELS):
    """Lists and checks an image folder before any image is decoded.

    Layout: either image files directly in `data_dir` (unlabelled), or one
    subfolder per class holding that class's images (at any depth); labels are
    the sorted subfolder names numbered 0..K-1. Files ending in .png, .jpg or
    .jpeg (any case) are images; other files and hidden entries are ignored. An
    image name that is not a regular file (a FIFO, a device, a broken link) is
    refused: opening a FIFO would wait forever for a writer.

    Args:
        data_dir: the folder.
        with_labels: labels are wanted (requires class subfolders).
        channels: 1, 3, or None for the first image's: 1 if it is grayscale,
            else 3.
        check_all: check every file (`probe_image`), so a corrupt one is named
            now rather than in the middle of training; False checks the first.
            Every file is checked to be a regular file either way.
        max_pixels: the pixel cap (default `MAX_IMAGE_PIXELS`, 50M): an image
            with more pixels is refused by name, here (the probed files) and by
            every decode of this folder (`ImageFolder.max_pixels`).

    Returns:
        An `ImageFolder`.

    Raises:
        ValueError: no data_dir, bad channels or max_pixels, with_labels without
            class subfolders, images beside class subfolders, class subfolders
            without images.
        FileNotFoundError: the folder does not exist.
        EmptyDatasetError: no image files.
        CorruptImageError: a file that is not a regular file or not a whole
            PNG/JPEG (named).
        ImageTooLargeError: a probed image above `max_pixels` (named).
    """
    check_channels_value(channels)
    check_max_pixels_value(max_pixels)
    root = _existing_folder(data_dir)
    class_names, files, labels = _list_images(root)
    if with_labels and not class_names:
        raise ValueError(
            f"with_labels=True, but image folder {root!r} has no class subfolders "
            "(labels are the subfolder names); use with_labels=False or put each "
            "class in its own subfolder."
        )
    for f in files:
        check_regular(f)
    modes = [probe_image(f, max_pixels) for f in (files if check_all else files[:1])]
    if channels is None:
        channels = 1 if modes[0] in _GRAY_MODES else 3
    return ImageFolder(root=root, files=tuple(files),
                       labels=np.asarray(labels, np.int32),
                       class_names=class_names, channels=int(channels),
                       max_pixels=int(max_pixels))


def _existing_folder(data_dir):
    """`data_dir` as a str, once it is known to be a folder (else a ValueError for
    None, a FileNotFoundError otherwise)."""
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
    return root


def _list_images(root):
    """The images of the folder `root` in their fixed order, by the layout rules of
    `scan_image_folder`.

    Returns:
        `(class_names, files, labels)`: the sorted class subfolder names (or ()
        for a flat folder), the image paths, and each one's label (-1 when flat).

    Raises:
        ValueError: images beside class subfolders, or a class subfolder without
            images.
        EmptyDatasetError: no images at all.
    """
    entries = sorted(e for e in os.listdir(root) if _visible(e))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_files = [os.path.join(root, e) for e in entries
                 if _is_image_name(e) and not os.path.isdir(os.path.join(root, e))]
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
    return class_names, files, labels


def check_channels_value(channels):
    if channels is not None and (isinstance(channels, bool) or channels not in CHANNELS):
        raise ValueError(
            f"channels must be 1 (grayscale), 3 (RGB) or None, got channels={channels!r}."
        )


def shrunk_side(side, size):
    """The side `decode_square` shrinks a square of `side` to for output side `size`:
    `_KEEP_TIMES_OUTPUT * size` once the square is at least twice that, else `side`
    (also when `size` is None)."""
    if size is None or side < 2 * _KEEP_TIMES_OUTPUT * int(size):
        return int(side)
    return _KEEP_TIMES_OUTPUT * int(size)


def _draft_jpeg(im, size):
    """Makes a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling: a fraction of the
    memory and time) where its short side stays at least `_KEEP_TIMES_OUTPUT * size`.
    `im.mode` keeps the colour conversion unchanged.

    Returns:
        The scale: 1 (full), 2, 4 or 8. The reduced image's size is rounded up, so
        source pixel `x` is at `x / scale` in it, exactly.
    """
    width, height = im.size
    ratio = _KEEP_TIMES_OUTPUT * size / min(width, height)
    if ratio >= 1:
        return 1
    drafted = im.draft(im.mode, (math.ceil(width * ratio), math.ceil(height * ratio)))
    # draft() answers (mode, (0, 0, width / scale, height / scale)), or None.
    return 1 if drafted is None else round(width / drafted[1][2])


def _orientation(im):
    from PIL import ExifTags

    return im.getexif().get(ExifTags.Base.Orientation, 1)


def _transpose_method(orientation):
    """The transposition that turns an image with this EXIF orientation upright (as
    `PIL.ImageOps.exif_transpose` does), or None."""
    from PIL import Image

    return {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)


def _stored_box(box, orientation, w, h):
    """A box `(l, t, r, b)` of the upright image, as the box of the stored
    (un-transposed) `w` x `h` image that becomes it once transposed."""
    l, t, r, b = box
    return {1: (l, t, r, b), 2: (w - r, t, w - l, b), 3: (w - r, h - b, w - l, h - t),
            4: (l, h - b, r, h - t), 5: (t, l, b, r), 6: (t, h - r, b, h - l),
            7: (w - b, h - r, w - t, h - l), 8: (w - b, l, w - t, r)}.get(orientation,
                                                                         (l, t, r, b))


def _to_uint8(im, channels):
    """A Pillow image as uint8 (H, W, channels)."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit grayscale PNG: Pillow's convert("L") clips at 255 instead of
        # scaling, so scale 0..65535 to 0..255 here (float32 rounds x/257 exactly
        # as float64 does: no x/257 is within 1e-3 of a .5).
        gray = np.asarray(im, np.float32) / np.float32(257.0)
        im = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8))
    return im.convert("L" if channels == 1 else "RGB")


def decode_square(path, channels, size=None, max_pixels=MAX_IMAGE_PIXELS):
    """One image file as uint8 (side, side, channels): EXIF orientation applied, the
    largest centered square cropped (the offsets of
    `tf.image.resize_with_crop_or_pad`), converted to `channels` and, given the
    output side `size`, shrunk to `shrunk_side(side, size)` (JPEG: partly by
    decoding at a reduced scale; then a box filter over each output pixel's exact
    footprint, so the square's geometry is kept).

    Pillow decodes on both pipelines, so tf.data and numpy see the same bytes
    (TensorFlow's own decoders differ from Pillow's in grayscale conversion and
    JPEG details); both then resize the square to `size` the same way.

    Args:
        path: the file (str, bytes or a numpy bytes scalar from tf.data).
        channels: 1 or 3.
        size: the output side the square will be resized to, or None to keep the
            square at full size.
        max_pixels: the pixel cap (see `scan_image_folder`).

    Returns:
        uint8 `(side, side, channels)`; with `size`, `side < 4 * size` unless the
        source square is smaller.

    Raises:
        CorruptImageError: not a regular file, or not a readable PNG/JPEG.
        ImageTooLargeError: more pixels than `max_pixels` (checked before decoding).
    """
    from PIL import Image

    path = os.fsdecode(path)
    f, im = open_image(path, max_pixels)
    try:
        with f, im:
            # The square is cut (and shrunk) from the image as stored, then turned
            # upright: the crop box is the upright image's, mapped back; so a large
            # image is never copied whole to be transposed.
            orientation = _orientation(im)
            w, h = im.size
            upright_w, upright_h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            side = min(w, h)
            top, left = (upright_h - side) // 2, (upright_w - side) // 2
            box = _stored_box((left, top, left + side, top + side), orientation, w, h)
            target = shrunk_side(side, size)
            scale = _draft_jpeg(im, size) if (
                target != side and im.format == "JPEG") else 1
            if scale > 1:  # the JPEG decodes reduced: source x is at x / scale
                square = _to_uint8(im, channels).resize(
                    (target, target), Image.Resampling.BOX,
                    box=tuple(c / scale for c in box))
            else:
                square = _to_uint8(im.crop(box), channels)
                if target != side:
                    square = square.resize((target, target), Image.Resampling.BOX)
            method = _transpose_method(orientation)
            if method is not None:
                square = square.transpose(method)
    except pillow_errors() as e:
        raise unreadable_error(path, e) from e
    arr = np.asarray(square)
    return np.ascontiguousarray(arr.reshape(arr.shape[:2] + (channels,)))

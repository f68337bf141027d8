"""One image file of an `image_folder`, opened as untrusted input.

Owns the checks made before any pixel is decoded: only regular files are opened (a FIFO
named `x.png` would block forever), an image above the pixel cap (`MAX_IMAGE_PIXELS`, a
setting of `scan_image_folder`) is refused by name from its header alone, and whatever
Pillow raises on a bad file becomes a `CorruptImageError` naming it. `probe_image`
checks a whole file at a fraction of a full decode's cost.
"""

import os
import stat

import numpy as np

from keras_progdist.data.errors import CorruptImageError, ImageTooLargeError

_IMAGE_FORMATS = ("PNG", "JPEG")
# The pixel cap: an image with more pixels (width x height) than this is refused,
# naming the file, before it is decoded. 50 megapixels holds the photos of today's
# cameras (8688x5792 is 50.3M: crop or shrink those first) and bounds one decode at
# 200 MB (RGBA, 4 bytes a pixel), against 5.3 GB that a 329 KB 13000x13000 16-bit PNG
# took without it. Pillow's own limit (2 x 89,478,485 pixels) still applies above.
MAX_IMAGE_PIXELS = 50_000_000


def pillow_errors():
    """The exception types Pillow raises on a bad file (a function: Pillow is imported
    only once an image is read)."""
    from PIL import Image

    # UnidentifiedImageError and "image file is truncated" are OSErrors; a bad
    # PNG chunk CRC is a SyntaxError; DecompressionBombError is neither.
    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _not_regular_error(path, mode):
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    return CorruptImageError(
        f"{path}: {kind}, not a regular file; image_folder reads only regular PNG/JPEG "
        "files (remove it or rename it without the image extension).")


def check_regular(path):
    """Raises CorruptImageError unless `path` is (a link to) a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CorruptImageError(f"{path}: cannot be read ({e.strerror}).") from None
    if not stat.S_ISREG(mode):
        raise _not_regular_error(path, mode)


def _open_regular(path):
    """`path` opened for reading, refused unless it is a regular file.

    The open is non-blocking and the check is on the open file (`fstat`), so a FIFO
    (which would block a plain open until a writer came) or a file replaced by one
    after the scan is refused at once.

    Raises:
        CorruptImageError: naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CorruptImageError(f"{path}: cannot be read ({e.strerror}).") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular_error(path, mode)
    return os.fdopen(fd, "rb")


def check_max_pixels_value(max_pixels):
    """Raises ValueError unless `max_pixels` is a positive int."""
    if (isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer))
            or max_pixels < 1):
        raise ValueError(f"max_pixels (the image folder's pixel cap) must be a positive "
                         f"int, got max_pixels={max_pixels!r}.")


def _check_pixels(path, size, max_pixels):
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{path}: {width}x{height} is {width * height:,} pixels, above the image "
            f"folder's pixel cap of {max_pixels:,} (the setting "
            f"dataset.max_image_pixels). Shrink the image, or raise the cap if the "
            "memory of decoding it is intended.")


def open_image(path, max_pixels):
    """Opens `path` with Pillow (headers only) after the regular-file check, and
    refuses it above the pixel cap before any pixel is decoded.

    Returns:
        `(file, image)`: close both (the image first).

    Raises:
        CorruptImageError: not a regular file, or not an image Pillow can open.
        ImageTooLargeError: above `max_pixels`, or Pillow's own limit.
    """
    from PIL import Image

    f = _open_regular(path)
    try:
        im = Image.open(f)
    except pillow_errors() as e:
        f.close()
        if isinstance(e, Image.DecompressionBombError):
            raise ImageTooLargeError(f"{path}: refused by Pillow's own pixel limit "
                                     f"({e}).") from e
        raise unreadable_error(path, e) from e
    except BaseException:
        f.close()
        raise
    try:
        _check_pixels(path, im.size, max_pixels)
    except ImageTooLargeError:
        im.close()
        f.close()
        raise
    return f, im


def unreadable_error(path, e):
    """The `CorruptImageError` for the Pillow error `e` on `path`."""
    return CorruptImageError(
        f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e}); "
        "remove or replace the file."
    )


def probe_image(path, max_pixels=MAX_IMAGE_PIXELS):
    """Checks that `path` is a whole PNG or JPEG within the pixel cap without
    decoding it at full size.

    PNG: `verify()` reads every chunk and checks its CRC. JPEG: a draft decode
    at 1/8 scale reads the whole entropy-coded stream, so a truncated file fails
    here, at a fraction of a full decode's cost.

    Returns:
        The image's Pillow mode (e.g. "L", "RGB").

    Raises:
        CorruptImageError: naming the file (not a regular file, unreadable).
        ImageTooLargeError: naming the file and the cap.
    """
    f, im = open_image(path, max_pixels)
    try:
        with f, im:
            fmt, mode, size = im.format, im.mode, im.size
            if fmt == "PNG":
                im.verify()
            elif fmt == "JPEG":
                im.draft(im.mode, (1, 1))
                im.load()
    except pillow_errors() as e:
        raise unreadable_error(path, e) from e
    if fmt not in _IMAGE_FORMATS:
        raise CorruptImageError(
            f"{path}: a {fmt} image under a PNG/JPEG name; image_folder reads only "
            "PNG and JPEG files."
        )
    if min(size) == 0:
        raise CorruptImageError(f"{path}: the image is empty ({size[0]}x{size[1]}).")
    return mode

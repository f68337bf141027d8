"""`dataset.name='image_folder'`: your own PNG/JPEG files, optionally one subfolder per
class, center-cropped and resized, served by tf.data and by the numpy pipeline with
the same pixels, and every way a folder can be wrong reported before any training."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import gin
from keras_progdist import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                              reason="the tf.data pipeline needs TensorFlow")


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


@pytest.fixture
def classes(tmp_path):
    """Two class folders ('cat' -> 0, 'dog' -> 1) of RGB PNGs of assorted sizes and
    shapes, one JPEG, one RGBA and one grayscale PNG, plus files to ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    sizes = {"dog": [(20, 31), (24, 24), (40, 17)], "cat": [(16, 16), (33, 25)]}
    for cls, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            _save(str(root / cls / f"{i}.png"), rng.integers(0, 256, (h, w, 3), np.uint8))
    _save(str(root / "cat" / "deep" / "photo.JPG"),
          rng.integers(0, 256, (30, 22, 3), np.uint8), quality=90)
    _save(str(root / "cat" / "alpha.png"), rng.integers(0, 256, (18, 18, 4), np.uint8))
    _save(str(root / "dog" / "gray.png"), rng.integers(0, 256, (21, 21), np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image")
    _save(str(root / "dog" / ".hidden.png"), np.zeros((4, 4, 3), np.uint8))
    return root


def _epoch(pipeline, **kw):
    ds = data.make_dataset("image_folder", pipeline=pipeline, shuffle=False,
                           repeat=False, drop_remainder=False, **kw)
    batches = [tuple(np.asarray(t) for t in b) if isinstance(b, tuple)
               else (np.asarray(b),) for b in ds]
    return [np.concatenate(parts) for parts in zip(*batches)]


@needs_tf
def test_tf_data_and_numpy_pipelines_serve_the_same_pixels_and_labels(classes):
    kw = dict(data_dir=classes, image_size=16, batch_size=3, with_labels=True)
    x_tf, y_tf = _epoch("tf.data", **kw)
    x_np, y_np = _epoch("numpy", **kw)
    assert x_tf.shape == x_np.shape == (8, 16, 16, 3) and x_np.dtype == np.float32
    # TensorFlow resizes the same Pillow-decoded bytes on both paths (exact); on
    # JAX keras.ops resizes with jax.image (about 2e-6 here).
    np.testing.assert_allclose(x_np, x_tf, atol=1e-5)
    assert x_np.min() >= -1.0 and x_np.max() <= 1.0 and x_np.std() > 0.3
    # Sorted subfolders are the classes; files sorted within each, nested included.
    np.testing.assert_array_equal(y_tf, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(y_np, y_tf)
    images, labels = data.load_images("image_folder", data_dir=classes, image_size=16)
    np.testing.assert_array_equal(labels, y_tf)
    assert np.abs(images - (x_tf + 1.0) * 127.5).max() <= 0.51


@needs_tf
@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_center_crop_then_resize_keeps_only_the_centered_square(tmp_path, pipeline):
    # Landscape 12x21: a bright centered 12x12 square between dark side bands (4 and
    # 5 columns: an odd margin puts the extra column right and below, as
    # tf.image.resize_with_crop_or_pad does), and a portrait 21x12 the other way
    # round; a 2x2 top-left marker inside the square.
    wide = np.zeros((12, 21), np.uint8)
    wide[:, 4:16] = 200
    wide[0:2, 4:6] = 50
    _save(str(tmp_path / "a.png"), wide)
    _save(str(tmp_path / "b.png"), np.ascontiguousarray(wide.T))
    (x,) = _epoch(pipeline, data_dir=tmp_path, image_size=12, batch_size=2)
    assert x.shape == (2, 12, 12, 1)
    expected = np.full((12, 12), 200, np.uint8)
    expected[0:2, 0:2] = 50
    np.testing.assert_array_equal(np.round((x[0, ..., 0] + 1) * 127.5), expected)
    np.testing.assert_array_equal(np.round((x[1, ..., 0] + 1) * 127.5), expected.T)
    (x6,) = _epoch(pipeline, data_dir=tmp_path, image_size=6, batch_size=2)
    assert x6.shape == (2, 6, 6, 1)  # 2x downsampled: the dark bands never get in
    assert x6.min() > (40 / 127.5 - 1)


def test_flat_folder_is_unlabelled_and_channels_follow_the_first_image(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        _save(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (9, 9), np.uint8))
    _save(str(tmp_path / "3.png"), rng.integers(0, 256, (9, 9, 3), np.uint8))
    folder = data.scan_image_folder(tmp_path)
    assert folder.channels == 1 and folder.class_names == () and len(folder.files) == 4
    (x,) = _epoch("numpy", data_dir=tmp_path, image_size=9, batch_size=4)
    assert x.shape == (4, 9, 9, 1)
    (x3,) = _epoch("numpy", data_dir=tmp_path, image_size=9, batch_size=4, channels=3)
    assert x3.shape == (4, 9, 9, 3)
    np.testing.assert_array_equal(x3[:3, ..., 0], x3[:3, ..., 2])  # gray, replicated
    images, labels = data.load_images("image_folder", data_dir=tmp_path, image_size=9)
    assert labels is None and images.shape == (4, 9, 9, 1)
    info = data.dataset_info("image_folder", data_dir=tmp_path)
    assert info["num_classes"] is None and info["channels"] == 1
    assert info["num_examples"] == 4


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    images, _ = data.load_images("image_folder", data_dir=tmp_path, image_size=8)
    np.testing.assert_array_equal(images[0, ..., 0], np.round(ramp / 257.0))


def test_dataset_info_and_gin_for_a_class_folder(classes):
    info = data.dataset_info("image_folder", data_dir=classes)
    assert info["class_names"] == ["cat", "dog"] and info["num_classes"] == 2
    assert info["channels"] == 3 and info["num_examples"] == 8
    try:
        gin.parse_config(f"dataset.name = 'image_folder'\ndataset.data_dir = '{classes}'\n"
                         "dataset.image_size = 8\ndataset.channels = 1\n"
                         "dataset.batch_size = 2\ndataset.pipeline = 'numpy'")
        assert data.batch_spec(data.make_dataset()) == ((8, 8, 1), 2, False)
    finally:
        gin.clear_config()


@needs_tf
def test_input_context_splits_the_files_into_disjoint_halves(classes):
    import tensorflow as tf

    halves = []
    for k in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=k,
                                         num_replicas_in_sync=2)
        ds = data.make_dataset("image_folder", data_dir=classes, image_size=8,
                               batch_size=4, repeat=False, shuffle=False,
                               input_context=ctx)
        halves.append({x.tobytes() for b in ds for x in np.asarray(b)})
    assert len(halves[0]) == len(halves[1]) == 4 and not halves[0] & halves[1]


def _corrupt_png(root):
    _save(str(root / "a.png"), np.zeros((8, 8, 3), np.uint8))
    raw = (root / "a.png").read_bytes()
    (root / "z_broken.png").write_bytes(raw[: len(raw) // 2])


def _truncated_jpeg(root):
    _save(str(root / "a.png"), np.zeros((8, 8, 3), np.uint8))
    _save(str(root / "photo.jpg"),
          np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8), quality=95)
    raw = (root / "photo.jpg").read_bytes()
    (root / "photo.jpg").write_bytes(raw[: len(raw) * 2 // 3])


def _text_named_png(root):
    (root / "fake.png").write_text("hello")


def _only_text(root):
    (root / "readme.txt").write_text("no images here")
    (root / "sub").mkdir()


def _mixed(root):
    _save(str(root / "top.png"), np.zeros((8, 8), np.uint8))
    _save(str(root / "cls" / "in.png"), np.zeros((8, 8), np.uint8))


def _empty_class(root):
    _save(str(root / "a" / "in.png"), np.zeros((8, 8), np.uint8))
    (root / "b").mkdir()


def _flat(root):
    _save(str(root / "in.png"), np.zeros((8, 8), np.uint8))


def _gif(root):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "anim.png", format="GIF")


@pytest.mark.parametrize("pipeline", [
    pytest.param("tf.data", marks=needs_tf), "numpy"])
@pytest.mark.parametrize("make, kwargs, error, match", [
    (None, dict(data_dir=None), ValueError, "needs data_dir"),
    (None, dict(data_dir="MISSING"), FileNotFoundError, r"missing.*does not exist"),
    (_only_text, {}, data.EmptyDatasetError, r"'image_folder' is empty"),
    (_corrupt_png, {}, data.CorruptImageError, r"z_broken\.png: not a readable"),
    (_truncated_jpeg, {}, data.CorruptImageError, r"photo\.jpg: not a readable"),
    (_text_named_png, {}, data.CorruptImageError, r"fake\.png: not a readable"),
    (_gif, {}, data.CorruptImageError, r"anim\.png: a GIF image"),
    (_mixed, {}, ValueError, r"both at its top level \('top\.png'"),
    (_empty_class, {}, ValueError, r"subfolders \['b'\].*hold no"),
    (_flat, dict(with_labels=True), ValueError, "with_labels=True.*no class subfolders"),
    (_flat, dict(image_size=None), ValueError, "set image_size"),
    (_flat, dict(channels=2), ValueError, "channels=2"),
    (_flat, dict(resize="pad"), ValueError, "vary in size"),
])
def test_bad_folders_fail_when_the_dataset_is_built_naming_the_cause(
        tmp_path, pipeline, make, kwargs, error, match):
    root = tmp_path / "missing"
    if make is not None:
        root.mkdir()
        make(root)
    kw = dict(data_dir=root, image_size=8, batch_size=1)
    kw.update(kwargs)
    if kw["data_dir"] == "MISSING":
        kw["data_dir"] = root
    with pytest.raises(error, match=match):
        data.make_dataset("image_folder", pipeline=pipeline, **kw)


def test_empty_folder_is_refused_by_load_images_and_dataset_info(tmp_path):
    with pytest.raises(data.EmptyDatasetError, match="is empty"):
        data.load_images("image_folder", data_dir=tmp_path, image_size=8)
    with pytest.raises(data.EmptyDatasetError, match="is empty"):
        data.dataset_info("image_folder", data_dir=tmp_path)


@pytest.mark.slow
def test_numpy_image_folder_needs_no_tensorflow(classes):
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{os.path.join(REPO, 'tests', 'helpers')!r}, {REPO!r}]
        import no_tensorflow
        from keras_progdist import data
        ds = data.make_dataset("image_folder", data_dir={str(classes)!r}, image_size=8,
                               batch_size=4, with_labels=True)
        x, y = next(iter(ds))
        assert type(ds).__name__ == "ArrayBatches" and x.shape == (4, 8, 8, 3)
        images, labels = data.load_images("image_folder", data_dir={str(classes)!r},
                                          image_size=8)
        assert images.shape == (8, 8, 8, 3) and list(labels) == [0] * 4 + [1] * 4
        assert no_tensorflow.loaded_tensorflow_modules() == []
        print("OK")
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout


# --------------------------------------------- large images, pixel cap, regular files


def _smooth_rgb(side, seed=0):
    """A smooth side x side RGB photo stand-in (gradients and soft waves): small as
    a PNG, like the issue's 12 KB 2000x2000 files, but not constant."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    planes = [127.5 + 120 * np.sin(6 * x + 4 * y + p) for p in phase]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def _write_gray16_png_header_bomb(path, side):
    """A 16-bit grayscale side x side PNG of zeros, written row by row (never held
    in memory): 13000 x 13000 is a 330 KB file that decodes to 338 MB."""
    import struct
    import zlib

    def chunk(tag, payload):
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    deflate, row = zlib.compressobj(6), b"\x00" * (1 + 2 * side)
    idat = b"".join([deflate.compress(row) for _ in range(side)] + [deflate.flush()])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_large_images_are_shrunk_while_decoding_to_a_size_set_by_image_size(tmp_path):
    # The square a decode keeps is below 4x the output side, whatever the source size
    # (this is what bounds memory: before, 2000x2000 squares were stacked as float32),
    # and shrinking first moves the resized pixels by under 1.5 levels of 255.
    from keras_progdist.data.image_folder import decode_square
    from keras_progdist.data.numpy_pipeline import folder_arrays

    photo = _smooth_rgb(1500)
    _save(str(tmp_path / "photo.png"), photo)
    _save(str(tmp_path / "photo.jpg"), photo, quality=95)
    for name in ("photo.png", "photo.jpg"):
        square = decode_square(str(tmp_path / name), 3, size=16)
        assert square.dtype == np.uint8 and 32 <= square.shape[0] < 64, name
        assert square.shape == (square.shape[0], square.shape[0], 3)
    assert decode_square(str(tmp_path / "photo.png"), 3).shape == (1500, 1500, 3)
    import keras

    direct = np.clip(keras.ops.convert_to_numpy(keras.ops.image.resize(
        photo[None].astype(np.float32), (16, 16), interpolation="bilinear",
        antialias=True)), 0, 255)
    shrunk = folder_arrays([str(tmp_path / "photo.png")], 16, 3)
    assert np.abs(shrunk - direct).max() < 1.5
    jpeg = folder_arrays([str(tmp_path / "photo.jpg")], 16, 3)
    assert np.abs(jpeg - direct).max() < 3.0  # JPEG's own loss and 1/8 DCT scaling


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation_is_applied_as_exif_transpose_does_when_shrinking_too(
        tmp_path, fmt):
    # The square is cut from the image as stored and turned upright afterwards (no
    # full-size transposed copy): every orientation gives exif_transpose's pixels.
    from PIL import ImageOps

    from keras_progdist.data.image_folder import decode_square

    # 301x230: an odd margin, so a crop box mapped to the wrong side is one pixel off.
    stored = _smooth_rgb(301, seed=3)[:, :230]  # landscape after 5-8, portrait before
    stored[10:40, 20:60] = (255, 0, 0)  # a marker off the centre lines
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = str(tmp_path / f"o{orientation}.{fmt}")
        Image.fromarray(stored).save(path, exif=exif.tobytes(),
                                     **({"quality": 95} if fmt == "jpg" else {}))
        with Image.open(path) as im:
            upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        h, w = upright.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        expected = upright[top:top + side, left:left + side]
        np.testing.assert_array_equal(decode_square(path, 3), expected,
                                      err_msg=f"orientation {orientation}")
        small = Image.fromarray(expected).resize((16, 16), Image.Resampling.BOX)
        got = decode_square(path, 3, size=8).astype(int)
        assert got.shape == (16, 16, 3)
        # Box filters sample their footprint's edges one-sidedly, so pixels on the
        # marker's sharp edges may differ; a wrong orientation would differ by ~50
        # on average. JPEG decodes at 1/8 scale.
        error = np.abs(got - np.asarray(small)).mean()
        assert error < (1.0 if fmt == "png" else 3.0), (orientation, error)


PEAK_RSS = """
import os, resource, shutil, sys
sys.path.insert(0, {repo!r})
import numpy as np
from keras_progdist import data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images, _ = data.load_images("image_folder", data_dir={folder!r}, image_size=16)
assert images.shape == ({count}, 16, 16, 3), images.shape
print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_loading_a_folder_of_large_pngs_stays_within_a_bounded_memory(tmp_path):
    # 16 RGB PNGs of 2000x2000 (12 MB decoded each) at image_size=16: the peak RSS
    # may grow by one decode plus small squares, not by 16 full-size float32 copies
    # (768 MB; 64 such files passed 10 GB before). benchmarks/image_folder_memory.py
    # measures the 64 files.
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(str(folder / "00.png"), _smooth_rgb(2000))
    count = 16
    for i in range(1, count):
        os.link(folder / "00.png", folder / f"{i:02d}.png")
    script = PEAK_RSS.format(repo=REPO, folder=str(folder), count=count)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = float(result.stdout.split("GROWTH_MB")[-1])
    assert growth < 250, f"peak RSS grew by {growth:.0f} MB"


@pytest.mark.parametrize("pipeline", [pytest.param("tf.data", marks=needs_tf), "numpy"])
def test_an_image_above_the_pixel_cap_is_refused_by_name_before_decoding(tmp_path,
                                                                         pipeline):
    from keras_progdist.data.image_folder import MAX_IMAGE_PIXELS, decode_square

    bomb = tmp_path / "bombs" / "deep.png"
    bomb.parent.mkdir()
    _write_gray16_png_header_bomb(bomb, 13000)
    assert os.path.getsize(bomb) < 400_000
    cap = rf"deep\.png: 13000x13000 is 169,000,000 pixels, above the image folder's " \
          rf"pixel cap of {MAX_IMAGE_PIXELS:,}"
    with pytest.raises(data.ImageTooLargeError, match=cap):
        data.make_dataset("image_folder", data_dir=bomb.parent, image_size=16,
                          batch_size=1, pipeline=pipeline)
    with pytest.raises(data.ImageTooLargeError, match=cap):
        data.load_images("image_folder", data_dir=bomb.parent, image_size=16)
    with pytest.raises(data.ImageTooLargeError, match=cap):  # the decoders check too
        decode_square(str(bomb), 1, size=16)
    # The cap is a setting: a small image above a small cap is refused the same way.
    small = tmp_path / "small"
    _save(str(small / "a.png"), np.zeros((60, 50), np.uint8))
    with pytest.raises(data.ImageTooLargeError, match=r"a\.png: 50x60 is 3,000 pixels.*"
                                                      r"pixel cap of 2,999"):
        data.scan_image_folder(small, max_pixels=2999)
    assert data.scan_image_folder(small, max_pixels=3000).max_pixels == 3000
    with pytest.raises(ValueError, match="max_pixels"):
        data.scan_image_folder(small, max_pixels=0)


def _finishes_within(seconds, fn, fifo):
    """Runs fn() in a thread; if it is still blocked on `fifo` after `seconds`,
    unblocks it (a writer opens and closes the FIFO) and fails the test."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001  handed to the test below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked for {seconds} s opening the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize("where", ["top", "class"])
def test_a_fifo_named_png_is_refused_by_name_not_waited_on(tmp_path, where):
    from keras_progdist.data.image_folder import decode_square

    root = tmp_path / "imgs"
    sub = root / "cat" if where == "class" else root
    _save(str(sub / "a.png"), np.zeros((8, 8, 3), np.uint8))
    fifo = str(sub / "b.png")
    os.mkfifo(fifo)
    for pipeline in (["tf.data"] if importlib.util.find_spec("tensorflow") else []) + [
            "numpy"]:
        with pytest.raises(data.CorruptImageError, match=r"b\.png: a FIFO, not a regular"):
            _finishes_within(20, lambda pipeline=pipeline: data.make_dataset(
                "image_folder", data_dir=root, image_size=8, batch_size=1,
                pipeline=pipeline), fifo)
    # A file replaced by a FIFO after the scan: both pipelines decode with this.
    with pytest.raises(data.CorruptImageError, match=r"b\.png: a FIFO, not a regular"):
        _finishes_within(20, lambda: decode_square(fifo, 3, size=8), fifo)


def test_the_pixel_cap_is_a_dataset_setting(classes):
    # The largest image of the fixture is 33x25 = 825 pixels (40x17 = 680).
    with pytest.raises(data.ImageTooLargeError, match=r"25x33 is 825 pixels, above the "
                       r"image folder's pixel cap of 800 \(the setting "
                       r"dataset.max_image_pixels\)"):
        data.make_dataset("image_folder", data_dir=str(classes), image_size=8,
                          pipeline="numpy", max_image_pixels=800)
    with pytest.raises(data.ImageTooLargeError, match="pixel cap of 800"):
        data.load_images("image_folder", data_dir=str(classes), image_size=8,
                         max_image_pixels=800)
    images, _ = data.load_images("image_folder", data_dir=str(classes), image_size=8,
                                 max_image_pixels=825)
    assert images.shape == (8, 8, 8, 3)

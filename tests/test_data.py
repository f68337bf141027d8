"""Tests for keras_progdist.data on real data: the embedded MNIST digits, real
idx files, and real tfds-format datasets written by tfds' own builders."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import gin
from keras_progdist import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _take(ds, n):
    return [tuple(t.numpy() for t in (b if isinstance(b, tuple) else (b,)))
            for b in ds.take(n)]


def _all(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _as_uint8(x):
    """Inverse of the [-1, 1] scaling; exact for unresized images."""
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def mnist():
    return data.load_images("mnist_embedded")


# ----------------------------------------------------------- embedded MNIST


def test_embedded_set_is_5000_real_digits_500_per_class(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    assert images.min() == 0 and images.max() == 255
    # Real digits: dark background, a few hundred bright pixels.
    assert 0.05 < (images > 127).mean() < 0.3
    info = data.dataset_info("mnist_embedded")
    assert info["image_shape"] == (28, 28, 1) and info["num_classes"] == 10


def test_make_dataset_default_yields_float_batches_in_range():
    x = next(iter(data.make_dataset()))
    assert x.shape == (32, 28, 28, 1) and x.dtype == tf.float32
    assert float(tf.reduce_min(x)) == -1.0 and float(tf.reduce_max(x)) == 1.0


def test_unshuffled_epoch_matches_load_images_with_labels(mnist):
    ds = data.make_dataset(batch_size=100, shuffle=False, repeat=False,
                           with_labels=True)
    x, y = _all(ds)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(_as_uint8(x), mnist[0])
    np.testing.assert_array_equal(y, mnist[1])


def test_shuffled_epoch_is_a_permutation():
    ds = data.make_dataset(batch_size=128, repeat=False, with_labels=True,
                           drop_remainder=False)
    x, y = _all(ds)
    assert x.shape[0] == 5000
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)
    assert not np.array_equal(y, np.sort(y))


def test_same_seed_same_stream_other_seed_other_stream():
    kw = dict(batch_size=16, with_labels=True, random_flip=True)
    a = _take(data.make_dataset(seed=3, **kw), 3)
    b = _take(data.make_dataset(seed=3, **kw), 3)
    c = _take(data.make_dataset(seed=4, **kw), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][1], c[0][1])


def test_random_flip_mirrors_some_images_and_leaves_others(mnist):
    ds = data.make_dataset(batch_size=64, shuffle=False, random_flip=True)
    x = _as_uint8(next(iter(ds)).numpy())
    ref = mnist[0][:64]
    same = np.all(x == ref, axis=(1, 2, 3))
    mirrored = np.all(x == ref[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 10 < mirrored.sum() < 54


def test_pad_is_lossless_with_background_minus_one(mnist):
    ds = data.make_dataset(batch_size=8, image_size=32, resize="pad",
                           shuffle=False)
    x = next(iter(ds)).numpy()
    assert x.shape == (8, 32, 32, 1)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, border] == -1.0)
    np.testing.assert_array_equal(_as_uint8(x[:, 2:30, 2:30]), mnist[0][:8])
    images, _ = data.load_images("mnist_embedded", image_size=32, resize="pad",
                                 limit=8)
    np.testing.assert_array_equal(images[:, 2:30, 2:30], mnist[0][:8])


def test_bilinear_resize_keeps_range_and_mean(mnist):
    x = next(iter(data.make_dataset(batch_size=8, image_size=14, shuffle=False)))
    x = x.numpy()
    assert x.shape == (8, 14, 14, 1)
    assert x.min() >= -1.0 and x.max() <= 1.0
    # Antialiased 2x downsampling averages 2x2 blocks (up to the kernel tails).
    ref = mnist[0][:8].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), ref.mean(axis=(1, 2, 3)),
                               atol=0.02)
    images, _ = data.load_images("mnist_embedded", image_size=14, limit=8)
    # Same preprocessing; the float path only loses the last rounding step.
    diff = np.abs(images.astype(int) - (x + 1) * 127.5)
    assert diff.max() <= 0.51


def test_input_context_gives_disjoint_halves_and_per_replica_batch():
    parts = []
    for k in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=k,
                                         num_replicas_in_sync=2)
        ds = data.make_dataset(batch_size=16, repeat=False, with_labels=True,
                               input_context=ctx)
        assert ds.element_spec[0].shape[0] == 8
        ds = data.make_dataset(batch_size=16, repeat=False, with_labels=True,
                               input_context=ctx, drop_remainder=False)
        parts.append(_all(ds)[0].reshape(-1, 784))
    assert parts[0].shape == parts[1].shape == (2500, 784)
    a = {r.tobytes() for r in parts[0]}
    b = {r.tobytes() for r in parts[1]}
    assert not a & b


def test_gin_configures_make_dataset():
    try:
        gin.parse_config("dataset.batch_size = 4\ndataset.image_size = 16")
        assert next(iter(data.make_dataset())).shape == (4, 16, 16, 1)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mnist"), r"name='mnist'.*allowed: \['cifar10'"),
    (dict(image_size=0), r"image_size=0"),
    (dict(image_size=-3), r"image_size=-3"),
    (dict(resize="nearest"), r"resize='nearest'.*\['bilinear', 'pad'\]"),
    (dict(image_size=16, resize="pad"), r"image_size=16 is smaller than the 28x28"),
    (dict(batch_size=0), r"batch_size=0"),
    (dict(split="test"), r"split='test'.*allowed: \['train'\]"),
    (dict(name="lsun_church", with_labels=True), r"no labels"),
    (dict(name="lsun_church", image_size=256, resize="pad"), r"vary in size"),
    # Validation comes before any file access: a bad size with a missing folder.
    (dict(name="fashion_mnist", data_dir="/nonexistent", image_size=0),
     r"image_size=0"),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.make_dataset(**kwargs)


def test_load_images_rejects_bad_arguments():
    with pytest.raises(ValueError, match="allowed"):
        data.load_images("imagenet")
    with pytest.raises(ValueError, match="limit=-1"):
        data.load_images("mnist_embedded", limit=-1)


# --------------------------------------------------------- idx / Fashion-MNIST


def _write_idx(path, array):
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def idx_dir(tmp_path, mnist):
    images, labels = mnist
    train = np.arange(0, 5000, 125)   # 40 digits, all classes
    test = np.arange(7, 5000, 250)    # 20 other digits
    for prefix, idx in (("train", train), ("t10k", test)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[idx, :, :, 0])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[idx])
    return tmp_path, images[train], labels[train], images[test], labels[test]


def test_idx_files_round_trip_through_both_readers(idx_dir):
    folder, x_train, y_train, x_test, y_test = idx_dir
    images, labels = data.load_images("fashion_mnist", data_dir=folder)
    np.testing.assert_array_equal(images, x_train)
    np.testing.assert_array_equal(labels, y_train)
    ds = data.make_dataset("fashion_mnist", split="test", data_dir=str(folder),
                           batch_size=5, shuffle=False, repeat=False,
                           with_labels=True)
    x, y = _all(ds)
    np.testing.assert_array_equal(_as_uint8(x), x_test)
    np.testing.assert_array_equal(y, y_test)


def test_truncated_gzip_names_the_file(idx_dir):
    folder = idx_dir[0]
    path = folder / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.IdxFormatError, match="train-images-idx3-ubyte.gz.*truncated"):
        data.load_images("fashion_mnist", data_dir=folder)


def test_short_payload_and_bad_magic_name_the_file(tmp_path):
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + bytes(700))
    with pytest.raises(data.IdxFormatError, match=r"short\.gz.*\(10, 28, 28\).*truncated"):
        data.read_idx(short)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 4) + bytes(16))
    with pytest.raises(data.IdxFormatError, match=r"bad\.gz.*magic number 0x00000d01"):
        data.read_idx(bad)
    labels_as_images = tmp_path / "labels.gz"
    _write_idx(labels_as_images, np.arange(5))
    with pytest.raises(data.IdxFormatError, match="1 dimensions, expected 3"):
        data.read_idx(labels_as_images, expected_ndim=3)


def test_missing_fashion_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        data.make_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks \['train-labels-idx1-ubyte.gz'\]"
                       r".*fetch_fashion_mnist.sh"):
        data.load_images("fashion_mnist", data_dir=tmp_path)


_REAL_FASHION = [d for d in (data.FASHION_MNIST_DEFAULT_DIR,
                             os.path.join(REPO, ".data", "fashion-mnist"))
                 if os.path.isfile(os.path.join(d, "t10k-images-idx3-ubyte.gz"))]


@pytest.mark.skipif(not _REAL_FASHION, reason="Fashion-MNIST not installed "
                    "(apt-get install dataset-fashion-mnist, or "
                    "bash benchmarks/fetch_fashion_mnist.sh)")
def test_real_fashion_mnist_files():
    folder = _REAL_FASHION[0]
    train = data.read_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), 1)
    np.testing.assert_array_equal(np.bincount(train), [6000] * 10)
    images, labels = data.load_images("fashion_mnist", split="test", data_dir=folder)
    assert images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    x = next(iter(data.make_dataset("fashion_mnist", data_dir=folder, image_size=32,
                                    resize="pad", batch_size=16)))
    assert x.shape == (16, 32, 32, 1)
    assert float(tf.reduce_min(x)) == -1.0 and float(tf.reduce_max(x)) <= 1.0


# ------------------------------------------------------------------ tfds data


def _rgb(images, size):
    """Real digits as RGB images of the given side, for tfds builders."""
    x = tf.image.resize(tf.cast(images, tf.float32), (size, size), antialias=True)
    x = tf.cast(tf.round(tf.clip_by_value(x, 0, 255)), tf.uint8).numpy()
    return np.repeat(x, 3, axis=-1)


def _tiny_builder(tfds_name, splits):
    """The real tfds builder class, generating `splits` instead of downloading.

    The subclass keeps the real name, version and features, so what lands on
    disk is what the real builder would write and the real builder reads it.
    """
    base = tfds.builder_cls(tfds_name.split("/")[0])

    class Tiny(base, skip_registration=True):
        name = base.name

        def _split_generators(self, dl_manager):
            return {split: self._examples(split, *xy) for split, xy in splits.items()}

        def _examples(self, split, images, labels):
            for i, (image, label) in enumerate(zip(images, labels)):
                example = {"image": image}
                if "label" in self.info.features:
                    example["label"] = int(label)
                if "id" in self.info.features:
                    example["id"] = f"{split}_{i:05d}"
                yield f"{split}_{i}", example

    return Tiny


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, mnist):
    images, labels = mnist
    root = tmp_path_factory.mktemp("tfds")
    train, test = np.arange(0, 5000, 125), np.arange(3, 5000, 250)
    cifar = {"train": (_rgb(images[train], 32), labels[train]),
             "test": (_rgb(images[test], 32), labels[test])}
    builder = _tiny_builder("cifar10", cifar)(data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    imagenet = {"train": (_rgb(images[train[:20]], 64), labels[train[:20]]),
                "validation": (_rgb(images[test[:10]], 64), labels[test[:10]])}
    builder = _tiny_builder("imagenet_resized", imagenet)(
        config="64x64", data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    # LSUN: landscape JPEGs whose centered square is bright and whose side
    # bands are dark, so the center crop is visible in the output.
    wide = np.zeros((6, 48, 80, 3), np.uint8)
    wide[:, :, 16:64] = 200
    lsun = {"train": (wide, [0] * 6), "validation": (wide[:2], [0] * 2)}
    builder = _tiny_builder("lsun", lsun)(config="church_outdoor", data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root, cifar, imagenet


def _pairs(x_uint8, y):
    return sorted((img.tobytes(), int(label)) for img, label in zip(x_uint8, y))


def test_tfds_files_are_real_tfds_format(tfds_dir):
    root = tfds_dir[0]
    builder = tfds.builder("cifar10", data_dir=str(root))
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 40
    assert os.path.isdir(root / "cifar10" / str(builder.version))


def test_cifar10_pipeline_reads_the_images_and_labels(tfds_dir):
    root, cifar, _ = tfds_dir
    ds = data.make_dataset("cifar10", split="test", data_dir=root, batch_size=4,
                           shuffle=False, repeat=False, with_labels=True)
    assert ds.element_spec[0].shape == (4, 32, 32, 3)
    x, y = _all(ds)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    assert y.dtype == np.int32
    assert _pairs(_as_uint8(x), y) == _pairs(*cifar["test"])
    images, labels = data.load_images("cifar10", split="train", data_dir=root)
    assert _pairs(images, labels) == _pairs(*cifar["train"])


def test_cifar10_shuffled_stream_is_deterministic_with_flips(tfds_dir):
    root = tfds_dir[0]
    kw = dict(name="cifar10", data_dir=root, batch_size=8, with_labels=True,
              random_flip=True, seed=1)
    a, b = _take(data.make_dataset(**kw), 6), _take(data.make_dataset(**kw), 6)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_cifar10_input_context_gives_disjoint_halves(tfds_dir):
    root, cifar, _ = tfds_dir
    halves = []
    for k in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=k,
                                         num_replicas_in_sync=2)
        ds = data.make_dataset("cifar10", data_dir=root, batch_size=8, repeat=False,
                               with_labels=True, input_context=ctx)
        assert ds.element_spec[0].shape == (4, 32, 32, 3)
        x, y = _all(ds)
        halves.append(_pairs(_as_uint8(x), y))
    assert len(halves[0]) == len(halves[1]) == 20
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == _pairs(*cifar["train"])


def test_imagenet64_pipeline_with_labels_and_resize(tfds_dir):
    root, _, imagenet = tfds_dir
    assert data.dataset_info("imagenet64")["num_classes"] == 1000
    ds = data.make_dataset("imagenet64", split="validation", data_dir=root,
                           batch_size=5, shuffle=False, repeat=False,
                           with_labels=True)
    x, y = _all(ds)
    assert x.shape == (10, 64, 64, 3)
    assert _pairs(_as_uint8(x), y) == _pairs(*imagenet["validation"])
    x32 = next(iter(data.make_dataset("imagenet64", data_dir=root, image_size=32,
                                      batch_size=4)))
    assert x32.shape == (4, 32, 32, 3)


def test_lsun_is_center_cropped_and_resized_to_128(tfds_dir):
    root = tfds_dir[0]
    x = next(iter(data.make_dataset("lsun_church", data_dir=root, batch_size=3)))
    assert x.shape == (3, 128, 128, 3)
    # Only the bright centered 48x48 square survives the crop (JPEG: ~1 level).
    np.testing.assert_allclose(x.numpy(), 200 / 127.5 - 1.0, atol=0.03)
    images, labels = data.load_images("lsun_church", split="validation",
                                      data_dir=root, image_size=64)
    assert images.shape == (2, 64, 64, 3) and labels is None


def test_unprepared_tfds_data_dir_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"not prepared in data_dir=.*cifar10/3\.0\.2.*"
                             r"Downloads are impossible"):
        data.make_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_dataset("lsun_church", data_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError,
                       match=r"manual_dir=.*lacks \['Imagenet64_train_part1_npz.zip'"):
        data.make_dataset("imagenet64", data_dir=tmp_path, manual_dir=tmp_path)


# ------------------------------------------------- decompression bombs, empty data


def _gzip_stream(path, header, payload_mib):
    """A gzip file of `header` then `payload_mib` MiB of zeros, written in pieces
    (so making it takes no memory either): about 1 KiB on disk per MiB inflated."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(comp.compress(header))
        for _ in range(payload_mib):
            f.write(comp.compress(zeros))
        f.write(comp.flush())


def _peak_traced_bytes(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_gzip_bomb_with_small_header_fails_fast_in_little_memory(tmp_path):
    # Declares one 28x28 image, inflates to 256 MiB: the old reader inflated it all
    # (and a 2 GiB one took 19 s and 4 GiB of memory) before seeing the mismatch.
    bomb = tmp_path / "bomb-images-idx3-ubyte.gz"
    _gzip_stream(bomb, bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 28, 28), 256)
    assert bomb.stat().st_size < 1 << 20

    def read():
        with pytest.raises(data.IdxFormatError,
                           match=r"bomb-images-idx3-ubyte\.gz.*trailing bytes"):
            data.read_idx(bomb)

    assert _peak_traced_bytes(read) < 8 << 20


def test_header_declaring_gigabytes_is_refused_before_reading(tmp_path):
    # 2^31 images of 28x28 (1.7 TB declared) in a file of a few bytes.
    huge = tmp_path / "huge-images-idx3-ubyte.gz"
    _gzip_stream(huge, bytes([0, 0, 8, 3]) + struct.pack(">3I", 1 << 31, 28, 28), 4)

    def read():
        with pytest.raises(data.IdxFormatError,
                           match=r"huge-images-idx3-ubyte\.gz.*1683627180032 data bytes"
                                 r".*more than the 1073741824 allowed"):
            data.read_idx(huge)

    assert _peak_traced_bytes(read) < 8 << 20
    # Four uint32 dimensions overflow int64 products; Python ints do not.
    dims = tmp_path / "dims.idx"
    dims.write_bytes(bytes([0, 0, 8, 4]) + struct.pack(">4I", *[0xFFFFFFFF] * 4))
    with pytest.raises(data.IdxFormatError, match="more than the"):
        data.read_idx(dims)


def test_max_bytes_is_a_bound_and_plain_files_read_the_same(tmp_path):
    labels = np.arange(200, dtype=np.uint8) % 10
    gz = tmp_path / "labels.gz"
    _write_idx(gz, labels)
    np.testing.assert_array_equal(data.read_idx(gz, 1), labels)
    with pytest.raises(data.IdxFormatError, match=r"200 data bytes, more than the 100"):
        data.read_idx(gz, max_bytes=100)
    plain = tmp_path / "labels.idx"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(data.read_idx(plain, 1), labels)
    plain.write_bytes(plain.read_bytes() + b"\0")
    with pytest.raises(data.IdxFormatError, match=r"labels\.idx.*trailing bytes"):
        data.read_idx(plain)
    plain.write_bytes(bytes([0, 0, 8]))
    with pytest.raises(data.IdxFormatError, match=r"3 bytes where the idx header needs 4"):
        data.read_idx(plain)


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_idx_with_zero_items_is_refused_as_empty(tmp_path, pipeline):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((0,)))
    with pytest.raises(data.EmptyDatasetError,
                       match=r"'fashion_mnist' split 'train' is empty: 0 examples"):
        data.make_dataset("fashion_mnist", data_dir=tmp_path, pipeline=pipeline,
                          batch_size=1)


def test_empty_tfds_split_is_refused(tfds_dir):
    with pytest.raises(data.EmptyDatasetError, match=r"'cifar10' split 'train\[:0\]' is empty"):
        data.make_dataset("cifar10", split="train[:0]", data_dir=tfds_dir[0])


def test_input_pipeline_left_without_examples_is_refused(idx_dir):
    ctx = tf.distribute.InputContext(num_input_pipelines=64, input_pipeline_id=50,
                                     num_replicas_in_sync=64)
    with pytest.raises(data.EmptyDatasetError, match="pipeline 50: its 40 examples"):
        data.make_dataset("fashion_mnist", data_dir=idx_dir[0], batch_size=64,
                          input_context=ctx)

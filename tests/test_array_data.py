"""The TensorFlow-free numpy input pipeline (`pipeline="numpy"`): the same images as
tf.data, a reproducible shuffled stream, shards. (A teacher and a distillation stage on
JAX in processes where TensorFlow cannot be imported, the GPU host's situation:
test_preemption.py on JAX.)"""


import numpy as np
import pytest

from keras_progdist import data
from keras_progdist.data.numpy_pipeline import ArrayBatches


def _first_batch(pipeline, **kw):
    batch = next(iter(data.make_dataset(shuffle=False, repeat=False, with_labels=True,
                                        pipeline=pipeline, **kw)))
    return tuple(np.asarray(t) for t in batch)


@pytest.mark.tensorflow_only
def test_numpy_pipeline_pads_exactly_like_tf_data():
    x_np, y_np = _first_batch("numpy", batch_size=64, image_size=32, resize="pad")
    x_tf, y_tf = _first_batch("tf.data", batch_size=64, image_size=32, resize="pad")
    assert x_np.shape == (64, 32, 32, 1) and x_np.dtype == np.float32
    np.testing.assert_array_equal(x_np, x_tf)
    np.testing.assert_array_equal(y_np, y_tf)


@pytest.mark.tensorflow_only
def test_numpy_pipeline_resizes_like_tf_data():
    x_np, _ = _first_batch("numpy", batch_size=64, image_size=14)
    x_tf, _ = _first_batch("tf.data", batch_size=64, image_size=14)
    np.testing.assert_allclose(x_np, x_tf, atol=1e-5)
    images, _ = data.load_images("mnist_embedded", image_size=14, limit=64)
    # load_images rounds the same resize to uint8 (float rounding may tip a .5 tie).
    assert np.abs(images.astype(int) - (x_tf + 1) * 127.5).max() <= 0.51


def _coded(n):
    """n images whose pixel [0, 0] is their index."""
    x = np.zeros((n, 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    return x, np.arange(n, dtype=np.int32) % 3


def _ids(batch):
    return batch[0][:, 0, 0, 0].astype(int).tolist()


def test_every_epoch_is_a_fresh_permutation_of_whole_batches():
    x, y = _coded(10)
    stream = ArrayBatches(x, y, batch_size=4, seed=7).stream()
    epochs = [sum((_ids(next(stream)) for _ in range(2)), []) for _ in range(3)]
    for ids in epochs:  # 10 // 4 = 2 whole batches an epoch, none straddles two
        assert len(set(ids)) == 8 and set(ids) <= set(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    again = ArrayBatches(x, y, batch_size=4, seed=7).stream()
    assert sum((_ids(next(again)) for _ in range(2)), []) == epochs[0]
    other = ArrayBatches(x, y, batch_size=4, seed=8).stream()
    assert sum((_ids(next(other)) for _ in range(2)), []) != epochs[0]


def test_unshuffled_single_epoch_keeps_order_labels_and_last_batch():
    x, y = _coded(10)
    batches = list(ArrayBatches(x, y, batch_size=4, shuffle=False, repeat=False,
                                with_labels=True, drop_remainder=False))
    assert [_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    unlabelled = next(iter(ArrayBatches(x, None, batch_size=4)))
    assert isinstance(unlabelled, tuple) and len(unlabelled) == 1


def test_random_flip_mirrors_about_half_the_images():
    x = np.zeros((1000, 2, 2, 1), np.float32)
    x[:, :, 1] = 1.0  # left column 0, right column 1
    (batch,) = next(iter(ArrayBatches(x, None, batch_size=1000, random_flip=True)))
    flipped = batch[:, 0, 0, 0] == 1.0
    np.testing.assert_array_equal(batch[flipped], x[:1][:, :, ::-1].repeat(flipped.sum(), 0))
    np.testing.assert_array_equal(batch[~flipped], x[~flipped])
    assert 400 < flipped.sum() < 600


def test_shards_are_disjoint_and_cover_the_data():
    x, y = _coded(10)
    parts = [ArrayBatches(x, y, batch_size=5, shuffle=False, repeat=False,
                          shard=(k, 2)) for k in range(2)]
    ids = [_ids(next(iter(p))) for p in parts]
    assert ids == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline="pandas"), "Unknown pipeline"),
    (dict(name="cifar10", pipeline="numpy"), "needs TensorFlow"),
    (dict(batch_size=6000, pipeline="numpy"), "larger than the 5000 examples"),
])
def test_numpy_pipeline_rejects_what_it_cannot_serve(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.make_dataset(**kwargs)


# ------------------------------------------------------ multi-process sharding, empty


def _epoch_ids(batches):
    return sorted(sum((_ids(b) for b in batches), []))


@pytest.mark.parametrize("n", [12, 13, 14])
@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_cover_the_data_and_run_in_step(count, n):
    x, y = _coded(n)
    parts = [ArrayBatches(x, y, batch_size=1, seed=5, repeat=False, with_labels=True,
                          shard=(k, count)) for k in range(count)]
    held = [set(p.images[:, 0, 0, 0].astype(int)) for p in parts]
    assert set().union(*held) == set(range(n))                       # covering
    assert sum(len(h) for h in held) == n                             # disjoint
    for k, p in enumerate(parts):
        assert held[k] == set(range(k, n, count))
        np.testing.assert_array_equal(p.labels, y[k::count])          # labels follow
    epochs = [list(p) for p in parts]
    # Every process: the same number of batches of the same shape in an epoch (a
    # process that stopped early would leave the others waiting in a collective).
    assert [len(e) for e in epochs] == [n // count] * count
    assert {b[0].shape for e in epochs for b in e} == {(1, 2, 2, 1)}
    seen = [_epoch_ids(e) for e in epochs]
    assert not set(seen[0]) & set(seen[1])
    # Shuffled epochs leave out a different example of a larger shard each time.
    stream = ArrayBatches(x, y, batch_size=1, seed=5, shard=(0, count)).stream()
    m = n // count
    visited = {i for _ in range(20 * m) for i in _ids(next(stream))}
    assert visited == held[0]


def test_single_process_stream_is_unchanged_by_sharding_support():
    # One process: shard (0, 1) and the default give today's stream exactly.
    x, y = _coded(10)
    a = ArrayBatches(x, y, batch_size=3, seed=2).stream()
    b = ArrayBatches(x, y, batch_size=3, seed=2, shard=(0, 1)).stream()
    rng = np.random.default_rng([2, 0])
    first = rng.permutation(10)[:3].tolist()
    assert _ids(next(a)) == _ids(next(b)) == first


def test_presharded_images_are_not_sliced_again():
    x, y = _coded(7)
    whole = ArrayBatches(x, y, batch_size=2, shuffle=False, repeat=False, shard=(1, 3))
    part = ArrayBatches(x[1::3], y[1::3], batch_size=2, shuffle=False, repeat=False,
                        shard=(1, 3), total_examples=7)
    assert [_ids(b) for b in whole] == [_ids(b) for b in part] == [[1, 4]]
    with pytest.raises(ValueError, match=r"shard \(1, 3\) of 7 examples has 2"):
        ArrayBatches(x, y, batch_size=2, shard=(1, 3), total_examples=7)


def _fake_jax_processes(monkeypatch, index, count):
    """Pretend to be process `index` of `count` of a multi-host JAX job: the one
    thing that cannot run here is a real multi-process JAX runtime."""
    import jax
    import keras

    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_default_shard_is_the_jax_process(monkeypatch):
    from keras_progdist.data import numpy_pipeline

    x, y = _coded(10)
    _fake_jax_processes(monkeypatch, 1, 2)
    assert numpy_pipeline.default_shard() == (1, 2)
    batches = ArrayBatches(x, y, batch_size=5, shuffle=False, repeat=False)
    assert batches.shard == (1, 2)
    assert [_ids(b) for b in batches] == [[1, 3, 5, 7, 9]]
    # make_dataset's batch_size is the global batch: each process yields its part.
    ds = data.make_dataset(batch_size=16, pipeline="numpy", shuffle=False,
                           with_labels=True)
    mnist, labels = data.load_images("mnist_embedded")
    x0, y0 = next(iter(ds))
    assert ds.shard == (1, 2) and ds.num_examples == 2500 and x0.shape[0] == 8
    np.testing.assert_array_equal(np.round((x0 + 1) * 127.5), mnist[1:16:2])
    np.testing.assert_array_equal(y0, labels[1:16:2])
    with pytest.raises(ValueError, match="batch_size=15 is the global batch.*2 JAX"):
        data.make_dataset(batch_size=15, pipeline="numpy")


def test_default_shard_is_whole_data_off_jax_or_on_one_process(monkeypatch):
    import jax
    import keras

    from keras_progdist.data import numpy_pipeline

    monkeypatch.setattr(keras.config, "backend", lambda: "tensorflow")
    monkeypatch.setattr(jax, "process_count", lambda: 4)  # must not be asked
    assert numpy_pipeline.default_shard() == (0, 1)
    _fake_jax_processes(monkeypatch, 0, 1)
    assert numpy_pipeline.default_shard() == (0, 1)


def test_empty_data_and_empty_shards_are_refused():
    from keras_progdist.data.errors import EmptyDatasetError

    x, y = _coded(0)
    with pytest.raises(EmptyDatasetError, match=r"dataset is empty \(0 examples\)"):
        ArrayBatches(x, y, batch_size=1)
    x, y = _coded(2)
    with pytest.raises(EmptyDatasetError, match="2 examples split over 3 processes"):
        ArrayBatches(x, y, batch_size=1, shard=(0, 3))
    with pytest.raises(ValueError, match="0 <= index < count"):
        ArrayBatches(x, y, batch_size=1, shard=(3, 3))

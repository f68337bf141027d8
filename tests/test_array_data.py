"""The TensorFlow-free numpy input pipeline (`pipeline="numpy"`): the same images as
tf.data, a reproducible shuffled stream, and a whole teacher + distillation run on
JAX in a process where TensorFlow cannot be imported (the GPU host's situation)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_progdist import data
from keras_progdist.array_data import ArrayBatches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.slow
def test_teacher_and_distillation_run_on_jax_without_tensorflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{os.path.join(REPO, 'tests', 'helpers')!r}, {REPO!r}]
        import no_tensorflow
        import gin
        import numpy as np
        from keras_progdist import checkpoint, data, pipeline
        gin.parse_config_files_and_bindings(
            [{os.path.join(REPO, 'gin', 'tiny.gin')!r}],
            ["teacher.train_steps=20", "teacher.checkpoint_every=10",
             "distill.teacher_steps=2", "distill.updates_per_stage=10",
             "distill.checkpoint_every=10"])
        experiment = pipeline.run({str(tmp_path)!r}, mode="train_teacher", verbose=0)
        assert type(experiment.dataset).__name__ == "ArrayBatches"
        pipeline.run({str(tmp_path)!r}, mode="distill", verbose=0)
        real, _ = data.load_images("mnist_embedded", image_size=16, limit=8)
        assert real.shape == (8, 16, 16, 1)
        assert no_tensorflow.loaded_tensorflow_modules() == []
        print("STAGES", [s["num_steps"] for s in experiment.finished_stages()])
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "STAGES [2, 1]" in result.stdout
    assert "input ArrayBatches" in result.stdout
    assert (tmp_path / "student_00001" / "final.json").exists()

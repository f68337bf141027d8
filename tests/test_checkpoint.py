"""Checkpoints survive a kill at any point of a save: the JSON always describes
weights that exist and match their sha256."""

import os

import keras
import numpy as np
import pytest

from keras_progdist import checkpoint


def _model(value):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for w in model.weights:
        w.assign(np.full(w.shape, value, "float32"))
    return model


def _values(model):
    return [np.asarray(w.numpy()) for w in model.weights]


def test_a_kill_between_the_weights_and_the_json_keeps_the_old_checkpoint(
        tmp_path, monkeypatch):
    directory = str(tmp_path)
    checkpoint.save(directory, "ckpt", _model(1.0), meta={"step": 10})

    def killed(path, text):  # the process dies right before the JSON is replaced
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.fileio, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(directory, "ckpt", _model(2.0), meta={"step": 20})
    monkeypatch.undo()
    # The new weights are on disk, yet the checkpoint is still the old one, intact.
    assert len([f for f in os.listdir(directory) if f.endswith(".npz")]) == 2
    restored = _model(0.0)
    assert checkpoint.restore(directory, "ckpt", restored) == {"step": 10}
    for value in _values(restored):
        np.testing.assert_array_equal(value, 1.0)
    # The next save replaces it and removes every unreferenced weights file.
    checkpoint.save(directory, "ckpt", _model(3.0), meta={"step": 30})
    assert [f for f in os.listdir(directory) if f.endswith(".npz")] == [
        os.path.basename(checkpoint.weights_path(directory, "ckpt"))]
    assert checkpoint.restore(directory, "ckpt", restored) == {"step": 30}
    np.testing.assert_array_equal(_values(restored)[0], 3.0)


def test_a_half_written_weights_file_is_ignored_and_cleaned(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(directory, "final", _model(1.0))
    with open(os.path.join(directory, "final.npz.tmp-999"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    assert checkpoint.read_meta(directory, "final") == {}
    checkpoint.save(directory, "final", _model(2.0))
    assert not os.path.exists(os.path.join(directory, "final.npz.tmp-999"))


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(directory, "final", _model(4.0), meta={"step": 1})
    # Rewrite it as the previous format: `<name>.npz` and no `weights_file` entry.
    import json

    path = os.path.join(directory, "final.json")
    with open(path) as f:
        record = json.load(f)
    os.rename(os.path.join(directory, record.pop("weights_file")),
              os.path.join(directory, "final.npz"))
    with open(path, "w") as f:
        json.dump(record, f)
    restored = _model(0.0)
    assert checkpoint.restore(directory, "final", restored) == {"step": 1}
    np.testing.assert_array_equal(_values(restored)[0], 4.0)
    checkpoint.save(directory, "final", _model(5.0))
    assert not os.path.exists(os.path.join(directory, "final.npz"))

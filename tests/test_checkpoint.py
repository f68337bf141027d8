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


def _rewrite_record(directory, name, change):
    import json

    path = os.path.join(directory, f"{name}.json")
    with open(path) as f:
        record = json.load(f)
    change(record)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


@pytest.mark.parametrize("weights_file", ["../outside/x.npz", "/tmp/x.npz",
                                          "sub/x.npz", ".."])
def test_a_weights_file_outside_the_checkpoint_folder_is_refused(tmp_path, weights_file):
    directory = str(tmp_path / "stage")
    checkpoint.save(directory, "final", _model(1.0))
    # The same (valid) weights, placed where a traversing name would point.
    outside = tmp_path / "outside"
    outside.mkdir()
    real = checkpoint.weights_path(directory, "final")
    os.link(real, outside / "x.npz")

    def point_outside(record):
        record["weights_file"] = weights_file

    _rewrite_record(directory, "final", point_outside)
    with pytest.raises(checkpoint.CheckpointError, match="only a plain .npz file name"):
        checkpoint.restore(directory, "final", _model(0.0))


@pytest.mark.parametrize("key", ["shapes", "paths", "sha256"])
def test_a_record_missing_a_key_names_the_file_and_the_key(tmp_path, key):
    directory = str(tmp_path)
    checkpoint.save(directory, "ckpt", _model(1.0), meta={"step": 3})
    path = _rewrite_record(directory, "ckpt", lambda record: record.pop(key))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.read_meta(directory, "ckpt")
    assert path in str(info.value) and repr(key) in str(info.value)


def test_a_corrupt_final_says_the_one_action_that_recovers(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(directory, "final", _model(1.0))
    weights = checkpoint.weights_path(directory, "final")
    with open(weights, "r+b") as f:  # flip one bit in the middle
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.read_meta(directory, "final")
    message = str(info.value)
    json_path = os.path.join(directory, "final.json")
    assert f"Delete {json_path}" in message
    # Doing what it says works: the stage is simply not finished any more, and the
    # next save of it removes the damaged weights file.
    os.remove(json_path)
    assert not checkpoint.exists(directory, "final")
    checkpoint.save(directory, "final", _model(2.0))
    assert not os.path.exists(weights)
    np.testing.assert_array_equal(_values(_restored(directory))[0], 2.0)


def _restored(directory):
    model = _model(0.0)
    checkpoint.restore(directory, "final", model)
    return model


def test_cleanup_removes_dead_writers_temporaries_only(tmp_path):
    import subprocess
    import sys

    directory = str(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(directory, f"ckpt.npz.tmp-{dead.pid}-deadbeef")
    live = os.path.join(directory, f"ckpt.npz.tmp-{os.getppid()}-cafe")
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"half written")
    checkpoint.save(directory, "ckpt", _model(1.0))
    assert not os.path.exists(stale)
    assert os.path.exists(live), "another live process's temporary must stay"


def test_a_model_with_other_variable_names_is_refused(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(directory, "final", _model(1.0))

    def rename(record):
        record["paths"] = [p.replace("kernel", "other") for p in record["paths"]]

    _rewrite_record(directory, "final", rename)
    with pytest.raises(checkpoint.CheckpointError, match="other names"):
        checkpoint.restore(directory, "final", _model(0.0))

"""Every bad setting of `bin/run.py`: exit 1, exactly one `error: ...` line on stderr, no
traceback, and no work directory created (nor anything written into an existing one).

The first group is refused before Keras is imported (`bin/preflight.py`), in well under
a second of work: those tests run `bin/run.py` where importing Keras fails, so only a
refusal before the import passes. The second needs the library's own checks (gin, data,
U-Net, bounds), which run after the import and before the lock, so before anything is
created; each costs a Keras and TensorFlow import, so they are marked slow (the same
checks run in process, without the command line, in `test_pipeline.py`). The last group
damages checkpoint records and weights files and reads them with the library.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.pipeline_runs import ROOT, SMALL, env

RUN = os.path.join(ROOT, "bin", "run.py")


def _run(args, workdir, mode="train_teacher", before_keras=False):
    """`bin/run.py` with `args`; with `before_keras`, in an environment where importing
    Keras fails (an unknown backend), so only a refusal before that import passes."""
    command = [sys.executable, RUN, f"--workdir={workdir}", f"--mode={mode}",
               "--verbose=0", *args]
    environment = {**env(), "KERAS_BACKEND": "no_such_backend"} if before_keras else env()
    return subprocess.run(command, capture_output=True, text=True, env=environment,
                          timeout=600)


def _assert_one_error_line(result, *expected):
    """Exit 1, one `error:` line on stderr that contains every `expected` text, no
    traceback anywhere, and no flag help."""
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, output
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    assert "--gin_param" not in result.stderr.replace(errors[0], ""), output  # no help
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _tiny(*bindings):
    return ["--gin_file=tiny.gin", *[f"--gin_param={b}" for b in SMALL + list(bindings)]]


# -- refused before any import -----------------------------------------------------------
def test_unknown_gin_file_suggests_the_closest(tmp_path):
    workdir = tmp_path / "run"
    result = _run(["--gin_file=tiny_typo.gin"], workdir, before_keras=True)
    _assert_one_error_line(result, "tiny_typo.gin", "Did you mean 'tiny.gin'?")
    assert not workdir.exists()


def test_gin_include_loop(tmp_path):
    (tmp_path / "a.gin").write_text("include 'b.gin'\n")
    (tmp_path / "b.gin").write_text("include 'a.gin'\n")
    workdir = tmp_path / "run"
    result = _run([f"--gin_file={tmp_path / 'a.gin'}"], workdir, before_keras=True)
    _assert_one_error_line(result, "include loop: a.gin -> b.gin -> a.gin")
    assert not workdir.exists()


def test_include_that_is_nowhere(tmp_path):
    (tmp_path / "mine.gin").write_text("include 'not_there.gin'\n")
    workdir = tmp_path / "run"
    result = _run([f"--gin_file={tmp_path / 'mine.gin'}"], workdir, before_keras=True)
    _assert_one_error_line(result, "include 'not_there.gin' found neither")
    assert not workdir.exists()


def test_import_in_a_binding_is_refused_and_not_run(tmp_path):
    workdir = tmp_path / "run"
    result = _run(["--gin_file=tiny.gin", "--gin_param=import this"], workdir,
                  before_keras=True)
    _assert_one_error_line(result, "imports are not allowed in bindings")
    assert "Zen of Python" not in result.stdout + result.stderr
    assert not workdir.exists()


def test_export_dir_that_is_a_file(tmp_path):
    export_dir = tmp_path / "exports"
    export_dir.write_text("not a folder")
    workdir = tmp_path / "run"
    result = _run(["--gin_file=tiny.gin", f"--export_dir={export_dir}"], workdir,
                  mode="all", before_keras=True)
    _assert_one_error_line(result, "--export_dir", "is a file, not a folder")
    assert not workdir.exists()


def _read_only_folder(path):
    """`path` as a folder no process can write in: a read-only tmpfs for root (which
    ignores permission bits), permissions 0555 for anyone else."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("root without the right to mount a read-only file system")
    return lambda: subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("mode", ["distill", "eval"])
def test_read_only_workdir(tmp_path, mode):
    workdir = tmp_path / "run"
    restore = _read_only_folder(workdir)
    try:
        result = _run(["--gin_file=tiny.gin"], workdir, mode=mode, before_keras=True)
        _assert_one_error_line(result, "cannot write in", "Read-only file system"
                               if os.geteuid() == 0 else "Permission denied")
        assert os.listdir(workdir) == []
    finally:
        restore()


def test_busy_workdir_is_refused_before_keras_is_imported(tmp_path):
    from keras_progdist.workdir import WorkDir

    workdir = tmp_path / "run"
    with WorkDir(str(workdir)).lock("train_teacher"):
        result = _run(["--gin_file=tiny.gin"], workdir, before_keras=True)
    _assert_one_error_line(result, "is in use by another run", f'"pid": {os.getpid()}')


def test_missing_workdir_for_eval(tmp_path):
    workdir = tmp_path / "run"
    result = _run(["--gin_file=tiny.gin"], workdir, mode="eval", before_keras=True)
    _assert_one_error_line(result, "does not exist")
    assert not workdir.exists()


# -- refused by the library's checks, before the lock --------------------------------------
def _image_folder(tmp_path, with_file):
    folder = tmp_path / "images"
    folder.mkdir()
    if with_file:
        (folder / "notes.txt").write_text("no images here")
    return folder


# One case per kind of refusal the command line has to turn into one line (gin's own
# errors, data files, the U-Net's checks, non-integer sizes); every other bad value is
# checked in process, without a Keras import each, in `test_pipeline.py`'s BAD_INPUTS.
BAD_BINDINGS = {
    "gin_typo": (["teacher.train_stpes=10"],
                 ["doesn't have a parameter named 'train_stpes'",
                  "Did you mean 'teacher.train_steps'?"]),
    "gin_unknown_configurable": (["teacherr.train_steps=10"], ["Did you mean 'teacher'?"]),
    "image_folder_missing_dir": (["dataset.name='image_folder'",
                                  "dataset.data_dir='/nonexistent/images'"],
                                 ["/nonexistent/images", "does not exist"]),
    # tiny.gin's net (SMALL has one level, no attention): 20 -> 10 -> 5 never has 4x4.
    "image_size_20": (["dataset.image_size=20", "UNet.attention_resolutions=(4,)",
                       "UNet.channel_mult=(1, 2, 2)"],
                      ["UNet.attention_resolutions [4] never occur", "[20, 10, 5]"]),
    "fashion_mnist_missing_idx": (["dataset.name='fashion_mnist'",
                                   "dataset.data_dir='/nonexistent/fashion'"],
                                  ["/nonexistent/fashion"]),
    "batch_size_float": (["dataset.batch_size=1e9"], ["dataset.batch_size=1000000000.0:"]),
    "channels_float": (["UNet.channels=1e6"], ["UNet.channels", "1000000.0"]),
}


@pytest.mark.slow  # a Keras (and TensorFlow) import each: 15-30 s, more under load
@pytest.mark.parametrize("case", sorted(BAD_BINDINGS))
def test_bad_binding(tmp_path, case):
    bindings, expected = BAD_BINDINGS[case]
    workdir = tmp_path / "run"
    _assert_one_error_line(_run(_tiny(*bindings), workdir), *expected)
    assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("with_file", [False, True], ids=["empty", "no_images"])
def test_image_folder_without_images(tmp_path, with_file):
    folder = _image_folder(tmp_path, with_file)
    workdir = tmp_path / "run"
    result = _run(_tiny("dataset.name='image_folder'", f"dataset.data_dir='{folder}'"),
                  workdir)
    _assert_one_error_line(result, str(folder))
    assert not workdir.exists()


@pytest.mark.slow
def test_relative_include_from_outside_gin_resolves_in_gin(tmp_path):
    """A gin file of the user's own that includes `tiny.gin` by its bare name: the
    include is found in gin/ (so the run gets as far as the user's bad binding)."""
    mine = tmp_path / "mine.gin"
    mine.write_text("include 'tiny.gin'\ndataset.batch_size = 0\n")
    workdir = tmp_path / "run"
    result = _run([f"--gin_file={mine}"], workdir)
    _assert_one_error_line(result, "dataset.batch_size=0:")
    assert not workdir.exists()


# -- damaged checkpoint records --------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("paths", 5), ("shapes", [["8"]]),
                                         ("include_optimizer", "yes"),
                                         ("meta.num_steps", "abc"), ("meta.step", -1)])
def test_damaged_checkpoint_record_is_one_library_error(tmp_path, field, value):
    """A `final.json` that parses but holds a field of the wrong type is a
    `CheckpointError` (so `bin/run.py` prints it as one line) naming the field and the
    way out, whichever reader meets it first."""
    import json

    from helpers.finished_workdir import make_finished_workdir

    from keras_progdist.checkpoint import CheckpointError
    from keras_progdist.errors import KerasProgdistError
    from keras_progdist.workdir import WorkDir

    make_finished_workdir(tmp_path)
    record_path = tmp_path / "teacher" / "final.json"
    record = json.loads(record_path.read_text())
    if field.startswith("meta."):
        record["meta"][field.split(".")[1]] = value
    else:
        record[field] = value
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as info:
        WorkDir(str(tmp_path)).stage_steps("teacher")
    assert isinstance(info.value, KerasProgdistError)
    assert "is damaged" in str(info.value) and field.split(".")[-1] in str(info.value)
    assert "re-run the same command" in str(info.value)


@pytest.mark.parametrize("damage", ["wrong_shape", "missing_array", "not_npz"])
def test_weights_rewritten_with_a_matching_sha256_are_one_library_error(tmp_path, damage):
    """An npz replaced by other contents, its record's sha256 updated to match: the
    arrays are checked against the record before any variable is assigned."""
    import hashlib
    import json

    from helpers.finished_workdir import make_finished_workdir

    from keras_progdist.checkpoint import CheckpointError
    from keras_progdist.workdir import WorkDir

    make_finished_workdir(tmp_path)
    record_path = tmp_path / "teacher" / "final.json"
    record = json.loads(record_path.read_text())
    npz_path = tmp_path / "teacher" / record["weights_file"]
    with np.load(npz_path) as arrays:
        arrays = {k: arrays[k] for k in arrays.files}
    if damage == "wrong_shape":
        arrays["v00000"] = np.zeros((3,), "float32")
    if damage == "missing_array":
        del arrays[sorted(arrays)[-1]]
    if damage == "not_npz":
        npz_path.write_bytes(b"not a zip file")
    else:
        np.savez(npz_path, **arrays)
    record["sha256"] = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="re-run the same command"):
        WorkDir(str(tmp_path)).stage_model("teacher")

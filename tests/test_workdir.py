"""WorkDir: stage names, the config record, and the lock that keeps two runs apart."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_progdist import workdir as workdir_lib
from keras_progdist.workdir import WorkDir, WorkDirBusyError, WorkDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.finished_workdir import make_finished_workdir


def test_stage_names_round_trip():
    assert workdir_lib.stage_name() == "teacher"
    assert workdir_lib.stage_name(4) == "student_00004"
    assert workdir_lib.parse_stage("student_00004") == 4
    assert workdir_lib.parse_stage("teacher") is None
    for bad in ("student_4", "student_00004x", "../teacher", "logs"):
        with pytest.raises(WorkDirError, match="not a stage name"):
            workdir_lib.parse_stage(bad)


def test_damaged_config_record_names_the_file_and_the_missing_section(tmp_path):
    wd = WorkDir(str(tmp_path))
    assert wd.read_config() is None
    (tmp_path / "config.json").write_text(json.dumps({"network": {}, "diffusion": {}}))
    with pytest.raises(WorkDirError, match=r"config.json has no 'schedule' section"):
        wd.read_config()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WorkDirError, match="config.json is unreadable"):
        wd.read_config()


def test_reads_never_create_the_folder(tmp_path):
    wd = WorkDir(str(tmp_path / "missing"))
    with pytest.raises(WorkDirError, match="does not exist"):
        wd.require()
    assert wd.finished_students() == []
    assert not os.path.exists(tmp_path / "missing")


def test_finished_stages_are_read_from_the_final_checkpoints(tmp_path):
    make_finished_workdir(tmp_path, teacher_steps=8, students=(4, 2, 1))
    os.remove(tmp_path / "student_00002" / "final.json")  # that stage never finished
    wd = WorkDir(str(tmp_path))
    assert wd.finished_students() == [4, 1]
    assert wd.finished_stages() == [
        {"stage": "teacher", "num_steps": 8, "updates": 10, "loss": 0.5, "seconds": 1.5},
        {"stage": "student_00004", "num_steps": 4, "updates": 20, "loss": 0.25,
         "seconds": 3.0},
        {"stage": "student_00001", "num_steps": 1, "updates": 40, "loss": 0.125,
         "seconds": 6.0}]
    # A given list of stages: in that order, the unfinished ones left out.
    assert [s["stage"] for s in wd.finished_stages(["student_00001", "student_00002",
                                                    "teacher"])] == \
        ["student_00001", "teacher"]
    assert WorkDir(str(tmp_path / "missing")).finished_stages() == []


def test_stage_models_rebuild_every_finished_stage_without_gin(tmp_path):
    weights = make_finished_workdir(tmp_path, teacher_steps=4, students=(2, 1),
                                    num_classes=3)
    wd = WorkDir(str(tmp_path))
    stages = wd.stage_models()
    assert [(stage, n) for stage, n, _ in stages] == \
        [("teacher", 4), ("student_00002", 2), ("student_00001", 1)]
    for stage, n, model in stages:
        # The stage's own weights (each stage holds different ones), EMA-free, sampling
        # in its own step count, with the recorded schedule and parameterization.
        assert len(model.network.get_weights()) == len(weights[stage])
        for got, want in zip(model.network.get_weights(), weights[stage]):
            np.testing.assert_array_equal(got, want)
        assert model.ema_network is None and model.num_steps == n
        assert model.parameterization == "v" and model.num_classes == 3
        assert model.schedule.get_config()["name"] == "cosine"
    assert not np.array_equal(weights["teacher"][0], weights["student_00001"][0])
    assert wd.stage_model("student_00002").num_steps == 2


def test_loading_stages_names_what_is_missing(tmp_path):
    with pytest.raises(WorkDirError, match="is not a keras-progdist work directory"):
        WorkDir(str(tmp_path)).stage_models()
    make_finished_workdir(tmp_path, students=(2,))
    wd = WorkDir(str(tmp_path))
    with pytest.raises(WorkDirError, match=r"Stage 'student_00001' has not finished"):
        wd.stage_model("student_00001")
    os.remove(tmp_path / "teacher" / "final.json")
    with pytest.raises(WorkDirError, match="No finished teacher"):
        wd.stage_models()


def test_the_lock_excludes_a_second_holder_in_this_process(tmp_path):
    wd = WorkDir(str(tmp_path))
    with wd.lock("train_teacher"):
        with pytest.raises(WorkDirBusyError, match=f"pid.*{os.getpid()}"):
            with WorkDir(str(tmp_path)).lock("distill"):
                pass
    with wd.lock("again"):  # released at the end of the block
        pass


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from keras_progdist.workdir import WorkDir
with WorkDir({path!r}).lock("holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_process_fails_at_once_and_a_killed_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT,
                                                                 path=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.time()
        with pytest.raises(WorkDirBusyError) as info:
            with WorkDir(str(tmp_path)).lock("train_teacher"):
                pass
        assert time.time() - start < 5
        message = str(info.value)
        assert f'"pid": {holder.pid}' in message and "holder" in message
    finally:
        holder.kill()
        holder.wait()
    # kill -9 runs no cleanup; the OS releases the lock all the same.
    with WorkDir(str(tmp_path)).lock("train_teacher"):
        pass


def test_two_training_runs_on_one_workdir(tmp_path):
    """The real thing: a second bin/run.py on a busy workdir exits 1 at once, naming
    the first run, and the first run is not disturbed."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    params = ["--gin_param=UNet.channels=8", "--gin_param=UNet.num_groups=4",
              "--gin_param=teacher.train_steps=400", "--gin_param=dataset.batch_size=8",
              "--gin_param=dataset.image_size=8", "--gin_param=UNet.attention_resolutions=()"]
    command = [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--gin_file=tiny",
               f"--workdir={tmp_path}", "--mode=train_teacher", "--verbose=0", *params]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    try:
        for line in first.stdout:
            if line.startswith("[run]"):
                break
        second = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=300)
        assert second.returncode == 1, second.stderr[-2000:]
        assert "is in use by another run" in second.stderr
        assert f'"pid": {first.pid}' in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_lock_that_is_a_link_or_not_a_regular_file_is_refused_untouched(tmp_path):
    # The holder record truncates and rewrites `.lock`: a planted link must not let a
    # run overwrite its target, nor a dangling one create a file outside the folder.
    workdir = tmp_path / "run"
    workdir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock = workdir / ".lock"
    os.symlink(target, lock)
    with pytest.raises(WorkDirError, match=r"\.lock is a symbolic link"):
        with WorkDir(str(workdir)).lock("train_teacher"):
            pass
    assert target.read_text() == "keep me"
    os.remove(lock)
    outside = tmp_path / "created_outside"
    os.symlink(outside, lock)
    with pytest.raises(WorkDirError, match=r"\.lock is a symbolic link"):
        with WorkDir(str(workdir)).lock("train_teacher"):
            pass
    assert not os.path.lexists(outside)
    os.remove(lock)
    os.link(target, lock)
    with pytest.raises(WorkDirError, match=r"\.lock has other hard links"):
        with WorkDir(str(workdir)).lock("train_teacher"):
            pass
    assert target.read_text() == "keep me"
    os.remove(lock)
    os.mkfifo(lock)
    with pytest.raises(WorkDirError, match=r"\.lock is not a regular file"):
        with WorkDir(str(workdir)).lock("train_teacher"):
            pass
    os.remove(lock)
    with WorkDir(str(workdir)).lock("train_teacher"):  # a plain file is taken as before
        assert os.path.isfile(lock) and not os.path.islink(lock)

"""Preemption on every backend: a stage stopped mid-epoch saves a checkpoint at the exact
step, and the resumed run ends with weights identical to those of a run that was never
interrupted: the teacher stopped by the time budget and, separately, by Ctrl-C
(SIGINT), a distillation stage by SIGTERM.
(Both stops set the one `PreemptionGuard` of a run, which every stage's checkpoint
callback reads, so each stage kind is tested with one of the two.) On JAX the runs are
made in processes where TensorFlow cannot be imported."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_progdist import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 40 teacher steps and one 40-update stage (4 -> 2 steps), checkpoints every 20, chunks
# of 5: a stop after the first chunk lands mid-epoch, at step 5.
PARAMS = [
    "UNet.channels=8", "UNet.num_groups=4", "UNet.attention_resolutions=()",
    "UNet.channel_mult=(1,)",  # one level: cheaper to trace (helpers.pipeline_runs.SMALL)
    "dataset.batch_size=16", "dataset.image_size=8",
    "teacher.train_steps=40", "teacher.checkpoint_every=20", "teacher.steps_per_execution=5",
    "distill.teacher_steps=4", "distill.min_steps=2", "distill.updates_per_stage=40",
    "distill.checkpoint_every=20", "distill.steps_per_execution=5",
    "sample_grid.count=0",  # no sampler to compile for a grid nobody looks at here
]
if keras.backend.backend() == "tensorflow":
    # What is tested is the checkpoint and the resume, not XLA, which roughly doubled
    # each stage's time in these short runs (a 40-update teacher: 31 s against 17 s).
    # JAX always compiles.
    PARAMS += ["teacher.jit_compile=False", "distill.jit_compile=False"]


def _command(workdir, mode, flags=()):
    if keras.backend.backend() == "jax":
        runner = [os.path.join(ROOT, "tests", "helpers", "run_without_tensorflow.py")]
    else:
        runner = [os.path.join(ROOT, "bin", "run.py")]
    return [sys.executable, *runner, "--gin_file=tiny.gin", f"--workdir={workdir}",
            f"--mode={mode}", "--verbose=0", *[f"--gin_param={p}" for p in PARAMS],
            *flags]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
            "KERAS_BACKEND": keras.backend.backend()}


def _run(workdir, mode, flags=(), expect=0):
    result = subprocess.run(_command(workdir, mode, flags), capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == expect, (
        f"{mode} {flags}: exit {result.returncode}, expected {expect}\n{result.stdout}\n"
        f"{result.stderr[-3000:]}")
    return result.stdout


def _sigterm_when(workdir, mode, line_start, signum=signal.SIGTERM):
    """Runs `mode`, sends `signum` as soon as a stdout line starts with `line_start`."""
    process = subprocess.Popen(_command(workdir, mode), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_env())
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith(line_start):
                process.send_signal(signum)
                break
        output.extend(process.stdout)
        assert process.wait(timeout=600) == 143, "".join(output)
    finally:
        if process.poll() is None:
            process.kill()
    return "".join(output)


def _final_weights(workdir, stage):
    directory = os.path.join(workdir, stage)
    with np.load(checkpoint.weights_path(directory, "final")) as arrays:
        return [arrays[k] for k in sorted(arrays.files)]


def _assert_same_weights(workdir, reference, stage):
    """Bit-identical on both backends: the input stream of a resumed stage is a
    function of the seed and the step alone (on TensorFlow each iteration of the
    dataset restarts its seeded shuffle, `data.api`), and so are the random streams."""
    ours, theirs = _final_weights(workdir, stage), _final_weights(reference, stage)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same teacher and stage, never interrupted."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(workdir, "train_teacher")
    _run(workdir, "distill")
    return workdir


def test_budget_and_sigterm_stops_mid_epoch_resume_to_identical_weights(reference, tmp_path):
    workdir = str(tmp_path / "budget")
    # The budget runs out while the first chunk compiles: the stop comes after it.
    first = _run(workdir, "train_teacher", ["--time_budget_s=1"], expect=143)
    assert "checkpoint saved at step 5" in first
    teacher_dir = os.path.join(workdir, "teacher")
    meta = checkpoint.read_meta(teacher_dir, "ckpt")
    assert meta["step"] == 5 and 0 < meta["seconds"] < 600
    # The stage's training time is summed over its pieces: say the first piece had
    # trained for 1,000 s (a long preemptible run); the resumed stage's total keeps it.
    record_path = os.path.join(teacher_dir, "ckpt.json")
    with open(record_path) as f:
        record = json.load(f)
    record["meta"]["seconds"] = 1000.0
    with open(record_path, "w") as f:
        json.dump(record, f)
    second = _run(workdir, "train_teacher")
    assert "resuming at step 5/40" in second
    assert 1000.0 < checkpoint.read_meta(teacher_dir, "final")["seconds"] < 1600.0
    if keras.backend.backend() == "jax":  # no TensorFlow, so no tf.data: numpy batches
        assert "input numpy batches" in second
    _assert_same_weights(workdir, reference, "teacher")

    # The stage: stop it by SIGTERM once it starts distilling, then resume.
    stopped = _sigterm_when(workdir, "distill", "[stage] student_00002: distilling")
    assert "[preempted] student_00002" in stopped
    step = checkpoint.read_meta(os.path.join(workdir, "student_00002"), "ckpt")["step"]
    assert 0 < step < 40 and step % 5 == 0
    resumed = _run(workdir, "distill")
    assert f"resuming at step {step}/40" in resumed
    _assert_same_weights(workdir, reference, "student_00002")
    # sample_grid.count=0: finished stages wrote no grids.
    assert not os.path.exists(os.path.join(reference, "samples"))


def test_ctrl_c_acts_like_sigterm_and_the_resume_is_the_uninterrupted_run(reference,
                                                                           tmp_path):
    """A person at a terminal presses Ctrl-C (SIGINT): checkpoint at the exact step,
    exit 143, and the same command resumes to the uninterrupted weights."""
    workdir = str(tmp_path / "ctrl_c")
    stopped = _sigterm_when(workdir, "train_teacher", "[stage] teacher: training",
                            signal.SIGINT)
    assert "Ctrl-C" in stopped and "KeyboardInterrupt" not in stopped, stopped
    step = checkpoint.read_meta(os.path.join(workdir, "teacher"), "ckpt")["step"]
    assert 0 < step < 40 and step % 5 == 0
    assert f"checkpoint saved at step {step}" in stopped
    resumed = _run(workdir, "train_teacher")
    assert f"resuming at step {step}/40" in resumed
    _assert_same_weights(workdir, reference, "teacher")

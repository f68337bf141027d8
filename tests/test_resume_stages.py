"""Exact resume across stages: a run stopped by SIGTERM during each stage in turn (the
teacher, then every student of the ladder) and killed between two stages, each time
resumed by the same command, ends with every stage's `final` weights byte-identical
(sha256) to those of an uninterrupted run in one process.

Every stage must start from state that is a function of the work directory alone, not
of which stages ran earlier in the same process (the tf.data shuffle order, the
distiller's noise seed, Keras' global seed). A stop lands after the first update of the
stage (chunks of one update), so each resumed stage also runs a partial epoch and then
whole ones: two `fit` calls where the uninterrupted run made one.
"""

import hashlib
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers.pipeline_runs import ROOT, SMALL, env, in_process

from keras_progdist import checkpoint
from keras_progdist.distillation import Distiller
from keras_progdist.networks.unet import UNet

# A 10-update teacher and the ladder 2 -> 1 at 10 updates a stage, checkpoints every 5:
# the smallest ladder with a stage that follows another one.
BINDINGS = ["teacher.train_steps=10", "teacher.checkpoint_every=5",
            "distill.teacher_steps=4", "distill.updates_per_stage=10",
            "distill.checkpoint_every=5"]
PARAMS = SMALL + BINDINGS
STAGES = ["teacher", "student_00002", "student_00001"]


def _command(workdir, mode):
    if keras.backend.backend() == "jax":
        runner = os.path.join(ROOT, "tests", "helpers", "run_without_tensorflow.py")
    else:
        runner = os.path.join(ROOT, "bin", "run.py")
    return [sys.executable, runner, "--gin_file=tiny.gin", f"--workdir={workdir}",
            f"--mode={mode}", "--verbose=0", *[f"--gin_param={p}" for p in PARAMS]]


def _run(workdir, mode, stop_at=None, stop=signal.SIGTERM):
    """Runs `mode`; with `stop_at`, sends `stop` once a stdout line starts with it and
    expects exit 143 (SIGTERM) or -9 (SIGKILL), else expects exit 0. Returns the
    output."""
    process = subprocess.Popen(_command(workdir, mode), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**env(), "KERAS_BACKEND": keras.backend.backend()})
    output = []
    for line in process.stdout:
        output.append(line)
        if stop_at is not None and line.startswith(stop_at):
            process.send_signal(stop)
            break
    output.extend(process.stdout)
    code = process.wait(timeout=600)
    text = "".join(output)
    expected = 0 if stop_at is None else 143 if stop == signal.SIGTERM else -stop
    assert code == expected, f"{mode} (stop at {stop_at!r}): exit {code}\n{text}"
    return text


def _final_sha256(workdir, stage):
    """sha256 over the arrays of `stage`'s `final` checkpoint, in variable order."""
    digest = hashlib.sha256()
    with np.load(checkpoint.weights_path(os.path.join(workdir, stage), "final")) as arrays:
        for key in sorted(arrays.files):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_sigterm_during_every_stage_in_turn_resumes_to_the_uninterrupted_weights(tmp_path):
    # Uninterrupted, and in one process: teacher and stages after one another.
    reference = str(tmp_path / "uninterrupted")
    in_process(reference, "train_teacher", BINDINGS)
    in_process(reference, "distill", BINDINGS)

    workdir = str(tmp_path / "stopped")
    # The teacher: stopped at its first chunk, then resumed to the end.
    _run(workdir, "train_teacher", stop_at="[stage] teacher: training")
    _run(workdir, "train_teacher")
    # student_00002: stopped by SIGTERM in its first chunk; then resumed and killed
    # (SIGKILL) as soon as it is final, before student_00001 has a checkpoint, so the
    # next run starts student_00001 from its beginning in a fresh process.
    _run(workdir, "distill", stop_at="[stage] student_00002: distilling")
    _run(workdir, "distill", stop_at="[stage] student_00002: 2 steps", stop=signal.SIGKILL)
    assert not checkpoint.exists(os.path.join(workdir, "student_00001"), "ckpt")
    # student_00001: stopped by SIGTERM in its first chunk, then resumed to the end.
    stopped = _run(workdir, "distill", stop_at="[stage] student_00001: distilling")
    assert "[preempted] student_00001" in stopped, stopped
    resumed = _run(workdir, "distill")
    assert "[stage] student_00001: resuming at step" in resumed, resumed

    ours = {stage: _final_sha256(workdir, stage) for stage in STAGES}
    theirs = {stage: _final_sha256(reference, stage) for stage in STAGES}
    assert ours == theirs


def _streams(model):
    """The states of `model`'s random streams (its variables that are not weights)."""
    weights = {id(w) for w in model.weights}
    return [keras.ops.convert_to_numpy(v).tolist() for v in model.variables
            if id(v) not in weights]


def test_a_stage_starts_the_same_random_streams_whatever_ran_before():
    """Two distillers with the same seed, one of whose streams (noise, student dropout)
    have run on as a stage's training runs them: the next stage starts both at the same
    state, a function of the seed and N alone, and another N starts elsewhere."""
    net = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)
    used = Distiller(net, num_steps=8, seed=3, student_dropout=0.1)
    fresh = Distiller(net, num_steps=8, seed=3, student_dropout=0.1)
    z, t = np.zeros((2, 8, 8, 1), "float32"), np.full((2,), 0.5, "float32")
    for _ in range(3):
        used.seed_generator.next()
        used.student([z, t], training=True)
    assert len(_streams(used)) > 1  # the noise and at least one dropout layer
    assert _streams(used) != _streams(fresh)
    used.start_stage(net, 4)
    fresh.start_stage(net, 4)
    assert _streams(used) == _streams(fresh)
    fresh.start_stage(net, 2)
    assert _streams(used) != _streams(fresh)

"""Kills at random moments, during training or a checkpoint write, lose no stage: every
checkpoint on disk verifies after each kill and the run resumes to the configured ladder."""

import os
import random
import signal
import subprocess
import time

import pytest

from keras_progdist import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.pipeline_runs import all_checkpoints_verify, command, env, ladder, run

# Longer stages than the other pipeline tests, so kills land mid-stage and restarts
# must resume; two distillation stages are enough to kill one between stages.
KILL_PARAMS = ["teacher.train_steps=200", "distill.updates_per_stage=60",
               "distill.min_steps=2"]
KILL_LADDER = [("teacher", 8, 200), ("student_00004", 4, 60), ("student_00002", 2, 60)]


@pytest.mark.slow
def test_random_kills_lose_no_stage(tmp_path):
    """SIGKILL, SIGTERM, SIGKILL at random moments, then resume to the end. (The
    preemption test covers a stop at an exact step; this one covers stops anywhere,
    including during a checkpoint write.)"""
    workdir = str(tmp_path / "killed")
    rng = random.Random(0)
    resumed = 0
    kills = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
    mode_of = lambda: "distill" if checkpoint.exists(  # noqa: E731
        os.path.join(workdir, "teacher"), "final") else "train_teacher"
    for sig in kills:
        process = subprocess.Popen(command(workdir, mode_of(), KILL_PARAMS),
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env())
        # Wait for the first checkpoint of this process (or its end), then a random delay.
        deadline = time.time() + 300
        start_ckpts = _checkpoint_mtimes(workdir)
        while time.time() < deadline and process.poll() is None and \
                _checkpoint_mtimes(workdir) == start_ckpts:
            time.sleep(0.5)
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            process.send_signal(sig)
        output = process.communicate(timeout=300)[0]
        if sig == signal.SIGTERM and process.returncode == 143:
            assert "[preempted]" in output
        resumed += output.count("resuming at")
        all_checkpoints_verify(workdir)
    for mode in ("train_teacher", "distill"):
        if mode == mode_of():  # (the teacher may have finished before the last kill)
            output = run(workdir, mode, KILL_PARAMS).stdout
            resumed += output.count("resuming at")
    assert ladder(workdir) == KILL_LADDER
    assert resumed >= 2, "the restarts should have resumed from checkpoints"
    all_checkpoints_verify(workdir)


def _checkpoint_mtimes(workdir):
    steps = {}
    if not os.path.isdir(workdir):
        return steps
    for stage in os.listdir(workdir):
        path = os.path.join(workdir, stage, "ckpt.json")
        if os.path.exists(path):
            steps[stage] = os.path.getmtime(path)
    return steps

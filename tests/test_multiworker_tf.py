"""`--strategy=multi_worker` on TensorFlow: two worker processes on this machine
(`TF_CONFIG` naming two localhost ports; worker 0 is the chief), started by
`tests/helpers/cluster_runs.py` as two hosts would run them.

- Equality: the two workers train a teacher and one distillation stage (4 -> 2 steps);
  they log the same losses, and the chief's weights equal those of one process with
  two replicas (`tests/helpers/two_cpu_devices.py`, MirroredStrategy over two logical
  CPU devices) to `WEIGHT_ATOL`, their final losses to `LOSS_RTOL`. That process has
  the same replica ids, per-replica half batches and seeds, so only the all-reduce
  differs; a one-replica run draws other noise (each replica folds its id into the
  seed) and is compared with statistics in `tests/test_distribute.py`.
- One writer: the non-chief worker runs under `tests/helpers/audit_writes.py`, which
  lists every path under the work directory it opens for writing, renames or removes.
- A killed worker: `kill -9` of worker 1 after the chief's first checkpoint ends the
  chief within `LOST_PEER_TIMEOUT_S` with exit 1 and one `error:` line naming worker 1;
  restarting both resumes from that checkpoint and ends where the uninterrupted run
  does, bit for bit.
- An agreed stop: SIGTERM to the non-chief and, separately, to the chief stops both
  workers at one step with a checkpoint (exit 143); the same command on both resumes to
  the uninterrupted weights, bit for bit (the input stream of a resumed run is a
  function of the seed and the step alone, as in a single-process run).

Under MultiWorkerMirroredStrategy Keras runs one step per call
(`distribute.fit_settings`), so every step is a chunk boundary.
"""

import os
import re
import signal
import time

import numpy as np
import pytest

from keras_progdist import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import cluster_runs

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow_only]
HELPERS = os.path.join(ROOT, "tests", "helpers")
PARAMS = ["UNet.channels=8", "UNet.num_groups=4", "UNet.attention_resolutions=()",
          "UNet.channel_mult=(1,)",  # one level: cheaper to trace (pipeline_runs.SMALL)
          "dataset.batch_size=16", "dataset.image_size=8", "teacher.train_steps=20",
          "teacher.checkpoint_every=10", "teacher.jit_compile=False",
          "distill.teacher_steps=4", "distill.min_steps=2",
          "distill.updates_per_stage=10", "distill.checkpoint_every=10",
          "distill.jit_compile=False", "sample_grid.count=0"]
TIMEOUT_S = 600  # per run: a hang fails the test instead of blocking the suite
# Two workers against one two-replica process: the same arithmetic but for the order
# of the cross-worker all-reduce.
# Measured: 1.1e-6 (teacher, 20 updates; stage, 10 more), final losses 7e-8 apart.
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5
# After a SIGTERM (sent once training runs) both workers must be gone within this (a
# step, a checkpoint, with a wide margin for a loaded machine); without the agreement
# the other one hangs.
STOP_TIMEOUT_S = 180
# After a kill -9: TensorFlow's coordination service misses the dead worker's
# heartbeats (10 s by default, measured 12 s), then the survivor exits; with a margin.
LOST_PEER_TIMEOUT_S = 60


def _args(workdir, mode):
    return ["--gin_file=tiny.gin", f"--workdir={workdir}", f"--mode={mode}",
            "--verbose=2", *[f"--gin_param={p}" for p in PARAMS]]


def _weights(workdir, stage):
    with np.load(checkpoint.weights_path(os.path.join(workdir, stage), "final")) as f:
        return [f[k] for k in sorted(f.files)]


def _losses(output):
    return re.findall(r"^\[(?:teacher|student_\d+)\] step \d+/\d+: loss ([0-9.]+)",
                      output, flags=re.M)


def _audited(output, workdir):
    found = re.findall(r"^\[audit\] writes under .*: (.*)$", output, flags=re.M)
    assert found, output[-3000:]
    return found


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Teacher, then the stage, on two workers; the non-chief's writes audited."""
    path = tmp_path_factory.mktemp("two_workers")
    workdir = str(path / "work")
    audit = {1: [os.path.join(HELPERS, "audit_writes.py"), workdir]}
    outputs = []
    for mode in ("train_teacher", "distill"):
        cluster = cluster_runs.run("tensorflow", _args(workdir, mode),
                                   str(path / mode), TIMEOUT_S, prefix=audit)
        outputs.append((cluster.output(0), cluster.output(1)))
    return workdir, outputs


def test_two_workers_train_like_one_two_replica_process_and_only_the_chief_writes(
        two_workers, tmp_path):
    workdir, outputs = two_workers
    reference = str(tmp_path / "one_process")
    for mode in ("train_teacher", "distill"):
        cluster_runs.run_one(
            [os.path.join(HELPERS, "two_cpu_devices.py"), cluster_runs.RUN,
             *_args(reference, mode), "--strategy=mirrored"], str(tmp_path / mode),
            TIMEOUT_S)
    for chief, other in outputs:
        assert "process is not the chief" in other and "not the chief" not in chief
        # The teacher logs at steps 10 and 20, the stage at 10.
        assert _losses(chief) == _losses(other) and len(_losses(chief)) >= 1
        # Nothing under the work directory was written by the non-chief.
        assert _audited(other, workdir) == ["[]"], _audited(other, workdir)
    for stage in ("teacher", "student_00002"):
        loss, expected = (checkpoint.read_meta(os.path.join(w, stage), "final")["loss"]
                          for w in (workdir, reference))
        assert loss == pytest.approx(expected, rel=LOSS_RTOL), (stage, loss, expected)
        ours, theirs = _weights(workdir, stage), _weights(reference, stage)
        assert len(ours) == len(theirs) > 0
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
        print(f"{stage}: two workers vs one two-replica process, max |diff| {worst:.2e}")
        assert worst <= WEIGHT_ATOL, (stage, worst)


@pytest.mark.parametrize("victim", [1, 0], ids=["sigterm_to_worker_1",
                                                "sigterm_to_the_chief"])
def test_a_sigterm_to_one_worker_stops_both_at_one_step_and_resumes(
        two_workers, tmp_path, victim):
    reference, _ = two_workers
    workdir = str(tmp_path / "work")
    cluster = cluster_runs.Cluster("tensorflow", _args(workdir, "train_teacher"),
                                   str(tmp_path / "stopped"))
    # After the first checkpoint (step 10): compiling is over, the stop must come
    # within a step or two.
    cluster.wait_for_line(0, "[teacher] step 10/20", TIMEOUT_S)
    cluster.signal(victim)
    codes = cluster.wait(STOP_TIMEOUT_S)
    assert codes == [143, 143], f"exit codes {codes}\n{cluster.outputs()}"
    steps = [int(s) for i in (0, 1) for s in re.findall(
        r"checkpoint saved at step (\d+)\. Re-run", cluster.output(i))]
    assert len(steps) == 2 and steps[0] == steps[1] and 10 < steps[0] <= 20, \
        cluster.outputs()
    assert "another process's stop" in cluster.output(1 - victim)
    assert checkpoint.read_meta(os.path.join(workdir, "teacher"), "ckpt")["step"] == \
        steps[0]
    resumed = cluster_runs.run("tensorflow", _args(workdir, "train_teacher"),
                               str(tmp_path / "resumed"), TIMEOUT_S)
    assert f"resuming at step {steps[0]}/20" in resumed.output(1)
    for ours, theirs in zip(_weights(workdir, "teacher"), _weights(reference, "teacher")):
        np.testing.assert_array_equal(ours, theirs)  # bit for bit


def test_a_killed_worker_ends_the_chief_with_one_error_line_and_nothing_is_lost(
        two_workers, tmp_path):
    reference, _ = two_workers
    workdir = str(tmp_path / "work")
    cluster = cluster_runs.Cluster("tensorflow", _args(workdir, "train_teacher"),
                                   str(tmp_path / "killed"))
    cluster.wait_for_line(0, "[teacher] step 10/20", TIMEOUT_S)
    killed = cluster.signal(1, signal.SIGKILL)
    codes = cluster.wait(LOST_PEER_TIMEOUT_S)
    seconds = time.time() - killed
    assert codes == [1, -signal.SIGKILL], f"exit codes {codes}\n{cluster.outputs()}"
    output = cluster.output(0)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost worker 1 (localhost:"), \
        output[-3000:]
    assert "Traceback" not in output
    print(f"chief exited {seconds:.1f} s after the kill: {errors[0]}")
    resumed = cluster_runs.run("tensorflow", _args(workdir, "train_teacher"),
                               str(tmp_path / "resumed"), TIMEOUT_S)
    assert "resuming at step 10/20" in resumed.output(0)
    for ours, theirs in zip(_weights(workdir, "teacher"), _weights(reference, "teacher")):
        np.testing.assert_array_equal(ours, theirs)  # bit for bit

"""Multi-process runs: one writer, sharded data, identical training on every process,
and a stop that every process agrees on.

Two JAX processes on this machine (`jax.distributed` on localhost, one CPU device each)
train one teacher with `--strategy=data_parallel`, as two hosts of a multi-host job
would (`tests/helpers/cluster_runs.py` starts them). A SIGTERM to one of them, the
chief or not, must stop both at the same step with a checkpoint (exit 143), and the
same command on both must resume to the weights of the uninterrupted run, bit for bit.
What this cannot show: real accelerators, a real network between hosts. `tf.distribute`
multi-worker runs are in `tests/test_multiworker_tf.py`; `distribute.is_chief` on the
cluster specs Keras sees is tested below as a unit."""

import os
import re
import signal
import time

import numpy as np
import pytest

from keras_progdist import checkpoint, distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import cluster_runs

# 40 updates, checkpoints every 20, chunks of 5: a stop early in the run lands mid-epoch.
# Numpy batches (what a JAX host without TensorFlow reads): a resumed stream is the
# uninterrupted one, so a resume must be bit-exact (a resumed tf.data pipeline is not:
# see tests/test_preemption.py).
PARAMS = ["UNet.channels=8", "UNet.num_groups=4", "UNet.attention_resolutions=()",
          "UNet.channel_mult=(1,)",  # one level: cheaper to trace (pipeline_runs.SMALL)
          "dataset.batch_size=16", "dataset.image_size=8", "dataset.pipeline='numpy'",
          "teacher.train_steps=40", "teacher.checkpoint_every=20",
          "teacher.steps_per_execution=5",
          "sample_grid.count=0"]  # the grid is not what this tests
TIMEOUT_S = 600  # per multi-process run: a hang fails the test, it does not block it
# After a SIGTERM (sent once training runs) both processes must be gone within this: one
# chunk, one checkpoint (seconds here), with a wide margin for a loaded machine. Without
# the agreement the process that was not signalled hangs in its next collective and
# this fails.
STOP_TIMEOUT_S = 180
# After a kill -9, the survivor must be gone within this: the roll call that names the
# lost process (`cluster.ROLL_CALL_S`, 5 s) and the exit, with a margin.
LOST_PEER_TIMEOUT_S = 60


def _args(workdir):
    return ["--gin_file=tiny.gin", f"--workdir={workdir}", "--mode=train_teacher",
            "--verbose=2", *[f"--gin_param={p}" for p in PARAMS]]


def _teacher_weights(workdir):
    with np.load(checkpoint.weights_path(os.path.join(workdir, "teacher"), "final")) as f:
        return [f[k] for k in sorted(f.files)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two JAX processes train the teacher to its end."""
    path = tmp_path_factory.mktemp("uninterrupted")
    workdir = str(path / "work")
    cluster = cluster_runs.run("jax", _args(workdir), str(path), TIMEOUT_S)
    return workdir, [cluster.output(0), cluster.output(1)]


@pytest.mark.slow
def test_two_jax_processes_train_one_teacher_and_only_process_0_writes(uninterrupted):
    workdir, (first, second) = uninterrupted
    assert "process is not the chief" in second and "not the chief" not in first
    # One global batch per step: both processes report the same losses.
    losses = [[line.split("loss ")[1].split(",")[0] for line in out.splitlines()
               if line.startswith("[teacher] step")] for out in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    # Only the chief wrote, once: one finished teacher, no resume checkpoint left over.
    assert checkpoint.read_meta(os.path.join(workdir, "teacher"), "final")["step"] == 40
    names = sorted(os.listdir(os.path.join(workdir, "teacher")))
    assert len(names) == 2 and names[1] == "final.json", names


def _stopped_step(output):
    found = re.findall(r"checkpoint saved at step (\d+)\. Re-run", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["sigterm_to_process_1",
                                                "sigterm_to_the_chief"])
def test_a_sigterm_to_one_jax_process_stops_both_at_one_step_and_resumes_exactly(
        uninterrupted, tmp_path, victim):
    reference, _ = uninterrupted
    workdir = str(tmp_path / "work")
    for logs in ("stopped", "resumed"):
        (tmp_path / logs).mkdir()
    cluster = cluster_runs.Cluster("jax", _args(workdir), str(tmp_path / "stopped"))
    # The signal arrives after the first checkpoint (step 20), so compiling is over and
    # the stop must come within a chunk: it is agreed at a chunk boundary mid-epoch.
    cluster.wait_for_line(0, "[teacher] step 20/40", TIMEOUT_S)
    cluster.signal(victim)
    codes = cluster.wait(STOP_TIMEOUT_S)
    assert codes == [143, 143], f"exit codes {codes}\n{cluster.outputs()}"
    steps = [_stopped_step(cluster.output(i)) for i in (0, 1)]
    assert steps[0] == steps[1] and 20 < steps[0] <= 40 and steps[0] % 5 == 0, steps
    assert "another process's stop" in cluster.output(1 - victim)
    assert checkpoint.read_meta(os.path.join(workdir, "teacher"), "ckpt")["step"] == \
        steps[0]
    # The same command on both processes resumes to the uninterrupted run's weights.
    resumed = cluster_runs.run("jax", _args(workdir), str(tmp_path / "resumed"), TIMEOUT_S)
    assert f"resuming at step {steps[0]}/40" in resumed.output(1)
    for ours, theirs in zip(_teacher_weights(workdir), _teacher_weights(reference)):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_a_killed_jax_process_ends_the_other_with_one_error_line_and_nothing_is_lost(
        uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = str(tmp_path / "work")
    cluster = cluster_runs.Cluster("jax", _args(workdir), str(tmp_path / "killed"))
    # After the chief's checkpoint at step 20, the other process dies.
    cluster.wait_for_line(0, "[teacher] step 20/40", TIMEOUT_S)
    killed = cluster.signal(1, signal.SIGKILL)
    codes = cluster.wait(LOST_PEER_TIMEOUT_S)
    seconds = time.time() - killed
    assert codes == [1, -signal.SIGKILL], f"exit codes {codes}\n{cluster.outputs()}"
    errors = [line for line in cluster.output(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost process 1 "), \
        cluster.output(0)[-3000:]
    assert "Traceback" not in cluster.output(0)
    print(f"survivor exited {seconds:.1f} s after the kill: {errors[0]}")
    # Restarting both resumes from the checkpoint at step 20 to the uninterrupted weights.
    resumed = cluster_runs.run("jax", _args(workdir), str(tmp_path / "resumed"), TIMEOUT_S)
    assert "resuming at step 20/40" in resumed.output(0)
    for ours, theirs in zip(_teacher_weights(workdir), _teacher_weights(reference)):
        np.testing.assert_array_equal(ours, theirs)


class _Resolver:
    """The attributes Keras' own multi-worker callbacks read from a cluster resolver."""

    def __init__(self, cluster, task_type, task_id):
        self.task_type, self.task_id = task_type, task_id
        self._cluster = cluster

    def cluster_spec(self):
        cluster = self._cluster

        class Spec:
            def as_dict(self):
                return cluster
        return Spec()


class _Strategy:
    def __init__(self, resolver):
        self.cluster_resolver = resolver


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("cluster,task_type,task_id,chief", [
    ({"chief": ["a"], "worker": ["b", "c"]}, "chief", 0, True),
    ({"chief": ["a"], "worker": ["b", "c"]}, "worker", 0, False),
    ({"worker": ["b", "c"]}, "worker", 0, True),
    ({"worker": ["b", "c"]}, "worker", 1, False),
])
def test_the_chief_of_a_tf_cluster(cluster, task_type, task_id, chief):
    assert distribute.is_chief(_Strategy(_Resolver(cluster, task_type, task_id))) is chief


def test_one_process_is_the_chief():
    assert distribute.is_chief(None) is True
    np.testing.assert_equal(distribute.is_chief(_Strategy(None)), True)

"""Multi-process runs: one writer, sharded data, identical training on every process.

Two JAX processes on this machine (`jax.distributed` on localhost, one CPU device each)
train one teacher with `--strategy=data_parallel`, as two hosts of a multi-host job
would. What this cannot show: real accelerators, a real network between hosts, and
`tf.distribute` multi-worker / TPU pods (there `distribute.is_chief` decides from the
cluster resolver, tested below as a unit on the cluster specs Keras sees)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_progdist import checkpoint, distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = ["UNet.channels=8", "UNet.num_groups=4", "UNet.attention_resolutions=()",
          "dataset.batch_size=16", "dataset.image_size=8", "teacher.train_steps=20",
          "teacher.checkpoint_every=10", "teacher.steps_per_execution=5",
          "sample_grid.count=0"]  # the grid is not what this tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_train_one_teacher_and_only_process_0_writes(tmp_path):
    workdir = str(tmp_path / "work")
    port = str(_free_port())
    worker = os.path.join(ROOT, "tests", "helpers", "multihost_worker.py")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--gin_file=tiny.gin", f"--workdir={workdir}", "--mode=train_teacher",
            "--verbose=2", "--strategy=data_parallel",
            *[f"--gin_param={p}" for p in PARAMS]]
    processes = [subprocess.Popen([sys.executable, worker, str(i), "2", port, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env) for i in (1, 0)]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-4000:]
    second, first = outputs
    assert "process is not the chief" in second and "not the chief" not in first
    # One global batch per step: both processes report the same losses.
    losses = [[line.split("loss ")[1].split(",")[0] for line in out.splitlines()
               if line.startswith("[teacher] step")] for out in outputs]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    # Only the chief wrote, once: one finished teacher, no resume checkpoint left over.
    assert checkpoint.read_meta(os.path.join(workdir, "teacher"), "final")["step"] == 20
    names = sorted(os.listdir(os.path.join(workdir, "teacher")))
    assert len(names) == 2 and names[1] == "final.json", names


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

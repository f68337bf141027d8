"""The processes of one multi-process run: how many, agreeing on a flag, and what the
survivors do when one of them dies.

A multi-process run is several JAX processes (`jax.distributed.initialize`, one per
host) or the workers of a `tf.distribute.MultiWorkerMirroredStrategy` cluster. They
train in lockstep: every step holds collectives that need every process. So a decision
one process makes alone (stop here: SIGTERM reached this host, its time budget ran out)
must become everyone's decision at the same step, or the others wait in the next
collective for a process that has left.

`any_process(flag)` is that agreement: an all-reduce of one 0/1 number, so every
process learns whether any process raised its flag. It is a collective too: every
process must call it at the same points of the run, the same number of times (the
training loop calls it at every chunk boundary and before every stage). One process
(`process_count() == 1`) needs no agreement: `agreement()` is then None, and nothing
is called.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time

import keras
import numpy as np


def _multi_worker(strategy) -> bool:
    if strategy is None or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def process_count(strategy=None) -> int:
    """The number of processes that train together.

    JAX: `jax.process_count()`. TensorFlow: the tasks of a MultiWorkerMirroredStrategy's
    cluster (chief and workers), else 1. (A TPUStrategy is driven by one Python
    process, which decides alone.)
    """
    if keras.backend.backend() == "jax":
        import jax

        return int(jax.process_count())
    if not _multi_worker(strategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker")) or 1


def process_index(strategy=None) -> int:
    """This process's position among `process_count()` (JAX process index; TF: the
    chief 0, then the workers in task order)."""
    if keras.backend.backend() == "jax":
        import jax

        return int(jax.process_index())
    if not _multi_worker(strategy):
        return 0
    resolver = strategy.cluster_resolver
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return int(resolver.task_id or 0) + (1 if has_chief else 0)


def process_name(index: int, strategy=None) -> str:
    """How a process is named in messages: `process 1` (JAX) or `worker 1
    (localhost:12345)` (a tf.distribute task with its address)."""
    if not _multi_worker(strategy):
        return f"process {index}"
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    tasks = [("chief", a) for a in cluster.get("chief", [])] + \
        [("worker", a) for a in cluster.get("worker", [])]
    job, address = tasks[index]
    task_id = index - (1 if "chief" in cluster and job == "worker" else 0)
    return f"{job} {task_id} ({address})"


def any_process(flag: bool, strategy=None) -> bool:
    """Whether `flag` is set on any process of the run: a collective all-reduce.

    Args:
        flag: this process's own value.
        strategy: the run's `tf.distribute` strategy (None on JAX).

    Returns:
        The OR of every process's `flag`; the same on every process.
    """
    if keras.backend.backend() == "jax":
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
        return bool(np.max(flags))
    return bool(_tf_sum(strategy)(float(bool(flag))) > 0)


_TF_SUMS = {}


def _tf_sum(strategy):
    """A `tf.function` summing one float over every replica of `strategy` (traced once
    per strategy; MultiWorkerMirroredStrategy runs it as a cross-worker all-reduce)."""
    key = id(strategy)
    if key not in _TF_SUMS:
        import tensorflow as tf

        @tf.function
        def total(value):
            value = tf.convert_to_tensor(value, tf.float32)
            per_replica = strategy.run(tf.identity, args=(value,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _TF_SUMS[key] = lambda value: float(total(value).numpy())
    return _TF_SUMS[key]


def agreement(strategy=None):
    """The all-process OR for a `PreemptionGuard`: `flag -> any_process(flag, strategy)`
    in a multi-process run, None for one process (so a single-process run checks its
    own flag and pays for no collective)."""
    if process_count(strategy) <= 1:
        return None
    return lambda flag: any_process(flag, strategy)


def barrier(strategy=None) -> None:
    """Waits until every process of a multi-process run got here (nothing for one
    process): e.g. until the chief has written a file the others read next."""
    if process_count(strategy) > 1:
        any_process(False, strategy)


# -- a lost peer ------------------------------------------------------------------
# When a process dies (kill -9, a crashed host), the others fail in their next
# collective: at once when the connection closes (JAX/gloo: "Connection reset by
# peer"), or when the coordination service misses the dead one's heartbeats (TF:
# UnavailableError "The following tasks are unhealthy"; JAX: the heartbeat timeout of
# `jax.distributed.initialize`). `exit_on_lost_peer` turns that failure into one
# `error:` line naming the lost process and exits at once: the run cannot go on without
# it, and the normal exit would wait in the distributed runtime's shutdown barrier for
# the dead process (JAX: up to `shutdown_timeout_seconds`, 300 s by default).

ROLL_CALL_S = 5.0  # how long the survivors wait for each other to answer a roll call
LOST_PEER_EXIT_CODE = 1


class PeerLostError(RuntimeError):
    """Another process of a multi-process run died or stopped answering."""


# What a failed collective says, on either backend. Keras and multihost_utils re-raise
# the runtime's error under other types (a gloo failure inside a callback arrived as a
# ValueError), so the message decides, not the type.
_PEER_FAILURE = re.compile(
    r"gloo|connection reset|connection closed|connection refused|socket closed|"
    r"broken pipe|heartbeat|unhealthy|collective ops is aborted|coordination service|"
    r"failed to connect", re.IGNORECASE)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone."""
    return bool(_PEER_FAILURE.search(f"{type(error).__name__}: {error}"))


def _tf_lost_from_message(message: str, strategy) -> list:
    """The TF tasks a coordination-service error names as unhealthy, as indices."""
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    has_chief = "chief" in cluster
    lost = []
    for job, task in re.findall(r"/job:(chief|worker)/replica:\d+/task:(\d+)", message):
        index = 0 if job == "chief" else int(task) + (1 if has_chief else 0)
        if index != process_index(strategy) and index not in lost:
            lost.append(index)
    return lost


def _jax_roll_call(timeout: float) -> list | None:
    """The JAX processes that answer a roll call through the coordination service's
    key-value store within `timeout` s; None when the service itself is gone (it runs
    in process 0)."""
    import threading

    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    answered = {}

    def call():
        try:
            client.key_value_set(f"keras_progdist/roll_call/{me}", "here")
            deadline = time.time() + timeout
            while time.time() < deadline:
                present = {int(key.rsplit("/", 1)[1]) for key, _ in
                           client.key_value_dir_get("keras_progdist/roll_call/")}
                answered["ids"] = present
                if len(present) == count:
                    break
                time.sleep(0.2)
        except Exception:  # noqa: BLE001  (a dead service fails in several ways)
            answered["service_lost"] = True

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout + 5.0)
    if answered.get("service_lost") or "ids" not in answered:
        return None
    return sorted(answered["ids"])


def lost_peers(error: BaseException, strategy=None) -> list:
    """The indices of the processes this failure lost (best effort; may be empty).

    TF: the tasks the coordination service's error names. JAX: the processes that do
    not answer a roll call within `ROLL_CALL_S` (every survivor calls it, so they
    see each other); process 0 when the coordination service it runs is gone.
    """
    if keras.backend.backend() != "jax":
        return _tf_lost_from_message(str(error), strategy)
    present = _jax_roll_call(ROLL_CALL_S)
    if present is None:
        return [0]
    return [i for i in range(process_count()) if i not in present]


@contextlib.contextmanager
def exit_on_lost_peer(strategy=None):
    """Around the training of a multi-process run: a collective that fails because a
    peer is gone prints one line, `error: lost <peer> ...`, on stderr and ends this
    process at once with exit code 1 (`os._exit`: the normal exit would wait for the
    dead peer in the runtime's shutdown barrier). Checkpoints are written atomically,
    so the last complete one is what a restart of every process resumes from.
    Nothing changes for one process.
    """
    if process_count(strategy) <= 1:
        yield
        return
    try:
        yield
    except Exception as error:  # noqa: BLE001  (re-raised unless a peer is gone)
        if not is_peer_failure(error):
            raise
        lost = lost_peers(error, strategy)
        names = ", ".join(process_name(i, strategy) for i in lost) or \
            "another process (not identified)"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # TF puts "Graph execution error:" first; the line that says what happened is
        # the one about health, heartbeats or the connection.
        telling = [line for line in lines if any(word in line.lower() for word in (
            "unhealthy", "heartbeat", "connection", "reset", "failed"))]
        first = (telling or lines or [type(error).__name__])[0][:200]
        print(f"error: lost {names} of this {process_count(strategy)}-process run "
              f"({process_name(process_index(strategy), strategy)} here): "
              f"{type(error).__name__}: {first}. Restart every process with the same "
              "command to resume from the last checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(LOST_PEER_EXIT_CODE)

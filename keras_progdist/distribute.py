"""Distribution strategy from a flag.

TensorFlow backend: `default` (no strategy), `mirrored` (all local GPUs, or the
logical CPU devices), `multi_worker` (`TF_CONFIG`), `tpu` (`TPUClusterResolver`).
JAX backend: `data_parallel` (`keras.distribution.DataParallel` over all devices).
Keras' `fit` then splits each global batch across replicas; the losses scale
themselves for the replica count (`scale_loss_for_distribution`) and every replica
folds its id into the training seed. On JAX the batch is one global array sharded
over the devices, so the noise is one global draw and nothing needs scaling.

`tests/test_distribute.py` checks both against a single device: 2-replica updates
equal the mean of the per-replica gradients (not their sum), losses agree, the EMA
stays identical on every replica and a distillation teacher stays frozen.
"""

from __future__ import annotations

import os
import platform
import socket
from urllib.parse import urlparse

import keras

from keras_progdist.errors import KerasProgdistError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "data_parallel")
TPU_CONNECT_TIMEOUT_S = 10.0


class StrategyError(KerasProgdistError, ValueError):
    """A strategy that cannot run here (no TPU, wrong backend, ...)."""


def describe_device() -> str:
    """The first accelerator the backend sees (`"GPU: NVIDIA H100 80GB HBM3"`), else
    the CPU (`"CPU: 2 cores visible (x86_64)"`): for benchmark and evaluation records."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"GPU: {details.get('device_name', gpus[0].name)}"
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{device.platform.upper()}: {device.device_kind}"
    return f"CPU: {os.cpu_count()} cores visible ({platform.processor() or platform.machine()})"


def get_strategy(name: str = "default", tpu: str | None = None):
    """Returns a `tf.distribute.Strategy`, or None (default / JAX data parallel).

    For `data_parallel` this sets the global `keras.distribution` and returns None.

    Args:
        name: one of `STRATEGIES`.
        tpu: for `tpu`: a Cloud TPU name, `grpc://host:port`, or `local` (TPU VM).

    Raises:
        StrategyError: an unknown name, a strategy of the other backend, or no TPU.

    Example:
        >>> strategy = get_strategy("mirrored")  # doctest: +SKIP
        >>> with strategy.scope():  # doctest: +SKIP
        ...     model = DiffusionModel(...)
        ...     model.compile(optimizer, **fit_settings(strategy, True, 10))
    """
    if name not in STRATEGIES:
        raise StrategyError(f"Unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}.")
    backend = keras.backend.backend()
    if name == "default":
        return None
    if name == "data_parallel":
        if backend != "jax":
            raise StrategyError("--strategy=data_parallel needs KERAS_BACKEND=jax; on "
                                "TensorFlow use mirrored, multi_worker or tpu.")
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return None
    if backend != "tensorflow":
        raise StrategyError(f"--strategy={name} is a tf.distribute strategy and needs "
                            f"KERAS_BACKEND=tensorflow (backend is {backend}); on JAX "
                            "use --strategy=data_parallel.")
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        from keras_progdist import _keras_compat

        _keras_compat.fix_multi_worker_log_reduction()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return _tpu_strategy(tpu)


def _tpu_strategy(tpu: str | None):
    import tensorflow as tf

    given = f"--tpu={tpu}" if tpu else "no --tpu given"

    def no_tpu(reason: str) -> StrategyError:
        return StrategyError(
            f"--strategy=tpu: no TPU found ({given}): {reason}. Name one with "
            "--tpu=<name> (a Cloud TPU name or grpc://host:8470), or --tpu=local on a "
            "TPU VM.")

    # A grpc address with nothing listening makes TensorFlow retry forever; fail fast.
    if tpu and tpu.startswith("grpc://"):
        address = urlparse(tpu)
        try:
            socket.create_connection((address.hostname, address.port or 8470),
                                     timeout=TPU_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise no_tpu(f"cannot connect to {address.netloc} ({e})") from None
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    # Resolving a name may also fail in the Cloud TPU client (HTTP, DNS, auth errors).
    except Exception as e:  # pylint: disable=broad-except
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise no_tpu(first_line.split(". ")[0].rstrip(".")[:200]) from None
    return tf.distribute.TPUStrategy(resolver)


def num_replicas(strategy=None) -> int:
    """Replicas that share each global batch (JAX: devices of the distribution)."""
    if strategy is not None:
        return int(strategy.num_replicas_in_sync)
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" \
        else None
    if distribution is not None:
        return len(distribution.device_mesh.devices.flatten())
    return 1


def fit_settings(strategy, jit_compile: bool, steps_per_execution: int) -> dict:
    """`model.compile` keyword arguments that run under `strategy`.

    Under any multi-replica tf.distribute strategy `jit_compile=False`: XLA cannot
    compile one function over several devices (TPUStrategy compiles each replica's
    step with XLA anyway). Under `MirroredStrategy` / `MultiWorkerMirroredStrategy`
    also `steps_per_execution=1`: Keras 3's multi-step loop (a `tf.while_loop` whose
    `tf.cond` holds the optimizer's cross-replica `merge_call`) fails at run time with
    "You must feed a value for placeholder tensor" (keras-team/keras#19246).
    TPUStrategy keeps its steps per execution; they are what keeps a TPU busy.

    On JAX `jit_compile` is always True: `jit_compile=False` chooses between XLA and a
    plain TensorFlow graph (the tiny demo trains faster on 2 CPU cores without XLA),
    while Keras' JAX trainer without it runs every step eagerly, op by op.

    Returns:
        `{"jit_compile": bool, "steps_per_execution": int}`.
    """
    settings = {"jit_compile": bool(jit_compile) or keras.backend.backend() == "jax",
                "steps_per_execution": int(steps_per_execution)}
    if strategy is None or strategy.num_replicas_in_sync <= 1 or \
            keras.backend.backend() != "tensorflow":
        return settings
    import tensorflow as tf

    settings["jit_compile"] = False
    if isinstance(strategy, (tf.distribute.MirroredStrategy,
                             tf.distribute.MultiWorkerMirroredStrategy)):
        settings["steps_per_execution"] = 1
    return settings


def is_chief(strategy=None) -> bool:
    """Whether this process writes the run's files (checkpoints, samples, exports,
    reports); the others only train.

    - JAX: process 0 of `jax.process_count()` (one process per host).
    - `tf.distribute` with a cluster (MultiWorkerMirroredStrategy, multi-host TPU):
      the `chief` task when the cluster has one, else worker 0, as Keras' own
      checkpointing callbacks decide.
    - Anything else (one process): True.
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and int(resolver.task_id or 0) == 0


def configure_input(dataset) -> None:
    """Tells a multi-process JAX distribution how `dataset` is split among processes.

    Keras shards a `tf.data.Dataset` across processes itself, and refuses anything else
    while its `auto_shard_dataset` is on. The numpy pipeline's batches are already this
    process's share (`data.numpy_pipeline.default_shard`: examples
    `process_index::process_count`, `batch_size / process_count` a step), so for them
    the automatic sharding is turned off. Nothing to do for one process or tf.data.
    """
    from keras_progdist import data

    if keras.backend.backend() != "jax" or not isinstance(dataset, data.ArrayBatches):
        return
    import jax

    distribution = keras.distribution.distribution()
    if distribution is not None and jax.process_count() > 1 and \
            hasattr(distribution, "auto_shard_dataset"):
        distribution.auto_shard_dataset = False

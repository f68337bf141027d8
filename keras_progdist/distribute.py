"""Distribution strategy from a flag.

TensorFlow backend: `default` (no strategy), `mirrored` (all local GPUs, or the
logical CPU devices), `multi_worker` (`TF_CONFIG`), `tpu` (`TPUClusterResolver`).
JAX backend: `data_parallel` (`keras.distribution.DataParallel` over all devices).
Keras' `fit` then splits each global batch across replicas; the losses scale
themselves for the replica count (`scale_loss_for_distribution`) and every replica
folds its id into the training seed.
"""

from __future__ import annotations

import keras

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "data_parallel")


class StrategyError(ValueError):
    """A strategy that cannot run here (no TPU, wrong backend, ...)."""


def get_strategy(name: str = "default", tpu: str | None = None):
    """Returns a `tf.distribute.Strategy`, or None (default / JAX data parallel).

    For `data_parallel` this sets the global `keras.distribution` and returns None.
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
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise StrategyError(
            f"--strategy=tpu: no TPU found (tpu={tpu!r}): {str(e).splitlines()[0]}. "
            "Name one with --tpu=<name> (a Cloud TPU name or grpc://host:8470), or "
            "--tpu=local on a TPU VM.") from None
    return tf.distribute.TPUStrategy(resolver)

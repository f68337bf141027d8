"""Every use of Keras internals, in one place.

Keras 3 has no public API for a few things this library needs. Each is wrapped here,
once, and `tests/test_keras_compat.py` checks each against the installed Keras so that
a release that changes one fails there, loudly, instead of somewhere in training.

- `scale_loss_for_distribution`: divides a loss by the `tf.distribute` replica count,
  as Keras' own losses do, so a custom `compute_loss` matches a built-in loss.
- `random_seed_dtype`: the dtype of a backend's `[2]` seed tensors.
- `learning_rate_variable`: the optimizer's float learning-rate variable (kept when
  the optimizer's slots are zeroed for a new stage).
- `sync_training_state`: on JAX, `fit` keeps the training state outside the model's
  variables between steps of an epoch (it purges their values to save memory); a
  callback that reads variables mid-epoch must first write the state back.
- `TensorSeed`: a seed *tensor* presented as a `SeedGenerator` (which `keras.random`
  accepts); it skips `SeedGenerator.__init__`, which would create a state variable.
- `unpack_jax_train_state` / `pack_jax_train_state`: the layout of the state tuple the
  JAX trainer passes to `train_step(state, data)`.
- `fix_multi_worker_log_reduction`: Keras 3's TensorFlow trainer averages the logs of
  a multi-worker step with `strategy.reduce("MEAN", v, axis=0)`, which fails on the
  scalar metrics every `fit` returns ("Invalid reduction dimension 0 for input with 0
  dimensions", Keras 3.15): MultiWorkerMirroredStrategy cannot `fit` at all without it.
- `set_random_seed`: `keras.utils.set_random_seed` without clearing TensorFlow's
  caches when its global seed is already the one asked for.
"""

from __future__ import annotations

import random

import keras
import numpy as np
from keras import ops
from keras.src.backend import random_seed_dtype as _random_seed_dtype
from keras.src.losses.loss import scale_loss_for_distribution as _scale_loss

JAX_STATE_FIELDS = ("trainable_variables", "non_trainable_variables",
                    "optimizer_variables", "metrics_variables")


def scale_loss_for_distribution(loss):
    """`loss / num_replicas_in_sync` inside a `tf.distribute` replica context, else
    `loss` unchanged (every backend)."""
    return _scale_loss(loss)


def random_seed_dtype() -> str:
    """The dtype the backend's random ops take for `[2]` seeds (`uint32`/`int64`...)."""
    return _random_seed_dtype()


# The seed this module last gave TensorFlow (through `keras.utils.set_random_seed`).
_tensorflow_seed = None


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)`: Python's, NumPy's and Keras' global random
    streams restart from `seed`, and so does TensorFlow's global seed, but that one
    only when it changes.

    Setting TensorFlow's seed, even to the value it has, clears its kernel and function
    caches, so every function already run is instantiated and optimized (Grappler)
    again at its next call: about 11 s for each distillation stage of `tiny.gin` on two
    cores, paid for the same compiled step. Nothing in this library draws from
    TensorFlow's global seed (Keras' random ops are stateless, seeded from
    `SeedGenerator`s; tf.data shuffles take explicit seeds), so it is set once.

    Args:
        seed: the integer seed.
    """
    global _tensorflow_seed
    if seed != _tensorflow_seed:
        keras.utils.set_random_seed(seed)
        _tensorflow_seed = seed
        return
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    # Dropping the global SeedGenerator makes Keras recreate it from the seed.
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


def learning_rate_variable(optimizer):
    """The optimizer's learning-rate variable, or None when the rate is a schedule."""
    value = getattr(optimizer, "_learning_rate", None)
    return value if isinstance(value, keras.Variable) else None


def sync_training_state(model) -> None:
    """Makes `model.variables` (and its optimizer's) hold the current training state.

    A no-op outside JAX and outside `fit`. On JAX, mid-epoch the trainer holds the
    state in its own arrays and the variables may hold nothing; call this before
    reading them from a callback.
    """
    if keras.backend.backend() == "jax":
        model.jax_state_sync()


def unpack_jax_train_state(state) -> dict:
    """The JAX trainer's `train_step` state tuple as a dict keyed by `JAX_STATE_FIELDS`."""
    if len(state) != len(JAX_STATE_FIELDS):
        raise RuntimeError(
            f"The JAX trainer passed a train state of {len(state)} parts; this library "
            f"expects {len(JAX_STATE_FIELDS)} {JAX_STATE_FIELDS}. The installed Keras "
            f"({keras.__version__}) changed it: see keras_progdist/_keras_compat.py.")
    return dict(zip(JAX_STATE_FIELDS, state))


def pack_jax_train_state(parts: dict) -> tuple:
    """The inverse of `unpack_jax_train_state`."""
    return tuple(parts[field] for field in JAX_STATE_FIELDS)


class TensorSeed(keras.random.SeedGenerator):
    """A fixed seed tensor presented as a `SeedGenerator` (no state, no variable)."""

    def __init__(self, seed):  # pylint: disable=super-init-not-called
        self._seed = ops.cast(seed, _random_seed_dtype())
        self.name = "tensor_seed"

    def next(self, ordered=True):
        return self._seed

    def get_config(self):
        raise TypeError("TensorSeed is a transient wrapper and is never serialized.")


def fix_multi_worker_log_reduction() -> None:
    """Makes Keras' TensorFlow trainer average *scalar* logs of a multi-worker step over
    every replica with `axis=None` (the same mean, of a 0-d value); everything else
    goes through Keras' own `reduce_per_replica` unchanged. Idempotent.

    Keras' `reduce_per_replica(values, strategy, reduction)` (module
    `keras.src.backend.tensorflow.trainer`, looked up by name at each call) is wrapped;
    `tests/test_keras_compat.py` checks that it still exists.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "_kpd_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(
                strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
                strategy.extended._in_multi_worker_mode():
            def scalar_mean(v):
                # One local replica per worker gives a plain tensor, more a PerReplica.
                parts = v.values if isinstance(v, tf.distribute.DistributedValues) \
                    else [v]
                if all(getattr(p, "shape", None) is not None and p.shape.rank == 0
                       for p in parts):
                    return strategy.reduce("MEAN", v, axis=None)
                return original(v, strategy, reduction)
            return tf.nest.map_structure(scalar_mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._kpd_fixed = True
    trainer.reduce_per_replica = reduce_per_replica

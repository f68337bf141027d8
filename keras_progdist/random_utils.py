"""Random numbers from a seed *tensor*, on every backend.

`keras.random.*` takes an int or a `SeedGenerator`; on TensorFlow it refuses a seed
tensor. Samplers need one (a fresh seed per loop step, folded from the caller's seed)
and distributed training needs one per replica, so `TensorSeed` wraps a `[2]` int
tensor in the `SeedGenerator` interface that `keras.random` accepts.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_progdist._keras_compat import TensorSeed, random_seed_dtype  # noqa: F401


def fold_in(seed, value):
    """A new `[2]` seed from `seed` and an integer (tensor) `value`.

    Mixes `value` into both words so that seeds `(s, i)` for different `i` (sampler
    steps, replicas) give independent streams.
    """
    dtype = random_seed_dtype()
    seed = ops.cast(seed, dtype)
    value = ops.cast(value, dtype)
    first = ops.cast(ops.mod(seed[0] * 1000003 + value * 7919 + 17, 2**31 - 1), dtype)
    second = ops.cast(ops.mod(seed[1] + value * 104729 + 1, 2**31 - 1), dtype)
    return ops.stack([first, second])


def as_seed(seed) -> "keras.random.SeedGenerator | int":
    """Accepts `None`, an int, a `SeedGenerator` or a `[2]` seed tensor."""
    if seed is None or isinstance(seed, (int, keras.random.SeedGenerator)):
        return seed
    return TensorSeed(seed)


def replica_id():
    """This replica's index inside a `tf.distribute` step (0 everywhere else).

    Folded into training seeds so replicas draw different `t` and noise: a shared
    `SeedGenerator` alone gives every replica the same draws.
    """
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0
    return context.replica_id_in_sync_group

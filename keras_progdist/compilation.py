"""Compiling a function over a model's live variables, on TensorFlow and JAX.

`compile_with_variables` is how `DiffusionModel` compiles its samplers (XLA): the
compiled function reads the variables' values at every call, so a model trained or
reloaded after compilation samples with its new weights.
"""

from __future__ import annotations

import logging
from typing import Sequence

import keras


class _RetracingWarningFilter(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls ... triggered tf.function
    retracing" warning for the samplers of `DiffusionModel._make_sampler` (named in the
    warning): every model (each stage, each evaluated step count) compiles its own
    sampler over its own variables by design, which TensorFlow counts as retracing one
    function."""

    def filter(self, record):
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message
                    and "_make_sampler" in message)


def _quiet_retracing_warning(tf) -> None:
    logger = tf.get_logger()
    if not any(isinstance(f, _RetracingWarningFilter) for f in logger.filters):
        logger.addFilter(_RetracingWarningFilter())


def compile_with_variables(fn, variables: Sequence):
    """Compiles `fn` (XLA) so it reads `variables`' *current* values at every call.

    TensorFlow: `tf.function(jit_compile=True)` captures the variables by reference.
    JAX: a jitted function of the variables' values, run under a `StatelessScope`,
    so weights updated after compilation are not baked in as constants.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        _quiet_retracing_warning(tf)
        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    if backend == "jax":
        import jax
        variables = list(variables)

        @jax.jit
        def run(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return lambda *args: run([v.value for v in variables], *args)
    return fn

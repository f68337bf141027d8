"""Each private Keras use in `_keras_compat`, checked against the installed Keras: a
release that changes one fails here, by name, instead of somewhere in training."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_progdist import _keras_compat as compat
from keras_progdist.optimizers import make_optimizer


# Inside a replica context the division itself is covered by tests/test_distribute.py
# (a MirroredStrategy update equals the single-device one).
def test_scale_loss_is_identity_outside_a_replica_context():
    np.testing.assert_allclose(ops.convert_to_numpy(
        compat.scale_loss_for_distribution(ops.convert_to_tensor(3.0))), 3.0)


def test_random_seed_dtype_is_what_the_random_ops_take():
    dtype = compat.random_seed_dtype()
    seed = ops.cast(ops.convert_to_tensor([1, 2]), dtype)
    a = keras.random.normal((3,), seed=compat.TensorSeed(seed))
    b = keras.random.normal((3,), seed=compat.TensorSeed(seed))
    np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_tensor_seed_has_no_state_variable():
    seed = compat.TensorSeed(ops.convert_to_tensor([5, 6]))
    assert not getattr(seed, "state", None)
    assert ops.convert_to_numpy(seed.next()).tolist() == [5, 6]


def test_learning_rate_variable_of_a_float_rate_and_of_a_schedule():
    fixed = keras.optimizers.Adam(learning_rate=1e-3)
    fixed.build([keras.Variable(np.zeros(2, "float32"))])
    variable = compat.learning_rate_variable(fixed)
    assert variable is not None and abs(float(variable.numpy()) - 1e-3) < 1e-9
    scheduled = make_optimizer(1e-3, decay_to_zero_steps=10)
    assert compat.learning_rate_variable(scheduled) is None


def test_jax_train_state_has_the_four_expected_parts():
    parts = compat.unpack_jax_train_state(("t", "n", "o", "m"))
    assert parts == dict(zip(compat.JAX_STATE_FIELDS, "tnom"))
    assert compat.pack_jax_train_state(parts) == ("t", "n", "o", "m")
    with pytest.raises(RuntimeError, match="changed it"):
        compat.unpack_jax_train_state(("t", "n", "o"))


@pytest.mark.jax_only
def test_jax_trainer_still_passes_a_four_part_state_and_syncs_it():
    """The real trainer: train_step gets (state, data) with four parts, and mid-epoch
    the variables are stale until sync_training_state writes the state back."""
    seen = {}

    class Probe(keras.Model):
        def train_step(self, state, data):
            seen["parts"] = len(compat.unpack_jax_train_state(state))
            return super().train_step(state, data)

    class ReadMidEpoch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            compat.sync_training_state(self.model)
            seen["kernel"] = np.array(self.model.layers[-1].kernel.numpy())

    inputs = keras.Input((2,))
    model = Probe(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0,
              callbacks=[ReadMidEpoch()])
    assert seen["parts"] == len(compat.JAX_STATE_FIELDS)
    np.testing.assert_array_equal(seen["kernel"], model.layers[-1].kernel.numpy())


@pytest.mark.tensorflow_only
def test_the_multi_worker_log_reduction_fix_wraps_what_keras_still_calls():
    from keras.src.backend.tensorflow import trainer

    compat.fix_multi_worker_log_reduction()
    compat.fix_multi_worker_log_reduction()  # idempotent: wrapped once
    assert trainer.reduce_per_replica._kpd_fixed
    # Outside a multi-worker strategy the wrapper hands over to Keras unchanged.
    assert trainer.reduce_per_replica({"loss": 1.0}, None, "first") == {"loss": 1.0}


def _streams():
    """One draw from each global stream `set_random_seed` restarts."""
    import random

    return (float(ops.convert_to_numpy(keras.random.normal((1,))[0])),
            float(np.random.rand()), random.random())


def test_set_random_seed_restarts_every_stream_keras_does_but_tensorflows_once():
    keras.utils.set_random_seed(7)
    expected = _streams()
    compat.set_random_seed(7)
    assert _streams() == expected
    compat.set_random_seed(7)  # again: Keras', NumPy's and Python's streams restart
    assert _streams() == expected
    compat.set_random_seed(8)
    assert _streams() != expected
    tf = pytest.importorskip("tensorflow")
    # TensorFlow's global stream is not restarted by a second call with the same seed:
    # restarting it is what clears TensorFlow's function caches.
    compat.set_random_seed(9)
    first = float(tf.random.uniform(()))
    compat.set_random_seed(9)
    assert float(tf.random.uniform(())) != first
    keras.utils.set_random_seed(9)
    assert float(tf.random.uniform(())) == first

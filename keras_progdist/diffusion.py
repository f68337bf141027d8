"""`DiffusionModel`: the teacher, trained with `model.fit`, plus `denoise()` and `sample()`.

Training (continuous time): `t ~ U(0, 1)`, `z_t = alpha_t x + sigma_t eps` with
`alpha_t^2 = sigmoid(logsnr(t))`, `sigma_t^2 = sigmoid(-logsnr(t))`, loss
`w(logsnr) |x - x_hat|^2` with the chosen parameterization and weighting.

EMA: Keras' `Adam(use_ema=True)` overwrites the trained weights with the EMA weights at
the end of every `fit()` (so a resumed run trains on from the EMA), so the model keeps
its own EMA copy of the network (`ema_network`, non-trainable), updated after every
optimizer step inside the compiled train step on both TensorFlow and JAX.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_progdist import losses, parameterizations, samplers
from keras_progdist._keras_compat import (
    pack_jax_train_state,
    scale_loss_for_distribution,
    unpack_jax_train_state,
)
from keras_progdist.compilation import compile_with_variables

# `guided_denoise` is imported from here by guided distillation and the tests.
from keras_progdist.denoising import diffuse, guided_denoise, network_denoise  # noqa: F401
from keras_progdist.networks.unet import UNet
from keras_progdist.random_utils import TensorSeed, fold_in, replica_id
from keras_progdist.schedules import get_schedule

SAMPLERS = ("ddim", "ancestral")


def training_seed(seed_generator):
    """The next seed, made distinct per `tf.distribute` replica."""
    return fold_in(seed_generator.next(), replica_id())


@keras.saving.register_keras_serializable(package="keras_progdist")
class DiffusionModel(keras.Model):
    """A diffusion model over a `UNet`: teacher training, denoising and sampling.

    Args:
        network: a `UNet` (or its config dict).
        schedule: a `Schedule`, a schedule name or config.
        parameterization: `eps`, `x`, `v` or `both`.
        weighting: `snr`, `snr_trunc`, `snr_plus_one` or `constant`.
        ema_decay: EMA decay of the weights (0.9999 for CIFAR); `None` or 0 disables
            the EMA (students). The effective decay warms up as
            `min(decay, (1 + n) / (10 + n))` after `n` updates.
        num_steps: the default number of sampling steps (a distilled stage's own N).
        seed: seed of the training noise.
        max_steps: the most steps `sample()` accepts (a serving bound; `None`, the
            default, is unbounded). Must be >= `num_steps`.
        max_batch: the most images one `sample()` call may produce (`None`: unbounded).
        label_dropout: probability that a training example's label is replaced by the
            null class `num_classes` (classifier-free guidance; 0.1-0.2 is usual). The
            network needs `null_class=True`. Then `sample(label=..., guidance=w)`
            samples from `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`.

    Example:
        >>> model = DiffusionModel(UNet((16, 16, 1), channels=16, channel_mult=(1, 2)))
        >>> model.compile(optimizer=make_optimizer(2e-4))
        >>> model.fit(dataset, steps_per_epoch=100, shuffle=False)  # doctest: +SKIP
        >>> images = model.sample(batch_size=16, num_steps=64, seed=0)  # doctest: +SKIP

    `make_dataset` streams are shuffled already: Keras' default `shuffle=True` cannot
    apply to a `tf.data` stream and only makes `fit` warn that it is ignored.
    """

    def __init__(self, network, schedule="cosine", parameterization: str = "v",
                 weighting: str = "snr_trunc", ema_decay: float | None = 0.9999,
                 num_steps: int = 1024, seed: int = 0, max_steps: int | None = None,
                 max_batch: int | None = None, label_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(network, dict):
            network = keras.saving.deserialize_keras_object(network)
        self.network = network
        self.schedule = get_schedule(schedule)
        self.parameterization = parameterizations.check_parameterization(parameterization)
        self.weighting = losses.check_weighting(weighting)
        channels = network.image_shape[-1]
        expected = parameterizations.output_channels(parameterization, channels)
        if network.output_channels != expected:
            raise ValueError(
                f"The {parameterization!r} parameterization needs a network with "
                f"{expected} output channels, this one has {network.output_channels}."
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        self.max_steps = _optional_positive_int("max_steps", max_steps)
        self.max_batch = _optional_positive_int("max_batch", max_batch)
        if self.max_steps is not None and num_steps > self.max_steps:
            raise ValueError(f"num_steps={num_steps} is above max_steps={self.max_steps}: "
                             "the model could not sample with its own step count.")
        label_dropout = float(label_dropout)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        if label_dropout and not getattr(network, "null_class", False):
            raise ValueError(
                f"label_dropout={label_dropout} replaces labels by the null class: the "
                "network must be class-conditional with UNet(null_class=True).")
        self.label_dropout = label_dropout
        self.ema_decay = float(ema_decay) if ema_decay else None
        self.num_steps = int(num_steps)
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(seed, name="train_seed")
        self.ema_network = None
        if self.ema_decay:
            self.ema_network = UNet.from_config({**network.get_config(),
                                                 "name": "ema_network"})
            self.ema_network.trainable = False
            copy_weights(network, self.ema_network)
        self._compiled_samplers = {}
        # Every variable (both networks', the seed state) exists by now: `call` adds
        # none. Say so, as a `build()` would: otherwise a model never run through
        # `__call__` (a student from `Distiller.student_model`, a reloaded `.keras`
        # model) is "not built", so `save()` warns and `count_params()` raises.
        self.built = True

    # -- properties -----------------------------------------------------------------
    @property
    def image_shape(self) -> tuple:
        return tuple(self.network.image_shape)

    @property
    def num_classes(self):
        return self.network.num_classes

    @property
    def guided(self) -> bool:
        """Whether `sample`/`denoise` take a guidance strength `w`: a classifier-free
        guided network (`null_class`) or a guidance-conditioned one."""
        return bool(self.network.null_class or self.network.guidance_conditioned)

    @property
    def sampling_network(self):
        """The EMA network when there is one, else the trained network."""
        return self.ema_network if self.ema_network is not None else self.network

    # -- keras.Model plumbing ---------------------------------------------------------
    def call(self, inputs, training=False):
        # All training work happens in compute_loss; fit() only needs a forward pass
        # it can ignore. Use denoise() / sample() for predictions.
        return inputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        images = ops.cast(x, "float32")
        label = self._labels(y)
        batch = ops.shape(images)[0]
        seed = training_seed(self.seed_generator)
        t = keras.random.uniform((batch,), seed=TensorSeed(fold_in(seed, 1)))
        eps = keras.random.normal(ops.shape(images), seed=TensorSeed(fold_in(seed, 2)))
        logsnr = self.schedule.logsnr(t)
        z = diffuse(images, eps, logsnr)
        if self.label_dropout:
            label = drop_labels(label, self.label_dropout, self.num_classes,
                                fold_in(seed, 3))
        x_hat, _ = network_denoise(self.network, z, t, self.schedule,
                                   self.parameterization, label, training=training)
        loss = ops.mean(losses.weighted_x_mse(images, x_hat, logsnr, self.weighting))
        return scale_loss_for_distribution(loss)

    def _labels(self, y):
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("This model is class-conditional (num_classes="
                             f"{self.num_classes}); the dataset must yield (image, label).")
        return ops.cast(y, "int32")

    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            state, data = args
            logs, state = super().train_step(state, data)
            return logs, self._ema_update_stateless(state)
        logs = super().train_step(*args)
        self._ema_update()
        return logs

    def _ema_pairs(self):
        return list(zip(self.network.weights, self.ema_network.weights))

    def _ema_decay_at(self, iterations):
        n = ops.cast(iterations, "float32")
        return ops.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

    def _ema_update(self):
        if self.ema_network is None:
            return
        decay = self._ema_decay_at(self.optimizer.iterations)
        for w, w_ema in self._ema_pairs():
            w_ema.assign(decay * w_ema + (1.0 - decay) * ops.cast(w, w_ema.dtype))

    def _ema_update_stateless(self, state):
        if self.ema_network is None:
            return state
        parts = unpack_jax_train_state(state)
        trainable = parts["trainable_variables"]
        non_trainable = list(parts["non_trainable_variables"])
        optimizer_vars = parts["optimizer_variables"]
        index_t = {id(v): i for i, v in enumerate(self.trainable_variables)}
        index_n = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        index_o = {id(v): i for i, v in enumerate(self.optimizer.variables)}
        decay = self._ema_decay_at(optimizer_vars[index_o[id(self.optimizer.iterations)]])
        for w, w_ema in self._ema_pairs():
            j = index_n[id(w_ema)]
            value = trainable[index_t[id(w)]] if id(w) in index_t else \
                non_trainable[index_n[id(w)]]
            non_trainable[j] = decay * non_trainable[j] + (1.0 - decay) * value
        return pack_jax_train_state({**parts, "non_trainable_variables": non_trainable})

    # -- inference ------------------------------------------------------------------
    def denoise(self, z, t, label=None, use_ema: bool = True, clip: bool = False,
                guidance=None):
        """`(x_hat, eps_hat)` at `(z, t)`; EMA weights unless `use_ema=False`.

        Args:
            z: noisy images `[B, H, W, C]`; t: `[B]` in [0, 1]; label: `[B]` or None.
            use_ema: use the EMA network when the model has one.
            guidance: the guidance strength `w` (scalar or `[B]`):
                `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`, `w = 0` being the
                conditional model (see `network_denoise`); None for no guidance.
            clip: clip `x_hat` to [-1, 1] and recompute
                `eps_hat = (z - alpha_t x_hat) / sigma_t` from the clipped value, as the
                samplers do at every step.

        Returns:
            `(x_hat, eps_hat)`, float32 tensors `[B, H, W, C]`.
        """
        network = self.sampling_network if use_ema else self.network
        return network_denoise(network, ops.cast(z, "float32"), ops.cast(t, "float32"),
                               self.schedule, self.parameterization, label, clip=clip,
                               guidance=guidance)

    def sample(self, noise=None, num_steps: int | None = None, seed: int = 0,
               label=None, batch_size: int | None = None, sampler: str = "ddim",
               clip: bool = True, variance: str = "fixed_small", use_ema: bool = True,
               guidance=None):
        """Generates images in [-1, 1].

        Args:
            noise: `z_1` `[B, H, W, C]`; drawn from `seed` when None.
            num_steps: sampling steps (default: the model's `num_steps`).
            seed: seed of the initial noise (and of the ancestral sampler's noise).
            label: `[B]` class labels for class-conditional models.
            batch_size: number of images when `noise` is None.
            sampler: `ddim` (deterministic) or `ancestral`.
            clip: clip `x_hat` to [-1, 1] at every step.
            variance: the ancestral sampler's variance.
            use_ema: sample with the EMA weights when the model has them.
            guidance: the guidance strength `w`, a number or `[B]` (one per image), at
                every step: `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`, so
                `w = 0` is the conditional model. A classifier-free guided model
                (`null_class`) makes one network call per step on a doubled batch; a
                guidance-conditioned (distilled) network takes `w` as an input and
                needs it. None: no guidance.

        Returns:
            float32 numpy array `[B, H, W, C]`.

        Raises:
            ValueError: an unknown sampler, `num_steps < 1` or above `max_steps`, a
                batch of 0 images or above `max_batch`, or noise of the wrong shape;
                the limits are checked before any noise is drawn or anything compiled.
        """
        num_steps, batch = self._check_sample_request(noise, num_steps, batch_size, sampler)
        if noise is None:
            noise = keras.random.normal((batch,) + self.image_shape, seed=seed)
        noise = ops.convert_to_tensor(noise, "float32")
        if self.num_classes:
            if label is None:
                raise ValueError("This model is class-conditional: pass label.")
            label = ops.convert_to_tensor(label, "int32")
        guidance = self._guidance_vector(guidance, batch)
        key = (num_steps, sampler, bool(clip), variance, bool(use_ema), label is not None,
               guidance is not None)
        if key not in self._compiled_samplers:
            self._compiled_samplers[key] = self._make_sampler(*key)
        seed_tensor = ops.convert_to_tensor([seed, 0], "int32")
        args = (noise, seed_tensor) + ((label,) if label is not None else ()) + \
            ((guidance,) if guidance is not None else ())
        return ops.convert_to_numpy(self._compiled_samplers[key](*args))

    def _check_sample_request(self, noise, num_steps, batch_size, sampler):
        """Checks `sample`'s sampler, step count and batch against this model's limits,
        before any noise is drawn or anything compiled.

        Returns:
            `(num_steps, batch)`: the step count (the model's own for None) and the
            number of images.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}.")
        num_steps = self.num_steps if num_steps is None else int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if self.max_steps is not None and num_steps > self.max_steps:
            raise ValueError(f"num_steps={num_steps} is above this model's "
                             f"max_steps={self.max_steps}.")
        if noise is None and batch_size is None:
            raise ValueError("Pass either noise or batch_size.")
        if noise is None:
            batch = int(batch_size)
        else:
            shape = tuple(noise.shape) if hasattr(noise, "shape") else np.shape(noise)
            if len(shape) != 1 + len(self.image_shape) or tuple(shape[1:]) != self.image_shape:
                raise ValueError(f"noise must have shape [B, "
                                 f"{', '.join(map(str, self.image_shape))}], got {shape}.")
            batch = int(shape[0])
        if batch < 1:
            raise ValueError(f"The batch must hold at least 1 image, got a batch of {batch}.")
        if self.max_batch is not None and batch > self.max_batch:
            raise ValueError(f"A batch of {batch} images is above this model's "
                             f"max_batch={self.max_batch}.")
        return num_steps, batch

    def _guidance_vector(self, guidance, batch):
        """`guidance` as float32 `[B]`, after checking the model can be guided."""
        if guidance is None:
            if self.network.guidance_conditioned:
                raise ValueError("This model is guidance-conditioned: pass guidance "
                                 "(the strength w).")
            return None
        if not (self.network.guidance_conditioned or self.network.null_class):
            raise ValueError("guidance needs a model trained for it: a null class "
                             "(UNet(null_class=True), label_dropout > 0) or a "
                             "guidance-conditioned network.")
        values = np.asarray(guidance, np.float32)
        if values.ndim > 1 or (values.ndim == 1 and len(values) != batch):
            raise ValueError(f"guidance must be a number or one per image ([{batch}]), "
                             f"got shape {values.shape}.")
        return ops.convert_to_tensor(np.broadcast_to(values, (batch,)).copy())

    def _make_sampler(self, num_steps, sampler, clip, variance, use_ema, has_label,
                      guided=False):
        network = self.sampling_network if use_ema else self.network

        def run(noise, seed, *conditions):
            label = conditions[0] if has_label else None
            guidance = conditions[-1] if guided else None

            def denoise_fn(z, t):
                return network_denoise(network, z, t, self.schedule,
                                       self.parameterization, label, guidance=guidance)
            if sampler == "ddim":
                return samplers.ddim_sample(denoise_fn, noise, num_steps, self.schedule,
                                            clip=clip)
            return samplers.ancestral_sample(denoise_fn, noise, num_steps, self.schedule,
                                             seed, variance=variance, clip=clip)

        return compile_with_variables(run, network.variables)

    # -- serialization -------------------------------------------------------------
    _SEED_KEY = "train_seed_state"

    def save_own_variables(self, store):
        # Keras does not save SeedGenerator state in .keras files; without it a model
        # resumed from one would replay the training noise from step 0.
        super().save_own_variables(store)
        store[self._SEED_KEY] = ops.convert_to_numpy(self.seed_generator.state.value)

    def load_own_variables(self, store):
        keys = list(store.keys())
        if self._SEED_KEY in keys:
            self.seed_generator.state.assign(store[self._SEED_KEY])
        super().load_own_variables({k: store[k] for k in keys if k != self._SEED_KEY})

    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.network),
            "schedule": self.schedule.get_config(),
            "parameterization": self.parameterization,
            "weighting": self.weighting,
            "ema_decay": self.ema_decay,
            "num_steps": self.num_steps,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "max_batch": self.max_batch,
            "label_dropout": self.label_dropout,
        }

    @classmethod
    def from_config(cls, config):
        # Configs saved before max_steps / max_batch existed load unbounded.
        return cls(**config)


def drop_labels(label, rate, null_label, seed):
    """Label dropout for classifier-free guidance: each label becomes `null_label`
    with probability `rate`.

    Args:
        label: `[B]` int32 labels.
        rate: the dropout probability, in [0, 1).
        null_label: the reserved "no label" class (`num_classes`).
        seed: a `[2]` seed tensor.

    Returns:
        `[B]` int32 labels.
    """
    label = ops.cast(label, "int32")
    dropped = keras.random.uniform(ops.shape(label), seed=TensorSeed(seed)) < rate
    return ops.where(dropped, ops.full_like(label, null_label), label)


def _optional_positive_int(name: str, value):
    """`None`, or `value` as an int >= 1 (a `ValueError` naming `name` otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}.")
    return int(value)


def copy_weights(source, target) -> None:
    """Copies `source`'s weights into `target` (same architecture) as fresh buffers.

    Going through numpy matters on JAX: two variables sharing one device buffer make
    the next donated train step fail ("Attempt to donate the same buffer twice").
    """
    weights = source.get_weights()
    target.set_weights([w.copy() for w in weights])

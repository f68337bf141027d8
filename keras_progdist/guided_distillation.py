"""Guided progressive distillation (Meng et al., "On Distillation of Guided Diffusion
Models", CVPR 2023), stage one: one w-conditioned network for the guided teacher.

A classifier-free guided teacher (a `UNet(null_class=True)` trained with
`DiffusionModel(label_dropout=...)`) needs two evaluations per step,
`x_hat_w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null)` (`w = 0`: the conditional model).
Stage one trains a student `x_hat_eta(z_t, t, c, w)` (`UNet(guidance_conditioned=True)`,
initialized from the teacher's weights) to give it in one evaluation:

    t ~ U(0, 1),  eps ~ N(0, I),  w ~ U[w_min, w_max],  z_t = alpha_t x + sigma_t eps
    loss = W(logsnr_t) |x_hat_w(z_t) - x_hat_eta(z_t, t, c, w)|^2

with the teacher frozen. Stage two is ordinary progressive distillation of that
w-conditioned network (`distillation.Distiller`, which draws `w` per example and gives
teacher and student the same `(c, w)`).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_progdist import losses, parameterizations
from keras_progdist._keras_compat import scale_loss_for_distribution
from keras_progdist.diffusion import (
    DiffusionModel,
    copy_weights,
    diffuse,
    guided_denoise,
    network_denoise,
    training_seed,
)
from keras_progdist.networks.unet import UNet
from keras_progdist.random_utils import TensorSeed, fold_in
from keras_progdist.sampling_model import sampling_model
from keras_progdist.schedules import get_schedule


def copy_matching_weights(source, target) -> list:
    """Copies each of `source`'s weights into the `target` weight of the same path and
    shape (as fresh buffers, see `copy_weights`).

    Args:
        source, target: Keras models (e.g. a guided teacher and its w-conditioned
            student, whose layers share names).

    Returns:
        The paths of `target`'s weights that received nothing (e.g. the student's
        `guidance_embedding`), in order.
    """
    values = {w.path: w for w in source.weights}
    missing = []
    for weight in target.weights:
        match = values.get(weight.path)
        if match is None or tuple(match.shape) != tuple(weight.shape):
            missing.append(weight.path)
            continue
        weight.assign(ops.convert_to_numpy(match).copy())
    return missing


def sample_guidance(batch, w_min, w_max, seed):
    """`w ~ U[w_min, w_max]`, one per example.

    Args:
        batch: the number of examples `B`.
        w_min, w_max: the range of guidance strengths.
        seed: a `[2]` seed tensor.

    Returns:
        float32 `[B]`.
    """
    u = keras.random.uniform((batch,), seed=TensorSeed(seed))
    return w_min + (w_max - w_min) * u


def check_guidance_range(w_min, w_max) -> tuple:
    """`(w_min, w_max)` as floats, if `w_min <= w_max`; else a `ValueError`."""
    w_min, w_max = float(w_min), float(w_max)
    if not w_min <= w_max:
        raise ValueError(f"The guidance range needs w_min <= w_max, got w_min={w_min}, "
                         f"w_max={w_max}.")
    return w_min, w_max


@keras.saving.register_keras_serializable(package="keras_progdist")
class GuidanceDistiller(keras.Model):
    """Stage one of guided distillation: a w-conditioned student learns the guided
    teacher's `x_hat_w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null)` in one evaluation.

    Trained with `model.fit` on `(image, label)` batches. Per example:
    `t ~ U(0, 1)`, `eps ~ N(0, I)`, `w ~ U[w_min, w_max]`,
    `z_t = alpha_t x + sigma_t eps`; the loss is
    `mean_B W(logsnr_t) |x_hat_w - x_hat_student(z_t, t, c, w)|^2` with `W` the
    `weighting`. The teacher is frozen (dropout 0, `training=False`), the target carries
    no gradient, and only the student's weights are trainable.

    Args:
        network: the guided teacher's `UNet` (class-conditional, `null_class=True`,
            not guidance-conditioned), or its config.
        schedule, parameterization: the teacher's (the student predicts through the
            same parameterization).
        weighting: the x-MSE weighting `W` (`snr_trunc`: `max(SNR, 1)`).
        w_min, w_max: the range `w` is drawn from (Meng et al.: [0, 4]).
        seed: seed of `t`, `eps` and `w`.
        student_dropout: dropout of the student's residual blocks.
        guidance_embedding_scale: the student's `UNet.guidance_embedding_scale`.

    The student is `UNet(guidance_conditioned=True)` with the teacher's other settings,
    initialized from the teacher's weights wherever path and shape match (all but the
    guidance embedding, which starts at zero: the student starts as the teacher's
    conditional model, `w = 0`).
    """

    def __init__(self, network, schedule="cosine", parameterization: str = "v",
                 weighting: str = "snr_trunc", w_min: float = 0.0, w_max: float = 4.0,
                 seed: int = 0, student_dropout: float = 0.0,
                 guidance_embedding_scale: float = 250.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(network, dict):
            network = keras.saving.deserialize_keras_object(network)
        config = network.get_config()
        if not config.get("null_class") or config.get("guidance_conditioned"):
            raise ValueError(
                "GuidanceDistiller needs a classifier-free guided teacher: a UNet with "
                "num_classes and null_class=True that is not guidance_conditioned.")
        self.schedule = get_schedule(schedule)
        self.parameterization = parameterizations.check_parameterization(parameterization)
        self.weighting = losses.check_weighting(weighting)
        self.w_min, self.w_max = check_guidance_range(w_min, w_max)
        self.seed = int(seed)
        student_dropout = float(student_dropout)
        if not 0.0 <= student_dropout < 1.0:
            raise ValueError(f"student_dropout must be in [0, 1), got {student_dropout}.")
        self.student_dropout = student_dropout
        self.guidance_embedding_scale = float(guidance_embedding_scale)
        # As in Distiller: both built trainable, the teacher frozen afterwards.
        self.teacher = UNet.from_config({**config, "name": "teacher", "dropout": 0.0,
                                         "trainable": True})
        copy_weights(network, self.teacher)
        self.teacher.trainable = False
        self.student = UNet.from_config({
            **config, "name": "student", "dropout": student_dropout, "trainable": True,
            "guidance_conditioned": True,
            "guidance_embedding_scale": self.guidance_embedding_scale})
        self.uninitialized = copy_matching_weights(network, self.student)
        self.seed_generator = keras.random.SeedGenerator(seed, name="guidance_seed")
        self.built = True  # all variables exist (see DiffusionModel.__init__)

    @property
    def num_classes(self):
        return self.student.num_classes

    def call(self, inputs, training=False):
        # Training happens in compute_loss; see DiffusionModel.call.
        return inputs

    def targets(self, images, label, t, eps, w):
        """`(z_t, x_hat_w)`: the noisy input and the guided teacher's prediction there.

        Args:
            images: `[B, H, W, C]`; label: `[B]` int; t: `[B]` in [0, 1];
            eps: noise like `images`; w: `[B]` guidance strengths.

        Returns:
            `z_t = alpha_t x + sigma_t eps` and `x_hat_w = (1 + w) x_hat(z_t, c) -
            w x_hat(z_t, null)` (one teacher call on the doubled batch, no gradient).
        """
        z_t = diffuse(images, eps, self.schedule.logsnr(t))
        x_hat_w, _ = guided_denoise(self.teacher, z_t, t, label, w, self.schedule,
                                    self.parameterization, training=False)
        return z_t, ops.stop_gradient(x_hat_w)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if y is None:
            raise ValueError("Guided distillation needs (image, label) data.")
        images = ops.cast(x, "float32")
        label = ops.cast(y, "int32")
        batch = ops.shape(images)[0]
        seed = training_seed(self.seed_generator)
        t = keras.random.uniform((batch,), seed=TensorSeed(fold_in(seed, 1)))
        eps = keras.random.normal(ops.shape(images), seed=TensorSeed(fold_in(seed, 2)))
        w = sample_guidance(batch, self.w_min, self.w_max, fold_in(seed, 3))
        z_t, x_hat_w = self.targets(images, label, t, eps, w)
        x_hat, _ = network_denoise(self.student, z_t, t, self.schedule,
                                   self.parameterization, label, training=training,
                                   guidance=w)
        loss = ops.mean(losses.weighted_x_mse(x_hat_w, x_hat, self.schedule.logsnr(t),
                                              self.weighting))
        return scale_loss_for_distribution(loss)

    def student_model(self, num_steps: int = 1024) -> DiffusionModel:
        """The student as an EMA-free `DiffusionModel` (a copy of its weights);
        `model.sample(label=..., guidance=w, ...)` samples it."""
        network = UNet.from_config({**self.student.get_config(), "name": "network",
                                    "dropout": 0.0, "trainable": True})
        copy_weights(self.student, network)
        return sampling_model(network, num_steps, self.schedule, self.parameterization,
                              self.weighting, name="guidance_student")

    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.teacher),
            "schedule": self.schedule.get_config(),
            "parameterization": self.parameterization,
            "weighting": self.weighting,
            "w_min": self.w_min,
            "w_max": self.w_max,
            "seed": self.seed,
            "student_dropout": self.student_dropout,
            "guidance_embedding_scale": self.guidance_embedding_scale,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

"""Progressive distillation (Salimans & Ho 2022, Algorithm 2).

A student with `N` steps learns to match, in one DDIM step, two DDIM steps of a
teacher with `2N` steps. For `i ~ U{1..N}`, `t = i/N`, `t' = t - 0.5/N`, `t'' = t - 1/N`:

    z_t' = alpha_t' x_hat(z_t) + sigma_t' eps_hat(z_t)          (teacher, step 1)
    z_t'' = alpha_t'' x_hat(z_t') + sigma_t'' eps_hat(z_t')     (teacher, step 2)
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)

`x~` is the `x_hat` that makes one student DDIM step from `z_t` land exactly on `z_t''`;
when `t'' = 0` it is the teacher's second `x_hat`. The student minimizes the
weighted x-MSE to `x~` (the paper weights it by truncated SNR, `max(SNR, 1)`).

The teacher runs in inference mode (no dropout); the student trains with
`student_dropout`, 0 by default as in the paper's distillation configs.

Guided distillation, stage two (Meng et al., CVPR 2023): with a guidance-conditioned
network (`UNet(guidance_conditioned=True)`, from `guided_distillation.GuidanceDistiller`)
each example draws `w ~ U[w_min, w_max]`, and the teacher's two steps and the student
use the same `(label, w)`: `x_hat(z, t) = x_hat(z, t, c, w)` above.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_progdist import losses, parameterizations
from keras_progdist._keras_compat import scale_loss_for_distribution
from keras_progdist.diffusion import (
    DiffusionModel,
    copy_weights,
    diffuse,
    network_denoise,
    training_seed,
)
from keras_progdist.guided_distillation import check_guidance_range, sample_guidance
from keras_progdist.networks.unet import UNet
from keras_progdist.optimizers import make_optimizer, reset_optimizer
from keras_progdist.parameterizations import expand_to
from keras_progdist.random_utils import TensorSeed, fold_in
from keras_progdist.samplers import ddim_step
from keras_progdist.sampling_model import sampling_model
from keras_progdist.schedules import Schedule, alpha_sigma, get_schedule, log_sigma_ratio


def teacher_two_steps(teacher_denoise, z_t, t, num_student_steps, schedule: Schedule):
    """Two teacher DDIM steps `z_t -> z_t' -> z_t''` of size `0.5 / N` each.

    Args:
        teacher_denoise: `f(z, t) -> (x_hat, eps_hat)`.
        z_t: `[B, H, W, C]`; t: `[B]`; num_student_steps: `N` (scalar, may be a tensor).

    Returns:
        `(z_t'', x_hat')`: the latent after two steps and the second step's `x_hat`.
    """
    n = ops.cast(num_student_steps, "float32")
    t_mid = t - 0.5 / n
    t_end = t - 1.0 / n
    x_hat, eps_hat = teacher_denoise(z_t, t)
    z_mid = ddim_step(z_t, x_hat, eps_hat, schedule.logsnr(t_mid), t_mid)
    x_hat_mid, eps_hat_mid = teacher_denoise(z_mid, t_mid)
    z_end = ddim_step(z_mid, x_hat_mid, eps_hat_mid, schedule.logsnr(t_end), t_end)
    return z_end, x_hat_mid


def distillation_target(z_t, z_end, x_hat_last, t, t_end, schedule: Schedule):
    """`x~`, the student `x_hat` whose DDIM step `t -> t''` lands on `z_t''`.

    `x~ = (z_t'' - r z_t) / (alpha_t'' - r alpha_t)`, `r = sigma_t'' / sigma_t` computed
    as `exp(log_sigma_ratio)`; at `t'' = 0` the teacher's own `x_hat` is the target.
    """
    logsnr_t, logsnr_end = schedule.logsnr(t), schedule.logsnr(t_end)
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_end, _ = alpha_sigma(logsnr_end)
    ratio = ops.exp(log_sigma_ratio(logsnr_end, logsnr_t))
    denominator = expand_to(alpha_end - ratio * alpha_t, z_t)
    x_tilde = (z_end - expand_to(ratio, z_t) * z_t) / denominator
    return ops.where(expand_to(t_end, z_t) > 0.0, x_tilde, x_hat_last)


@keras.saving.register_keras_serializable(package="keras_progdist")
class Distiller(keras.Model):
    """A frozen teacher and a trainable student, trained with `model.fit`.

    The student's step count `N` is a variable, so one compiled train step serves
    every stage: a new stage copies weights, resets the optimizer and assigns `N`.

    Args:
        network: the teacher's `UNet` (or its config); teacher and student are copies.
        schedule, parameterization: as the teacher's (the student predicts through
            the same parameterization).
        weighting: weighting of the x-MSE to `x~` (`snr_trunc` in the paper).
        num_steps: the student's initial step count `N`.
        seed: seed of `i`, `z_t` noise.
        student_dropout: dropout rate of the student's residual blocks (the paper's
            students use 0 whatever the teacher was trained with).
        w_min, w_max: for a guidance-conditioned `network` (guided distillation, stage
            two), the range of the guidance strength `w` drawn per example; teacher
            and student see the same `(label, w)`. Unused otherwise.

    Only the student's weights are trainable, whatever `network` comes in (an EMA
    network is flagged non-trainable, and that flag travels in its config).
    """

    def __init__(self, network, schedule="cosine", parameterization: str = "v",
                 weighting: str = "snr_trunc", num_steps: int = 1, seed: int = 0,
                 student_dropout: float = 0.0, w_min: float = 0.0, w_max: float = 4.0,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(network, dict):
            network = keras.saving.deserialize_keras_object(network)
        config = network.get_config()
        self.guidance_conditioned = bool(config.get("guidance_conditioned"))
        self.w_min, self.w_max = check_guidance_range(w_min, w_max)
        self.schedule = get_schedule(schedule)
        self.parameterization = parameterizations.check_parameterization(parameterization)
        self.weighting = losses.check_weighting(weighting)
        self.seed = int(seed)
        student_dropout = float(student_dropout)
        if not 0.0 <= student_dropout < 1.0:
            raise ValueError(f"student_dropout must be in [0, 1), got {student_dropout}.")
        self.student_dropout = student_dropout
        # Both are built trainable and the teacher is frozen afterwards: a network built
        # with trainable=False in its config (an EMA network's) keeps its layers'
        # variables flagged trainable, and this model would collect them. The teacher
        # only ever runs with training=False; dropout 0 makes that explicit.
        self.teacher = UNet.from_config({**config, "name": "teacher", "dropout": 0.0,
                                         "trainable": True})
        self.student = UNet.from_config({**config, "name": "student",
                                         "dropout": student_dropout, "trainable": True})
        copy_weights(network, self.teacher)
        copy_weights(network, self.student)
        self.teacher.trainable = False
        self.num_steps = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(float(num_steps)),
            trainable=False, name="student_steps")
        self.seed_generator = keras.random.SeedGenerator(seed, name="distill_seed")
        self.built = True  # all variables exist (see DiffusionModel.__init__)

    @property
    def num_classes(self):
        return self.student.num_classes

    def call(self, inputs, training=False):
        # Training happens in compute_loss; see DiffusionModel.call.
        return inputs

    def start_stage(self, network, num_steps: int) -> None:
        """Begins a stage: teacher and student both become `network`; N = `num_steps`.

        Only the weights, `N` and the random streams (`reset_random_state`) change;
        the optimizer is left as it is. To run a stage with `fit`, use
        `prepare_stage`, which also gives the stage a fresh optimizer and
        learning-rate schedule.
        """
        copy_weights(network, self.teacher)
        copy_weights(network, self.student)
        self.num_steps.assign(float(num_steps))
        self.reset_random_state(num_steps)

    def reset_random_state(self, num_steps: int) -> None:
        """Sets every random stream of this model (the training noise and any student
        dropout) to the start of the stage to `num_steps` steps.

        The streams advance with every update, so without this a stage would start
        wherever the previous stage in the same process left them, and a stage run in
        a fresh process (a resumed or re-run ladder) would draw other noise than the
        same stage run after its predecessors. Each stream's start is a function of
        `seed`, `num_steps` and its position among the model's streams alone; a
        resumed stage then restores the stream's state from its checkpoint.

        Args:
            num_steps: the stage's student step count `N`.
        """
        weights = {id(w) for w in self.weights}
        # `variables` extends `weights` by the random streams' states (SeedGenerators).
        streams = [v for v in self.variables if id(v) not in weights]
        for index, state in enumerate(streams):
            start = np.random.SeedSequence([self.seed, int(num_steps), index])
            first = int(start.generate_state(1)[0]) % 2**31
            state.assign(np.array([first, 0]).astype(state.dtype))

    def prepare_stage(self, network, num_steps: int, updates: int,
                      learning_rate: float = 5e-5, global_clipnorm: float | None = 1.0,
                      jit_compile: bool = True, steps_per_execution: int = 1,
                      learning_rate_schedule: str = "linear") -> None:
        """Makes the next `fit` of `updates` steps one whole stage to `num_steps` steps.

        By default the learning rate decays linearly from `learning_rate` to 0 over the
        stage (`LinearToZero`), so the schedule must be as long as the stage: the model
        is (re)compiled when the stage length or settings change (one compilation
        serves every stage of one length), and the optimizer's slots and step are
        zeroed. Without this, a second stage would start where the first one's rate
        ended: 0.

        Args:
            network: the new stage's teacher (e.g. the previous stage's `student`).
            num_steps: the student's step count `N`.
            updates: optimizer updates of the stage (what the next `fit` will run).
            learning_rate, global_clipnorm: Adam settings of the stage.
            jit_compile, steps_per_execution: as in `compile`.
            learning_rate_schedule: `linear` (to 0 over the stage) or `constant`.
        """
        if learning_rate_schedule not in ("linear", "constant"):
            raise ValueError(f"learning_rate_schedule must be 'linear' or 'constant', got "
                             f"{learning_rate_schedule!r}.")
        settings = (int(updates), float(learning_rate), global_clipnorm, bool(jit_compile),
                    int(steps_per_execution), learning_rate_schedule)
        if getattr(self, "_stage_settings", None) != settings:
            decay = updates if learning_rate_schedule == "linear" else None
            self.compile(optimizer=make_optimizer(learning_rate, decay_to_zero_steps=decay,
                                                  global_clipnorm=global_clipnorm),
                         jit_compile=jit_compile, steps_per_execution=steps_per_execution)
            self.optimizer.build(self.trainable_variables)
            self._stage_settings = settings
        self.start_stage(network, num_steps)
        reset_optimizer(self.optimizer)

    def student_model(self, num_steps: int | None = None) -> "DiffusionModel":
        """The student as a `DiffusionModel` that samples in `num_steps` (default `N`).

        It holds a copy of the student's weights, so it stays as it is when training
        goes on. `model.sample(batch_size=16, seed=0)` samples it.
        """
        network = UNet.from_config({**self.student.get_config(), "name": "network",
                                    "dropout": 0.0, "trainable": True})
        copy_weights(self.student, network)
        steps = int(ops.convert_to_numpy(self.num_steps)) if num_steps is None else num_steps
        return sampling_model(network, steps, self.schedule, self.parameterization,
                              self.weighting, name=f"student_{steps}")

    def distill_ladder(self, dataset, min_steps: int = 1, updates_per_stage: int = 1000,
                       learning_rate: float = 5e-5, callbacks=None, verbose: int = 1,
                       jit_compile: bool = True, steps_per_execution: int = 1) -> list:
        """Distills stage after stage: `N -> N/2 -> ... -> min_steps` steps.

        Stage one distills the current teacher (the network this `Distiller` was built
        from, or the last `start_stage`) into `N` = `num_steps` steps; each next stage
        takes the previous student as its teacher and halves `N`.

        Args:
            dataset: training data, as for `fit` (repeating, e.g. a tf.data pipeline).
            min_steps: step count of the last stage.
            updates_per_stage: optimizer updates of each stage (the paper: 50k).
            learning_rate: start of each stage's linear decay to 0.
            callbacks, verbose: passed to every stage's `fit`.
            jit_compile, steps_per_execution: as in `compile`.

        Returns:
            One `DiffusionModel` per stage, in order (`N`, `N/2`, ...), each sampling in
            its own step count.
        """
        num_steps = int(ops.convert_to_numpy(self.num_steps))
        if min_steps < 1 or min_steps > num_steps:
            raise ValueError(f"min_steps must be in [1, {num_steps}], got {min_steps}.")
        students, network = [], self.teacher
        while num_steps >= min_steps:
            self.prepare_stage(network, num_steps, updates_per_stage, learning_rate,
                               jit_compile=jit_compile,
                               steps_per_execution=steps_per_execution)
            self.fit(dataset, epochs=1, steps_per_epoch=updates_per_stage,
                     callbacks=callbacks, verbose=verbose, shuffle=False)
            students.append(self.student_model(num_steps))
            network = students[-1].network
            num_steps //= 2
        return students

    def _denoiser(self, network, label, training, w=None):
        def denoise(z, t):
            return network_denoise(network, z, t, self.schedule, self.parameterization,
                                   label, training=training, guidance=w)
        return denoise

    def targets(self, images, label, t_index_u, eps, w=None):
        """`(z_t, t, x~)` for images, uniform draws (-> `i`) and noise; no gradient.

        Args:
            images: `[B, H, W, C]`; label: `[B]` int or None.
            t_index_u: `[B]` uniform draws in [0, 1) (`i = min(floor(u N) + 1, N)`).
            eps: noise like `images`.
            w: `[B]` guidance strengths for a guidance-conditioned teacher (both of its
                steps use the example's `w`), else None.

        Returns:
            `z_t`, `t = i / N` and the target `x~` (see `distillation_target`).
        """
        n = ops.cast(self.num_steps, "float32")
        i = ops.minimum(ops.floor(t_index_u * n) + 1.0, n)
        t = i / n
        z_t = diffuse(images, eps, self.schedule.logsnr(t))
        teacher = self._denoiser(self.teacher, label, training=False, w=w)
        z_end, x_hat_last = teacher_two_steps(teacher, z_t, t, n, self.schedule)
        x_tilde = distillation_target(z_t, z_end, x_hat_last, t, t - 1.0 / n,
                                      self.schedule)
        return z_t, t, ops.stop_gradient(x_tilde)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if self.num_classes and y is None:
            raise ValueError("Class-conditional distillation needs (image, label) data.")
        images = ops.cast(x, "float32")
        label = ops.cast(y, "int32") if self.num_classes else None
        seed = training_seed(self.seed_generator)
        u = keras.random.uniform((ops.shape(images)[0],), seed=TensorSeed(fold_in(seed, 1)))
        eps = keras.random.normal(ops.shape(images), seed=TensorSeed(fold_in(seed, 2)))
        w = None
        if self.guidance_conditioned:
            w = sample_guidance(ops.shape(images)[0], self.w_min, self.w_max,
                                fold_in(seed, 3))
        z_t, t, x_tilde = self.targets(images, label, u, eps, w)
        x_hat, _ = self._denoiser(self.student, label, training, w)(z_t, t)
        loss = ops.mean(losses.weighted_x_mse(x_tilde, x_hat, self.schedule.logsnr(t),
                                              self.weighting))
        return scale_loss_for_distribution(loss)

    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.student),
            "schedule": self.schedule.get_config(),
            "parameterization": self.parameterization,
            "weighting": self.weighting,
            "num_steps": int(ops.convert_to_numpy(self.num_steps)),
            "seed": self.seed,
            "student_dropout": self.student_dropout,
            "w_min": self.w_min,
            "w_max": self.w_max,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

"""The serving graph: the three signatures of a stage's SavedModel, with every input
checked inside the graph. Imports TensorFlow (the package imports this module lazily).

    serving_default  seed int32 [B] (+ label int32 [B]) (+ guidance float32 [B])
                     -> images uint8 [B, H, W, C]
                     DDIM in the stage's own N steps from `noise_from_seeds(seed)`, clipped
    generate         noise float32 [B, H, W, C], steps int32 [] (+ label) (+ guidance)
                     -> images float32 [B, H, W, C] in [-1, 1] (DDIM, clipped)
    denoise          z float32 [B, H, W, C], t float32 [B] (+ label) (+ guidance)
                     -> x_hat, eps_hat float32 [B, H, W, C]

`label` is an input of class-conditional models; `guidance` (the strength `w` per
image, `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`, `w = 0` the conditional
model) of guided ones: a classifier-free guided teacher (one network call on a doubled
batch per step) or a guidance-conditioned (distilled) network, which takes `w` as input.

The whole DDIM loop is in the graph (`samplers.ddim_sample`, the same function
`DiffusionModel.sample` runs), so one model serves any step count up to a limit. Shapes
are checked with `tf.ensure_shape` (a loaded signature, like TF Serving, runs whatever
shape it is fed), values with `tf.debugging` asserts (negative seed, label outside
`[0, num_classes)`, a non-finite guidance, non-finite or huge (> `MAX_ABS_LATENT`)
noise or z, `steps <= 0`, `t` outside [0, 1]), and the
serving limits fixed at
export: `1 <= B <= max_batch` in every signature, `steps <= max_steps` in `generate`,
and `steps x (B + 16) <= max_cost` (the request's cost, `settings.request_cost`) in
`generate` and `serving_default`.
A bad request fails with `InvalidArgumentError` and the model keeps serving.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_progdist import samplers
from keras_progdist.diffusion import DiffusionModel, network_denoise
from keras_progdist.export.errors import ExportError
from keras_progdist.export.settings import STEP_OVERHEAD_IMAGES, serving_limits

# The largest |value| `generate` takes as noise and `denoise` as z. The latents are
# standard normal draws (z_t = alpha x + sigma eps with x in [-1, 1]), so |value| > 10
# is already beyond any draw; 1e4 leaves room for deliberately scaled noise.
MAX_ABS_LATENT = 1e4


def noise_from_seeds(seeds, image_shape):
    """`z_1` for each seed: `tf.random.stateless_normal(image_shape, seed=[s, 0])`.

    Noise is drawn per seed, so an image depends only on its own seed, whatever else
    shares the batch (TF Serving's request batching stays invisible).
    """
    seeds = tf.convert_to_tensor(seeds, tf.int32)
    return tf.map_fn(
        lambda s: tf.random.stateless_normal(tuple(image_shape), seed=tf.stack([s, 0])),
        seeds, fn_output_signature=tf.float32)


def to_uint8(images):
    """[-1, 1] floats -> uint8 `round((x + 1) * 127.5)` (as `images.to_uint8`)."""
    return tf.cast(tf.clip_by_value(tf.round((images + 1.0) * 127.5), 0.0, 255.0),
                   tf.uint8)


def _label_checks(label, batch, num_classes, batch_input):
    return [
        tf.debugging.assert_equal(
            tf.shape(label)[0], batch,
            message=f"label must hold one class per {batch_input} (same batch size)"),
        tf.debugging.assert_non_negative(
            label, message=f"label must be in [0, {num_classes})"),
        tf.debugging.assert_less(
            label, tf.constant(num_classes, tf.int32),
            message=f"label must be in [0, {num_classes})"),
    ]


def _batch_checks(x, input_name, max_batch):
    """Asserts `1 <= len(x) <= max_batch`, naming the input and the limit.

    An empty batch would otherwise die deep in the sampler with `Incompatible shapes`,
    and an unbounded one lets a single request take all the server's memory.
    """
    size = tf.shape(x)[0]
    return [
        tf.debugging.assert_positive(
            size, message=f"{input_name} is empty: send at least one (batch size 0)"),
        tf.debugging.assert_less_equal(
            size, tf.constant(max_batch, tf.int32),
            message=f"{input_name} holds more than max_batch={max_batch} entries (the "
                    "limit set at export): split the request"),
    ]


def _cost_check(steps, batch, input_name, max_cost, after):
    """Asserts `request_cost(steps, batch) <= max_cost` (in int64: no overflow): a
    request within `max_steps` and `max_batch` alone could still run for minutes.

    Runs after the checks `after`, so a request over `max_steps` or `max_batch` is
    named by those limits, whichever op TensorFlow happens to run first.
    """
    with tf.control_dependencies(after):
        cost = tf.cast(steps, tf.int64) * (tf.cast(batch, tf.int64)
                                           + STEP_OVERHEAD_IMAGES)
        return [tf.debugging.assert_less_equal(
            cost, tf.constant(max_cost, tf.int64),
            message=f"steps x ({input_name} batch + {STEP_OVERHEAD_IMAGES}) must be <= "
                    f"max_cost={max_cost} (the cost limit set at export): ask for fewer "
                    "images or steps per request")]


def _guidance_checks(guidance, batch, batch_input):
    return [
        tf.debugging.assert_equal(
            tf.shape(guidance)[0], batch,
            message=f"guidance must hold one strength per {batch_input} (same batch "
                    "size)"),
        tf.debugging.assert_equal(
            tf.reduce_all(tf.math.is_finite(guidance)), True,
            message="guidance must be finite"),
    ]


def _latent_checks(x, input_name):
    """Asserts that every value of the latent `x` is finite and at most
    `MAX_ABS_LATENT` in magnitude, naming the input.

    NaN or inf noise, or values so large that squaring them overflows float32 (1e38),
    would otherwise come back as NaN images with no error.
    """
    return [tf.debugging.assert_equal(
        tf.reduce_all(tf.math.is_finite(x) & (tf.abs(x) <= MAX_ABS_LATENT)), True,
        message=f"{input_name} must be finite with every |value| <= {MAX_ABS_LATENT:g} "
                "(standard normal noise: NaN, inf or huge values give NaN images)")]


def _with_checks(checks, *tensors):
    with tf.control_dependencies(checks):
        return tuple(None if x is None else tf.identity(x) for x in tensors)


def _shaped(x, shape):
    """`x` checked at run time to have `shape` (None passes through).

    Loaded signatures do not enforce their declared shapes (nor does TF Serving), and
    constant folding drops rank asserts, so the check is an op: "Shape of tensor
    <input> [...] is not compatible with expected shape [...]".
    """
    return None if x is None else tf.ensure_shape(x, shape)


class _Signatures:
    """The three signature functions of one model, each checking its inputs in the graph.

    Args:
        model: the `DiffusionModel` (its sampling network is served).
        num_steps: the step count of `serve`.
        max_steps, max_batch, max_cost: the serving limits (`serving_limits`).
    """

    def __init__(self, model: DiffusionModel, num_steps, max_steps, max_batch, max_cost):
        self.network = model.sampling_network
        self.schedule, self.parameterization = model.schedule, model.parameterization
        self.image_shape = tuple(model.image_shape)
        self.image_spec = [None, *self.image_shape]
        self.num_classes = model.num_classes
        self.num_steps, self.max_steps = num_steps, max_steps
        self.max_batch, self.max_cost = max_batch, max_cost

    def _denoise(self, z, t, label, guidance):
        return network_denoise(self.network, z, t, self.schedule, self.parameterization,
                               label, guidance=guidance)

    def _ddim(self, noise, steps, label, guidance):
        return samplers.ddim_sample(lambda z, t: self._denoise(z, t, label, guidance),
                                    noise, steps, self.schedule, clip=True)

    def _condition_checks(self, batch, batch_input, label, guidance):
        checks = []
        if label is not None:
            checks += _label_checks(label, batch, self.num_classes, batch_input)
        if guidance is not None:
            checks += _guidance_checks(guidance, batch, batch_input)
        return checks

    def serve(self, seed, label=None, guidance=None):
        """`serving_default`: uint8 images from per-image seeds, in `num_steps`."""
        seed, label = _shaped(seed, [None]), _shaped(label, [None])
        guidance = _shaped(guidance, [None])
        checks = _batch_checks(seed, "seed", self.max_batch)
        checks.append(tf.debugging.assert_non_negative(seed, message="seed must be >= 0"))
        checks += _cost_check(self.num_steps, tf.shape(seed)[0], "seed", self.max_cost,
                              checks)
        checks += self._condition_checks(tf.shape(seed)[0], "seed", label, guidance)
        seed, label, guidance = _with_checks(checks, seed, label, guidance)
        noise = noise_from_seeds(seed, self.image_shape)
        return {"images": to_uint8(self._ddim(noise, self.num_steps, label, guidance))}

    def generate(self, noise, steps, label=None, guidance=None):
        """`generate`: float images in [-1, 1] from given noise, in `steps` steps."""
        noise, steps = _shaped(noise, self.image_spec), _shaped(steps, [])
        label, guidance = _shaped(label, [None]), _shaped(guidance, [None])
        checks = _batch_checks(noise, "noise", self.max_batch) + [
            tf.debugging.assert_positive(steps, message="steps must be >= 1"),
            # The loop runs `steps` network evaluations: refuse before the first one.
            tf.debugging.assert_less_equal(
                steps, tf.constant(self.max_steps, tf.int32),
                message=f"steps must be <= max_steps={self.max_steps} (the limit set at "
                        "export)")]
        checks += _cost_check(steps, tf.shape(noise)[0], "noise", self.max_cost, checks)
        checks += _latent_checks(noise, "noise")
        checks += self._condition_checks(tf.shape(noise)[0], "noise image", label, guidance)
        noise, steps, label, guidance = _with_checks(checks, noise, steps, label, guidance)
        return {"images": self._ddim(noise, steps, label, guidance)}

    def denoise(self, z, t, label=None, guidance=None):
        """`denoise`: `x_hat` and `eps_hat` at `(z, t)`."""
        z, t, label = _shaped(z, self.image_spec), _shaped(t, [None]), _shaped(label, [None])
        guidance = _shaped(guidance, [None])
        checks = _batch_checks(z, "z", self.max_batch) + [
            tf.debugging.assert_equal(tf.shape(t)[0], tf.shape(z)[0],
                                      message="t must hold one time per z"),
            tf.debugging.assert_greater_equal(t, 0.0, message="t must be in [0, 1]"),
            tf.debugging.assert_less_equal(t, 1.0, message="t must be in [0, 1]")]
        checks += _latent_checks(z, "z")
        checks += self._condition_checks(tf.shape(z)[0], "z", label, guidance)
        z, t, label, guidance = _with_checks(checks, z, t, label, guidance)
        x_hat, eps_hat = self._denoise(z, t, label, guidance)
        return {"x_hat": x_hat, "eps_hat": eps_hat}


def build_archive(model: DiffusionModel, num_steps: int | None = None,
                  max_steps: int | None = None, max_batch: int | None = None,
                  max_cost: int | None = None):
    """A `keras.export.ExportArchive` with the three signatures of `model`.

    Args:
        model: a `DiffusionModel` (its sampling network is exported).
        num_steps: the step count of `serving_default` (default: `model.num_steps`).
        max_steps: the most `steps` `generate` accepts (see `serving_limits`).
        max_batch: the most images per request in every signature (see `serving_limits`).
        max_cost: the most a `generate` or `serving_default` request may cost
            (`settings.request_cost`; see `serving_limits`).

    Returns:
        The archive; `archive.write_out(path)` writes the SavedModel.
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError("SavedModel export needs the TensorFlow backend; use "
                          "export_workdir, which runs a TensorFlow subprocess.")
    num_steps = int(num_steps or model.num_steps)
    limits = serving_limits(num_steps, max_steps, max_batch, max_cost=max_cost)
    if model.guided and not model.num_classes:
        raise ExportError("Export of a guided model needs a class-conditional one.")
    signatures = _Signatures(model, num_steps, limits["max_steps"], limits["max_batch"],
                             limits["max_cost"])
    image_spec = signatures.image_spec
    # Positional order (seed / noise, steps / z, t), label, guidance: a guided model is
    # class-conditional (checked above), so guidance never lands on `label`.
    condition_specs = ([tf.TensorSpec([None], tf.int32, name="label")]
                       if model.num_classes else [])
    if model.guided:
        condition_specs.append(tf.TensorSpec([None], tf.float32, name="guidance"))
    archive = keras.export.ExportArchive()
    archive.track(signatures.network)
    archive.add_endpoint(
        "serving_default", signatures.serve,
        [tf.TensorSpec([None], tf.int32, name="seed")] + condition_specs)
    archive.add_endpoint(
        "generate", signatures.generate,
        [tf.TensorSpec(image_spec, tf.float32, name="noise"),
         tf.TensorSpec([], tf.int32, name="steps")] + condition_specs)
    archive.add_endpoint(
        "denoise", signatures.denoise,
        [tf.TensorSpec(image_spec, tf.float32, name="z"),
         tf.TensorSpec([None], tf.float32, name="t")] + condition_specs)
    return archive

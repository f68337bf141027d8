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
    max_steps, max_batch, max_cost = (limits["max_steps"], limits["max_batch"],
                                      limits["max_cost"])
    network = model.sampling_network
    schedule, parameterization = model.schedule, model.parameterization
    height, width, channels = model.image_shape
    image_shape = (height, width, channels)
    num_classes = model.num_classes
    guided = model.guided
    if guided and not num_classes:
        raise ExportError("Export of a guided model needs a class-conditional one.")

    def ddim(noise, steps, label, guidance):
        def denoise_fn(z, t):
            return network_denoise(network, z, t, schedule, parameterization, label,
                                   guidance=guidance)
        return samplers.ddim_sample(denoise_fn, noise, steps, schedule, clip=True)

    image_spec = [None, height, width, channels]

    def shaped(x, shape):
        # Loaded signatures do not enforce their declared shapes (nor does TF Serving),
        # and constant folding drops rank asserts, so check at run time: "Shape of
        # tensor <input> [...] is not compatible with expected shape [...]".
        return None if x is None else tf.ensure_shape(x, shape)

    def conditions(batch, batch_input, label, guidance):
        checks = []
        if label is not None:
            checks += _label_checks(label, batch, num_classes, batch_input)
        if guidance is not None:
            checks += _guidance_checks(guidance, batch, batch_input)
        return checks

    def serve(seed, label=None, guidance=None):
        seed, label = shaped(seed, [None]), shaped(label, [None])
        guidance = shaped(guidance, [None])
        checks = _batch_checks(seed, "seed", max_batch)
        checks.append(tf.debugging.assert_non_negative(seed, message="seed must be >= 0"))
        checks += _cost_check(num_steps, tf.shape(seed)[0], "seed", max_cost, checks)
        checks += conditions(tf.shape(seed)[0], "seed", label, guidance)
        seed, label, guidance = _with_checks(checks, seed, label, guidance)
        noise = noise_from_seeds(seed, image_shape)
        return {"images": to_uint8(ddim(noise, num_steps, label, guidance))}

    def generate(noise, steps, label=None, guidance=None):
        noise, steps = shaped(noise, image_spec), shaped(steps, [])
        label, guidance = shaped(label, [None]), shaped(guidance, [None])
        checks = _batch_checks(noise, "noise", max_batch) + [
            tf.debugging.assert_positive(steps, message="steps must be >= 1"),
            # The loop runs `steps` network evaluations: refuse before the first one.
            tf.debugging.assert_less_equal(
                steps, tf.constant(max_steps, tf.int32),
                message=f"steps must be <= max_steps={max_steps} (the limit set at "
                        "export)")]
        checks += _cost_check(steps, tf.shape(noise)[0], "noise", max_cost, checks)
        checks += _latent_checks(noise, "noise")
        checks += conditions(tf.shape(noise)[0], "noise image", label, guidance)
        noise, steps, label, guidance = _with_checks(checks, noise, steps, label, guidance)
        return {"images": ddim(noise, steps, label, guidance)}

    def denoise(z, t, label=None, guidance=None):
        z, t, label = shaped(z, image_spec), shaped(t, [None]), shaped(label, [None])
        guidance = shaped(guidance, [None])
        checks = _batch_checks(z, "z", max_batch) + [
            tf.debugging.assert_equal(tf.shape(t)[0], tf.shape(z)[0],
                                      message="t must hold one time per z"),
            tf.debugging.assert_greater_equal(t, 0.0, message="t must be in [0, 1]"),
            tf.debugging.assert_less_equal(t, 1.0, message="t must be in [0, 1]")]
        checks += _latent_checks(z, "z")
        checks += conditions(tf.shape(z)[0], "z", label, guidance)
        z, t, label, guidance = _with_checks(checks, z, t, label, guidance)
        x_hat, eps_hat = network_denoise(network, z, t, schedule, parameterization, label,
                                         guidance=guidance)
        return {"x_hat": x_hat, "eps_hat": eps_hat}

    # Positional order (seed / noise, steps / z, t), label, guidance: a guided model is
    # class-conditional (checked above), so guidance never lands on `label`.
    label_spec = [tf.TensorSpec([None], tf.int32, name="label")] if num_classes else []
    if guided:
        label_spec.append(tf.TensorSpec([None], tf.float32, name="guidance"))
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(
        "serving_default", serve,
        [tf.TensorSpec([None], tf.int32, name="seed")] + label_spec)
    archive.add_endpoint(
        "generate", generate,
        [tf.TensorSpec(image_spec, tf.float32, name="noise"),
         tf.TensorSpec([], tf.int32, name="steps")] + label_spec)
    archive.add_endpoint(
        "denoise", denoise,
        [tf.TensorSpec(image_spec, tf.float32, name="z"),
         tf.TensorSpec([None], tf.float32, name="t")] + label_spec)
    return archive

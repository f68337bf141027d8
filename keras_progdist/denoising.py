"""The network as a denoiser, and the forward process it inverts.

`network_denoise` turns a network's raw output at `(z_t, t)` into `(x_hat, eps_hat)`
under a parameterization, guided or not (`guided_denoise`: classifier-free guidance on a
doubled batch); `diffuse` makes `z_t = alpha_t x + sigma_t eps`. Teacher training,
sampling, distillation and the serving graph all go through these functions, so they
agree on what a network predicts.
"""

from __future__ import annotations

from keras import ops

from keras_progdist import parameterizations, samplers
from keras_progdist.schedules import Schedule, alpha_sigma


def network_denoise(network, z, t, schedule: Schedule, parameterization: str,
                    label=None, training: bool = False, clip: bool = False,
                    guidance=None):
    """`(x_hat, eps_hat)` of a network at `(z, t)` under a parameterization.

    `guidance` is the guidance strength `w` (`x_hat_w = (1 + w) x_hat(z, c) -
    w x_hat(z, null)`, so `w = 0` is the conditional model). What it does depends on
    the network:

    * a `guidance_conditioned` network takes `w` as its input (`guidance` required);
    * any other network with `guidance` given is guided classifier-free
      (`guided_denoise`: one call on the doubled batch; needs `null_class`);
    * otherwise `guidance` must be None and the network is called once as it is.

    Args:
        network: a `UNet` (or any model taking `[z, t]`, `[z, t, label]` or
            `[z, t, label, w]`).
        z: `[B, H, W, C]`; t: `[B]` in [0, 1]; label: `[B]` int or None.
        schedule: the `Schedule` giving `logsnr(t)`.
        parameterization: one of `parameterizations.PARAMETERIZATIONS`.
        training: passed to the network (dropout).
        clip: clip `x_hat` to [-1, 1] and recompute `eps_hat = (z - alpha x_hat) / sigma`
            from it (`parameterizations.clip_x_hat`).
        guidance: `w`, a scalar or `[B]`, or None.

    Returns:
        `(x_hat, eps_hat)`, float32 `[B, H, W, C]` each.
    """
    z = ops.convert_to_tensor(z, "float32")
    t = ops.convert_to_tensor(t, "float32")
    w_input = getattr(network, "guidance_conditioned", False)
    if guidance is not None and not w_input:
        return guided_denoise(network, z, t, label, guidance, schedule, parameterization,
                              training=training, clip=clip)
    inputs = [z, t] if label is None else [z, t, ops.convert_to_tensor(label, "int32")]
    if w_input:
        if guidance is None:
            raise ValueError("This network is guidance-conditioned: pass guidance "
                             "(the strength w).")
        inputs.append(samplers._per_example(guidance, z))
    output = network(inputs, training=training)
    x_hat, eps_hat, _ = parameterizations.predict(
        output, z, schedule.logsnr(t), parameterization, clip_x=clip)
    return x_hat, eps_hat


def guided_denoise(network, z, t, label, w, schedule: Schedule, parameterization: str,
                   training: bool = False, clip: bool = False):
    """Classifier-free guidance: `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`.

    `w = 0` is the conditional model. One network call on the doubled batch
    `[z; z]`, `[t; t]`, `[c; null]` (`null = network.num_classes`, the row a
    `null_class` U-Net reserves) gives both predictions; they are combined in x-space
    and `eps_hat` follows from `x_hat_w` and `z` (`parameterizations.guide`).

    Args:
        network: a class-conditional `UNet` with `null_class=True`.
        z: `[B, H, W, C]`; t: `[B]`; label: `[B]` int (the condition `c`).
        w: guidance strength, a scalar or `[B]`.
        schedule, parameterization, training, clip: as in `network_denoise`.

    Returns:
        `(x_hat_w, eps_hat_w)`, float32 `[B, H, W, C]` each.
    """
    if not getattr(network, "null_class", False):
        raise ValueError("Classifier-free guidance needs a network with a null class "
                         "(UNet(null_class=True)), trained with label dropout.")
    if label is None:
        raise ValueError("Classifier-free guidance needs a label.")
    z = ops.convert_to_tensor(z, "float32")
    t = ops.convert_to_tensor(t, "float32")
    label = ops.convert_to_tensor(label, "int32")
    null = ops.full_like(label, network.num_classes)
    output = network([ops.concatenate([z, z], axis=0), ops.concatenate([t, t], axis=0),
                      ops.concatenate([label, null], axis=0)], training=training)
    logsnr = schedule.logsnr(t)
    x_hat, eps_hat, _ = parameterizations.predict(
        output, ops.concatenate([z, z], axis=0), ops.concatenate([logsnr, logsnr], axis=0),
        parameterization)
    x_hat_cond, x_hat_null = ops.split(x_hat, 2, axis=0)
    eps_hat_cond, eps_hat_null = ops.split(eps_hat, 2, axis=0)
    return parameterizations.guide(x_hat_cond, eps_hat_cond, x_hat_null, eps_hat_null, z,
                                   logsnr, w, parameterization, clip_x=clip)


def diffuse(x, eps, logsnr):
    """`z = alpha x + sigma eps` for per-example `logsnr` `[B]`.

    Args:
        x: clean images `[B, H, W, C]`; eps: noise, same shape; logsnr: `[B]`.

    Returns:
        `z`, `[B, H, W, C]`.
    """
    alpha, sigma = alpha_sigma(logsnr)
    return parameterizations.expand_to(alpha, x) * x + \
        parameterizations.expand_to(sigma, x) * eps

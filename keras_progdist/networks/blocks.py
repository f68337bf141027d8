"""The layers a `UNet` is built of: the sinusoidal time embedding, the residual block
and the self-attention block of DDPM / Salimans & Ho (2022).

Each is registered as a Keras serializable under the package `keras_progdist`, and each
knows nothing of diffusion.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

PACKAGE = "keras_progdist"


def norm_groups(channels: int, num_groups: int) -> int:
    """GroupNorm groups: at most `num_groups`, at least 4 channels a group.

    The time/class embedding is added per channel before a GroupNorm; with one channel
    a group the norm subtracts it away and the network ignores `t` and the label.
    """
    groups = max(1, min(num_groups, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


@keras.saving.register_keras_serializable(package=PACKAGE)
class TimeEmbedding(layers.Layer):
    """Sinusoidal embedding of `t in [0, 1]` followed by two Dense layers.

    `emb = [sin(1000 t w_k), cos(1000 t w_k)]`, `w_k = 10000^(-k / (d/2))`, then
    `Dense(4d, swish) -> Dense(4d)`.

    The same layer embeds the guidance strength `w` of a `guidance_conditioned` U-Net
    (with its own `scale`, and `zero_output=True` so that the embedding starts at 0).

    Args:
        dim: sinusoid width `d`; the output has `4 d` features.
        scale: multiplies `t` before the sinusoids (1000 as in DDPM's integer steps).
        zero_output: initialize the last Dense layer to zero, so the embedding is 0
            (and adding it changes nothing) until it is trained.
    """

    def __init__(self, dim: int, scale: float = 1000.0, zero_output: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.scale = scale
        self.zero_output = bool(zero_output)
        self.dense1 = layers.Dense(4 * dim, activation="swish", name="dense1")
        self.dense2 = layers.Dense(
            4 * dim, kernel_initializer="zeros" if self.zero_output else "glorot_uniform",
            name="dense2")

    def build(self, t_shape):
        self.dense1.build((None, self.dim))
        self.dense2.build((None, 4 * self.dim))

    def call(self, t):
        half = self.dim // 2
        freqs = ops.exp(-math.log(10000.0) * ops.arange(half, dtype="float32") / half)
        args = ops.expand_dims(ops.cast(t, "float32") * self.scale, -1) * freqs
        emb = ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)
        return self.dense2(self.dense1(ops.cast(emb, self.compute_dtype)))

    def compute_output_shape(self, t_shape):
        return tuple(t_shape) + (4 * self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "scale": self.scale,
                "zero_output": self.zero_output}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResBlock(layers.Layer):
    """BigGAN-style residual block, optionally resampling (DDPM `resnet_block`).

    `h = conv(swish(GN(x)))`, `h += Dense(swish(temb))`,
    `h = conv(dropout(swish(GN(h))))`, output `skip(x) + h`; with `resample`,
    both paths are average-pooled (`down`) or nearest-upsampled (`up`) after the
    first activation. The last conv starts at zero, so each block starts as identity.

    Args:
        out_channels: output channels.
        dropout: dropout rate before the second conv.
        resample: `None`, `"down"` or `"up"`.
        num_groups: GroupNorm groups (reduced to a divisor of the channels).
    """

    def __init__(self, out_channels: int, dropout: float = 0.0,
                 resample: str | None = None, num_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}.")
        self.out_channels = out_channels
        self.dropout_rate = dropout
        self.resample = resample
        self.num_groups = num_groups

    def build(self, x_shape, temb_shape):
        in_channels = x_shape[-1]
        out = self.out_channels
        h_shape = tuple(x_shape[:-1]) + (out,)
        self.norm1 = layers.GroupNormalization(norm_groups(in_channels, self.num_groups),
                                               epsilon=1e-6, name="norm1")
        self.norm1.build(x_shape)
        self.conv1 = layers.Conv2D(out, 3, padding="same", name="conv1")
        self.conv1.build(tuple(x_shape[:-1]) + (in_channels,))
        self.temb_proj = layers.Dense(out, name="temb_proj")
        self.temb_proj.build(temb_shape)
        self.norm2 = layers.GroupNormalization(norm_groups(out, self.num_groups),
                                               epsilon=1e-6, name="norm2")
        self.norm2.build(h_shape)
        self.dropout = layers.Dropout(self.dropout_rate)
        self.conv2 = layers.Conv2D(out, 3, padding="same", kernel_initializer="zeros",
                                   name="conv2")
        self.conv2.build(h_shape)
        self.skip = None
        if in_channels != out:
            self.skip = layers.Conv2D(out, 1, name="skip")
            self.skip.build(x_shape)

    def _resample(self, x):
        if self.resample == "down":
            return ops.average_pool(x, 2, 2, padding="valid")
        if self.resample == "up":
            return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
        return x

    def call(self, x, temb, training=False):
        h = ops.silu(self.norm1(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv1(h)
        h = h + self.temb_proj(ops.silu(temb))[:, None, None, :]
        h = ops.silu(self.norm2(h))
        h = self.dropout(h, training=training)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x + h

    def compute_output_shape(self, x_shape, temb_shape):
        b, height, width, _ = x_shape
        if self.resample == "down":
            height, width = height // 2, width // 2
        elif self.resample == "up":
            height, width = height * 2, width * 2
        return (b, height, width, self.out_channels)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels,
                "dropout": self.dropout_rate, "resample": self.resample,
                "num_groups": self.num_groups}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionBlock(layers.Layer):
    """Self-attention over all positions with a residual connection.

    `x + MHA(GN(x))` over the `H*W` positions; heads from `num_heads`, or from
    `head_dim` when given (ImageNet/LSUN use 64-wide heads).
    """

    def __init__(self, num_heads: int = 1, head_dim: int | None = None,
                 num_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_groups = num_groups

    def build(self, x_shape):
        channels = x_shape[-1]
        heads = channels // self.head_dim if self.head_dim else self.num_heads
        if heads < 1 or channels % heads:
            raise ValueError(
                f"AttentionBlock: {channels} channels cannot be split into {heads} heads "
                f"(num_heads={self.num_heads}, head_dim={self.head_dim})."
            )
        self.norm = layers.GroupNormalization(norm_groups(channels, self.num_groups),
                                              epsilon=1e-6, name="norm")
        self.norm.build(x_shape)
        self.attention = layers.MultiHeadAttention(heads, channels // heads,
                                                   name="attention")
        seq_shape = (None, x_shape[1] * x_shape[2], channels)
        self.attention.build(seq_shape, seq_shape)

    def call(self, x):
        _, height, width, channels = x.shape
        h = ops.reshape(self.norm(x), (-1, height * width, channels))
        h = self.attention(h, h)
        return x + ops.reshape(h, (-1, height, width, channels))

    def compute_output_shape(self, x_shape):
        return tuple(x_shape)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "head_dim": self.head_dim, "num_groups": self.num_groups}

"""The U-Net of DDPM / Salimans & Ho (2022) as Keras layers.

`UNet` is a functional `keras.Model` (the keras-hub "backbone" pattern): its config is
its constructor arguments, so `.keras` files round-trip with `safe_mode` on and no
`custom_objects`. It maps `(z, t[, label][, w]) -> raw output` and knows nothing of
diffusion: a parameterization turns its output into `x_hat`.

Two optional flags serve guided diffusion (Meng et al., CVPR 2023): `null_class` adds
a reserved "no label" row (index `num_classes`) to the class embedding for
classifier-free guidance, and `guidance_conditioned` adds a guidance-strength input `w`
(the stage-one student of guided distillation).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import keras
from keras import layers, ops

from keras_progdist import validation
from keras_progdist.validation import ConfigError

PACKAGE = "keras_progdist"


def _groups(channels: int, num_groups: int) -> int:
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
        self.norm1 = layers.GroupNormalization(_groups(in_channels, self.num_groups),
                                               epsilon=1e-6, name="norm1")
        self.norm1.build(x_shape)
        self.conv1 = layers.Conv2D(out, 3, padding="same", name="conv1")
        self.conv1.build(tuple(x_shape[:-1]) + (in_channels,))
        self.temb_proj = layers.Dense(out, name="temb_proj")
        self.temb_proj.build(temb_shape)
        self.norm2 = layers.GroupNormalization(_groups(out, self.num_groups),
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
        self.norm = layers.GroupNormalization(_groups(channels, self.num_groups),
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class UNet(keras.Model):
    """DDPM-style U-Net: `(z, t[, label][, w]) -> output`.

    Args:
        image_shape: `(H, W, C)` of the images.
        channels: base width.
        channel_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        attention_resolutions: spatial sizes (e.g. `(16, 8)`) that get self-attention.
        num_heads: attention heads (ignored when `head_dim` is set).
        head_dim: width of each attention head.
        dropout: dropout rate in every residual block.
        num_classes: if set, a class embedding is added to the time embedding and the
            model takes a third input `label` (int32 `[B]`).
        null_class: reserve the label `num_classes` for "no label" (the class
            embedding gets `num_classes + 1` rows): the unconditional model of
            classifier-free guidance, trained by label dropout
            (`DiffusionModel(label_dropout=...)`). Needs `num_classes`.
        guidance_conditioned: take a last input `w` (float32 `[B]`, the guidance
            strength) whose embedding `TimeEmbedding(channels, guidance_embedding_scale,
            zero_output=True)(w)` is added to the time embedding: the w-conditioned
            student of guided distillation. It starts at 0, so a student initialized
            from a teacher's weights starts as the teacher's conditional model.
        guidance_embedding_scale: multiplies `w` before the sinusoids (250: `w` in
            [0, 4] spans the range `t` in [0, 1] does at scale 1000).
        output_channels: defaults to `C` (use `2 C` for the `both` parameterization).
        resblock_resample: BigGAN-style residual down/up-sampling blocks (else
            strided conv / nearest upsample + conv).
        num_groups: GroupNorm groups.

    Example:
        >>> net = UNet((16, 16, 1), channels=16, channel_mult=(1, 2),
        ...            num_res_blocks=1, attention_resolutions=(8,))
        >>> net([z, t]).shape  # doctest: +SKIP
        (B, 16, 16, 1)
    """

    def __init__(self, image_shape: Sequence[int] = (32, 32, 3), channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), num_heads: int = 1,
                 head_dim: int | None = None, dropout: float = 0.0,
                 num_classes: int | None = None, output_channels: int | None = None,
                 resblock_resample: bool = True, num_groups: int = 32, null_class: bool = False,
                 guidance_conditioned: bool = False,
                 guidance_embedding_scale: float = 250.0, **kwargs):
        image_shape = tuple(int(s) for s in image_shape)
        channel_mult = _int_tuple("UNet.channel_mult", channel_mult)
        attention_resolutions = _int_tuple("UNet.attention_resolutions",
                                           attention_resolutions)
        _validate(image_shape, channels, channel_mult, num_res_blocks,
                  attention_resolutions, dropout, num_classes)
        null_class, guidance_conditioned = bool(null_class), bool(guidance_conditioned)
        if null_class and not num_classes:
            raise ConfigError("UNet.null_class needs UNet.num_classes: the null class is "
                             "the label num_classes of a class-conditional network.")
        guidance_embedding_scale = float(guidance_embedding_scale)
        out_ch = output_channels or image_shape[-1]

        z = keras.Input(image_shape, name="z")
        t = keras.Input((), name="t")
        inputs = [z, t]
        temb = TimeEmbedding(channels, name="time_embedding")(t)
        if num_classes:
            label = keras.Input((), dtype="int32", name="label")
            inputs.append(label)
            rows = num_classes + 1 if null_class else num_classes
            temb = temb + layers.Embedding(rows, 4 * channels,
                                           name="class_embedding")(label)
        if guidance_conditioned:
            w = keras.Input((), name="w")
            inputs.append(w)
            temb = temb + TimeEmbedding(channels, guidance_embedding_scale,
                                        zero_output=True, name="guidance_embedding")(w)

        def block(h, ch, name, resample=None):
            return ResBlock(ch, dropout, resample, num_groups, name=name)(h, temb)

        def attend(h, name):
            if h.shape[1] in attention_resolutions:
                h = AttentionBlock(num_heads, head_dim, num_groups, name=name)(h)
            return h

        h = layers.Conv2D(channels, 3, padding="same", name="conv_in")(z)
        skips = [h]
        for level, mult in enumerate(channel_mult):
            for i in range(num_res_blocks):
                h = block(h, channels * mult, f"down{level}_res{i}")
                h = attend(h, f"down{level}_attn{i}")
                skips.append(h)
            if level != len(channel_mult) - 1:
                if resblock_resample:
                    h = block(h, h.shape[-1], f"down{level}_resample", "down")
                else:
                    h = layers.Conv2D(h.shape[-1], 3, strides=2, padding="same",
                                      name=f"down{level}_resample")(h)
                skips.append(h)
        h = block(h, h.shape[-1], "mid_res0")
        h = AttentionBlock(num_heads, head_dim, num_groups, name="mid_attn")(h)
        h = block(h, h.shape[-1], "mid_res1")
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                h = layers.Concatenate(name=f"up{level}_concat{i}")([h, skips.pop()])
                h = block(h, channels * mult, f"up{level}_res{i}")
                h = attend(h, f"up{level}_attn{i}")
            if level != 0:
                if resblock_resample:
                    h = block(h, h.shape[-1], f"up{level}_resample", "up")
                else:
                    h = layers.UpSampling2D(2, name=f"up{level}_upsample")(h)
                    h = layers.Conv2D(h.shape[-1], 3, padding="same",
                                      name=f"up{level}_resample")(h)
        h = layers.GroupNormalization(_groups(h.shape[-1], num_groups), epsilon=1e-6,
                                      name="norm_out")(h)
        h = layers.Activation("swish", name="swish_out")(h)
        out = layers.Conv2D(out_ch, 3, padding="same", kernel_initializer="zeros",
                            dtype="float32", name="conv_out")(h)
        super().__init__(inputs=inputs, outputs=out, **kwargs)
        self.image_shape = image_shape
        self.channels = channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.num_classes = num_classes
        self.output_channels = out_ch
        self.resblock_resample = resblock_resample
        self.num_groups = num_groups
        self.null_class = null_class
        self.guidance_conditioned = guidance_conditioned
        self.guidance_embedding_scale = guidance_embedding_scale

    def get_config(self):
        # The guidance keys are written only when used: the config of a network without
        # them stays what it was, so workdirs whose config.json predates them resume.
        guidance = {}
        if self.null_class:
            guidance["null_class"] = True
        if self.guidance_conditioned:
            guidance["guidance_conditioned"] = True
            guidance["guidance_embedding_scale"] = self.guidance_embedding_scale
        return {
            "name": self.name,
            "trainable": self.trainable,
            "image_shape": list(self.image_shape),
            "channels": self.channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attention_resolutions),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "output_channels": self.output_channels,
            "resblock_resample": self.resblock_resample,
            "num_groups": self.num_groups,
            **guidance,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _int_tuple(name: str, values) -> tuple:
    """`values` as a tuple of ints, if it is a sequence of integers (else
    `ConfigError` naming the setting)."""
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{name} must be a tuple of integers, got {values!r}.")
    return tuple(int(v) for v in values)


# Upper bounds of the U-Net's size settings, checked before anything is built: the
# published configs use at most 256 channels, multipliers up to 8, 3 blocks a level and
# 5 levels; beyond these bounds a typo (1e6 channels) would only show as an
# out-of-memory kill or an hour of graph building.
MAX_CHANNELS = 2048
MAX_CHANNEL_MULT = 16
MAX_LEVELS = 8
MAX_RES_BLOCKS = 32


def _validate(image_shape, channels, channel_mult, num_res_blocks,
              attention_resolutions, dropout, num_classes):
    """Checks the U-Net's settings against each other, the image size and the bounds.

    Raises:
        ConfigError (a ValueError): naming the setting and what it must be.
    """
    for name, value, bound in (("UNet.channels", channels, MAX_CHANNELS),
                               ("UNet.num_res_blocks", num_res_blocks, MAX_RES_BLOCKS)):
        if validation.positive_int(name, value) > bound:
            raise ConfigError(f"{name} must be at most {bound}, got {value!r}.")
    validation.fraction("UNet.dropout", dropout)
    if num_classes is not None:
        validation.positive_int("UNet.num_classes", num_classes)
    if not channel_mult or len(channel_mult) > MAX_LEVELS or not all(
            1 <= m <= MAX_CHANNEL_MULT for m in channel_mult):
        raise ConfigError(f"UNet.channel_mult must be 1 to {MAX_LEVELS} integers in "
                          f"[1, {MAX_CHANNEL_MULT}], got {channel_mult}.")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"image_shape must be (H, W, C) with positive sizes, got "
                          f"{image_shape}.")
    factor = 2 ** (len(channel_mult) - 1)
    height, width = image_shape[:2]
    if height % factor or width % factor:
        raise ConfigError(
            f"Image size {height}x{width} is not divisible by the downsampling factor "
            f"{factor} of UNet.channel_mult={channel_mult} ({len(channel_mult)} levels); "
            f"use a size that is a multiple of {factor} or fewer levels."
        )
    sizes = [height // 2**i for i in range(len(channel_mult))]
    bad = [r for r in attention_resolutions if r not in sizes]
    if bad:
        raise ConfigError(
            f"UNet.attention_resolutions {bad} never occur in this U-Net: with image "
            f"size {height} and UNet.channel_mult={channel_mult} the resolutions are "
            f"{sizes}."
        )

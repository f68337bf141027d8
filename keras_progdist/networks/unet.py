"""The U-Net of DDPM / Salimans & Ho (2022): its settings, their checks, and the wiring
of its blocks (the layers themselves are in `blocks`).

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

import numbers
from typing import Sequence

import keras
from keras import layers

from keras_progdist import validation
from keras_progdist.networks.blocks import (
    PACKAGE,
    AttentionBlock,
    ResBlock,
    TimeEmbedding,
    norm_groups,
)
from keras_progdist.validation import ConfigError


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
                  attention_resolutions, dropout, num_classes, null_class)
        null_class, guidance_conditioned = bool(null_class), bool(guidance_conditioned)
        guidance_embedding_scale = float(guidance_embedding_scale)
        out_ch = output_channels or image_shape[-1]

        inputs, temb = _inputs_and_embedding(image_shape, channels, num_classes, null_class,
                                             guidance_conditioned, guidance_embedding_scale)
        blocks = _Blocks(temb, dropout, num_groups, num_heads, head_dim,
                         attention_resolutions)
        h, skips = _down_path(blocks, inputs[0], channels, channel_mult, num_res_blocks,
                              resblock_resample)
        h = blocks.res(h, h.shape[-1], "mid_res0")
        h = blocks.attention(h, "mid_attn")
        h = blocks.res(h, h.shape[-1], "mid_res1")
        h = _up_path(blocks, h, skips, channels, channel_mult, num_res_blocks,
                     resblock_resample)
        h = layers.GroupNormalization(norm_groups(h.shape[-1], num_groups),
                                      epsilon=1e-6, name="norm_out")(h)
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


def _inputs_and_embedding(image_shape, channels, num_classes, null_class,
                          guidance_conditioned, guidance_embedding_scale):
    """The U-Net's inputs and the embedding that conditions every residual block.

    Returns:
        `(inputs, temb)`: `[z, t]`, then `label` if `num_classes`, then `w` if
        `guidance_conditioned`; and the embedding of `t`, plus the class embedding of
        `label` and the (zero-initialized) embedding of `w`, `[B, 4 * channels]`.
    """
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
    return inputs, temb


class _Blocks:
    """Applies the U-Net's named blocks, every residual block conditioned on `temb`."""

    def __init__(self, temb, dropout, num_groups, num_heads, head_dim,
                 attention_resolutions):
        self.temb, self.dropout, self.num_groups = temb, dropout, num_groups
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_resolutions = attention_resolutions

    def res(self, h, channels, name, resample=None):
        return ResBlock(channels, self.dropout, resample, self.num_groups,
                        name=name)(h, self.temb)

    def attention(self, h, name):
        return AttentionBlock(self.num_heads, self.head_dim, self.num_groups, name=name)(h)

    def attend(self, h, name):
        """Self-attention where `h`'s side is one of `attention_resolutions`."""
        return self.attention(h, name) if h.shape[1] in self.attention_resolutions else h


def _down_path(blocks, z, channels, channel_mult, num_res_blocks, resblock_resample):
    """The encoder: `num_res_blocks` blocks per level, halving the side between levels.

    Returns:
        `(h, skips)`: the lowest level's features and every block's output, for the
        decoder's skip connections.
    """
    h = layers.Conv2D(channels, 3, padding="same", name="conv_in")(z)
    skips = [h]
    for level, mult in enumerate(channel_mult):
        for i in range(num_res_blocks):
            h = blocks.res(h, channels * mult, f"down{level}_res{i}")
            h = blocks.attend(h, f"down{level}_attn{i}")
            skips.append(h)
        if level != len(channel_mult) - 1:
            if resblock_resample:
                h = blocks.res(h, h.shape[-1], f"down{level}_resample", "down")
            else:
                h = layers.Conv2D(h.shape[-1], 3, strides=2, padding="same",
                                  name=f"down{level}_resample")(h)
            skips.append(h)
    return h, skips


def _up_path(blocks, h, skips, channels, channel_mult, num_res_blocks, resblock_resample):
    """The decoder: `num_res_blocks + 1` blocks per level, each on the concatenation
    with a skip (taken from the end of `skips`), doubling the side between levels."""
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            h = layers.Concatenate(name=f"up{level}_concat{i}")([h, skips.pop()])
            h = blocks.res(h, channels * mult, f"up{level}_res{i}")
            h = blocks.attend(h, f"up{level}_attn{i}")
        if level != 0:
            if resblock_resample:
                h = blocks.res(h, h.shape[-1], f"up{level}_resample", "up")
            else:
                h = layers.UpSampling2D(2, name=f"up{level}_upsample")(h)
                h = layers.Conv2D(h.shape[-1], 3, padding="same",
                                  name=f"up{level}_resample")(h)
    return h


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
              attention_resolutions, dropout, num_classes, null_class):
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
    if null_class and not num_classes:
        raise ConfigError("UNet.null_class needs UNet.num_classes: the null class is "
                          "the label num_classes of a class-conditional network.")

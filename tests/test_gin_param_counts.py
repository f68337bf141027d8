"""The parameter counts the small gin files' headers state are those of the U-Net they
configure (the big CIFAR/ImageNet/LSUN nets take too long to build here)."""

import os
import re

import pytest

import gin
from keras_progdist import parameterizations
from keras_progdist.data import dataset_info
from keras_progdist.networks import UNet
from keras_progdist.training import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("tiny.gin", "fashion_mnist_cpu.gin", "fashion_mnist_guided.gin",
         "fashion_mnist.gin", "fashion_mnist_gpu.gin")
# "a 760,289-parameter U-Net", "a U-Net of 761,697 parameters", "a 3-level U-Net of
# 317,969 parameters", "(7.07M-parameter U-Net": the first count in the header.
COUNT = re.compile(r"(\d[\d,]*(?:\.\d+)?)(M?)-parameter U-Net|U-Net of (\d[\d,]*) parameters")


def _header(name):
    lines = []
    with open(os.path.join(ROOT, "gin", name)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("# ").rstrip("\n"))
    return " ".join(lines)


def _stated(header):
    match = COUNT.search(header)
    assert match, "no parameter count in the header"
    number, millions, exact = match.groups()
    if exact:
        return int(exact.replace(",", "")), 0
    if millions:  # stated to its last digit in millions
        decimals = len(number.partition(".")[2])
        return round(float(number) * 1e6), 0.5 * 10 ** (6 - decimals)
    return int(number.replace(",", "")), 0


def _teacher_network():
    settings = config.dataset_settings()
    info = dataset_info(settings["name"])
    channels = info["image_shape"][-1]
    size = settings.get("image_size") or info["image_shape"][0]
    out = parameterizations.output_channels(config.diffusion().parameterization,
                                            channels)
    return config.UNetConfigurable(image_shape=(size, size, channels),
                                   output_channels=out, name="network")


@pytest.mark.parametrize("name", SMALL)
def test_header_states_the_networks_parameter_count(name):
    gin.clear_config()
    try:
        config.parse_gin([os.path.join(ROOT, "gin", name)])
        network = _teacher_network()
    finally:
        gin.clear_config()
    header = _header(name)
    count, tolerance = _stated(header)
    assert abs(network.count_params() - count) <= tolerance, \
        f"{name} states {count:,}, the net has {network.count_params():,}"
    if network.get_config().get("null_class"):
        # A guided config also states its w-conditioned students' count.
        student = UNet.from_config({**network.get_config(), "guidance_conditioned": True})
        assert f"{student.count_params():,} parameters" in header

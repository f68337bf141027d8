"""The EMA-free `DiffusionModel` that samples a finished network: what every stage's
grid, evaluation and export uses, built here only (`sampling_model`), from a network
or from another model (`sampling_copy`)."""

from __future__ import annotations

from keras_progdist.diffusion import DiffusionModel
from keras_progdist.networks.unet import UNet


def sampling_model(network, num_steps: int, schedule, parameterization: str,
                   weighting: str, name: str | None = None) -> DiffusionModel:
    """`DiffusionModel(network, ema_decay=None, num_steps=num_steps)`: a finished
    stage's network as a model that samples in `num_steps`.

    Args:
        network: the stage's network (used as is, not copied).
        num_steps: the step count `sample()` defaults to.
        schedule: a `Schedule`; parameterization, weighting: as `DiffusionModel`.
        name: the model's name (default `sampler_<N>`).
    """
    return DiffusionModel(network, schedule=schedule, parameterization=parameterization,
                          weighting=weighting, ema_decay=None, num_steps=num_steps,
                          name=name or f"sampler_{num_steps}")


def sampling_copy(model: DiffusionModel, num_steps: int) -> DiffusionModel:
    """`model`'s sampling network as an EMA-free `DiffusionModel` with `num_steps`
    (`model` itself when it already is one)."""
    if model.ema_network is None and model.num_steps == num_steps:
        return model
    network = UNet.from_config(model.sampling_network.get_config())
    network.set_weights([w.copy() for w in model.sampling_network.get_weights()])
    return sampling_model(network, num_steps, model.schedule, model.parameterization,
                          model.weighting)

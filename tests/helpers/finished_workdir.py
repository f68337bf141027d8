"""A work directory as a finished run leaves it, made in a second without training.

`config.json` (the record `Experiment.check_workdir` writes) and a `final` checkpoint
per stage (`checkpoint.save`, the meta `Experiment._finish_stage` writes). Each stage's
network gets its own random weights (the U-Net's last conv starts at zero, so freshly
built networks would all output zeros and sample the same images).
"""

import numpy as np

from keras_progdist.networks.unet import UNet
from keras_progdist.schedules import Schedule
from keras_progdist.workdir import WorkDir, stage_name

IMAGE_SHAPE = (8, 8, 1)


def tiny_network(num_classes=None, image_shape=IMAGE_SHAPE) -> UNet:
    return UNet(image_shape, channels=8, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_groups=4, num_classes=num_classes,
                name="network")


def make_finished_workdir(root, teacher_steps=4, students=(2, 1), num_classes=None,
                          image_shape=IMAGE_SHAPE, seed=0) -> dict:
    """Writes the work directory; returns `{stage: the weights it holds}`.

    Args:
        root: the folder (created).
        teacher_steps: the teacher's step count (recorded in its `final` meta).
        students: the finished students' step counts.
        num_classes: a class-conditional network when set.
        seed: of the random weights.
    """
    wd = WorkDir(str(root))
    network = tiny_network(num_classes, image_shape)
    wd.record_config({
        "network": network.get_config(),
        "diffusion": {"parameterization": "v", "weighting": "snr_trunc",
                      "ema_decay": 0.995, "seed": 0},
        "schedule": Schedule("cosine").get_config()})
    rng = np.random.default_rng(seed)
    weights = {}
    stages = [(stage_name(), teacher_steps)] + [(stage_name(n), n) for n in students]
    for index, (stage, steps) in enumerate(stages):
        network.set_weights([rng.normal(0.0, 0.2, w.shape).astype(w.dtype)
                             for w in network.get_weights()])
        meta = {"stage": stage, "num_steps": steps, "updates": 10 * (index + 1),
                "loss": 0.5 / (index + 1), "seconds": 1.5 * (index + 1)}
        wd.final_checkpoint(stage).save(network, meta={"step": meta["updates"], **meta},
                                        include_optimizer=False)
        weights[stage] = [w.copy() for w in network.get_weights()]
    return weights

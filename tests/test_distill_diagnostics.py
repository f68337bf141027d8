"""benchmarks/distill_error_by_t.py: the per-step error it reports is the real one."""

import importlib.util
import os

import numpy as np
from keras import ops

from keras_progdist.diffusion import network_denoise
from keras_progdist.distillation import teacher_two_steps
from keras_progdist.networks import UNet
from keras_progdist.samplers import ddim_step
from keras_progdist.schedules import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "distill_error_by_t", os.path.join(ROOT, "benchmarks", "distill_error_by_t.py"))
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

CONFIG = {"diffusion": {"parameterization": "v", "weighting": "snr_trunc"},
          "schedule": {"name": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0}}


def _net(seed):
    net = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)
    rng = np.random.default_rng(seed)
    net.set_weights([w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype)
                     for w in net.get_weights()])
    return net


def test_z_error_is_the_distance_of_one_student_step_to_two_teacher_steps():
    teacher, student = _net(0), _net(1)
    rng = np.random.default_rng(2)
    images = np.clip(rng.standard_normal((6, 8, 8, 1)), -1, 1).astype(np.float32)
    eps = rng.standard_normal(images.shape).astype(np.float32)
    rows = diag.stage_errors(teacher, student, 2, images, eps, CONFIG)
    schedule = Schedule("cosine")
    assert [r["t"] for r in rows] == [0.5, 1.0]
    for i, row in enumerate(rows, start=1):
        t = np.full((6,), i / 2, np.float32)
        z_t = (np.sqrt(1 / (1 + np.exp(-schedule.logsnr(t))))[:, None, None, None] * images
               + np.sqrt(1 / (1 + np.exp(schedule.logsnr(t))))[:, None, None, None] * eps)

        def teacher_fn(z, tt):
            return network_denoise(teacher, z, tt, schedule, "v")

        z_end, _ = teacher_two_steps(teacher_fn, z_t, t, 2.0, schedule)
        x_hat, eps_hat = network_denoise(student, z_t, t, schedule, "v")
        s = t - 0.5
        z_s = ddim_step(z_t, x_hat, eps_hat, schedule.logsnr(s), s)
        direct = np.sqrt(np.mean((ops.convert_to_numpy(z_s) - ops.convert_to_numpy(z_end)) ** 2))
        np.testing.assert_allclose(row["trained"]["z_error"], direct, rtol=1e-4)
        assert row["trained"]["z_error"] > 1e-3
    # A student that is still its teacher has closed nothing.
    same = diag.stage_errors(teacher, teacher, 2, images, eps, CONFIG)
    assert all(r["closed"] == 0.0 and r["start"] == r["trained"] for r in same)

"""Shared by the pipeline test files: tiny settings and ways to run `bin/run.py`.

The pipeline tests are about what the pipeline does with stages (resume, kills, ladders,
export, evaluation), not about the training step, so they train the smallest network
that exercises the whole U-Net (8x8 images, no attention), one update per call and
without XLA: compiling dominated these short runs (a 40-update teacher: 31 s with XLA
against 17 s without). XLA training is tested in-process (test_distillation, the README).
"""

import json
import os
import subprocess
import sys

import gin
from keras_progdist import checkpoint, training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    # One resolution level: what these runs test is the pipeline, not the U-Net, and
    # each level more adds ~5 s of tracing to every process (a 20-update teacher:
    # 12 s at (1,), 22 s at tiny.gin's (1, 2, 2)).
    "UNet.channels=8", "UNet.num_groups=4", "UNet.attention_resolutions=()",
    "UNet.channel_mult=(1,)", "dataset.batch_size=16", "dataset.image_size=8",
    "teacher.train_steps=40", "teacher.checkpoint_every=10", "teacher.steps_per_execution=1",
    "distill.teacher_steps=8", "distill.updates_per_stage=20",
    "distill.checkpoint_every=10", "distill.steps_per_execution=1",
    "teacher.jit_compile=False", "distill.jit_compile=False", "guidance.jit_compile=False",
    # A grid compiles a sampler (~3 s a stage); the runs that test grids ask for them.
    "sample_grid.count=0",
]
GRIDS = ["sample_grid.count=4"]
# A guided run (Meng et al. 2023): a classifier-free guided teacher, then the
# w-conditioned stage one; the ladder after it is the usual one.
# Its test checks the guided grids, so it asks for them.
GUIDED = GRIDS + [
    "UNet.num_classes=10", "UNet.null_class=True", "dataset.with_labels=True",
    "diffusion.label_dropout=0.2", "guidance.enabled=True", "guidance.updates=20",
    "guidance.checkpoint_every=10", "guidance.steps_per_execution=5"]


def command(workdir, mode, extra=(), flags=()):
    """`bin/run.py` on `tiny.gin` with SMALL, then `extra` bindings, then `flags`."""
    params = [f"--gin_param={p}" for p in SMALL + list(extra)]
    return [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--gin_file=tiny.gin",
            f"--workdir={workdir}", f"--mode={mode}", "--verbose=0", *params, *flags]


def env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
            "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}


def run(workdir, mode, extra=(), check=True, flags=()):
    """Runs `command(...)` to the end; with `check`, a non-zero exit fails the test."""
    result = subprocess.run(command(workdir, mode, extra, flags), capture_output=True,
                            text=True, env=env(), timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{mode} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr[-3000:]}")
    return result


def in_process(workdir, mode, bindings=(), time_budget_s=None):
    """`training.run` in this process, with `tiny.gin`, SMALL and `bindings`."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                            SMALL + list(bindings))
        return training.run(workdir, mode, verbose=0, time_budget_s=time_budget_s)
    finally:
        gin.clear_config()


def ladder(workdir):
    """[(stage, num_steps, updates)] as `stages.json` records them."""
    with open(os.path.join(workdir, "stages.json")) as f:
        return [(s["stage"], s["num_steps"], s["updates"]) for s in json.load(f)]


def all_checkpoints_verify(workdir):
    for stage in os.listdir(workdir):
        directory = os.path.join(workdir, stage)
        for name in ("ckpt", "final"):
            if checkpoint.exists(directory, name):
                checkpoint.read_meta(directory, name)  # raises on a corrupt checkpoint

"""A guided run end to end (Meng et al. 2023): the classifier-free guided teacher, the
w-conditioned stage one stopped by its time budget and resumed, the ladder on its
network, guided sample grids, re-runs and export. (The ladder down to one step and the
exact maths are tested in-process in test_guidance.py.)"""

import json
import os

import numpy as np
import pytest

import gin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.pipeline_runs import GUIDED, SMALL, ladder, run

GUIDED_LADDER = [("teacher", 8, 40), ("guidance", 8, 20), ("student_00004", 4, 20)]


@pytest.mark.slow
def test_guided_run_trains_stage_one_then_the_ladder_with_guided_grids(tmp_path):
    from keras_progdist.training.experiment import Experiment

    workdir = str(tmp_path / "guided")
    guided = GUIDED + ["distill.min_steps=4"]
    run(workdir, "train_teacher", guided)
    # Stage one stops at a checkpoint (time budget) and the next run resumes it.
    stopped = run(workdir, "distill", guided, check=False, flags=["--time_budget_s=1"])
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr[-2000:]
    assert "[stage] guidance: training the w-conditioned network, w in [0.0, 4.0]" \
        in stopped.stdout
    assert "[preempted] guidance: time budget; checkpoint saved at step 5" \
        in stopped.stdout
    first = run(workdir, "distill", guided).stdout
    assert "[stage] guidance: resuming at step 5/20" in first
    assert ladder(workdir) == GUIDED_LADDER
    for grid in ("teacher_00008steps.png", "guidance.png", "student_00004.png"):
        assert os.path.exists(os.path.join(workdir, "samples", grid))
    again = run(workdir, "distill", guided).stdout
    assert again.count("finished earlier") == 2
    assert ladder(workdir) == GUIDED_LADDER

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                            SMALL + guided)
        experiment = Experiment(workdir)
        teacher = experiment.load_final("teacher", 8)
        student = experiment.load_final("student_00004", 4)
    finally:
        gin.clear_config()
    assert teacher.network.null_class and not teacher.network.guidance_conditioned
    assert student.network.guidance_conditioned
    label = np.array([3, 3], np.int32)
    images = student.sample(batch_size=2, label=label, guidance=[0.0, 4.0], seed=0)
    assert images.shape == (2, 8, 8, 1) and np.all(np.isfinite(images))

    # Export rebuilds the w-conditioned students from the record's student_network.
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["student_network"]["guidance_conditioned"] is True
    export_dir = str(tmp_path / "saved_models")
    run(workdir, "export", guided, flags=[f"--export_dir={export_dir}",
                                         "--experiment=guided"])
    # Stage one has the teacher's step count and a name of its own: the teacher's model
    # keeps its single version.
    for model in ("guided-8steps", "guided-guidance-8steps", "guided-4steps"):
        assert os.listdir(os.path.join(export_dir, "guided", model)) == ["1"]
        path = os.path.join(export_dir, "guided", model, "1", "assets.extra",
                            "export_metadata.json")
        with open(path) as f:
            assert json.load(f)["guided"] is True


@pytest.mark.parametrize("name,classes,teacher_steps", [
    ("fashion_mnist_guided.gin", 10, 64), ("imagenet64_guided.gin", 1000, 1024)])
def test_the_guided_configs_are_valid(name, classes, teacher_steps):
    from keras_progdist.training import config

    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(ROOT, "gin", name))
        settings = config.diffusion()
        guided = config.guidance()
        config.teacher()
        ladder = config.distill()
        unet = {k: gin.query_parameter(f"UNet.{k}") for k in ("num_classes", "null_class")}
    finally:
        gin.clear_config()
    assert guided.enabled and (guided.w_min, guided.w_max) == (0.0, 4.0)
    assert settings.label_dropout == 0.1
    assert unet == {"num_classes": classes, "null_class": True}
    assert ladder.teacher_steps == teacher_steps and ladder.student_dropout == 0.0

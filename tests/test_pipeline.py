"""The resumable pipeline: the ladder, re-runs, bad input, checkpoint checks and the
evaluation report. (Random kills: test_pipeline_kills.py; guided runs:
test_pipeline_guided.py; stops at an exact step and resumes to the same weights:
test_preemption.py.)"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import gin
from keras_progdist import checkpoint, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.pipeline_runs import GRIDS, GUIDED, SMALL, command, env, in_process, ladder, run

EXPECTED_LADDER = [("teacher", 8, 40), ("student_00004", 4, 20),
                   ("student_00002", 2, 20), ("student_00001", 1, 20)]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A small finished teacher + 3 stages, trained once for this module."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    run(workdir, "train_teacher", GRIDS)
    run(workdir, "distill", GRIDS)
    return workdir


@pytest.mark.slow
def test_finished_run_has_the_configured_ladder(trained_workdir):
    assert ladder(trained_workdir) == EXPECTED_LADDER
    for stage, _, _ in EXPECTED_LADDER:
        assert os.path.exists(os.path.join(trained_workdir, "samples",
                                           f"{stage}.png" if stage != "teacher"
                                           else "teacher_00008steps.png"))
    # Re-running finishes at once: no stage is redone.
    result = run(trained_workdir, "distill")
    assert result.stdout.count("finished earlier") == 3
    assert ladder(trained_workdir) == EXPECTED_LADDER


# -- bad input: each a specific error before any training ---------------------------------
BAD_INPUTS = [
    ("unknown parameterization", ["diffusion.parameterization='z'"], "train_teacher",
     ValueError, "Unknown parameterization 'z'; allowed: eps, x, v, both"),
    ("unknown weighting", ["diffusion.weighting='snr2'"], "train_teacher", ValueError,
     "Unknown loss weighting 'snr2'"),
    ("unknown schedule", ["Schedule.name='quadratic'"], "train_teacher", ValueError,
     "Unknown schedule 'quadratic'; allowed schedules: cosine, linear"),
    ("logsnr range reversed", ["Schedule.logsnr_min=30.0"], "train_teacher", ValueError,
     "logsnr_min must be below logsnr_max"),
    ("EMA decay out of range", ["diffusion.ema_decay=1.5"], "train_teacher",
     ValueError, "diffusion.ema_decay must be a number in [0, 1), got 1.5"),
    ("teacher steps not a power of two", ["distill.teacher_steps=100"], "distill",
     training.PipelineError, "teacher_steps must be a power of two, got 100"),
    ("min steps not a power of two", ["distill.min_steps=3"], "distill",
     training.PipelineError, "min_steps must be a power of two, got 3"),
    ("min steps above the start", ["distill.min_steps=16"], "distill",
     training.PipelineError, "min_steps (16) must be below distill.teacher_steps (8)"),
    ("override names no stage", ["distill.updates_overrides={3: 10}"], "distill",
     training.PipelineError, "names step counts [3] that are not stages"),
    ("stage length vs checkpoint interval", ["distill.updates_per_stage=15"], "distill",
     training.PipelineError, "not a multiple of distill.checkpoint_every (10)"),
    ("checkpoint interval vs execution chunk", ["distill.checkpoint_every=5",
                                                 "distill.steps_per_execution=10",
                                                 "distill.updates_per_stage=10"],
     "distill", training.PipelineError,
     "distill.checkpoint_every (5) must be a multiple of distill.steps_per_execution (10)"),
    ("zero teacher steps", ["teacher.train_steps=0"], "train_teacher",
     ValueError, "teacher.train_steps must be a positive integer, got 0"),
    ("teacher steps vs checkpoint interval", ["teacher.train_steps=55"], "train_teacher",
     training.PipelineError, "must be a multiple of teacher.checkpoint_every (10)"),
    ("attention at a missing resolution", ["UNet.attention_resolutions=(3,)"],
     "train_teacher", ValueError, "attention_resolutions [3] never occur"),
    ("image size vs downsampling", ["dataset.image_size=14", "UNet.channel_mult=(1, 2, 2)"],
     "train_teacher",
     ValueError, "not divisible by the downsampling factor 4"),
    ("dropout out of range", ["UNet.dropout=1.5"], "train_teacher", ValueError,
     "UNet.dropout must be a number in [0, 1), got 1.5"),
    ("unknown dataset", ["dataset.name='cifar100'"], "train_teacher", ValueError,
     "cifar100"),
    ("missing data folder", ["dataset.name='fashion_mnist'",
                             "dataset.data_dir='/nonexistent/fmnist'"], "train_teacher",
     FileNotFoundError, "/nonexistent/fmnist"),
    ("tfds data not prepared", ["dataset.name='cifar10'", "dataset.data_dir='/nonexistent/tfds'"],
     "train_teacher", FileNotFoundError, "/nonexistent/tfds"),
    ("zero batch size", ["dataset.batch_size=0"], "train_teacher", ValueError,
     "batch_size"),
    # Size settings have documented upper bounds, checked before anything is built.
    ("huge batch size", ["dataset.batch_size=1000000000"], "train_teacher", ValueError,
     "dataset.batch_size=1000000000: must be an integer in [1, 65536]"),
    ("huge channel count", ["UNet.channels=1000000"], "train_teacher", ValueError,
     "UNet.channels must be at most 2048"),
    ("huge res block count", ["UNet.num_res_blocks=1000000"], "train_teacher", ValueError,
     "UNet.num_res_blocks must be at most 32"),
    ("huge grid", ["sample_grid.count=1000000000"], "train_teacher", ValueError,
     "sample_grid.count must be at most 1024"),
    ("grid size as a float", ["sample_grid.count=1e9"], "train_teacher", ValueError,
     "sample_grid.count"),
    ("negative batch size", ["dataset.batch_size=-1"], "train_teacher", ValueError,
     "dataset.batch_size=-1:"),
    ("zero image size", ["dataset.image_size=0"], "train_teacher", ValueError,
     "dataset.image_size=0"),
    ("odd image size", ["dataset.image_size=17", "UNet.channel_mult=(1, 2)"],
     "train_teacher", ValueError, "not divisible by the downsampling factor 2"),
    ("class-conditional net, unlabelled data", ["UNet.num_classes=10"], "train_teacher",
     training.PipelineError, "needs labelled data: set dataset.with_labels = True"),
    ("labelled data, unconditional net", ["dataset.with_labels=True"], "train_teacher",
     training.PipelineError, "the UNet is unconditional: set UNet.num_classes"),
    ("unknown mode", [], "train", training.PipelineError,
     "Unknown mode 'train'; allowed: train_teacher, distill, sample, export, eval, all"),
    ("distillation without a teacher", [], "distill", ValueError,
     "does not exist: nothing has been trained there"),
    # Settings of later modes are checked before the teacher trains.
    ("negative distillation learning rate", ["distill.learning_rate=-1.0"], "all",
     ValueError, "distill.learning_rate must be a finite number > 0, got -1.0"),
    ("unknown stage learning-rate schedule", ["distill.learning_rate_schedule='cosine'"],
     "all", ValueError, "distill.learning_rate_schedule must be one of linear, constant, "
     "got 'cosine'"),
    ("evaluation sample count not a number", ["evaluate.num_samples='x'"], "all",
     ValueError, "evaluate.num_samples must be an integer >= 2, got 'x'"),
    ("digit scores as a number", ["evaluate.digit_scores=1"], "all", ValueError,
     "evaluate.digit_scores must be True or False, got 1"),
    ("negative grid size", ["sample_grid.count=-1"], "train_teacher", ValueError,
     "sample_grid.count must be an integer >= 0, got -1"),
    ("learning rate as a word", ["teacher.learning_rate='fast'"], "train_teacher",
     ValueError, "teacher.learning_rate must be a finite number > 0, got 'fast'"),
    ("channels as a string", ["UNet.channels='16'"], "train_teacher", ValueError,
     "UNet.channels must be a positive integer, got '16'"),
    ("negative clipping norm", ["teacher.global_clipnorm=-1.0"], "train_teacher",
     ValueError, "teacher.global_clipnorm must be a finite number > 0, got -1.0"),
    ("student dropout out of range", ["distill.student_dropout=1.0"], "all", ValueError,
     "distill.student_dropout must be a number in [0, 1), got 1.0"),
    ("label dropout out of range", ["diffusion.label_dropout=1.0"], "train_teacher",
     ValueError, "diffusion.label_dropout must be a number in [0, 1), got 1.0"),
    ("guidance without a guided teacher", ["guidance.enabled=True"], "train_teacher",
     training.PipelineError, "guidance.enabled distills a classifier-free guided teacher"),
    ("guidance range reversed", ["guidance.w_min=5.0"], "train_teacher",
     training.PipelineError, "guidance.w_min (5.0) must not be above guidance.w_max"),
    ("guided run evaluated", GUIDED, "all", training.PipelineError,
     "--mode=all is not available for guided distillation"),
    ("guided run sampled", GUIDED, "sample", training.PipelineError,
     "--mode=sample is not available for guided distillation"),
    ("label dropout without a null class", ["diffusion.label_dropout=0.1",
                                            "UNet.num_classes=10",
                                            "dataset.with_labels=True"],
     "train_teacher", training.PipelineError,
     "set UNet.num_classes and UNet.null_class = True"),
]


@pytest.mark.parametrize("case,bindings,mode,error,message", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_training(tmp_path, case, bindings, mode, error, message):
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                            SMALL + bindings)
        start = time.time()
        with pytest.raises(error) as info:
            training.run(str(tmp_path / "work"), mode, verbose=0)
        print(f"| {case} | `{'; '.join(bindings) or mode}` | {type(info.value).__name__}: "
              f"{str(info.value).splitlines()[0][:160]} |")
        assert message in str(info.value)
        assert time.time() - start < 30, "validation must come before any training"
        # Nothing is created either: every check comes before the lock makes the folder.
        assert not os.path.exists(str(tmp_path / "work"))
    finally:
        gin.clear_config()


@pytest.mark.parametrize("kwargs,message", [
    ({"time_budget_s": float("nan")}, "time_budget_s must be a finite number > 0, got nan"),
    ({"time_budget_s": -5.0}, "time_budget_s must be a finite number > 0, got -5.0"),
    ({"experiment_name": "bad name"}, "Export name 'bad name' must be letters"),
], ids=["nan budget", "negative budget", "bad export name"])
def test_run_arguments_are_checked_before_training(tmp_path, kwargs, message):
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")], SMALL)
        with pytest.raises(ValueError, match=re.escape(message)):
            training.run(str(tmp_path / "work"), "all", verbose=0, **kwargs)
        assert not os.path.exists(str(tmp_path / "work" / "teacher"))
    finally:
        gin.clear_config()


def test_runtime_errors_print_the_message_alone(tmp_path):
    """A run-time problem (here: distilling in an empty workdir) is one line on stderr
    and exit code 1, not a usage error with the flag help."""
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--gin_file=tiny",
         f"--workdir={tmp_path / 'empty'}", "--mode=distill"],
        capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No trained teacher" in errors[0], result.stderr
    assert "--gin_file" not in result.stderr and "Traceback" not in result.stderr


def test_unknown_gin_binding_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--gin_file=tiny",
         f"--workdir={tmp_path}", "--gin_param=UNet.chanels=8"],
        capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode != 0
    assert "Bad gin configuration" in result.stderr and "chanels" in result.stderr


def test_missing_gin_file_lists_the_available_ones(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--gin_file=cifar11",
         f"--workdir={tmp_path}"], capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode != 0
    assert "--gin_file=cifar11: no such file" in result.stderr
    assert "cifar_v.gin" in result.stderr


EVAL_SMALL = ["evaluate.num_samples=16", "evaluate.num_reference=32",
              "evaluate.digit_scores=False",
              "evaluate.ddim_steps=(1, 2)", "evaluate.batch_size=16"]


@pytest.mark.slow
def test_mismatched_network_config_is_refused(trained_workdir):
    with pytest.raises(training.PipelineError, match="network config .* does not match"):
        in_process(trained_workdir, "distill", ["UNet.channels=16"])


@pytest.mark.slow
def test_corrupt_checkpoint_is_detected(trained_workdir, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(trained_workdir, copy)
    path = checkpoint.weights_path(os.path.join(copy, "teacher"), "final")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(os.path.join(copy, "student_00004", "final.json"))
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: its sha256"):
        in_process(copy, "distill")


def test_eval_of_an_empty_workdir_says_so(tmp_path):
    from keras_progdist.evaluation.report import EvaluationError

    with pytest.raises(ValueError, match="does not exist: nothing has been trained"):
        in_process(str(tmp_path / "missing"), "eval")
    assert not os.path.exists(tmp_path / "missing"), "eval must not create a workdir"
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="Nothing to evaluate"):
        in_process(str(tmp_path / "empty"), "eval")


@pytest.mark.slow
def test_a_kill_during_evaluation_resumes_and_a_finished_job_rerun_is_a_no_op(
        trained_workdir, tmp_path):
    """`--mode=all` on a trained run: killed once its first model is scored, resumed
    (the report, plot and grids are written), re-run (a no-op), then stopped by a spent
    time budget before the one model whose scores were removed."""
    import shutil

    workdir = str(tmp_path / "work")
    shutil.copytree(trained_workdir, workdir)
    params = [f"--gin_param={p}" for p in EVAL_SMALL]
    flags = [*params, f"--export_dir={tmp_path / 'export'}", "--verbose=2"]
    process = subprocess.Popen(command(workdir, "all", flags=flags), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env())
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("[eval]"):  # the first model is scored: kill -9 now
            process.kill()
            break
    process.wait(timeout=600)
    assert any(line.startswith("[eval]") for line in seen), "".join(seen)

    resumed = run(workdir, "all", flags=flags)
    assert "finished earlier, skipping" in resumed.stdout
    assert "up to date" in resumed.stdout, resumed.stdout
    # The report: every model once, in order; KID only (FID needs 2048 samples).
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        report = json.load(f)
    kinds = [(r["kind"], r["num_steps"]) for r in report["results"]]
    assert kinds == [("ddim", 1), ("ddim", 2), ("teacher", 8), ("distilled", 4),
                     ("distilled", 2), ("distilled", 1)]
    for r in report["results"]:
        assert r["fid"] is None and "2048" in r["fid_note"]
        assert np.isfinite(r["kid"]) and np.isfinite(r["kid_std_err"])
    for name in ("report.md", "kid_vs_steps.png", "distilled_00001steps.png"):
        assert os.path.exists(os.path.join(workdir, "eval", name))

    again = run(workdir, "all", flags=flags)
    output = again.stdout
    assert "training" not in output and "distilling" not in output
    assert "resuming" not in output and "up to date" in output
    scored = [line for line in output.splitlines()
              if line.startswith("[eval]") and "steps:" in line]
    assert len(scored) == 6 and all("(saved earlier)" in line for line in scored), output
    exported = sorted(os.listdir(tmp_path / "export" / "tiny"))
    versions = [v for name in exported if name.endswith("steps")
                for v in os.listdir(tmp_path / "export" / "tiny" / name)]
    assert versions and set(versions) == {"1"}, versions

    # A spent time budget starts no new model: with one model's scores gone, the
    # evaluation stops before it (exit 143) and keeps the others' files untouched.
    runs = os.path.join(workdir, "eval", "runs")
    os.remove(os.path.join(runs, "distilled_00001.json"))
    kept = {f: os.path.getmtime(os.path.join(runs, f)) for f in os.listdir(runs)}
    assert len([f for f in kept if f.endswith(".json")]) == 5  # beside them, the probes
    stopped = run(workdir, "eval", flags=[*params, "--time_budget_s=1e-9"], check=False)
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr[-3000:]
    assert "[eval] time budget spent after 5 of 6 models" in stopped.stdout
    assert {f: os.path.getmtime(os.path.join(runs, f)) for f in os.listdir(runs)} == kept


@pytest.mark.slow
def test_the_pipeline_trains_on_a_folder_of_png_files(tmp_path):
    """One's own images: a folder of PNGs (two class subfolders) through the teacher and
    a distillation stage, on whichever input pipeline the backend picks."""
    from PIL import Image

    from keras_progdist import data

    digits, labels = data.load_images("mnist_embedded", image_size=16, limit=200)
    folder = tmp_path / "images"
    for i, (image, label) in enumerate(zip(digits, labels)):
        if label > 1:
            continue
        (folder / f"digit{label}").mkdir(parents=True, exist_ok=True)
        pixels = np.clip((np.asarray(image)[..., 0] + 1) * 127.5, 0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"digit{label}" / f"{i:04d}.png")
    workdir = str(tmp_path / "work")
    bindings = ["dataset.name='image_folder'", f"dataset.data_dir='{folder}'",
                "dataset.with_labels=True", "UNet.num_classes=2",
                "teacher.train_steps=10", "distill.teacher_steps=4",
                "distill.min_steps=2", "distill.updates_per_stage=10"]
    in_process(workdir, "train_teacher", bindings)
    in_process(workdir, "distill", bindings)
    with open(os.path.join(workdir, "stages.json")) as f:
        stages = [(s["stage"], s["num_steps"]) for s in json.load(f)]
    assert stages == [("teacher", 4), ("student_00002", 2)]
    with open(os.path.join(workdir, "config.json")) as f:
        network = json.load(f)["network"]
    assert network["image_shape"] == [8, 8, 1] and network["num_classes"] == 2


@pytest.mark.parametrize("teacher_dropout,student_dropout", [(0.1, 0.0)])
def test_students_with_their_own_dropout_finish_load_and_export(
        tmp_path, teacher_dropout, student_dropout):
    """A Dropout layer with a nonzero rate has a seed variable, so a student trained with
    another rate than the teacher has another weight layout: every loader (the next
    stage, a re-run, the export) must build each stage with the rate it was saved with."""
    workdir = str(tmp_path / "run")
    bindings = [f"UNet.dropout={teacher_dropout}", f"distill.student_dropout={student_dropout}",
                "teacher.train_steps=10", "distill.teacher_steps=4",
                "distill.updates_per_stage=10"]
    in_process(workdir, "train_teacher", bindings)
    in_process(workdir, "distill", bindings)
    assert [s[:2] for s in ladder(workdir)] == [("teacher", 4), ("student_00002", 2),
                                                ("student_00001", 1)]
    for stage, rate in (("teacher", teacher_dropout), ("student_00002", student_dropout),
                        ("student_00001", student_dropout)):
        assert checkpoint.read_meta(os.path.join(workdir, stage), "final")["dropout"] == rate
    in_process(workdir, "distill", bindings)  # a finished run re-run loads every stage
    from keras_progdist.export import workdir_export
    loaded = workdir_export.load_workdir_stages(workdir)  # the export's loader
    assert [(stage, n) for stage, n, _ in loaded] == [("teacher", 4), ("student_00002", 2),
                                                      ("student_00001", 1)]


def test_a_workdir_recorded_before_label_dropout_existed_still_matches(tmp_path):
    """config.json files written before `diffusion.label_dropout` existed have no such
    key: they mean 0 and must not stop a resume."""
    from keras_progdist.training.experiment import Experiment

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")], SMALL)
        workdir = tmp_path / "old"
        experiment = Experiment(str(workdir))
        experiment.check_workdir()
        path = workdir / "config.json"
        record = json.loads(path.read_text())
        assert record["diffusion"].pop("label_dropout") == 0.0
        path.write_text(json.dumps(record))
        Experiment(str(workdir)).check_workdir(write=False)
        record["diffusion"]["label_dropout"] = 0.1
        path.write_text(json.dumps(record))
        with pytest.raises(training.PipelineError, match="label_dropout"):
            Experiment(str(workdir)).check_workdir(write=False)
    finally:
        gin.clear_config()



"""The evaluation report (`evaluation/report.py`): which models a work directory's
evaluation scores, the scores and the files it writes, saved scores and their keys,
sample files standing in for sampling, and the plot's name.

The FID network is replaced by a cheap feature map (four pixel statistics), so these
tests check the report's bookkeeping with real samples and real KID numbers in
seconds; `tests/test_samples.py` and `tests/test_pipeline.py` run the real network.
"""

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from keras_progdist import data, errors, evaluation, images, training
from keras_progdist.evaluation import bootstrap, inputs, metrics, reference, report, samples
from keras_progdist.settings import EvaluateSettings, as_record
from keras_progdist.workdir import WorkDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.finished_workdir import make_finished_workdir

DATASET = {"name": "mnist_embedded", "image_size": 8, "batch_size": 16}


def _settings(tmp_path, **overrides):
    return dataclasses.replace(training.evaluate(), **{
        "num_samples": 8, "num_reference": 20, "ddim_steps": (1,), "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"), "digit_scores": False, **overrides})


def _features(pixels) -> np.ndarray:
    """Four statistics per image of its uint8 pixels (floats in [-1, 1] are quantised
    the way `compute_features` quantises them)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = images.to_uint8(pixels)
    x = pixels.astype(np.float64) / 255.0
    flat = x.reshape(len(x), -1)
    half = x.shape[1] // 2
    return np.stack([flat.mean(1), flat.std(1), x[:, :half].mean((1, 2, 3)),
                     x[:, :, :half].mean((1, 2, 3))], 1).astype(np.float32)


@pytest.fixture
def fake_fid(monkeypatch):
    """Counts the FID network loads and the feature calls."""
    calls = {"load": 0, "features": 0}

    def load():
        calls["load"] += 1
        return "fake network"

    def compute(model, pixels, batch_size=None, verbose=False):
        assert model == "fake network"
        calls["features"] += 1
        return _features(pixels)

    monkeypatch.setattr(evaluation, "load_fid_network", load, raising=False)
    monkeypatch.setattr(evaluation, "compute_features", compute, raising=False)
    return calls


def test_evaluation_runs_in_report_order_with_the_stage_weights(tmp_path):
    weights = make_finished_workdir(tmp_path, teacher_steps=8, students=(4, 2, 1))
    os.remove(tmp_path / "student_00002" / "final.json")  # not finished
    wd = WorkDir(str(tmp_path))
    cfg = _settings(tmp_path, ddim_steps=(1, 2, 8, 16), teacher_steps=(3, 2, 3))
    runs = inputs.evaluation_runs(wd, cfg)
    # DDIM below the teacher's count, extra teacher counts not already on the DDIM
    # curve (once each), the teacher's own count, then the finished students.
    assert [(r["kind"], r["num_steps"], r["stage"]) for r in runs] == [
        ("ddim", 1, "teacher"), ("ddim", 2, "teacher"), ("teacher", 3, "teacher"),
        ("teacher", 8, "teacher"), ("distilled", 4, "student_00004"),
        ("distilled", 1, "student_00001")]
    for run in runs:
        with open(tmp_path / run["stage"] / "final.json") as f:
            assert run["weights_sha256"] == json.load(f)["sha256"]
        np.testing.assert_array_equal(run["model"].network.get_weights()[0],
                                      weights[run["stage"]][0])
    assert runs[0]["model"] is runs[3]["model"]  # the teacher is loaded once


def test_nothing_to_evaluate_says_what_is_missing(tmp_path):
    cfg = _settings(tmp_path)
    with pytest.raises(inputs.EvaluationError,
                       match="Nothing to evaluate in .*: .* is not a keras-progdist"):
        report.evaluate_workdir(str(tmp_path), cfg, DATASET)
    make_finished_workdir(tmp_path, students=())
    os.remove(tmp_path / "teacher" / "final.json")
    with pytest.raises(inputs.EvaluationError, match="No finished teacher"):
        report.evaluate_workdir(str(tmp_path), cfg, DATASET)
    # The settings are an EvaluateSettings: a plain dict, even a complete one, is refused.
    with pytest.raises(inputs.EvaluationError,
                       match="must be a settings.EvaluateSettings .* got dict"):
        report.evaluate_workdir(str(tmp_path), as_record(cfg), DATASET)


def test_scores_are_kid_of_these_samples_against_these_images(tmp_path, fake_fid):
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=(1,))
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(tmp_path)
    result = report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    pixels = {}

    real, _ = data.load_images("mnist_embedded", image_size=8, limit=20)
    real_features = _features(real)
    models = {stage: model for stage, _, model in wd.stage_models()}
    expected = {("ddim", 1): ("teacher", 1), ("teacher", 2): ("teacher", 2),
                ("distilled", 1): ("student_00001", 1)}
    assert [(r["kind"], r["num_steps"]) for r in result["results"]] == list(expected)
    for r in result["results"]:
        stage, steps = expected[(r["kind"], r["num_steps"])]
        fake = samples.generate_range(models[stage], steps, 0, 8, 8, 4, cfg.seed)
        want = metrics.fid_and_kid(real_features, _features(fake))
        assert r["kid"] == pytest.approx(want["kid"], rel=1e-6, abs=1e-12)
        assert r["kid_std_err"] == pytest.approx(want["kid_std_err"], rel=1e-6)
        # 4 features: 8 samples are enough for FID here (the Inception's 2048 are not).
        assert r["fid"] == pytest.approx(want["fid"], rel=1e-6)
        assert r["num_real"] == 20 and r["num_fake"] == 8
        assert r["source"] == "in-process"
        # Standard errors: the paired bootstrap of these very features.
        counts = bootstrap.replicate_counts(8, cfg.bootstrap, cfg.seed)
        fid_reps = bootstrap.fid_replicates(real_features, _features(fake), counts)
        assert r["bootstrap"]["fid"] == pytest.approx(list(fid_reps), rel=1e-6)
        assert r["fid_se"] == pytest.approx(bootstrap.standard_error(fid_reps), rel=1e-6)
        assert r["fid_se"] > 0 and r["kid_se"] > 0
        pixels[r["kind"]] = images.to_uint8(fake)
    assert result["results"][0]["kid"] != result["results"][1]["kid"]
    # The student's comparison with the teacher and with DDIM at its step count.
    ddim, teacher, student = result["results"]
    compared = student["vs_teacher"]
    assert compared["metric"] == "fid"
    assert compared["delta"] == pytest.approx(student["fid"] - teacher["fid"])
    assert compared["ratio"] == pytest.approx(student["fid"] / teacher["fid"])
    assert compared["ddim_gap_share"] == pytest.approx(
        1 - (student["fid"] - teacher["fid"]) / (ddim["fid"] - teacher["fid"]))
    reps = {k: np.array(r["bootstrap"]["fid"]) for k, r in
            (("s", student), ("t", teacher), ("d", ddim))}
    assert compared["delta_se"] == pytest.approx(np.std(reps["s"] - reps["t"], ddof=1))
    assert compared["ddim_gap_share_se"] == pytest.approx(np.std(
        1 - (reps["s"] - reps["t"]) / (reps["d"] - reps["t"]), ddof=1))
    assert compared["vs_ddim"] == pytest.approx(student["fid"] - ddim["fid"])
    assert compared["vs_ddim_se"] == pytest.approx(np.std(reps["s"] - reps["d"], ddof=1))
    assert ddim["vs_teacher"]["vs_ddim"] is None
    diff = (pixels["distilled"].astype(np.float64) - pixels["teacher"]) / 127.5
    assert compared["rmse_to_teacher"] == pytest.approx(np.sqrt(np.mean(diff ** 2)))
    assert compared["rmse_to_2n_teacher"] == compared["rmse_to_teacher"]  # 2 -> 1 steps
    assert ddim["vs_teacher"]["rmse_to_teacher"] > 0
    # The side-by-side grid: teacher, then distilled and DDIM at 1 step, same noise.
    from PIL import Image

    with Image.open(wd.eval.image(report.SIDE_BY_SIDE)) as grid:
        np.testing.assert_array_equal(np.asarray(grid), images.grid(np.concatenate(
            [pixels["teacher"], pixels["distilled"], pixels["ddim"]]), columns=8))
    assert "teacher (2 steps), then distilled 1, DDIM 1" in result["side_by_side"]

    # metrics.json: the run as recorded in the work directory and the settings given.
    with open(wd.eval.metrics) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(result))
    assert written["workdir"] == wd.root and written["dataset"] == DATASET
    assert written["num_samples"] == 8 and written["num_reference"] == 20
    assert written["stages"] == wd.finished_stages()
    assert [s["stage"] for s in written["stages"]] == ["teacher", "student_00001"]
    assert written["plot"] == "fid_vs_steps.png"
    for path in (wd.eval.report, wd.eval.image("fid_vs_steps"),
                 wd.eval.image("ddim_00001steps"), wd.eval.run_record("distilled_00001")):
        assert os.path.exists(path), path
    assert fake_fid["load"] == 1


def test_saved_scores_are_reused_until_the_weights_or_settings_change(tmp_path,
                                                                     fake_fid):
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=(1,))
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(tmp_path)
    first = report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    calls = dict(fake_fid)
    again = report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    assert again["results"] == first["results"]
    assert fake_fid == calls, "nothing is sampled or scored again"

    # New weights for one stage: only that stage is scored again.
    make_finished_workdir(tmp_path / "other", teacher_steps=2, students=(1,), seed=1)
    for name in os.listdir(tmp_path / "other" / "student_00001"):
        os.replace(tmp_path / "other" / "student_00001" / name,
                   tmp_path / "work" / "student_00001" / name)
    runs = wd.eval.runs_dir()
    before = {f: os.path.getmtime(os.path.join(runs, f)) for f in os.listdir(runs)}
    second = report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    changed = {f for f, t in before.items() if os.path.getmtime(os.path.join(runs, f)) != t}
    assert changed == {"distilled_00001.json", "distilled_00001.npz"}  # score, probe
    assert second["results"][:2] == first["results"][:2]
    assert second["results"][2]["kid"] != first["results"][2]["kid"]
    # Another dataset setting (a data folder) may mean other real images, so it
    # changes every key: all scored again, with the network loaded again.
    calls = dict(fake_fid)
    report.evaluate_workdir(wd, cfg, {**DATASET, "data_dir": str(tmp_path)}, verbose=0)
    assert fake_fid["load"] == calls["load"] + 1
    assert all(os.path.getmtime(os.path.join(runs, f)) > t for f, t in before.items())


def test_a_passed_deadline_starts_no_new_model_and_keeps_the_scores(tmp_path, fake_fid):
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=(1,))
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(tmp_path)
    report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    os.remove(wd.eval.run_record("distilled_00001"))
    with pytest.raises(errors.Interrupted,
                       match="time budget spent after 2 of 3 models"):
        report.evaluate_workdir(wd, cfg, DATASET, verbose=0, deadline=time.time() - 1)
    scores = sorted(f for f in os.listdir(wd.eval.runs_dir()) if f.endswith(".json"))
    assert scores == ["ddim_00001.json", "teacher_00002.json"]
    samples.write_workdir_samples(wd, cfg, verbose=0)
    # Samples of another size than the run's images are refused, naming both shapes.
    with pytest.raises(inputs.EvaluationError, match=r"samples of shape \(8, 8, 1\), but "
                       r"this run's images are \(16, 16, 1\)"):
        report.score_sample_dir(wd.eval.samples, cfg,
                                {**DATASET, "image_size": 16}, str(tmp_path / "other"))
    with pytest.raises(errors.Interrupted, match="after 0 of 3 models"):
        report.score_sample_dir(wd.eval.samples, cfg, DATASET,
                                str(tmp_path / "scored"), deadline=time.time() - 1)


def test_sample_files_stand_in_for_sampling_and_score_alike(tmp_path, fake_fid):
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=(1,))
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(tmp_path)
    in_process = report.evaluate_workdir(wd, cfg, DATASET, verbose=0, sample_dir="")
    samples.write_workdir_samples(wd, cfg, verbose=0)
    from_files = report.evaluate_workdir(wd, cfg, DATASET, verbose=0)
    elsewhere = report.score_sample_dir(wd.eval.samples, cfg, DATASET,
                                        str(tmp_path / "scored"), verbose=0)
    for want, have, far in zip(in_process["results"], from_files["results"],
                               elsewhere["results"]):
        assert have["source"] == far["source"] == "files"
        assert have["kid"] == pytest.approx(want["kid"], rel=1e-6, abs=1e-12)
        assert far["kid"] == pytest.approx(want["kid"], rel=1e-6, abs=1e-12)
    assert elsewhere["dataset"] == DATASET and elsewhere["workdir"] == wd.eval.samples


def test_unusable_files_say_why(tmp_path):
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=())
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(tmp_path, ddim_steps=())
    sha = wd.final_sha256("teacher")
    sample_dir = wd.eval.samples
    assert report.usable_sample_files(sample_dir, "teacher_00002", sha, 2, cfg) == \
        (None, None)
    samples.write_workdir_samples(wd, cfg, verbose=0, num_samples=4)
    manifest, why = report.usable_sample_files(sample_dir, "teacher_00002", sha, 2, cfg)
    assert manifest is None and "num_samples" in why
    samples.write_workdir_samples(wd, cfg, verbose=0)
    manifest, why = report.usable_sample_files(sample_dir, "teacher_00002", sha, 2, cfg)
    assert why is None and manifest["complete"]
    _, why = report.usable_sample_files(sample_dir, "teacher_00002", "0" * 64, 2, cfg)
    assert "weights_sha256" in why
    _, why = report.usable_sample_files(sample_dir, "teacher_00002", sha, 2,
                                        dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert "seed" in why
    with open(os.path.join(sample_dir, "teacher_00002-part00000.npz"), "r+b") as f:
        f.write(b"x")
    _, why = report.usable_sample_files(sample_dir, "teacher_00002", sha, 2, cfg)
    assert "sha256" in why


def test_dataset_defaults_fill_in_what_is_not_given():
    full = reference.with_dataset_defaults({"name": "fashion_mnist", "image_size": 16})
    assert full["name"] == "fashion_mnist" and full["image_size"] == 16
    assert full["resize"] == "bilinear" and full["data_dir"] is None
    # The defaults enter the reference key: leaving one out or giving it is one key.
    cfg = EvaluateSettings(split="train", num_reference=10)
    assert reference.reference_key(cfg, {"name": "fashion_mnist"}) == \
        reference.reference_key(cfg, {"name": "fashion_mnist", "resize": "bilinear"})
    assert reference.reference_key(cfg, {})["dataset"] == "mnist_embedded"


def test_plot_is_named_by_its_metric():
    kid_only = [{"kind": "teacher", "num_steps": 8, "fid": None, "kid": 0.1}]
    with_fid = [{"kind": "teacher", "num_steps": 8, "fid": 12.0, "kid": 0.1}]
    assert report.plot_name(kid_only) == "kid_vs_steps"
    assert report.plot_name(with_fid) == "fid_vs_steps"

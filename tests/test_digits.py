"""The digit classifier that checks whether samples read as digits (backend-agnostic)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_progdist.evaluation import digits, samples
from keras_progdist.workdir import WorkDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.finished_workdir import make_finished_workdir


@pytest.fixture(scope="module")
def trained():
    return digits.train_classifier(image_size=16, seed=0)


def test_holdout_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 500)
    train, held = digits.split_holdout(labels, 0.1, seed=0)
    assert len(held) == 500 and len(train) == 4500
    assert not set(train) & set(held)
    assert np.bincount(labels[held]).tolist() == [50] * 10
    again = digits.split_holdout(labels, 0.1, seed=0)
    assert np.array_equal(again[1], held)


def test_classifier_is_accurate_on_held_out_real_digits(trained):
    _, info = trained
    assert info["num_heldout"] == 500
    assert info["accuracy"] > 0.93, info


def test_real_digits_are_confident_and_noise_is_not(trained):
    classifier, info = trained
    x, y = digits.load_digits(16)
    _, held = digits.split_holdout(y, 0.1, info["seed"])
    real = digits.digit_scores(classifier, x[held])
    assert real["mean_confidence"] > 0.85, real
    assert real["frac_confident"] > 0.75, real
    # Every class is predicted about equally often: near log2(10) bits.
    assert real["class_entropy_bits"] > 3.2, real

    rng = np.random.RandomState(123)
    for noise in (rng.uniform(-1, 1, (256, 16, 16, 1)),
                  np.clip(rng.normal(0, 0.5, (256, 16, 16, 1)), -1, 1)):
        scores = digits.digit_scores(classifier, noise.astype(np.float32))
        assert scores["mean_confidence"] < 0.3, scores
        assert scores["frac_confident"] < 0.05, scores


def test_uint8_input_matches_float_input(trained):
    classifier, _ = trained
    x, _ = digits.load_digits(16)
    pixels = np.round((x[:32] + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(digits.predict_probs(classifier, pixels),
                               digits.predict_probs(classifier, x[:32]), atol=1e-5)


def test_class_entropy_of_a_collapsed_set_is_zero(trained):
    classifier, _ = trained
    x, y = digits.load_digits(16)
    ones = x[y == 1][:50]
    scores = digits.digit_scores(classifier, ones)
    assert scores["class_counts"][1] >= 45
    assert scores["class_entropy_bits"] < 0.5
    assert sum(scores["class_counts"]) == 50
    assert 0.0 <= scores["class_entropy_bits"] <= math.log2(10)


def test_markdown_lists_every_row():
    record = {"classifier": {"accuracy": 0.97, "num_heldout": 500},
              "real_heldout": {"mean_confidence": 0.95, "frac_confident": 0.9,
                               "class_entropy_bits": 3.3},
              "results": [{"kind": k, "num_steps": n, "mean_confidence": 0.5,
                           "frac_confident": 0.4, "class_entropy_bits": 3.0}
                          for k, n in (("teacher", 128), ("ddim", 4), ("distilled", 4))]}
    text = digits.markdown(record)
    assert "97.0%" in text
    assert text.count("\n| ") == 5


def test_scorer_for_only_takes_embedded_mnist():
    assert digits.scorer_for({"name": "fashion_mnist"}, (16, 16, 1)) is None
    assert digits.scorer_for({"name": "mnist_embedded"}, (16, 16, 3)) is None
    scorer = digits.scorer_for({"name": "mnist_embedded", "resize": "bilinear"},
                               (16, 16, 1))
    assert scorer.image_size == 16 and scorer.classifier is None  # trains on first use


def test_evaluate_workdir_scores_the_stages_of_a_workdir(trained, tmp_path):
    classifier, info = trained
    make_finished_workdir(tmp_path, teacher_steps=4, students=(2, 1),
                          image_shape=(16, 16, 1))
    wd = WorkDir(str(tmp_path))
    record = digits.evaluate_workdir(wd, {"name": "mnist_embedded", "resize": "pad"},
                                     steps=2, num_samples=6, batch_size=4, seed=5,
                                     classifier=classifier, info=info, verbose=0)
    assert [(r["kind"], r["num_steps"]) for r in record["results"]] == \
        [("teacher", 4), ("ddim", 2), ("distilled", 2)]
    # The key: the dataset's resize, the models' image size, the two stages' weights.
    assert record["key"]["resize"] == "pad" and record["key"]["image_size"] == 16
    assert record["key"]["weights_sha256"] == {
        "teacher": wd.final_sha256("teacher"),
        "student_00002": wd.final_sha256("student_00002")}
    models = {stage: model for stage, _, model in wd.stage_models()}
    for r, (stage, n) in zip(record["results"], [("teacher", 4), ("teacher", 2),
                                                 ("student_00002", 2)]):
        fake = samples.generate_range(models[stage], n, 0, 6, 6, 4, 5)
        want = digits.digit_scores(classifier, fake)
        assert r["mean_confidence"] == pytest.approx(want["mean_confidence"], rel=1e-6)
        assert r["class_counts"] == want["class_counts"]
    with open(wd.eval.digits("json")) as f:
        assert json.load(f)["key"] == record["key"]
    # Nothing new: the scores are read back, no classifier is trained.
    again = digits.evaluate_workdir(str(tmp_path), {"resize": "pad"}, steps=2,
                                    num_samples=6, batch_size=4, seed=5, verbose=0)
    assert again["results"] == json.loads(json.dumps(record["results"]))


@pytest.mark.slow
def test_the_command_line_reads_the_workdir_and_the_gin_file(tmp_path):
    # 32x32: digits padded from 28 (`dataset.resize='pad'` from the command line).
    make_finished_workdir(tmp_path / "work", teacher_steps=4, students=(2,),
                          image_shape=(32, 32, 1))
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "digits.py"), "--gin_file=tiny.gin",
         "--gin_param=dataset.resize='pad'", f"--workdir={tmp_path / 'work'}",
         "--steps=2", "--num_samples=8"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| distilled | 2 |" in result.stdout and "| ddim | 2 |" in result.stdout
    with open(WorkDir(str(tmp_path / "work")).eval.digits("json")) as f:
        record = json.load(f)
    assert record["key"]["resize"] == "pad" and record["key"]["num_samples"] == 8
    assert record["key"]["image_size"] == 32


def test_score_probes_pairs_the_student_with_ddim_at_every_n(trained, tmp_path):
    classifier, info = trained
    x, y = digits.load_digits(16)
    _, held = digits.split_holdout(y, 0.1, info["seed"])
    real = np.round((x[held[:64]] + 1.0) * 127.5).astype(np.uint8)
    noise = np.random.RandomState(5).randint(0, 256, real.shape).astype(np.uint8)
    mixed = np.concatenate([real[:40], noise[40:]])
    probes = {("teacher", 4): real, ("distilled", 2): real, ("ddim", 2): mixed,
              ("distilled", 1): mixed, ("ddim", 1): mixed}
    path = str(tmp_path / "runs" / "digits.json")
    os.makedirs(os.path.dirname(path))
    record = digits.score_probes(probes, {"name": "mnist_embedded"}, path, verbose=0)

    confident = {k: digits.predict_probs(classifier, p).max(-1) > digits.CONFIDENT
                 for k, p in probes.items()}
    two, one = record["comparisons"]
    diff = confident[("distilled", 2)].astype(float) - confident[("ddim", 2)]
    assert two["num_steps"] == 2 and two["num_samples"] == 64
    assert two["distilled"] == pytest.approx(confident[("distilled", 2)].mean())
    assert two["difference"] == pytest.approx(diff.mean())
    assert two["difference_se"] == pytest.approx(diff.std(ddof=1) / 8.0)
    # Real digits against a set with 24 noise images in place of digits: the student
    # is ahead by about that share, far beyond the paired error.
    assert two["difference"] > 0.25 and two["difference"] > 4 * two["difference_se"]
    # The same samples: no difference and no error.
    assert one["difference"] == 0.0 and one["difference_se"] == 0.0
    assert [(r["kind"], r["num_steps"]) for r in record["results"]] == sorted(probes)
    lines = digits.probe_markdown(record)
    assert any(line.startswith("| 2 | ") and f"{100 * two['difference']:+.1f}" in line
               for line in lines)

    # Unchanged probes: read back, nothing retrained or rewritten.
    mtime = os.stat(path).st_mtime_ns
    assert digits.score_probes(probes, {"name": "mnist_embedded"}, path, 0) == \
        json.loads(json.dumps(record))
    assert os.stat(path).st_mtime_ns == mtime
    # Another data set: no digit scores at all.
    assert digits.score_probes(probes, {"name": "fashion_mnist"}, path, 0) is None

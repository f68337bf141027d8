"""Sample files (`evaluation/samples.py`, `--mode=sample`): ADM-style npz chunks,
manifests, resume, scoring them instead of sampling in process (same scores), scoring a
folder without models, quiet logs, labels, and the upscaled grids."""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gin
from keras_progdist import fileio, images, training
from keras_progdist.evaluation import inputs, report, sample_files, samples
from keras_progdist.settings import as_record
from keras_progdist.workdir import WorkDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.finished_workdir import make_finished_workdir

# Two noise batches of 4; (a short last batch is covered by the slicing test below, and
# each extra batch shape costs a compilation per model).
NUM_SAMPLES, BATCH = 8, 4
MODELS = ["ddim_00001", "teacher_00004", "distilled_00002", "distilled_00001"]
# 3 samples of 16x16x1 per file: chunks cut across the noise batches of 4.
THREE_PER_FILE_MB = (64 * 1024 + 3 * 256 + 100) / 2 ** 20


def _eval_bindings(cache_dir):
    return [f"evaluate.num_samples={NUM_SAMPLES}", "evaluate.num_reference=16",
            "evaluate.ddim_steps=(1,)", f"evaluate.batch_size={BATCH}",
            f"evaluate.cache_dir={str(cache_dir)!r}", "evaluate.digit_scores=False"]


@contextlib.contextmanager
def _config(bindings=()):
    """The gin config in force; yields the evaluation and dataset settings."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                            list(bindings))
        yield training.evaluate(), training.dataset_settings()
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step teacher and its 2- and 1-step students (random weights).

    What these tests check (files, resume, scores from files against scores in process)
    holds for any weights, so the work directory is written, not trained: training it
    took 30 s of a test process."""
    workdir = tmp_path_factory.mktemp("finished")
    make_finished_workdir(workdir, teacher_steps=4, students=(2, 1), image_shape=(16, 16, 1))
    return str(workdir)


def _copy(finished, tmp_path, name):
    copy = str(tmp_path / name)
    shutil.copytree(finished, copy)
    return copy


def _by_model(results):
    return {sample_files.model_name(r["kind"], r["num_steps"]): r for r in results}


@pytest.mark.slow
def test_file_scores_equal_in_process_scores(finished, tmp_path, capsys):
    cache = tmp_path / "cache"
    in_process = _copy(finished, tmp_path, "in_process")
    from_files = _copy(finished, tmp_path, "from_files")
    with _config(_eval_bindings(cache)) as (cfg, dataset):
        pass
    # No gin from here on: a work directory and plain settings.
    expected = report.evaluate_workdir(WorkDir(in_process), cfg, dataset, verbose=0,
                                       sample_dir="")
    wd = WorkDir(from_files)
    paths = samples.write_workdir_samples(wd, cfg, max_file_mb=THREE_PER_FILE_MB,
                                          verbose=2)
    capsys.readouterr()
    got = report.evaluate_workdir(wd, cfg, dataset, verbose=2)
    out = capsys.readouterr().out
    sample_dir = wd.eval.samples
    elsewhere = report.score_sample_dir(sample_dir, cfg, dataset, str(tmp_path / "scored"),
                                        verbose=0)

    # The files: ADM's arr_0 uint8 NHWC, chunks under the size limit, a manifest each.
    assert [os.path.basename(p) for p in paths] == [f"{m}.json" for m in MODELS]
    for model in MODELS:
        with open(sample_files.manifest_path(sample_dir, model)) as f:
            manifest = json.load(f)
        assert manifest["complete"] and manifest["num_files"] == 3
        assert manifest["protocol"]["num_samples"] == NUM_SAMPLES
        assert manifest["protocol"]["noise_batch_size"] == BATCH
        assert manifest["protocol"]["image_shape"] == [16, 16, 1]
        stage = manifest["stage"]
        with open(os.path.join(from_files, stage, "final.json")) as f:
            assert manifest["weights_sha256"] == json.load(f)["sha256"]
        counts = []
        for entry in manifest["files"]:
            path = os.path.join(sample_dir, entry["name"])
            assert entry["name"] == sample_files.part_name(model, entry["index"])
            assert os.path.getsize(path) <= THREE_PER_FILE_MB * 2 ** 20
            with np.load(path) as data:
                assert data.files == ["arr_0"]
                assert data["arr_0"].dtype == np.uint8
                counts.append(data["arr_0"].shape)
        assert counts == [(3, 16, 16, 1)] * 2 + [(2, 16, 16, 1)]

    # The scores: the same as sampling in process, from the files, with or without models.
    want, have, far = (_by_model(r["results"]) for r in (expected, got, elsewhere))
    assert list(want) == list(have) == list(far) == MODELS
    for model in MODELS:
        assert want[model]["source"] == "in-process"
        assert have[model]["source"] == far[model]["source"] == "files"
        assert have[model]["kid"] == pytest.approx(want[model]["kid"], rel=1e-6, abs=1e-9)
        assert far[model]["kid"] == pytest.approx(want[model]["kid"], rel=1e-6, abs=1e-9)
        assert have[model]["kid_std_err"] == pytest.approx(want[model]["kid_std_err"],
                                                           rel=1e-6, abs=1e-9)
        print(f"FIGURES {model}: KID in process {want[model]['kid']!r}, "
              f"from files {have[model]['kid']!r}, folder {far[model]['kid']!r}")
    # verbose=2: one plain line per model, no progress bars.
    assert "\x1b" not in out and "\b" not in out and "\r" not in out
    assert sum(line.startswith("[eval] ") and "(files)" in line
               for line in out.splitlines()) == len(MODELS)
    # The plot is named by what it plots (KID: fewer than 2048 samples).
    for workdir in (in_process, from_files):
        out = WorkDir(workdir).eval
        assert os.path.exists(out.image("kid_vs_steps"))
        assert not os.path.exists(out.image("fid_vs_steps"))
    assert got["plot"] == "kid_vs_steps.png"


@pytest.mark.slow
def test_sampling_resumes_and_remakes_only_missing_or_damaged_chunks(finished, tmp_path,
                                                                      capsys):
    workdir = _copy(finished, tmp_path, "resume")
    with _config(_eval_bindings(tmp_path / "cache") + ["evaluate.ddim_steps=()"]) as (
            cfg, _):
        wd = WorkDir(workdir)
        samples.write_workdir_samples(wd, cfg, max_file_mb=THREE_PER_FILE_MB, verbose=0)
        sample_dir = wd.eval.samples
        parts = sorted(f for f in os.listdir(sample_dir) if f.endswith(".npz"))
        assert len(parts) == 3 * 3
        before = {f: (os.path.getmtime(os.path.join(sample_dir, f)),
                      fileio.sha256_file(os.path.join(sample_dir, f)))
                  for f in parts}
        os.remove(os.path.join(sample_dir, "teacher_00004-part00001.npz"))
        damaged = os.path.join(sample_dir, "distilled_00001-part00002.npz")
        with open(damaged, "r+b") as f:
            f.seek(os.path.getsize(damaged) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        capsys.readouterr()
        samples.write_workdir_samples(wd, cfg, max_file_mb=THREE_PER_FILE_MB, verbose=2)
        out = capsys.readouterr().out
    remade = [line for line in out.splitlines() if " part " in line]
    assert len(remade) == 2, out
    assert "teacher_00004: part 2/3" in out and "distilled_00001: part 3/3" in out
    for f, (mtime, digest) in before.items():
        path = os.path.join(sample_dir, f)
        # Deterministic sampling: the remade chunks equal the originals byte for byte.
        assert fileio.sha256_file(path) == digest
        if f not in ("teacher_00004-part00001.npz", "distilled_00001-part00002.npz"):
            assert os.path.getmtime(path) == mtime, f"{f} was rewritten"
    assert "\x1b" not in out and "\b" not in out


@pytest.mark.slow
def test_sampling_runs_on_jax_without_tensorflow(finished, tmp_path):
    workdir = _copy(finished, tmp_path, "jax")
    out_dir = str(tmp_path / "jax_samples")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{os.path.join(ROOT, 'tests', 'helpers')!r}, {ROOT!r}]
        import no_tensorflow
        from keras_progdist.evaluation import samples
        from keras_progdist.training import config
        config.parse_gin([{os.path.join(ROOT, 'gin', 'tiny.gin')!r}],
                         {_eval_bindings(tmp_path / 'c')!r})
        paths = samples.write_workdir_samples({workdir!r}, config.evaluate(), {out_dir!r},
                                              num_samples=5, verbose=2)
        assert no_tensorflow.loaded_tensorflow_modules() == []
        print("WROTE", len(paths))
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WROTE 4" in result.stdout
    for model in MODELS:
        manifest = sample_files.read_manifest(sample_files.manifest_path(out_dir, model))
        assert manifest["complete"] and manifest["protocol"]["backend"] == "jax"
        sample_files.check_complete(manifest, out_dir)
        assert sample_files.load_samples(manifest, out_dir).shape == (5, 16, 16, 1)


def test_generate_range_is_a_slice_of_the_whole_run():
    """Any chunk of the samples equals that slice of one pass over all of them."""

    class Recorder:
        image_shape = (2, 2, 1)

        def sample(self, noise, num_steps, label, guidance=None):
            return np.asarray(noise) * 0.1

    whole = samples.generate_range(Recorder(), 1, 0, 10, 10, 4, 7)
    for start, stop in [(0, 3), (3, 6), (6, 9), (9, 10), (2, 10), (4, 8)]:
        np.testing.assert_array_equal(
            samples.generate_range(Recorder(), 1, start, stop, 10, 4, 7), whole[start:stop])


def test_samples_per_file_respects_the_limit():
    assert samples.samples_per_file((16, 16, 1), THREE_PER_FILE_MB) == 3
    assert samples.samples_per_file((32, 32, 3), 256) == (256 * 2 ** 20 - 65536) // 3072
    with pytest.raises(ValueError, match="too small"):
        samples.samples_per_file((64, 64, 3), 0.01)


def test_grids_are_upscaled_with_nearest_neighbour(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    floats = rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32)
    path = images.save_grid(floats, str(tmp_path / "g.png"))
    grid = np.asarray(Image.open(path))
    # 4x4 tiles of 16 px + gutters = 69 px, enlarged 4x to 276 px.
    assert grid.shape == (276, 276)
    small = images.grid(floats, min_size=0)
    assert small.shape == (69, 69)
    np.testing.assert_array_equal(grid, np.repeat(np.repeat(small, 4, 0), 4, 1))
    # Every sample pixel is a 4x4 block of one value: nearest, not interpolated.
    np.testing.assert_array_equal(grid[4:8, 4:8], np.full((4, 4), images.to_uint8(
        floats[0, 0, 0, 0])))
    # uint8 input (stored samples) draws the same grid as the floats it came from.
    np.testing.assert_array_equal(images.grid(images.to_uint8(floats)), grid)
    rgb = images.grid(rng.uniform(-1, 1, (2, 300, 100, 3)), min_size=256)
    assert rgb.shape == (302, 203, 3)  # already long enough: not enlarged


def _settings(**overrides):
    return dataclasses.replace(training.evaluate(), **overrides)


def test_labels_and_samples_of_a_class_conditional_workdir(tmp_path):
    """Each model's files hold exactly `generate_range`'s samples of that stage's
    weights, with labels `index % num_classes` under `arr_1`."""
    make_finished_workdir(tmp_path / "work", teacher_steps=2, students=(1,),
                          num_classes=3)
    wd = WorkDir(str(tmp_path / "work"))
    cfg = _settings(num_samples=5, batch_size=2, ddim_steps=(1,), seed=11)
    paths = samples.write_workdir_samples(wd, cfg, verbose=0)
    sample_dir = wd.eval.samples
    assert paths == [sample_files.manifest_path(sample_dir, m)
                     for m in ("ddim_00001", "teacher_00002", "distilled_00001")]
    models = {stage: model for stage, _, model in wd.stage_models()}
    for path, (stage, steps) in zip(paths, [("teacher", 1), ("teacher", 2),
                                            ("student_00001", 1)]):
        manifest = sample_files.read_manifest(path)
        assert manifest["stage"] == stage and manifest["num_steps"] == steps
        assert manifest["weights_sha256"] == wd.final_sha256(stage)
        assert manifest["protocol"]["num_classes"] == 3
        with np.load(os.path.join(sample_dir, manifest["files"][0]["name"])) as data:
            np.testing.assert_array_equal(data["arr_1"], [0, 1, 2, 0, 1])
            want = samples.generate_range(models[stage], steps, 0, 5, 5, 2, 11, 3)
            np.testing.assert_array_equal(data["arr_0"], images.to_uint8(want))
    # The student's samples are not the teacher's (the files follow the weights).
    teacher, student = (sample_files.load_samples(sample_files.read_manifest(p), sample_dir)
                        for p in paths[1:])
    assert np.abs(teacher.astype(int) - student.astype(int)).mean() > 1


def test_settings_come_in_as_evaluate_settings(tmp_path):
    make_finished_workdir(tmp_path, students=())
    with pytest.raises(inputs.EvaluationError,
                       match="must be a settings.EvaluateSettings .* got dict"):
        samples.write_workdir_samples(str(tmp_path), as_record(_settings()))
    with pytest.raises(inputs.EvaluationError, match="Nothing to evaluate .* is not a"):
        samples.write_workdir_samples(str(tmp_path / "empty"), _settings())

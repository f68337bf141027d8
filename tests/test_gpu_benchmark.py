"""benchmarks/fashion_mnist_gpu.sh end to end on the CPU, as on the JAX GPU host: JAX
backend, TensorFlow unimportable (in the driver and in every bin/run.py piece), a tiny
net on tiny fake Fashion-MNIST idx files, an output folder with small limits."""

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "fashion_mnist_gpu.sh")
HELPERS = os.path.join(ROOT, "tests", "helpers")

spec = importlib.util.spec_from_file_location(
    "fashion_mnist_gpu", os.path.join(ROOT, "benchmarks", "fashion_mnist_gpu.py"))
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)

# 5 models (DDIM 1 and 2 steps, the 4-step teacher, students 2 and 1) x 24 samples of
# 8x8x1 = 120 samples of 64 bytes.
TINY = [
    "--gin_param=dataset.image_size=8", "--gin_param=dataset.resize='bilinear'",
    "--gin_param=dataset.batch_size=8",
    "--gin_param=UNet.channels=8", "--gin_param=UNet.channel_mult=(1,)",
    "--gin_param=UNet.num_res_blocks=1", "--gin_param=UNet.attention_resolutions=()",
    "--gin_param=UNet.num_groups=4",
    "--gin_param=teacher.train_steps=20", "--gin_param=teacher.checkpoint_every=10",
    "--gin_param=teacher.warmup_steps=0", "--gin_param=teacher.steps_per_execution=1",
    "--gin_param=distill.teacher_steps=4", "--gin_param=distill.updates_per_stage=4",
    "--gin_param=distill.checkpoint_every=2", "--gin_param=distill.steps_per_execution=1",
    "--gin_param=evaluate.num_samples=24", "--gin_param=evaluate.batch_size=8",
    "--gin_param=evaluate.ddim_steps=(1, 2)", "--gin_param=evaluate.num_reference=16",
    "--gin_param=sample_grid.count=0",  # the stage grids stay in the work directory
]
MODELS = ["ddim_00001", "ddim_00002", "teacher_00004", "distilled_00002",
          "distilled_00001"]
# (0.0675 MiB - 64 KiB of room) // 64 bytes = 81 samples a pack: 120 samples -> 2 packs,
# one model split across them.
MAX_FILE_MB = 0.0675


def _write_idx(path, array):
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """64 28x28 'garments' (bright rectangles of random sizes) in the real idx format."""
    rng = np.random.default_rng(0)
    images = np.zeros((64, 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(2, 10, 2)
        image[top:top + rng.integers(8, 16), left:left + rng.integers(8, 16)] = \
            rng.integers(120, 255)
    folder = tmp_path / "fashion"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(64) % 10)
    return str(folder)


def _env(tmp_path):
    """PROGDIST_PYTHON: this interpreter with TensorFlow made unimportable first."""
    wrapper = tmp_path / "python_without_tensorflow.py"
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {HELPERS!r})\n"
        "import no_tensorflow  # noqa: F401\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "assert not no_tensorflow.loaded_tensorflow_modules()\n")
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # the script sets jax itself
    env["PROGDIST_PYTHON"] = f"{sys.executable} {wrapper}"
    return env


def _run(tmp_path, outdir, *flags):
    began = time.time()
    result = subprocess.run(["bash", SCRIPT, str(outdir), *flags], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=900)
    return result, time.time() - began


@pytest.mark.slow  # 1.5-3 minutes on 2 busy cores: four runs of the script
def test_the_whole_run_resumes_packs_and_keeps_the_output_limits(tmp_path, fake_fashion):
    outdir, workdir = tmp_path / "out", tmp_path / "work"
    flags = [f"--workdir={workdir}", f"--data_dir={fake_fashion}",
             f"--max_file_mb={MAX_FILE_MB}", "--piece_overhead_s=0"] + TINY

    # 1. A budget spent on the configuration check (Keras imports): exit 143 before
    # the teacher. 2. The check is kept, so the same budget now starts the teacher,
    # which stops at a checkpoint after its first step (compiling alone takes longer).
    zeroth, _ = _run(tmp_path, outdir, *flags, "--time_budget_s=0.5")
    assert zeroth.returncode == 143, zeroth.stdout[-3000:] + zeroth.stderr[-3000:]
    assert "teacher: time budget spent before it" in zeroth.stdout
    first, _ = _run(tmp_path, outdir, *flags, "--time_budget_s=0.5")
    assert first.returncode == 143, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[preempted]" in first.stdout and "teacher: exit code 143" in first.stdout
    assert os.path.exists(workdir / "teacher" / "ckpt.json")
    assert not [n for n in os.listdir(outdir) if n.endswith(".npz")]

    # 2. The same command without a budget goes on from there and finishes.
    second, _ = _run(tmp_path, outdir, *flags)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming at step" in second.stdout
    for piece in ("teacher", "distill", "sample"):
        assert f"{piece}: exit code 0" in second.stdout

    # The output folder: at most 8 files, none above the limit, two packs.
    names = sorted(os.listdir(outdir))
    assert len(names) <= 8
    limit = int(MAX_FILE_MB * 2 ** 20)
    assert all(os.path.getsize(outdir / n) <= limit for n in names), \
        [(n, os.path.getsize(outdir / n)) for n in names]
    assert names == ["run.log", "samples-000.npz", "samples-001.npz", "stages.json"]
    stages = json.loads((outdir / "stages.json").read_text())
    assert [s["num_steps"] for s in stages] == [4, 2, 1]
    log = (outdir / "run.log").read_text()
    assert "teacher: exit code 143" in log and "sample: exit code 0" in log

    # Every pack: uint8 NHWC under arr_0; the models whole and in order.
    total = 0
    for name in ("samples-000.npz", "samples-001.npz"):
        with np.load(outdir / name, allow_pickle=False) as pack:
            arr = pack["arr_0"]
            assert arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[1:] == (8, 8, 1)
            total += len(arr)
    assert total == len(MODELS) * 24
    models = gpu.read_packs(str(outdir))
    assert sorted(models) == sorted(MODELS)
    # The packs hold exactly the samples --mode=sample wrote.
    from keras_progdist.evaluation import sample_files
    sample_dir = str(workdir / "eval" / "samples")
    for name, images in models.items():
        manifest = sample_files.read_manifest(sample_files.manifest_path(sample_dir, name))
        np.testing.assert_array_equal(images, sample_files.load_samples(manifest, sample_dir))

    # 3. Done: the same command again is a quick no-op.
    third, seconds = _run(tmp_path, outdir, *flags)
    assert third.returncode == 0 and "already complete" in third.stdout, third.stderr
    assert seconds < 15
    assert sorted(os.listdir(outdir)) == names

    # Unpacked: one <model>.npz per model, arr_0 uint8 NHWC.
    dest = tmp_path / "unpacked"
    gpu.unpack(str(outdir), str(dest))
    for name in MODELS:
        with np.load(dest / f"{name}.npz") as unpacked:
            np.testing.assert_array_equal(unpacked["arr_0"], models[name])


def test_missing_data_and_a_config_too_big_for_the_folder_fail_first(tmp_path,
                                                                      fake_fashion):
    outdir = tmp_path / "out"
    missing, _ = _run(tmp_path, outdir, f"--data_dir={tmp_path / 'nothing'}", *TINY)
    assert missing.returncode == 2
    assert "Fashion-MNIST data missing" in missing.stderr
    assert "train-images-idx3-ubyte.gz" in missing.stderr

    # 3 files leave room for one pack of 81 samples; 120 do not fit: refused before
    # any training.
    too_big, _ = _run(tmp_path, outdir, f"--workdir={tmp_path / 'work'}",
                      f"--data_dir={fake_fashion}", f"--max_file_mb={MAX_FILE_MB}",
                      "--max_files=3", *TINY)
    assert too_big.returncode == 2, too_big.stdout[-2000:] + too_big.stderr[-2000:]
    assert "need 2 packs" in too_big.stderr and "at most 16 samples per model" \
        in too_big.stderr
    assert not os.path.exists(tmp_path / "work" / "teacher")


def test_the_log_is_cut_to_the_limit_keeping_head_and_tail(tmp_path):
    path = tmp_path / "run.log"
    path.write_bytes(b"HEAD" + b"x" * 100_000 + b"TAIL")
    gpu.trim_log(str(path), 5_000)
    content = path.read_bytes()
    assert len(content) <= 5_000
    assert content.startswith(b"HEAD") and content.endswith(b"TAIL") and b"cut" in content


def test_the_output_limits_are_checked(tmp_path):
    for i in range(3):
        (tmp_path / f"samples-{i:03d}.npz").write_bytes(b"x" * 10)
    assert len(gpu.check_limits(str(tmp_path), 3, 1.0)) == 3
    with pytest.raises(gpu.BenchmarkError, match="breaks its limits"):
        gpu.check_limits(str(tmp_path), 2, 1.0)
    (tmp_path / "samples-000.npz").write_bytes(b"x" * (2 ** 20 + 1))
    with pytest.raises(gpu.BenchmarkError, match="breaks its limits"):
        gpu.check_limits(str(tmp_path), 8, 1.0)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(gpu.BenchmarkError, match="not this benchmark's"):
        gpu.check_outdir(str(tmp_path))


def test_the_gpu_config_fits_the_output_folder():
    """The shipped config: 10 models x 6400 samples of 32x32x1 fit 8 files of 16 MiB."""
    args = gpu.parse_args(["/tmp/out_unused"])
    layout = gpu.plan(args)
    assert len(layout["models"]) == 10
    assert layout["packs"] <= 6
    assert layout["bytes_per_sample"] == 1024


def test_teacher_step_bench_gpu_path_runs_without_tensorflow(tmp_path):
    """`teacher_step_bench.py --gpu` on the TF-free JAX host: checked on the CPU with the
    tiny net (`--allow-cpu`), TensorFlow unimportable."""
    env = _env(tmp_path)
    env["KERAS_BACKEND"] = "jax"
    command = env["PROGDIST_PYTHON"].split() + [
        os.path.join(ROOT, "benchmarks", "teacher_step_bench.py"), "--gpu",
        "--gpu-net=tiny", "--allow-cpu", "--cifar-batch=2", "--cifar-steps=1",
        f"--output-dir={tmp_path}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [record] = json.loads((tmp_path / "teacher_step_jax_gpu.json").read_text())
    assert record["net"] == "tiny" and record["backend"] == "jax"
    assert record["dtype_policy"] == "mixed_bfloat16" and record["step_ms"] > 0

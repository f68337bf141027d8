"""The guided benchmark's goal check, table and argument handling (no training)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "fashion_mnist_guided_bench", os.path.join(ROOT, "benchmarks", "fashion_mnist_guided.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _r(stage, name, steps, nfe, w, fid, accuracy, kid=0.01):
    return {"stage": stage, "model": name, "num_steps": steps, "nfe": nfe, "w": w,
            "fid": fid, "kid": kid, "kid_std_err": 0.001, "class_accuracy": accuracy,
            "num_samples": 2048, "num_reference": 5000}


RESULTS = [
    _r("teacher", "teacher", 64, 128, 0.0, 20.0, 0.70),
    _r("teacher", "teacher", 64, 128, 1.0, 15.0, 0.80),
    _r("guidance", "stage one", 64, 64, 1.0, 16.0, 0.80),
    _r("student_00004", "4 steps", 4, 4, 0.0, 30.0, 0.60),
    _r("student_00004", "4 steps", 4, 4, 1.0, 19.0, 0.785),
]


def test_goal_compares_the_4_step_student_with_the_teacher_at_w_1():
    check = bench.goal_check(RESULTS)
    assert check["checked"] and check["metric"] == "fid" and check["w"] == 1.0
    got = {c["goal"]: (round(c["value"], 4), c["passed"]) for c in check["checks"]}
    assert got == {
        "FID 4-step student / teacher": (round(19 / 15, 4), True),          # 1.27
        "class accuracy: |teacher - student| (points)": (1.5, True),
        "network evaluations: student / teacher": (round(4 / 128, 4), True),
    }
    assert check["passed"]
    worse = [dict(r, class_accuracy=0.77) if r["stage"] == "student_00004" else r
             for r in RESULTS]
    assert not bench.goal_check(worse)["passed"]  # 3 points below the teacher
    above = [dict(r, class_accuracy=0.83) if r["stage"] == "student_00004" else r
             for r in RESULTS]
    assert not bench.goal_check(above)["passed"]  # 3 points above: not "within 2"
    without = [r for r in RESULTS if r["stage"] != "student_00004"]
    assert bench.goal_check(without) == {
        "checked": False, "why": "no scores for the teacher and the 4-step student at w=1"}


def test_goal_needs_fids_and_the_table_shows_every_w():
    results = [dict(r, fid=None) if r["stage"] == "teacher" else r for r in RESULTS]
    check = bench.goal_check(results)
    assert not check["checked"] and "stated in FID" in check["why"]
    text = bench.markdown({"results": RESULTS, "goal": bench.goal_check(RESULTS),
                           "classifier": {"test_accuracy": 0.8512, "num_test": 10000},
                           "backend": "tensorflow", "measured": "2026-11-29",
                           "command": "python benchmarks/fashion_mnist_guided.py"})
    assert "| teacher | 64 | 128 | 20.00 | 15.00 |" in text
    assert "| stage one | 64 | 64 | — | 16.00 |" in text
    assert "| 4 steps | 4 | 4 | 60.0 | 78.5 |" in text
    assert "85.12% on the 10,000 real test images" in text


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(bench.BenchmarkError, match="lacks"):
        bench.parse_args([f"--data_dir={tmp_path}", f"--workdir={tmp_path}/w"])
    for name in bench.DATA_FILES:
        (tmp_path / name).write_bytes(b"")
    ok = [f"--data_dir={tmp_path}", f"--workdir={tmp_path}/w"]
    assert bench.parse_args(ok).ws == (0.0, 0.5, 1.0, 2.0, 4.0)
    with pytest.raises(bench.BenchmarkError, match="at least 0"):
        bench.parse_args(ok + ["--ws=1,-2"])
    with pytest.raises(bench.BenchmarkError, match="at least one"):
        bench.parse_args(ok + ["--ws=,"])
    with pytest.raises(bench.BenchmarkError, match="comma-separated numbers"):
        bench.parse_args(ok + ["--ws=one"])
    with pytest.raises(bench.BenchmarkError, match="at least 1"):
        bench.parse_args(ok + ["--steps=4,0"])
    with pytest.raises(bench.BenchmarkError, match="does not exist"):
        bench.parse_args(ok + ["--gin_file=nope.gin"])
    assert bench.main(ok + ["--gin_file=fashion_mnist_cpu.gin", "--piece=table"]) == 2
    # --check_only: the same checks, nothing else (no workdir is made)
    assert bench.main(ok + ["--gin_file=fashion_mnist_cpu.gin", "--check_only"]) == 2
    assert bench.main(ok + ["--gin_file=fashion_mnist_cpu.gin", "--check_only",
                            "--piece=teacher"]) == 2  # the gin file is read all the same
    assert bench.main(ok + ["--check_only"]) == 0
    assert not (tmp_path / "w").exists()
    import gin

    gin.bind_parameter("dataset.name", "mnist_embedded")  # gin is left unlocked
    gin.clear_config()


def test_the_goal_cells_are_scored_first():
    models = [{"name": "teacher", "num_steps": 64}, {"name": "stage one", "num_steps": 64},
              {"name": "8 steps", "num_steps": 8}, {"name": "4 steps", "num_steps": 4}]
    cells = [(m, w) for m in models for w in (0.0, 1.0, 4.0)]
    cells.sort(key=lambda c: bench.score_order(*c))
    order = [(m["name"], w) for m, w in cells]
    assert order[:2] == [("teacher", 1.0), ("4 steps", 1.0)]
    assert order[2:6] == [("teacher", 0.0), ("teacher", 4.0), ("4 steps", 0.0),
                          ("4 steps", 4.0)]
    assert order[6:] == [("stage one", 0.0), ("stage one", 1.0), ("stage one", 4.0),
                         ("8 steps", 0.0), ("8 steps", 1.0), ("8 steps", 4.0)]


def test_the_gpu_wrapper_refuses_bad_flags_before_starting_anything(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    for name in bench.DATA_FILES:
        (data / name).write_bytes(b"")
    runs = tmp_path / "runs"
    env = dict(os.environ, GUIDED_GPU_RUNS=str(runs), GUIDED_GPU_DATA=str(data),
               PROGDIST_PYTHON=sys.executable, KERAS_PROGDIST_CACHE=str(tmp_path / "c"),
               GUIDED_GPU_WHEELS=str(tmp_path / "no_wheels"))
    script = os.path.join(ROOT, "benchmarks", "fashion_mnist_guided_gpu.sh")
    bad = subprocess.run(["bash", script, "start", "60", "--ws=-1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "--ws='-1': give finite values of at least 0" in bad.stderr
    assert not (runs / "train.pid").exists()  # nothing was started
    usage = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr

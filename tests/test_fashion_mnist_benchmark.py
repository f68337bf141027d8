"""The Fashion-MNIST benchmark's goal checks and argument handling (no training)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "fashion_mnist_bench", os.path.join(ROOT, "benchmarks", "fashion_mnist.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _r(kind, steps, fid, kid=0.01):
    return {"kind": kind, "num_steps": steps, "fid": fid, "kid": kid, "kid_std_err": 0.001}


def test_goals_compare_with_the_best_teacher_and_ddim_at_each_step_count():
    results = [_r("ddim", 1, 300.0), _r("ddim", 4, 60.0), _r("ddim", 8, 20.0),
               _r("teacher", 32, 9.0), _r("teacher", 64, 10.0),
               _r("distilled", 8, 10.0), _r("distilled", 4, 12.0),
               _r("distilled", 1, 40.0)]
    checks = bench.goals(results)
    assert checks["metric"] == "fid" and checks["teacher_steps"] == 32
    by_goal = {c["goal"]: (round(c["value"], 4), c["passed"]) for c in checks["checks"]}
    assert by_goal == {
        "distilled 4 steps / teacher": (round(12 / 9, 4), False),   # 1.33 > 1.3
        "distilled 1 step / teacher": (round(40 / 9, 4), False),    # 4.44 > 4
        "DDIM 1 steps / distilled 1 steps": (7.5, True),
        "DDIM 4 steps / distilled 4 steps": (5.0, True),
        "DDIM 8 steps / distilled 8 steps": (2.0, False),
    }


def test_goals_fall_back_to_kid_when_fid_is_unavailable():
    results = [_r("teacher", 8, None, kid=0.02), _r("distilled", 4, None, kid=0.025),
               _r("ddim", 4, None, kid=0.1)]
    checks = bench.goals(results)
    assert checks["metric"] == "kid"
    assert [c["passed"] for c in checks["checks"]] == [True, True]


def test_unknown_piece_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--piece=teacher,train"])
    args = bench.parse_args(["--gin_file=fashion_mnist_cpu.gin", "--piece=eval,table"])
    assert args.pieces == ("eval", "table")
    assert args.workdir.endswith(os.path.join("runs", "fashion_mnist_cpu"))

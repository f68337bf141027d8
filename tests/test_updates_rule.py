"""The pre-registered verdict rule of the update arms (`benchmarks/updates_table.py`),
on ratios whose verdict can be worked out by hand."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import updates_table  # noqa: E402


def _ratios(r800, r1600, r3200, noise=0.001, seed=0):
    # Paired replicates: a common draw per replicate plus a little of each arm's own.
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 0.02, 200)
    return {u: (r, r + common + rng.normal(0, noise, 200))
            for u, r in ((800, r800), (1600, r1600), (3200, r3200))}


def test_a_ratio_at_3200_under_1_25_supports():
    out = updates_table.verdict(_ratios(1.40, 1.30, 1.24))
    assert out["verdict"] == "supported" and "R(3200)" in out["why"]


def test_gains_that_keep_their_size_project_to_the_paper_by_50k():
    # Gains that keep their size (d1 = d2 = 0.03, q = 1): four more doublings reach
    # 1.38 - 4 * 0.03 = 1.26 > 1.20, and d2 is far above its error: undecided.
    assert updates_table.verdict(_ratios(1.44, 1.41, 1.38))["verdict"] == "undecided"
    # Growing gains (q = 2): 1.30 - 0.04 * (2 + 4 + 8 + 16) < 1.20.
    out = updates_table.verdict(_ratios(1.36, 1.34, 1.30))
    assert out["verdict"] == "supported"
    assert out["projection_51200"] == pytest.approx(1.30 - 0.04 * 30)


def test_a_gain_within_noise_refutes():
    out = updates_table.verdict(_ratios(1.45, 1.40, 1.399, noise=0.01))
    assert out["verdict"] == "refuted" and "d2" in out["why"]
    assert out["d2_se"] == pytest.approx(0.01 * np.sqrt(2), rel=0.2)


def test_shrinking_gains_with_a_limit_above_1_25_refute():
    # d1 = 0.10, d2 = 0.05 (q = 0.5): limit 1.35 - 0.05 = 1.30 > 1.25.
    out = updates_table.verdict(_ratios(1.50, 1.40, 1.35))
    assert out["limit"] == pytest.approx(1.30)
    assert out["verdict"] == "refuted" and "limit" in out["why"]


def test_missing_arms_leave_the_verdict_pending():
    ratios = _ratios(1.5, 1.4, 1.3)
    del ratios[3200]
    assert updates_table.verdict(ratios) == {"verdict": "pending",
                                             "why": "arms not finished: ['u3200']"}


def test_learning_rate_lever_reading():
    reps = np.random.default_rng(1).normal(0, 0.01, 100)
    arms = {"lr4_u800": (1.30, 1.30 + reps), "u3200": (1.31, 1.31 + reps),
            "lr4_u400": (1.45, 1.45 + reps), "u400": (1.45, 1.45 + reps * 1.01)}
    assert updates_table.lr_lever(arms) == {"cheaper lever": True, "not a lever": True}
    arms["lr4_u400"] = (1.35, 1.35 + reps)
    assert updates_table.lr_lever(arms)["not a lever"] is False
    assert updates_table.lr_lever({})["cheaper lever"] == "pending"


def test_summed_rate_of_a_constant_stage_is_twice_the_decayed_one():
    bindings = ["distill.updates_per_stage=800", "distill.learning_rate=0.001"]
    assert updates_table._summed_rate(bindings, 800) == pytest.approx(0.4)
    constant = bindings + ["distill.learning_rate_schedule='constant'"]
    assert updates_table._summed_rate(constant, 800) == pytest.approx(0.8)


def _arm(teacher_sha, ratio4, reps, teacher_fid=20.0):
    """An arm's results entry: its teacher scored, and a 4-step student at `ratio4`."""
    teacher = {"kind": "teacher", "num_steps": 64, "fid": teacher_fid,
               "samples_sha256": teacher_sha,
               "bootstrap": {"fid": list(teacher_fid * (1 + reps))}}
    student = {"kind": "distilled", "num_steps": 4, "fid": teacher_fid * ratio4,
               "bootstrap": {"fid": list(teacher_fid * ratio4 * (1 + 2 * reps))}}
    return {"teacher": "plain", "bindings": [], "stages": [],
            "metrics": {"results": [teacher, student]}}


def _write_run(tmp_path, name, arms):
    import json
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"arms": arms}))
    return str(folder / "results.json")


def test_arms_of_two_trainings_of_one_teacher_are_kept_apart_and_the_rule_pairs_one():
    import tempfile
    from pathlib import Path
    reps = np.random.default_rng(2).normal(0, 0.01, 50)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = _write_run(tmp, "first", {"u400": _arm("aa" * 32, 1.50, reps),
                                          "u800": _arm("aa" * 32, 1.42, reps)})
        unscored = {"teacher": "plain", "bindings": [], "stages": [], "metrics": None}
        second = _write_run(tmp, "second", {"u800": _arm("bb" * 32, 1.46, reps),
                                            "u1600": _arm("bb" * 32, 1.36, reps),
                                            "u3200": _arm("bb" * 32, 1.31, reps),
                                            "lr4_u800": unscored})
        table = updates_table.build([first, second])
    ratios = {k: v["ratio"] for k, v in table["four_step_ratio"].items()}
    # The same arm name on two trainings: both kept, each with its own teacher's ratio.
    assert ratios["u800@plain/aaaaaaaa"] == pytest.approx(1.42)
    assert ratios["u800@plain/bbbbbbbb"] == pytest.approx(1.46)
    # The rule reads the teacher that has all three arms: d1 = 1.46 - 1.36, d2 = 0.05.
    assert table["rule"]["teacher"] == "plain/bbbbbbbb"
    assert table["rule"]["d1"] == pytest.approx(0.10)
    assert table["rule"]["d2"] == pytest.approx(0.05)
    assert table["rule_by_teacher"]["plain/aaaaaaaa"]["verdict"] == "pending"
    # The retrain moved u800's ratio by 0.04.
    (spread,) = table["retrain_spread"]
    assert spread["arm"] == "u800" and spread["difference"] == pytest.approx(0.04)
    assert spread["teachers"] == ["plain/aaaaaaaa", "plain/bbbbbbbb"]
    # An arm not yet scored belongs to its run folder's teacher, named by the scored
    # arms' digest, or by the folder before any arm is scored.
    unscored_run = {"arms": {"lr4_u800": unscored}}
    assert updates_table.teacher_labels({"arms": {"u800": _arm("bb" * 32, 1.4, reps),
                                                  **unscored_run["arms"]}}, "second") \
        == {"plain": "plain/bbbbbbbb"}
    assert updates_table.teacher_labels(unscored_run, "second") == {"plain": "plain/second"}
    assert "| u1600 | plain/bbbbbbbb | 4 |" in updates_table.markdown(table)


def test_an_arm_scored_without_ddim_takes_the_share_from_a_sibling_of_its_teacher(tmp_path):
    # Real runs: T0's arms each scored DDIM; u800's DDIM results are dropped here, so its
    # share of DDIM's gap must come from a sibling arm of T0 and equal what u800 recorded.
    import json
    results = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(results, "fashion_mnist_cpu_updates_runs.json")) as f:
        t0 = json.load(f)
    u800 = t0["arms"]["u800"]
    recorded = {r["num_steps"]: r["vs_teacher"] for r in u800["metrics"]["results"]
                if r["kind"] == "distilled"}
    u800["metrics"]["results"] = [r for r in u800["metrics"]["results"]
                                  if r["kind"] != "ddim"]
    for r in u800["metrics"]["results"]:
        r.pop("vs_teacher", None)
    folder = tmp_path / "t0"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(t0))
    # T0b's arms (another training) scored no DDIM: T0's must not be lent to them.
    table = updates_table.build([str(folder / "results.json"),
                                 os.path.join(results, "fashion_mnist_cpu_updates_runs_t0b.json")])
    rows = {(r["teacher"], r["arm"], r["num_steps"]): r for r in table["rows"]}
    t0_label = "plain/df222d6b"
    for n in (32, 16, 8, 4):
        row = rows[t0_label, "u800", n]
        assert row["ddim_scored_in"] == "lr2_u400"
        assert row["ddim_gap_share"] == pytest.approx(recorded[n]["ddim_gap_share"], rel=1e-12)
        assert row["ddim_gap_share_se"] == pytest.approx(recorded[n]["ddim_gap_share_se"],
                                                         rel=1e-12)
    assert rows[t0_label, "u800", 4]["ddim_gap_share"] == pytest.approx(0.7949, abs=1e-4)
    assert rows[t0_label, "u400", 4]["ddim_scored_in"] is None  # its own DDIM
    t0b = [r for r in table["rows"] if r["teacher"] == "plain/9f55a4ba"]
    assert t0b and all(r["ddim_gap_share"] is None for r in t0b)
    assert "0.795 ± 0.008†" in updates_table.markdown(table)


def test_the_teacher_seed_spread_pairs_u400_with_t1_u400():
    reps = np.random.default_rng(3).normal(0, 0.01, 50)
    ratios = {("plain/aa", "u400"): (1.50, 1.50 + reps),
              ("plain/aa", "u800"): (1.42, 1.42 + reps),
              ("seed1/cc", "t1_u400"): (1.56, 1.56 + reps * 1.5)}
    teachers = {"plain/aa": {"fid": 16.8}, "seed1/cc": {"fid": 17.9}}
    (spread,) = updates_table.teacher_seed_spread(ratios, teachers)
    assert spread["teachers"] == ["plain/aa", "seed1/cc"]
    assert spread["difference"] == pytest.approx(0.06)
    assert spread["se"] == pytest.approx(0.5 * np.std(reps, ddof=1))
    assert spread["teacher_fids"] == [16.8, 17.9]
    assert updates_table.teacher_seed_spread({k: v for k, v in ratios.items()
                                              if k[1] != "t1_u400"}, teachers) == []

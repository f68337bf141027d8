"""benchmarks/distill_arms.py: what its results.json holds (no training)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "distill_arms", os.path.join(ROOT, "benchmarks", "distill_arms.py"))
arms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arms)


def test_results_keep_the_arms_of_earlier_calls(tmp_path):
    """Arms run in separate calls (a, then b2) all stay in RUNDIR/results.json."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    rundir = tmp_path / "runs"
    (rundir / "arm_a").mkdir(parents=True)
    (rundir / "arm_a" / "stages.json").write_text(json.dumps(
        [{"stage": "student_00004", "num_steps": 4, "updates": 400, "loss": 2e-4,
          "seconds": 1.0}]))
    (rundir / "logs").mkdir()
    (rundir / "logs" / "a_distill.log").write_text(
        "[student_00004] step 100/400: loss 0.001\n[student_00004] step 400/400: loss 0.0002\n")
    args = arms.parse_args([str(rundir), "--arms=b2", f"--data_dir={data}"])
    path = arms.write_results(args)
    with open(path) as f:
        results = json.load(f)
    assert sorted(results["arms"]) == ["a", "b2"]
    assert results["arms"]["a"]["stages"][0]["updates"] == 400
    assert results["arms"]["a"]["loss_curves"] == {"student_00004": [[100, 0.001],
                                                                     [400, 0.0002]]}
    assert results["arms"]["b2"]["stages"] == []
    assert list(results["teachers"]) == ["plain"]


def test_arms_of_one_teacher_share_its_scores_and_no_others(tmp_path):
    """The teacher's and DDIM's saved scores move to a sibling arm of the same teacher
    (their keys match there, so they are not scored again); students' never do, nor
    anything to an arm of another teacher, nor half-written files."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    rundir = tmp_path / "runs"
    runs = rundir / "arm_u400" / "eval" / "runs"
    runs.mkdir(parents=True)
    for name in ("teacher_00064.json", "teacher_00064.npz", "ddim_00004.json",
                 "distilled_00004.json", "ddim_00008.json.tmp-12-ab"):
        (runs / name).write_text(name)
    args = arms.parse_args([str(rundir), "--arms=u800,t1_u400", f"--data_dir={data}"])
    copied = arms.share_teacher_scores(args, "u800")
    target = rundir / "arm_u800" / "eval" / "runs"
    assert sorted(os.listdir(target)) == ["ddim_00004.json", "teacher_00064.json",
                                          "teacher_00064.npz"]
    assert len(copied) == 3 and (target / "ddim_00004.json").read_text() == "ddim_00004.json"
    assert arms.share_teacher_scores(args, "u800") == []  # nothing twice
    assert arms.share_teacher_scores(args, "t1_u400") == []  # another teacher

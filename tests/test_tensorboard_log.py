"""TensorBoard's evaluation scalars: each point once, however often evaluation re-runs."""

import os

import pytest

from keras_progdist import tensorboard_log

pytestmark = pytest.mark.skipif(not tensorboard_log.available(),
                                reason="needs TensorFlow and TensorBoard")

STEPS = (8, 4, 2, 1)


def _results(offset=0.0):
    results = [{"kind": "teacher", "num_steps": 64, "fid": 10.0 + offset, "kid": 0.01}]
    for n in STEPS:
        results.append({"kind": "distilled", "num_steps": n, "fid": 20.0 + n + offset,
                        "kid": 0.02, "fid_se": 0.5, "kid_se": None,
                        "vs_teacher": {"metric": "fid", "delta": 10.0 + n, "ratio": 2.0,
                                       "ddim_gap_share": 0.25}})
    return results


def _tensorboard_events(logdir):
    """What TensorBoard loads from `logdir`: `{tag: [(step, value), ...]}`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(logdir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                  for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def _events_files(logdir):
    return sorted(n for n in os.listdir(logdir) if "tfevents" in n)


def test_a_rerun_logs_each_point_once(tmp_path):
    logdir = str(tmp_path / "eval")
    assert tensorboard_log.write_eval_scores(logdir, _results())
    first = _events_files(logdir)
    again = tensorboard_log.write_eval_scores(logdir, _results())
    events = _tensorboard_events(logdir)
    assert sorted(events["distilled/fid"]) == [(n, 20.0 + n) for n in sorted(STEPS)]
    for tag in ("distilled/kid", "distilled/fid_se", "distilled/fid_delta",
                "distilled/fid_ratio", "distilled/fid_ddim_gap_share"):
        assert len(events[tag]) == len(STEPS), tag
    assert "distilled/kid_se" not in events  # None is not logged
    assert events["teacher/fid"] == [(64, 10.0)]
    assert sum(map(len, events.values())) == \
        len(tensorboard_log.eval_points(_results())) == 1 + 1 + 6 * len(STEPS)
    assert again is False and _events_files(logdir) == first  # the same points: kept


def test_new_scores_replace_the_old_ones(tmp_path):
    logdir = str(tmp_path / "eval")
    tensorboard_log.write_eval_scores(logdir, _results())
    assert tensorboard_log.write_eval_scores(logdir, _results(offset=1.0))
    assert len(_events_files(logdir)) == 1
    events = _tensorboard_events(logdir)
    assert sorted(events["distilled/fid"]) == [(n, 21.0 + n) for n in sorted(STEPS)]
    assert events["teacher/fid"] == [(64, 11.0)]


def test_scores_appended_by_earlier_versions_are_cleared_other_logs_kept(tmp_path):
    import tensorflow as tf

    logdir = str(tmp_path / "eval")
    # What the appending writer left after two evaluations, and someone else's log.
    for _ in range(2):
        writer = tf.summary.create_file_writer(logdir)
        with writer.as_default():
            for tag, step, value in tensorboard_log.eval_points(_results()):
                tf.summary.scalar(tag, value, step=step)
        writer.close()
    other = str(tmp_path / "eval" / "mine")
    writer = tf.summary.create_file_writer(other)
    with writer.as_default():
        tf.summary.scalar("loss", 1.0, step=0)
    writer.close()
    os.replace(os.path.join(other, _events_files(other)[0]),
               os.path.join(logdir, "events.out.tfevents.1.host.mine"))
    assert len(_tensorboard_events(logdir)["distilled/fid"]) == 2 * len(STEPS)

    assert tensorboard_log.write_eval_scores(logdir, _results())
    events = _tensorboard_events(logdir)
    assert sorted(events["distilled/fid"]) == [(n, 20.0 + n) for n in sorted(STEPS)]
    assert events["loss"] == [(0, 1.0)]
    assert len(_events_files(logdir)) == 2


def test_an_unreadable_scores_file_is_replaced(tmp_path):
    logdir = tmp_path / "eval"
    logdir.mkdir()
    broken = logdir / f"{tensorboard_log.EVAL_EVENTS_PREFIX}1.0{tensorboard_log.EVAL_EVENTS_SUFFIX}"
    broken.write_bytes(b"\x00\x01 not an events file")
    assert tensorboard_log.write_eval_scores(str(logdir), _results())
    assert not broken.exists()
    assert len(_events_files(str(logdir))) == 1
    assert len(_tensorboard_events(str(logdir))["distilled/fid"]) == len(STEPS)


def test_a_rerun_reads_the_scores_back_without_a_deprecation_warning(tmp_path):
    """A re-run evaluation reads the logged scores back; doing so must not print
    TensorFlow's deprecation warning (one a user can do nothing about). In a fresh
    process, since TensorFlow prints each deprecation once per process."""
    import subprocess
    import sys

    code = ("import sys; from keras_progdist import tensorboard_log as t\n"
            "from tests.test_tensorboard_log import _results\n"
            "assert t.write_eval_scores(sys.argv[1], _results())\n"
            "assert not t.write_eval_scores(sys.argv[1], _results())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecated" not in result.stderr, result.stderr[-3000:]

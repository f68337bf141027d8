"""Serving throughput: the smallest distilled stage vs the teacher, as exported.

Loads the exported SavedModels (`keras_progdist.export` layout) of the teacher and of
the stage with the fewest steps and times their `serving_default` signature (seed ->
uint8 images, the DDIM loop inside the graph) on the same batch of seeds, in the same
process, alternating the two models so machine load hits both alike. Each model gets one
untimed warm-up call first. Prints JSON and writes `benchmarks/results/serving_cpu.json`
with images/s of each, their ratio and the ratio of model evaluations (step counts).

    python benchmarks/serving_bench.py --export_dir saved_models --name tiny
    python benchmarks/serving_bench.py --workdir runs/tiny   # exports those two first
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_progdist import export  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "serving_cpu.json")


def exported_stages(root: str, name: str) -> dict:
    """`{num_steps: saved_model_dir}` (latest version) of every stage under `root`."""
    stages = {}
    prefix, suffix = f"{name}-", "steps"
    for entry in os.listdir(root):
        if entry.startswith(prefix) and entry.endswith(suffix) and \
                os.path.isdir(os.path.join(root, entry)):
            versions = [int(v) for v in os.listdir(os.path.join(root, entry)) if v.isdigit()]
            if versions:
                stages[int(entry[len(prefix):-len(suffix)])] = os.path.join(
                    root, entry, str(max(versions)))
    return stages


def time_calls(fn, seeds, min_seconds: float, min_calls: int):
    """Seconds of each call of `fn(seed=seeds)` until both minimums are met."""
    times = []
    while len(times) < min_calls or sum(times) < min_seconds:
        start = time.perf_counter()
        fn(seed=seeds)["images"].numpy()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", default=None, help="root holding <name>/")
    parser.add_argument("--name", default=None, help="export name (default: workdir's)")
    parser.add_argument("--workdir", default=None, help="export this run first")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--min_seconds", type=float, default=5.0,
                        help="timed seconds per model per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds (teacher, student, teacher, ...)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()

    if args.workdir:
        name = args.name or os.path.basename(os.path.normpath(args.workdir))
        export_dir = args.export_dir or tempfile.mkdtemp(prefix="serving_bench_")
        root = os.path.join(export_dir, name)
        if not os.path.isdir(root):
            # Only the two stages timed here: the teacher and the fewest-step student.
            workdir_stages = export.load_workdir_stages(args.workdir)
            export.export_stages([workdir_stages[0], workdir_stages[-1]], export_dir, name)
    elif args.export_dir and args.name:
        name, root = args.name, os.path.join(args.export_dir, args.name)
    else:
        parser.error("pass --workdir, or --export_dir and --name")
    stages = exported_stages(root, name)
    if len(stages) < 2:
        raise SystemExit(f"{root} holds {len(stages)} stage(s); need the teacher and one "
                         "distilled stage.")
    teacher_steps, student_steps = max(stages), min(stages)

    start = time.perf_counter()
    models = {n: tf.saved_model.load(stages[n]) for n in (teacher_steps, student_steps)}
    load_s = time.perf_counter() - start
    seeds = tf.constant(np.arange(args.batch_size, dtype=np.int32))
    warmup_s, times = {}, {teacher_steps: [], student_steps: []}
    for n, model in models.items():
        start = time.perf_counter()
        model.signatures["serving_default"](seed=seeds)["images"].numpy()
        warmup_s[n] = time.perf_counter() - start
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for n, model in models.items():
            # The teacher is slow: at least one call per round, else enough for min_seconds.
            times[n] += time_calls(model.signatures["serving_default"], seeds,
                                   args.min_seconds, 1)
    load_after = os.getloadavg()[0]

    def summary(n):
        t = np.asarray(times[n])
        return {"num_steps": n, "saved_model": stages[n],
                "images_per_s": round(args.batch_size * len(t) / t.sum(), 3),
                "best_images_per_s": round(args.batch_size / t.min(), 3),
                "median_batch_s": round(float(np.median(t)), 4),
                "calls_timed": len(t), "warmup_call_s": round(warmup_s[n], 3)}

    teacher, student = summary(teacher_steps), summary(student_steps)
    result = {
        "benchmark": "serving_bench",
        "what": "serving_default of the exported SavedModels (seed int32 [B] -> uint8 "
                "images; DDIM loop inside the graph), tf.saved_model.load, eager calls",
        "export_root": root,
        "batch_size": args.batch_size,
        "teacher": teacher,
        "student": student,
        "speedup_images_per_s": round(student["images_per_s"] / teacher["images_per_s"], 2),
        "model_evaluations_ratio": teacher_steps / student_steps,
        "load_saved_models_s": round(load_s, 2),
        "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "device": f"CPU: {os.cpu_count()} cores visible "
                  f"({platform.processor() or platform.machine()})",
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

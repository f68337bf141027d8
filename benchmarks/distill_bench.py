"""Distillation benchmark on gin/tiny.gin (CPU).

1. The curve that shows distillation working: for every stage N, the mean squared
   distance to the ORIGINAL teacher's samples at its full step count (same noise) of
   (a) the distilled student at N steps and (b) the undistilled teacher's DDIM at N steps.
2. The distillation step time as a ratio of the teacher step time: same network, same
   batch, measured side by side in this process (goal <= 1.6; the distillation step runs
   the teacher twice in inference mode plus one student forward/backward).

Usage: python benchmarks/distill_bench.py [--workdir runs/tiny] [--samples 256]
Trains the tiny pipeline in the workdir first if it has not finished. Prints JSON and
writes benchmarks/results/distill_<backend>.json.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gin  # noqa: E402
from keras_progdist import training  # noqa: E402
from keras_progdist.diffusion import DiffusionModel  # noqa: E402
from keras_progdist.distillation import Distiller  # noqa: E402
from keras_progdist.optimizers import make_optimizer  # noqa: E402
from keras_progdist.settings import as_record  # noqa: E402


def stage_curve(experiment, num_samples):
    models = experiment.wd.stage_models()
    _, teacher_steps, teacher = models[0]
    noise = keras.random.normal((num_samples,) + experiment.image_shape, seed=99)
    reference = teacher.sample(noise=noise, num_steps=teacher_steps)
    rows = []
    for _stage, n, model in models[1:]:
        distilled = model.sample(noise=noise, num_steps=n)
        undistilled = teacher.sample(noise=noise, num_steps=n)
        rows.append({
            "num_steps": n,
            "distilled_mse_to_teacher": float(np.mean((distilled - reference) ** 2)),
            "undistilled_ddim_mse_to_teacher": float(np.mean((undistilled - reference) ** 2)),
        })
        print(json.dumps({"what": "stage_curve", **rows[-1]}), flush=True)
    return teacher_steps, rows


def step_times(experiment, steps=40, repeats=3):
    """Seconds per update of the teacher step and the distillation step, interleaved."""
    network = experiment.new_network()
    teacher = DiffusionModel(network, schedule=experiment.schedule,
                             **as_record(experiment.diffusion))
    teacher.compile(optimizer=make_optimizer(1e-4), jit_compile=True, steps_per_execution=10)
    distiller = Distiller(network, schedule=experiment.schedule,
                          parameterization=experiment.diffusion.parameterization,
                          num_steps=64)
    distiller.compile(optimizer=make_optimizer(1e-4, decay_to_zero_steps=10_000),
                      jit_compile=True, steps_per_execution=10)
    times = {"teacher": [], "distill": []}
    for model in (teacher, distiller):
        model.fit(experiment.dataset, steps_per_epoch=10, verbose=0)  # compile
    for _ in range(repeats):
        for name, model in (("teacher", teacher), ("distill", distiller)):
            start = time.perf_counter()
            model.fit(experiment.dataset, steps_per_epoch=steps, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    best = {k: min(v) for k, v in times.items()}
    return {"teacher_step_s": best["teacher"], "distill_step_s": best["distill"],
            "ratio": best["distill"] / best["teacher"], "all_runs": times,
            "batch": experiment.batch_size, "params": experiment.param_count}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "tiny"))
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")], [])
    experiment = training.Experiment(args.workdir)
    if not os.path.exists(os.path.join(args.workdir, "student_00001", "final.json")):
        training.run(args.workdir, "train_teacher", verbose=2)
        training.run(args.workdir, "distill", verbose=2)
    teacher_steps, rows = stage_curve(experiment, args.samples)
    timing = step_times(experiment)
    print(json.dumps({"what": "step_time_ratio", **{k: v for k, v in timing.items()
                                                    if k != "all_runs"}}), flush=True)
    result = {
        "benchmark": "distill_bench", "config": "gin/tiny.gin",
        "backend": keras.backend.backend(), "device": "cpu (2 cores)",
        "num_samples": args.samples, "teacher_steps": teacher_steps,
        "stages": experiment.finished_stages(), "curve": rows, "step_times": timing,
        "command": "python benchmarks/distill_bench.py --workdir " + args.workdir,
    }
    out = os.path.join(ROOT, "benchmarks", "results",
                       f"distill_{keras.backend.backend()}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

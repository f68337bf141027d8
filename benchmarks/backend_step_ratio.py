"""JAX against TensorFlow on one gin config, side by side: teacher and distillation ms/step.

    python benchmarks/backend_step_ratio.py [--gin_file=fashion_mnist_cpu.gin]
        [--data_dir=DIR] [--teacher_updates=150] [--distill_updates=100] [--rundir=DIR]

Runs the same `bin/run.py` pieces on both backends at the same time (one process per
backend, so each gets about one of two cores and load affects both alike): a teacher of
`--teacher_updates`, then one distillation stage of `--distill_updates`. The ms/step of
each piece is read from its checkpoint lines (`[stage] step k/N: loss L, M ms/step`),
the first chunk left out (it pays for tracing and compiling). Prints JSON and writes
`benchmarks/results/<config>_backend.json`; the ratio `tensorflow / jax` > 1 means JAX
is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow")
STEP_LINE = re.compile(r"^\[(teacher|student_\d{5})\] step (\d+)/\d+: .* (\d+) ms/step")


def steady_ms_per_step(log: str, stage_prefix: str) -> float | None:
    """The mean ms/step of the checkpoint lines after the first, for one stage kind."""
    values = [int(m.group(3)) for m in map(STEP_LINE.match, log.splitlines())
              if m and m.group(1).startswith(stage_prefix)]
    return sum(values[1:]) / len(values[1:]) if len(values) > 1 else None


def run_pieces(args, mode: str, bindings: list) -> dict:
    """Starts `mode` on both backends at once; returns {backend: (log, seconds)}."""
    processes = {}
    for backend in BACKENDS:
        workdir = os.path.join(args.rundir, backend)
        command = [sys.executable, os.path.join(ROOT, "bin", "run.py"), f"--mode={mode}",
                   f"--workdir={workdir}", f"--gin_file={args.gin_file}", "--verbose=2",
                   f"--gin_param=dataset.data_dir={args.data_dir!r}"]
        command += [f"--gin_param={b}" for b in bindings]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        processes[backend] = (subprocess.Popen(command, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, env=env,
                                               cwd=ROOT), time.time())
    out = {}
    for backend, (process, began) in processes.items():
        log, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{backend} {mode} failed ({process.returncode}):\n{log[-3000:]}")
        out[backend] = (log, time.time() - began)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", default="fashion_mnist_cpu.gin")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"))
    parser.add_argument("--teacher_updates", type=int, default=150)
    parser.add_argument("--distill_updates", type=int, default=100)
    parser.add_argument("--rundir", default=os.path.join(ROOT, "runs", "backend_step_ratio"))
    args = parser.parse_args()
    shutil.rmtree(args.rundir, ignore_errors=True)
    common = ["teacher.checkpoint_every=50", "distill.checkpoint_every=50",
              "sample_grid.count=0"]
    teacher = run_pieces(args, "train_teacher",
                         common + [f"teacher.train_steps={args.teacher_updates}"])
    distill = run_pieces(args, "distill",
                         common + [f"teacher.train_steps={args.teacher_updates}",
                                   "distill.min_steps=32", "distill.updates_overrides={}",
                                   f"distill.updates_per_stage={args.distill_updates}"])
    result = {"benchmark": "backend_step_ratio", "gin_file": args.gin_file,
              "teacher_updates": args.teacher_updates,
              "distill_updates": args.distill_updates, "load_avg_1m": os.getloadavg()[0],
              "cpu_count": os.cpu_count()}
    for backend in BACKENDS:
        result[backend] = {
            "teacher_ms_per_step": steady_ms_per_step(teacher[backend][0], "teacher"),
            "teacher_wall_s": round(teacher[backend][1], 1),
            "distill_ms_per_step": steady_ms_per_step(distill[backend][0], "student"),
            "distill_wall_s": round(distill[backend][1], 1)}
    for piece in ("teacher", "distill"):
        jax_ms = result["jax"][f"{piece}_ms_per_step"]
        tf_ms = result["tensorflow"][f"{piece}_ms_per_step"]
        result[f"{piece}_tensorflow_over_jax"] = round(tf_ms / jax_ms, 3) \
            if jax_ms and tf_ms else None
    print(json.dumps(result, indent=1))
    name = os.path.splitext(os.path.basename(args.gin_file))[0]
    path = os.path.join(ROOT, "benchmarks", "results", f"{name}_backend.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

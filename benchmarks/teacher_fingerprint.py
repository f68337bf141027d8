"""Does this machine train a config's teacher to the same bits as another one did?

    python benchmarks/teacher_fingerprint.py [--gin_file=fashion_mnist_cpu.gin]
        [--data_dir=DIR] [--updates=100] [--rundir=DIR] [--settings=a,b]

A multi-session experiment on CPUs loses its machine, and the teacher's weights with it
(weights are never committed): the next session retrains the teacher from the same gin
file and seeds. Arms distilled from the two trainings pair only if the trainings are
bit-equal. XLA compiles the train step for the host's instruction set, so two CPUs
of one vendor may round differently. This trains `--updates` updates of the config's
teacher on the TensorFlow backend four ways: as configured (XLA for this CPU), with
XLA held to AVX2 (`--xla_cpu_max_isa=AVX2`, what most x86 servers have), without XLA
(`teacher.jit_compile=False`), and on one thread (one intra-op thread, Eigen's
threading in XLA off: a sum split over fewer threads adds in another order); for each
it records the sha256 of the final weights (arrays in name order, their bytes) and the
last loss, beside what identifies the CPU. The caller's thread variables are unset for
the other settings, so "as configured" means the defaults.
Two machines agree on a setting when its `weights_sha256` agrees. Prints JSON and adds
this machine's entry to `benchmarks/results/<config>_teacher_fingerprint.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (XLA flags added, gin bindings added, environment added)
SETTINGS = {"xla_host_isa": ("", [], {}), "xla_avx2": ("--xla_cpu_max_isa=AVX2", [], {}),
            "no_xla": ("", ["teacher.jit_compile=False"], {}),
            "one_thread": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                           [], {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})}
# Unset for every setting but the one that sets them: the caller's thread settings must
# not leak into "as configured".
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def cpu_identity() -> dict:
    """Model name and a digest of the feature flags (what selects kernels)."""
    model, flags = platform.processor() or "", ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = found.group(1).strip() if found else ""
    return {"model": model, "cores": os.cpu_count(),
            "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "avx512": "avx512f" in flags.split()}


def weights_sha256(workdir: str) -> str:
    import numpy as np

    sys.path.insert(0, ROOT)
    from keras_progdist import checkpoint

    digest = hashlib.sha256()
    with np.load(checkpoint.weights_path(os.path.join(workdir, "teacher"), "final")) as f:
        for name in sorted(f.files):
            digest.update(name.encode() + b"\0" + np.ascontiguousarray(f[name]).tobytes())
    return digest.hexdigest()


def train(args, name: str, xla_flags: str, bindings: list, variables: dict) -> dict:
    workdir = os.path.join(args.rundir, name)
    shutil.rmtree(workdir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(variables, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=xla_flags)
    command = [sys.executable, os.path.join(ROOT, "bin", "run.py"), "--mode=train_teacher",
               f"--workdir={workdir}", f"--gin_file={args.gin_file}", "--verbose=2",
               f"--gin_param=dataset.data_dir={args.data_dir!r}",
               f"--gin_param=teacher.train_steps={args.updates}",
               f"--gin_param=teacher.checkpoint_every={args.updates}",
               "--gin_param=sample_grid.count=0", *[f"--gin_param={b}" for b in bindings]]
    began = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    losses = re.findall(r"^\[teacher\] step \d+/\d+: loss (\S+),", done.stdout, re.M)
    return {"weights_sha256": weights_sha256(workdir), "last_loss": losses[-1].rstrip(","),
            "seconds": round(time.time() - began, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", default="fashion_mnist_cpu.gin")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"))
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--rundir", default=os.path.join(ROOT, "runs", "fingerprint"))
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"a comma-separated subset of {list(SETTINGS)}")
    args = parser.parse_args(argv)
    if args.updates < 1:
        parser.error("--updates must be at least 1")
    args.settings = [name for name in args.settings.split(",") if name]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.settings:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if not os.path.isfile(os.path.join(args.data_dir, "train-images-idx3-ubyte.gz")):
        parser.error(f"--data_dir={args.data_dir}: no train-images-idx3-ubyte.gz there "
                     "(bash benchmarks/fetch_fashion_mnist.sh)")
    entry = {"cpu": cpu_identity(), "updates": args.updates,
             "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
             "settings": {name: train(args, name, *SETTINGS[name]) for name in args.settings}}
    config = os.path.splitext(os.path.basename(args.gin_file))[0]
    path = os.path.join(ROOT, "benchmarks", "results", f"{config}_teacher_fingerprint.json")
    previous = []
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)["machines"]
    with open(path, "w") as f:
        json.dump({"about": __doc__.split("\n\n")[1].replace("\n", " "),
                   "machines": previous + [entry]}, f, indent=1)
    print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distillation arms on one shared teacher: which student settings close the gap to it.

    python benchmarks/distill_arms.py RUNDIR [--arms=a,b2,b4,c,d0,d1]
        [--gin_file=fashion_mnist_cpu.gin] [--data_dir=DIR] [--time_budget_s=S]
        [--parallel=N] [--wait_for_fid_s=S] [--gin_param=... (every bin/run.py call)]

Every arm is a complete work directory `RUNDIR/arm_<name>` whose teacher is a copy of
one trained once in `RUNDIR/teacher_<kind>`, so the arms differ only in their students
(same data, same teacher weights, same evaluation noise). The arms (relative to the gin
file's `distill` settings; `updates` is per stage, the 2- and 1-step stages get twice):

    a    the recorded settings (400 / 800 updates)
    b2   2x the updates (800 / 1600)
    b4   4x the updates (1600 / 3200)
    c    b4 with batch 256 instead of 64: 16x the examples of `a` per stage
    d0   a teacher trained with dropout 0.1; students without dropout (the paper), at
         a's updates (the arm has its own teacher to train, so it gets a's cheaper ladder)
    d1   the same teacher; students keep its dropout 0.1, at a's updates
    u400 ... u3200, lr2_u400, lr4_u400, lr2_u800, lr4_u800, const_u800, t1_u400: the
         pre-registered update / learning-rate arms, ladder 64 -> 4 (const_u800 keeps
         its rate constant over each stage)
         (results/fashion_mnist_cpu_updates_plan.md; t1_u400 distils a second teacher,
         trained with seed 1)

Pieces, each a `bin/run.py` call on the JAX backend (nothing here imports TensorFlow):
the teachers (in parallel), then per arm `--mode=distill`, `--mode=sample` and, once the
FID network's weight cache is there (`$KERAS_PROGDIST_CACHE`, waited for up to
`--wait_for_fid_s`), `--mode=eval` (arms in parallel, at most `--parallel`). The time
budget is shared: distillation stops at a checkpoint when it is spent, and the
finished stages are still sampled and scored. Re-running the same command goes on where
it stopped; a finished run re-run only rewrites `RUNDIR/results.json`.

`RUNDIR/results.json` then holds, per arm: the settings, every finished stage (updates,
loss, seconds, the loss at each checkpoint), the FID/KID of every model when scored, and
the measurements that say where the students lose quality, from the evaluation samples
(all models share the evaluation's noise, so sample i of every model starts from the
same z_1):

    rmse_to_teacher_2n        RMSE (pixels in [-1, 1]) between the N-step student's
                              samples and its own teacher's (the 2N-step model it
                              distilled): the error one stage adds
    rmse_to_original_teacher  ... and the original teacher's: the error accumulated
                              over the ladder
    rmse_ddim_to_original_teacher  undistilled DDIM at N steps against the original
                              teacher: what distillation has to beat

`python benchmarks/fashion_mnist_arms_table.py RUNDIR` turns results.json into the tables
and the plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_EXIT = 143
TMP_MARK = ".tmp-"  # fileio's temporary-file mark: a half-written file is not copied

TEACHERS = {
    "plain": [],
    "dropout": ["UNet.dropout=0.1"],
    "seed1": ["diffusion.seed=1", "dataset.seed=1"],
}


def _updates(per_stage: int) -> list:
    return [f"distill.updates_per_stage={per_stage}",
            f"distill.updates_overrides={{2: {2 * per_stage}, 1: {2 * per_stage}}}"]


# name -> (teacher, gin bindings for the students, one-line description)
ARMS = {
    "a": ("plain", _updates(400), "recorded settings: 400 updates a stage (800 at 2 and 1)"),
    "b2": ("plain", _updates(800), "2x updates: 800 (1600)"),
    "b4": ("plain", _updates(1600), "4x updates: 1600 (3200)"),
    "c": ("plain", _updates(1600) + ["dataset.batch_size=256"],
          "4x updates at batch 256: 16x the examples of a"),
    "d0": ("dropout", _updates(400) + ["distill.student_dropout=0.0"],
           "teacher with dropout 0.1, students without (the paper), 400 (800)"),
    "d1": ("dropout", _updates(400) + ["distill.student_dropout=0.1"],
           "teacher with dropout 0.1, students with 0.1, 400 (800)"),
}


def _ladder_to_4(per_stage: int, learning_rate: float = 5e-4) -> list:
    # DDIM at every student's step count, for the share of DDIM's gap each removes (the
    # teacher's DDIM scores are shared by the arms of one teacher: `share_teacher_scores`).
    return ["distill.min_steps=4", "distill.updates_overrides={}",
            f"distill.updates_per_stage={per_stage}", f"distill.learning_rate={learning_rate}",
            "evaluate.ddim_steps=(4, 8, 16, 32)"]


# The pre-registered update / learning-rate arms (results/fashion_mnist_cpu_updates_plan.md):
# ladder 64 -> 4, every stage the same updates, the rate decayed linearly to 0.
UPDATE_ARMS = {"u400": (400, 5e-4), "u800": (800, 5e-4), "u1600": (1600, 5e-4),
               "u3200": (3200, 5e-4), "lr2_u400": (400, 1e-3), "lr4_u400": (400, 2e-3),
               "lr2_u800": (800, 1e-3), "lr4_u800": (800, 2e-3)}
ARMS.update({name: ("plain", _ladder_to_4(updates, rate),
                    f"{updates} updates a stage at {rate:g}, linear to 0, 64 -> 4")
             for name, (updates, rate) in UPDATE_ARMS.items()})
# The official code's shape (no decay, no warm-up) at lr4_u800's and u3200's summed rate.
ARMS["const_u800"] = ("plain", _ladder_to_4(800, 1e-3)
                      + ["distill.learning_rate_schedule='constant'"],
                      "800 updates a stage at 0.001, constant, 64 -> 4")
ARMS["t1_u400"] = ("seed1", _ladder_to_4(400),
                   "second teacher (seed 1): 400 updates at 5e-4, linear to 0, 64 -> 4")
# What an arm's work directory takes from its teacher's.
TEACHER_FILES = ("config.json", "operative_config.gin", "teacher")
RESUME_LINE = re.compile(r"^\[stage\] (\S+): resuming at step (\d+)/")
STEP_LINE = re.compile(r"^\[(student_\d{5}|teacher)\] step (\d+)/(\d+): loss ([0-9.eE+-]+|nan)")


class ArmsError(Exception):
    """Bad arguments or missing data; exit code 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="--gin_param flags go to every bin/run.py call.")
    parser.add_argument("rundir")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--gin_file", default="fashion_mnist_cpu.gin")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"))
    parser.add_argument("--time_budget_s", type=float, default=None)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--wait_for_fid_s", type=float, default=0.0,
                        help="how long to wait for the FID weight cache before scoring")
    parser.add_argument("--reserve_s", type=float, default=170.0,
                        help="of the budget, kept for sampling and scoring")
    parser.add_argument("--deadline_file", default=None,
                        help="a file holding an absolute deadline (epoch seconds), read "
                             "while running: training stops at it less --reserve_s")
    parser.add_argument("--pack", default=None, metavar="OUTDIR",
                        help="only write results.json and pack results, logs and samples "
                             "into OUTDIR (at most 7 files)")
    parser.add_argument("--backend", default="jax", choices=("jax", "tensorflow"),
                        help="the pieces' Keras backend (on a CPU, tensorflow is faster "
                             "for this net)")
    parser.add_argument("--ddim_arm", default=None,
                        help="only this arm scores undistilled DDIM (the same in every "
                             "arm of one teacher); default: every arm")
    parser.add_argument("--gin_param", action="append", default=[])
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        parser.error("--time_budget_s must be positive")
    images = os.path.join(args.data_dir, "train-images-idx3-ubyte.gz")
    if not os.path.isfile(images):
        raise ArmsError(f"--data_dir={args.data_dir}: no train-images-idx3-ubyte.gz there "
                        "(bash benchmarks/fetch_fashion_mnist.sh)")
    args.rundir = os.path.abspath(args.rundir)
    args.data_dir = os.path.abspath(args.data_dir)
    return args


# -- processes -------------------------------------------------------------------------
def _launcher() -> list:
    return shlex.split(os.environ.get("PROGDIST_PYTHON", "")) or [sys.executable]


def _env(rundir: str, eval_piece: bool = False, backend: str = "jax") -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    # The driver pins itself to the CPU (see the end of this file); the pieces are not.
    env.pop("JAX_PLATFORMS", None)
    if os.environ.get("PROGDIST_PIECES_JAX_PLATFORMS"):
        env["JAX_PLATFORMS"] = os.environ["PROGDIST_PIECES_JAX_PLATFORMS"]
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Several pieces share one GPU: none may take most of its memory up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Equal programs (a sampler of the same step count in every arm) compile once.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(rundir, "jax_cache"))
    if eval_piece:
        # The FID network in full float32, as the reference implementation: no TF32.
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    return env


def _command(args, workdir: str, mode: str, bindings: list, budget: float | None) -> list:
    command = _launcher() + [os.path.join(ROOT, "bin", "run.py"), f"--mode={mode}",
                             f"--workdir={workdir}", f"--gin_file={args.gin_file}",
                             "--verbose=2",
                             f"--gin_param=dataset.data_dir={args.data_dir!r}"]
    command += [f"--gin_param={b}" for b in list(bindings) + args.gin_param]
    if budget is not None:
        command.append(f"--time_budget_s={max(budget, 1.0):.1f}")
    return command


class Pieces:
    """Runs bin/run.py calls, at most `parallel` at once, each logging to its own file."""

    def __init__(self, rundir: str, parallel: int, backend: str = "jax"):
        self.logdir = os.path.join(rundir, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.rundir, self.parallel, self.backend = rundir, parallel, backend

    def run(self, jobs: list, seconds_left=None) -> dict:
        """Runs `jobs`, [(name, command, eval_piece)]; returns {name: exit code}.

        `seconds_left`, a function: once it returns <= 0, the running pieces get SIGTERM
        (they save a checkpoint and exit 143) and pending ones are not started.
        """
        pending, running, codes, stopping = list(jobs), {}, {}, False
        while pending or running:
            if seconds_left is not None and not stopping:
                remaining = seconds_left()
                if remaining is not None and remaining <= 0:
                    stopping = True
                    _say("time is up: SIGTERM to the running pieces")
                    for name, *_ in pending:
                        codes[name] = BUDGET_EXIT
                    pending = []
                    for process, _, _ in running.values():
                        process.terminate()
            while pending and len(running) < self.parallel:
                name, command, eval_piece = pending.pop(0)
                # Stays open while the piece runs (its stdout); closed when it ends.
                log = open(os.path.join(self.logdir, f"{name}.log"), "a")  # noqa: SIM115
                log.write(f"$ {' '.join(shlex.quote(c) for c in command)}\n")
                log.flush()
                began = time.time()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env=_env(self.rundir, eval_piece, self.backend),
                                           cwd=ROOT)
                running[name] = (process, log, began)
                _say(f"{name}: started")
            time.sleep(0.5)
            for name, (process, log, began) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    codes[name] = process.returncode
                    _say(f"{name}: exit code {process.returncode}, "
                         f"{time.time() - began:.1f} s")
                    del running[name]
        return codes


def _say(text: str) -> None:
    print(f"[arms {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- work directories ---------------------------------------------------------------------
def teacher_dir(args, kind: str) -> str:
    return os.path.join(args.rundir, f"teacher_{kind}")


def arm_dir(args, arm: str) -> str:
    return os.path.join(args.rundir, f"arm_{arm}")


def seed_arm(args, arm: str) -> None:
    """Gives an arm's work directory a copy of its teacher (once)."""
    source, target = teacher_dir(args, ARMS[arm][0]), arm_dir(args, arm)
    if os.path.exists(os.path.join(target, "teacher", "final.json")):
        return
    os.makedirs(target, exist_ok=True)
    for name in TEACHER_FILES:
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ckpt*"))
        elif os.path.exists(src):
            shutil.copy2(src, dst)
    # final.json is the completion marker; copied last so a half copy is never final.
    marker = os.path.join(target, "teacher", "final.json")
    if os.path.exists(marker):
        os.remove(marker)
    shutil.copy2(os.path.join(source, "teacher", "final.json"), marker)


def share_teacher_scores(args, arm: str) -> list:
    """Copies the teacher's and its DDIM's saved scores from a sibling arm (same teacher
    weights, same evaluation settings: the score keys match, so they are reused instead
    of sampled and scored again). Returns the files copied."""
    import glob

    target = os.path.join(arm_dir(args, arm), "eval", "runs")
    copied = []
    for other in ARMS:
        if other == arm or ARMS[other][0] != ARMS[arm][0]:
            continue
        source = os.path.join(arm_dir(args, other), "eval", "runs")
        for path in sorted(glob.glob(os.path.join(source, "teacher_*"))
                           + glob.glob(os.path.join(source, "ddim_*"))):
            dst = os.path.join(target, os.path.basename(path))
            if not os.path.exists(dst) and TMP_MARK not in os.path.basename(path):
                os.makedirs(target, exist_ok=True)
                shutil.copy2(path, dst)
                copied.append(dst)
    return copied


def fid_cache_ready() -> bool:
    from keras_progdist.evaluation import weights
    return os.path.exists(weights.cache_path())


# -- measurements ---------------------------------------------------------------------
def loss_curves(log_path: str) -> dict:
    """{stage: [[step, loss], ...]} from the `[stage] step k/N: loss L` lines."""
    curves = {}
    if not os.path.exists(log_path):
        return curves
    with open(log_path, errors="replace") as f:
        for line in f:
            match = STEP_LINE.match(line.strip())
            if match:
                curves.setdefault(match.group(1), {})[int(match.group(2))] = \
                    float(match.group(4))
    return {stage: sorted(points.items()) for stage, points in curves.items()}


def resumed_steps(log_path: str) -> dict:
    """{stage: the step it last resumed from}: a stage's `seconds` cover only the
    process that finished it, i.e. its updates from that step on."""
    out = {}
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for line in f:
                match = RESUME_LINE.match(line.strip())
                if match:
                    out[match.group(1)] = int(match.group(2))
    return out


def sample_distances(workdir: str) -> dict:
    """RMSEs between models' evaluation samples (see the module docstring)."""
    import numpy as np

    from keras_progdist.evaluation import sample_files

    sample_dir = os.path.join(workdir, "eval", "samples")
    if not os.path.isdir(sample_dir):
        return {}
    images = {}
    for manifest in sample_files.find_manifests(sample_dir):
        try:
            sample_files.check_complete(manifest, sample_dir, verify_sha256=False)
        except sample_files.SampleFilesError:
            continue
        pixels = sample_files.load_samples(manifest, sample_dir).astype(np.float64)
        images[manifest["model"]] = pixels / 127.5 - 1.0

    def rmse(a, b):
        return float(np.sqrt(np.mean((images[a] - images[b]) ** 2)))

    teachers = [m for m in images if m.startswith("teacher_")]
    out = {}
    if not teachers:
        return out
    teacher = teachers[0]
    top = int(teacher.split("_")[1])
    for model in sorted(images):
        kind, steps = model.split("_")
        n = int(steps)
        if kind == "distilled":
            parent = teacher if 2 * n == top else f"distilled_{2 * n:05d}"
            entry = {"rmse_to_original_teacher": rmse(model, teacher)}
            if parent in images:
                entry["rmse_to_teacher_2n"] = rmse(model, parent)
            out[model] = entry
        elif kind == "ddim":
            out[model] = {"rmse_ddim_to_original_teacher": rmse(model, teacher)}
    return out


def collect(args) -> dict:
    """results.json: settings, stages, scores and measurements of every arm in RUNDIR
    (those of this call and any run there before, so that running the arms in several
    calls loses none)."""
    results = {"gin_file": args.gin_file, "gin_param": args.gin_param, "arms": {},
               "teachers": {}}
    arms = [a for a in ARMS if a in args.arms or os.path.isdir(arm_dir(args, a))]
    for kind in sorted({ARMS[a][0] for a in arms}):
        directory = teacher_dir(args, kind)
        stages = _read_json(os.path.join(directory, "stages.json")) or []
        log = os.path.join(args.rundir, "logs", f"teacher_{kind}.log")
        results["teachers"][kind] = {
            "bindings": TEACHERS[kind], "stages": stages,
            "resumed_from": resumed_steps(log).get("teacher", 0),
            "loss_curve": loss_curves(os.path.join(args.rundir, "logs",
                                                   f"teacher_{kind}.log")).get("teacher")}
    for arm in arms:
        directory = arm_dir(args, arm)
        curves = loss_curves(os.path.join(args.rundir, "logs", f"{arm}_distill.log"))
        metrics = _read_json(os.path.join(directory, "eval", "metrics.json"))
        results["arms"][arm] = {
            "teacher": ARMS[arm][0], "bindings": ARMS[arm][1], "about": ARMS[arm][2],
            "stages": _read_json(os.path.join(directory, "stages.json")) or [],
            "loss_curves": curves, "metrics": metrics,
            "distances": sample_distances(directory)}
    return results


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_results(args, extra=None) -> str:
    results = collect(args)
    results.update(extra or {})
    from keras_progdist import fileio

    path = os.path.join(args.rundir, "results.json")
    fileio.atomic_write_json(path, results)
    return path


def pack(args, outdir: str, max_file_mb: float = 15.0, max_packs: int = 5) -> list:
    """What comes back from a machine: results.json, the logs (tar.gz) and every
    model's samples in `samples-NNN.npz` (arrays named `<arm>/<model>`, uint8 NHWC)."""
    import tarfile

    import numpy as np

    from keras_progdist.evaluation import sample_files

    os.makedirs(outdir, exist_ok=True)
    written = [write_results(args)]
    shutil.copy2(written[0], os.path.join(outdir, "results.json"))
    with tarfile.open(os.path.join(outdir, "logs.tar.gz"), "w:gz") as tar:
        tar.add(os.path.join(args.rundir, "logs"), arcname="logs")
    names, arrays, size = [], {}, 0

    def flush():
        nonlocal arrays, size
        if arrays and len(names) < max_packs:
            name = f"samples-{len(names):03d}.npz"
            np.savez(os.path.join(outdir, name), **arrays)
            names.append(name)
        arrays, size = {}, 0

    for arm in args.arms:
        sample_dir = os.path.join(arm_dir(args, arm), "eval", "samples")
        if not os.path.isdir(sample_dir):
            continue
        for manifest in sample_files.find_manifests(sample_dir):
            try:
                sample_files.check_complete(manifest, sample_dir, verify_sha256=False)
            except sample_files.SampleFilesError:
                continue
            images = sample_files.load_samples(manifest, sample_dir)
            if size + images.nbytes > max_file_mb * 2 ** 20:
                flush()
            arrays[f"{arm}/{manifest['model']}"] = images
            size += images.nbytes
    flush()
    return ["results.json", "logs.tar.gz"] + names


# -- the run ------------------------------------------------------------------------------
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArmsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pack:
        for name in pack(args, args.pack):
            _say(f"packed {name}")
        return 0
    start = time.time()
    deadline = None if args.time_budget_s is None else start + args.time_budget_s

    def left(reserve: float = 0.0):
        """Seconds to the deadline less `reserve`: the earlier of --time_budget_s and
        the time in --deadline_file (epoch seconds; it may be written while running)."""
        ends = [] if deadline is None else [deadline]
        if args.deadline_file and os.path.exists(args.deadline_file):
            with open(args.deadline_file) as f:
                ends.append(float(f.read().strip()))
        return min(ends) - time.time() - reserve if ends else None

    os.makedirs(args.rundir, exist_ok=True)
    pieces = Pieces(args.rundir, args.parallel, args.backend)
    kinds = sorted({ARMS[a][0] for a in args.arms})
    def training_left():
        return left(args.reserve_s)

    codes = pieces.run([(f"teacher_{k}", _command(args, teacher_dir(args, k), "train_teacher",
                                                  TEACHERS[k], training_left()), False)
                        for k in kinds], training_left)
    ready = [a for a in args.arms if codes[f"teacher_{ARMS[a][0]}"] == 0]
    for arm in ready:
        seed_arm(args, arm)

    def arm_bindings(arm):
        bindings = TEACHERS[ARMS[arm][0]] + ARMS[arm][1]
        if args.ddim_arm not in (None, arm):
            bindings = bindings + ["evaluate.ddim_steps=()"]
        return bindings

    distilled = pieces.run([(f"{a}_distill", _command(args, arm_dir(args, a), "distill",
                                                      arm_bindings(a), training_left()), False)
                            for a in ready], training_left)
    # Whatever finished is sampled, also after a spent budget (no budget: sampling is
    # short and a budgeted sampler would stop between models).
    pieces.run([(f"{a}_sample", _command(args, arm_dir(args, a), "sample", arm_bindings(a),
                                         None), False) for a in ready])
    waited = time.time()
    while not fid_cache_ready() and time.time() - waited < args.wait_for_fid_s:
        time.sleep(2.0)
    if fid_cache_ready():
        for arm in ready:
            if share_teacher_scores(args, arm):
                _say(f"{arm}: the teacher's and DDIM's scores taken from a sibling arm")
        pieces.run([(f"{a}_eval", _command(args, arm_dir(args, a), "eval", arm_bindings(a),
                                           None), True) for a in ready])
    else:
        _say("no FID weight cache: samples only (score them with --mode=eval elsewhere)")
    path = write_results(args, {"wall_s": round(time.time() - start, 1)})
    _say(f"results: {path} ({time.time() - start:.1f} s)")
    with open(path) as f:
        arms = json.load(f)["arms"]
    # An arm is finished when its distillation piece ran its whole ladder (exit 0); one
    # stopped by the budget (143) or never started is not, whatever stages it has.
    unfinished = [a for a in args.arms
                  if a not in ready or distilled.get(f"{a}_distill") != 0
                  or len(arms.get(a, {}).get("stages", [])) < 2]
    return BUDGET_EXIT if unfinished else 0


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # The driver itself computes nothing: keep it off the GPU the pieces share.
    os.environ.setdefault("PROGDIST_PIECES_JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    sys.exit(main())

"""The Fashion-MNIST run on one GPU slot: teacher, every stage, samples, one small folder.

    bash benchmarks/fashion_mnist_gpu.sh OUTDIR [--time_budget_s=S] [--workdir=DIR]
        [--data_dir=DIR] [--gin_file=fashion_mnist_gpu.gin] [bin/run.py flags, e.g.
        --gin_param="teacher.train_steps=2000"]

Runs, with `KERAS_BACKEND=jax` and without TensorFlow (nothing here imports it), the
pieces `bin/run.py --mode=train_teacher`, `--mode=distill`, `--mode=sample` in order in
one work directory (default `<OUTDIR>_work`, beside OUTDIR, never inside it), then packs
what should come back into OUTDIR, which never holds more than `--max_files` (8) files
of at most `--max_file_mb` (16) MiB:

    run.log                 everything the pieces printed, with one `[gpu-benchmark]`
                            line per piece and its wall time (appended by every call;
                            cut in the middle if it would pass the size limit)
    stages.json             the workdir's: steps, updates, final loss, seconds per stage
    samples-000.npz, ...    every model's evaluation samples, packed (see below)

Packing: `--mode=sample` writes one set of files per model (teacher, undistilled DDIM at
each `evaluate.ddim_steps`, every student), more models than the 6 files left beside the
log and stages.json. So the samples of all models are concatenated in evaluation order
and cut into packs of at most `--max_file_mb`: each pack has `arr_0`, uint8 NHWC (the
ADM / guided-diffusion convention), and `index`, a JSON string listing its segments
(`model`, `kind`, `num_steps`, `stage`, rows `start`..`start+count` of `arr_0` are that
model's samples `first`..`first+count`, plus the weights' sha256 and the sampling
protocol). `python benchmarks/fashion_mnist_gpu.py --unpack OUTDIR DEST` writes one
`<model>.npz` (`arr_0`) per model. Before any training, the configuration is checked to
fit: models x evaluate.num_samples x bytes per image must fit the packs.

Budget and resuming: `--time_budget_s` is for the whole call; each piece gets what is
left (less `--piece_overhead_s` for its start-up) as its own `--time_budget_s`. Exit
code 143: the budget ran out (checkpoints saved); the same command goes on. Exit code 0:
everything is done; the same command again only checks OUTDIR against the record in
the workdir and exits 0 at once. A piece is not re-run once it finished with the same
command line and gin file (its output is in the workdir). Other exit codes: 2 for bad
arguments or missing data, else the failing piece's.

The pieces run `python bin/run.py` with this interpreter; `PROGDIST_PYTHON` (a command
prefix, e.g. "python3 tests/.../wrapper.py") replaces `python` for them and, in
`fashion_mnist_gpu.sh`, for this script. JAX's persistent compilation cache is turned
on in `<workdir>/jax_cache` (unless `JAX_COMPILATION_CACHE_DIR` is set), so equal
programs (a sampler of the same step count, a resumed piece) compile once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECES = (("teacher", "train_teacher"), ("distill", "distill"), ("sample", "sample"))
LOG_NAME = "run.log"
STAGES_NAME = "stages.json"
PACK_PREFIX = "samples-"
PACK_FORMAT = "keras_progdist.samples_pack/1"
STATE_NAME = "gpu_benchmark_state.json"
# Zip entries, .npy headers and the index JSON of a pack (a few KiB): the room kept
# free in every pack so the size limit holds.
PACK_OVERHEAD_BYTES = 64 * 1024
BUDGET_EXIT = 143
# Flags this driver sets for every piece itself.
OWN_FLAGS = ("--mode", "--workdir", "--time_budget_s", "--verbose")


class BenchmarkError(Exception):
    """A problem the user can fix (arguments, data, output folder); exit code 2."""


# -- arguments -------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Unknown flags are passed to every bin/run.py call.")
    parser.add_argument("outdir")
    parser.add_argument("--time_budget_s", type=float, default=None)
    parser.add_argument("--workdir", default=None, help="default: <OUTDIR>_work")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"),
                        help="the Fashion-MNIST idx files (train-*-ubyte.gz)")
    parser.add_argument("--gin_file", default="fashion_mnist_gpu.gin")
    parser.add_argument("--max_files", type=int, default=8)
    parser.add_argument("--max_file_mb", type=float, default=16.0)
    parser.add_argument("--piece_overhead_s", type=float, default=10.0,
                        help="start-up time kept back from each piece's budget")
    parser.add_argument("--no_jax_cache", action="store_true")
    args, passthrough = parser.parse_known_args(argv)
    for flag in passthrough:
        if flag.split("=")[0] in OWN_FLAGS:
            parser.error(f"{flag}: this script sets {flag.split('=')[0]} itself")
    if args.max_files < 3:
        parser.error("--max_files must be at least 3 (run.log, stages.json, one pack)")
    if not args.max_file_mb > 0:
        parser.error("--max_file_mb must be positive")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        parser.error("--time_budget_s must be positive")
    args.outdir = os.path.abspath(args.outdir)
    args.workdir = os.path.abspath(args.workdir or args.outdir.rstrip(os.sep) + "_work")
    if os.path.commonpath([args.outdir, args.workdir]) == args.outdir:
        parser.error(f"--workdir {args.workdir} must not lie inside OUTDIR")
    args.data_dir = os.path.abspath(args.data_dir)
    args.gin_path = resolve_gin_file(args.gin_file)
    args.passthrough = passthrough
    return args


def resolve_gin_file(name: str) -> str:
    """As bin/run.py: a path as given, else `gin/<name>` (adding `.gin`)."""
    candidates = [name, os.path.join(ROOT, "gin", name)]
    if not name.endswith(".gin"):
        candidates += [c + ".gin" for c in candidates]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise BenchmarkError(f"--gin_file={name}: no such file here or in gin/")


def check_data(data_dir: str) -> None:
    needed = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    missing = [n for n in needed if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise BenchmarkError(
            f"Fashion-MNIST data missing: {data_dir} lacks {', '.join(missing)}. Copy the "
            "idx files there (bash benchmarks/fetch_fashion_mnist.sh on a machine with "
            "network, or apt-get install dataset-fashion-mnist and pass --data_dir="
            "/usr/share/datasets/fashion-mnist).")


def run_py_flags(args) -> list:
    """The flags every piece gets (besides --mode, --workdir, --time_budget_s)."""
    return [f"--gin_file={args.gin_path}",
            f"--gin_param=dataset.data_dir={args.data_dir!r}"] + list(args.passthrough)


# -- the output folder -------------------------------------------------------------------
def own_file(name: str) -> bool:
    return name in (LOG_NAME, STAGES_NAME) or (name.startswith(PACK_PREFIX)
                                               and name.endswith(".npz"))


def check_outdir(outdir: str) -> None:
    """OUTDIR may only hold this benchmark's files (they all count against the limit)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise BenchmarkError(f"OUTDIR {outdir} is not a folder")
    if os.path.isdir(outdir):
        foreign = sorted(n for n in os.listdir(outdir) if not own_file(n))
        if foreign:
            raise BenchmarkError(f"OUTDIR {outdir} holds files that are not this "
                                 f"benchmark's: {foreign}; use an empty folder")


def check_limits(outdir: str, max_files: int, max_file_mb: float) -> list:
    """`[(name, bytes)]` of OUTDIR; raises when the folder breaks the limits."""
    entries = sorted((n, os.path.getsize(os.path.join(outdir, n)))
                     for n in os.listdir(outdir))
    limit = int(max_file_mb * 2 ** 20)
    too_big = [(n, s) for n, s in entries if s > limit]
    if len(entries) > max_files or too_big:
        raise BenchmarkError(f"OUTDIR {outdir} breaks its limits ({max_files} files of "
                             f"at most {limit} bytes): {entries}")
    return entries


def trim_log(path: str, max_bytes: int) -> None:
    """Keeps `path` within `max_bytes`: its head and tail, with a note in between."""
    if not os.path.exists(path) or os.path.getsize(path) <= max_bytes:
        return
    size = os.path.getsize(path)
    note_room = 200
    head = max(0, min(max_bytes // 4, max_bytes - note_room))
    tail = max(0, max_bytes - head - note_room)
    with open(path, "rb") as f:
        first = f.read(head)
        f.seek(size - tail)
        last = f.read(tail)
    note = (f"\n[gpu-benchmark] ... {size - head - tail} bytes of this log cut to keep it "
            f"within {max_bytes} bytes ...\n").encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(first + note[:max_bytes - head - tail] + last)
    os.replace(tmp, path)


class Log:
    """Writes to stdout and appends to OUTDIR/run.log."""

    def __init__(self, path: str):
        self.path = path
        # The driver's log: open for the whole run, closed by `close()`.
        self.file = open(path, "a", buffering=1)  # noqa: SIM115

    def line(self, text: str) -> None:
        self.write(f"[gpu-benchmark] {time.strftime('%H:%M:%S')} {text}\n")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)

    def close(self) -> None:
        self.file.close()


# -- state: what finished, with which command --------------------------------------------
# This driver never imports keras_progdist (its __init__ imports Keras, and JAX would
# then claim the GPU before the pieces it launches start), so the two small helpers
# below repeat fileio.sha256_file and bin/run.py's gin-file lookup on purpose.
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_key(args) -> str:
    """What fixes the result: the gin file's text and the flags of every piece."""
    text = json.dumps({"gin": sha256_file(args.gin_path), "flags": run_py_flags(args),
                       "max_files": args.max_files, "max_file_mb": args.max_file_mb})
    return hashlib.sha256(text.encode()).hexdigest()


def read_state(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, STATE_NAME)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(workdir: str, state: dict) -> None:
    path = os.path.join(workdir, STATE_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def finished_earlier(args, state: dict, key: str) -> bool:
    """Every piece done with this config and OUTDIR exactly as that run left it."""
    outputs = state.get("outputs")
    if state.get("done") != key or not isinstance(outputs, dict) or \
            not os.path.isdir(args.outdir):
        return False
    names = sorted(n for n in os.listdir(args.outdir) if n != LOG_NAME)
    if names != sorted(outputs):
        return False
    return all(sha256_file(os.path.join(args.outdir, n)) == outputs[n] for n in names)


# -- plan: does the configuration fit the output folder? ---------------------------------
def plan(args) -> dict:
    """Reads the gin config as bin/run.py will, and checks the packs can hold it.

    Runs JAX on the CPU in this process (the GPU is left to the pieces).

    Returns:
        `models` (names in evaluation order), `num_samples`, `bytes_per_sample`,
        `packs` (files needed), `per_pack` (samples per pack).
    """
    import gin
    from keras_progdist import data, training

    gin.clear_config()
    bindings = [b for b in args.passthrough if b.startswith("--gin_param=")]
    gin.parse_config_files_and_bindings(
        [args.gin_path] + [resolve_gin_file(f.split("=", 1)[1]) for f in args.passthrough
                           if f.startswith("--gin_file=")],
        [f"dataset.data_dir={args.data_dir!r}"] + [b.split("=", 1)[1] for b in bindings])
    cfg, dist = training.evaluate(), training.distill()
    teacher_steps = dist.teacher_steps
    ddim = [s for s in cfg.ddim_steps if s < teacher_steps]
    extra = [s for s in sorted(set(cfg.teacher_steps))
             if s < teacher_steps and s not in cfg.ddim_steps]
    models = ([f"ddim_{s:05d}" for s in ddim] + [f"teacher_{s:05d}" for s in extra]
              + [f"teacher_{teacher_steps:05d}"]
              + [f"distilled_{n:05d}" for n in dist.ladder])
    name = gin.query_parameter("dataset.name")
    if name != "fashion_mnist":
        raise BenchmarkError(f"dataset.name is {name!r}: this benchmark is for fashion_mnist")
    side = gin.query_parameter("dataset.image_size")
    channels = data.DATASETS[name].channels
    labelled = bool(_query(gin, "UNet.num_classes"))
    per_sample = side * side * channels
    per_pack = pack_capacity(per_sample, args.max_file_mb)
    total = len(models) * cfg.num_samples
    packs = math.ceil(total / per_pack)
    room = args.max_files - 2
    if labelled:
        raise BenchmarkError("class-conditional models: the packs hold images only")
    if packs > room:
        raise BenchmarkError(
            f"{len(models)} models x evaluate.num_samples={cfg.num_samples} images of "
            f"{per_sample} bytes need {packs} packs of at most {args.max_file_mb} MiB, but "
            f"OUTDIR has room for {room} beside run.log and stages.json: at most "
            f"{room * per_pack // len(models)} samples per model.")
    gin.clear_config()
    return {"models": models, "num_samples": cfg.num_samples,
            "bytes_per_sample": per_sample, "packs": packs, "per_pack": per_pack}


def _query(gin, name):
    try:
        return gin.query_parameter(name)
    except ValueError:
        return None


def pack_capacity(bytes_per_sample: int, max_file_mb: float) -> int:
    count = (int(max_file_mb * 2 ** 20) - PACK_OVERHEAD_BYTES) // bytes_per_sample
    if count < 1:
        raise BenchmarkError(f"--max_file_mb={max_file_mb} holds no sample of "
                             f"{bytes_per_sample} bytes")
    return int(count)


# -- packing -------------------------------------------------------------------------------
def pack_samples(sample_dir: str, outdir: str, models: list, max_files: int,
                 max_file_mb: float) -> list:
    """Packs the complete samples of `models` (in order) into OUTDIR/samples-NNN.npz.

    Returns:
        The pack file names.
    """
    import numpy as np

    from keras_progdist.evaluation import sample_files

    manifests = []
    for name in models:
        manifest = sample_files.read_manifest(sample_files.manifest_path(sample_dir, name))
        sample_files.check_complete(manifest, sample_dir)
        manifests.append(manifest)
    shape = tuple(manifests[0]["protocol"]["image_shape"])
    per_pack = pack_capacity(int(np.prod(shape)), max_file_mb)
    total = sum(m["protocol"]["num_samples"] for m in manifests)
    num_packs = math.ceil(total / per_pack)
    if num_packs > max_files - 2:
        raise BenchmarkError(f"{total} samples need {num_packs} packs; OUTDIR has room "
                             f"for {max_files - 2}")
    names = [f"{PACK_PREFIX}{i:03d}.npz" for i in range(num_packs)]
    rows, segments, index = [], [], 0

    def flush():
        nonlocal rows, segments, index
        doc = {"format": PACK_FORMAT, "file": index, "num_files": num_packs,
               "segments": segments}
        arrays = {"arr_0": np.concatenate(rows), "index": np.array(json.dumps(doc))}
        path = os.path.join(outdir, names[index])
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        if os.path.getsize(path) > max_file_mb * 2 ** 20:
            raise AssertionError(f"{path} is above {max_file_mb} MiB")
        rows, segments, index = [], [], index + 1

    filled = 0
    for manifest in manifests:
        images = sample_files.load_samples(manifest, sample_dir)
        if images.dtype != np.uint8 or images.shape[1:] != shape:
            raise BenchmarkError(f"{manifest['model']}: samples are {images.dtype} "
                                 f"{images.shape}, expected uint8 (N,) + {shape}")
        first = 0
        while first < len(images):
            count = min(per_pack - filled, len(images) - first)
            segments.append({"model": manifest["model"], "kind": manifest.get("kind"),
                             "num_steps": manifest.get("num_steps"),
                             "stage": manifest.get("stage"), "start": filled,
                             "count": count, "first": first,
                             "num_samples": len(images),
                             "weights_sha256": manifest["weights_sha256"],
                             "protocol": manifest["protocol"]})
            rows.append(images[first:first + count])
            filled += count
            first += count
            if filled == per_pack:
                flush()
                filled = 0
    if rows:
        flush()
    for stale in os.listdir(outdir):
        if stale.startswith(PACK_PREFIX) and stale not in names:
            os.remove(os.path.join(outdir, stale))
    return names


def read_packs(outdir: str) -> dict:
    """`{model: uint8 NHWC array}` from OUTDIR's packs (checks every model is whole)."""
    import numpy as np

    parts = {}
    for name in sorted(os.listdir(outdir)):
        if not (name.startswith(PACK_PREFIX) and name.endswith(".npz")):
            continue
        with np.load(os.path.join(outdir, name), allow_pickle=False) as pack:
            arr, doc = pack["arr_0"], json.loads(str(pack["index"]))
            for seg in doc["segments"]:
                parts.setdefault(seg["model"], []).append(
                    (seg["first"], seg["num_samples"],
                     arr[seg["start"]:seg["start"] + seg["count"]]))
    out = {}
    for model, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        position = 0
        for first, _, rows in pieces:
            if first != position:
                raise BenchmarkError(f"{model}: samples {position}..{first} missing")
            position += len(rows)
        if position != pieces[0][1]:
            raise BenchmarkError(f"{model}: {position} of {pieces[0][1]} samples")
        out[model] = np.concatenate([p[2] for p in pieces])
    return out


def unpack(outdir: str, dest: str) -> list:
    """Writes `<dest>/<model>.npz` (`arr_0`, uint8 NHWC) for every packed model."""
    import numpy as np

    os.makedirs(dest, exist_ok=True)
    written = []
    for model, images in read_packs(outdir).items():
        path = os.path.join(dest, f"{model}.npz")
        np.savez(path, arr_0=images)
        written.append(path)
    return written


# -- the run -------------------------------------------------------------------------------
def child_env(args) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.no_jax_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "jax_cache"))
    # The driver pins itself to the CPU (see main); the pieces get the GPU.
    if "PROGDIST_DRIVER_JAX_PLATFORMS" in env:
        value = env.pop("PROGDIST_DRIVER_JAX_PLATFORMS")
        if value:
            env["JAX_PLATFORMS"] = value
        else:
            env.pop("JAX_PLATFORMS", None)
    return env


def launcher() -> list:
    return shlex.split(os.environ.get("PROGDIST_PYTHON", "")) or [sys.executable]


def run_piece(args, log: Log, mode: str, budget: float | None) -> int:
    command = launcher() + [os.path.join(ROOT, "bin", "run.py"), f"--mode={mode}",
                            f"--workdir={args.workdir}", "--verbose=2"] + run_py_flags(args)
    if budget is not None:
        command.append(f"--time_budget_s={budget:.1f}")
    log.line(f"run: {' '.join(shlex.quote(c) for c in command)}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=child_env(args), cwd=ROOT, text=True, bufsize=1,
                               errors="replace")
    for line in process.stdout:
        log.write(line)
    return process.wait()


def copy_stages(args) -> None:
    source = os.path.join(args.workdir, "stages.json")
    if os.path.exists(source):
        with open(source, "rb") as f:
            content = f.read()
        tmp = os.path.join(args.outdir, STAGES_NAME + ".tmp")
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, os.path.join(args.outdir, STAGES_NAME))


def benchmark(args) -> int:
    start = time.time()
    deadline = None if args.time_budget_s is None else start + args.time_budget_s
    check_outdir(args.outdir)
    key = config_key(args)
    state = read_state(args.workdir)
    if finished_earlier(args, state, key):
        print(f"[gpu-benchmark] already complete: {args.outdir} (workdir {args.workdir})")
        return 0
    check_data(args.data_dir)
    os.makedirs(args.outdir, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    log = Log(os.path.join(args.outdir, LOG_NAME))
    limit = int(args.max_file_mb * 2 ** 20)
    try:
        log.line(f"call: {' '.join(shlex.quote(a) for a in sys.argv)}")
        if state.get("key") != key:
            state = {"key": key, "pieces": {}}
        if "plan" not in state:
            # Imports Keras (a few seconds): once per configuration, kept in the state.
            began = time.time()
            state["plan"] = plan(args)
            write_state(args.workdir, state)
            log.line(f"plan checked in {time.time() - began:.1f} s")
        layout = state["plan"]
        log.line(f"plan: {len(layout['models'])} models x {layout['num_samples']} samples "
                 f"-> {layout['packs']} pack(s) of <= {layout['per_pack']} samples")
        for piece, mode in PIECES:
            if state["pieces"].get(piece) == "done":
                log.line(f"{piece}: done earlier, skipped")
                continue
            budget = None
            if deadline is not None:
                budget = deadline - time.time() - args.piece_overhead_s
                if budget <= 0:
                    log.line(f"{piece}: time budget spent before it; exit {BUDGET_EXIT}, "
                             "run the same command again to go on")
                    return BUDGET_EXIT
            began = time.time()
            rc = run_piece(args, log, mode, budget)
            copy_stages(args)
            log.line(f"{piece}: exit code {rc}, {time.time() - began:.1f} s wall")
            if rc == BUDGET_EXIT:
                log.line(f"time budget spent in {piece}; exit {BUDGET_EXIT}, run the same "
                         "command again to go on")
                return BUDGET_EXIT
            if rc != 0:
                log.line(f"{piece} failed (exit code {rc}); see above")
                return rc
            state["pieces"][piece] = "done"
            write_state(args.workdir, state)
        began = time.time()
        names = pack_samples(os.path.join(args.workdir, "eval", "samples"), args.outdir,
                             layout["models"], args.max_files, args.max_file_mb)
        copy_stages(args)
        log.line(f"pack: {len(names)} file(s) in {time.time() - began:.1f} s; total "
                 f"{time.time() - start:.1f} s this call")
        state["done"] = key
        state["outputs"] = {n: sha256_file(os.path.join(args.outdir, n))
                            for n in sorted(os.listdir(args.outdir)) if n != LOG_NAME}
        for name, size in check_limits(args.outdir, args.max_files, args.max_file_mb):
            log.line(f"out: {name} {size} bytes")
        write_state(args.workdir, state)
        return 0
    finally:
        log.close()
        trim_log(log.path, limit)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--unpack"]:
        if len(argv) != 3:
            print("usage: fashion_mnist_gpu.py --unpack OUTDIR DEST", file=sys.stderr)
            return 2
        for path in unpack(argv[1], argv[2]):
            print(path)
        return 0
    try:
        args = parse_args(argv)
        return benchmark(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _pin_driver_to_cpu() -> None:
    # The driver imports Keras (the plan, the packing) but computes nothing: it must not
    # take the GPU's memory from the pieces it starts. Their JAX_PLATFORMS is restored.
    os.environ.setdefault("PROGDIST_DRIVER_JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, ROOT)


if __name__ == "__main__":
    _pin_driver_to_cpu()
    sys.exit(main())

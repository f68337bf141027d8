"""How long after SIGTERM a training run exits, for each shipped gin config.

SIGTERM is acted on at the end of the running `steps_per_execution` chunk, then the
checkpoint is written and the process exits 143. The worst case is therefore one whole
chunk plus one checkpoint write. Two measurements:

- `direct` (configs small enough for this machine): `bin/run.py --mode=train_teacher`
  runs until its first chunk has compiled and run, gets SIGTERM at a random moment of
  the next chunks, and the time to its exit is measured, several times. The worst chunk
  is also read from the run's own per-checkpoint lines.
- `estimate` (the paper-sized configs, whose batch does not fit a CPU step in any
  reasonable time): one compiled train step of the config's network is timed at a
  small batch, scaled linearly to the config's batch and multiplied by
  `steps_per_execution`; the checkpoint write of that model is timed for real.

    python benchmarks/sigterm_latency.py                     # every config in gin/
    python benchmarks/sigterm_latency.py --configs tiny,cifar_v --probe_batch 2
    python benchmarks/sigterm_latency.py --configs lsun_church --probe_batch 1 --no-jit_compile

Prints JSON and writes benchmarks/results/sigterm_latency_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DIRECT = ("tiny", "fashion_mnist_cpu")


def _gin_files():
    return sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "gin"))
                  if f.endswith(".gin"))


def direct(config: str, kills: int, data_dir: str | None) -> dict:
    """SIGTERM at random moments after the first chunk; seconds until exit."""
    latencies = []
    for k in range(kills):
        with tempfile.TemporaryDirectory() as workdir:
            command = [sys.executable, os.path.join(ROOT, "bin", "run.py"),
                       f"--gin_file={config}.gin", f"--workdir={workdir}",
                       "--mode=train_teacher", "--verbose=2"]
            if data_dir:
                command.append(f"--gin_param=dataset.data_dir='{data_dir}'")
            process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            lines = []
            for line in process.stdout:  # the first checkpoint line: compiled, running
                lines.append(line)
                if line.startswith("[teacher] step"):
                    break
            time.sleep(random.Random(k).uniform(0.0, 5.0))
            sent = time.time()
            process.send_signal(signal.SIGTERM)
            lines.extend(process.stdout)
            code = process.wait()
            latencies.append(time.time() - sent)
            if code != 143:
                raise RuntimeError(f"{config}: exit {code} after SIGTERM:\n{''.join(lines)}")
    return {"method": "direct", "kills": kills,
            "sigterm_to_exit_s": [round(x, 2) for x in latencies],
            "worst_s": round(max(latencies), 2)}


def estimate(config: str, probe_batch: int, jit_compile: bool = True) -> dict:
    """One train step at `probe_batch`, scaled to the config's batch and chunk."""
    import keras
    import numpy as np

    import gin
    from keras_progdist import checkpoint, data, parameterizations, training
    from keras_progdist.diffusion import DiffusionModel
    from keras_progdist.optimizers import make_optimizer
    from keras_progdist.settings import as_record

    gin.clear_config()
    gin.parse_config_file(os.path.join(ROOT, "gin", f"{config}.gin"))
    batch = gin.query_parameter("dataset.batch_size")
    spec = data.DATASETS[gin.query_parameter("dataset.name")]
    try:
        size = gin.query_parameter("dataset.image_size") or spec.image_shape[0]
    except ValueError:  # not bound: the dataset's own size
        size = spec.image_shape[0]
    shape = (size, size, spec.channels)
    diff = training.diffusion()
    cfg = training.teacher()
    out = parameterizations.output_channels(diff.parameterization, shape[-1])
    network = training.UNetConfigurable(image_shape=shape, output_channels=out)
    labels = spec.num_classes if network.num_classes else None
    model = DiffusionModel(network, num_steps=8, **as_record(diff))
    # XLA's compile of the 128x128 LSUN network ran past 25 minutes on 2 cores;
    # --nojit_compile times the same step as a plain TensorFlow graph instead.
    model.compile(optimizer=make_optimizer(1e-4), jit_compile=jit_compile,
                  steps_per_execution=1)
    x = np.random.RandomState(0).uniform(-1, 1, (probe_batch,) + shape).astype("float32")
    inputs = (x, np.zeros((probe_batch,), "int32")) if labels else (x,)
    model.fit(*inputs, batch_size=probe_batch, epochs=1, verbose=0)  # compile
    start = time.time()
    model.fit(*inputs, batch_size=probe_batch, epochs=1, verbose=0)
    step = time.time() - start
    with tempfile.TemporaryDirectory() as directory:
        start = time.time()
        checkpoint.save(directory, "ckpt", model)
        save = time.time() - start
    chunk = step * batch / probe_batch * cfg.steps_per_execution
    gin.clear_config()
    keras.backend.clear_session()
    return {"method": "estimate", "parameters": network.count_params(),
            "probe_batch": probe_batch, "jit_compile": jit_compile,
            "step_s_at_probe": round(step, 3),
            "batch": batch, "steps_per_execution": cfg.steps_per_execution,
            "checkpoint_write_s": round(save, 2),
            "worst_s": round(chunk + save, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(_gin_files()))
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--probe_batch", type=int, default=2)
    parser.add_argument("--jit_compile", action=argparse.BooleanOptionalAction,
                        default=True, help="compile the estimate's step with XLA")
    parser.add_argument("--fashion_mnist_dir",
                        default=os.path.join(ROOT, ".data", "fashion-mnist"))
    args = parser.parse_args(argv)
    import keras

    path = os.path.join(ROOT, "benchmarks", "results",
                        f"sigterm_latency_{keras.backend.backend()}.json")
    # Configs measured earlier and not asked for now keep their figures (each entry
    # records its own load average), so the slow ones can be measured in pieces.
    results = {"backend": keras.backend.backend(), "configs": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for config in args.configs.split(","):
        data_dir = args.fashion_mnist_dir if "fashion" in config else None
        if config in DIRECT:
            entry = direct(config, args.kills, data_dir)
        else:
            entry = estimate(config, args.probe_batch, args.jit_compile)
        entry["load_average"] = [round(x, 2) for x in os.getloadavg()]
        results["configs"][config] = entry
        print(json.dumps({config: entry}), flush=True)
        with open(path, "w") as f:  # after every config: a stopped run keeps the rest
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

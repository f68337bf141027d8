"""Worst-case request time of an exported stage under the default serving limits.

Exports the `tiny.gin` teacher network (random weights: the time of a step does not
depend on them) as a SavedModel and times its `generate` signature:
1. the per-step cost as a function of the batch: `generate(steps=8, B)` for B in
   1, 16, 64, 256, fitted as `seconds per step = a + b * B`;
2. the worst case the default limits allow, predicted from that fit over every batch
   size (the most steps `max_steps` and `max_cost` allow it), and measured directly
   for the predicted worst, for one image at the most steps, for the full batch at
   the most steps it may have, and for `serving_default` at its largest allowed batch
   (the stage's own 128 steps).
The old defaults (1024 steps x 256 images, no cost bound) are predicted from the
same fit. Prints JSON and writes `benchmarks/results/serving_worst_case.json`.

    python benchmarks/serving_worst_case.py
"""

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

from keras_progdist.diffusion import DiffusionModel  # noqa: E402
from keras_progdist.export import serving_graph, settings  # noqa: E402
from keras_progdist.networks.unet import UNet  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "serving_worst_case.json")
TEACHER_STEPS = 128  # tiny.gin's distill.teacher_steps


def tiny_teacher():
    """The network of gin/tiny.gin (16x16x1), random weights."""
    network = UNet((16, 16, 1), channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_heads=1, dropout=0.0, num_groups=8,
                   name="network")
    rng = np.random.default_rng(0)
    network.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                         for w in network.get_weights()])
    return DiffusionModel(network, ema_decay=None, num_steps=TEACHER_STEPS)


def timed(fn, **inputs):
    start = time.perf_counter()
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    for value in out.values():
        value.numpy()
    return time.perf_counter() - start


def main():
    model = tiny_teacher()
    defaults = settings.serving_limits(TEACHER_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        # Measured under wide limits, so any combination may be timed.
        path = os.path.join(tmp, "wide")
        serving_graph.build_archive(model, TEACHER_STEPS, max_steps=1024,
                                    max_batch=256).write_out(path, verbose=False)
        loaded = tf.saved_model.load(path)
        generate, serve = loaded.signatures["generate"], loaded.signatures["serving_default"]
        noise = np.random.default_rng(1).standard_normal((256, 16, 16, 1)).astype(np.float32)
        timed(generate, noise=noise[:1], steps=np.int32(2))  # warm-up
        per_step = {}
        for batch in (1, 16, 64, 256):
            timed(generate, noise=noise[:batch], steps=np.int32(2))
            per_step[batch] = timed(generate, noise=noise[:batch], steps=np.int32(8)) / 8
        batches = np.array(sorted(per_step), float)
        b, a = np.polyfit(batches, [per_step[int(n)] for n in batches], 1)

        def predict(steps, batch):
            return steps * (a + b * batch)

        limit_steps, limit_batch = defaults["max_steps"], defaults["max_batch"]
        limit_cost = defaults["max_cost"]

        def most_steps(batch):
            return min(limit_steps, limit_cost // settings.request_cost(1, batch))

        worst = max(((most_steps(n), n) for n in range(1, limit_batch + 1)),
                    key=lambda sb: predict(*sb))
        combos = {worst, (most_steps(1), 1), (most_steps(limit_batch), limit_batch)}
        measured = {f"generate_{s}steps_x{n}": timed(generate, noise=noise[:n],
                                                     steps=np.int32(s))
                    for s, n in sorted(combos)}
        serve_batch = max(n for n in range(1, limit_batch + 1)
                          if settings.request_cost(TEACHER_STEPS, n) <= limit_cost)
        timed(serve, seed=np.arange(2, dtype=np.int32))  # warm-up
        measured[f"serving_default_{TEACHER_STEPS}steps_x{serve_batch}"] = timed(
            serve, seed=np.arange(serve_batch, dtype=np.int32))
    record = {
        "benchmark": "serving_worst_case",
        "model": "tiny.gin teacher network (16x16x1, 128 DDIM steps), random weights",
        "default_limits": defaults,
        "seconds_per_step_by_batch": {str(k): round(v, 5) for k, v in per_step.items()},
        "fit_seconds_per_step": {"a": round(float(a), 6), "b_per_image": round(float(b), 7)},
        "predicted_worst_case": {"steps": int(worst[0]), "batch": int(worst[1]),
                                 "seconds": round(float(predict(*worst)), 1)},
        "measured_seconds": {k: round(v, 1) for k, v in measured.items()},
        "measured_worst_seconds": round(max(measured.values()), 1),
        "old_defaults_predicted_seconds": round(float(predict(1024, 256)), 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": "CPU", "tensorflow": tf.__version__},
        "load_average": os.getloadavg(),
        "command": "python benchmarks/serving_worst_case.py",
    }
    print(json.dumps(record, indent=2))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()

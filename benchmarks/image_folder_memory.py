"""Peak memory of reading an image folder of large photos at a small image_size.

Writes 64 RGB PNGs of 2000x2000 (smooth waves: about 570 KB each on disk, 12 MB
decoded) into a temporary folder, then, each in a fresh process on the chosen Keras
backend, measures the peak RSS (`ru_maxrss`) of
* `load_images`: `data.load_images("image_folder", ..., image_size=16)`, the path of
  the FID reference statistics on every backend (numpy pipeline);
* `numpy_epoch` / `tf_data_epoch`: one epoch of `make_dataset` (batch 8) through the
  numpy and tf.data pipelines;
and the same process's RSS right after its imports (`baseline_mb`), so the growth is
what reading the folder costs. The goal (issue 31): peak <= 1 GB; before the fix,
`load_images` passed 10 GB on this folder.

Prints JSON and writes `benchmarks/results/image_folder_memory_<backend>.json`.
The images are generated, never stored in the repository.

    python benchmarks/image_folder_memory.py                 # TensorFlow
    KERAS_BACKEND=jax python benchmarks/image_folder_memory.py
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
GOAL_MB = 1024.0

MEASURE = """
import os, resource, sys, time
sys.path.insert(0, {repo!r})
import numpy as np
import keras
from keras_progdist import data
if {mode!r} == "tf_data_epoch":
    import tensorflow  # imported before the baseline, as the other modes import keras
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.time()
if {mode!r} == "load_images":
    images, _ = data.load_images("image_folder", data_dir={folder!r}, image_size=16)
    count = len(images)
else:
    pipeline = "numpy" if {mode!r} == "numpy_epoch" else "tf.data"
    ds = data.make_dataset("image_folder", data_dir={folder!r}, image_size=16,
                           batch_size=8, shuffle=False, repeat=False, pipeline=pipeline)
    count = sum(len(batch[0] if isinstance(batch, tuple) else batch) for batch in ds)
seconds = time.time() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT", baseline, peak, seconds, count)
"""


def smooth_rgb(side, seed):
    """A smooth photo stand-in: gradients and soft waves, a small PNG."""
    import numpy as np

    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    planes = [127.5 + 120 * np.sin(6 * x + 4 * y + p) for p in phase]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def write_folder(folder, count, side):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(smooth_rgb(side, i)).save(os.path.join(folder, f"{i:03d}.png"))
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def measure(mode, folder):
    """`{baseline_mb, peak_mb, growth_mb, seconds, images}` of one fresh process."""
    script = MEASURE.format(repo=REPO, mode=mode, folder=folder)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    baseline, peak, seconds, count = out.stdout.split("RESULT")[-1].split()
    return {"baseline_mb": round(float(baseline), 1), "peak_mb": round(float(peak), 1),
            "growth_mb": round(float(peak) - float(baseline), 1),
            "seconds": round(float(seconds), 2), "images": int(count)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--modes", default="load_images,numpy_epoch,tf_data_epoch")
    parser.add_argument("--out", default=None, help="result file (default: "
                        "benchmarks/results/image_folder_memory_<backend>.json)")
    args = parser.parse_args()
    backend = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    modes = [m for m in args.modes.split(",") if m]
    if backend != "tensorflow":
        modes = [m for m in modes if m != "tf_data_epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        began = time.time()
        disk = write_folder(folder, args.count, args.side)
        results = {mode: measure(mode, folder) for mode in modes}
    record = {
        "benchmark": "image_folder_memory",
        "what": f"peak RSS reading {args.count} RGB PNGs of {args.side}x{args.side} at "
                "image_size=16, each mode in a fresh process",
        "backend": backend,
        "folder_bytes": disk,
        "goal_peak_mb": GOAL_MB,
        "results": results,
        "within_goal": all(r["peak_mb"] <= GOAL_MB for r in results.values()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "seconds_total": round(time.time() - began, 1),
        "command": "python benchmarks/image_folder_memory.py"
                   + (f" (KERAS_BACKEND={backend})" if backend != "tensorflow" else ""),
    }
    print(json.dumps(record, indent=2))
    out = args.out or os.path.join(RESULTS_DIR, f"image_folder_memory_{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()

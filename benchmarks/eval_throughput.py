"""Throughput of the FID Inception network (preprocessing included).

Feeds uint8 images of `--image-size` (CIFAR-10's 32 by default) through
`compute_features`, after one warm-up batch that pays for tracing/compiling,
and reports images per second. Prints JSON and writes it to
`benchmarks/results/eval_throughput_<backend>.json`.

    KERAS_BACKEND=tensorflow python benchmarks/eval_throughput.py --batch-size 32
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from keras_progdist.distribute import describe_device  # noqa: E402
from keras_progdist.evaluation import weights  # noqa: E402


def _backend_version():
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if module is None:
        return None
    return __import__(module).__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=4, help="timed batches")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    )
    args = parser.parse_args()

    start = time.perf_counter()
    model = weights.load_fid_network(args.cache_dir)
    load_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    warmup = rng.integers(0, 256, shape, dtype=np.uint8)
    start = time.perf_counter()
    weights.compute_features(model, warmup, batch_size=args.batch_size)
    warmup_s = time.perf_counter() - start

    images = rng.integers(0, 256, (args.num_batches,) + shape, dtype=np.uint8)
    images = images.reshape((-1,) + shape[1:])
    start = time.perf_counter()
    features = weights.compute_features(model, images, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    assert features.shape == (len(images), 2048) and np.isfinite(features).all()

    result = {
        "benchmark": "eval_throughput",
        "what": "uint8 images -> 8-bit quantise -> TF1 bilinear resize to 299 -> "
        "FID Inception-v3 -> [N, 2048] (keras_progdist.evaluation.compute_features)",
        "images_per_s": round(len(images) / elapsed, 2),
        "batch_size": args.batch_size,
        "num_images_timed": len(images),
        "input_size": args.image_size,
        "seconds_timed": round(elapsed, 3),
        "warmup_batch_s": round(warmup_s, 3),
        "load_network_s": round(load_s, 3),
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "backend_version": _backend_version(),
        "keras": keras.__version__,
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"eval_throughput_{keras.backend.backend()}.json")
    with open(path, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

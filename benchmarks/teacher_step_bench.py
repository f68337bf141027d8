"""Teacher training throughput: `DiffusionModel.fit` steps per second.

Networks (the settings in gin/tiny.gin and gin/cifar_v.gin; docs/design.md §2):

* `tiny`: the test/demo U-Net on the embedded MNIST digits at 16x16x1, batch 32.
* `cifar10`: the paper's CIFAR-10 U-Net (`channels=256, channel_mult=(1, 1, 1),
  num_res_blocks=3, attention_resolutions=(16, 8), dropout=0.2`) at 32x32x3 on random
  images (no CIFAR-10 on these machines; the step cost does not depend on the pixels),
  batch 4 and only a few timed steps, since one step takes seconds on a CPU.

Each measurement is one `fit()` of `1 + timed` steps on a fresh model. The first step
pays for tracing and XLA compilation and is reported on its own (`first_step_s`);
`steps_per_s` is the steady state over the timed steps. On TensorFlow every net is
measured with `jit_compile=True` and `False` side by side in one process; on JAX
(always jitted) run the script again with `KERAS_BACKEND=jax`.

`--gpu`: the paper's net at batch 128 under the `mixed_bfloat16` policy on JAX, on a
GPU (refuses to run on a CPU unless `--allow-cpu`). `--gpu-net` picks the net instead
(`fashion`: the 7.07M-parameter U-Net of `gin/fashion_mnist.gin` at 32x32x1; `tiny`),
always on random images. Nothing on the `--gpu` path needs TensorFlow (the GPU host has
none): the random batches come from a Python generator there; tf.data is only used on
the TensorFlow backend. Checked without TensorFlow on a CPU with
`KERAS_BACKEND=jax python benchmarks/teacher_step_bench.py --gpu --gpu-net=tiny
--allow-cpu --cifar-batch=4 --cifar-steps=2 --output-dir=/tmp/bench`.

Prints one JSON line per measurement and writes them all to
`benchmarks/results/teacher_step_<backend>.json` (`..._gpu.json` with `--gpu`).

    KERAS_BACKEND=tensorflow python benchmarks/teacher_step_bench.py
    KERAS_BACKEND=jax python benchmarks/teacher_step_bench.py
    KERAS_BACKEND=jax python benchmarks/teacher_step_bench.py --gpu
"""

import argparse
import json
import os
import sys
import time

GPU_MODE = "--gpu" in sys.argv
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not GPU_MODE:
    # JAX's CPU backend uses one core for Eigen ops unless told otherwise.
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true "
                                       "intra_op_parallelism_threads=2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_progdist.data import make_dataset  # noqa: E402
from keras_progdist.diffusion import DiffusionModel  # noqa: E402
from keras_progdist.distribute import describe_device  # noqa: E402
from keras_progdist.networks import UNet  # noqa: E402
from keras_progdist.optimizers import make_optimizer  # noqa: E402

NETS = {
    # ~0.6M parameters.
    "tiny": dict(image_shape=(16, 16, 1), channels=32, channel_mult=(1, 2),
                 num_res_blocks=1, attention_resolutions=(8,), num_groups=8),
    # The paper's CIFAR-10 teacher (52.9M parameters with BigGAN resampling blocks).
    "cifar10": dict(image_shape=(32, 32, 3), channels=256, channel_mult=(1, 1, 1),
                    num_res_blocks=3, attention_resolutions=(16, 8), dropout=0.2),
    # gin/fashion_mnist.gin's net (7.07M parameters), 28x28 padded to 32x32x1.
    "fashion": dict(image_shape=(32, 32, 1), channels=64, channel_mult=(1, 2, 2),
                    num_res_blocks=2, attention_resolutions=(8,), dropout=0.1,
                    num_groups=32),
}


def _on_accelerator():
    return not describe_device().startswith("CPU")


def _backend_version():
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    return __import__(module).__version__ if module else None


class _StepTimer(keras.callbacks.Callback):
    """Wall-clock time at the start of fit() and at the end of every batch.

    Reading the loss as a float waits for the step to finish (JAX dispatches
    asynchronously), so each timestamp marks a completed step.
    """

    def on_train_begin(self, logs=None):
        self.begin = time.perf_counter()
        self.ends = []
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.ends.append(time.perf_counter())


def _repeat(images):
    while True:
        yield (images,)


def _dataset(net_name, batch_size, synthetic=False):
    """Training batches: the embedded digits for `tiny` (unless `synthetic`), random
    images otherwise (the step cost does not depend on the pixels)."""
    if net_name == "tiny" and not synthetic:
        return make_dataset("mnist_embedded", batch_size=batch_size, image_size=16, seed=0)
    shape = (batch_size,) + NETS[net_name]["image_shape"]
    images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # only here: the JAX GPU host has no TensorFlow

        return tf.data.Dataset.from_tensors(images).repeat()
    return _repeat(images)


def measure(net_name, batch_size, timed_steps, jit_compile, policy="float32",
            synthetic=False):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    config = dict(NETS[net_name])
    network = UNet(config.pop("image_shape"), **config)
    # The paper's teacher settings: x/v output, truncated-SNR weighting, EMA 0.9999,
    # Adam 2e-4 with global-norm clipping 1.
    model = DiffusionModel(network, parameterization="v", weighting="snr_trunc",
                           ema_decay=0.9999, seed=0)
    model.compile(optimizer=make_optimizer(2e-4), jit_compile=jit_compile)
    build_s = time.perf_counter() - start

    timer = _StepTimer()
    model.fit(_dataset(net_name, batch_size, synthetic), epochs=1, steps_per_epoch=1 + timed_steps,
              verbose=0, callbacks=[timer])
    first_step_s = timer.ends[0] - timer.begin
    steady_s = (timer.ends[-1] - timer.ends[0]) / timed_steps
    result = {
        "benchmark": "teacher_step",
        "net": net_name,
        "params": network.count_params(),
        "image_shape": list(network.image_shape),
        "batch_size": batch_size,
        "backend": keras.backend.backend(),
        "backend_version": _backend_version(),
        "keras_version": keras.__version__,
        "jit_compile": jit_compile,
        "dtype_policy": policy,
        "device": describe_device(),
        "build_s": round(build_s, 3),
        "first_step_s": round(first_step_s, 3),
        "timed_steps": timed_steps,
        "step_ms": round(1000 * steady_s, 2),
        "steps_per_s": round(1.0 / steady_s, 4),
        "images_per_s": round(batch_size / steady_s, 2),
        "loss_first_last": [round(timer.losses[0], 4), round(timer.losses[-1], 4)],
        # The CPU machine is shared: 1-minute load average before / after, for context.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result), flush=True)
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="the paper's net, batch 128, mixed_bfloat16, on JAX + GPU")
    parser.add_argument("--gpu-net", default="cifar10", choices=sorted(NETS),
                        help="the net --gpu measures (random images)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="let --gpu run on a CPU (to check the path, e.g. without "
                             "TensorFlow, with --gpu-net=tiny)")
    parser.add_argument("--nets", default="tiny,cifar10",
                        help="comma-separated: " + ",".join(NETS))
    parser.add_argument("--tiny-batch", type=int, default=32)
    parser.add_argument("--tiny-steps", type=int, default=20, help="timed steps, tiny net")
    parser.add_argument("--cifar-batch", type=int, default=None,
                        help="batch of the CIFAR (or fashion) net, and of the --gpu net: "
                             "default 4 (CPU) or 128 (--gpu)")
    parser.add_argument("--cifar-steps", type=int, default=None,
                        help="timed steps of the CIFAR (or fashion) net, and of the --gpu "
                             "net: default 2 (CPU) or 20 (--gpu)")
    parser.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    )
    args = parser.parse_args()
    backend = keras.backend.backend()

    results = []
    if args.gpu:
        if backend != "jax":
            parser.error(f"--gpu measures the JAX backend; got KERAS_BACKEND={backend}.")
        if not _on_accelerator() and not args.allow_cpu:
            parser.error(f"--gpu needs a GPU, but JAX sees only {describe_device()}.")
        results.append(measure(args.gpu_net, args.cifar_batch or 128,
                               args.cifar_steps or 20, jit_compile=True,
                               policy="mixed_bfloat16", synthetic=True))
        name = f"teacher_step_{backend}_gpu.json"
    else:
        jit_modes = [True, False] if backend == "tensorflow" else [True]
        for net_name in args.nets.split(","):
            if net_name not in NETS:
                parser.error(f"Unknown net {net_name!r}; allowed: {', '.join(NETS)}.")
            batch = args.tiny_batch if net_name == "tiny" else (args.cifar_batch or 4)
            steps = args.tiny_steps if net_name == "tiny" else (args.cifar_steps or 2)
            for jit in jit_modes:
                results.append(measure(net_name, batch, steps, jit_compile=jit))
        name = f"teacher_step_{backend}.json"

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, name)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""`python distribute_worker.py {tensorflow,jax} [--steps N] [--batch B]`: one backend's
half of `tests/test_distribute.py`, run in a subprocess of its own.

Splitting the host CPU into two devices has to happen before TensorFlow / XLA
initialise, so each backend runs in a fresh process, started with `KERAS_BACKEND` set
(and, for JAX, `XLA_FLAGS=--xla_force_host_platform_device_count=2`). The worker trains
a teacher and a distillation stage on 2 devices and on 1, and prints what it measured
as one line `RESULT {json}` on stdout; the tests check those numbers.

- `tensorflow`: MirroredStrategy over 2 logical CPU devices. `simulate()` replays the
  2-replica run on one device (each half batch under its replica id, the mean of the
  two gradients, plain SGD) for an exact comparison of the updates.
- `jax`: `keras.distribution.DataParallel` over 2 devices, against the same run on one.

Importing this module does nothing; `main()` runs one backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("tensorflow", "jax")
LR_T, LR_D = 0.05, 0.02  # SGD learning rates of the teacher and of distillation


def rel(a, b):
    """Global relative L2 distance `|a - b| / |b|` of two weight lists."""
    num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)))
    return float(num / np.sqrt(sum(np.sum(y ** 2) for y in b)))


def norm(ws):
    """Global L2 norm of a weight list."""
    return float(np.sqrt(sum(np.sum(w ** 2) for w in ws)))


def delta(after, before):
    """Element-wise `after - before` of two weight lists."""
    return [a - b for a, b in zip(after, before)]


def error(fn):
    """None if `fn()` returns, else the exception's type and its most telling line."""
    try:
        fn()
    except Exception as e:  # the message is the result
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        line = next((line for line in lines if "must feed" in line), lines[0])
        return f"{type(e).__name__}: {line[:300]}"
    return None


def split_tf_host_cpu(num_devices: int = 2) -> None:
    """Splits the host CPU into `num_devices` logical devices (before TF initialises)."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)


class _Common:
    """What both backends share: `steps` fixed data batches (and a repeating stream of
    them), a network factory and the initial weights every model starts from."""

    def __init__(self, steps: int, batch: int):
        import keras
        import tensorflow as tf

        from keras_progdist import data

        self.steps, self.batch = steps, batch
        ds = data.make_dataset("mnist_embedded", batch_size=batch, image_size=16, seed=0)
        self.batches = [b.numpy() for b in ds.take(steps)]
        self.stream = tf.data.Dataset.from_tensor_slices(np.stack(self.batches)).repeat()
        keras.utils.set_random_seed(0)
        self.w_init = self.new_network().get_weights()

    @staticmethod
    def new_network():
        from keras_progdist.networks.unet import UNet
        return UNet((16, 16, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                    attention_resolutions=(), num_groups=4, name="network")


def run_tensorflow(steps: int, batch: int) -> dict:
    """MirroredStrategy on 2 logical CPUs against a 1-device replay and a 1-device run.

    Returns:
        The measurements `test_distribute.py`'s `mirrored` tests read.
    """
    import keras
    import tensorflow as tf

    from keras_progdist import diffusion, distribute
    from keras_progdist.diffusion import DiffusionModel, training_seed
    from keras_progdist.distillation import Distiller
    from keras_progdist.optimizers import WarmupConstant, reset_optimizer
    from keras_progdist.random_utils import TensorSeed

    out, t0 = {}, time.time()
    common = _Common(steps, batch)
    new_network, w_init, stream = common.new_network, common.w_init, common.stream

    strategy = distribute.get_strategy("mirrored")
    out["replicas"] = strategy.num_replicas_in_sync
    out["fit_settings"] = distribute.fit_settings(strategy, True, 10)
    out["data_parallel_error"] = error(lambda: distribute.get_strategy("data_parallel"))

    def local(v):
        return [t.numpy() for t in strategy.experimental_local_results(v.value)]

    # One SeedGenerator, read in replica context: each replica folds in its id.
    with strategy.scope():
        gen = keras.random.SeedGenerator(0)
    noise = tf.function(lambda: strategy.run(
        lambda: keras.random.normal((64,), seed=TensorSeed(training_seed(gen)))))()
    noise = [n.numpy() for n in strategy.experimental_local_results(noise)]
    out["noise_corr"] = float(np.corrcoef(noise[0], noise[1])[0, 1])
    out["noise_max_abs_diff"] = float(np.max(np.abs(noise[0] - noise[1])))
    out["seed_state_per_replica"] = [s.tolist() for s in local(gen.state)]

    class Snapshots(keras.callbacks.Callback):
        def __init__(self, variables):
            super().__init__()
            self.variables, self.weights = variables, []

        def on_train_batch_end(self, batch, logs=None):
            self.weights.append([v.numpy() for v in self.variables])

    def simulate(model, w_start, lr):
        """The 2-replica SGD run on one device: half batch k under replica id k."""
        for v, w in zip(model.trainable_variables, w_start):
            v.assign(w)
        trajectory, step_losses, saved = [], [], diffusion.replica_id
        half_size = batch // 2
        try:
            for s in range(steps):
                grads, losses = [], []
                for k in range(2):
                    diffusion.replica_id = lambda k=k: k
                    model.seed_generator.state.assign([model.seed, s])
                    half = common.batches[s][k * half_size:(k + 1) * half_size]
                    with tf.GradientTape() as tape:
                        loss = model.compute_loss(x=tf.constant(half))
                    grads.append(tape.gradient(loss, model.trainable_variables))
                    losses.append(float(loss))
                for v, g0, g1 in zip(model.trainable_variables, *grads):
                    v.assign_sub(lr * (g0 + g1) / 2.0)
                trajectory.append([v.numpy() for v in model.trainable_variables])
                step_losses.append(float(np.mean(losses)))
        finally:
            diffusion.replica_id = saved
        return trajectory, float(np.mean(step_losses))

    def compare(prefix, snaps, trajectory, w0):
        out[prefix + "_first_update_rel_err"] = rel(delta(snaps[0], w0),
                                                    delta(trajectory[0], w0))
        out[prefix + "_first_update_ratio"] = (norm(delta(snaps[0], w0))
                                               / norm(delta(trajectory[0], w0)))
        out[prefix + "_final_rel_err"] = rel(delta(snaps[-1], w0), delta(trajectory[-1], w0))

    # -- teacher --
    with strategy.scope():
        teacher = DiffusionModel(new_network(), ema_decay=0.9, seed=0)
        teacher.network.set_weights(w_init)
        teacher.ema_network.set_weights(w_init)
        teacher.compile(optimizer=keras.optimizers.SGD(LR_T), jit_compile=False)
    w0 = [v.numpy() for v in teacher.network.trainable_variables]
    snaps = Snapshots(teacher.network.trainable_variables)
    out["teacher_loss_2dev"] = teacher.fit(stream, steps_per_epoch=steps, verbose=0,
                                           callbacks=[snaps]).history["loss"][0]
    out["teacher_seed_state_per_replica"] = [s.tolist()
                                             for s in local(teacher.seed_generator.state)]
    ref = DiffusionModel(new_network(), ema_decay=None, seed=0)
    trajectory, out["teacher_loss_sim"] = simulate(ref, w0, LR_T)
    compare("teacher", snaps.weights, trajectory, w0)

    # The EMA recursion over the simulated weights; decay warms up as (1 + n) / (10 + n).
    ema = [w.copy() for w in w_init]
    trainable_index = [i for i, v in enumerate(teacher.network.weights) if v.trainable]
    for s, ws in enumerate(trajectory):
        decay = min(0.9, (2.0 + s) / (11.0 + s))
        current = list(ema)
        for i, w in zip(trainable_index, ws):
            current[i] = w
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, current)]
    per_replica = [local(v) for v in teacher.ema_network.weights]
    out["ema_replica_max_diff"] = float(max(np.max(np.abs(a - b)) for a, b in per_replica))
    out["ema_rel_err"] = rel(delta([p[0] for p in per_replica], w_init), delta(ema, w_init))
    out["ema_moved"] = rel([p[0] for p in per_replica], w_init)

    plain = DiffusionModel(new_network(), ema_decay=None, seed=0)
    plain.network.set_weights(w_init)
    plain.compile(optimizer=keras.optimizers.SGD(LR_T), jit_compile=False)
    out["teacher_loss_1dev"] = plain.fit(stream, steps_per_epoch=steps,
                                         verbose=0).history["loss"][0]

    # -- distillation stage (teacher: the network trained above) --
    w_teacher = teacher.network.get_weights()
    with strategy.scope():
        distiller = Distiller(teacher.network, num_steps=4, seed=1)
        distiller.compile(optimizer=keras.optimizers.SGD(WarmupConstant(LR_D)),
                          jit_compile=False)
    d0 = [v.numpy() for v in distiller.student.trainable_variables]
    dsnaps = Snapshots(distiller.student.trainable_variables)
    out["distill_loss_2dev"] = distiller.fit(stream, steps_per_epoch=steps, verbose=0,
                                             callbacks=[dsnaps]).history["loss"][0]
    out["teacher_frozen_max_diff"] = float(max(
        np.max(np.abs(r - w))
        for v, w in zip(distiller.teacher.weights, w_teacher) for r in local(v)))
    out["distiller_trains_student_only"] = (
        [v.path for v in distiller.trainable_variables] ==
        [v.path for v in distiller.student.trainable_variables])
    dtrajectory, out["distill_loss_sim"] = simulate(
        Distiller(teacher.network, num_steps=4, seed=1), d0, LR_D)
    compare("distill", dsnaps.weights, dtrajectory, d0)
    dplain = Distiller(teacher.network, num_steps=4, seed=1)
    dplain.compile(optimizer=keras.optimizers.SGD(WarmupConstant(LR_D)), jit_compile=False)
    out["distill_loss_1dev"] = dplain.fit(stream, steps_per_epoch=steps,
                                          verbose=0).history["loss"][0]

    # -- the next stage under the strategy: start_stage + reset_optimizer, train on --
    distiller.start_stage(distiller.student, 2)
    reset_optimizer(distiller.optimizer)
    out["reset_iterations"] = [int(i) for i in local(distiller.optimizer.iterations)]
    w_stage2 = distiller.student.get_weights()

    def teacher_vs(ws):
        return float(max(np.max(np.abs(r - w))
                         for v, w in zip(distiller.teacher.weights, ws) for r in local(v)))

    out["stage2_teacher_is_student"] = teacher_vs(w_stage2)
    out["stage2_num_steps"] = [float(n) for n in local(distiller.num_steps)]
    out["stage2_loss"] = distiller.fit(stream, steps_per_epoch=2, verbose=0).history["loss"][0]
    out["stage2_teacher_frozen"] = teacher_vs(w_stage2)
    out["stage2_student_replica_max_diff"] = float(max(
        np.max(np.abs(a - b)) for a, b in (local(v) for v in distiller.student.weights)))

    # -- the pipeline under the strategy, with its configured steps_per_execution --
    import tempfile

    import gin
    from keras_progdist import training
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")], [
        f"dataset.batch_size = {batch}", "UNet.channels = 8", "UNet.channel_mult = (1,)",
        "UNet.attention_resolutions = ()", "UNet.num_groups = 4", "teacher.train_steps = 2",
        "teacher.checkpoint_every = 2", "teacher.steps_per_execution = 2",
        "distill.teacher_steps = 2"])
    out["pipeline_error"] = error(lambda: training.run(
        tempfile.mkdtemp(), "train_teacher", strategy=strategy, verbose=0))
    # Last: connecting to a (missing) local TPU changes TensorFlow's global context.
    out["tpu_local_error"] = error(lambda: distribute.get_strategy("tpu", "local"))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run_jax(steps: int, batch: int) -> dict:
    """`DataParallel` over 2 host devices against the same run on one device.

    Returns:
        The measurements `test_distribute.py`'s `data_parallel` tests read.
    """
    import jax
    import keras

    from keras_progdist import distribute
    from keras_progdist.diffusion import DiffusionModel
    from keras_progdist.distillation import Distiller
    from keras_progdist.optimizers import WarmupConstant

    out, t0 = {}, time.time()
    common = _Common(steps, batch)
    new_network, w_init, stream = common.new_network, common.w_init, common.stream
    out["devices"] = len(jax.devices())
    out["mirrored_error"] = error(lambda: distribute.get_strategy("mirrored"))
    out["tpu_error"] = error(lambda: distribute.get_strategy("tpu"))

    class Snapshots(keras.callbacks.Callback):
        # JAX syncs the model's variables at epoch ends, so one step per epoch.
        def __init__(self, network):
            super().__init__()
            self.network, self.weights = network, []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append([np.array(v.numpy())
                                 for v in self.network.trainable_variables])

    def run(source):
        """Teacher, then a distillation stage from `source`: per-step losses and weights."""
        teacher = DiffusionModel(new_network(), ema_decay=0.9, seed=0)
        teacher.network.set_weights(w_init)
        teacher.ema_network.set_weights(w_init)
        teacher.compile(optimizer=keras.optimizers.SGD(LR_T))
        snaps = Snapshots(teacher.network)
        t_losses = teacher.fit(stream, steps_per_epoch=1, epochs=steps, verbose=0,
                               callbacks=[snaps]).history["loss"]
        distiller = Distiller(source, num_steps=4, seed=1)
        distiller.compile(optimizer=keras.optimizers.SGD(WarmupConstant(LR_D)))
        w_teacher = distiller.teacher.get_weights()
        dsnaps = Snapshots(distiller.student)
        d_losses = distiller.fit(stream, steps_per_epoch=1, epochs=steps, verbose=0,
                                 callbacks=[dsnaps]).history["loss"]
        frozen = max(float(np.max(np.abs(a - b)))
                     for a, b in zip(distiller.teacher.get_weights(), w_teacher))
        return dict(teacher=teacher, t_losses=t_losses, d_losses=d_losses,
                    snaps=snaps.weights, dsnaps=dsnaps.weights, frozen=frozen)

    source = new_network()  # the distillation teacher: perturbed, so not the student's init
    source.set_weights([w + 0.01 * np.random.RandomState(i).standard_normal(w.shape)
                        .astype(w.dtype) for i, w in enumerate(w_init)])
    w_source = [v.numpy() for v in source.trainable_variables]
    w_t0 = [w for w, v in zip(w_init, source.weights) if v.trainable]
    single = run(source)
    distribute.get_strategy("data_parallel")
    out["distribution"] = type(keras.distribution.distribution()).__name__
    out["num_replicas"] = distribute.num_replicas()
    dp = run(source)
    sharding = dp["teacher"].network.trainable_variables[0].value.sharding
    out["weight_devices"] = len(sharding.device_set)
    out["weight_replicated"] = bool(sharding.is_fully_replicated)
    for key in ("t_losses", "d_losses"):
        out[key + "_1dev"], out[key + "_dp"] = single[key], dp[key]
    out["teacher_first_update_ratio"] = (norm(delta(dp["snaps"][0], w_t0)) /
                                         norm(delta(single["snaps"][0], w_t0)))
    out["teacher_first_update_rel_err"] = rel(delta(dp["snaps"][0], w_t0),
                                              delta(single["snaps"][0], w_t0))
    out["teacher_final_rel_err"] = rel(delta(dp["snaps"][-1], w_t0),
                                       delta(single["snaps"][-1], w_t0))
    out["distill_first_update_rel_err"] = rel(delta(dp["dsnaps"][0], w_source),
                                              delta(single["dsnaps"][0], w_source))
    out["distill_final_rel_err"] = rel(delta(dp["dsnaps"][-1], w_source),
                                       delta(single["dsnaps"][-1], w_source))
    out["ema_rel_err"] = rel(delta(dp["teacher"].ema_network.get_weights(), w_init),
                             delta(single["teacher"].ema_network.get_weights(), w_init))
    out["ema_moved"] = rel(dp["teacher"].ema_network.get_weights(), w_init)
    out["teacher_frozen_max_diff"] = max(single["frozen"], dp["frozen"])
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    """Runs one backend's measurements and prints `RESULT {json}`.

    Args:
        argv: `[backend, --steps N, --batch B]`; `backend` must match `KERAS_BACKEND`.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error(f"--batch must be even (two replicas), got {args.batch}")
    if os.environ.get("KERAS_BACKEND") != args.backend:
        parser.error(f"run with KERAS_BACKEND={args.backend} "
                     f"(got {os.environ.get('KERAS_BACKEND')!r})")
    if args.backend == "tensorflow":
        split_tf_host_cpu(2)  # before anything touches a device
        result = run_tensorflow(args.steps, args.batch)
    else:
        result = run_jax(args.steps, args.batch)
    print("RESULT " + json.dumps(result, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # run as a script from anywhere: use this checkout's package
    sys.exit(main())

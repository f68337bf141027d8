"""Where in time a distilled student misses its teacher: the error of each student step.

    python benchmarks/distill_error_by_t.py WORKDIR [--gin_file=fashion_mnist_cpu.gin]
        [--data_dir=DIR] [--num_images=256] [--out=FILE.json]

For every finished student stage of a work directory (N steps, distilled from the 2N-step
model before it), on the same real training images and noise, at each of the student's
grid times `t = i / N`:

    z_t = alpha_t x + sigma_t eps                      (the training distribution)
    x~  = the target that makes one student DDIM step land on the teacher's two steps
    z error of the step = |alpha_s - (sigma_s / sigma_t) alpha_t| * RMSE(x_hat - x~),
                          s = t - 1/N: how far the student's next z is from the
                          teacher's. DDIM is linear in x_hat (every parameterization
                          gives eps_hat = (z_t - alpha_t x_hat) / sigma_t), so this is
                          exact; the last step (s = 0) returns x_hat itself and the
                          factor is 1

once for the finished student and once for the student as it started the stage (the
teacher's own weights, taking one step where it was trained for two). `closed` is the
share of that starting gap the stage's training removed: a step with a small share is
where the stage's updates did not reach. The stage's own loss (weighted x-MSE) is
reported per t too, with the stage's own weighting (`distill.weighting`). Prints JSON and
writes `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--gin_file", default="fashion_mnist_cpu.gin")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"))
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: WORKDIR/error_by_t.json")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be at least 1")
    if not os.path.exists(args.gin_file):
        args.gin_file = os.path.join(ROOT, "gin", args.gin_file)
    if not os.path.isfile(args.gin_file):
        parser.error(f"--gin_file: {args.gin_file} does not exist")
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        parser.error(f"{args.workdir} holds no config.json: not a work directory")
    args.out = args.out or os.path.join(args.workdir, "error_by_t.json")
    return args


def stage_errors(teacher_net, student_net, num_steps: int, images, eps, config,
                 weighting: str | None = None) -> list:
    """Per student grid time: the loss and the z error of the trained student and of
    the stage's starting point (the teacher's weights). See the module docstring.

    `weighting` is the stage's loss weighting (default: the teacher's)."""
    import numpy as np
    from keras import ops

    from keras_progdist import losses
    from keras_progdist.diffusion import network_denoise
    from keras_progdist.distillation import Distiller
    from keras_progdist.schedules import alpha_sigma, get_schedule

    diffusion = config["diffusion"]
    weighting = weighting or diffusion["weighting"]
    schedule = get_schedule(config["schedule"])
    distiller = Distiller(teacher_net, schedule=schedule,
                          parameterization=diffusion["parameterization"],
                          weighting=diffusion["weighting"], num_steps=num_steps)
    rows = []
    for i in range(1, num_steps + 1):
        u = np.full((len(images),), (i - 0.5) / num_steps, np.float32)
        z_t, t, x_tilde = distiller.targets(images, None, u, eps)
        logsnr_t = schedule.logsnr(t)
        alpha_t, sigma_t = alpha_sigma(logsnr_t)
        alpha_s, sigma_s = alpha_sigma(schedule.logsnr(t - 1.0 / num_steps))
        # The last step returns x_hat itself (samplers.ddim_step): its factor is 1.
        gain = 1.0 if i == 1 else float(
            np.abs(ops.convert_to_numpy(alpha_s - sigma_s / sigma_t * alpha_t))[0])
        row = {"t": i / num_steps}
        for name, net in (("start", teacher_net), ("trained", student_net)):
            x_hat, _ = network_denoise(net, z_t, t, schedule, diffusion["parameterization"])
            loss = ops.mean(losses.weighted_x_mse(x_tilde, x_hat, logsnr_t,
                                                  weighting))
            rmse_x = float(np.sqrt(np.mean((ops.convert_to_numpy(x_hat)
                                            - ops.convert_to_numpy(x_tilde)) ** 2)))
            row[name] = {"loss": float(ops.convert_to_numpy(loss)), "rmse_x": rmse_x,
                         "z_error": gain * rmse_x}
        start = row["start"]["z_error"]
        row["closed"] = 1.0 - row["trained"]["z_error"] / start if start > 0 else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras
    import numpy as np

    import gin
    from keras_progdist import data
    from keras_progdist.training import config as schema
    from keras_progdist.workdir import TEACHER, WorkDir, stage_name

    schema.parse_gin([args.gin_file], [f"dataset.data_dir={args.data_dir!r}"])
    dataset = schema.dataset_settings()
    weighting = schema.distill()["weighting"]
    gin.clear_config()
    wd = WorkDir(args.workdir)
    config = wd.require_config()
    if config["network"].get("num_classes"):
        raise SystemExit("error: class-conditional runs are not supported here yet")
    pixels, _ = data.load_images(dataset["name"], data_dir=dataset.get("data_dir"),
                                 image_size=dataset.get("image_size"),
                                 resize=dataset.get("resize", "bilinear"),
                                 limit=args.num_images)
    images = pixels.astype(np.float32) / 127.5 - 1.0
    eps = np.asarray(keras.random.normal(images.shape, seed=args.seed))
    out = {"workdir": os.path.abspath(args.workdir), "num_images": len(images),
           "stages": {}}
    previous = TEACHER
    for n in wd.finished_students():
        if wd.stage_steps(previous) != 2 * n:
            raise SystemExit(f"error: the {n}-step student's teacher would be {previous} "
                             f"({wd.stage_steps(previous)} steps), not a {2 * n}-step "
                             "model: the ladder has a gap")
        teacher = wd.stage_model(previous, config).network
        student = wd.stage_model(stage_name(n), config).network
        rows = stage_errors(teacher, student, n, images, eps, config, weighting)
        out["stages"][str(n)] = rows
        print(f"[error_by_t] {n} steps: closed "
              + ", ".join(f"t={r['t']:.3g} " + ("—" if r["closed"] is None
                                                   else f"{r['closed']:.2f}")
                          for r in rows[-4:]),
              flush=True)
        previous = stage_name(n)
    from keras_progdist import fileio

    fileio.atomic_write_json(args.out, out)
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Runs a keras-progdist experiment: teacher -> distillation stages -> export -> eval.

    python bin/run.py --gin_file=tiny.gin --workdir=runs/tiny            # everything
    python bin/run.py --gin_file=cifar_v.gin --mode=train_teacher \\
        --gin_param="dataset.data_dir='/data/tfds'" --workdir=runs/cifar_v

A bare --gin_file name is looked up in the repository's gin/ folder. Re-running the same
command resumes from the last checkpoint; finished stages are skipped.
"""

import os
import sys

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_progdist.distribute import STRATEGIES  # noqa: E402
from keras_progdist.training.config import MODES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); bare names are looked "
                          "up in gin/.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'teacher.train_steps=100'.")
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, samples, logs). "
                    "Default: runs/<--experiment, else the first gin file's name>.")
flags.DEFINE_enum("mode", "all", list(MODES),
                  "What to run. sample: write every model's evaluation samples as .npz "
                  "files (eval/samples/), which eval then scores, on any host.")
flags.DEFINE_string("export_dir", os.path.join(ROOT, "saved_models"),
                    "Export root for SavedModels and .keras files.")
flags.DEFINE_bool("overwrite", False, "Replace the current export version (weights "
                  "already exported are never re-exported).")
flags.DEFINE_string("experiment", None, "Export name (default: the gin file's name).")
flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                  "Distribution strategy (TensorFlow: mirrored/multi_worker/tpu; "
                  "JAX: data_parallel).")
flags.DEFINE_string("tpu", None, "TPU name or grpc address for --strategy=tpu "
                    "('local' on a TPU VM).")
flags.DEFINE_float("time_budget_s", None, "Stop cleanly after this many seconds: "
                   "training checkpoints at the exact step, evaluation keeps the models "
                   "it finished; exit code 143, and the same command goes on.")
flags.DEFINE_integer("verbose", 1, "Keras progress bar verbosity (0, 1 or 2).")


def resolve_gin_file(name: str) -> str:
    """A path as given, else `gin/<name>` (adding `.gin` when missing)."""
    candidates = [name, os.path.join(ROOT, "gin", name)]
    if not name.endswith(".gin"):
        candidates += [c + ".gin" for c in candidates]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    available = sorted(f for f in os.listdir(os.path.join(ROOT, "gin")) if f.endswith(".gin"))
    raise app.UsageError(f"--gin_file={name}: no such file here or in gin/; "
                         f"available: {', '.join(available)}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.gin_file:
        raise app.UsageError("Pass at least one --gin_file (e.g. --gin_file=tiny.gin).")
    # SavedModel export logs every renamed input at INFO; keep the console readable.
    logging.set_verbosity(logging.WARNING)
    import gin

    from keras_progdist import distribute, pipeline

    files = [resolve_gin_file(f) for f in FLAGS.gin_file]
    name = FLAGS.experiment or os.path.splitext(os.path.basename(files[0]))[0]
    workdir = FLAGS.workdir or os.path.join(ROOT, "runs", name)
    try:
        gin.parse_config_files_and_bindings(files, FLAGS.gin_param)
    except (ValueError, KeyError, ImportError, SyntaxError) as e:
        raise app.UsageError(f"Bad gin configuration ({', '.join(files)}"
                             f"{'; ' + '; '.join(FLAGS.gin_param) if FLAGS.gin_param else ''}"
                             f"): {e}") from None
    try:
        strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.tpu)
    except distribute.StrategyError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.verbose not in (0, 1, 2):
        raise app.UsageError(f"--verbose must be 0, 1 or 2, got {FLAGS.verbose}.")
    try:
        pipeline.run(workdir, FLAGS.mode, strategy=strategy, export_dir=FLAGS.export_dir,
                     overwrite=FLAGS.overwrite, experiment_name=name,
                     verbose=FLAGS.verbose, time_budget_s=FLAGS.time_budget_s)
    except Exception as e:  # noqa: BLE001  (re-raised below unless it is ours)
        if not _is_library_error(e):
            raise
        # A problem with the settings, the data or the workdir: the message says what
        # to do, so print it alone (no traceback, no flag help) and exit non-zero.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _is_library_error(error: Exception) -> bool:
    """Errors this library raises on purpose (bad settings, data, files), as opposed to
    bugs, which keep their traceback."""
    return (type(error).__module__.startswith("keras_progdist.")
            and isinstance(error, (ValueError, FileNotFoundError, FileExistsError,
                                   RuntimeError, OSError)))


if __name__ == "__main__":
    app.run(main)

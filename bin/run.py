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
sys.path.insert(0, os.path.join(ROOT, "bin"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import preflight  # noqa: E402  (standard library only: checks before the heavy imports)

# keras_progdist.training.config.MODES and keras_progdist.distribute.STRATEGIES, spelled
# out so that the flags parse without importing Keras (checked against them below).
MODES = ("train_teacher", "distill", "sample", "export", "eval", "all")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "data_parallel")
GIN_DIR = os.path.join(ROOT, "gin")

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


class CommandLineError(Exception):
    """A bad flag value found before any work; printed as one `error:` line."""


def main(argv):
    try:
        _main(argv)
    except (preflight.PreflightError, CommandLineError) as e:
        _fail(e)
    except Exception as e:  # noqa: BLE001  (re-raised below unless it is ours)
        if not _is_library_error(e):
            raise
        # A problem with the settings, the data or the workdir: the message says what
        # to do, so print it alone (no traceback, no flag help) and exit non-zero.
        _fail(e)


def _main(argv):
    if len(argv) > 1:
        raise CommandLineError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.gin_file:
        raise CommandLineError("Pass at least one --gin_file (e.g. --gin_file=tiny.gin).")
    if FLAGS.verbose not in (0, 1, 2):
        raise CommandLineError(f"--verbose must be 0, 1 or 2, got {FLAGS.verbose}.")
    # Everything that needs no Keras first: a refusal here takes a fraction of a second
    # and creates nothing.
    files = [preflight.resolve_gin_file(f, GIN_DIR) for f in FLAGS.gin_file]
    include_folders = preflight.include_folders(files, GIN_DIR)
    preflight.check_bindings(FLAGS.gin_param)
    name = FLAGS.experiment or os.path.splitext(os.path.basename(files[0]))[0]
    workdir = FLAGS.workdir or os.path.join(ROOT, "runs", name)
    # The early lock probe only where this is surely the run's one process: in a
    # multi-process run (a tf.distribute cluster, JAX initialized by its launcher) the
    # other processes share the folder that the chief locks.
    single_process = (FLAGS.strategy == "default" and "TF_CONFIG" not in os.environ
                      and "jax" not in sys.modules)
    preflight.check_workdir(workdir, FLAGS.mode, probe_lock=single_process)
    preflight.check_export_dir(FLAGS.export_dir, FLAGS.mode)

    # SavedModel export logs every renamed input at INFO; keep the console readable.
    logging.set_verbosity(logging.WARNING)
    import gin
    from keras_progdist import distribute, training
    from keras_progdist.errors import Interrupted
    from keras_progdist.training import config

    assert tuple(config.MODES) == MODES and tuple(distribute.STRATEGIES) == STRATEGIES, \
        "bin/run.py's MODES/STRATEGIES differ from the library's"
    for folder in include_folders:  # includes next to their file, then in gin/
        gin.add_config_file_search_path(folder)
    try:
        config.parse_gin(files, FLAGS.gin_param)
    except (ValueError, KeyError, ImportError, SyntaxError, OSError, RecursionError) as e:
        message = _one_line(e)
        raise CommandLineError(f"Bad gin configuration ({', '.join(files)}"
                               f"{'; ' + '; '.join(FLAGS.gin_param) if FLAGS.gin_param else ''}"
                               f"): {message}{config.binding_hint(str(e))}") from None
    try:
        strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.tpu)
    except distribute.StrategyError as e:
        raise CommandLineError(str(e)) from None
    try:
        training.run(workdir, FLAGS.mode, strategy=strategy, export_dir=FLAGS.export_dir,
                     overwrite=FLAGS.overwrite, experiment_name=name,
                     verbose=FLAGS.verbose, time_budget_s=FLAGS.time_budget_s)
    except Interrupted as e:
        # SIGTERM, Ctrl-C or the time budget: the work done is kept. Say where it
        # stopped, and exit 143 (the same command goes on).
        print(e, flush=True)
        sys.exit(e.code)


def _one_line(error: Exception) -> str:
    """The error's message on one line: gin's added context ("In call to configurable
    ...", "In bindings string line 1") joined on, its object addresses left out."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("In call to configurable")]
    return " ".join(lines) or type(error).__name__


def _fail(error: Exception):
    print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(1)


def _is_library_error(error: Exception) -> bool:
    """Errors this library raises on purpose (bad settings, data, files), as opposed to
    bugs, which keep their traceback: a `KerasProgdistError`, or one of the older
    error classes not yet derived from it (defined in a `keras_progdist` module)."""
    from keras_progdist.errors import KerasProgdistError

    if isinstance(error, KerasProgdistError):
        return True
    return (type(error).__module__.startswith("keras_progdist.")
            and isinstance(error, (ValueError, FileNotFoundError, FileExistsError,
                                   RuntimeError, OSError)))


if __name__ == "__main__":
    app.run(main)

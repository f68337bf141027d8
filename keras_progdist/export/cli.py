"""`python -m keras_progdist.export`: exports a work directory from the command line
(also the TensorFlow child of `subprocess_export`)."""

from __future__ import annotations

import argparse
import json
import sys

import keras

from keras_progdist.export.errors import ExportError, ExportExistsError
from keras_progdist.export.settings import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_STEPS,
    DEFAULT_VERSION,
    SERVING_ROOT,
    ExportOptions,
)
from keras_progdist.export.subprocess_export import ERROR_EXIT_CODE, EXISTS_EXIT_CODE, RESULT_PREFIX
from keras_progdist.export.workdir_export import export_workdir


def main(argv=None) -> int:
    """`python -m keras_progdist.export`: exports a work directory; returns the exit code
    (0, 2 wrong backend, 3 ExportExistsError, 4 ExportError)."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_progdist.export",
        description="Exports a keras-progdist work directory for TF Serving and Keras.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--name", default=None, help="default: the workdir's name")
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION,
                        help="default: the current version if up to date, else the next")
    parser.add_argument("--serving_root", default=SERVING_ROOT,
                        help="where the server sees export_dir (models.config base_path)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help=f"most steps generate accepts (default max({DEFAULT_MAX_STEPS}"
                             ", 4 x the stage's steps))")
    parser.add_argument("--max_batch", type=int, default=None,
                        help=f"most images per request (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        print("Set KERAS_BACKEND=tensorflow to export.", file=sys.stderr)
        return 2
    try:
        options = ExportOptions(overwrite=args.overwrite, version=args.version,
                                serving_root=args.serving_root, max_steps=args.max_steps,
                                max_batch=args.max_batch)
        result = export_workdir(args.workdir, args.export_dir, args.name, options=options)
    except ExportExistsError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXISTS_EXIT_CODE
    except ExportError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return ERROR_EXIT_CODE
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0

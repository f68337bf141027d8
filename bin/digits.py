#!/usr/bin/env python
"""Digit-classifier scores of a finished work directory: do the samples read as digits?

    python bin/digits.py --gin_file=tiny.gin --workdir=runs/tiny

Scores the teacher, the `--steps`-step student and `--steps`-step undistilled DDIM with
a small MNIST classifier (`keras_progdist.evaluation.digits`), writes the work
directory's `eval/digits.json` and `eval/digits.md` and prints the table. The gin files
give the dataset settings (a bare --gin_file name is looked up in the repository's gin/
folder); the models come from the work directory. Re-running with nothing new reads the
scores back.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIN_DIR = os.path.join(ROOT, "gin")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=256)
    args = parser.parse_args(argv)
    # Imported after parsing: a bad flag or `--help` answers without loading Keras.
    from keras_progdist.evaluation import digits
    from keras_progdist.training import config

    files = [f if os.path.exists(f) else os.path.join(GIN_DIR, f) for f in args.gin_file]
    config.parse_gin(files, args.gin_param)
    record = digits.evaluate_workdir(args.workdir, config.dataset_settings(),
                                     steps=args.steps, num_samples=args.num_samples)
    print(digits.markdown(record), flush=True)


if __name__ == "__main__":
    main()

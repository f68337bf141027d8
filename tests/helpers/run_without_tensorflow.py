"""`python run_without_tensorflow.py ARGS...` runs `bin/run.py ARGS...` in a process where
TensorFlow cannot be imported, as on a JAX host without it (the GPU benchmark machine)."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import no_tensorflow  # noqa: E402,F401  (must come before anything imports keras)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(ROOT, "bin", "run.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")

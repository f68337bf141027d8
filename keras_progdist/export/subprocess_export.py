"""The JAX path: a run trained on another backend is exported by a TensorFlow
subprocess that runs this very package's CLI (`cli.main`).

The checkpoints are backend-neutral npz files, so the child rebuilds every stage from
the work directory. It must import the same `keras_progdist` as the parent (a JAX run
exported by another checkout or an installed release would silently write other
graphs), so the package's parent folder goes first on the child's `sys.path` and in
`PYTHONPATH`. The child's exit code names its error (`EXISTS_EXIT_CODE`,
`ERROR_EXIT_CODE`) and its last `RESULT_PREFIX` line holds the result as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras

from keras_progdist.export.errors import ExportError, ExportExistsError

EXISTS_EXIT_CODE = 3
ERROR_EXIT_CODE = 4
RESULT_PREFIX = "[export-result] "
# Imports the package from the folder given first, ahead of the working directory
# (`python -m` would put the cwd first) and of any installed copy.
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from keras_progdist.export import main; sys.exit(main())")


def package_parent() -> str:
    """The folder holding the running `keras_progdist` package."""
    import keras_progdist

    return os.path.dirname(os.path.dirname(os.path.abspath(keras_progdist.__file__)))


def _subprocess_command(workdir, export_dir, name, options) -> tuple:
    """`(command, env)` of the TensorFlow export subprocess.

    The child must run this very code (a JAX run exported by another checkout or an
    installed release would silently write other graphs), so the running package's
    parent goes first both on the child's `sys.path` and in `PYTHONPATH` (which its
    own children inherit).
    """
    parent = package_parent()
    command = [sys.executable, "-c", _BOOTSTRAP, parent,
               "--workdir", os.path.abspath(workdir),
               "--export_dir", os.path.abspath(export_dir), "--name", name,
               *options.flags()]
    pythonpath = [parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                             if p and p != parent]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join(pythonpath)}
    return command, env


def export_in_subprocess(workdir: str, export_dir: str, name: str, options) -> dict:
    """Exports `workdir` with `options` (`settings.ExportOptions`) in a TensorFlow
    child process; returns its `export_stages` result.

    Raises:
        ExportExistsError, ExportError: the child's, with its message.
    """
    command, env = _subprocess_command(workdir, export_dir, name, options)
    shown = " ".join(command[:2] + ["'<bootstrap>'"] + command[3:])
    print(f"[export] backend {keras.backend.backend()}: exporting through TensorFlow "
          f"in a subprocess: {shown}", flush=True)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.splitlines()
    for line in lines:
        if not line.startswith(RESULT_PREFIX):
            print(line, flush=True)
    last = (result.stderr.strip().splitlines() or [""])[-1]
    for prefix in ("ExportExistsError: ", "ExportError: "):
        last = last[len(prefix):] if last.startswith(prefix) else last
    if result.returncode == EXISTS_EXIT_CODE:
        raise ExportExistsError(last)
    if result.returncode == ERROR_EXIT_CODE:
        raise ExportError(last)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise ExportError(f"The TensorFlow export subprocess failed (exit "
                          f"{result.returncode}): {shown}\n{tail}")
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ExportError(f"The export subprocess printed no result: {shown}")

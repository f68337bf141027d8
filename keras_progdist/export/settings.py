"""The checked settings of an export: its name, the stages' model names, the version
asked for, the serving limits fixed in the graph, and `ExportOptions`, what one export
applies to every stage. No TensorFlow."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from keras_progdist.export.errors import ExportError
from keras_progdist.workdir import GUIDANCE

# None: automatic versioning (the current version if it holds these weights, else the next).
DEFAULT_VERSION = None
DEFAULT_MAX_BATCH = 256
# The default max_steps of a stage is max(DEFAULT_MAX_STEPS, 4 * its own step count).
DEFAULT_MAX_STEPS = 1024
# The cost of a request is `steps * (batch + STEP_OVERHEAD_IMAGES)`: a DDIM step costs
# a fixed overhead plus a share per image, and on a CPU the overhead is worth 15 to 22
# images (benchmarks/serving_worst_case.py, tiny.gin's teacher net on 2 cores: 20-30 ms
# a step plus 1.1-1.9 ms a step and image). With max_steps and max_batch at their
# defaults a request may cost at most DEFAULT_MAX_COST, which keeps every request the
# defaults allow under 30 s there: the measured worst case is 21.5 s
# (serving_default, 128 steps x 48 images, on 2 cores at load average 14;
# benchmarks/results/serving_worst_case.json), against 376 s for generate(steps=1024,
# batch=256) under the old defaults. A larger network costs more per step in
# proportion: give its export max_cost (or max_steps and max_batch) to set its bound.
STEP_OVERHEAD_IMAGES = 16
DEFAULT_MAX_COST = 8_192
_INT32_MAX = 2 ** 31 - 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Where TF Serving sees the export folder inside its container (`models.config`).
SERVING_ROOT = "/models"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What one export applies to every stage it writes.

    Attributes:
        overwrite: replace the current (or given) version even when it holds these or
            other weights.
        version: None (automatic: the current version if it holds these weights, else
            the next number) or a version number.
        serving_root: where the server sees the export folder (`models.config`).
        max_steps, max_batch: the serving limits (`serving_limits`; None: defaults).
        warmup_batch_sizes: one warm-up request per size.
    """

    overwrite: bool = False
    version: int | None = DEFAULT_VERSION
    serving_root: str = SERVING_ROOT
    max_steps: int | None = None
    max_batch: int | None = None
    warmup_batch_sizes: tuple = (1,)

    def flags(self) -> list:
        """The options as `python -m keras_progdist.export` flags (the subprocess's)."""
        flags = ["--serving_root", self.serving_root]
        flags += [] if self.version is None else ["--version", str(self.version)]
        flags += [] if self.max_steps is None else ["--max_steps", str(self.max_steps)]
        flags += [] if self.max_batch is None else ["--max_batch", str(self.max_batch)]
        return flags + (["--overwrite"] if self.overwrite else [])


def model_name(name: str, num_steps: int, stage: str | None = None) -> str:
    """TF Serving model name of a stage: `<name>-<N>steps`.

    Guided distillation's stage one (the `guidance` stage) samples in as many steps as
    its teacher, so it gets a name of its own, `<name>-guidance-<N>steps`: under the
    teacher's name it would become the teacher's next version.

    Args:
        name: the export name; num_steps: the stage's step count.
        stage: the work-directory stage the model comes from (`teacher`, `guidance`,
            `student_<N>`), or None; only `guidance` changes the name.
    """
    role = f"{GUIDANCE}-" if stage == GUIDANCE else ""
    return f"{name}-{role}{num_steps}steps"


def check_name(name: str) -> str:
    """Returns `name` if it can name an export, else raises `ExportError`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ExportError(f"Export name {name!r} must be letters, digits, '_', '.' or '-' "
                          "(it becomes a folder, a TF Serving model name and a URL part).")
    return name


def default_name(workdir: str) -> str:
    """The export name of a work directory when none is given: its folder's name."""
    return os.path.basename(os.path.normpath(workdir))


def check_version(version) -> int | None:
    """`version` as an int (a TF Serving version folder), or None for automatic."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving's numeric "
                          f"version folder) or None (the next one), got {version!r}.")
    return int(version)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= _INT32_MAX:
        raise ExportError(f"{name} must be an integer in [1, {_INT32_MAX}] (an int32 "
                          f"limit of the serving graph), got {value!r}.")
    return int(value)


def request_cost(steps: int, batch: int) -> int:
    """The cost of one request of `steps` DDIM steps on `batch` images:
    `steps * (batch + STEP_OVERHEAD_IMAGES)` (see `DEFAULT_MAX_COST`)."""
    return int(steps) * (int(batch) + STEP_OVERHEAD_IMAGES)


def serving_limits(num_steps: int, max_steps: int | None = None,
                   max_batch: int | None = None, warmup_batch_sizes=(1,),
                   max_cost: int | None = None) -> dict:
    """The request limits a stage is exported with:
    `{"max_steps", "max_batch", "max_cost"}`.

    Args:
        num_steps: the stage's own step count (what `serving_default` runs).
        max_steps: the most DDIM steps `generate` accepts; default
            `max(DEFAULT_MAX_STEPS, 4 * num_steps)`.
        max_batch: the most images one request of any signature may ask for; default
            `DEFAULT_MAX_BATCH`.
        warmup_batch_sizes: the warm-up request sizes, which must be allowed.
        max_cost: the most `request_cost(steps, batch)` one `generate` or
            `serving_default` request may have. Default: with `max_steps` and
            `max_batch` both at their defaults, `DEFAULT_MAX_COST` (or, for a stage
            whose own warm-up request costs more, that cost), which bounds the
            default worst case; with either given, the cost of `max_steps` steps on
            `max_batch` images (no bound beyond the two given).

    Returns:
        `{"max_steps": int, "max_batch": int, "max_cost": int}`.

    Raises:
        ExportError: a limit that is not a positive int32 (`max_cost` up to 2**62),
            `max_steps < num_steps` (`serving_default` could never run), a warm-up
            batch above `max_batch`, or a warm-up request costing more than
            `max_cost`.
    """
    num_steps = int(num_steps)
    explicit = max_steps is not None or max_batch is not None
    max_steps = (max(DEFAULT_MAX_STEPS, 4 * num_steps) if max_steps is None
                 else _positive_int("max_steps", max_steps))
    max_batch = (DEFAULT_MAX_BATCH if max_batch is None
                 else _positive_int("max_batch", max_batch))
    if max_steps < num_steps:
        raise ExportError(f"max_steps={max_steps} is below the stage's own {num_steps} "
                          "steps, so its serving_default could never run.")
    too_big = [b for b in warmup_batch_sizes if not 1 <= int(b) <= max_batch]
    if too_big:
        raise ExportError(f"Warm-up batch sizes {too_big} are outside [1, max_batch="
                          f"{max_batch}]: the server would refuse its own warm-up.")
    warmup_cost = request_cost(num_steps, max([int(b) for b in warmup_batch_sizes] or [1]))
    if max_cost is None:
        max_cost = (request_cost(max_steps, max_batch) if explicit
                    else max(DEFAULT_MAX_COST, warmup_cost))
    elif (isinstance(max_cost, bool) or not isinstance(max_cost, (int, np.integer))
          or not 1 <= max_cost <= 2 ** 62):
        raise ExportError(f"max_cost must be an integer in [1, 2**62] (steps x (images + "
                          f"{STEP_OVERHEAD_IMAGES}) of one request), got {max_cost!r}.")
    max_cost = int(max_cost)
    if warmup_cost > max_cost:
        raise ExportError(f"max_cost={max_cost} is below the cost {warmup_cost} of the "
                          f"warm-up request (the stage's {num_steps} steps): the server "
                          "would refuse its own warm-up.")
    return {"max_steps": max_steps, "max_batch": max_batch, "max_cost": max_cost}

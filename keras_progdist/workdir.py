"""`WorkDir`: the one owner of a run's work directory.

Layout (every file written atomically, see `fileio`):

    <root>/.lock                      held (flock) by the run that writes here
    <root>/config.json                network/diffusion/schedule config (checked on resume)
    <root>/operative_config.gin       the gin config as last run
    <root>/teacher/ckpt|final         in-progress and finished teacher
    <root>/guidance/ckpt|final        guided distillation's stage one (w-conditioned)
    <root>/student_<NNNNN>/ckpt|final the same for the stage to N steps
    <root>/stages.json                a JSON list, one entry per finished stage
    <root>/samples/*.png              sample grids, all stages from the same noise
    <root>/eval/                      evaluation (an `EvalDir`, below)
    <root>/logs/<name>/               TensorBoard: one per stage, `samples`, `eval`

    <eval>/metrics.json, report.md    the evaluation's scores and its report
    <eval>/<plot>.png                 score against steps; `distilled_vs_ddim.png`
    <eval>/<model>.png                each scored model's sample grid
    <eval>/runs/<model>.json|.npz     each model's scores (cached) and 512-sample probe
    <eval>/samples/                   sample files (`--mode=sample`)
    <eval>/digits.json, digits.md     the digit-classifier probe

Every path in a work directory is made here: the other modules ask `WorkDir` (or
`EvalDir`) for an artefact by what it is, never join a name onto the folder. Stage
names are made and parsed here only: `stage_name(N)` and `parse_stage(name)` (and the
constants `TEACHER`, `GUIDANCE`). A finished stage is loaded back, without gin, by
`stage_model` / `stage_models` (evaluation and export read a run through these).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from keras_progdist import checkpoint, fileio, locking
from keras_progdist.errors import KerasProgdistError

TEACHER = "teacher"
_SUMMARY_KEYS = ("stage", "num_steps", "updates", "loss", "seconds")
GUIDANCE = "guidance"  # guided distillation's stage one: the w-conditioned network
_STUDENT = re.compile(r"^student_(\d{5})$")
# A stage's two checkpoints: where training resumes, and the finished network.
_RESUME, _FINAL = "ckpt", "final"
_CONFIG, _OPERATIVE_CONFIG, _STAGES = "config.json", "operative_config.gin", "stages.json"

# Settings added after work directories were first recorded, with the value a record
# without them means: a record is compared with these filled in.
RECORD_DEFAULTS = {"diffusion": {"label_dropout": 0.0}}


class WorkDirError(KerasProgdistError, ValueError):
    """A work directory that is missing, busy, or holds damaged records."""


class WorkDirBusyError(WorkDirError):
    """Another live process holds the work directory's lock."""


def stage_name(num_steps: int | None = None) -> str:
    """`teacher` (no step count) or `student_<N:05d>` for the stage to `N` steps."""
    return TEACHER if num_steps is None else f"student_{int(num_steps):05d}"


def parse_stage(name: str) -> int | None:
    """The step count of a `student_<N>` stage name; None for the teacher and the
    guidance stage.

    Raises:
        WorkDirError: a name that is none of these.
    """
    if name in (TEACHER, GUIDANCE):
        return None
    match = _STUDENT.match(name)
    if not match:
        raise WorkDirError(f"{name!r} is not a stage name (teacher, guidance or "
                           "student_NNNNN).")
    return int(match.group(1))


class WorkDir:
    """Paths, stages, the config record and the lock of one work directory.

    Args:
        root: the folder (created only by `create()` or `lock()`, never on reads).
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def _path(self, *parts) -> str:
        return os.path.join(self.root, *parts)



    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def require(self) -> None:
        """Raises `WorkDirError` if the folder does not exist (reads never create it)."""
        if not self.exists():
            raise WorkDirError(f"Work directory {self.root} does not exist: nothing has "
                               "been trained there (check --workdir).")

    # -- stages --------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        parse_stage(stage)
        return self._path(stage)

    def resume_checkpoint(self, stage: str) -> checkpoint.Slot:
        """Where `stage`'s training saves and resumes (weights, optimizer, RNG, step)."""
        return checkpoint.Slot(self.stage_dir(stage), _RESUME)

    def final_checkpoint(self, stage: str) -> checkpoint.Slot:
        """`stage`'s finished network: its existence marks the stage finished."""
        return checkpoint.Slot(self.stage_dir(stage), _FINAL)

    def is_finished(self, stage: str) -> bool:
        return self.final_checkpoint(stage).exists()

    def finished_students(self) -> list:
        """Step counts of the finished students, largest first."""
        if not self.exists():
            return []
        steps = []
        for entry in os.listdir(self.root):
            try:
                n = parse_stage(entry)
            except WorkDirError:
                continue
            if n is not None and self.is_finished(entry):
                steps.append(n)
        return sorted(steps, reverse=True)

    def final_meta(self, stage: str) -> dict:
        return self.final_checkpoint(stage).read_meta()

    def stage_steps(self, stage: str) -> int:
        """The sampling step count a finished stage was trained for, from its `final`
        checkpoint (the record every other summary, e.g. stages.json, derives from).

        Raises:
            WorkDirError: the record has no step count (damaged or not this library's).
        """
        meta = self.final_meta(stage)
        if "num_steps" not in meta:
            raise WorkDirError(f"{self.final_checkpoint(stage)} records no num_steps: it "
                               "is damaged or was not written by this library.")
        return int(meta["num_steps"])

    def stage_network_config(self, stage: str, config: dict) -> dict:
        """The UNet config a finished stage's weights were saved with.

        The teacher has the run's `network`; every other stage (students, a guided
        run's stage one) has `student_network` where the record has one (a guided run's
        w-conditioned network), else `network`. Students may also train with another
        dropout rate (`distill.student_dropout`), and a Dropout layer with a nonzero
        rate carries a seed variable, so the rate is part of the weights' layout: it is
        recorded in the stage's `final` checkpoint and read back here (records without
        it used the run's rate).

        Args:
            stage: `teacher`, `guidance` or `student_<N>`.
            config: the run's config record (`config.json`).
        Returns:
            The network config with the stage's `dropout`.
        """
        network = config["network"] if stage == TEACHER else \
            config.get("student_network", config["network"])
        meta = self.final_meta(stage)
        return {**network, "dropout": meta.get("dropout", network["dropout"])}

    def final_sha256(self, stage: str) -> str:
        """The finished stage's weights sha256 as recorded (an identity, not a check)."""
        return self.final_checkpoint(stage).recorded_sha256()

    def finished_stages(self, stages=None) -> list:
        """One summary per finished stage (`stage`, `num_steps`, `updates`, `loss`,
        `seconds`), read from the `final` checkpoints themselves (so a kill between two
        writes cannot lose a stage; `stages.json` is derived from this).

        Args:
            stages: the stage names to report, in this order (unfinished ones are left
                out); default the teacher, then every finished student, most steps first.
        """
        if stages is None:
            stages = [TEACHER] + [stage_name(n) for n in self.finished_students()]
        return [{k: meta[k] for k in _SUMMARY_KEYS}
                for meta in (self.final_meta(s) for s in stages if self.is_finished(s))]

    # -- finished models -----------------------------------------------------------
    def stage_model(self, stage: str, config: dict | None = None):
        """A finished stage as the EMA-free `DiffusionModel` that samples in its step
        count (`sampling_model.sampling_model`), rebuilt without gin from `config.json`
        and the stage's `final` checkpoint. Only reads the work directory.

        Args:
            stage: `teacher` or `student_<N>`.
            config: the config record, if already read (`require_config()`).

        Raises:
            WorkDirError: no config record, or the stage has not finished.
            checkpoint.CheckpointError: a damaged `final` checkpoint.
        """
        # Imported here: reading records and locking need no Keras.
        from keras_progdist.networks.unet import UNet
        from keras_progdist.sampling_model import sampling_model
        from keras_progdist.schedules import get_schedule

        config = self.require_config() if config is None else config
        if not self.is_finished(stage):
            raise WorkDirError(f"Stage {stage!r} has not finished in {self.root} "
                               f"({self.final_checkpoint(stage)} is missing).")
        steps = parse_stage(stage)
        steps = self.stage_steps(stage) if steps is None else steps
        network = UNet.from_config({**self.stage_network_config(stage, config),
                                    "name": "network"})
        self.final_checkpoint(stage).restore(network)
        diffusion = config["diffusion"]
        return sampling_model(network, steps, get_schedule(config["schedule"]),
                              diffusion["parameterization"], diffusion["weighting"])

    def stage_models(self, with_guidance: bool = False) -> list:
        """`[(stage, num_steps, DiffusionModel)]`: the teacher, then every finished
        student, most steps first (see `stage_model`).

        Args:
            with_guidance: also a guided run's finished stage one (`guidance`), right
                after the teacher. Export wants it (a deployable model of its own);
                the evaluation's ladder of distilled students does not.

        Raises:
            WorkDirError: no config record, or no finished teacher.
        """
        config = self.require_config()
        if not self.is_finished(TEACHER):
            raise WorkDirError(f"No finished teacher in {self.root} "
                               f"({self.final_checkpoint(TEACHER)} is missing): train it "
                               "first.")
        guidance = [GUIDANCE] if with_guidance and self.is_finished(GUIDANCE) else []
        stages = [TEACHER] + guidance + [stage_name(n) for n in self.finished_students()]
        models = [self.stage_model(stage, config) for stage in stages]
        return [(stage, model.num_steps, model) for stage, model in zip(stages, models)]

    # -- config record -------------------------------------------------------------
    def read_config(self) -> dict | None:
        """The recorded run config (`config.json`), or None if there is none.

        Raises:
            WorkDirError: unreadable JSON, or one without the expected sections.
        """
        path = self._path(_CONFIG)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise WorkDirError(f"{path} is unreadable ({e}); restore it or use a new "
                               "--workdir.") from e
        for key in ("network", "diffusion", "schedule"):
            if not isinstance(record, dict) or not isinstance(record.get(key), dict):
                raise WorkDirError(f"{path} has no {key!r} section: it is damaged or not "
                                   "this library's; restore it or use a new --workdir.")
        return record

    def require_config(self) -> dict:
        """The recorded run config; raises `WorkDirError` when there is none."""
        config = self.read_config()
        if config is None:
            raise WorkDirError(f"{self.root} is not a keras-progdist work directory "
                               f"({self._path(_CONFIG)} is missing).")
        return config

    def config_mismatch(self, record: dict) -> str | None:
        """How `record` differs from the recorded config, or None when it matches (or
        nothing is recorded yet).

        A record written before a setting existed means that setting's old default
        (`RECORD_DEFAULTS`); one without `student_network` is from a run whose students
        share the teacher's network.

        Returns:
            `"The <section> config in <path> ... (workdir, gin) = {...}"` for the first
            section that differs.
        """
        existing = self.read_config()
        if existing is None:
            return None
        existing = {**existing, **{key: {**defaults, **existing[key]}
                                   for key, defaults in RECORD_DEFAULTS.items()
                                   if isinstance(existing.get(key), dict)}}
        existing.setdefault("student_network", existing["network"])
        record = {**record, "student_network": record.get("student_network",
                                                          record["network"])}
        for key in ("network", "diffusion", "schedule", "student_network"):
            ours, theirs = _canon(record[key]), _canon(existing[key])
            if ours != theirs:
                diff = {k: (theirs.get(k), ours.get(k)) for k in set(ours) | set(theirs)
                        if theirs.get(k) != ours.get(k)}
                return (f"The {key} config in {self._path(_CONFIG)} (written by the run "
                        f"that trained this workdir) does not match the gin config: "
                        f"(workdir, gin) = {diff}")
        return None

    def record_config(self, record: dict, operative_config: str | None = None) -> None:
        """Writes the config record (first run only: it never changes) and, when given,
        the gin config as run this time."""
        if self.read_config() is None:
            self._write_json(_CONFIG, record)
        if operative_config is not None:
            fileio.atomic_write_text(self._path(_OPERATIVE_CONFIG), operative_config)

    def write_stages(self, summaries: list) -> str:
        """`stages.json`: one summary per finished stage (see `finished_stages`)."""
        return self._write_json(_STAGES, summaries)

    def _write_json(self, name: str, value) -> str:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fileio.atomic_write_json(path, value)
        return path

    # -- grids, logs, evaluation ---------------------------------------------------
    def grid_path(self, stage: str, num_steps: int) -> str:
        """`samples/<stage>.png` (the teacher's: `teacher_<N>steps.png`): the grid
        written when the stage finished."""
        name = f"teacher_{num_steps:05d}steps" if stage == TEACHER else stage
        return self._path("samples", f"{name}.png")

    def log_dir(self, stage: str) -> str:
        """TensorBoard's folder of a stage's training."""
        parse_stage(stage)  # raises on a name that is no stage
        return self._path("logs", stage)

    @property
    def grid_log_dir(self) -> str:
        """TensorBoard's folder of the stages' sample grids."""
        return self._path("logs", "samples")

    @property
    def eval_log_dir(self) -> str:
        """TensorBoard's folder of the evaluation's scores."""
        return self._path("logs", "eval")

    @property
    def eval(self) -> "EvalDir":
        """The evaluation's folder (`eval/`)."""
        return EvalDir(self._path("eval"))

    # -- lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, purpose: str = "run"):
        """Holds the work directory exclusively for the `with` block (`locking.hold` on
        `<root>/.lock`, created with the folder if needed).

        Raises:
            WorkDirBusyError: another process holds it; the message names that process.
            WorkDirError: `.lock` is a symbolic link, not a regular file, has other
                hard links, or cannot be opened.
        """
        os.makedirs(self.root, exist_ok=True)
        try:
            with locking.hold(self._path(".lock"), purpose, "or use another --workdir"):
                yield self
        except locking.Busy as e:
            raise WorkDirBusyError(
                f"Work directory {self.root} is in use by another run ({e.holder}). Wait "
                "for it to end, stop it, or use another --workdir.") from None
        except locking.BadLockFile as e:
            raise WorkDirError(str(e)) from None


def _canon(value):
    return json.loads(json.dumps(value, sort_keys=True))


class EvalDir:
    """The layout of an evaluation's output folder: `<workdir>/eval`, or the folder a
    sample directory is scored into (`evaluation.report.score_sample_dir`).

    Args:
        root: the folder (created by whoever writes the first file into it).
    """

    RUNS = "runs"

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def _path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    @property
    def samples(self) -> str:
        """`samples/`: the sample files `--mode=sample` writes."""
        return self._path("samples")

    @property
    def metrics(self) -> str:
        return self._path("metrics.json")

    @property
    def report(self) -> str:
        return self._path("report.md")

    def image(self, name: str) -> str:
        """`<name>.png`: a plot, a model's grid, the side-by-side grid."""
        return self._path(f"{name}.png")

    def run_record(self, model: str) -> str:
        """`runs/<model>.json`: the model's scores, reused while their key matches."""
        return self._path(self.RUNS, f"{model}.json")

    def run_probe(self, model: str) -> str:
        """`runs/<model>.npz`: the model's first samples, for the comparisons."""
        return self._path(self.RUNS, f"{model}.npz")

    def runs_dir(self) -> str:
        return self._path(self.RUNS)

    def digits(self, ext: str) -> str:
        """`digits.json` or `digits.md`: the digit-classifier probe of `bin/digits.py`."""
        return self._path(f"digits.{ext}")

    @property
    def probe_digits(self) -> str:
        """`runs/digits.json`: the report's digit scores of every model's probe,
        reused while the probes are unchanged."""
        return self._path(self.RUNS, "digits.json")

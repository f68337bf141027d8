"""Stopping and resuming training at an exact step.

`PreemptionGuard` turns SIGTERM, Ctrl-C or a deadline into a flag (agreed by every
process of a multi-process run); `StepCheckpoint` acts on it
after the running `steps_per_execution` chunk (checkpoint at the exact step, stop);
`resumable_fit` runs `fit` from the checkpoint's step with the data stream positioned
at that step (`input_at`), so a resumed stage ends with the weights an uninterrupted
one would have.
"""

from __future__ import annotations

import math
import time

import keras

from keras_progdist import checkpoint, data
from keras_progdist.errors import Interrupted, KerasProgdistError


class TrainingDivergedError(KerasProgdistError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class PreemptionGuard:
    """Turns SIGTERM, Ctrl-C (SIGINT) or passing `deadline` into a stop that the
    checkpoint callback acts on after the running chunk.

    SIGINT is SIGTERM's twin: a person at a terminal presses Ctrl-C to stop, and loses
    nothing (checkpoint at the exact step, exit 143). The first Ctrl-C also restores the
    default SIGINT action, so a second one ends the process at once, even in the middle
    of a compiled chunk (the checkpoints are written atomically, so the last complete
    one survives).

    In a multi-process run every process must stop at the same step, or the others
    wait forever in the next collective for the one that left. `agree` (see
    `cluster.agreement`) makes `requested` an all-process OR: a notice that reached one
    process stops them all at the same chunk boundary.

    Args:
        deadline: a `time.time()` after which training stops (the time budget).
        agree: `flag -> bool`, the OR of `flag` over every process (a collective); None
            for one process (no collective, no cost).
    """

    def __init__(self, deadline: float | None = None, agree=None):
        self.deadline = deadline
        self._agree = agree
        self._signal = None  # the name of the signal that arrived, if any
        self._previous = {}
        self.reason = None  # why the run stopped, once it did (for messages)
        self.agreement_seconds = []  # time of each all-process agreement

    @property
    def local_requested(self) -> bool:
        """Whether this process alone was asked to stop (signal or deadline)."""
        return self._signal is not None or (
            self.deadline is not None and time.time() > self.deadline)

    @property
    def requested(self) -> bool:
        """Whether the run stops now. With `agree`, a collective: every process must
        read it at the same points (each chunk boundary, each stage start)."""
        local = self.local_requested
        if self._agree is None:
            stop = local
        else:
            start = time.perf_counter()
            stop = bool(self._agree(local))
            self.agreement_seconds.append(time.perf_counter() - start)
        if stop and self.reason is None:
            self.reason = (self._signal or "time budget") if local else \
                "another process's stop (SIGTERM, Ctrl-C or time budget)"
        return stop

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
        if signum == signal.SIGINT:
            # A second Ctrl-C should abort at once, not wait for the chunk: the default
            # action ends the process from the kernel, even inside compiled code.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("[preempted] Ctrl-C: stopping after the running chunk with a "
                  "checkpoint; press Ctrl-C again to abort at once.", flush=True)
        if self._signal is None:
            self._signal = name

    def __exit__(self, *exc):
        import signal

        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
        return False


class StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints `model` (+ optimizer, RNG) every `every` steps and on SIGTERM.

    Counts the exact global step (`steps_per_execution` chunks included), refuses to
    save a NaN/inf loss (the last good checkpoint stays), and on preemption saves at
    the current step and stops training.

    Args:
        slot, stage: the stage's resume checkpoint (`WorkDir.resume_checkpoint`), and
            its name for messages.
        model: the model whose variables (and optimizer's) are saved.
        every: checkpoint interval in steps (one Keras "epoch").
        start_step: the step training resumes from.
        guard: SIGTERM / deadline flag, checked after every chunk.
        write: False on a process that is not the chief (it trains, writes nothing).
        total_steps, log_lines: with `log_lines`, one plain line per checkpoint
            (`[stage] step k/total: loss, ms/step`) instead of Keras' "Epoch i/n".
        seconds_before: the stage's training time in earlier processes (what its
            resume checkpoint recorded); every checkpoint records it plus this
            process's time, so a stage resumed over several pieces keeps its total.
    """

    def __init__(self, slot: checkpoint.Slot, model, every: int, stage: str, start_step: int,
                 guard: PreemptionGuard | None = None, write: bool = True,
                 total_steps: int | None = None, log_lines: bool = False,
                 seconds_before: float = 0.0):
        super().__init__()
        self.seconds_before = seconds_before
        self._began = time.time()
        self.write = write
        self.total_steps = total_steps
        self.log_lines = log_lines
        self._chunk_start = (start_step, time.time())
        self.slot = slot
        self.target = model
        self.every = every
        self.stage = stage
        self.step = start_step
        self.guard = guard
        self.preempted = False
        self._epoch_start = start_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def _save(self, logs):
        loss = float((logs or {}).get("loss", float("nan")))
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"{self.stage}: the loss became {loss} by step {self.step}; the last "
                f"good checkpoint {self.slot} is kept. Lower the learning rate "
                "or check the data.")
        if self.write:
            self.slot.save(self.target, meta={"step": self.step, "loss": loss,
                                              "seconds": self.seconds()})
        if self.log_lines:
            first, since = self._chunk_start
            per_step = (time.time() - since) / max(1, self.step - first)
            print(f"[{self.stage}] step {self.step}/{self.total_steps}: loss {loss:.5f}, "
                  f"{per_step * 1000:.0f} ms/step" + (", checkpoint saved" if self.write
                                                      else ""), flush=True)
            self._chunk_start = (self.step, time.time())

    def seconds(self) -> float:
        """The stage's training time so far, earlier processes included."""
        return self.seconds_before + time.time() - self._began

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + int(batch) + 1
        # `guard.requested` first: in a multi-process run it is a collective that every
        # process must reach at every chunk boundary.
        if self.guard is not None and self.guard.requested and not self.preempted:
            self._save(logs)
            self.preempted = True
            self.target.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not self.preempted:
            self._save(logs)


def input_at(dataset, step: int):
    """The stage's training input from its batch `step` on.

    Batch `k` of a stage is the same whether the stage ran in one piece or was stopped
    and resumed (a new process, a new `fit`), so a resumed stage reproduces the
    uninterrupted one. A numpy stream is a pure function of its seed and is advanced
    by arithmetic; a tf.data pipeline (seeded) skips `step` batches.
    """
    if isinstance(dataset, data.ArrayBatches):
        return dataset.stream(start_batch=step)
    return dataset.skip(step) if step else dataset


def resumable_fit(model, dataset, total_steps: int, every: int, done: int, callbacks,
                  checkpointer: StepCheckpoint, verbose: int):
    """`model.fit` from step `done` to `total_steps` in epochs of `every` steps.

    A run preempted mid-epoch first finishes that epoch's remainder, so checkpoints
    stay on multiples of `every` afterwards. Each `fit` reads `input_at(dataset,
    step)`: Keras may read ahead of the steps it runs, so a stream is never shared.
    """
    history = None
    # verbose=2: the checkpoint callback prints one plain line per checkpoint instead
    # of Keras' "Epoch i/n" (an epoch here is a checkpoint interval, not a data pass).
    verbose = 0 if verbose == 2 else verbose
    remainder = (every - done % every) % every
    if remainder and done < total_steps:
        history = model.fit(input_at(dataset, done), epochs=1, steps_per_epoch=remainder,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
        done += remainder
    if done < total_steps and not checkpointer.preempted:
        # Epoch numbering keeps `done // every` epochs behind it, so the input starts
        # at the first batch of epoch `done // every`, which is `done`.
        history = model.fit(input_at(dataset, done), epochs=total_steps // every,
                            steps_per_epoch=every, initial_epoch=done // every,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
    if checkpointer.preempted:
        reason = getattr(checkpointer.guard, "reason", None) or "SIGTERM or time budget"
        raise Interrupted(f"[preempted] {checkpointer.stage}: {reason}; checkpoint saved "
                        f"at step {checkpointer.step}. Re-run the same command to "
                        "resume.")
    return history


def seconds_before(meta: dict) -> float:
    """The training time a resume checkpoint's metadata recorded (0 for one written
    before checkpoints recorded it, or with a value that is not a time)."""
    value = meta.get("seconds", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def last_loss(history, slot: checkpoint.Slot) -> float:
    """The stage's last loss: from `history`, else (a stage resumed at its last step)
    the one its resume checkpoint `slot` recorded."""
    losses = (history.history.get("loss") or []) if history is not None else []
    if losses:
        return float(losses[-1])
    return float(slot.read_meta().get("loss", float("nan")))

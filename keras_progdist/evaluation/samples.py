"""`--mode=sample`: the evaluation's samples as files. Generate once (e.g. on a lent
GPU), score anywhere.

`write_workdir_samples` writes, for the teacher at its full step count, undistilled
DDIM of the teacher at the evaluation settings' `ddim_steps` (and `teacher_steps`) and
every finished stage of a `WorkDir` (`inputs.evaluation_runs`), the samples the
in-process evaluation would draw (same noise, same batches, same labels:
`generate_range`), in the format of `sample_files`, by default into the work
directory's `EvalDir.samples`, where `--mode=eval` looks. No file is above
`max_file_mb`. Chunks are written atomically, each followed by a manifest update, so a
run killed at any point goes on at the first missing chunk.

Only Keras and numpy are needed here: this runs on the JAX GPU host, where TensorFlow
is not installed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from keras_progdist import fileio, images
from keras_progdist.errors import Interrupted
from keras_progdist.evaluation import inputs, sample_files
from keras_progdist.settings import DEFAULT_MAX_FILE_MB, EvaluateSettings

# Zip entries, .npy headers and the central directory of a two-array npz take a few
# hundred bytes; 64 KiB leaves room so that the limit holds for any array size.
_NPZ_OVERHEAD_BYTES = 64 * 1024


def samples_per_file(image_shape, max_file_mb: float, labelled: bool = False) -> int:
    """How many samples fit in one file of at most `max_file_mb` MiB.

    Args:
        image_shape: (H, W, C) of one sample (stored as uint8).
        max_file_mb: the size limit in MiB (2**20 bytes).
        labelled: whether an int32 label per sample is stored too.

    Returns:
        A positive count.

    Raises:
        ValueError: not even one sample fits.
    """
    per_sample = int(np.prod(image_shape)) + (4 if labelled else 0)
    budget = int(float(max_file_mb) * 2 ** 20) - _NPZ_OVERHEAD_BYTES
    count = budget // per_sample
    if count < 1:
        raise ValueError(f"max_file_mb={max_file_mb} is too small for one sample of "
                         f"{per_sample} bytes (plus {_NPZ_OVERHEAD_BYTES} bytes of npz "
                         "overhead).")
    return int(count)


def labels_for(start: int, stop: int, num_classes) -> np.ndarray | None:
    """The evaluation's class labels of samples [start, stop): `index % num_classes`."""
    if not num_classes:
        return None
    return (np.arange(start, stop) % num_classes).astype("int32")


def generate_range(model, num_steps: int, start: int, stop: int, num_samples: int,
                   batch_size: int, seed: int, num_classes=None,
                   guidance=None) -> np.ndarray:
    """Samples [start, stop) of the evaluation's fixed noise, floats in [-1, 1].

    Sample `i` lies in batch `b = i // batch_size`, whose noise is
    `keras.random.normal((count_b,) + image_shape, seed=seed + b * batch_size)` with
    `count_b = min(batch_size, num_samples - b * batch_size)`. Whole batches are
    generated (a counter-based generator's first rows of a smaller draw need not be
    the rows of the full draw), then cut to the range, so any range of any run gives
    the samples a single in-process pass over all `num_samples` gives.

    Args:
        model: a `DiffusionModel`.
        num_steps: DDIM steps.
        start, stop: the sample range, 0 <= start < stop <= num_samples.
        num_samples: the run's total (it sets the size of the last batch).
        batch_size: the noise batch size.
        seed: the first batch's seed.
        num_classes: labels are `index % num_classes` for a class-conditional model.
        guidance: the guidance strength `w` of every sample (see
            `DiffusionModel.sample`); None for an unguided model. The noise and labels
            do not depend on it, so the samples of two strengths differ only by `w`.

    Returns:
        float32 `[stop - start, H, W, C]`.
    """
    import keras

    if not 0 <= start < stop <= num_samples:
        raise ValueError(f"bad sample range [{start}, {stop}) of {num_samples}")
    out = []
    first = (start // batch_size) * batch_size
    for batch_start in range(first, stop, batch_size):
        count = min(batch_size, num_samples - batch_start)
        noise = keras.random.normal((count,) + tuple(model.image_shape),
                                    seed=seed + batch_start)
        label = labels_for(batch_start, batch_start + count, num_classes)
        batch = model.sample(noise=noise, num_steps=num_steps, label=label,
                             guidance=guidance)
        lo, hi = max(start, batch_start) - batch_start, min(stop, batch_start + count) \
            - batch_start
        out.append(np.asarray(batch)[lo:hi])
    return np.concatenate(out)


def protocol(num_samples: int, seed: int, batch_size: int, num_steps: int, image_shape,
             num_classes=None) -> dict:
    """What fixes the samples of given weights: the manifest's `protocol` entry.

    The backend is part of it: the same seed draws other noise on JAX than on
    TensorFlow.
    """
    import keras

    return {"num_samples": int(num_samples), "seed": int(seed),
            "noise_batch_size": int(batch_size), "num_steps": int(num_steps),
            "image_shape": [int(s) for s in image_shape],
            "num_classes": int(num_classes) if num_classes else None,
            "sampler": "ddim", "clip_x_hat": True,
            "noise": "keras.random.normal((count,)+image_shape, seed=seed+batch_start)",
            "labels": "index % num_classes",
            "pixels": "uint8 clip(round((x + 1) * 127.5), 0, 255), float32",
            "backend": keras.backend.backend()}


@dataclasses.dataclass(frozen=True)
class ModelSamples:
    """One model's evaluation samples: the model, the name its files go by, and what
    fixes the samples (see `generate_range`).

    Attributes:
        model: a `DiffusionModel`.
        name: the file stem (`sample_files.model_name(kind, steps)`).
        weights_sha256: the identity of the model's weights.
        num_steps, num_samples, batch_size, seed: see `generate_range`.
        num_classes: labels are `index % num_classes`; None for an unconditional model.
        extra: more JSON-able fields for the manifest (kind, stage, ...).
    """

    model: object
    name: str
    weights_sha256: str
    num_steps: int
    num_samples: int
    batch_size: int
    seed: int
    num_classes: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def write_model_samples(spec: ModelSamples, out_dir: str,
                        max_file_mb: float = DEFAULT_MAX_FILE_MB, verbose: int = 1,
                        deadline: float | None = None) -> str:
    """Writes (or finishes) one model's sample files and manifest.

    Args:
        spec: the model and its samples.
        out_dir: the folder (created).
        max_file_mb: no file is larger than this many MiB.
        verbose: 0 silent, 1 a progress bar, 2 one plain line per chunk.
        deadline: a `time.time()` after which no new chunk is started.

    Returns:
        The manifest path.

    Raises:
        errors.Interrupted: the deadline passed; the chunks written are kept.
    """
    os.makedirs(out_dir, exist_ok=True)
    fileio.remove_stale_temps(out_dir)
    shape = tuple(int(s) for s in spec.model.image_shape)
    per_file = samples_per_file(shape, max_file_mb, labelled=bool(spec.num_classes))
    identity = {"weights_sha256": spec.weights_sha256,
                "protocol": protocol(spec.num_samples, spec.seed, spec.batch_size,
                                     spec.num_steps, shape, spec.num_classes),
                "samples_per_file": per_file}
    path = sample_files.manifest_path(out_dir, spec.name)
    known = _reusable_entries(path, identity, spec.name, out_dir, verbose)
    num_parts = math.ceil(spec.num_samples / per_file)
    manifest = {"format": sample_files.FORMAT, "model": spec.name, **spec.extra,
                **identity, "max_file_mb": float(max_file_mb), "num_files": num_parts,
                "keras_version": _keras_version(), "complete": False, "files": []}
    progress = _progress_bar(spec.num_samples) if verbose == 1 else None
    skipped = 0
    for index in range(num_parts):
        start, stop = index * per_file, min(spec.num_samples, (index + 1) * per_file)
        file_path = os.path.join(out_dir, sample_files.part_name(spec.name, index))
        entry = known.get(index)
        if entry is not None and entry.get("start") == start and \
                entry.get("count") == stop - start and _valid_part(file_path, entry, shape):
            manifest["files"].append(entry)
            skipped += 1
        else:
            if deadline is not None and time.time() > deadline:
                fileio.atomic_write_json(path, manifest)
                raise Interrupted(f"[sample] time budget spent at {spec.name} part {index} "
                                  f"of {num_parts}; written chunks are kept. Re-run to go on.")
            entry = _write_part(spec, index, start, stop, file_path, max_file_mb)
            manifest["files"].append(entry)
            fileio.atomic_write_json(path, manifest)
            _log(verbose, f"[sample] {spec.name}: part {index + 1}/{num_parts}, samples "
                          f"{start}-{stop - 1}, {entry['bytes'] / 2 ** 20:.1f} MiB, "
                          f"{entry['seconds']:.1f} s")
        if progress is not None:
            progress.update(stop)
    return _finish(manifest, path, verbose, skipped)


def _reusable_entries(path: str, identity: dict, name: str, out_dir: str,
                      verbose: int) -> dict:
    """`{index: entry}` of the chunks an earlier run listed in the manifest at `path`,
    when it was made for the same weights and settings (`identity`); else `{}`, and
    the model's old chunk files are removed (none of them can be reused)."""
    previous = None
    if os.path.exists(path):
        try:
            previous = sample_files.read_manifest(path)
        except sample_files.SampleFilesError:
            previous = None
    if previous is not None and {k: previous.get(k) for k in identity} != identity:
        _log(verbose, f"[sample] {name}: settings or weights changed, writing anew")
        previous = None
    if previous is None:
        for old in sample_files.part_paths(out_dir, name):
            os.remove(old)
        return {}
    return {e["index"]: e for e in previous.get("files", [])}


def _valid_part(path: str, entry: dict, shape) -> bool:
    # A chunk counts as written only when the manifest lists it with this file's
    # sha256: a file without its manifest entry (killed between the two writes) is
    # made again, which costs one chunk and needs no trust in unrecorded bytes.
    if not os.path.isfile(path):
        return False
    if fileio.sha256_file(path) != entry["sha256"]:
        return False
    try:
        sample_files.read_part(path, entry["count"], shape)
    except (sample_files.SampleFilesError, KeyError, TypeError):
        return False  # an unusable file is made again
    return True


def _write_part(spec: ModelSamples, index: int, start: int, stop: int, file_path: str,
                max_file_mb: float) -> dict:
    """Samples [start, stop) of the model into chunk `index`; returns its manifest
    entry (its sample range, size, sha256 and the seconds it took)."""
    began = time.time()
    floats = generate_range(spec.model, spec.num_steps, start, stop, spec.num_samples,
                            spec.batch_size, spec.seed, spec.num_classes)
    arrays = {"arr_0": images.to_uint8(floats)}
    labels = labels_for(start, stop, spec.num_classes)
    if labels is not None:
        arrays["arr_1"] = labels  # guided-diffusion's image_sample.py convention
    fileio.atomic_write(file_path, lambda f: np.savez(f, **arrays))
    size = os.path.getsize(file_path)
    if size > max_file_mb * 2 ** 20:
        raise AssertionError(f"{file_path} is {size} bytes, above max_file_mb")
    return {"index": index, "name": os.path.basename(file_path), "start": start,
            "count": stop - start, "bytes": size, "sha256": fileio.sha256_file(file_path),
            "seconds": time.time() - began}


def _finish(manifest: dict, path: str, verbose: int, skipped: int) -> str:
    """Marks the manifest complete, with the seconds its chunks took; returns `path`."""
    manifest["complete"] = True
    manifest["sample_seconds"] = float(sum(e.get("seconds", 0.0) for e in manifest["files"]))
    fileio.atomic_write_json(path, manifest)
    total = manifest["protocol"]["num_samples"]
    _log(verbose, f"[sample] {manifest['model']}: {total} samples in "
                  f"{manifest['num_files']} file(s)"
                  f"{f', {skipped} already written' if skipped else ''}")
    return path


def _log(verbose: int, message: str) -> None:
    if verbose >= 2:
        print(message, flush=True)


def _progress_bar(num_samples: int):
    import keras

    return keras.utils.Progbar(num_samples, unit_name="sample")


def _keras_version() -> str:
    import keras

    return keras.__version__


def write_workdir_samples(workdir, cfg: EvaluateSettings, out_dir: str | None = None,
                          num_samples: int | None = None,
                          max_file_mb: float | None = None, verbose: int = 1,
                          deadline: float | None = None) -> list:
    """Writes the evaluation samples of every model of a work directory (see the
    module doc).

    Args:
        workdir: a `WorkDir` (or its folder) with at least a finished teacher.
        cfg: the evaluation settings (`training.config.evaluate()`): which models
            (`ddim_steps`, `teacher_steps`), the noise (`seed`, `batch_size`) and the
            defaults below.
        out_dir: default the work directory's `EvalDir.samples`, where `--mode=eval`
            looks.
        num_samples: default `cfg.num_samples` (the evaluation uses files only
            when they hold exactly that many).
        max_file_mb: default `cfg.max_file_mb`.
        verbose: 0 silent, 1 progress bars, 2 one plain line per chunk and model.
        deadline: a `time.time()` after which no new chunk is started.

    Returns:
        The manifest paths, in evaluation order.

    Raises:
        inputs.EvaluationError: settings that are not an `EvaluateSettings`, or
            nothing to sample.
        errors.Interrupted: the deadline passed (chunks written are kept).
    """
    wd, cfg = inputs.as_workdir(workdir), inputs.check_settings(cfg)
    num_samples = cfg.num_samples if num_samples is None else int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    max_file_mb = cfg.max_file_mb if max_file_mb is None else float(max_file_mb)
    out_dir = out_dir or wd.eval.samples
    paths = []
    for run in inputs.evaluation_runs(wd, cfg):
        spec = ModelSamples(
            run["model"], sample_files.model_name(run["kind"], run["num_steps"]),
            run["weights_sha256"], run["num_steps"], num_samples, cfg.batch_size,
            cfg.seed, run["model"].num_classes,
            extra={"kind": run["kind"], "num_steps": run["num_steps"],
                   "stage": run["stage"]})
        paths.append(write_model_samples(spec, out_dir, max_file_mb, verbose, deadline))
    return paths

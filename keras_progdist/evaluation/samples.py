"""Evaluation samples as files: generate once (e.g. on a lent GPU), score anywhere.

`write_workdir_samples` writes, for the teacher at its full step count, undistilled
DDIM of the teacher at the evaluation settings' `ddim_steps` (and `teacher_steps`) and
every finished stage of a `WorkDir`, the samples the in-process evaluation would draw
(same noise, same batches, same labels) as uint8 NHWC arrays under the key `arr_0`
(class labels, for a class-conditional model, under `arr_1`): the `.npz` convention of
the ADM / guided-diffusion evaluator, so external FID tools read the files as they are.

Layout of `out_dir` (default `<workdir>/eval/samples/`), one model per name
`<kind>_<steps:05d>` (`teacher_00128`, `ddim_00004`, `distilled_00001`, ...):

    <model>-part00000.npz, <model>-part00001.npz, ...   no file above `max_file_mb`
    <model>.json                                        the manifest

The manifest records the weights' sha256 (the identity evaluation scores are keyed by),
the protocol (num_samples, seed, noise batch size, steps, image shape, backend) and every
file with its sample range and sha256. Chunks are written atomically, each followed by a
manifest update, so a run killed at any point goes on at the first missing chunk.

Only Keras and numpy are needed here: this runs on the JAX GPU host, where TensorFlow
is not installed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time

import numpy as np

from keras_progdist import fileio, images

FORMAT = "keras_progdist.samples/1"
DEFAULT_MAX_FILE_MB = 256.0
# Zip entries, .npy headers and the central directory of a two-array npz take a few
# hundred bytes; 64 KiB leaves room so that the limit holds for any array size.
_NPZ_OVERHEAD_BYTES = 64 * 1024
_PART = re.compile(r"^(?P<model>.+)-part(?P<index>\d{5})\.npz$")


class SampleFilesError(ValueError):
    """Sample files that are missing, damaged, incomplete or for other settings."""


def model_name(kind: str, num_steps: int) -> str:
    """The file stem of a model's samples and scores, e.g. `distilled_00004`."""
    return f"{kind}_{int(num_steps):05d}"


def part_name(name: str, index: int) -> str:
    """The file name of chunk `index` of model `name`."""
    return f"{name}-part{index:05d}.npz"


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


def read_manifest(path: str) -> dict:
    """A manifest, checked for its format.

    Raises:
        SampleFilesError: unreadable or not a samples manifest.
    """
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise SampleFilesError(f"{path}: unreadable sample manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SampleFilesError(f"{path} is not a {FORMAT} manifest")
    return manifest


def manifest_path(sample_dir: str, name: str) -> str:
    return os.path.join(sample_dir, f"{name}.json")


def find_manifests(sample_dir: str) -> list:
    """The manifests in `sample_dir` (only those of the samples format), sorted by name."""
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(sample_dir), "*.json"))):
        try:
            out.append(read_manifest(path))
        except SampleFilesError:
            continue
    return out


def samples_sha256(manifest: dict) -> str:
    """One digest of a model's sample files: sha256 of their sha256s in order."""
    digest = hashlib.sha256()
    for entry in manifest["files"]:
        digest.update(f"{entry['start']}:{entry['count']}:{entry['sha256']}\n".encode())
    return digest.hexdigest()


def check_complete(manifest: dict, sample_dir: str, verify_sha256: bool = True) -> None:
    """Checks that the files cover every sample once and (optionally) match their sha256.

    Raises:
        SampleFilesError: incomplete, a file missing or damaged.
    """
    name = manifest["model"]
    total = manifest["protocol"]["num_samples"]
    if not manifest.get("complete"):
        raise SampleFilesError(f"samples of {name} in {sample_dir} are incomplete "
                               f"({sum(e['count'] for e in manifest['files'])} of {total}); "
                               "run the sampling again to finish them")
    position = 0
    for entry in manifest["files"]:
        if entry["start"] != position:
            raise SampleFilesError(f"{name}: {entry['name']} starts at {entry['start']}, "
                                   f"expected {position}")
        position += entry["count"]
        path = os.path.join(sample_dir, entry["name"])
        if not os.path.isfile(path):
            raise SampleFilesError(f"{name}: {path} is missing")
        if verify_sha256 and fileio.sha256_file(path) != entry["sha256"]:
            raise SampleFilesError(f"{name}: {path} does not match its sha256 in the "
                                   "manifest (damaged or replaced)")
    if position != total:
        raise SampleFilesError(f"{name}: the files hold {position} samples, the manifest "
                               f"says {total}")


def read_part(path: str) -> np.ndarray:
    """The uint8 `arr_0` of one sample file."""
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"]


def iter_batches(manifest: dict, sample_dir: str, batch_size: int):
    """The model's samples as uint8 arrays of `batch_size` (the last may be shorter),
    read file by file, so memory holds one file and one batch at a time."""
    pending, size = [], 0
    for entry in manifest["files"]:
        pending.append(read_part(os.path.join(sample_dir, entry["name"])))
        size += len(pending[-1])
        while size >= batch_size:
            buffer = np.concatenate(pending)
            yield buffer[:batch_size]
            pending, size = [buffer[batch_size:]], len(buffer) - batch_size
    if size:
        yield np.concatenate(pending)


def load_samples(manifest: dict, sample_dir: str, count: int | None = None) -> np.ndarray:
    """The first `count` samples (all when None) as one uint8 array."""
    out, have = [], 0
    for entry in manifest["files"]:
        if count is not None and have >= count:
            break
        out.append(read_part(os.path.join(sample_dir, entry["name"])))
        have += len(out[-1])
    samples = np.concatenate(out)
    return samples if count is None else samples[:count]


def _valid_part(path: str, entry: dict | None, shape) -> bool:
    # A chunk counts as written only when the manifest lists it with this file's
    # sha256: a file without its manifest entry (killed between the two writes) is
    # made again, which costs one chunk and needs no trust in unrecorded bytes.
    if entry is None or not os.path.isfile(path):
        return False
    if fileio.sha256_file(path) != entry["sha256"]:
        return False
    try:
        arr = read_part(path)
    except Exception:  # noqa: BLE001  any unreadable file is simply made again
        return False
    return arr.dtype == np.uint8 and arr.shape == (entry["count"],) + tuple(shape)


def _log(verbose: int, message: str) -> None:
    if verbose >= 2:
        print(message, flush=True)


def write_model_samples(model, name: str, out_dir: str, weights_sha256: str,
                        num_steps: int, num_samples: int, batch_size: int, seed: int,
                        max_file_mb: float = DEFAULT_MAX_FILE_MB, num_classes=None,
                        extra: dict | None = None, verbose: int = 1,
                        deadline: float | None = None) -> str:
    """Writes (or finishes) one model's sample files and manifest.

    Args:
        model: a `DiffusionModel`.
        name: the file stem (`model_name(kind, steps)`).
        out_dir: the folder (created).
        weights_sha256: the identity of the model's weights.
        num_steps, num_samples, batch_size, seed, num_classes: see `generate_range`.
        max_file_mb: no file is larger than this many MiB.
        extra: more JSON-able fields for the manifest (kind, stage, ...).
        verbose: 0 silent, 1 a progress bar, 2 one plain line per chunk.
        deadline: a `time.time()` after which no new chunk is started.

    Returns:
        The manifest path.

    Raises:
        TimeoutError: the deadline passed; the chunks written are kept.
    """
    os.makedirs(out_dir, exist_ok=True)
    fileio.remove_stale_temps(out_dir)
    shape = tuple(int(s) for s in model.image_shape)
    per_file = samples_per_file(shape, max_file_mb, labelled=bool(num_classes))
    proto = protocol(num_samples, seed, batch_size, num_steps, shape, num_classes)
    identity = {"weights_sha256": weights_sha256, "protocol": proto,
                "samples_per_file": per_file}
    path = manifest_path(out_dir, name)
    previous = None
    if os.path.exists(path):
        try:
            previous = read_manifest(path)
        except SampleFilesError:
            previous = None
    if previous is not None and {k: previous.get(k) for k in identity} != identity:
        # Other weights or settings: none of the old chunks can be reused.
        _log(verbose, f"[sample] {name}: settings or weights changed, writing anew")
        previous = None
    if previous is None:
        for old in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(name)}-part*.npz")):
            if _PART.match(os.path.basename(old)) and \
                    _PART.match(os.path.basename(old)).group("model") == name:
                os.remove(old)
    known = {e["index"]: e for e in (previous or {}).get("files", [])}
    num_parts = math.ceil(num_samples / per_file)
    manifest = {"format": FORMAT, "model": name, **(extra or {}), **identity,
                "max_file_mb": float(max_file_mb), "num_files": num_parts,
                "keras_version": _keras_version(), "complete": False, "files": []}
    progress = None
    if verbose == 1:
        import keras
        progress = keras.utils.Progbar(num_samples, unit_name="sample")
    skipped = 0
    for index in range(num_parts):
        start, stop = index * per_file, min(num_samples, (index + 1) * per_file)
        file_name = part_name(name, index)
        file_path = os.path.join(out_dir, file_name)
        entry = known.get(index)
        if entry is not None and entry.get("start") == start and \
                entry.get("count") == stop - start and _valid_part(file_path, entry, shape):
            manifest["files"].append(entry)
            skipped += 1
            if progress is not None:
                progress.update(stop)
            continue
        if deadline is not None and time.time() > deadline:
            fileio.atomic_write_json(path, manifest)
            raise TimeoutError(f"[sample] time budget spent at {name} part {index} of "
                               f"{num_parts}; written chunks are kept. Re-run to go on.")
        began = time.time()
        floats = generate_range(model, num_steps, start, stop, num_samples, batch_size,
                                seed, num_classes)
        arrays = {"arr_0": images.to_uint8(floats)}
        labels = labels_for(start, stop, num_classes)
        if labels is not None:
            arrays["arr_1"] = labels  # guided-diffusion's image_sample.py convention
        fileio.atomic_write(file_path, lambda f: np.savez(f, **arrays))
        size = os.path.getsize(file_path)
        if size > max_file_mb * 2 ** 20:
            raise AssertionError(f"{file_path} is {size} bytes, above max_file_mb")
        entry = {"index": index, "name": file_name, "start": start, "count": stop - start,
                 "bytes": size, "sha256": fileio.sha256_file(file_path),
                 "seconds": time.time() - began}
        manifest["files"].append(entry)
        fileio.atomic_write_json(path, manifest)
        if progress is not None:
            progress.update(stop)
        _log(verbose, f"[sample] {name}: part {index + 1}/{num_parts}, samples "
                      f"{start}-{stop - 1}, {size / 2 ** 20:.1f} MiB, "
                      f"{entry['seconds']:.1f} s")
    manifest["complete"] = True
    manifest["sample_seconds"] = float(sum(e.get("seconds", 0.0) for e in manifest["files"]))
    fileio.atomic_write_json(path, manifest)
    _log(verbose, f"[sample] {name}: {num_samples} samples in {num_parts} file(s)"
                  f"{f', {skipped} already written' if skipped else ''}")
    return path


def _keras_version() -> str:
    import keras

    return keras.__version__


def write_workdir_samples(workdir, cfg: dict, out_dir: str | None = None,
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
        out_dir: default `<workdir>/eval/samples`, where `--mode=eval` looks.
        num_samples: default `cfg["num_samples"]` (the evaluation uses files only
            when they hold exactly that many).
        max_file_mb: default `cfg["max_file_mb"]`.
        verbose: 0 silent, 1 progress bars, 2 one plain line per chunk and model.
        deadline: a `time.time()` after which no new chunk is started.

    Returns:
        The manifest paths, in evaluation order.

    Raises:
        report.EvaluationInterrupted: the deadline passed (chunks written are kept).
    """
    from keras_progdist.evaluation import report

    wd, cfg = report.as_workdir(workdir), report.check_settings(cfg)
    num_samples = cfg["num_samples"] if num_samples is None else int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    max_file_mb = cfg["max_file_mb"] if max_file_mb is None else float(max_file_mb)
    out_dir = out_dir or wd.path("eval", "samples")
    paths = []
    for run in report.evaluation_runs(wd, cfg):
        name = model_name(run["kind"], run["num_steps"])
        try:
            paths.append(write_model_samples(
                run["model"], name, out_dir, run["weights_sha256"], run["num_steps"],
                num_samples, cfg["batch_size"], cfg["seed"], max_file_mb,
                run["model"].num_classes,
                extra={"kind": run["kind"], "num_steps": run["num_steps"],
                       "stage": run["stage"]},
                verbose=verbose, deadline=deadline))
        except TimeoutError as e:
            raise report.EvaluationInterrupted(str(e)) from None
    return paths

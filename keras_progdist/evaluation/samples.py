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
import zipfile

import numpy as np

from keras_progdist.errors import KerasProgdistError
from keras_progdist import fileio, images

FORMAT = "keras_progdist.samples/1"
DEFAULT_MAX_FILE_MB = 256.0
# Zip entries, .npy headers and the central directory of a two-array npz take a few
# hundred bytes; 64 KiB leaves room so that the limit holds for any array size.
_NPZ_OVERHEAD_BYTES = 64 * 1024
_PART = re.compile(r"^(?P<model>.+)-part(?P<index>\d{5})\.npz$")


class SampleFilesError(KerasProgdistError, ValueError):
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


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SampleFilesError(f"{path}: unreadable sample manifest ({e})") from e


def read_manifest(path: str) -> dict:
    """A manifest, checked for its format and its contents (`check_manifest`), and
    that its `model` is its file's name (`<model>.json`).

    Raises:
        SampleFilesError: unreadable, not a samples manifest, or a field that is
            missing, of the wrong type, or names a file outside its folder.
    """
    manifest = _load_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SampleFilesError(f"{path} is not a {FORMAT} manifest")
    check_manifest(manifest, path)
    stem = os.path.basename(path)[:-len(".json")] if path.endswith(".json") else None
    if manifest["model"] != stem:
        raise SampleFilesError(f"{path}: model {manifest['model']!r} is not the "
                               "manifest's own name (<model>.json)")
    return manifest


# What a manifest's names may be: they become file names in the sample folder and in
# the scores' folder (`<model>.json`, `<kind>_<steps>steps.png`), so plain names only.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _plain_name(value) -> bool:
    return isinstance(value, str) and bool(_PLAIN_NAME.match(value)) and ".." not in value


def check_manifest(manifest, where: str = "manifest") -> None:
    """Checks every field a reader of the manifest uses, before any file is read.

    Names are plain file names inside the folder: `model`, `kind` (and `stage`)
    letters, digits, `_`, `.` and `-` (no `..`, no separator, not absolute), and each
    `files[i].name` exactly `part_name(model, index)`. Counts and steps are ints
    (`num_steps` and `kind` are required: scores are filed under them),
    `image_shape` three positive ints with 1 or 3 channels, sha256 digests 64 hex
    digits.

    Args:
        manifest: the parsed JSON.
        where: the manifest's path, for the message.

    Raises:
        SampleFilesError: naming `where` and the first bad field.
    """
    def bad(field, value, want):
        raise SampleFilesError(f"{where}: {field}={value!r} is not {want}; the manifest "
                               "is damaged or was not written by --mode=sample")

    if not isinstance(manifest, dict):
        bad("manifest", type(manifest).__name__, "a JSON object")
    model = manifest.get("model")
    if not _plain_name(model):
        bad("model", model, "a plain file name (letters, digits, '_', '.', '-')")
    for field in ("kind", "stage"):
        if (field == "kind" or field in manifest) and not _plain_name(manifest.get(field)):
            bad(field, manifest.get(field), "a plain name (letters, digits, '_', '.', '-')")
    if not _is_int(manifest.get("num_steps"), 1):
        bad("num_steps", manifest.get("num_steps"), "a positive int")
    if not isinstance(manifest.get("weights_sha256"), str):
        bad("weights_sha256", manifest.get("weights_sha256"), "a string")
    proto = manifest.get("protocol")
    if not isinstance(proto, dict):
        bad("protocol", proto, "a JSON object")
    for field, low in (("num_samples", 1), ("seed", -2 ** 63), ("noise_batch_size", 1),
                       ("num_steps", 1)):
        if not _is_int(proto.get(field), low):
            bad(f"protocol.{field}", proto.get(field), f"an int >= {low}"
                if low > -2 ** 63 else "an int")
    shape = proto.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(_is_int(n, 1) for n in shape) and shape[2] in (1, 3)):
        bad("protocol.image_shape", shape, "[height, width, channels] (channels 1 or 3)")
    if not isinstance(manifest.get("complete", False), bool):
        bad("complete", manifest.get("complete"), "true or false")
    files = manifest.get("files")
    if not isinstance(files, list):
        bad("files", files, "a list")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            bad(f"files[{i}]", entry, "a JSON object")
        index = entry.get("index")
        if not _is_int(index):
            bad(f"files[{i}].index", index, "an int >= 0")
        if entry.get("name") != part_name(model, index):
            bad(f"files[{i}].name", entry.get("name"),
                f"{part_name(model, index)!r} (a file of this model in this folder)")
        for field, low in (("start", 0), ("count", 1)):
            if not _is_int(entry.get(field), low):
                bad(f"files[{i}].{field}", entry.get(field), f"an int >= {low}")
        if not (isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            bad(f"files[{i}].sha256", entry.get("sha256"), "a sha256 hex digest")


def manifest_path(sample_dir: str, name: str) -> str:
    return os.path.join(sample_dir, f"{name}.json")


def find_manifests(sample_dir: str) -> list:
    """The manifests in `sample_dir`, sorted by name. JSON files of another kind
    (no samples `format`) are passed over; a samples manifest that fails its checks
    is refused.

    Raises:
        SampleFilesError: a samples manifest with a bad field (see `check_manifest`).
    """
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(sample_dir), "*.json"))):
        try:
            found = _load_json(path)
        except SampleFilesError:
            continue
        if isinstance(found, dict) and found.get("format") == FORMAT:
            out.append(read_manifest(path))
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
    check_manifest(manifest, manifest_path(sample_dir, str(manifest.get("model"))))
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
        if not os.path.lexists(path):
            raise SampleFilesError(f"{name}: {path} is missing")
        if os.path.islink(path) or not os.path.isfile(path):
            raise SampleFilesError(f"{name}: {path} is not a regular file in the folder "
                                   "(a link or something else); sample files are read "
                                   "only from the folder itself")
        if verify_sha256 and fileio.sha256_file(path) != entry["sha256"]:
            raise SampleFilesError(f"{name}: {path} does not match its sha256 in the "
                                   "manifest (damaged or replaced)")
    if position != total:
        raise SampleFilesError(f"{name}: the files hold {position} samples, the manifest "
                               f"says {total}")


def _npz_header(zf, member: str, path: str):
    """`(shape, fortran_order, dtype)` from the .npy header of `member`, read without
    reading the array."""
    try:
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(f)
            raise ValueError(f"npy format version {version}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SampleFilesError(f"{path}: {member} is not a readable .npy array "
                               f"({type(e).__name__}: {e})") from None


def read_part(path: str, count: int | None = None, image_shape=None) -> np.ndarray:
    """The uint8 `arr_0` of one sample file, checked before it is read.

    Args:
        path: the npz file.
        count: the samples it must hold (the manifest's `count`), or None.
        image_shape: the `(H, W, C)` each sample must have (the manifest's
            `protocol.image_shape`, the model's), or None.

    Returns:
        uint8 `(count, H, W, C)`.

    Raises:
        SampleFilesError: not an npz, no `arr_0`, not uint8 NHWC (e.g. float,
            object or 2-channel arrays), or another count or image shape than asked;
            the header is checked before the array is read.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise SampleFilesError(f"{path}: not a readable npz file ({e})") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise SampleFilesError(f"{path}: no arr_0 (the samples) in the npz file")
        shape, _, dtype = _npz_header(zf, "arr_0.npy", path)
        want = ((count if count is not None else "N",)
                + (tuple(image_shape) if image_shape is not None else ("H", "W", "C")))
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or (
                count is not None and shape[0] != count) or (
                image_shape is not None and tuple(shape[1:]) != tuple(image_shape)):
            raise SampleFilesError(
                f"{path}: arr_0 is {dtype} {tuple(shape)}; sample files hold uint8 "
                f"images {want} (NHWC, as the manifest says)")
        with np.load(path, allow_pickle=False) as data:
            try:
                return data["arr_0"]
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise SampleFilesError(f"{path}: arr_0 cannot be read ({e})") from None


def _entry_part(manifest: dict, sample_dir: str, entry: dict) -> np.ndarray:
    return read_part(os.path.join(sample_dir, entry["name"]), entry["count"],
                     manifest["protocol"]["image_shape"])


def check_image_shape(manifest: dict, image_shape) -> None:
    """Refuses a manifest whose samples are not of `image_shape` `(H, W, C)` (the
    run's: scores against other-sized images mean nothing).

    Raises:
        SampleFilesError: naming the model and both shapes.
    """
    have = tuple(manifest["protocol"]["image_shape"])
    if have != tuple(int(n) for n in image_shape):
        raise SampleFilesError(f"{manifest['model']}: samples of shape {have}, but this "
                               f"run's images are {tuple(image_shape)}")


def iter_batches(manifest: dict, sample_dir: str, batch_size: int):
    """The model's samples as uint8 arrays of `batch_size` (the last may be shorter),
    read file by file, so memory holds one file and one batch at a time. Each file
    is checked by `read_part` against its manifest entry."""
    check_manifest(manifest, manifest_path(sample_dir, str(manifest.get("model"))))
    pending, size = [], 0
    for entry in manifest["files"]:
        pending.append(_entry_part(manifest, sample_dir, entry))
        size += len(pending[-1])
        while size >= batch_size:
            buffer = np.concatenate(pending)
            yield buffer[:batch_size]
            pending, size = [buffer[batch_size:]], len(buffer) - batch_size
    if size:
        yield np.concatenate(pending)


def load_samples(manifest: dict, sample_dir: str, count: int | None = None) -> np.ndarray:
    """The first `count` samples (all when None) as one uint8 array, each file
    checked by `read_part` against its manifest entry."""
    check_manifest(manifest, manifest_path(sample_dir, str(manifest.get("model"))))
    out, have = [], 0
    for entry in manifest["files"]:
        if count is not None and have >= count:
            break
        out.append(_entry_part(manifest, sample_dir, entry))
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
        read_part(path, entry["count"], shape)
    except (SampleFilesError, KeyError, TypeError):  # an unusable file is made again
        return False
    return True


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

"""The sample files' format, and reading them back: one model's samples as uint8 npz
chunks and a JSON manifest.

For each model name `<kind>_<steps:05d>` (`teacher_00128`, `ddim_00004`,
`distilled_00001`, ...), a sample folder holds

    <model>-part00000.npz, <model>-part00001.npz, ...   samples under `arr_0`
    <model>.json                                        the manifest

Each npz holds uint8 NHWC images under the key `arr_0` (class labels, for a
class-conditional model, under `arr_1`): the `.npz` convention of the ADM /
guided-diffusion evaluator, so external FID tools read the files as they are. The
manifest records the weights' sha256 (the identity evaluation scores are keyed by), the
protocol (num_samples, seed, noise batch size, steps, image shape, backend) and every
file with its sample range and sha256.

A sample folder is input like any other (it may come from another host): a manifest is
checked field by field before any file is read (`check_manifest`: plain names only, each
file the model's own), and each file's npy header before its array (`read_part`);
anything wrong is one `SampleFilesError` naming the file and the field. The files are
written by `samples.write_model_samples`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import zipfile
from typing import NoReturn

import numpy as np

from keras_progdist import fileio
from keras_progdist.errors import KerasProgdistError

FORMAT = "keras_progdist.samples/1"
_PART = re.compile(r"^(?P<model>.+)-part(?P<index>\d{5})\.npz$")


class SampleFilesError(KerasProgdistError, ValueError):
    """Sample files that are missing, damaged, incomplete or for other settings."""


def model_name(kind: str, num_steps: int) -> str:
    """The file stem of a model's samples and scores, e.g. `distilled_00004`."""
    return f"{kind}_{int(num_steps):05d}"


def part_name(name: str, index: int) -> str:
    """The file name of chunk `index` of model `name`."""
    return f"{name}-part{index:05d}.npz"


def manifest_path(sample_dir: str, name: str) -> str:
    """`<sample_dir>/<name>.json`: the manifest of model `name`."""
    return os.path.join(sample_dir, f"{name}.json")


def part_paths(sample_dir: str, name: str) -> list:
    """The chunk files of model `name` present in `sample_dir`
    (`<name>-partNNNNN.npz`, and not another model's whose name starts alike)."""
    pattern = os.path.join(glob.escape(sample_dir), f"{glob.escape(name)}-part*.npz")
    return sorted(path for path in glob.glob(pattern)
                  if (match := _PART.match(os.path.basename(path)))
                  and match.group("model") == name)


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
    if not isinstance(manifest, dict):
        _refuse(where, "manifest", type(manifest).__name__, "a JSON object")
    _check_identity(manifest, where)
    _check_protocol(manifest.get("protocol"), where)
    if not isinstance(manifest.get("complete", False), bool):
        _refuse(where, "complete", manifest.get("complete"), "true or false")
    _check_files(manifest.get("files"), manifest["model"], where)


def _refuse(where: str, field: str, value, want: str) -> NoReturn:
    raise SampleFilesError(f"{where}: {field}={value!r} is not {want}; the manifest "
                           "is damaged or was not written by --mode=sample")


def _check_identity(manifest: dict, where: str) -> None:
    # The names become file names (of the samples and of the scores): plain ones only.
    model = manifest.get("model")
    if not _plain_name(model):
        _refuse(where, "model", model, "a plain file name (letters, digits, '_', '.', '-')")
    for field in ("kind", "stage"):
        if (field == "kind" or field in manifest) and not _plain_name(manifest.get(field)):
            _refuse(where, field, manifest.get(field),
                    "a plain name (letters, digits, '_', '.', '-')")
    if not _is_int(manifest.get("num_steps"), 1):
        _refuse(where, "num_steps", manifest.get("num_steps"), "a positive int")
    if not isinstance(manifest.get("weights_sha256"), str):
        _refuse(where, "weights_sha256", manifest.get("weights_sha256"), "a string")


def _check_protocol(proto, where: str) -> None:
    if not isinstance(proto, dict):
        _refuse(where, "protocol", proto, "a JSON object")
    for field, low in (("num_samples", 1), ("seed", -2 ** 63), ("noise_batch_size", 1),
                       ("num_steps", 1)):
        if not _is_int(proto.get(field), low):
            _refuse(where, f"protocol.{field}", proto.get(field), f"an int >= {low}"
                    if low > -2 ** 63 else "an int")
    shape = proto.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(_is_int(n, 1) for n in shape) and shape[2] in (1, 3)):
        _refuse(where, "protocol.image_shape", shape,
                "[height, width, channels] (channels 1 or 3)")


def _check_files(files, model: str, where: str) -> None:
    # Each file must be this model's own chunk: no name reaches outside the folder.
    if not isinstance(files, list):
        _refuse(where, "files", files, "a list")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            _refuse(where, f"files[{i}]", entry, "a JSON object")
        index = entry.get("index")
        if not _is_int(index):
            _refuse(where, f"files[{i}].index", index, "an int >= 0")
        if entry.get("name") != part_name(model, index):
            _refuse(where, f"files[{i}].name", entry.get("name"),
                    f"{part_name(model, index)!r} (a file of this model in this folder)")
        for field, low in (("start", 0), ("count", 1)):
            if not _is_int(entry.get(field), low):
                _refuse(where, f"files[{i}].{field}", entry.get(field), f"an int >= {low}")
        if not (isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            _refuse(where, f"files[{i}].sha256", entry.get("sha256"), "a sha256 hex digest")


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

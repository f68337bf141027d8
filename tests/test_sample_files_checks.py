"""Sample folders are input: manifests name only files of their own folder, and npz
contents are uint8 NHWC of the manifest's shape and count, refused with one
`SampleFilesError` naming the file and the field (no raw tracebacks, nothing read or
written outside the folder). The folders are written by hand here, no model needed."""

import hashlib
import json
import os

import numpy as np
import pytest

from keras_progdist.evaluation import report, sample_files
from keras_progdist.evaluation.sample_files import SampleFilesError

SHAPE = (16, 16, 1)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_model(folder, model="teacher_00002", kind="teacher", num_steps=2, counts=(3, 2),
                 arrays=None):
    """A complete, valid model: npz parts of `counts` samples and its manifest.
    `arrays` replaces the npz contents (dict of arrays) of every part."""
    os.makedirs(folder, exist_ok=True)
    files, start = [], 0
    for index, count in enumerate(counts):
        name = sample_files.part_name(model, index)
        path = os.path.join(folder, name)
        pixels = np.full((count,) + SHAPE, index * 40 + 7, np.uint8)
        np.savez(path, **(arrays if arrays is not None else {"arr_0": pixels}))
        files.append({"index": index, "name": name, "start": start, "count": count,
                      "bytes": os.path.getsize(path), "sha256": _sha(path)})
        start += count
    manifest = {"format": sample_files.FORMAT, "model": model, "kind": kind,
                "num_steps": num_steps, "stage": "teacher", "weights_sha256": "ab" * 32,
                "protocol": {"num_samples": start, "seed": 0, "noise_batch_size": 4,
                             "num_steps": num_steps, "image_shape": list(SHAPE),
                             "num_classes": None},
                "samples_per_file": 3, "complete": True, "files": files}
    path = sample_files.manifest_path(folder, model)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path, manifest


def _rewrite(path, edit):
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_valid_folder_reads_back(tmp_path):
    path, _ = _write_model(str(tmp_path))
    manifest = sample_files.read_manifest(path)
    sample_files.check_complete(manifest, str(tmp_path))
    pixels = sample_files.load_samples(manifest, str(tmp_path))
    assert pixels.shape == (5,) + SHAPE and pixels.dtype == np.uint8
    assert [len(b) for b in sample_files.iter_batches(manifest, str(tmp_path), 4)] == [4, 1]
    assert [m["model"] for m in sample_files.find_manifests(str(tmp_path))] == ["teacher_00002"]


@pytest.mark.parametrize("field, value, match", [
    ("name", "../../../outside.npz", r"files\[0\]\.name='\.\./\.\./\.\./outside\.npz'"),
    ("name", "/etc/passwd", r"files\[0\]\.name='/etc/passwd'"),
    ("name", "sub/teacher_00002-part00000.npz", r"files\[0\]\.name='sub/"),
    ("name", "other_00002-part00000.npz", r"files\[0\]\.name='other_00002"),
    ("model", "../../escape", r"model='\.\./\.\./escape' is not a plain file name"),
    ("model", "/tmp/abs", r"model='/tmp/abs'"),
    ("kind", "../../escape", r"kind='\.\./\.\./escape' is not a plain name"),
    ("kind", "a/b", r"kind='a/b'"),
])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, field, value, match):
    folder = tmp_path / "samples"
    path, _ = _write_model(str(folder))
    # A file outside the folder that a traversing name would reach.
    np.savez(tmp_path / "outside.npz", arr_0=np.zeros((3,) + SHAPE, np.uint8))

    def edit(manifest):
        if field == "name":
            manifest["files"][0]["name"] = value
        else:
            manifest[field] = value
    _rewrite(path, edit)
    with pytest.raises(SampleFilesError, match=match):
        sample_files.read_manifest(path)
    with pytest.raises(SampleFilesError, match=match):  # what score_sample_dir lists
        sample_files.find_manifests(str(folder))
    with open(path) as f:
        manifest = json.load(f)
    for reader in (lambda: sample_files.check_complete(manifest, str(folder)),
                   lambda: sample_files.load_samples(manifest, str(folder)),
                   lambda: list(sample_files.iter_batches(manifest, str(folder), 4))):
        with pytest.raises(SampleFilesError, match=match):
            reader()


def test_scoring_a_folder_with_an_escaping_manifest_fails_before_any_work(tmp_path):
    folder = tmp_path / "samples"
    path, _ = _write_model(str(folder))
    _rewrite(path, lambda m: m.update(model="../../escape", kind="../../../x"))
    from keras_progdist import training

    cfg = training.evaluate()  # the defaults; nothing is scored
    with pytest.raises(SampleFilesError, match="model='../../escape'"):
        report.score_sample_dir(str(folder), cfg, training.dataset_settings(),
                                out_dir=str(tmp_path / "out"), verbose=0)
    written = {os.path.relpath(os.path.join(d, f), tmp_path)
               for d, _, names in os.walk(tmp_path) for f in names}
    assert written == {"samples/teacher_00002.json", "samples/teacher_00002-part00000.npz",
                       "samples/teacher_00002-part00001.npz"}


def test_a_part_that_is_a_link_is_refused(tmp_path):
    folder = tmp_path / "samples"
    path, manifest = _write_model(str(folder))
    part = folder / manifest["files"][0]["name"]
    os.replace(part, tmp_path / "elsewhere.npz")
    os.symlink(tmp_path / "elsewhere.npz", part)
    with pytest.raises(SampleFilesError, match="not a regular file in the folder"):
        sample_files.check_complete(sample_files.read_manifest(path), str(folder))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["files"][0].update(count="3"), r"files\[0\]\.count='3' is not an int"),
    (lambda m: m.update(files=None), r"files=None is not a list"),
    (lambda m: m["files"].__setitem__(0, "x"), r"files\[0\]='x' is not a JSON object"),
    (lambda m: m["protocol"].update(num_samples="5"), r"protocol\.num_samples='5'"),
    (lambda m: m["protocol"].update(image_shape=[16, 16, 2]), r"image_shape=\[16, 16, 2\]"),
    (lambda m: m.update(protocol=None), r"protocol=None is not a JSON object"),
    (lambda m: m.update(num_steps="2"), r"num_steps='2' is not a positive int"),
    (lambda m: m["files"][1].update(sha256=None), r"files\[1\]\.sha256=None"),
    (lambda m: m["files"][0].update(index=True), r"files\[0\]\.index=True"),
])
def test_damaged_manifest_fields_are_named_not_tracebacks(tmp_path, edit, match):
    path, _ = _write_model(str(tmp_path))
    _rewrite(path, edit)
    with pytest.raises(SampleFilesError, match=match):
        sample_files.read_manifest(path)


@pytest.mark.parametrize("arrays, match", [
    ({"arr_0": np.full((3,) + SHAPE, np.nan, np.float32)},
     r"arr_0 is float32 \(3, 16, 16, 1\); sample files hold uint8"),
    ({"arr_0": np.full((3,) + SHAPE, 1e300, np.float64)}, r"arr_0 is float64"),
    ({"arr_0": np.zeros((3, 8, 8, 1), np.uint8)},
     r"arr_0 is uint8 \(3, 8, 8, 1\); sample files hold uint8 images \(3, 16, 16, 1\)"),
    ({"arr_0": np.zeros((1000,) + SHAPE, np.uint8)}, r"arr_0 is uint8 \(1000, 16"),
    ({"arr_0": np.zeros((3, 16, 16, 2), np.uint8)}, r"arr_0 is uint8 \(3, 16, 16, 2\)"),
    ({"arr_0": np.zeros((3, 16, 16), np.uint8)}, r"arr_0 is uint8 \(3, 16, 16\)"),
    ({"arr_0": np.array([None, 1, "x"], dtype=object)}, r"arr_0 is object"),
    ({"arr_1": np.zeros((3,) + SHAPE, np.uint8)}, r"no arr_0"),
])
def test_npz_contents_must_be_uint8_nhwc_of_the_manifests_shape_and_count(
        tmp_path, arrays, match):
    path, _ = _write_model(str(tmp_path), counts=(3,), arrays=arrays)
    manifest = sample_files.read_manifest(path)  # the manifest itself is in order
    sample_files.check_complete(manifest, str(tmp_path))  # and matches the files' sha256
    with pytest.raises(SampleFilesError, match=match):
        sample_files.load_samples(manifest, str(tmp_path))
    with pytest.raises(SampleFilesError, match=match):
        list(sample_files.iter_batches(manifest, str(tmp_path), 2))


def test_a_file_that_is_not_an_npz_is_named(tmp_path):
    path, manifest = _write_model(str(tmp_path), counts=(3,))
    part = tmp_path / manifest["files"][0]["name"]
    part.write_bytes(b"not a zip file")
    with pytest.raises(SampleFilesError, match="not a readable npz file"):
        sample_files.load_samples(sample_files.read_manifest(path), str(tmp_path))


def test_samples_of_another_image_shape_than_the_runs_are_refused(tmp_path):
    path, _ = _write_model(str(tmp_path))
    manifest = sample_files.read_manifest(path)
    sample_files.check_image_shape(manifest, SHAPE)
    with pytest.raises(SampleFilesError, match=r"samples of shape \(16, 16, 1\), but "
                                               r"this run's images are \(32, 32, 3\)"):
        sample_files.check_image_shape(manifest, (32, 32, 3))

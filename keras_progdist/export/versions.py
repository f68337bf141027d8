"""A stage's version folders: where they are, which number an export takes, and how it
is claimed.

    <export_dir>/<name>/<name>-<N>steps/<version>/   SavedModel (TF Serving layout)
    <export_dir>/<name>/<name>-<N>steps.keras(.json)

Versions follow TF Serving's convention: the highest numeric folder is served, and a
number is never reused for other weights. A version folder is built under a dot-name
and claimed with a rename that fails if the folder exists, so two exporters racing for
one number never both get it. Temporaries of killed exports are cleaned by the next one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

from keras_progdist import fileio
from keras_progdist.export.errors import ExportExistsError
from keras_progdist.export.metadata import (
    KERAS_METADATA_SUFFIX,
    METADATA_FILE,
    read_version_metadata,
    same_export,
)
from keras_progdist.export.settings import DEFAULT_VERSION, model_name

# Temporaries: `.version.tmp-<pid>-<hex>/` (a version being built) and `.replaced-<v>.tmp-
# <pid>-<hex>/` (the version an overwrite moved aside).
BUILD_PREFIX = ".version"
_REPLACED = re.compile(r"^\.replaced-(\d+)" + re.escape(fileio.TMP_MARK))


def existing_versions(base_path: str) -> list:
    """The numeric version folders under a model's base path, ascending."""
    try:
        entries = os.listdir(base_path)
    except FileNotFoundError:
        return []
    return sorted(int(e) for e in entries
                  if e.isdigit() and os.path.isdir(os.path.join(base_path, e)))


def stage_paths(export_dir: str, name: str, num_steps: int,
                version: int | None = DEFAULT_VERSION, stage: str | None = None) -> dict:
    """Where a stage's files go.

    Args:
        export_dir, name, num_steps: the export root, name and the stage's step count.
        version: the version folder; None: the highest existing one (1 if none).
        stage: the work-directory stage, as `settings.model_name` reads it.

    Returns:
        `{"root", "model_name", "base_path", "saved_model" (the version folder),
        "version", "keras", "keras_metadata"}`.
    """
    root = os.path.join(export_dir, name)
    serving_name = model_name(name, num_steps, stage)
    base = os.path.join(root, serving_name)
    if version is None:
        version = (existing_versions(base) or [1])[-1]
    keras_path = os.path.join(root, f"{serving_name}.keras")
    return {"root": root, "model_name": serving_name, "base_path": base,
            "saved_model": os.path.join(base, str(version)), "version": int(version),
            "keras": keras_path, "keras_metadata": keras_path + KERAS_METADATA_SUFFIX}


def remove_stale_temps(base_path: str) -> list:
    """Cleans what killed exports left in a model's base path; returns what it removed.

    A temporary whose writer (the pid in its name) is dead is removed; one of a live
    process is another export in progress and stays. A version folder that an
    overwrite moved aside (`.replaced-<v>...`) is moved back
    when the kill left no version `<v>`, so a kill mid-overwrite never loses a version.
    """
    removed = []
    try:
        entries = os.listdir(base_path)
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = os.path.join(base_path, entry)
        replaced = _REPLACED.match(entry)
        pid = fileio.temp_owner(entry) if replaced else None
        if pid is None or pid == os.getpid() or fileio.pid_alive(pid):
            continue
        target = os.path.join(base_path, str(int(replaced.group(1))))
        if not os.path.exists(target):
            os.rename(path, target)
            print(f"[export] restored {target} from {path} (an overwrite was killed)",
                  flush=True)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    # `.version.tmp-<pid>-<hex>/` builds; the glob needs the leading dot to see them.
    return removed + fileio.remove_stale_temps(base_path, ".*")


def remove_stale_root_temps(root: str) -> list:
    """`remove_stale_temps` of an export root: its files' temporaries and every model's."""
    # `<model>.keras.tmp-<pid>...`, `<model>.keras.json.tmp-...`, `models.config.tmp-...`
    removed = fileio.remove_stale_temps(root)
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not entry.startswith("."):
            removed += remove_stale_temps(path)
    return removed


def _rename_noreplace(src: str, dst: str) -> None:
    """Renames the folder `src` to `dst`; FileExistsError if `dst` exists.

    rename(2) refuses to replace a non-empty folder, and every version folder appears
    complete (non-empty) in one rename, so of two exporters renaming onto one version
    exactly one wins, atomically; the pre-check only covers an empty folder someone
    made by hand.
    """
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "version folder exists", dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "version folder exists", dst) from e
        raise


def _replace_version(tmp: str, target: str, version: int) -> None:
    """Puts `tmp` at `target`, moving the old version aside under a temp name first.

    A kill between the two renames leaves `.replaced-<v>.tmp-<pid>-...`, which the next
    export moves back (`remove_stale_temps`).
    """
    aside = fileio.temp_name(os.path.join(os.path.dirname(target), f".replaced-{version}"))
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        aside = None
    try:
        _rename_noreplace(tmp, target)
    except BaseException:
        if aside is not None and not os.path.exists(target):
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def plan_version(base_path: str, metadata: dict, version: int | None,
                  overwrite: bool) -> dict:
    """Which version a stage goes to, decided before anything is written.

    Returns:
        `{"version": v, "action": "up to date" | "new" | "replace"}`.

    Raises:
        ExportExistsError: `version` is given, exists, holds other weights (or unknown
            ones), and `overwrite` is False.
    """
    versions = existing_versions(base_path)
    if version is None:
        if not versions:
            return {"version": 1, "action": "new"}
        current = versions[-1]  # the one TF Serving serves
        if overwrite:
            return {"version": current, "action": "replace"}
        if same_export(read_version_metadata(os.path.join(base_path, str(current))),
                       metadata):
            return {"version": current, "action": "up to date"}
        return {"version": current + 1, "action": "new"}
    if version not in versions:
        return {"version": version, "action": "new"}
    if overwrite:
        return {"version": version, "action": "replace"}
    target = os.path.join(base_path, str(version))
    if same_export(read_version_metadata(target), metadata):
        return {"version": version, "action": "up to date"}
    raise ExportExistsError(
        f"{target} already holds version {version} of {metadata['model_name']} with other "
        "weights (or settings); pass overwrite=True (--overwrite) to replace it, or leave "
        "the version unset to export the next one.")


def claim_version(tmp: str, base_path: str, metadata: dict, plan: dict,
                  explicit: bool) -> tuple:
    """Renames the finished build folder `tmp` into its version folder under `base_path`.

    A dot-name is not a numeric version, so TF Serving ignores `tmp` while it is
    written. When another exporter claimed the planned number first, its metadata
    decides: the same weights make this export up to date; other weights move this one
    to the next free number, or (an `explicit` version) raise ExportExistsError.

    Returns:
        `(version, status)`, status `"exported"`, `"replaced"` or `"up to date"`.
    """
    version = plan["version"]
    serving_name = metadata["model_name"]
    while True:
        fileio.atomic_write_json(os.path.join(tmp, METADATA_FILE),
                                 {**metadata, "version": version})
        target = os.path.join(base_path, str(version))
        if plan["action"] == "replace":
            _replace_version(tmp, target, version)
            return version, "replaced"
        try:
            _rename_noreplace(tmp, target)
            return version, "exported"
        except FileExistsError:
            other = read_version_metadata(target)
            if same_export(other, metadata):
                return version, "up to date"
            if explicit:
                raise ExportExistsError(
                    f"{target}: another export claimed version {version} of "
                    f"{serving_name} with other weights meanwhile; pass "
                    "overwrite=True or leave the version unset.") from None
            print(f"[export] {serving_name}: version {version} was claimed by "
                  "another export meanwhile; taking the next one", flush=True)
            version = max(existing_versions(base_path) + [version]) + 1

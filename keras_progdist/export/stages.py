"""Exporting stages: each one a SavedModel version folder (+ warm-up, metadata) and a
`.keras` file, idempotent by the weights' sha256 (the files: see the package docstring).

Exporting weights that the current version already holds (same weights sha256, same
settings) writes nothing; other weights get the next number; `overwrite=True` replaces
the current version. SavedModels need the TensorFlow backend (`serving_graph` is imported
when a version is written).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

from keras_progdist import fileio
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.export.errors import ExportError
from keras_progdist.export.metadata import (
    KERAS_METADATA_SUFFIX,
    read_json,
    same_export,
    stage_metadata,
)
from keras_progdist.export.settings import (
    DEFAULT_VERSION,
    SERVING_ROOT,
    ExportOptions,
    check_name,
    check_version,
    serving_limits,
)
from keras_progdist.export.tf_serving import (
    serving_apis,
    write_models_config,
    write_warmup_requests,
)
from keras_progdist.export.versions import (
    BUILD_PREFIX,
    claim_version,
    plan_version,
    remove_stale_root_temps,
    stage_paths,
)
from keras_progdist.sampling_model import sampling_copy


def _write_version(model, paths, num_steps, limits, metadata, plan, explicit,
                   warmup_batch_sizes) -> tuple:
    """Builds the SavedModel under a dot-name and claims its version folder
    (`versions.claim_version`).

    Returns:
        `(version, status)`, status `"exported"`, `"replaced"` or `"up to date"`.
    """
    from keras_progdist.export import serving_graph  # TensorFlow

    base = paths["base_path"]
    os.makedirs(base, exist_ok=True)
    tmp = fileio.temp_name(os.path.join(base, BUILD_PREFIX))
    try:
        archive = serving_graph.build_archive(model, num_steps, **limits)
        archive.write_out(tmp, verbose=False)
        write_warmup_requests(tmp, paths["model_name"], model.num_classes,
                              warmup_batch_sizes, guided=model.guided)
        return claim_version(tmp, base, metadata, plan, explicit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_keras(model, num_steps, paths, metadata, version, overwrite) -> str:
    """Writes the `.keras` file and its `.keras.json` unless they already hold `metadata`.

    The `.keras` file follows the highest version: an explicit export of an older
    version leaves a newer one's file alone.

    Returns:
        `"exported"`, `"up to date"` or `"kept"` (a newer version's file).
    """
    path, sidecar = paths["keras"], paths["keras"] + KERAS_METADATA_SUFFIX
    recorded = read_json(sidecar)
    if isinstance(recorded, dict) and int(recorded.get("version") or 0) > version \
            and os.path.exists(path):
        return "kept"
    # The file hash catches a .keras replaced behind the sidecar's back (or a kill
    # between writing the two).
    if not overwrite and same_export(recorded, metadata) and os.path.exists(path) \
            and recorded.get("file_sha256") == fileio.sha256_file(path):
        return "up to date"
    sampler = sampling_copy(model, num_steps)
    with fileio.temporary(path, ".keras") as tmp:  # Keras insists on the extension
        with warnings.catch_warnings():
            # DiffusionModel.call is never run, so Keras calls it unbuilt; its network is
            # built and every weight is saved.
            warnings.filterwarnings("ignore", message=".*has not yet been built.*")
            sampler.save(tmp)
        file_sha256 = fileio.sha256_file(tmp)
        os.replace(tmp, path)
    fileio.atomic_write_json(sidecar, {**metadata, "version": version,
                                       "file": os.path.basename(path),
                                       "file_sha256": file_sha256})
    return "exported"


def _prepare_stage(model, export_dir: str, name: str, num_steps, options: ExportOptions,
                   stage=None) -> dict:
    """Plans one stage's export (paths, limits, metadata, version); writes nothing."""
    num_steps = int(num_steps or model.num_steps)
    paths = stage_paths(export_dir, name, num_steps, 1, stage)
    limits = serving_limits(num_steps, options.max_steps, options.max_batch,
                            options.warmup_batch_sizes)
    metadata = stage_metadata(model, name, num_steps, limits, stage)
    plan = plan_version(paths["base_path"], metadata, options.version, options.overwrite)
    return {"model": model, "num_steps": num_steps, "paths": paths, "limits": limits,
            "metadata": metadata, "plan": plan}


def _run_stage(prepared, options: ExportOptions) -> dict:
    """Writes a planned stage (unless up to date) and its `.keras` file."""
    model, num_steps = prepared["model"], prepared["num_steps"]
    paths, metadata, plan = prepared["paths"], prepared["metadata"], prepared["plan"]
    if plan["action"] == "up to date":
        saved_version, status = plan["version"], "up to date"
    else:
        saved_version, status = _write_version(
            model, paths, num_steps, prepared["limits"], metadata, plan,
            options.version is not None, options.warmup_batch_sizes)
    keras_status = _write_keras(model, num_steps, paths, metadata, saved_version,
                                options.overwrite)
    target = os.path.join(paths["base_path"], str(saved_version))
    return {"num_steps": num_steps, "model_name": paths["model_name"],
            "version": saved_version, "status": status, "keras_status": keras_status,
            "saved_model": target, "keras": paths["keras"],
            "weights_sha256": metadata["weights_sha256"], "limits": prepared["limits"]}


def export_stage(model: DiffusionModel, export_dir: str, name: str,
                 num_steps: int | None = None, version: int | None = DEFAULT_VERSION,
                 overwrite: bool = False, warmup_batch_sizes=(1,),
                 max_steps: int | None = None, max_batch: int | None = None,
                 stage: str | None = None) -> dict:
    """Exports one stage: SavedModel version folder (+ warm-up, metadata) and `.keras`.

    The `.keras` file holds `DiffusionModel(ema_decay=None, num_steps=N)` around the
    stage's sampling network. Both are written under temporary names and renamed into
    place, so TF Serving never sees a half-written version. Stale temporaries of killed
    exports are removed first.

    Args:
        model: the stage's `DiffusionModel`.
        export_dir: the export root; name: the export name.
        num_steps: the stage's step count (default `model.num_steps`).
        version: None (default): the current version if it holds these weights (nothing
            is written), else the next number. An int: that version folder.
        overwrite: replace the current (or given) version even if it holds these or
            other weights.
        warmup_batch_sizes: one warm-up request per size.
        max_steps, max_batch: the serving limits (see `serving_limits`).
        stage: the work-directory stage the model comes from; `guidance` (stage one of
            guided distillation) is exported as `<name>-guidance-<N>steps`
            (`settings.model_name`).

    Returns:
        `{"num_steps", "model_name", "version", "status" ("exported", "replaced" or
        "up to date"), "keras_status", "saved_model", "keras", "weights_sha256",
        "limits"}`.

    Raises:
        ExportExistsError: `version` exists with other weights and `overwrite` is False.
        ExportError: a bad name, version or limit.
    """
    name = check_name(name)
    options = ExportOptions(overwrite=overwrite, version=check_version(version),
                            max_steps=max_steps, max_batch=max_batch,
                            warmup_batch_sizes=tuple(warmup_batch_sizes))
    serving_apis()
    remove_stale_root_temps(os.path.join(export_dir, name))
    return _run_stage(_prepare_stage(model, export_dir, name, num_steps, options, stage),
                      options)


def export_stages(stages, export_dir: str, name: str, overwrite: bool = False,
                  version: int | None = DEFAULT_VERSION, serving_root: str = SERVING_ROOT,
                  max_steps: int | None = None, max_batch: int | None = None,
                  warmup_batch_sizes=(1,)) -> dict:
    """Exports `[(stage, num_steps, DiffusionModel)]` and writes `models.config`.

    Every stage's version is planned before anything is written, so a refused export
    (ExportExistsError) leaves the export folder as it was. Stages already exported
    with the same weights are reported up to date and not touched.

    Args:
        stages: `[(stage name, num_steps, DiffusionModel)]`.
        export_dir, name, overwrite, version, max_steps, max_batch, warmup_batch_sizes:
            as `export_stage` (the limits apply to every stage; the default max_steps
            is per stage).
        serving_root: where the server sees `export_dir` (models.config `base_path`).

    Returns:
        `{"name", "version" (as asked: None for automatic), "root", "models_config",
        "up_to_date" (bool: nothing was written), "stages": [export_stage records +
        "stage"]}`.
    """
    options = ExportOptions(overwrite=overwrite, version=version,
                            serving_root=serving_root, max_steps=max_steps,
                            max_batch=max_batch, warmup_batch_sizes=tuple(warmup_batch_sizes))
    return export_with_options(stages, export_dir, name, options)


def export_with_options(stages, export_dir: str, name: str, options: ExportOptions) -> dict:
    """`export_stages` with its settings in one `ExportOptions`."""
    name = check_name(name)
    options = dataclasses.replace(options, version=check_version(options.version))
    serving_apis()  # fail before the slow part when the protos are missing
    if not stages:
        raise ExportError("Nothing to export: no finished stage.")
    root = os.path.join(export_dir, name)
    for path in remove_stale_root_temps(root):
        print(f"[export] removed {path} (left by a killed export)", flush=True)
    prepared = [(stage, _prepare_stage(model, export_dir, name, n, options, stage))
                for stage, n, model in stages]
    exported = []
    for stage, item in prepared:
        record = _run_stage(item, options)
        exported.append({"stage": stage, **record})
        _say(stage, record)
    config = write_models_config(root, name, options.serving_root)
    up_to_date = all(r["status"] == "up to date" and r["keras_status"] != "exported"
                     for r in exported)
    return {"name": name, "version": options.version, "root": root,
            "models_config": config, "up_to_date": up_to_date, "stages": exported}


def _say(stage: str, record: dict) -> None:
    """One line on what exporting `stage` did."""
    if record["status"] == "up to date" and record["keras_status"] != "exported":
        print(f"[export] {stage}: {record['model_name']} version {record['version']} "
              f"is up to date (weights sha256 {record['weights_sha256'][:12]}): "
              "nothing written", flush=True)
    else:
        print(f"[export] {stage}: {record['status']} {record['saved_model']}, .keras "
              f"{record['keras_status']} ({record['keras']})", flush=True)

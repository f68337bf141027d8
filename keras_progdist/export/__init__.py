"""Per-stage exports for serving: TF Serving SavedModels and `.keras` files.

For the teacher and every finished distillation stage of a run, `export_workdir` writes

    <export_dir>/<name>/models.config                    TF Serving model config, all stages
    <export_dir>/<name>/<name>-<N>steps/<version>/       SavedModel (TF Serving layout)
        saved_model.pb, variables/, fingerprint.pb
        assets.extra/tf_serving_warmup_requests          PredictionLogs for serving_default
        assets.extra/export_metadata.json                weights sha256, limits, settings
    <export_dir>/<name>/<name>-<N>steps.keras            DiffusionModel(ema_decay=None,
                                                         num_steps=N) for keras.saving
    <export_dir>/<name>/<name>-<N>steps.keras.json       the same metadata for the .keras

A guided run's stage one (the w-conditioned `guidance` stage, as many steps as its
teacher) is `<name>-guidance-<N>steps` (`settings.model_name`).

One concern per module:

    settings          names, versions asked for, serving limits (`serving_limits`)
    serving_graph     the three signatures with in-graph checks (imports TensorFlow)
    tf_serving        warm-up records and `models.config`
    metadata          what an export records; when two exports are the same
    versions          version folders, planning a number, claiming it, stale temporaries
    (sampling_model   the EMA-free sampling `DiffusionModel`, on the model side)
    stages            `export_stage` / `export_stages` (idempotent by weights sha256)
    workdir_export    `load_workdir_stages`, `export_workdir`
    subprocess_export the TensorFlow subprocess that exports a run trained on JAX
    cli               `python -m keras_progdist.export`

Each SavedModel holds the whole DDIM loop in its graph, so one model serves any step
count up to a limit (see `serving_graph`). Versions follow TF Serving's convention (see
`versions`): exporting weights the current version already holds writes nothing.

Importing this package needs no TensorFlow (a JAX host exports through the subprocess);
`build_archive`, `noise_from_seeds` and `to_uint8` import `serving_graph`, and with it
TensorFlow, when first used.
"""

from __future__ import annotations

from keras_progdist.export.cli import main
from keras_progdist.export.errors import ExportError, ExportExistsError
from keras_progdist.export.metadata import METADATA_FILE, read_version_metadata, stage_metadata
from keras_progdist.export.settings import ExportOptions, check_name, default_name, serving_limits
from keras_progdist.export.stages import export_stage, export_stages
from keras_progdist.export.versions import existing_versions, stage_paths
from keras_progdist.export.workdir_export import export_workdir, load_workdir_stages

# Served by `serving_graph`, imported (with TensorFlow) on first use.
_SERVING_GRAPH = ("build_archive", "noise_from_seeds", "to_uint8")


def __getattr__(name):
    if name in _SERVING_GRAPH:
        from keras_progdist.export import serving_graph

        return getattr(serving_graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SERVING_GRAPH))


__all__ = [
    "METADATA_FILE", "ExportError", "ExportExistsError", "ExportOptions", "build_archive",
    "check_name", "default_name", "existing_versions", "export_stage", "export_stages",
    "export_workdir", "load_workdir_stages", "main", "noise_from_seeds",
    "read_version_metadata", "serving_limits", "stage_metadata", "stage_paths",
    "to_uint8",
]

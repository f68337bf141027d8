"""Scoring models: the one loop every evaluation runs, and what scoring a model writes.

`score_models` is the loop of both `report.evaluate_workdir` (a work directory's models)
and `report.score_sample_dir` (a folder of sample files, no models). For each model (a
`ScoreJob`) a saved score whose key matches is reused; otherwise, unless the deadline
has passed (`errors.Interrupted`), the FID network and the real features are loaded
(once, when the first model needs them: a re-run with every score saved needs neither),
the model is scored, from its sample files or sampled here, and its score is written
atomically before the next model starts, so an interrupted evaluation goes on where it
stopped.

Scoring a model writes, into the evaluation's folder (an `EvalDir`): its score
(`run_record`), its sample grid (`image`) and its first samples for the comparisons
(`run_probe`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np

from keras_progdist import fileio, images
from keras_progdist.distribute import describe_device
from keras_progdist.errors import Interrupted
from keras_progdist.evaluation import comparisons, metrics, reference, sample_files
from keras_progdist.evaluation.samples import generate_range
from keras_progdist.settings import EvaluateSettings, as_record
from keras_progdist.workdir import EvalDir

# Samples per model in its grid.
GRID_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """One model to score, and where its samples come from: its sample files
    (`manifest` in `sample_dir`) or, without files, its `model`, sampled here.

    Attributes:
        name: the model's name (`sample_files.model_name`), its score's file name.
        kind, num_steps: what the model is (`ddim`, `teacher`, `distilled`).
        key: what its saved score must match to be reused.
        settings: the settings it is scored with (for files: their `num_samples`,
            `seed` and noise `batch_size`).
        manifest, sample_dir: its sample files, or None.
        model: a `DiffusionModel` to sample when there are no files.
        note: a line printed before it is scored (why its files were not used).
        record: more fields for its result.
    """

    name: str
    kind: str
    num_steps: int
    key: dict
    settings: EvaluateSettings
    manifest: dict | None = None
    sample_dir: str | None = None
    model: object = None
    note: str | None = None
    record: dict = dataclasses.field(default_factory=dict)


def score_protocol(cfg: EvaluateSettings, dataset: dict) -> dict:
    """What a score depends on besides the weights (and the sample files, when used):
    the base of every score's key."""
    record = as_record(cfg)
    protocol = {k: record[k] for k in ("num_samples", "num_reference", "split", "seed",
                                       "bootstrap")}
    protocol["noise_batch_size"] = cfg.batch_size
    protocol["dataset"] = reference.dataset_label(dataset)[1]
    protocol["reference"] = reference.reference_digest(cfg, dataset)
    return protocol


def cached_result(path: str, key: dict):
    """The `result` of a `{key, result}` score file whose key equals `key`, else None
    (no file, another key, or a torn or foreign file: score again)."""
    record = fileio.read_keyed_json(path, key)
    return None if record is None else record.get("result")


def score_models(jobs: list, out: EvalDir, dataset: dict, verbose: int = 1,
                 deadline: float | None = None) -> list:
    """Scores every job not scored before with the same key; see the module doc.

    Args:
        jobs: `ScoreJob`s, in report order.
        out: where the scores, grids and probes go.
        dataset: the dataset settings (which real images).
        verbose: 0 quiet; 1 a progress bar; 2 one plain line per model.
        deadline: `time.time()` after which no new model is started.

    Returns:
        The results, one per job, in order.

    Raises:
        errors.Interrupted: the deadline passed before a model still to score.
    """
    os.makedirs(out.runs_dir(), exist_ok=True)
    fid = _FIDInputs(dataset, verbose)
    progress = keras.utils.Progbar(len(jobs), unit_name="model") if verbose == 1 else None
    results = []
    for job in jobs:
        path = out.run_record(job.name)
        result, how = cached_result(path, job.key), "saved earlier"
        if result is None:
            if deadline is not None and time.time() > deadline:
                raise Interrupted(
                    f"[eval] time budget spent after {len(results)} of {len(jobs)} models; "
                    f"their scores are saved in {out.runs_dir()}. Re-run to go on.")
            result = score(job, *fid.get(job.settings), out, verbose)
            fileio.atomic_write_json(path, {"key": job.key, "result": result})
            how = result["source"]
        results.append(result)
        if progress:
            progress.add(1)
        elif verbose >= 2:
            print(_line(result, how), flush=True)
    return results


class _FIDInputs:
    """The FID network and the real features, loaded on the first `get`."""

    def __init__(self, dataset: dict, verbose: int):
        self.dataset, self.verbose = dataset, verbose
        self.fid_model = self.real = None

    def get(self, cfg: EvaluateSettings) -> tuple:
        # Through the package: its network names load lazily (and tests replace them).
        from keras_progdist import evaluation

        if self.fid_model is None:
            self.fid_model = evaluation.load_fid_network()
            self.real = reference.reference_features(self.fid_model, cfg, self.dataset,
                                                     self.verbose)
        return self.fid_model, self.real


def score(job: ScoreJob, fid_model, real: np.ndarray, out: EvalDir,
          verbose: int = 1) -> dict:
    """One model's FID, KID and their bootstrap, from its files or sampled here.

    Args:
        job: the model.
        fid_model: from `evaluation.load_fid_network()`.
        real: the real images' features.
        out: where its grid and probe go.
        verbose: prints `job.note` when nonzero.

    Returns:
        The result: `kind`, `num_steps`, the scores (`metrics.fid_and_kid`,
        `comparisons.bootstrap_scores`), timings, backend, device, `source` (`files`
        or `in-process`), and `job.record`.
    """
    if job.note and verbose:
        print(job.note, flush=True)
    if job.manifest is not None:
        source, sample_seconds = job.manifest, job.manifest.get("sample_seconds")
    else:
        cfg, began = job.settings, time.time()
        source = generate_range(job.model, job.num_steps, 0, cfg.num_samples,
                                cfg.num_samples, cfg.batch_size, cfg.seed,
                                job.model.num_classes)
        sample_seconds = time.time() - began
    start = time.time()
    model = sample_files.model_name(job.kind, job.num_steps)
    images.save_grid(_first(source, job.sample_dir, GRID_SAMPLES), out.image(f"{model}steps"))
    _save_probe(out.run_probe(model), source, job.sample_dir)
    features = fake_features(fid_model, source, job.settings, job.sample_dir)
    scores = metrics.fid_and_kid(real, features)
    scores.update(comparisons.bootstrap_scores(
        real, features, job.settings.bootstrap, job.settings.seed,
        with_fid=scores["fid"] is not None))
    result = {"kind": job.kind, "num_steps": job.num_steps, **_jsonable(scores),
              "sample_seconds": sample_seconds,
              "eval_seconds": time.time() - start + (sample_seconds or 0.0),
              "backend": keras.backend.backend(), "device": describe_device()}
    if job.manifest is not None:
        result.update(source="files", sample_backend=job.manifest["protocol"]["backend"],
                      samples_sha256=sample_files.samples_sha256(job.manifest))
    else:
        result["source"] = "in-process"
    return {**result, **job.record}


def fake_features(fid_model, source, cfg: EvaluateSettings,
                  sample_dir: str | None = None) -> np.ndarray:
    """FID features of generated samples, batched exactly as in-process scoring batches.

    Args:
        fid_model: from `evaluation.load_fid_network()`.
        source: float samples in [-1, 1] (in process), or a samples manifest whose
            files are read one by one from `sample_dir`.
        cfg: the evaluation settings (its `batch_size` is the feature batch).
        sample_dir: the folder of the manifest's files.

    Returns:
        float32 [num_samples, 2048].
    """
    from keras_progdist import evaluation

    batch = cfg.batch_size
    if not isinstance(source, dict):
        return evaluation.compute_features(fid_model, source, batch_size=batch)
    total = source["protocol"]["num_samples"]
    if total <= batch:
        return evaluation.compute_features(fid_model, sample_files.load_samples(
            source, sample_dir), batch_size=batch)
    out = []
    for pixels in sample_files.iter_batches(source, sample_dir, batch):
        count = len(pixels)
        if count < batch:
            # `compute_features` pads a short last batch by repeating its last image,
            # so the network always runs at one batch shape; do the same here.
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch - count, 0)])
        out.append(evaluation.compute_features(fid_model, pixels, batch_size=batch)[:count])
    return np.concatenate(out)


def _first(source, sample_dir: str | None, count: int) -> np.ndarray:
    """The first `count` samples: floats in process, uint8 from files."""
    if isinstance(source, dict):
        return sample_files.load_samples(source, sample_dir, count)
    return source[:count]


def _save_probe(path: str, source, sample_dir: str | None) -> None:
    # The comparisons' RMSEs need samples of two models at once, and a resumed
    # evaluation holds only one model's: keep the first few of each.
    pixels = images.to_uint8(_first(source, sample_dir, comparisons.PROBE_SAMPLES))
    fileio.atomic_write(path, lambda f: np.savez(f, pixels=pixels))


def load_probes(out: EvalDir, results: list) -> dict:
    """`{(kind, num_steps): uint8 samples}`: the first `comparisons.PROBE_SAMPLES` of
    each scored model that has them."""
    probes = {}
    for r in results:
        path = out.run_probe(sample_files.model_name(r["kind"], r["num_steps"]))
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as npz:
                probes[(r["kind"], r["num_steps"])] = npz["pixels"]
    return probes


def _jsonable(scores: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in scores.items()}


def _line(result: dict, how: str) -> str:
    fid = "" if result.get("fid") is None else f"FID {result['fid']:.2f}, "
    return (f"[eval] {result['kind']} {result['num_steps']} steps: {fid}KID×1e3 "
            f"{1e3 * result['kid']:.2f} ± "
            f"{1e3 * (result.get('kid_se') or result.get('kid_std_err') or 0):.2f} "
            f"({how})")

"""`--mode=eval`: FID/KID of the teacher, undistilled DDIM and every distilled stage.

Takes a `WorkDir` (the models: `WorkDir.stage_models`) and plain settings: the
evaluation settings (`training.config.evaluate()`) and the dataset settings (the
`dataset.*` values in force, `training.config.dataset_settings()`; `data.make_dataset`'s
defaults fill in the rest). It reads no gin.

Writes to `<workdir>/eval/`: `metrics.json`, `report.md`, the plot
(`fid_vs_steps.png`, or `kid_vs_steps.png` when FID is not available: named by what it
plots), one sample grid per evaluated model, and `runs/<model>.json` (each model's
scores, saved as soon as they exist). A model whose sample files
(`samples.write_workdir_samples`, in `<workdir>/eval/samples/`) are complete and
match its weights and the settings is scored from those files; the others are sampled
in process from the same noise, so both give the same scores. `score_sample_dir`
scores a folder of sample files without any model (e.g. files made on a GPU host).
Real-data features are cached by everything that changes them (`reference_key`).
"""

from __future__ import annotations

import inspect
import json
import os
import time

import keras
import numpy as np

from keras_progdist.errors import KerasProgdistError
from keras_progdist import data, fileio, images
from keras_progdist.distribute import describe_device
from keras_progdist.evaluation import comparisons, metrics, reference_cache
from keras_progdist.evaluation import samples as sample_files
from keras_progdist.workdir import WorkDir, WorkDirError

# What the evaluation settings hold (`training.config.evaluate()` makes and checks them).
SETTINGS_KEYS = ("num_samples", "num_reference", "ddim_steps", "teacher_steps",
                 "batch_size", "split", "seed", "cache_dir", "max_file_mb", "bootstrap")


class EvaluationError(KerasProgdistError, ValueError):
    """An evaluation that cannot run (nothing trained, bad settings, no data)."""


def check_settings(cfg: dict) -> dict:
    """`cfg` if it holds every evaluation setting (`SETTINGS_KEYS`).

    Raises:
        EvaluationError: a setting is missing (make them with
            `training.config.evaluate()`, which also checks their values).
    """
    missing = [k for k in SETTINGS_KEYS if k not in (cfg or {})]
    if missing:
        raise EvaluationError(f"Evaluation settings lack {missing}: pass the dict "
                              "`training.config.evaluate()` returns.")
    return cfg


def with_dataset_defaults(dataset: dict) -> dict:
    """The dataset settings with `data.make_dataset`'s defaults for those not given."""
    defaults = {name: p.default for name, p in
                inspect.signature(data.make_dataset).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **dataset}


def _dataset_key(dataset: dict) -> tuple:
    dataset = with_dataset_defaults(dataset)
    name = dataset["name"]
    key = f"{name}-{dataset.get('image_size') or 'native'}-{dataset.get('resize')}"
    return name, key


def _resolved(path):
    return None if path is None else os.path.realpath(os.path.expanduser(str(path)))


def reference_key(cfg: dict, dataset: dict) -> dict:
    """Everything that changes the real images' features: the reference cache key.

    The real images are the first `num_reference` of the split in stored order (no
    shuffle, no flip), so the evaluation seed does not enter. The backend does: its
    resize and its FID network agree with the other backend's only to ~1e-5.

    Args:
        cfg: the evaluation settings.
        dataset: the dataset settings.

    Returns:
        A JSON-able dict.
    """
    b = with_dataset_defaults(dataset)
    return {"dataset": b["name"], "data_dir": _resolved(b.get("data_dir")),
            "manual_dir": _resolved(b.get("manual_dir")), "split": cfg["split"],
            "image_size": b.get("image_size"), "resize": b.get("resize"),
            "num_reference": cfg["num_reference"],
            "selection": "first num_reference in stored order, no flip",
            "pixels": "uint8 round(preprocess(image))",
            "backend": keras.backend.backend()}


def _digest(value) -> str:
    import hashlib

    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def reference_features(fid_model, cfg: dict, dataset: dict,
                       verbose: int = 1) -> np.ndarray:
    """FID features of the real images, cached by `reference_key`.

    A cache entry that cannot be read (truncated, bad checksum, not a zip) is rebuilt
    with a `reference_cache.ReferenceStatsRebuiltWarning`.

    Args:
        fid_model: from `evaluation.load_fid_network()` (None: loaded when needed).
        cfg: the evaluation settings.
        dataset: the dataset settings.
        verbose: 0 silent, 1 a progress bar, 2 plain lines.

    Returns:
        float32 [num_reference, 2048].
    """
    from keras_progdist import evaluation

    b = with_dataset_defaults(dataset)
    name, readable = _dataset_key(b)

    def build():
        real, _ = data.load_images(name, split=cfg["split"], data_dir=b.get("data_dir"),
                                   manual_dir=b.get("manual_dir"),
                                   image_size=b.get("image_size"),
                                   resize=b.get("resize", "bilinear"),
                                   limit=cfg["num_reference"],
                                   max_image_pixels=b["max_image_pixels"])
        if verbose:
            print(f"[eval] reference features of {len(real)} real {name} images",
                  flush=True)
        model = fid_model if fid_model is not None else evaluation.load_fid_network()
        return evaluation.compute_features(model, real, batch_size=cfg["batch_size"],
                                           verbose=verbose == 1)

    stats = reference_cache.cached_reference_stats(
        readable, f"{cfg['split']}-n{cfg['num_reference']}", build,
        key=reference_key(cfg, b), cache_dir=cfg["cache_dir"])
    if verbose >= 2 and stats["built"]:
        print(f"[eval] reference statistics cached in {stats['path']}", flush=True)
    return stats["features"]


def generate(model, num_steps: int, cfg: dict, num_classes=None) -> np.ndarray:
    """`num_samples` DDIM samples in [-1, 1] from the evaluation's fixed noise.

    The same samples `samples.write_workdir_samples` stores (see
    `samples.generate_range`).
    """
    return sample_files.generate_range(model, num_steps, 0, cfg["num_samples"],
                                       cfg["num_samples"], cfg["batch_size"],
                                       cfg["seed"], num_classes)


def fake_features(fid_model, source, cfg: dict, sample_dir: str | None = None) -> np.ndarray:
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

    batch = cfg["batch_size"]
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


class EvaluationInterrupted(RuntimeError):
    """The evaluation's deadline passed; finished models are kept, re-run to go on."""


def as_workdir(workdir) -> WorkDir:
    """A `WorkDir`, given one or its folder."""
    return workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)


def evaluation_runs(workdir, cfg: dict) -> list:
    """The models an evaluation scores, in report order.

    Args:
        workdir: a `WorkDir` (or its folder) with at least a finished teacher.
        cfg: the evaluation settings.

    Returns:
        dicts with `kind` (`ddim`, `teacher`, `distilled`), `num_steps`, `stage`,
        `model` (a `DiffusionModel`) and `weights_sha256` (of the stage's `final`
        weights: a cached score belongs to those weights).

    Raises:
        EvaluationError: no config record or no finished teacher.
    """
    workdir = as_workdir(workdir)
    try:
        stage_models = workdir.stage_models()
    except WorkDirError as e:
        raise EvaluationError(f"Nothing to evaluate in {workdir.root}: {e}") from None
    _, teacher_full, teacher_model = stage_models[0]
    runs = [("ddim", s, "teacher", teacher_model) for s in cfg["ddim_steps"]
            if s < teacher_full]
    runs += [("teacher", s, "teacher", teacher_model)
             for s in sorted(set(cfg["teacher_steps"]))
             if s < teacher_full and s not in cfg["ddim_steps"]]
    runs.append(("teacher", teacher_full, "teacher", teacher_model))
    runs += [("distilled", n, stage, model) for stage, n, model in stage_models[1:]]
    return [{"kind": kind, "num_steps": steps, "stage": stage, "model": model,
             "weights_sha256": workdir.final_sha256(stage)}
            for kind, steps, stage, model in runs]


def cached_result(path: str, key: dict):
    """The `result` of a `{key, result}` score file whose key equals `key`, else None
    (no file, another key, or a torn or foreign file: score again)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # a torn or foreign file: evaluate again
    return record.get("result") if record.get("key") == key else None


def _score_protocol(cfg: dict, dataset: dict) -> dict:
    # What a score depends on besides the weights (and the sample files, when used).
    protocol = {k: cfg[k] for k in ("num_samples", "num_reference", "split", "seed",
                                    "bootstrap")}
    protocol["noise_batch_size"] = cfg["batch_size"]
    protocol["dataset"] = _dataset_key(dataset)[1]
    protocol["reference"] = _digest(reference_key(cfg, dataset))
    return protocol


def usable_sample_files(sample_dir: str | None, name: str, weights_sha256: str,
                        num_steps: int, cfg: dict, image_shape=None):
    """The manifest of `name` in `sample_dir` when its files can stand in for sampling.

    Usable means: complete, every file matching its sha256, the same weights, the
    evaluation's num_samples, seed, noise batch size and steps, and (when given) the
    model's `image_shape`.

    Returns:
        `(manifest, None)`, or `(None, why not)`; `(None, None)` when there is none.
    """
    if not sample_dir:
        return None, None
    path = sample_files.manifest_path(sample_dir, name)
    if not os.path.exists(path):
        return None, None
    try:
        manifest = sample_files.read_manifest(path)
        proto = manifest["protocol"]
        wanted = {"weights_sha256": weights_sha256, "num_samples": cfg["num_samples"],
                  "seed": cfg["seed"], "noise_batch_size": cfg["batch_size"],
                  "num_steps": num_steps}
        found = {"weights_sha256": manifest.get("weights_sha256"),
                 **{k: proto.get(k) for k in wanted if k != "weights_sha256"}}
        if found != wanted:
            diff = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
            return None, f"made for other weights or settings (files, eval) = {diff}"
        if image_shape is not None:
            sample_files.check_image_shape(manifest, image_shape)
        sample_files.check_complete(manifest, sample_dir)
    except (sample_files.SampleFilesError, KeyError) as e:
        return None, str(e)
    return manifest, None


def _score(fid_model, real, kind, steps, cfg, out_dir, source, sample_dir=None,
           sample_seconds=None) -> dict:
    start = time.time()
    if isinstance(source, dict):
        grid = sample_files.load_samples(source, sample_dir, 64)
    else:
        grid = source[:64]
    images.save_grid(grid, os.path.join(out_dir, f"{kind}_{steps:05d}steps.png"))
    _save_probe(out_dir, kind, steps, source, sample_dir)
    features = fake_features(fid_model, source, cfg, sample_dir)
    scores = metrics.fid_and_kid(real, features)
    scores.update(comparisons.bootstrap_scores(real, features, cfg["bootstrap"], cfg["seed"],
                                               with_fid=scores["fid"] is not None))
    result = {"kind": kind, "num_steps": steps, **_jsonable(scores),
              "sample_seconds": sample_seconds,
              "eval_seconds": time.time() - start + (sample_seconds or 0.0),
              "backend": keras.backend.backend(), "device": describe_device()}
    if isinstance(source, dict):
        result.update(source="files", sample_backend=source["protocol"]["backend"],
                      samples_sha256=sample_files.samples_sha256(source))
    else:
        result["source"] = "in-process"
    return result


def probe_path(out_dir: str, kind: str, num_steps: int) -> str:
    """Where a model's first `comparisons.PROBE_SAMPLES` samples (uint8) are kept."""
    return os.path.join(out_dir, "runs", f"{sample_files.model_name(kind, num_steps)}.npz")


def _save_probe(out_dir: str, kind: str, steps: int, source, sample_dir) -> None:
    # The comparisons' RMSEs need samples of two models at once, and a resumed
    # evaluation holds only one model's: keep the first few of each.
    count = comparisons.PROBE_SAMPLES
    if isinstance(source, dict):
        pixels = sample_files.load_samples(source, sample_dir, count)
    else:
        pixels = images.to_uint8(source[:count])
    fileio.atomic_write(probe_path(out_dir, kind, steps),
                        lambda f: np.savez(f, pixels=pixels))


def _load_probes(out_dir: str, results: list) -> dict:
    probes = {}
    for r in results:
        path = probe_path(out_dir, r["kind"], r["num_steps"])
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as npz:
                probes[(r["kind"], r["num_steps"])] = npz["pixels"]
    return probes


def _show(result: dict, how: str, progress, verbose: int) -> None:
    """One model scored: advance the progress bar, or print its line at verbose=2."""
    if progress:
        progress.add(1)
    elif verbose >= 2:
        print(_line(result, how), flush=True)


def _line(result: dict, how: str) -> str:
    fid = "" if result.get("fid") is None else f"FID {result['fid']:.2f}, "
    return (f"[eval] {result['kind']} {result['num_steps']} steps: {fid}KID×1e3 "
            f"{1e3 * result['kid']:.2f} ± "
            f"{1e3 * (result.get('kid_se') or result.get('kid_std_err') or 0):.2f} "
            f"({how})")


def evaluate_workdir(workdir, cfg: dict, dataset: dict, verbose: int = 1,
                     deadline: float | None = None, sample_dir: str | None = None) -> dict:
    """Evaluates every finished stage of a work directory; returns the metrics dict.

    Each model's scores are saved as soon as they exist (`eval/runs/*.json`, keyed by
    the model's weights, the evaluation settings and, when scored from files, the
    files' sha256), so an interrupted evaluation goes on where it stopped and a re-run
    after one more stage scores only that stage. A model with usable sample files in
    `sample_dir` is scored from them instead of being sampled here.

    Args:
        workdir: a `WorkDir` (or its folder) with at least a finished teacher.
        cfg: the evaluation settings (`training.config.evaluate()`).
        dataset: the dataset settings (`training.config.dataset_settings()`): which
            real images, and how they are preprocessed.
        verbose: 0 quiet; 1 progress bars and the table; 2 one plain line per model
            (for logs: no ANSI codes or backspaces) and the table.
        deadline: `time.time()` after which no new model is started; the finished
            ones are kept and `EvaluationInterrupted` is raised.
        sample_dir: where to look for sample files (default `<workdir>/eval/samples`;
            "" never uses files).

    Returns:
        The report dict written to `metrics.json`.
    """
    verbose = int(verbose)
    wd, cfg = as_workdir(workdir), check_settings(cfg)
    runs = evaluation_runs(wd, cfg)
    out_dir = wd.path("eval")
    if sample_dir is None:
        sample_dir = os.path.join(out_dir, "samples")
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    protocol = _score_protocol(cfg, dataset)
    state = {"fid_model": None, "real": None}
    results = []
    progress = keras.utils.Progbar(len(runs), unit_name="model") if verbose == 1 else None
    for run in runs:
        kind, steps = run["kind"], run["num_steps"]
        name = sample_files.model_name(kind, steps)
        path = os.path.join(out_dir, "runs", f"{name}.json")
        manifest, why_not = usable_sample_files(sample_dir, name, run["weights_sha256"],
                                                steps, cfg, run["model"].image_shape)
        key = {**protocol, "weights_sha256": run["weights_sha256"]}
        if manifest is not None:
            key["samples_sha256"] = sample_files.samples_sha256(manifest)
        result = cached_result(path, key)
        if result is None:
            _stop_at_deadline(deadline, len(results), len(runs), out_dir)
            fid_model, real = _fid_and_reference(state, cfg, dataset, verbose)
            if why_not and verbose:
                print(f"[eval] {name}: sample files not used ({why_not}); sampling here",
                      flush=True)
            if manifest is not None:
                result = _score(fid_model, real, kind, steps, cfg, out_dir, manifest,
                                sample_dir, manifest.get("sample_seconds"))
            else:
                start = time.time()
                fake = generate(run["model"], steps, cfg, run["model"].num_classes)
                result = _score(fid_model, real, kind, steps, cfg, out_dir, fake,
                                sample_seconds=time.time() - start)
            fileio.atomic_write_json(path, {"key": key, "result": result})
            how = result["source"]
        else:
            how = "saved earlier"
        results.append(result)
        _show(result, how, progress, verbose)
    report = {
        "workdir": wd.root,
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "num_samples": cfg["num_samples"],
        "num_reference": results[0]["num_real"],
        "dataset": dict(dataset),
        "stages": wd.finished_stages(),
        "results": results,
    }
    return _write_report(report, out_dir, verbose)


def _stop_at_deadline(deadline, done: int, total: int, out_dir: str) -> None:
    """Raises `EvaluationInterrupted` once `deadline` has passed (no new model starts)."""
    if deadline is not None and time.time() > deadline:
        raise EvaluationInterrupted(
            f"[eval] time budget spent after {done} of {total} models; their scores are "
            f"saved in {out_dir}/runs. Re-run to go on.")


def _fid_and_reference(state: dict, cfg: dict, dataset: dict, verbose: int):
    # The FID network and the real features are loaded only when a model needs
    # scoring: a re-run with every score saved needs neither.
    from keras_progdist import evaluation

    if state["fid_model"] is None:
        state["fid_model"] = evaluation.load_fid_network()
        state["real"] = reference_features(state["fid_model"], cfg, dataset, verbose)
    return state["fid_model"], state["real"]


SIDE_BY_SIDE = "distilled_vs_ddim.png"
SIDE_BY_SIDE_COLUMNS = 8


def _side_by_side(out_dir: str, results: list, probes: dict) -> str | None:
    """One grid from the same noise: the teacher's first row, then for every N (most
    steps first) a row of the distilled student and a row of undistilled DDIM."""
    teacher = max((r["num_steps"] for r in results if r["kind"] == "teacher"), default=None)
    steps = sorted({n for kind, n in probes if kind == "distilled"
                    and ("ddim", n) in probes}, reverse=True)
    if teacher is None or not steps or ("teacher", teacher) not in probes:
        return None
    rows = [probes[("teacher", teacher)]] + [probes[(kind, n)] for n in steps
                                              for kind in ("distilled", "ddim")]
    count = min(SIDE_BY_SIDE_COLUMNS, *(len(r) for r in rows))
    path = os.path.join(out_dir, SIDE_BY_SIDE)
    images.save_grid(np.concatenate([r[:count] for r in rows]), path, columns=count)
    return f"{SIDE_BY_SIDE}: rows top to bottom: teacher ({teacher} steps), then " + \
        ", ".join(f"distilled {n}, DDIM {n}" for n in steps) + " steps; same noise per column."


def _write_report(report: dict, out_dir: str, verbose: int) -> dict:
    probes = _load_probes(out_dir, report["results"])
    report["comparisons"] = comparisons.compare(report["results"], probes)
    report["side_by_side"] = _side_by_side(out_dir, report["results"], probes)
    for entry in report["comparisons"]:
        # Each model's line in TensorBoard and the JSON carries its comparison too.
        for r in report["results"]:
            if (r["kind"], r["num_steps"]) == (entry["kind"], entry["num_steps"]):
                r["vs_teacher"] = entry
    name = plot_filename(report["results"])
    for stale in {"fid_vs_steps.png", "kid_vs_steps.png"} - {name}:
        # A plot under the other metric's name would be from an older run.
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    report["plot"] = name
    fileio.atomic_write_text(os.path.join(out_dir, "metrics.json"),
                             json.dumps(report, indent=1))
    fileio.atomic_write_text(os.path.join(out_dir, "report.md"), markdown(report))
    plot(report["results"], os.path.join(out_dir, name))
    if verbose:
        print(markdown(report), flush=True)
    return report


_KIND_ORDER = {"ddim": 0, "teacher": 1, "distilled": 2}


def score_sample_dir(sample_dir: str, cfg: dict, dataset: dict, out_dir: str | None = None,
                     verbose: int = 1, deadline: float | None = None) -> dict:
    """Scores every complete model in a folder of sample files; no models needed.

    For files made elsewhere (e.g. `--mode=sample` on a GPU host): copy the folder
    (npz files and manifests) and score it with the same settings (the dataset
    settings and `num_reference`, `split`, `cache_dir` give the real images and the
    cache; `num_samples`, `seed` and the noise batch size come from each manifest).
    Scores are saved per model in `<out_dir>/runs/`, keyed by the weights' sha256
    (from the manifest), the protocol and the files' sha256.

    Args:
        sample_dir: the folder with `<model>.json` manifests and their npz files.
        cfg: the evaluation settings (`training.config.evaluate()`).
        dataset: the dataset settings (`training.config.dataset_settings()`).
        out_dir: where results go (default: `sample_dir`).
        verbose: 0 quiet, 1 progress bars and the table, 2 plain lines and the table.
        deadline: `time.time()` after which no new model is started.

    Returns:
        The report dict written to `<out_dir>/metrics.json`.

    Raises:
        EvaluationError: no complete manifest in `sample_dir`.
    """
    verbose = int(verbose)
    check_settings(cfg)
    out_dir = out_dir or sample_dir
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    manifests = []
    size = with_dataset_defaults(dataset).get("image_size")
    for manifest in sample_files.find_manifests(sample_dir):
        if size:  # the run's images are size x size; the channels are the data's
            try:
                shape = manifest["protocol"]["image_shape"]
                sample_files.check_image_shape(manifest, (size, size, shape[-1]))
            except sample_files.SampleFilesError as e:
                # Scores against real images of another size would mean nothing.
                raise EvaluationError(f"{sample_dir}: {e}") from None
        try:
            sample_files.check_complete(manifest, sample_dir)
        except sample_files.SampleFilesError as e:
            if verbose:
                print(f"[eval] skipping {manifest['model']}: {e}", flush=True)
            continue
        manifests.append(manifest)
    if not manifests:
        raise EvaluationError(f"No complete sample files in {sample_dir}.")
    manifests.sort(key=lambda m: (_KIND_ORDER.get(m["kind"], 3),
                                  -m["num_steps"] if m["kind"] == "distilled"
                                  else m["num_steps"]))
    state = {"fid_model": None, "real": None}
    results = []
    progress = keras.utils.Progbar(len(manifests), unit_name="model") \
        if verbose == 1 else None
    for manifest in manifests:
        proto = manifest["protocol"]
        made = {**cfg, "num_samples": proto["num_samples"], "seed": proto["seed"],
                "batch_size": proto["noise_batch_size"]}
        key = {**_score_protocol(made, dataset),
               "weights_sha256": manifest["weights_sha256"],
               "samples_sha256": sample_files.samples_sha256(manifest)}
        path = os.path.join(out_dir, "runs", f"{manifest['model']}.json")
        result = cached_result(path, key)
        how = "saved earlier"
        if result is None:
            _stop_at_deadline(deadline, len(results), len(manifests), out_dir)
            fid_model, real = _fid_and_reference(state, made, dataset, verbose)
            result = _score(fid_model, real, manifest["kind"], manifest["num_steps"], made,
                            out_dir, manifest, sample_dir, manifest.get("sample_seconds"))
            result["weights_sha256"] = manifest["weights_sha256"]
            fileio.atomic_write_json(path, {"key": key, "result": result})
            how = "files"
        results.append(result)
        _show(result, how, progress, verbose)
    report = {
        "workdir": sample_dir,
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "num_samples": results[0]["num_fake"],
        "num_reference": results[0]["num_real"],
        "dataset": dict(dataset),
        "results": results,
    }
    return _write_report(report, out_dir, verbose)


def _jsonable(scores: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in scores.items()}


def _fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report in Markdown: distilled against DDIM at every N first (what
    distillation buys), then every model's FID and KID with standard errors."""
    lines = [
        f"# Evaluation of `{report['workdir']}`", "",
        f"{report['num_samples']} samples per model against {report['num_reference']} real "
        f"images ({report['dataset']}); backend {report['backend']}, device "
        f"{report['device']}. DDIM, clipped x_hat, same noise for every model.", "",
    ]
    lines += comparisons.markdown(report["results"], report.get("comparisons") or [])
    if report.get("side_by_side"):
        lines += [f"Grid `{report['side_by_side']}`", ""]
    lines += ["## Every model", "",
              "| model | steps | FID | ± s.e. | KID ×1e3 | ± s.e. |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        kid_se = r.get("kid_se", r.get("kid_std_err"))
        lines.append(f"| {r['kind']} | {r['num_steps']} | {_fmt(r['fid'])} | "
                     f"{_fmt(r.get('fid_se'))} | {_fmt(1e3 * r['kid'])} | "
                     f"{_fmt(None if kid_se is None else 1e3 * kid_se)} |")
    notes = {r["fid_note"] for r in report["results"] if r.get("fid_note")}
    lines += [""] + [f"Note: {n}" for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def plot_filename(results: list) -> str:
    """`fid_vs_steps.png` when every model has a FID, else `kid_vs_steps.png`."""
    return "fid_vs_steps.png" if all(r["fid"] is not None for r in results) \
        else "kid_vs_steps.png"


def plot(results: list, path: str) -> str:
    """FID (or KID when FID is unavailable) against steps, log-log, one line per kind.

    Args:
        results: the report's `results`.
        path: the PNG to write; name it with `plot_filename(results)`.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_fid = all(r["fid"] is not None for r in results)
    metric = "fid" if use_fid else "kid"
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    styles = {"distilled": "o-", "ddim": "s--", "teacher": "^:"}
    for kind, style in styles.items():
        points = sorted((r["num_steps"], r[metric]) for r in results if r["kind"] == kind)
        if points:
            ax.plot(*zip(*points), style, label={"distilled": "distilled",
                                                  "ddim": "undistilled DDIM",
                                                  "teacher": "teacher"}[kind])
    ax.set_xscale("log", base=2)
    if all(r[metric] > 0 for r in results):  # unbiased KID can be negative
        ax.set_yscale("log")  # DDIM at 1 step is often 10-20x the teacher
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID" if use_fid else "KID")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

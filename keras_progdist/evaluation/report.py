"""`--mode=eval`: FID/KID of the teacher, undistilled DDIM and every distilled stage.

Writes to `<workdir>/eval/`: `metrics.json`, `report.md`, `fid_vs_steps.png`
(distilled vs undistilled DDIM vs the teacher at its full step count, log-x) and one
sample grid per evaluated model. Real-data features are computed once per
(dataset, split, preprocessing, protocol) and cached with the FID statistics.
"""

from __future__ import annotations

import json
import os
import time

import gin
import keras
import numpy as np

from keras_progdist import data, images
from keras_progdist.distribute import describe_device
from keras_progdist.evaluation import metrics


class EvaluationError(ValueError):
    """An evaluation that cannot run (nothing trained, bad settings, no data)."""


@gin.configurable("evaluate")
def settings(num_samples: int = 1000, num_reference: int = 5000,
             ddim_steps=(1, 2, 4, 8), teacher_steps=None, batch_size: int = 100,
             split: str = "train", seed: int = 2024, cache_dir: str | None = None) -> dict:
    """Evaluation settings.

    Args:
        num_samples: generated images per model (FID needs >= 2048; fewer reports KID).
        num_reference: real images for the reference statistics (all when larger).
        ddim_steps: step counts of the undistilled teacher DDIM curve.
        teacher_steps: extra teacher step counts (its full count is always added).
        batch_size: sampling and feature batch size.
        split: the real split the statistics come from (the paper: training set).
        seed: first seed of the generated noise (all models see the same noise).
    """
    for name, value in (("num_samples", num_samples), ("num_reference", num_reference),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 2:
            raise EvaluationError(f"evaluate.{name} must be an integer >= 2, got {value!r}.")
    return dict(num_samples=num_samples, num_reference=num_reference,
                ddim_steps=tuple(int(s) for s in ddim_steps),
                teacher_steps=tuple(int(s) for s in (teacher_steps or ())),
                batch_size=batch_size, split=split, seed=seed, cache_dir=cache_dir)


def _dataset_key(bindings: dict, split: str) -> tuple:
    name = bindings.get("name", "mnist_embedded")
    key = f"{name}-{bindings.get('image_size') or 'native'}-{bindings.get('resize', 'bilinear')}"
    return name, key


def reference_features(fid_model, cfg: dict, verbose: bool = True) -> np.ndarray:
    """FID features of the real images, cached by dataset + preprocessing + protocol."""
    from keras_progdist import evaluation

    bindings = gin.get_bindings("dataset")
    name, key = _dataset_key(bindings, cfg["split"])
    split = f"{cfg['split']}-n{cfg['num_reference']}"
    try:
        cached = metrics.load_reference_stats(key, split, cache_dir=cfg["cache_dir"])
        if cached.get("features") is not None:
            return cached["features"]
    except metrics.ReferenceStatsNotFoundError:
        pass
    real, _ = data.load_images(name, split=cfg["split"],
                               data_dir=bindings.get("data_dir"),
                               manual_dir=bindings.get("manual_dir"),
                               image_size=bindings.get("image_size"),
                               resize=bindings.get("resize", "bilinear"),
                               limit=cfg["num_reference"])
    if verbose:
        print(f"[eval] reference features of {len(real)} real {name} images", flush=True)
    features = evaluation.compute_features(fid_model, real, batch_size=cfg["batch_size"],
                                           verbose=verbose)
    mu, sigma = metrics.feature_statistics(features)
    metrics.save_reference_stats(key, split, mu, sigma, len(features),
                                 cache_dir=cfg["cache_dir"], features=features)
    return features


def generate(model, num_steps: int, cfg: dict, num_classes=None) -> np.ndarray:
    """`num_samples` DDIM samples in [-1, 1] from the evaluation's fixed noise."""
    out = []
    for start in range(0, cfg["num_samples"], cfg["batch_size"]):
        count = min(cfg["batch_size"], cfg["num_samples"] - start)
        noise = keras.random.normal((count,) + model.image_shape,
                                    seed=cfg["seed"] + start)
        label = (np.arange(start, start + count) % num_classes).astype("int32") \
            if num_classes else None
        out.append(model.sample(noise=noise, num_steps=num_steps, label=label))
    return np.concatenate(out)


class EvaluationInterrupted(RuntimeError):
    """The evaluation's deadline passed; finished models are kept, re-run to go on."""


def _model_identity(experiment, stage: str) -> str:
    """The sha256 of a stage's final weights: a cached score belongs to those weights."""
    from keras_progdist import checkpoint

    return checkpoint.recorded_sha256(experiment.path(stage), "final")


def _cached_result(path: str, key: dict):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # a torn or foreign file: evaluate again
    return record.get("result") if record.get("key") == key else None


def evaluate_experiment(experiment, verbose: bool = True,
                        deadline: float | None = None) -> dict:
    """Evaluates every finished stage of `experiment`; returns the metrics dict.

    Each model's scores are saved as soon as they exist (`eval/runs/*.json`, keyed by
    the model's weights and the evaluation settings), so an interrupted evaluation goes
    on where it stopped and a re-run after one more stage scores only that stage.

    Args:
        experiment: a `pipeline.Experiment` with at least a finished teacher.
        verbose: progress bars and the table on stdout.
        deadline: `time.time()` after which no new model is started; the finished
            ones are kept and `EvaluationInterrupted` is raised.
    """
    from keras_progdist import evaluation

    cfg = settings()
    try:
        stage_models = experiment.stage_models()
    except ValueError as e:
        raise EvaluationError(f"Nothing to evaluate in {experiment.workdir}: {e}") from None
    out_dir = experiment.path("eval")
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    teacher_name, teacher_full, teacher_model = stage_models[0]
    runs = [("ddim", s, "teacher", teacher_model) for s in cfg["ddim_steps"]
            if s < teacher_full]
    runs += [("teacher", s, "teacher", teacher_model)
             for s in sorted(set(cfg["teacher_steps"]))
             if s < teacher_full and s not in cfg["ddim_steps"]]
    runs.append(("teacher", teacher_full, "teacher", teacher_model))
    runs += [("distilled", n, stage, model) for stage, n, model in stage_models[1:]]
    num_classes = experiment.network_config["num_classes"]
    protocol = {k: cfg[k] for k in ("num_samples", "num_reference", "split", "seed")}
    protocol["dataset"] = _dataset_key(gin.get_bindings("dataset"), cfg["split"])[1]
    fid_model = real = None
    results = []
    progress = keras.utils.Progbar(len(runs), unit_name="model") if verbose else None
    for kind, steps, stage, model in runs:
        path = os.path.join(out_dir, "runs", f"{kind}_{steps:05d}.json")
        key = {**protocol, "weights_sha256": _model_identity(experiment, stage)}
        result = _cached_result(path, key)
        if result is None:
            if deadline is not None and time.time() > deadline:
                raise EvaluationInterrupted(
                    f"[eval] time budget spent after {len(results)} of {len(runs)} "
                    f"models; their scores are saved in {out_dir}/runs. Re-run to go on.")
            if fid_model is None:
                fid_model = evaluation.load_fid_network()
                real = reference_features(fid_model, cfg, verbose)
            start = time.time()
            fake = generate(model, steps, cfg, num_classes)
            sample_seconds = time.time() - start
            images.save_grid(fake[:64],
                             os.path.join(out_dir, f"{kind}_{steps:05d}steps.png"))
            features = evaluation.compute_features(fid_model, fake,
                                                   batch_size=cfg["batch_size"])
            scores = metrics.fid_and_kid(real, features)
            result = {"kind": kind, "num_steps": steps, **_jsonable(scores),
                      "sample_seconds": sample_seconds,
                      "eval_seconds": time.time() - start,
                      "backend": keras.backend.backend(), "device": describe_device()}
            _write(path, json.dumps({"key": key, "result": result}, indent=1))
        results.append(result)
        if progress:
            progress.add(1)
    report = {
        "workdir": experiment.workdir,
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "num_samples": cfg["num_samples"],
        "num_reference": results[0]["num_real"],
        "dataset": gin.get_bindings("dataset"),
        "stages": experiment.finished_stages(),
        "results": results,
    }
    _write(os.path.join(out_dir, "metrics.json"), json.dumps(report, indent=1))
    _write(os.path.join(out_dir, "report.md"), markdown(report))
    plot(results, os.path.join(out_dir, "fid_vs_steps.png"))
    print(markdown(report), flush=True)
    return report


def _jsonable(scores: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in scores.items()}


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The results as a Markdown table (FID, KID x 1e3 with its standard error)."""
    lines = [
        f"# Evaluation of `{report['workdir']}`", "",
        f"{report['num_samples']} samples per model against {report['num_reference']} real "
        f"images ({report['dataset']}); backend {report['backend']}, device "
        f"{report['device']}. DDIM, clipped x_hat, same noise for every model.", "",
        "| model | steps | FID | KID ×1e3 | ± s.e. |", "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        kid_se = None if r.get("kid_std_err") is None else 1e3 * r["kid_std_err"]
        lines.append(f"| {r['kind']} | {r['num_steps']} | {_fmt(r['fid'])} | "
                     f"{_fmt(1e3 * r['kid'])} | {_fmt(kid_se)} |")
    notes = {r["fid_note"] for r in report["results"] if r.get("fid_note")}
    lines += [""] + [f"Note: {n}" for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def plot(results: list, path: str) -> str:
    """FID (or KID when FID is unavailable) against steps, log-log, one line per kind."""
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

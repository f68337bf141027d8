"""`--mode=eval`: FID/KID of the teacher, undistilled DDIM and every distilled stage,
and the report of them.

Takes a `WorkDir` (the models: `inputs.evaluation_runs`) and plain settings: the
evaluation settings (a `settings.EvaluateSettings`, `training.config.evaluate()`) and
the dataset settings (the `dataset.*` values in force,
`training.config.dataset_settings()`; `data.make_dataset`'s defaults fill in the rest).
It reads no gin.

Writes into the work directory's `EvalDir` (`WorkDir.eval`): `metrics`, `report`, the
plot (`image("fid_vs_steps")`, or `kid_vs_steps` when FID is not available: named by
what it plots), the side-by-side grid, and through `scoring.score_models` each model's
grid, score and probe (saved as soon as they exist). A model whose sample files
(`samples.write_workdir_samples`, in `EvalDir.samples`) are complete and match its
weights and the settings is scored from those files; the others are sampled in process
from the same noise, so both give the same scores. `score_sample_dir` scores a folder of
sample files without any model (e.g. files made on a GPU host). Real-data features are
cached by everything that changes them (`reference.reference_key`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np

from keras_progdist import fileio, images
from keras_progdist.distribute import describe_device
from keras_progdist.evaluation import comparisons, digits, inputs, sample_files, scoring
from keras_progdist.evaluation.inputs import EvaluationError
from keras_progdist.evaluation.reference import with_dataset_defaults
from keras_progdist.settings import EvaluateSettings
from keras_progdist.workdir import EvalDir

# The plot's two names (`plot_name`), and the side-by-side grid's.
PLOTS = ("fid_vs_steps", "kid_vs_steps")
SIDE_BY_SIDE = "distilled_vs_ddim"
SIDE_BY_SIDE_COLUMNS = 8
_KIND_ORDER = {"ddim": 0, "teacher": 1, "distilled": 2}


def evaluate_workdir(workdir, cfg: EvaluateSettings, dataset: dict, verbose: int = 1,
                     deadline: float | None = None, sample_dir: str | None = None) -> dict:
    """Evaluates every finished stage of a work directory; returns the metrics dict.

    Each model's scores are saved as soon as they exist (`EvalDir.run_record`, keyed by
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
            ones are kept and `errors.Interrupted` is raised.
        sample_dir: where to look for sample files (default `EvalDir.samples`; ""
            never uses files).

    Returns:
        The report dict written to `EvalDir.metrics`.

    Raises:
        inputs.EvaluationError: settings that are not an `EvaluateSettings`, or
            nothing to evaluate.
        errors.Interrupted: the deadline passed.
    """
    verbose = int(verbose)
    wd, cfg = inputs.as_workdir(workdir), inputs.check_settings(cfg)
    runs = inputs.evaluation_runs(wd, cfg)
    out = wd.eval
    sample_dir = out.samples if sample_dir is None else sample_dir
    protocol = scoring.score_protocol(cfg, dataset)
    jobs = [_workdir_job(run, cfg, protocol, sample_dir) for run in runs]
    results = scoring.score_models(jobs, out, dataset, verbose, deadline)
    report = {
        "workdir": wd.root,
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "num_samples": cfg.num_samples,
        "num_reference": results[0]["num_real"],
        "dataset": dict(dataset),
        "stages": wd.finished_stages(),
        "results": results,
    }
    return _write_report(report, out, verbose, cfg.digit_scores)


def _workdir_job(run: dict, cfg: EvaluateSettings, protocol: dict,
                 sample_dir: str) -> scoring.ScoreJob:
    """A work directory's model to score: from its sample files when they are usable
    (`usable_sample_files`), else sampled in process."""
    kind, steps, model = run["kind"], run["num_steps"], run["model"]
    name = sample_files.model_name(kind, steps)
    manifest, why_not = usable_sample_files(sample_dir, name, run["weights_sha256"],
                                            steps, cfg, model.image_shape)
    key = {**protocol, "weights_sha256": run["weights_sha256"]}
    if manifest is not None:
        key["samples_sha256"] = sample_files.samples_sha256(manifest)
    note = why_not and f"[eval] {name}: sample files not used ({why_not}); sampling here"
    return scoring.ScoreJob(name, kind, steps, key, cfg, manifest=manifest,
                            sample_dir=sample_dir if manifest is not None else None,
                            model=model, note=note)


def usable_sample_files(sample_dir: str | None, name: str, weights_sha256: str,
                        num_steps: int, cfg: EvaluateSettings, image_shape=None):
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
        wanted = {"weights_sha256": weights_sha256, "num_samples": cfg.num_samples,
                  "seed": cfg.seed, "noise_batch_size": cfg.batch_size,
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


def score_sample_dir(sample_dir: str, cfg: EvaluateSettings, dataset: dict,
                     out_dir: str | None = None, verbose: int = 1,
                     deadline: float | None = None) -> dict:
    """Scores every complete model in a folder of sample files; no models needed.

    For files made elsewhere (e.g. `--mode=sample` on a GPU host): copy the folder
    (npz files and manifests) and score it with the same settings (the dataset
    settings and `num_reference`, `split`, `cache_dir` give the real images and the
    cache; `num_samples`, `seed` and the noise batch size come from each manifest).
    Scores are saved per model in `out_dir` laid out as an `EvalDir`, keyed by the
    weights' sha256 (from the manifest), the protocol and the files' sha256.

    Args:
        sample_dir: the folder with `<model>.json` manifests and their npz files.
        cfg: the evaluation settings (`training.config.evaluate()`).
        dataset: the dataset settings (`training.config.dataset_settings()`).
        out_dir: where results go (default: `sample_dir`).
        verbose: 0 quiet, 1 progress bars and the table, 2 plain lines and the table.
        deadline: `time.time()` after which no new model is started.

    Returns:
        The report dict written to the `EvalDir.metrics` of `out_dir`.

    Raises:
        inputs.EvaluationError: no complete manifest in `sample_dir`, or samples of
            another image size than the dataset settings'.
        errors.Interrupted: the deadline passed.
    """
    verbose = int(verbose)
    inputs.check_settings(cfg)
    out = EvalDir(out_dir or sample_dir)
    jobs = [_folder_job(manifest, cfg, dataset, sample_dir)
            for manifest in _complete_manifests(sample_dir, dataset, verbose)]
    results = scoring.score_models(jobs, out, dataset, verbose, deadline)
    report = {
        "workdir": sample_dir,
        "backend": keras.backend.backend(),
        "device": describe_device(),
        "num_samples": results[0]["num_fake"],
        "num_reference": results[0]["num_real"],
        "dataset": dict(dataset),
        "results": results,
    }
    return _write_report(report, out, verbose, cfg.digit_scores)


def _complete_manifests(sample_dir: str, dataset: dict, verbose: int) -> list:
    """The complete manifests of `sample_dir`, in report order (incomplete ones are
    skipped with a line).

    Raises:
        inputs.EvaluationError: none complete, or samples of another image size.
    """
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
    return sorted(manifests, key=lambda m: (_KIND_ORDER.get(m["kind"], 3),
                                            -m["num_steps"] if m["kind"] == "distilled"
                                            else m["num_steps"]))


def _folder_job(manifest: dict, cfg: EvaluateSettings, dataset: dict,
                sample_dir: str) -> scoring.ScoreJob:
    """A model of a sample folder to score, with the noise settings its files were
    made with."""
    proto = manifest["protocol"]
    made = dataclasses.replace(cfg, num_samples=proto["num_samples"], seed=proto["seed"],
                               batch_size=proto["noise_batch_size"])
    key = {**scoring.score_protocol(made, dataset),
           "weights_sha256": manifest["weights_sha256"],
           "samples_sha256": sample_files.samples_sha256(manifest)}
    return scoring.ScoreJob(manifest["model"], manifest["kind"], manifest["num_steps"],
                            key, made, manifest=manifest, sample_dir=sample_dir,
                            record={"weights_sha256": manifest["weights_sha256"]})


def _write_report(report: dict, out: EvalDir, verbose: int, digit_scores: bool) -> dict:
    """Adds the comparisons, the digit scores (`digit_scores`, on the embedded digits),
    side-by-side grid and plot to `report` and writes it (`metrics`, `report`, the
    plot); returns it."""
    probes = scoring.load_probes(out, report["results"])
    report["comparisons"] = comparisons.compare(report["results"], probes)
    report["digits"] = digits.score_probes(probes, report["dataset"], out.probe_digits,
                                           verbose) if digit_scores else None
    report["side_by_side"] = _side_by_side(out, report["results"], probes)
    for entry in report["comparisons"]:
        # Each model's line in TensorBoard and the JSON carries its comparison too.
        for r in report["results"]:
            if (r["kind"], r["num_steps"]) == (entry["kind"], entry["num_steps"]):
                r["vs_teacher"] = entry
    name = plot_name(report["results"])
    for stale in set(PLOTS) - {name}:
        # A plot under the other metric's name would be from an older run.
        if os.path.exists(out.image(stale)):
            os.remove(out.image(stale))
    report["plot"] = os.path.basename(out.image(name))
    fileio.atomic_write_text(out.metrics, json.dumps(report, indent=1))
    fileio.atomic_write_text(out.report, markdown(report))
    plot(report["results"], out.image(name))
    if verbose:
        print(markdown(report), flush=True)
    return report


def _side_by_side(out: EvalDir, results: list, probes: dict) -> str | None:
    """One grid from the same noise: the teacher's first row, then for every N (most
    steps first) a row of the distilled student and a row of undistilled DDIM.

    Returns:
        What the grid shows (for the report), or None when there is nothing to show.
    """
    teacher = max((r["num_steps"] for r in results if r["kind"] == "teacher"), default=None)
    steps = sorted({n for kind, n in probes if kind == "distilled"
                    and ("ddim", n) in probes}, reverse=True)
    if teacher is None or not steps or ("teacher", teacher) not in probes:
        return None
    rows = [probes[("teacher", teacher)]] + [probes[(kind, n)] for n in steps
                                              for kind in ("distilled", "ddim")]
    count = min(SIDE_BY_SIDE_COLUMNS, *(len(r) for r in rows))
    path = out.image(SIDE_BY_SIDE)
    images.save_grid(np.concatenate([r[:count] for r in rows]), path, columns=count)
    return f"{os.path.basename(path)}: rows top to bottom: teacher ({teacher} steps), " \
        "then " + ", ".join(f"distilled {n}, DDIM {n}" for n in steps) + \
        " steps; same noise per column."


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
    lines += digits.probe_markdown(report.get("digits"))
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


def plot_name(results: list) -> str:
    """`fid_vs_steps` when every model has a FID, else `kid_vs_steps`: the plot is
    named by what it plots (`EvalDir.image(name)`)."""
    return PLOTS[0] if all(r["fid"] is not None for r in results) else PLOTS[1]


def plot(results: list, path: str) -> str:
    """FID (or KID when FID is unavailable) against steps, log-log, one line per kind.

    Args:
        results: the report's `results`.
        path: the PNG to write (`EvalDir.image(plot_name(results))`).

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

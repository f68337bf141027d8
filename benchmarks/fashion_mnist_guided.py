"""Guided distillation on Fashion-MNIST: FID, KID and class accuracy by w and by steps.

The whole guided pipeline (`gin/fashion_mnist_guided.gin`) on the real Fashion-MNIST
training set: a classifier-free guided teacher, stage one (a w-conditioned network that
gives the guided teacher's `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)` in one
evaluation), and the halving ladder of that network. Then every model is scored at
every guidance strength `w` (default 0, 0.5, 1, 2, 4):

    teacher     the guided teacher at its full step count: 2 network evaluations a
                step (the conditional and the null-class model, on one doubled batch)
    stage one   the w-conditioned network at the same step count: 1 evaluation a step
    N steps     each distilled stage: N evaluations

Each (model, w) gets `--num_samples` samples from the same noise and labels (sample i
has label i mod 10, so the classes are balanced and every model and w starts from the
same z_1), scored by FID and KID against `--num_reference` real training images (the
Inception network and reference statistics of `--mode=eval`), and by class accuracy:
the fraction a small CNN classifier, trained here on the 60,000 real training images
(its accuracy on the 10,000 real test images is reported), assigns to the label the
sample was drawn for. Sample grids (10 columns: one class each) land next to the scores.

Pieces (each resumable; `--time_budget_s` bounds the whole call, exit code 143 means
"budget spent, checkpoint or scores saved, run the same command again"):

    teacher     bin/run.py --mode=train_teacher
    distill     bin/run.py --mode=distill (stage one, then the ladder)
    classifier  train the classifier (kept as weights in <workdir>/eval/guided/)
    eval        score every (model, w); each score is saved as soon as it exists and
                keyed by the model's weights, w and the protocol, so a re-run skips it
    table       benchmarks/results/<--results_name>.{json,md} and _fid_by_w.png
    all         all of the above, in order

    python benchmarks/fashion_mnist_guided.py --time_budget_s=3000   # repeat until 0

`--gin_param` bindings go to every bin/run.py call and to the settings read here (e.g.
`--gin_param=distill.min_steps=4` stops the ladder at 4 steps); `--steps=8,4` scores
only those distilled stages. Goal (the guided-distillation issue): the 4-step student
within 1.3x the guided teacher's FID at w = 1, its class accuracy within 2 points, at
1/8 or fewer of the teacher's network evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from fashion_mnist import run_piece  # noqa: E402  (the same bin/run.py pieces)

PIECES = ("teacher", "distill", "classifier", "eval", "table")
STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
BUDGET_EXIT = 143
# Bumped whenever the classifier or its training changes: part of every score's key.
PROBE_VERSION = 1
GOAL = {"steps": 4, "w": 1.0, "fid_ratio": 1.3, "accuracy_points": 2.0,
        "nfe_fraction": 1.0 / 8.0}
DATA_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class BenchmarkError(Exception):
    """Bad arguments or missing inputs, found before any work starts (exit code 2)."""


def _numbers(flag: str, text: str, kind, example: str, least) -> tuple:
    """Comma-separated numbers of `kind`, each finite and at least `least`."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchmarkError(f"{flag}={text!r}: give comma-separated numbers, e.g. "
                             f"{example}") from None
    if any(not math.isfinite(v) or v < least for v in values):
        raise BenchmarkError(f"{flag}={text!r}: give finite values of at least {least}.")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", default="fashion_mnist_guided.gin")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs",
                                                          "fashion_mnist_guided"))
    parser.add_argument("--data_dir", default=os.path.join(ROOT, ".data", "fashion-mnist"))
    parser.add_argument("--piece", default="all",
                        help=f"comma-separated pieces of {PIECES}, or 'all'")
    parser.add_argument("--time_budget_s", type=float, default=None)
    parser.add_argument("--ws", default=",".join(f"{w:g}" for w in STRENGTHS),
                        help="the guidance strengths scored")
    parser.add_argument("--steps", default="",
                        help="distilled step counts scored (default: every finished "
                             "stage)")
    parser.add_argument("--num_samples", type=int, default=2048)
    parser.add_argument("--num_reference", type=int, default=5000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--classifier_epochs", type=int, default=5)
    parser.add_argument("--results_name", default="fashion_mnist_cpu_guided")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--check_only", action="store_true",
                        help="check the arguments, data and gin file, then exit 0")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    pieces = PIECES if args.piece == "all" else tuple(p for p in args.piece.split(",") if p)
    unknown = sorted(set(pieces) - set(PIECES))
    if unknown or not pieces:
        parser.error(f"--piece: unknown {unknown}; allowed: {PIECES} or 'all'")
    args.pieces = pieces
    args.ws = tuple(sorted(set(_numbers("--ws", args.ws, float, "0,0.5,1,2,4", 0))))
    if not args.ws:
        raise BenchmarkError("--ws: give at least one guidance strength.")
    args.steps = _numbers("--steps", args.steps, int, "8,4", 1)
    if args.num_samples < 2 or args.num_reference < 2 or args.batch_size < 1:
        raise BenchmarkError("--num_samples and --num_reference must be at least 2, "
                             "--batch_size at least 1.")
    if args.classifier_epochs < 1:
        raise BenchmarkError("--classifier_epochs must be at least 1.")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise BenchmarkError("--time_budget_s must be positive.")
    if not os.path.exists(args.gin_file):
        args.gin_file = os.path.join(ROOT, "gin", args.gin_file)
    if not os.path.isfile(args.gin_file):
        raise BenchmarkError(f"--gin_file: {args.gin_file} does not exist.")
    args.data_dir = os.path.abspath(args.data_dir)
    missing = [f for f in DATA_FILES if not os.path.isfile(os.path.join(args.data_dir, f))]
    if missing:
        raise BenchmarkError(f"--data_dir={args.data_dir} lacks {missing} (the Fashion-"
                             "MNIST idx files: bash benchmarks/fetch_fashion_mnist.sh DIR)")
    args.workdir = os.path.abspath(args.workdir)
    return args


# -- settings -------------------------------------------------------------------------------
def settings(args) -> tuple:
    """`(dataset, evaluation, guidance)` settings: the gin file's (with `--gin_param`)
    and the evaluation protocol given on the command line."""
    import gin
    from keras_progdist.training import config

    gin.clear_config()
    try:
        config.parse_gin([args.gin_file], [f"dataset.data_dir={args.data_dir!r}"]
                         + list(args.gin_param))
        dataset = config.dataset_settings()
        guided = config.guidance()
        cfg = config.evaluate(num_samples=args.num_samples,
                              num_reference=args.num_reference,
                              batch_size=args.batch_size, seed=args.seed, ddim_steps=())
    finally:
        gin.clear_config()  # parsing locks gin; unlocked again for whoever binds next
    if dataset.get("name") != "fashion_mnist" or not dataset.get("with_labels"):
        raise BenchmarkError(f"{args.gin_file}: this benchmark needs class-conditional "
                             "fashion_mnist (dataset.with_labels = True).")
    if not guided.enabled:
        raise BenchmarkError(f"{args.gin_file}: guidance.enabled is not set: this is "
                             "not a guided run.")
    return dataset, cfg, guided


def guided_dir(args) -> str:
    return os.path.join(args.workdir, "eval", "guided")


def _key_text(w: float) -> str:
    return repr(float(w))  # exact: two strengths never share a file


def _backend() -> str:
    import keras

    return keras.backend.backend()


# -- the classifier ---------------------------------------------------------------------
def _class_images(dataset: dict, split: str):
    import numpy as np

    from keras_progdist import data

    images, labels = data.load_images("fashion_mnist", split=split,
                                      data_dir=dataset["data_dir"],
                                      image_size=dataset.get("image_size"),
                                      resize=dataset.get("resize", "bilinear"))
    return images.astype(np.float32) / 127.5 - 1.0, labels.astype(np.int32)


def _classifier_files(args) -> tuple:
    folder = guided_dir(args)
    return (os.path.join(folder, "classifier.weights.h5"),
            os.path.join(folder, "classifier.json"))


def classifier_key(args, dataset: dict) -> dict:
    return {"version": PROBE_VERSION, "epochs": args.classifier_epochs, "seed": 0,
            "image_size": dataset.get("image_size"),
            "resize": dataset.get("resize", "bilinear")}


def classifier(args, dataset: dict, train: bool = True):
    """The class-accuracy probe: `(model, info)`, trained once and kept as weights.

    The network is the small CNN of the MNIST probe (`evaluation.digits`), fitted on
    the real training images (preprocessed as the diffusion models saw them) and
    tested on the real test images. Only weights are stored (no code to load).
    """
    import keras
    import numpy as np

    from keras_progdist import fileio
    from keras_progdist.evaluation import digits

    folder = guided_dir(args)
    weights, record = _classifier_files(args)
    key = classifier_key(args, dataset)
    model = digits.build_classifier(dataset.get("image_size") or 28)
    if os.path.exists(record) and os.path.exists(weights):
        with open(record) as f:
            info = json.load(f)
        if info.get("key") == key:
            model.load_weights(weights)
            return model, info
    if not train:
        raise BenchmarkError("No classifier for these settings: run --piece=classifier.")
    start = time.time()
    x, y = _class_images(dataset, "train")
    x_test, y_test = _class_images(dataset, "test")
    keras.utils.set_random_seed(key["seed"])
    model = digits.build_classifier(x.shape[1])
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=args.classifier_epochs, shuffle=True, verbose=2)
    accuracy = float(np.mean(np.argmax(digits.predict_probs(model, x_test), -1) == y_test))
    os.makedirs(folder, exist_ok=True)
    model.save_weights(weights)
    info = {"key": key, "test_accuracy": accuracy, "num_train": int(len(y)),
            "num_test": int(len(y_test)), "seconds": round(time.time() - start, 1)}
    fileio.atomic_write_json(record, info)
    print(f"[guided] classifier: test accuracy {100 * accuracy:.2f}% on {len(y_test)} "
          f"real test images ({info['seconds']:.0f} s)", flush=True)
    return model, info


def classifier_identity(args, dataset: dict):
    """What a class accuracy was measured with: the classifier's settings and the
    sha256 of its weights (a retrained classifier is another probe); None when no
    classifier for these settings exists yet."""
    from keras_progdist import fileio

    weights, record = _classifier_files(args)
    if not (os.path.exists(record) and os.path.exists(weights)):
        return None
    with open(record) as f:
        info = json.load(f)
    key = classifier_key(args, dataset)
    if info.get("key") != key:
        return None
    return {**key, "weights_sha256": fileio.sha256_file(weights)}


# -- the models -------------------------------------------------------------------------
def guided_models(workdir: str, steps: tuple = ()) -> list:
    """The finished models of a guided work directory, in table order: dicts with
    `name`, `stage`, `num_steps` and `nfe_per_step` (network evaluations a step)."""
    from keras_progdist.workdir import GUIDANCE, TEACHER, WorkDir

    wd = WorkDir(workdir)
    if not wd.is_finished(TEACHER):
        raise BenchmarkError(f"No finished teacher in {workdir}: run --piece=teacher.")
    config = wd.require_config()
    if not config["network"].get("null_class"):
        raise BenchmarkError(f"{workdir}: the teacher has no null class: it is not a "
                             "classifier-free guided run.")
    out = [{"name": "teacher", "stage": TEACHER, "nfe_per_step": 2,
            "num_steps": wd.stage_steps(TEACHER)}]
    if wd.is_finished(GUIDANCE):
        out.append({"name": "stage one", "stage": GUIDANCE, "nfe_per_step": 1,
                    "num_steps": wd.stage_steps(GUIDANCE)})
    for n in wd.finished_students():
        if not steps or n in steps:
            out.append({"name": f"{n} steps", "stage": f"student_{n:05d}",
                        "nfe_per_step": 1, "num_steps": n})
    return out


def score_path(args, stage: str, w: float) -> str:
    """One file per (backend, model, w): the backends draw different noise."""
    return os.path.join(guided_dir(args), "runs", _backend(),
                        f"{stage}_w{_key_text(w)}.json")


def score_key(wd, entry: dict, w: float, cfg, dataset: dict, probe: dict) -> dict:
    """Everything a score depends on: the model's weights, w, the sampling protocol,
    the reference statistics, the backend and the classifier (`classifier_identity`)."""
    from keras_progdist.evaluation import reference
    from keras_progdist.settings import as_record

    record = as_record(cfg)
    return {"weights_sha256": wd.final_sha256(entry["stage"]), "w": w,
            "num_steps": entry["num_steps"], "backend": _backend(),
            "reference": reference.reference_key(cfg, dataset),
            "protocol": {k: record[k] for k in ("num_samples", "batch_size", "seed")},
            "classifier": probe}


def score_order(entry: dict, w: float, goal: dict = GOAL) -> tuple:
    """Sort key for the (model, w) cells: the goal's comparison first, then the goal's
    two models at the other strengths, then everything else in table order."""
    goal_model = entry["name"] in ("teacher", f"{goal['steps']} steps")
    return (not (goal_model and w == goal["w"]), not goal_model)


def _spent(deadline) -> bool:
    if deadline is not None and time.time() >= deadline:
        print("[guided] time budget spent: run the same command again to go on",
              flush=True)
        return True
    return False


def evaluate(args, deadline) -> int:
    """Scores every (model, w) not scored yet; 0 when all are, 143 at the deadline."""
    import numpy as np

    from keras_progdist import evaluation, fileio, images
    from keras_progdist.evaluation import digits, metrics, reference, samples, scoring
    from keras_progdist.workdir import WorkDir

    dataset, cfg, _ = settings(args)
    wd = WorkDir(args.workdir)
    entries = guided_models(args.workdir, args.steps)
    if classifier_identity(args, dataset) is None and _spent(deadline):
        return BUDGET_EXIT
    probe, probe_info = classifier(args, dataset, train=True)  # trained once
    identity = classifier_identity(args, dataset)
    todo = [(e, w) for e in entries for w in args.ws
            if scoring.cached_result(score_path(args, e["stage"], w),
                                     score_key(wd, e, w, cfg, dataset, identity)) is None]
    # The goal's cells first (teacher and goal student at the goal's w, then the rest
    # of those two models), so a run cut short by its budget still answers the goal.
    todo.sort(key=lambda item: score_order(item[0], item[1]))
    print(f"[guided] {len(entries)} models x {len(args.ws)} strengths: {len(todo)} to "
          "score", flush=True)
    if not todo:
        return 0
    if _spent(deadline):
        return BUDGET_EXIT
    fid_model = evaluation.load_fid_network()
    real = reference.reference_features(fid_model, cfg, dataset, verbose=2)
    config, models = wd.require_config(), {}
    labels = samples.labels_for(0, cfg.num_samples, 10)
    for entry, w in todo:
        if _spent(deadline):
            return BUDGET_EXIT
        stage = entry["stage"]
        if stage not in models:
            models[stage] = wd.stage_model(stage, config)
        start = time.time()
        x = samples.generate_range(models[stage], entry["num_steps"], 0,
                                   cfg.num_samples, cfg.num_samples,
                                   cfg.batch_size, cfg.seed, 10, guidance=w)
        sample_seconds = time.time() - start
        images.save_grid(x[:100], os.path.join(guided_dir(args), "grids", _backend(),
                                              f"{stage}_w{_key_text(w)}.png"), columns=10)
        scores = metrics.fid_and_kid(real, scoring.fake_features(fid_model, x, cfg))
        predicted = np.argmax(digits.predict_probs(probe, x), -1)
        result = {"model": entry["name"], "stage": stage, "w": w,
                  "num_steps": entry["num_steps"],
                  "nfe": entry["num_steps"] * entry["nfe_per_step"],
                  "fid": None if scores["fid"] is None else float(scores["fid"]),
                  "kid": float(scores["kid"]), "kid_std_err": float(scores["kid_std_err"]),
                  "class_accuracy": float(np.mean(predicted == labels)),
                  "classifier_test_accuracy": probe_info["test_accuracy"],
                  "num_samples": cfg.num_samples, "num_reference": scores["num_real"],
                  "backend": _backend(),
                  "sample_seconds": round(sample_seconds, 1),
                  "seconds": round(time.time() - start, 1)}
        os.makedirs(os.path.dirname(score_path(args, stage, w)), exist_ok=True)
        fileio.atomic_write_json(score_path(args, stage, w),
                                 {"key": score_key(wd, entry, w, cfg, dataset, identity),
                                  "result": result})
        fid = "—" if result["fid"] is None else f"{result['fid']:.2f}"
        print(f"[guided] {entry['name']} ({result['nfe']} NFE), w={w:g}: FID {fid}, "
              f"KID×1e3 {1e3 * result['kid']:.2f}, class accuracy "
              f"{100 * result['class_accuracy']:.1f}% ({result['seconds']:.0f} s)",
              flush=True)
    return 0


# -- the table --------------------------------------------------------------------------
def goal_check(results: list, goal: dict = GOAL) -> dict:
    """The issue's goal on the measured scores: the `goal['steps']`-step student at
    `goal['w']` against the guided teacher at the same `w` (FID ratio, class accuracy,
    network evaluations); not checked without FIDs."""
    at_w = {r["stage"]: r for r in results if r["w"] == goal["w"]}
    teacher = at_w.get("teacher")
    student = at_w.get(f"student_{goal['steps']:05d}")
    if teacher is None or student is None:
        return {"checked": False, "why": f"no scores for the teacher and the "
                                         f"{goal['steps']}-step student at w={goal['w']:g}"}
    if teacher["fid"] is None or student["fid"] is None:
        # The goal is an FID ratio; a KID ratio has another scale (KID may even be <= 0).
        return {"checked": False, "why": "FID is undefined below 2048 samples and the "
                                         "goal is stated in FID (compare KID in the table)"}
    metric = "fid"
    ratio = student[metric] / teacher[metric]
    # "Within 2 points": either side (a student far above its teacher is off too).
    points = 100 * abs(teacher["class_accuracy"] - student["class_accuracy"])
    nfe = student["nfe"] / teacher["nfe"]
    checks = [
        {"goal": f"{metric.upper()} {goal['steps']}-step student / teacher",
         "value": ratio, "limit": f"<= {goal['fid_ratio']}",
         "passed": ratio <= goal["fid_ratio"]},
        {"goal": "class accuracy: |teacher - student| (points)", "value": points,
         "limit": f"<= {goal['accuracy_points']}",
         "passed": points <= goal["accuracy_points"]},
        {"goal": "network evaluations: student / teacher", "value": nfe,
         "limit": f"<= {goal['nfe_fraction']:.3f}", "passed": nfe <= goal["nfe_fraction"]},
    ]
    return {"checked": True, "metric": metric, "w": goal["w"], "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def collect(args) -> list:
    """The scores of this call's selection (`--ws`, `--steps`) whose keys match the
    current weights, protocol, classifier and backend, in table order: a stale score
    (older weights, other settings) is never shown."""
    from keras_progdist.evaluation import scoring
    from keras_progdist.workdir import WorkDir

    dataset, cfg, _ = settings(args)
    identity = classifier_identity(args, dataset)
    wd = WorkDir(args.workdir)
    out = []
    for entry in guided_models(args.workdir, args.steps):
        for w in args.ws:
            result = scoring.cached_result(score_path(args, entry["stage"], w),
                                           score_key(wd, entry, w, cfg, dataset, identity))
            if result is not None:
                out.append(result)
    return out


def markdown(summary: dict) -> str:
    results, ws = summary["results"], sorted({r["w"] for r in summary["results"]})
    rows = []
    for r in results:
        if not rows or rows[-1][0]["stage"] != r["stage"]:
            rows.append([r])
        else:
            rows[-1].append(r)
    first = results[0] if results else {}
    lines = [
        "# Guided distillation on Fashion-MNIST: FID, KID and class accuracy by w",
        "",
        f"- {first.get('num_samples')} samples per model and w (label i mod 10, the same "
        f"noise for every model and w) against {first.get('num_reference')} real "
        "training images; FID network Inception-v3 2015-12-05 (pool3).",
        f"- Class accuracy: the share of samples a small CNN assigns to the label they "
        f"were drawn for; the CNN scores {100 * summary['classifier']['test_accuracy']:.2f}%"
        f" on the {summary['classifier']['num_test']:,} real test images.",
        "- Guidance: x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null); w = 0 is the "
        "conditional model. NFE: network evaluations per sample (the guided teacher "
        "evaluates the conditional and the null-class model every step).",
        f"- Backend {summary['backend']}; measured {summary['measured']} with "
        f"`{summary['command']}`.", ""]
    for title, field, fmt in (("FID", "fid", "{:.2f}"), ("KID ×1e3", "kid", "{:.2f}"),
                              ("class accuracy %", "class_accuracy", "{:.1f}")):
        scale = 1e3 if field == "kid" else 100.0 if field == "class_accuracy" else 1.0
        lines += [f"**{title}**", "",
                  "| model | steps | NFE | " + " | ".join(f"w={w:g}" for w in ws) + " |",
                  "|---|---:|---:|" + "---:|" * len(ws)]
        for row in rows:
            by_w = {r["w"]: r for r in row}
            cells = ["—" if by_w.get(w) is None or by_w[w][field] is None
                     else fmt.format(scale * by_w[w][field]) for w in ws]
            lines.append(f"| {row[0]['model']} | {row[0]['num_steps']} | {row[0]['nfe']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    check = summary["goal"]
    if check["checked"]:
        lines += [f"Goal at w = {check['w']:g}:", "", "| goal | measured | limit | met |",
                  "|---|---:|---:|---|"]
        lines += [f"| {c['goal']} | {c['value']:.3f} | {c['limit']} | "
                  f"{'yes' if c['passed'] else 'NO'} |" for c in check["checks"]]
    else:
        lines.append(f"Goal not checked: {check['why']}.")
    return "\n".join(lines) + "\n"


def plot(results: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = [r for r in results if r["stage"] == stage]
        label = f"{rows[0]['model']} ({rows[0]['nfe']} NFE)"
        style = dict(marker="o", linewidth=2.5 if stage == "teacher" else 1.2,
                     color="black" if stage == "teacher" else None)
        ws = [r["w"] for r in rows]
        metric = "fid" if all(r["fid"] is not None for r in rows) else "kid"
        left.plot(ws, [r[metric] for r in rows], label=label, **style)
        right.plot(ws, [100 * r["class_accuracy"] for r in rows], label=label, **style)
    left.set(xlabel="guidance strength w", ylabel="FID (KID where FID is not defined)",
             title="sample quality")
    right.set(xlabel="guidance strength w", ylabel="class accuracy (%)",
              title="class fidelity")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(args) -> dict:
    from keras_progdist import fileio

    results = collect(args)
    if not results:
        raise BenchmarkError(f"No scores under {guided_dir(args)} for these models, "
                             "strengths and settings on this backend: run --piece=eval "
                             "with the same flags.")
    with open(os.path.join(guided_dir(args), "classifier.json")) as f:
        probe = json.load(f)
    summary = {"benchmark": "fashion_mnist_guided", "gin_file": os.path.basename(args.gin_file),
               "gin_param": args.gin_param, "backend": _backend(),
               "measured": time.strftime("%Y-%m-%d", time.gmtime()),
               "command": " ".join(["python benchmarks/fashion_mnist_guided.py"]
                                   + [a for a in args.argv if not a.startswith(
                                       ("--piece", "--time_budget_s"))]),
               "classifier": probe, "results": results, "goal": goal_check(results)}
    stem = os.path.join(ROOT, "benchmarks", "results", args.results_name)
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    fileio.atomic_write_json(stem + ".json", summary)
    text = markdown(summary)
    fileio.atomic_write_text(stem + ".md", text)
    plot(results, stem + "_fid_by_w.png")
    print(text, flush=True)
    return summary


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.check_only or "eval" in args.pieces or "table" in args.pieces:
            settings(args)  # a bad gin file fails here, before any training
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_only:
        print("[guided] arguments, data and gin file are fine", flush=True)
        return 0
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    for piece in args.pieces:
        try:
            if piece in ("teacher", "distill"):
                code = run_piece(args, piece, deadline)
            elif piece == "classifier":
                classifier(args, settings(args)[0])
                code = 0
            elif piece == "eval":
                code = evaluate(args, deadline)
            else:
                table(args)
                code = 0
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if code != 0:
            print(f"[guided] {piece} exited {code}"
                  + (": time budget spent, run the same command again to go on"
                     if code == BUDGET_EXIT else ""), flush=True)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do the samples read as digits? A small MNIST classifier as a sample-quality probe.

KID on 128 samples says little about a demo's pictures; a classifier says whether a
sample is a recognisable digit. `train_classifier` fits a small Keras CNN on the
embedded 5,000 MNIST digits (`mnist_embedded`) at the demo's resolution in seconds,
deterministically (`seed`), holding out a stratified tenth for its accuracy. It is also
shown "junk" (Gaussian noise, blurred noise blobs, and averages of two digits of
different classes) with a uniform target, so that what is not a digit gets a low
max-softmax instead of an arbitrary confident class (outlier exposure).

`digit_scores(classifier, samples)` then gives, for images in [-1, 1]:

* `mean_confidence`: the mean max-softmax probability,
* `frac_confident`: the fraction with max-softmax > 0.9,
* `class_entropy_bits`: the entropy of the histogram of predicted classes (log2(10) =
  3.32 when every digit is equally frequent; low means mode collapse),
* `class_counts`.

`score_probes` scores every model of an evaluation from the samples the report keeps
(`EvalDir.run_probe`, the same noise for every model), with the distilled − DDIM
difference at every N and its paired standard error: the report's digit table.
`evaluate_workdir` scores the teacher, the `steps`-step student and undistilled DDIM at
`steps` of a finished pipeline work directory (a `WorkDir`, read without gin; the
dataset settings give the resize) from the same noise and writes the work directory's
`EvalDir.digits("json")` (and `digits("md")`), keyed by the models' weights and the
settings, so a re-run with nothing new reads the scores back and trains nothing.
Nothing is pickled or saved besides those files: the classifier is retrained (seconds)
whenever something is scored. From the command line (gin files give the dataset
settings):

    python bin/digits.py --gin_file=tiny.gin --workdir=runs/tiny

Everything runs on `keras.ops`, on any backend.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import keras
import numpy as np
from keras import layers, ops

from keras_progdist import fileio
from keras_progdist._keras_compat import set_random_seed
from keras_progdist.evaluation import inputs
from keras_progdist.evaluation.samples import generate_range
from keras_progdist.workdir import EvalDir

NUM_CLASSES = 10
CONFIDENT = 0.9
# Bumped whenever the classifier or its training changes the scores: part of the keys
# saved scores are looked up by.
PROBE_VERSION = 1


def load_digits(image_size: int = 16, resize: str = "bilinear"):
    """The embedded 5,000 digits as float32 in [-1, 1] `(N, S, S, 1)` and int32 labels,
    preprocessed as `data.make_dataset` preprocesses them (rounded to uint8 first)."""
    from keras_progdist import data

    images, labels = data.load_images("mnist_embedded", image_size=image_size,
                                      resize=resize)
    return images.astype(np.float32) / 127.5 - 1.0, labels.astype(np.int32)


def split_holdout(labels: np.ndarray, fraction: float = 0.1, seed: int = 0):
    """Stratified train / held-out index arrays: `fraction` of each class held out."""
    rng = np.random.RandomState(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def build_classifier(image_size: int = 16) -> keras.Model:
    """A small CNN: three 3x3 conv blocks (16, 32, 64), global average pool, Dense(10).
    Outputs logits."""
    x = keras.Input((image_size, image_size, 1), name="image")
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    h = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Flatten()(h)
    h = layers.Dropout(0.3)(h)
    h = layers.Dense(64, activation="relu")(h)
    out = layers.Dense(NUM_CLASSES, name="logits")(h)
    return keras.Model(x, out, name="digit_classifier")


def _blur(x: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):  # a 3x3 box filter, `passes` times
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3)
                for j in range(3)) / 9.0
    return x


def make_junk(images: np.ndarray, labels: np.ndarray, count: int,
              rng: np.random.RandomState) -> np.ndarray:
    """Non-digits in [-1, 1] like a failed sampler's: a third Gaussian noise, a third
    blurred noise thresholded into blobs, a third averages of two digits of different
    classes."""
    shape = (count,) + images.shape[1:]
    n1, n2 = count // 3, count // 3
    noise = np.clip(rng.normal(0.0, rng.uniform(0.3, 1.0, (n1, 1, 1, 1)),
                               (n1,) + shape[1:]), -1, 1)
    field = _blur(rng.normal(size=(n2,) + shape[1:]), 2)
    field = field / (field.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    blobs = np.where(field > rng.uniform(0.3, 1.2, (n2, 1, 1, 1)), 1.0, -1.0)
    n3 = count - n1 - n2
    a = rng.randint(len(images), size=n3)
    b = rng.randint(len(images), size=n3)
    b = np.where(labels[a] == labels[b], (b + len(images) // NUM_CLASSES) % len(images), b)
    pairs = np.clip(images[a] + images[b] + 1.0, -1, 1)  # overlay (max-like) of two
    return np.concatenate([noise, blobs, pairs]).astype(np.float32)


def train_classifier(image_size: int = 16, resize: str = "bilinear", seed: int = 0,
                     epochs: int = 8, batch_size: int = 64, junk_fraction: float = 0.25,
                     verbose: int = 0):
    """Fits the classifier on 90% of the embedded digits; deterministic for a seed.

    Args:
        image_size, resize: as the diffusion model's `dataset.*` (16 / bilinear in the
            demo).
        seed: seeds the split, the junk images, the initialization and the shuffling.
        epochs, batch_size: training length (8 epochs of 4,500 digits: seconds).
        junk_fraction: junk images per digit, trained towards the uniform distribution.
        verbose: passed to `fit`.

    Returns:
        `(classifier, info)`: a logits `keras.Model`, and a dict with the held-out
        `accuracy`, its `num_heldout` and the training `seconds`.
    """
    start = time.time()
    x, y = load_digits(image_size, resize)
    train, held = split_holdout(y, 0.1, seed)
    rng = np.random.RandomState(seed + 1)
    junk = make_junk(x[train], y[train], int(junk_fraction * len(train)), rng)
    xs = np.concatenate([x[train], junk])
    targets = np.concatenate([np.eye(NUM_CLASSES, dtype=np.float32)[y[train]],
                              np.full((len(junk), NUM_CLASSES), 1.0 / NUM_CLASSES,
                                      np.float32)])
    order = rng.permutation(len(xs))
    set_random_seed(seed)
    model = build_classifier(image_size)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(xs[order], targets[order], batch_size=batch_size, epochs=epochs,
              shuffle=True, verbose=verbose)
    probs = predict_probs(model, x[held])
    accuracy = float(np.mean(np.argmax(probs, -1) == y[held]))
    return model, {"accuracy": accuracy, "num_heldout": int(len(held)),
                   "num_train": int(len(train)), "seconds": time.time() - start,
                   "image_size": image_size, "resize": resize, "seed": seed}


def predict_probs(classifier, samples, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities `[N, 10]` of images in [-1, 1] (float) or uint8 [0, 255]."""
    samples = np.asarray(samples)
    if samples.dtype == np.uint8:
        samples = samples.astype(np.float32) / 127.5 - 1.0
    logits = classifier.predict(np.clip(samples.astype(np.float32), -1, 1),
                                batch_size=batch_size, verbose=0)
    return keras.ops.convert_to_numpy(ops.softmax(ops.convert_to_tensor(logits), axis=-1))


def digit_scores(classifier, samples) -> dict:
    """How digit-like `samples` are; see the module docstring for the fields."""
    return _scores_of(predict_probs(classifier, samples))


def _scores_of(probs: np.ndarray) -> dict:
    """`digit_scores` of the classifier's softmax probabilities `[N, 10]`."""
    conf = probs.max(-1)
    counts = np.bincount(probs.argmax(-1), minlength=NUM_CLASSES)
    p = counts / max(1, counts.sum())
    entropy = float(-sum(q * math.log2(q) for q in p if q > 0))
    return {"num_samples": int(len(probs)), "mean_confidence": float(conf.mean()),
            "frac_confident": float(np.mean(conf > CONFIDENT)),
            "class_entropy_bits": entropy, "class_counts": counts.tolist()}


class DigitScorer:
    """`digit_scores` with a classifier trained on first use (so a re-run that scores
    nothing trains nothing). For the evaluation report: see `scorer_for`."""

    def __init__(self, image_size: int, resize: str = "bilinear", seed: int = 0):
        self.image_size, self.resize, self.seed = image_size, resize, seed
        self.classifier = self.info = None

    def __call__(self, samples) -> dict:
        if self.classifier is None:
            self.classifier, self.info = train_classifier(self.image_size, self.resize,
                                                          self.seed)
        return {**digit_scores(self.classifier, samples),
                "classifier_accuracy": self.info["accuracy"]}


def scorer_for(bindings: dict, image_shape) -> DigitScorer | None:
    """A `DigitScorer` when the model is trained on `mnist_embedded` single-channel
    digits, else None (the classifier means nothing on other data).

    Args:
        bindings: the dataset settings (`training.config.dataset_settings()`).
        image_shape: the model's `(H, W, C)`.
    """
    if bindings.get("name") != "mnist_embedded" or tuple(image_shape)[-1] != 1:
        return None
    return DigitScorer(int(image_shape[0]), bindings.get("resize") or "bilinear")


def evaluate_workdir(workdir, dataset: dict, steps: int = 4, num_samples: int = 256,
                     batch_size: int = 64, seed: int = 2024, classifier=None,
                     info: dict | None = None, write: bool = True,
                     verbose: int = 1) -> dict:
    """Digit scores of the teacher, the `steps`-step student and `steps`-step DDIM.

    All three sample the evaluation's fixed noise (`samples.generate_range`, the same
    `seed` and `batch_size` as `--mode=eval`), clipped DDIM.

    Args:
        workdir: a `WorkDir` (or its folder) with a finished teacher (the student row
            is left out while its stage has not finished).
        dataset: the dataset settings (`training.config.dataset_settings()`); only
            `resize` is used (the classifier sees the digits as the models did).
        steps: the student / DDIM step count compared.
        num_samples, batch_size, seed: the samples.
        classifier, info: a trained classifier and its info (default: trained here at
            the models' image size).
        write: write the work directory's `EvalDir.digits("json")` and `digits("md")`.
        verbose: 0 quiet, 1 one line per model.

    Returns:
        The dict written to `digits.json`.
    """
    wd = inputs.as_workdir(workdir)
    resize = dataset.get("resize", "bilinear")
    stages = {stage: (n, model) for stage, n, model in wd.stage_models()}
    teacher_steps, teacher = stages["teacher"]
    side = teacher.image_shape[0]
    student = next((s for s, (n, _) in stages.items() if n == steps and s != "teacher"),
                   None)
    key = {"version": PROBE_VERSION, "steps": steps, "num_samples": num_samples,
           "batch_size": batch_size, "seed": seed, "image_size": side, "resize": resize,
           "backend": keras.backend.backend(),
           "weights_sha256": {s: wd.final_sha256(s)
                              for s in ("teacher", student) if s is not None}}
    if write and classifier is None:
        saved = fileio.read_keyed_json(wd.eval.digits("json"), key)
        if saved is not None:  # the same weights and settings: scored earlier
            if verbose:
                print("[digits] scores saved earlier (same weights and settings)",
                      flush=True)
            return saved
    if classifier is None:
        classifier, info = train_classifier(side, resize)
    if verbose:
        print(f"[digits] classifier: held-out accuracy {info['accuracy']:.3f} on "
              f"{info['num_heldout']} real digits ({info['seconds']:.0f} s)", flush=True)
    runs = [("teacher", teacher_steps, teacher), ("ddim", steps, teacher)]
    if student is not None:
        runs.append(("distilled", steps, stages[student][1]))
    results = [_score_model(classifier, kind, n, model, num_samples, batch_size, seed,
                            verbose) for kind, n, model in runs]
    record = {"key": key, "workdir": wd.root, "classifier": info,
              "real_heldout": _real_heldout(classifier, side, info),
              "seed": seed, "results": results}
    if write:
        _write(record, wd.eval)
    return record


def _real_heldout(classifier, image_size: int, info: dict) -> dict:
    """The digit scores of the real digits the classifier was not trained on."""
    real_x, real_y = load_digits(image_size, info.get("resize", "bilinear"))
    _, held = split_holdout(real_y, 0.1, info.get("seed", 0))
    return digit_scores(classifier, real_x[held])


def _score_model(classifier, kind: str, num_steps: int, model, num_samples: int,
                 batch_size: int, seed: int, verbose: int) -> dict:
    """One model's digit scores on the evaluation's fixed noise, and the seconds."""
    start = time.time()
    fake = generate_range(model, num_steps, 0, num_samples, num_samples, batch_size,
                          seed, model.num_classes)
    result = {"kind": kind, "num_steps": num_steps, **digit_scores(classifier, fake),
              "seconds": time.time() - start}
    if verbose:
        print(f"[digits] {kind} {num_steps} steps: mean confidence "
              f"{result['mean_confidence']:.3f}, {100 * result['frac_confident']:.0f}% "
              f"> {CONFIDENT}, class entropy {result['class_entropy_bits']:.2f} bits",
              flush=True)
    return result


def _write(record: dict, out: EvalDir) -> None:
    os.makedirs(out.root, exist_ok=True)
    fileio.atomic_write_text(out.digits("json"), json.dumps(record, indent=1))
    fileio.atomic_write_text(out.digits("md"), markdown(record))


def markdown(record: dict) -> str:
    """The digit scores as a Markdown table."""
    info = record["classifier"]
    lines = [f"Digit classifier: held-out accuracy {100 * info['accuracy']:.1f}% on "
             f"{info['num_heldout']} real digits.", "",
             "| samples | steps | mean max-softmax | > 0.9 | class entropy (bits) |",
             "|---|---:|---:|---:|---:|"]
    rows = [("real (held out)", "—", record["real_heldout"])]
    rows += [(r["kind"], r["num_steps"], r) for r in record["results"]]
    for name, steps, r in rows:
        lines.append(f"| {name} | {steps} | {r['mean_confidence']:.3f} | "
                     f"{100 * r['frac_confident']:.0f}% | {r['class_entropy_bits']:.2f} |")
    return "\n".join(lines) + "\n"


def score_probes(probes: dict, dataset: dict, path: str, verbose: int = 1) -> dict | None:
    """Digit scores of every model of an evaluation, from its probes.

    The probes are each model's first samples from the evaluation's fixed noise, so
    sample `i` of the student and of DDIM start from the same `z_1`. The difference of
    their confident fractions, `mean_i(c_i^student - c_i^DDIM)` with
    `c_i = [max softmax_i > 0.9]`, then has the paired standard error
    `std_i(c_i^student - c_i^DDIM) / sqrt(n)`, much smaller than either fraction's own
    when the two agree on most samples.

    Args:
        probes: `{(kind, num_steps): uint8 [n, S, S, 1]}` (`scoring.load_probes`).
        dataset: the dataset settings; only `mnist_embedded` digits are scored.
        path: the keyed JSON record (`EvalDir.probe_digits`): reused while the probes,
            the classifier version and the backend are the same.
        verbose: 0 quiet, else one line when the classifier is trained.

    Returns:
        `{"key", "classifier", "real_heldout", "results": [...], "comparisons":
        [{"num_steps", "distilled", "ddim", "difference", "difference_se"}]}`, or None
        when the data are not the embedded digits or there are no probes.
    """
    if not probes:
        return None
    shape = next(iter(probes.values())).shape[1:]
    scorer = scorer_for(dataset, shape)
    if scorer is None:
        return None
    key = {"version": PROBE_VERSION, "image_size": scorer.image_size,
           "resize": scorer.resize, "backend": keras.backend.backend(),
           "probes": {f"{kind}_{n}": _array_digest(p)
                      for (kind, n), p in sorted(probes.items())}}
    saved = fileio.read_keyed_json(path, key)
    if saved is not None:
        return saved
    classifier, info = train_classifier(scorer.image_size, scorer.resize, scorer.seed)
    if verbose:
        print(f"[eval] digit classifier: held-out accuracy {info['accuracy']:.3f} "
              f"({info['seconds']:.0f} s)", flush=True)
    confident, results = {}, []
    for (kind, n), pixels in sorted(probes.items()):
        probs = predict_probs(classifier, pixels)
        confident[(kind, n)] = probs.max(-1) > CONFIDENT
        results.append({"kind": kind, "num_steps": n, **_scores_of(probs)})
    record = {"key": key, "classifier": info,
              "real_heldout": _real_heldout(classifier, scorer.image_size, info),
              "results": results, "comparisons": _paired_differences(confident)}
    fileio.atomic_write_json(path, record)
    return record


def _paired_differences(confident: dict) -> list:
    """Distilled minus DDIM confident share at each N, with the paired standard error.

    Args:
        confident: `{(kind, num_steps): bool [n]}`, sample `i` of every model drawn from
            the same noise.

    Returns:
        One `{"num_steps", "distilled", "ddim", "difference", "difference_se",
        "num_samples"}` per N that has both a student and DDIM, most steps first.
    """
    pairs = []
    for (kind, n) in sorted(confident, key=lambda k: -k[1]):
        if kind != "distilled" or ("ddim", n) not in confident:
            continue
        student, plain = confident[(kind, n)], confident[("ddim", n)]
        count = min(len(student), len(plain))
        diff = student[:count].astype(np.float64) - plain[:count]
        pairs.append({"num_steps": n, "distilled": float(student[:count].mean()),
                      "ddim": float(plain[:count].mean()),
                      "difference": float(diff.mean()),
                      "difference_se": float(diff.std(ddof=1) / math.sqrt(count))
                      if count > 1 else None, "num_samples": count})
    return pairs


def _array_digest(array: np.ndarray) -> str:
    digest = hashlib.sha256(repr((array.dtype.str, array.shape)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def probe_markdown(record: dict | None) -> list:
    """Markdown lines of `score_probes`' record: the confident share of the distilled
    student and of DDIM at every N, and their paired difference."""
    if not record:
        return []
    teacher = max((r for r in record["results"] if r["kind"] == "teacher"),
                  key=lambda r: r["num_steps"], default=None)
    real = record["real_heldout"]["frac_confident"]
    lines = ["## Do the samples read as digits?", "",
             f"Share of samples a digit classifier gives confidence > {CONFIDENT} "
             f"(held-out accuracy {100 * record['classifier']['accuracy']:.1f}%): real "
             f"held-out digits {100 * real:.0f}%"
             + (f", teacher ({teacher['num_steps']} steps) "
                f"{100 * teacher['frac_confident']:.0f}%" if teacher else "")
             + ". ± is one standard error of the paired difference (same noise).", "",
             "| steps | distilled | DDIM | distilled − DDIM (points) |",
             "|---:|---:|---:|---:|"]
    for c in record["comparisons"]:
        se = "" if c["difference_se"] is None else f" ± {100 * c['difference_se']:.1f}"
        lines.append(f"| {c['num_steps']} | {100 * c['distilled']:.0f}% | "
                     f"{100 * c['ddim']:.0f}% | {100 * c['difference']:+.1f}{se} |")
    return lines + [""]

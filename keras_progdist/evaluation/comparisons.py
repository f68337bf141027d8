"""How each student compares with its teacher and with undistilled DDIM: the yardstick.

An evaluation scores the full-step teacher T, undistilled DDIM of T at a few step
counts, and the student of every distillation stage, all from the same noise. For a
student at N steps this module reports, each with a paired-bootstrap standard error
(`evaluation.bootstrap`):

- ΔFID = FID_N − FID_T, and the ratio FID_N / FID_T (the paper's figure of merit; a
  ratio flatters a weak teacher, so ΔFID is reported beside it);
- the difference to undistilled DDIM at the same N, `FID_N − FID_DDIM,N` (negative:
  the student is better than running the teacher's sampler with N steps);
- the share of undistilled DDIM's gap that distillation removes at the same N,
  `1 − (FID_N − FID_T) / (FID_DDIM,N − FID_T)`: 1 is a student as good as the teacher,
  0 no better than running the teacher's sampler with N steps;
- the RMSE (pixels in [-1, 1]) from the same noise to the 2N-step model it distilled
  (the error one stage adds) and to the original teacher (the error of the ladder), and
  undistilled DDIM's RMSE to the teacher, from the first `PROBE_SAMPLES` samples.

Where FID is not available (fewer samples than feature dimensions) the same
comparisons are made on KID. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from keras_progdist.evaluation import bootstrap

# Samples per model kept for the RMSE comparisons (uint8, in `EvalDir.run_probe`).
PROBE_SAMPLES = 512


def bootstrap_scores(real_features, fake_features, num_replicates: int, seed: int,
                     with_fid: bool) -> dict:
    """The bootstrap replicates of one model's KID (and FID) and their standard errors.

    Args:
        real_features, fake_features: [M, D] and [n, D].
        num_replicates: B (0: nothing is computed).
        seed: the evaluation seed (every model of an evaluation uses the same, which
            pairs their replicates).
        with_fid: also FID (only where FID itself is reported).

    Returns:
        `{"fid_se", "kid_se", "bootstrap": {"replicates", "seed", "fid", "kid"}}`, the
        standard errors None when B < 2.
    """
    if num_replicates < 2:
        return {"fid_se": None, "kid_se": None, "bootstrap": None}
    counts = bootstrap.replicate_counts(len(fake_features), num_replicates, seed)
    kid = bootstrap.kid_replicates(real_features, fake_features, counts)
    fid = bootstrap.fid_replicates(real_features, fake_features, counts) if with_fid \
        else None
    return {"fid_se": None if fid is None else bootstrap.standard_error(fid),
            "kid_se": bootstrap.standard_error(kid),
            "bootstrap": {"replicates": int(num_replicates), "seed": int(seed),
                          "num_samples": int(len(fake_features)),
                          "fid": None if fid is None else [float(v) for v in fid],
                          "kid": [float(v) for v in kid]}}


def _replicates(result: dict, metric: str):
    boot = result.get("bootstrap") or {}
    values = boot.get(metric)
    return None if values is None else np.asarray(values, dtype=np.float64)


def _paired_key(result: dict):
    boot = result.get("bootstrap") or {}
    return boot.get("replicates"), boot.get("seed"), boot.get("num_samples")


def _rmse(a, b) -> float | None:
    if a is None or b is None:
        return None
    count = min(len(a), len(b))
    a = np.asarray(a[:count], np.float64) / 127.5
    b = np.asarray(b[:count], np.float64) / 127.5
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _with_se(value_fn, results: list, metric: str):
    """value_fn of the models' point scores, with its paired-bootstrap standard error."""
    values = [r.get(metric) for r in results]
    if any(v is None for v in values):
        return None, None
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(value_fn(*[np.float64(v) for v in values]))
    if len({_paired_key(r) for r in results}) != 1:
        return value, None  # scored with other noise or replicates: no pairing
    return value, bootstrap.paired(value_fn, *[_replicates(r, metric) for r in results])


def compare(results: list, probes: dict | None = None) -> list:
    """The comparisons of every student and DDIM model with the full-step teacher.

    Args:
        results: the report's per-model results (`kind`, `num_steps`, `fid`, `kid`,
            and `bootstrap` where computed); one `teacher` result has the most steps.
        probes: `{(kind, num_steps): uint8 samples}` from the same noise, for RMSEs.

    Returns:
        One dict per `distilled` and `ddim` result, in the results' order: `kind`,
        `num_steps`, `metric` ("fid", or "kid" where any model lacks FID), `delta`,
        `delta_se`, `ratio`, `ratio_se`, `vs_ddim`, `vs_ddim_se`, `ddim_gap_share`,
        `ddim_gap_share_se` (students with a DDIM model at the same N; else None),
        `rmse_to_2n_teacher`,
        `rmse_to_teacher`.
    """
    probes = probes or {}
    teachers = [r for r in results if r["kind"] == "teacher"]
    if not teachers:
        return []
    teacher = max(teachers, key=lambda r: r["num_steps"])
    metric = "fid" if all(r.get("fid") is not None for r in results) else "kid"
    ddim = {r["num_steps"]: r for r in results if r["kind"] == "ddim"}
    distilled = {r["num_steps"]: r for r in results if r["kind"] == "distilled"}
    teacher_probe = probes.get(("teacher", teacher["num_steps"]))
    out = []
    for r in results:
        if r["kind"] not in ("distilled", "ddim"):
            continue
        n = r["num_steps"]
        entry = {"kind": r["kind"], "num_steps": n, "metric": metric}
        entry["delta"], entry["delta_se"] = _with_se(lambda s, t: s - t, [r, teacher], metric)
        entry["ratio"], entry["ratio_se"] = _with_se(lambda s, t: s / t, [r, teacher], metric)
        entry["ddim_gap_share"] = entry["ddim_gap_share_se"] = None
        entry["vs_ddim"] = entry["vs_ddim_se"] = None
        if r["kind"] == "distilled" and n in ddim:
            entry["vs_ddim"], entry["vs_ddim_se"] = _with_se(
                lambda s, d: s - d, [r, ddim[n]], metric)
            entry["ddim_gap_share"], entry["ddim_gap_share_se"] = _with_se(
                lambda s, t, d: 1.0 - (s - t) / (d - t), [r, teacher, ddim[n]], metric)
        probe = probes.get((r["kind"], n))
        entry["rmse_to_teacher"] = _rmse(probe, teacher_probe)
        entry["rmse_to_2n_teacher"] = None
        if r["kind"] == "distilled":
            parent = ("teacher", teacher["num_steps"]) if 2 * n == teacher["num_steps"] \
                else ("distilled", 2 * n)
            if parent[0] == "teacher" or 2 * n in distilled:
                entry["rmse_to_2n_teacher"] = _rmse(probe, probes.get(parent))
        out.append(entry)
    return out


def _fmt(value, se=None, digits=2, scale=1.0) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    text = f"{scale * value:.{digits}f}"
    return text if se is None else f"{text} ± {scale * se:.{digits}f}"


def _score_cell(result, metric: str, scale: float) -> str:
    if result is None:
        return "—"
    return _fmt(result.get(metric), result.get(metric + "_se"), scale=scale)


def markdown(results: list, comparisons: list) -> list:
    """Markdown lines: distilled against DDIM at every N, with standard errors."""
    if not comparisons:
        return []
    metric = comparisons[0]["metric"]
    scale, label = (1.0, "FID") if metric == "fid" else (1e3, "KID ×1e3")
    teacher = max((r for r in results if r["kind"] == "teacher"),
                  key=lambda r: r["num_steps"])
    by_model = {(r["kind"], r["num_steps"]): r for r in results}
    cmp = {(c["kind"], c["num_steps"]): c for c in comparisons}
    steps = sorted({c["num_steps"] for c in comparisons}, reverse=True)
    lines = ["## Distilled against undistilled DDIM, from the same noise", "",
             f"Teacher ({teacher['num_steps']} steps): {label} "
             f"{_fmt(teacher.get(metric), teacher.get(metric + '_se'), scale=scale)}. "
             "± is one standard error (paired bootstrap over the generated samples). "
             "Share of DDIM's gap removed: 1 = as good as the teacher, 0 = no better than "
             "DDIM at the same steps.", "",
             f"| steps | distilled {label} | DDIM {label} | distilled − DDIM "
             "| Δ to teacher | ratio to teacher "
             "| share of DDIM's gap removed | RMSE to 2N teacher | RMSE to teacher "
             "| DDIM RMSE to teacher |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in steps:
        student, plain = by_model.get(("distilled", n)), by_model.get(("ddim", n))
        c, d = cmp.get(("distilled", n), {}), cmp.get(("ddim", n), {})
        lines.append(
            f"| {n} | {_score_cell(student, metric, scale)} "
            f"| {_score_cell(plain, metric, scale)} "
            f"| {_fmt(c.get('vs_ddim'), c.get('vs_ddim_se'), scale=scale)} "
            f"| {_fmt(c.get('delta'), c.get('delta_se'), scale=scale)} "
            f"| {_fmt(c.get('ratio'), c.get('ratio_se'), 3)} "
            f"| {_fmt(c.get('ddim_gap_share'), c.get('ddim_gap_share_se'), 3)} "
            f"| {_fmt(c.get('rmse_to_2n_teacher'), digits=4)} "
            f"| {_fmt(c.get('rmse_to_teacher'), digits=4)} "
            f"| {_fmt(d.get('rmse_to_teacher'), digits=4)} |")
    return lines + [""]

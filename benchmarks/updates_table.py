"""The pre-registered update / learning-rate experiment: its table and its verdict.

    python benchmarks/updates_table.py RUNDIR [RUNDIR ...] [--out=benchmarks/results]

Reads each RUNDIR's `results.json` (written by `benchmarks/distill_arms.py`; every arm's
`eval/metrics.json` carries the paired-bootstrap replicates of its models) and writes
`fashion_mnist_cpu_updates.json` and `.md`: for every arm and N ∈ {32, 16, 8, 4}, FID ±
SE, KID ± SE, ΔFID ± SE, FID ratio ± SE, the share of undistilled DDIM's gap removed ±
SE, RMSE to the 2N-step teacher and to the teacher, updates, summed learning rate and
seconds; the teachers' FID ± SE; and the verdict of the rule fixed in
`results/fashion_mnist_cpu_updates_plan.md` (committed before the runs), computed by
`verdict` below. Arms not run yet are listed as pending; the verdict waits for them.

Every arm of one teacher scores the same teacher weights from the same noise with the
same bootstrap replicates, so the replicates of two arms' ratios are paired and a
difference of ratios (d1, d2 of the rule) gets its standard error from them. Arms are
grouped by teacher (`teacher_labels`: its kind and its samples' digest), so run folders
that trained the same settings twice keep both trainings' arms apart; the rule and the
learning-rate readings compare arms of one teacher only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from keras_progdist.evaluation import comparisons  # noqa: E402  (pure numpy)

PLAN = "benchmarks/results/fashion_mnist_cpu_updates_plan.md"
RULE_ARMS = {800: "u800", 1600: "u1600", 3200: "u3200"}
STEPS = (32, 16, 8, 4)
PLAN_ORDER = ["u400", "u800", "u1600", "u3200", "lr2_u400", "lr4_u400", "lr2_u800",
              "lr4_u800", "const_u800", "t1_u400"]
PAPER_RATIO = 1.20
SUPPORT_BELOW = 1.25
DOUBLINGS_TO_50K = 4  # 3,200 * 2**4 = 51,200 updates


def _ratio_replicates(metrics: dict, num_steps: int):
    """(ratio, replicates of the ratio) of the N-step student to the teacher, or None."""
    results = metrics.get("results", [])
    teacher = _teacher_result(metrics)
    student = next((r for r in results if r["kind"] == "distilled"
                    and r["num_steps"] == num_steps), None)
    if teacher is None or student is None or student.get("fid") is None:
        return None
    boot_s = (student.get("bootstrap") or {}).get("fid")
    boot_t = (teacher.get("bootstrap") or {}).get("fid")
    reps = None if boot_s is None or boot_t is None else \
        np.asarray(boot_s) / np.asarray(boot_t)
    return student["fid"] / teacher["fid"], reps


def _se(reps) -> float | None:
    return None if reps is None or len(reps) < 2 else float(np.std(reps, ddof=1))


def verdict(ratios: dict) -> dict:
    """The pre-registered rule on R(U), the 4-step ratio at U updates a stage.

    Args:
        ratios: {800: (R, replicates), 1600: ..., 3200: ...}; replicates paired across
            the arms (None where not computed), missing arms absent.

    Returns:
        dict with `verdict` ("supported", "refuted", "undecided" or "pending"), the
        quantities it used (`d1`, `d2`, `d2_se`, `q`, `projection_51200`, `limit`)
        and `why`.
    """
    missing = [u for u in RULE_ARMS if u not in ratios]
    if missing:
        return {"verdict": "pending", "why": f"arms not finished: "
                f"{[RULE_ARMS[u] for u in missing]}"}
    r800, r1600, r3200 = (ratios[u][0] for u in (800, 1600, 3200))
    d1, d2 = r800 - r1600, r1600 - r3200
    reps = [ratios[u][1] for u in (800, 1600, 3200)]
    d2_se = None if any(r is None for r in reps) else _se(reps[1] - reps[2])
    q = d2 / d1 if d1 else float("inf")
    projection = r3200 - d2 * sum(q ** k for k in range(1, DOUBLINGS_TO_50K + 1))
    limit = r3200 - d2 * q / (1 - q) if 0 < q < 1 else None
    out = {"R": {str(u): ratios[u][0] for u in RULE_ARMS}, "d1": d1, "d2": d2,
           "d2_se": d2_se, "q": q, "projection_51200": projection, "limit": limit}
    if r3200 <= SUPPORT_BELOW or projection <= PAPER_RATIO:
        why = (f"R(3200) = {r3200:.3f} <= {SUPPORT_BELOW}" if r3200 <= SUPPORT_BELOW else
               f"the projection to 51,200 updates is {projection:.3f} <= {PAPER_RATIO}")
        return {**out, "verdict": "supported", "why": why}
    if d2_se is not None and d2 < 2 * d2_se:
        return {**out, "verdict": "refuted",
                "why": f"d2 = {d2:.3f} < 2 SE = {2 * d2_se:.3f}: doubling no longer helps"}
    if limit is not None and limit > SUPPORT_BELOW:
        return {**out, "verdict": "refuted",
                "why": f"the geometric limit {limit:.3f} > {SUPPORT_BELOW}"}
    return {**out, "verdict": "undecided", "why": "neither condition is met"}


def lr_lever(ratios_by_arm: dict) -> dict:
    """The plan's learning-rate reading: 'cheaper lever', 'not a lever', or pending."""
    out = {}
    pairs = {"cheaper lever": ("lr4_u800", "u3200"), "not a lever": ("lr4_u400", "u400")}
    for name, (a, b) in pairs.items():
        if a not in ratios_by_arm or b not in ratios_by_arm:
            out[name] = "pending"
            continue
        (ra, reps_a), (rb, reps_b) = ratios_by_arm[a], ratios_by_arm[b]
        se = None if reps_a is None or reps_b is None else _se(reps_a - reps_b)
        if se is None:
            out[name] = "no standard error"
        elif name == "cheaper lever":
            out[name] = bool(ra <= rb + 2 * se)
        else:
            out[name] = bool(ra >= rb - 2 * se)
    return out


def _summed_rate(bindings: list, updates: int) -> float | None:
    """The learning rate summed over one stage's updates: half of peak x updates for a
    linear decay to 0, all of it for a constant rate."""
    rate = next((float(b.split("=")[1]) for b in bindings
                 if b.startswith("distill.learning_rate=")), None)
    constant = "distill.learning_rate_schedule='constant'" in bindings
    return None if rate is None else rate * updates / (1 if constant else 2)


def ddim_of_teachers(arms: dict) -> dict:
    """{teacher: (arm, its undistilled DDIM results)} from the first arm of each teacher
    that scored DDIM (`distill_arms.py --ddim_arm` scores it in one arm a run folder)."""
    out = {}
    for (teacher, name), arm in arms.items():
        ddim = [r for r in (arm.get("metrics") or {}).get("results", [])
                if r["kind"] == "ddim"]
        if ddim and teacher not in out:
            out[teacher] = (name, ddim)
    return out


def borrowed_comparisons(arm: dict, ddim: list) -> dict:
    """{N: comparison} of an arm scored without DDIM, against a sibling arm's DDIM.

    Sound because the sibling scored the same teacher weights (equal teacher label) from
    the same noise with the same bootstrap draws: its DDIM samples are the ones this arm
    would have made, and `comparisons.compare` pairs the replicates only where the
    bootstrap settings agree.
    """
    own = [r for r in (arm.get("metrics") or {}).get("results", []) if r["kind"] != "ddim"]
    return {c["num_steps"]: c for c in comparisons.compare(own + ddim)
            if c["kind"] == "distilled"}


def arm_rows(name: str, arm: dict, ddim_from: tuple | None = None) -> list:
    """One row per scored student of the arm; `ddim_from` = (sibling arm, its DDIM
    results) fills the share of DDIM's gap where the arm did not score DDIM itself."""
    metrics = arm.get("metrics") or {}
    by_steps = {r["num_steps"]: r for r in metrics.get("results", [])
                if r["kind"] == "distilled"}
    borrowed = {}
    if ddim_from and not any(r["kind"] == "ddim" for r in metrics.get("results", [])):
        borrowed = borrowed_comparisons(arm, ddim_from[1])
    stages = {s.get("num_steps"): s for s in arm.get("stages", [])}
    rows = []
    for n in STEPS:
        r = by_steps.get(n)
        if r is None:
            continue
        c = dict(r.get("vs_teacher") or {})
        lent = borrowed.get(n, {}).get("ddim_gap_share") is not None
        if lent:
            c["ddim_gap_share"] = borrowed[n]["ddim_gap_share"]
            c["ddim_gap_share_se"] = borrowed[n]["ddim_gap_share_se"]
        stage = stages.get(n, {})
        rows.append({"arm": name, "num_steps": n, "fid": r.get("fid"),
                     "fid_se": r.get("fid_se"), "kid": r.get("kid"),
                     "kid_se": r.get("kid_se"), "delta_fid": c.get("delta"),
                     "delta_fid_se": c.get("delta_se"), "ratio": c.get("ratio"),
                     "ratio_se": c.get("ratio_se"),
                     "ddim_gap_share": c.get("ddim_gap_share"),
                     "ddim_gap_share_se": c.get("ddim_gap_share_se"),
                     "ddim_scored_in": ddim_from[0] if lent else None,
                     "rmse_to_2n_teacher": c.get("rmse_to_2n_teacher"),
                     "rmse_to_teacher": c.get("rmse_to_teacher"),
                     "updates": stage.get("updates"),
                     "summed_learning_rate": _summed_rate(arm.get("bindings", []),
                                                          stage.get("updates") or 0),
                     "seconds": stage.get("seconds")})
    return rows


def _f(value, se=None, digits=2):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _teacher_result(metrics: dict):
    return max((r for r in metrics.get("results", []) if r["kind"] == "teacher"),
               key=lambda r: r["num_steps"], default=None)


def teacher_labels(results: dict, run: str) -> dict:
    """{teacher kind: label} for one run folder's results.

    A label is the kind and the first 8 hex digits of the teacher's samples' sha256: every
    arm scores its teacher from the evaluation's fixed noise, so equal weights give equal
    digests and two trainings that differ in any bit get different labels (a teacher
    retrained on another machine is a new teacher). Before any arm of a kind is scored,
    the run folder's name stands in for the digest.
    """
    labels = {}
    for arm in results.get("arms", {}).values():
        sha = (_teacher_result(arm.get("metrics") or {}) or {}).get("samples_sha256")
        if sha:
            labels.setdefault(arm["teacher"], f"{arm['teacher']}/{sha[:8]}")
    for arm in results.get("arms", {}).values():
        labels.setdefault(arm["teacher"], f"{arm['teacher']}/{run}")
    return labels


def _by_teacher(ratios: dict) -> dict:
    """{(teacher, arm): ratio} -> {teacher: {arm: ratio}}."""
    groups = {}
    for (teacher, name), got in ratios.items():
        groups.setdefault(teacher, {})[name] = got
    return groups


def _rule_groups(ratios: dict) -> dict:
    """The rule on each teacher with any of its arms: d1 and d2 pair arms of one teacher."""
    return {teacher: verdict({u: arms[a] for u, a in RULE_ARMS.items() if a in arms})
            for teacher, arms in _by_teacher(ratios).items()
            if any(a in arms for a in RULE_ARMS.values())}


def _lr_lever_any_teacher(ratios: dict) -> dict:
    """The learning-rate reading on whichever teacher has both arms of a comparison."""
    out = {}
    for teacher, arms in _by_teacher(ratios).items():
        for reading, value in lr_lever(arms).items():
            if value != "pending" and reading not in out:
                out[reading] = value
                out[f"{reading}: teacher"] = teacher
    return {**{k: "pending" for k in ("cheaper lever", "not a lever")}, **out}


def retrain_spread(ratios: dict) -> list:
    """One arm on two teachers of one kind (the same gin file and seeds, trained twice):
    the difference of its 4-step ratios, with the SE of the paired replicates (the
    bootstrap draws depend only on the sample count and the evaluation seed, and sample i
    of every model starts from the same noise)."""
    by_arm = {}
    for (teacher, name), got in ratios.items():
        by_arm.setdefault(name, []).append((teacher, got))
    out = []
    for name, entries in sorted(by_arm.items()):
        for (ta, (ra, reps_a)), (tb, (rb, reps_b)) in zip(entries, entries[1:]):
            if ta.split("/")[0] != tb.split("/")[0]:
                continue
            se = None if reps_a is None or reps_b is None else _se(reps_b - reps_a)
            out.append({"arm": name, "teachers": [ta, tb], "ratios": [ra, rb],
                        "difference": rb - ra, "se": se})
    return out


def teacher_seed_spread(ratios: dict, teachers: dict) -> list:
    """The plan's teacher-to-teacher spread: u400 on each plain teacher against t1_u400
    on the seed-1 teacher (same settings, other seeds), the difference of their 4-step
    ratios and of the teachers' FIDs. The replicates pair by noise index (every teacher
    is scored from the same noise with the same bootstrap draws), so the SE is that of
    the paired difference."""
    seed1 = [(t, got) for (t, name), got in ratios.items() if name == "t1_u400"]
    out = []
    for (tb, (rb, reps_b)) in seed1:
        for (ta, name), (ra, reps_a) in ratios.items():
            if name != "u400":
                continue
            se = None if reps_a is None or reps_b is None else _se(reps_b - reps_a)
            fids = [(teachers.get(t) or {}).get("fid") for t in (ta, tb)]
            out.append({"arms": ["u400", "t1_u400"], "teachers": [ta, tb],
                        "ratios": [ra, rb], "difference": rb - ra, "se": se,
                        "teacher_fids": fids})
    return out


def build(results_files: list) -> dict:
    arms, teachers = {}, {}
    for path in results_files:
        with open(path) as f:
            results = json.load(f)
        labels = teacher_labels(results, os.path.basename(os.path.dirname(path)))
        for name, arm in results.get("arms", {}).items():
            label = labels[arm["teacher"]]
            arms[label, name] = arm
            r = _teacher_result(arm.get("metrics") or {})
            if r is not None:
                teachers[label] = {"num_steps": r["num_steps"], "fid": r.get("fid"),
                                   "fid_se": r.get("fid_se"), "kid": r.get("kid"),
                                   "kid_se": r.get("kid_se")}
    # Teachers in the order their run folders were given, arms in the plan's order.
    order = list(dict.fromkeys(teacher for teacher, _ in arms))

    def place(key):
        name = key[1]
        return (order.index(key[0]),
                PLAN_ORDER.index(name) if name in PLAN_ORDER else len(PLAN_ORDER), name)

    ddim = ddim_of_teachers(arms)
    rows = [{**row, "teacher": teacher} for (teacher, name) in sorted(arms, key=place)
            for row in arm_rows(name, arms[teacher, name], ddim.get(teacher))]
    ratios = {}
    for key, arm in arms.items():
        got = _ratio_replicates(arm.get("metrics") or {}, 4)
        if got is not None:
            ratios[key] = got
    rules = _rule_groups(ratios)
    # The headline verdict: the teacher with the most of the rule's arms (the later one
    # on a tie); a teacher's missing arms leave its verdict pending.
    def finished(teacher):
        return sum((teacher, a) in ratios for a in RULE_ARMS.values())

    order = list(rules)
    headline = max(order, key=lambda t: (finished(t), order.index(t)), default=None)
    rule = verdict({}) if headline is None else {**rules[headline], "teacher": headline}
    return {"plan": PLAN, "teachers": teachers, "rows": rows, "rule": rule,
            "rule_by_teacher": rules, "learning_rate": _lr_lever_any_teacher(ratios),
            "retrain_spread": retrain_spread(ratios),
            "teacher_seed_spread": teacher_seed_spread(ratios, teachers),
            "four_step_ratio": {f"{a}@{t}": {"ratio": r, "se": _se(reps)}
                                for (t, a), (r, reps) in sorted(ratios.items())}}


# What changed from the plan after its commit, each with when and why it was decided.
# The arms, their settings, the yardstick and the rule are as written there.
DEVIATIONS = [
    "Run order, decided after seeing lr2_u400 and lr4_u400 (both worse than u400): "
    "u800, u1600 and u3200, the arms the rule reads, run before t1_u400, const_u800, "
    "lr2_u800 and lr4_u800.",
    "A second teacher of the same settings, decided after u800 when T0's machine was "
    "lost with it (weights are never committed): T0 was retrained from the same gin file "
    "and seeds at the experiment's library commit on a new machine, and is not bitwise "
    "T0 (its loss after 500 updates: 0.16465 against 0.16426, the same at the two library "
    "commits T0 may have been trained at). XLA compiles the train step for the host's "
    "instruction set, and on the new machine holding it to AVX2 alone changes the "
    "weights after 100 updates (benchmarks/teacher_fingerprint.py), the likely cause. "
    "The new teacher's digest names it in the tables. The rule's arms u800, u1600 and u3200 all run on "
    "it, so that d1 and d2 pair arms of one teacher as planned, and u800 on both teachers "
    "measures how far a retrain alone moves the 4-step ratio.",
    "T0b rebuilt, decided at the start of the third session, before any of its results: "
    "the session's new machine had the same CPU feature flags and the same fingerprint "
    "digest as T0b's, so T0b was retrained there (same gin file, seeds, library commit and "
    "default threads) and lr4_u800, lr2_u800 and const_u800 distil it, to pair with u800, "
    "u1600 and u3200 as planned. Its final loss equals T0b's to every digit and its "
    "samples' digest is T0b's, so the tables name one teacher. A first try with one "
    "thread per process had left T0b's loss curve at 500 updates (0.16464 against "
    "0.16465) and was discarded. T1 trained with one thread per process; it has no "
    "earlier training to match.",
]


def markdown(table: dict) -> str:
    lines = ["# Update / learning-rate arms on `fashion_mnist_cpu.gin` (pre-registered)", "",
             f"Plan and rule: `{table['plan']}` (committed before these runs). ± is one "
             "standard error, paired bootstrap over the generated samples. A teacher is "
             "named by its kind and the digest of its samples (equal weights, equal digest).",
             ""]
    for label, t in sorted(table["teachers"].items()):
        lines.append(f"Teacher `{label}` ({t['num_steps']} steps): FID {_f(t['fid'], t['fid_se'])}, "
                     f"KID×1e3 {_f(t['kid'] and 1e3 * t['kid'], t['kid_se'] and 1e3 * t['kid_se'])}.")
    lines += ["", "| arm | teacher | N | FID | KID ×1e3 | ΔFID | ratio "
              "| share of DDIM's gap removed | RMSE to 2N | RMSE to teacher | updates "
              "| summed LR | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table["rows"]:
        kid = None if r["kid"] is None else 1e3 * r["kid"]
        kid_se = None if r["kid_se"] is None else 1e3 * r["kid_se"]
        lines.append(
            f"| {r['arm']} | {r['teacher']} | {r['num_steps']} | {_f(r['fid'], r['fid_se'])} "
            f"| {_f(kid, kid_se)} "
            f"| {_f(r['delta_fid'], r['delta_fid_se'])} | {_f(r['ratio'], r['ratio_se'], 3)} "
            f"| {_f(r['ddim_gap_share'], r['ddim_gap_share_se'], 3)}"
            f"{'†' if r.get('ddim_scored_in') else ''} "
            f"| {_f(r['rmse_to_2n_teacher'], digits=4)} | {_f(r['rmse_to_teacher'], digits=4)} "
            f"| {r['updates'] or '—'} | {_f(r['summed_learning_rate'])} "
            f"| {_f(r['seconds'], digits=0)} |")
    lines += ["", "Seconds: a stage's training time as its final record gives it. These runs "
              "predate the sum over pieces (the library commit they ran at recorded the "
              "time of the process that finished the stage), so a stage resumed across "
              "pieces shows its last piece only (u3200's 16-step stage: 108 s)."]
    lent = sorted({(r["teacher"], r["ddim_scored_in"]) for r in table["rows"]
                   if r.get("ddim_scored_in")})
    if lent:
        lines += ["", "† DDIM scored in another arm of the same teacher (same weights, noise "
                  "and bootstrap draws): " + "; ".join(f"`{t}`: {a}" for t, a in lent) + "."]
    rule = table["rule"]
    where = f" on teacher `{rule['teacher']}`" if rule.get("teacher") else ""
    lines += ["", f"**Verdict of the pre-registered rule{where}: {rule['verdict']}** "
              f"({rule['why']})."]
    others = {t: v for t, v in table.get("rule_by_teacher", {}).items()
              if t != rule.get("teacher")}
    lines += [f"On teacher `{t}`: {v['verdict']} ({v['why']})." for t, v in others.items()]
    lines += ["", f"Learning-rate lever: {json.dumps(table['learning_rate'])}."]
    for s in table.get("retrain_spread", []):
        lines.append(f"Retrained teacher, same settings: {s['arm']}'s 4-step ratio "
                     f"{s['ratios'][0]:.3f} on `{s['teachers'][0]}`, {s['ratios'][1]:.3f} on "
                     f"`{s['teachers'][1]}`: difference {_f(s['difference'], s['se'], 3)}.")
    for s in table.get("teacher_seed_spread", []):
        fa, fb = s["teacher_fids"]
        lines.append(f"Teacher seed spread: u400 on `{s['teachers'][0]}` (FID {_f(fa)}) "
                     f"{s['ratios'][0]:.3f}, t1_u400 on `{s['teachers'][1]}` (FID {_f(fb)}) "
                     f"{s['ratios'][1]:.3f}: difference {_f(s['difference'], s['se'], 3)}.")
    lines += ["", "Deviations from the plan:", ""] + [f"- {d}" for d in DEVIATIONS] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rundirs", nargs="+")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    table = build([os.path.join(d, "results.json") for d in args.rundirs])
    base = os.path.join(args.out, "fashion_mnist_cpu_updates")
    with open(base + ".json", "w") as f:
        json.dump(table, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tables and the plot of a `distill_arms.py` run.

    python benchmarks/fashion_mnist_arms_table.py RUNDIR [--name=fashion_mnist_cpu_arms]
        [--recorded=benchmarks/results/fashion_mnist_cpu_tensorflow.json] [--command=MD]

Writes `benchmarks/results/<name>.{json,md}` and `<name>_fid_vs_steps.png`:

- FID and KID of every arm's teacher, undistilled DDIM and distilled stages, with the
  ratio distilled / teacher next to the paper's (CIFAR-10: 1.02 / 1.20 / 1.80 / 3.63 at
  8 / 4 / 2 / 1 steps) and the recorded arm (an earlier run, its own teacher) for
  reference;
- per stage, what says where quality is lost: the loss at the stage's first and last
  checkpoint, the RMSE of the student's samples to its own 2N-step teacher's and to the
  original teacher's (same noise), undistilled DDIM's RMSE to the original teacher;
- the cost: distillation seconds and updates over the teacher's;
- the plot: FID against steps for every arm (the best, by 4-step ratio, drawn thick),
  each teacher's FID as a line and its undistilled DDIM as a curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper (Salimans & Ho 2022, CIFAR-10): distilled FID / teacher FID 2.51.
PAPER_RATIO = {8: 2.57 / 2.51, 4: 3.00 / 2.51, 2: 4.51 / 2.51, 1: 9.12 / 2.51}
GOAL_4_STEPS = 1.2


def _scores(arm: dict) -> dict:
    """{(kind, num_steps): result} of an arm's evaluation (empty if not scored)."""
    metrics = arm.get("metrics") or {}
    return {(r["kind"], r["num_steps"]): r for r in metrics.get("results", [])}


def summarize(results: dict, recorded: dict | None) -> dict:
    arms = {}
    # Undistilled DDIM is the teacher's: scored (and sampled) in one arm per teacher.
    shared_ddim, shared_ddim_rmse = {}, {}
    for arm in results["arms"].values():
        for (kind, n), r in _scores(arm).items():
            if kind == "ddim":
                shared_ddim.setdefault(arm["teacher"], {})[n] = r
        for model, dist in arm["distances"].items():
            if model.startswith("ddim_"):
                shared_ddim_rmse.setdefault(arm["teacher"], {})[model] = dist
    for name, arm in results["arms"].items():
        scores = _scores(arm)
        teacher = next((r for (k, _), r in scores.items() if k == "teacher"), None)
        rows = []
        stages = {s["num_steps"]: s for s in arm["stages"] if s["stage"] != "teacher"}
        for n in sorted(stages, reverse=True):
            r = scores.get(("distilled", n), {})
            curve = arm["loss_curves"].get(f"student_{n:05d}", [])
            dist = arm["distances"].get(f"distilled_{n:05d}", {})
            ddim = shared_ddim_rmse.get(arm["teacher"], {}).get(f"ddim_{n:05d}") or {}
            rows.append({
                "num_steps": n, "updates": stages[n]["updates"],
                "seconds": round(stages[n]["seconds"], 1),
                "fid": r.get("fid"), "kid": r.get("kid"), "kid_std_err": r.get("kid_std_err"),
                "fid_ratio": (r["fid"] / teacher["fid"]) if r.get("fid") and teacher
                and teacher.get("fid") else None,
                "paper_ratio": PAPER_RATIO.get(n),
                "loss_first": curve[0][1] if curve else None,
                "loss_last": curve[-1][1] if curve else stages[n]["loss"],
                "rmse_to_teacher_2n": dist.get("rmse_to_teacher_2n"),
                "rmse_to_original_teacher": dist.get("rmse_to_original_teacher"),
                "rmse_ddim_to_original_teacher": ddim.get("rmse_ddim_to_original_teacher"),
            })
        teacher_record = results["teachers"][arm["teacher"]]
        teacher_stage = teacher_record["stages"]
        teacher_updates = teacher_stage[0]["updates"] if teacher_stage else None
        teacher_seconds = None
        if teacher_stage:
            # `seconds` covers the updates of the process that finished the teacher
            # only; scale its rate to all of them.
            timed = teacher_updates - teacher_record.get("resumed_from", 0)
            teacher_seconds = teacher_stage[0]["seconds"] * teacher_updates / timed
        distill_seconds = sum(r["seconds"] for r in rows)
        arms[name] = {
            "about": arm["about"], "teacher": arm["teacher"], "bindings": arm["bindings"],
            "teacher_fid": teacher and teacher.get("fid"),
            "teacher_kid": teacher and teacher.get("kid"),
            "teacher_steps": teacher and teacher["num_steps"],
            "stages": rows,
            "ddim": {n: {"fid": r.get("fid"), "kid": r.get("kid")}
                     for n, r in sorted(shared_ddim.get(arm["teacher"], {}).items())},
            "cost": {"distill_seconds": round(distill_seconds, 1),
                     "teacher_seconds": teacher_seconds and round(teacher_seconds, 1),
                     "seconds_ratio": distill_seconds / teacher_seconds
                     if teacher_seconds else None,
                     "distill_updates": sum(r["updates"] for r in rows),
                     "teacher_updates": teacher_updates},
        }
    summary = {"gin_file": results["gin_file"], "gin_param": results["gin_param"],
               "arms": arms}
    if recorded:
        summary["recorded"] = recorded
    scored = {k: a for k, a in arms.items()
              if any(r["fid_ratio"] for r in a["stages"] if r["num_steps"] == 4)}
    if scored:
        best = min(scored, key=lambda k: next(r["fid_ratio"] for r in scored[k]["stages"]
                                               if r["num_steps"] == 4))
        ratio = next(r["fid_ratio"] for r in arms[best]["stages"] if r["num_steps"] == 4)
        summary["best_arm"] = best
        summary["goal_4_steps"] = {"limit": GOAL_4_STEPS, "best": ratio,
                                   "met": ratio <= GOAL_4_STEPS}
    return summary


def _f(value, digits=2, scale=1.0):
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _e(value):
    return "—" if value is None else f"{value:.1e}"


def markdown(summary: dict, command: str) -> str:
    out = ["# Fashion-MNIST distillation arms (`" + summary["gin_file"] + "`)",
           "",
           "Same protocol as `fashion_mnist_cpu_tensorflow.md`: 2048 samples per model "
           "against 5000 real training images at 16x16, Inception-v3 pool3 FID and KID. "
           "Each kind of teacher is trained once and copied into its arms, so the arms of "
           "one teacher differ only in their students; every model is scored from the "
           "same noise.",
           f"Extra bindings of the last driver call: "
           f"`{' '.join(summary['gin_param']) or 'none'}`.",
           f"Reproduce: {command}.", ""]
    for name, arm in summary["arms"].items():
        out += [f"## Arm {name}: {arm['about']}", "",
                f"Teacher ({arm['teacher']}): {arm['teacher_steps']} steps, FID "
                f"{_f(arm['teacher_fid'])}, KID×1e3 {_f(arm['teacher_kid'], scale=1e3)}.", "",
                "| steps | updates | FID | KID ×1e3 | FID / teacher | paper | DDIM FID | "
                "loss first → last | RMSE to 2N teacher | RMSE to teacher | DDIM RMSE to "
                "teacher |",
                "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in arm["stages"]:
            ddim = arm["ddim"].get(r["num_steps"], {})
            out.append(
                f"| {r['num_steps']} | {r['updates']} | {_f(r['fid'])} | "
                f"{_f(r['kid'], scale=1e3)} | {_f(r['fid_ratio'])} | "
                f"{_f(r['paper_ratio'])} | {_f(ddim.get('fid'))} | "
                f"{_e(r['loss_first'])} → {_e(r['loss_last'])} | "
                f"{_f(r['rmse_to_teacher_2n'], 4)} | {_f(r['rmse_to_original_teacher'], 4)} | "
                f"{_f(r['rmse_ddim_to_original_teacher'], 4)} |")
        cost = arm["cost"]
        out += ["", f"Cost: distillation {cost['distill_seconds']} s and "
                    f"{cost['distill_updates']} updates; teacher {cost['teacher_seconds']} s "
                    f"and {cost['teacher_updates']} updates (its rate over the updates it "
                    f"was timed for, scaled to all); seconds ratio "
                    f"{_f(cost['seconds_ratio'])}.", ""]
    teachers = {arm["teacher"]: arm for arm in summary["arms"].values() if arm["ddim"]}
    for kind, arm in teachers.items():
        out += [f"## Undistilled DDIM of the {kind} teacher (FID {_f(arm['teacher_fid'])} at "
                f"{arm['teacher_steps']} steps)", "",
                "| steps | DDIM FID | DDIM KID ×1e3 | DDIM FID / teacher |",
                "|---:|---:|---:|---:|"]
        for n, v in sorted(arm["ddim"].items(), key=lambda kv: -int(kv[0])):
            ratio = v["fid"] / arm["teacher_fid"] if v["fid"] and arm["teacher_fid"] else None
            out.append(f"| {n} | {_f(v['fid'])} | {_f(v['kid'], scale=1e3)} | {_f(ratio)} |")
        out.append("")
    for name, arm in summary["arms"].items():
        misses = [f"{r['num_steps']} steps {r['fid_ratio']:.2f}× against {r['paper_ratio']:.2f}×"
                  f" (+{r['fid_ratio'] - r['paper_ratio']:.2f})"
                  for r in arm["stages"] if r["fid_ratio"] and r["paper_ratio"]
                  and r["fid_ratio"] > r["paper_ratio"]]
        met = [str(r["num_steps"]) for r in arm["stages"] if r["fid_ratio"]
               and r["paper_ratio"] and r["fid_ratio"] <= r["paper_ratio"]]
        if misses or met:
            out.append(f"Arm {name} against the paper's ratios (N ≤ 8): "
                       + ("missed at " + "; ".join(misses) if misses else "none missed")
                       + (f"; met at {', '.join(met)} steps" if met else "") + ".")
    out.append("")
    if "goal_4_steps" in summary:
        goal = summary["goal_4_steps"]
        out += [f"Goal: the 4-step student ≤ {goal['limit']}× its teacher's FID. Best arm "
                f"`{summary['best_arm']}`: {goal['best']:.2f}× — "
                f"{'met' if goal['met'] else 'NOT met'}.", ""]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = summary.get("best_arm")
    if best is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, arm in summary["arms"].items():
        points = [(r["num_steps"], r["fid"]) for r in arm["stages"] if r["fid"]]
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, "o-", lw=2.5 if name == best else 1,
                    label=f"distilled, arm {name} ({arm['teacher']} teacher)"
                    + (", best" if name == best else ""))
    # Arms may distil different teachers: each teacher's line and its undistilled DDIM
    # (scored in one arm per teacher) are drawn once, in its own dash style.
    teachers = {}
    for arm in summary["arms"].values():
        known = teachers.setdefault(arm["teacher"], {"fid": None, "ddim": {}})
        known["fid"] = known["fid"] or arm["teacher_fid"]
        known["steps"] = arm["teacher_steps"]
        known["ddim"].update({n: v["fid"] for n, v in arm["ddim"].items() if v["fid"]})
    for (kind, teacher), dashes in zip(sorted(teachers.items()), ("-", ":", "-.", "--")):
        if teacher["fid"]:
            ax.axhline(teacher["fid"], color="black", lw=1, ls=dashes,
                       label=f"{kind} teacher, {teacher['steps']} steps")
        if teacher["ddim"]:
            xs, ys = zip(*sorted((int(n), v) for n, v in teacher["ddim"].items()))
            ax.plot(xs, ys, "s", ls=dashes, color="gray",
                    label=f"undistilled DDIM, {kind} teacher")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (2048 samples, 16x16)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rundir")
    parser.add_argument("--name", default="fashion_mnist_cpu_arms")
    parser.add_argument("--recorded", default=os.path.join(
        ROOT, "benchmarks", "results", "fashion_mnist_cpu_tensorflow.json"))
    parser.add_argument("--command", default=None,
                        help="the commands that made RUNDIR, as markdown (quote them yourself)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.rundir, "results.json")) as f:
        results = json.load(f)
    recorded = None
    if args.recorded and os.path.exists(args.recorded):
        with open(args.recorded) as f:
            recorded = json.load(f)
    summary = summarize(results, recorded)
    out = os.path.join(ROOT, "benchmarks", "results", args.name)
    with open(out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    command = args.command or f"`python benchmarks/distill_arms.py {args.rundir}`"
    with open(out + ".md", "w") as f:
        f.write(markdown(summary, command))
    plot(summary, out + "_fid_vs_steps.png")
    with open(out + ".md") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

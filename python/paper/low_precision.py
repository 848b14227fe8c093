"""Low precision (paper §6.2.5, Table 3): the MNIST-1D MLP classifier trained with autocast fp16 +
GradScaler and with autocast bf16, for SGDm, KFAC and APO-Precond at their fp32 hyperparameters
(step decay as in the classification experiment). Counts the steps each optimizer skipped as
non-finite (GradScaler back-offs included) and reports the final test accuracy beside fp32.

The fp32 reference (grid choice and accuracies) is reused from classification.json in --out
when that run used the same steps, seeds and --quick; otherwise it is run here first.

    python python/paper/low_precision.py [--quick] [--steps N] [--seeds S] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import common as C  # noqa: E402
from paper import classification  # noqa: E402

NAME = "low_precision"
TITLE = "Low-precision training (§6.2.5, Table 3)"
METHODS = ("SGDm", "KFAC", "APO-Precond")
PRECISIONS = ("bf16", "fp16")


def task_name(precision: str) -> str:
    return f"{classification.MLP_TASK} {precision}"


def _reusable_fp32(args, steps: int) -> dict | None:
    path = Path(args.out) / f"{classification.NAME}.json"
    if not path.exists():
        return None
    try:
        prev = C.read_json(path)
        t = prev["tasks"][classification.MLP_TASK]
        same = (t["steps"] == steps and t["seeds"] == args.seed_list and t["dtype"] == "fp32"
                and prev["settings"]["quick"] == bool(args.quick)
                and all(m in t["methods"] for m in METHODS))
    except (KeyError, TypeError, ValueError):
        return None
    if not same:
        return None
    t = dict(t)
    t["methods"] = {m: t["methods"][m] for m in METHODS}
    t["reused_from"] = path.name
    return t


def _task(args) -> C.Task:
    return classification.plan(args)[0].task  # the classification experiment's MLP task


def _half_items(args, chosen: dict[str, dict]) -> list[C.PlanItem]:
    fixed = [C.Entry(m, m, [chosen[m]]) for m in METHODS]
    return [C.plan_item(_task(args), fixed, args, dtype=p, key=task_name(p)) for p in PRECISIONS]


def plan(args) -> list[C.PlanItem]:
    """The fp32 grid search (unless reusable) and one run per seed per precision. Before the fp32
    choice is known the half-precision rows stand at each grid's first point (for estimates)."""
    fp32 = C.plan_item(_task(args), classification.entries(args.quick, METHODS), args, dtype="fp32",
                       key=task_name("fp32"))
    reused = _reusable_fp32(args, fp32.steps)
    chosen = {m: (reused["methods"][m]["chosen"] if reused else e.grid[0]) for m, e in zip(METHODS, fp32.entries)}
    return ([] if reused else [fp32]) + _half_items(args, chosen)


def run(args, progress=None) -> dict:
    items = plan(args)
    runner, t0 = C.start(args, NAME, TITLE, sum(i.n_runs() for i in items), progress)
    fp32 = _reusable_fp32(args, items[-1].steps)
    if fp32 is None:
        fp32 = C.run_protocol(items[0], runner, args.device)
    res = {task_name("fp32"): fp32}
    for item in _half_items(args, {m: fp32["methods"][m]["chosen"] for m in METHODS}):
        res[item.key] = C.run_protocol(item, runner, args.device)
    return C.finish(args, NAME, TITLE, {"tasks": res}, t0, C.plot_tasks(NAME))


def claims(result: dict) -> list[dict]:
    """In fp16 and bf16, APO-Precond has no non-finite step and stays within 0.5 pt of fp32."""
    rows = []
    ref = C.method_stat(result, task_name("fp32"), "APO-Precond")
    for prec in PRECISIONS:
        t = task_name(prec)
        acc = C.method_stat(result, t, "APO-Precond")
        try:
            m = result["tasks"][t]["methods"]["APO-Precond"]
            bad = sum(m["skipped_steps"]) + sum(m["nonfinite_loss_steps"]) + int(m["diverged"])
        except (KeyError, TypeError):
            bad = None
        rows.append(C.claim(f"{prec}: APO-Precond has no non-finite or skipped step",
                            "stable with the fp32 FSD/WSD weights (§6.2.5)",
                            f"{'n/a' if bad is None else bad} non-finite/skipped steps over all seeds",
                            (bad == 0) if bad is not None else None))
        rows.append(C.claim(f"{prec}: APO-Precond within 0.5 pt of its fp32 test accuracy",
                            "APO-Precond keeps (or beats) its accuracy in 16 bit (Table 3)",
                            f"{C.fmt(acc)} % vs fp32 {C.fmt(ref)} %",
                            (acc >= ref - 0.5) if C.finite(acc, ref) else None))
    return rows


if __name__ == "__main__":
    from paper import low_precision as _self

    C.experiment_main(_self.run, __doc__)

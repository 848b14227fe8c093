"""Regression MLPs (paper §6.2.1 "UCI tasks", Fig. 3): a 2×100 ReLU MLP on scikit-learn's diabetes
and on a generated regression set the size of UCI Slice (53,500 × 384). SGDm, Adam, KFAC,
Shampoo (pytorch-optimizer) and APO-Precond. As in the paper (App. B.2): inputs and targets
standardized, batch 128, hyperparameters chosen on the final training loss, which is reported
(the test loss is kept in the JSON too).

    python python/paper/regression_mlp.py [--quick] [--steps N] [--seeds S] [--out DIR]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import common as C  # noqa: E402

NAME = "regression_mlp"
TITLE = "Regression MLPs (§6.2.1, Fig. 3)"
TASKS = ("Diabetes MLP", "Slice-sized MLP")


def tasks(quick: bool) -> list[C.Task]:
    common = dict(loss="mse", metric="loss", batch_size=128, fsd="mse", likelihood="gaussian",
                  select_on="train", report_on="train")
    return [
        C.Task(name=TASKS[0], data="diabetes", model=functools.partial(C.mlp, (10, 100, 100, 1)),
               steps=150 if quick else 2000,
               description="sklearn diabetes (266 training rows × 10), 10-100-100-1 ReLU", **common),
        C.Task(name=TASKS[1], data="slice_like",
               data_kwargs=(("n", 4000),) if quick else (),
               model=functools.partial(C.mlp, (384, 100, 100, 1)),
               steps=100 if quick else 1500,
               description="generated, 53,500 × 384 (4,000 rows with --quick), 384-100-100-1 ReLU",
               **common),
    ]


def entries(quick: bool) -> list[C.Entry]:
    if quick:
        return [
            C.Entry("SGDm", "SGDm", C.grid(lr=[0.03, 0.01])),
            C.Entry("Adam", "Adam", C.grid(lr=[3e-3, 1e-3])),
            C.Entry("KFAC", "KFAC", C.grid(lr=[0.01], damping=[1e-2, 1e-3])),
            C.Entry("Shampoo", "Shampoo", C.grid(lr=[0.1, 0.03])),
            C.Entry("APO-Precond", "APO-Precond", C.grid(lr=[0.03, 0.01], meta_lr=[0.03], lambda_fsd=[0.1], lambda_wsd=[0.0])),
        ]
    return [
        C.Entry("SGDm", "SGDm", C.grid(lr=[0.1, 0.03, 0.01, 0.003])),
        C.Entry("Adam", "Adam", C.grid(lr=[1e-2, 3e-3, 1e-3, 3e-4])),
        C.Entry("KFAC", "KFAC", C.grid(lr=[0.03, 0.01], damping=[1e-2, 1e-3])),
        C.Entry("Shampoo", "Shampoo", C.grid(lr=[0.3, 0.1, 0.03, 0.01])),
        C.Entry("APO-Precond", "APO-Precond",
                C.grid(lr=[0.03, 0.01], meta_lr=[0.1, 0.03], lambda_fsd=[0.1], lambda_wsd=[0.0])),
    ]


def plan(args) -> list[C.PlanItem]:
    return [C.plan_item(t, entries(args.quick), args) for t in tasks(args.quick)]


def run(args, progress=None) -> dict:
    return C.run_plan(args, NAME, TITLE, plan(args), progress, C.plot_tasks(NAME))


def claims(result: dict) -> list[dict]:
    """APO-Precond reaches a lower training loss than every baseline, on each task."""
    rows = []
    for t in TASKS:
        apo = C.method_stat(result, t, "APO-Precond")
        label, best = C.best_of(result, t, ["SGDm", "Adam", "KFAC", "Shampoo"], higher_is_better=False)
        rows.append(C.claim(f"{t}: APO-Precond below every baseline (final training loss)",
                            "lower training loss than all baselines (Fig. 3)",
                            f"APO-Precond {C.fmt(apo)} vs best baseline {label or '-'} {C.fmt(best)}",
                            (apo < best) if C.finite(apo, best) else None))
    return rows


if __name__ == "__main__":
    from paper import regression_mlp as _self

    C.experiment_main(_self.run, __doc__)

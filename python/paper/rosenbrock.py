"""Rosenbrock (paper App. C.1, Fig. 7): SGD at the best fixed lr of a grid, APO-LR(SGD), and
APO-Precond with a full 2×2 preconditioner on the 2-vector θ, from θ₀ = (−1.5, 2.5).

The objective is deterministic (no data), so one seed is run: other seeds would repeat it.
The function value after the last step is both the selection score and the reported number.

    python python/paper/rosenbrock.py [--quick] [--steps N] [--out DIR]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import common as C  # noqa: E402

NAME = "rosenbrock"
TITLE = "Rosenbrock (App. C.1)"
INIT = (-1.5, 2.5)


def rosenbrock_model():
    """θ as a plain 2-vector when APO-Precond gives small vectors a full matrix; otherwise as the
    1×2 weight of a Linear layer, whose mapping is the same full 2×2 right factor."""
    if C.features()["apo_full_vector"] == "available":
        return C.VectorParameter(INIT)
    return C.RowParameter(INIT)


def task(quick: bool) -> C.Task:
    return C.Task(
        name="Rosenbrock", data="point", model=rosenbrock_model, loss="rosenbrock", metric="loss",
        batch_size=1, steps=300 if quick else 3000, fsd="mse", select_on="train", report_on="train",
        description=f"f(a, b) = (1 − a)² + 100 (b − a²)² from θ₀ = {INIT}; deterministic, one seed",
    )


def entries(quick: bool) -> list[C.Entry]:
    """Four points per method (two with --quick). No function-space term (the output is θ)."""
    if quick:
        return [
            C.Entry("SGD (best fixed lr)", "SGD", C.grid(lr=[1e-3, 3e-4])),
            C.Entry("APO-LR(SGD)", "APO-LR(SGD)", C.grid(lr=[1e-3, 1e-4], lambda_fsd=[0.0], lambda_wsd=[0.0])),
            C.Entry("APO-Precond", "APO-Precond", C.grid(lr=[1e-4], meta_lr=[0.1, 0.03], lambda_fsd=[0.0], lambda_wsd=[0.0])),
        ]
    return [
        C.Entry("SGD (best fixed lr)", "SGD", C.grid(lr=[2e-3, 1e-3, 3e-4, 1e-4])),
        C.Entry("APO-LR(SGD)", "APO-LR(SGD)", C.grid(lr=[1e-3, 1e-4], lambda_fsd=[0.0], lambda_wsd=[0.0, 1.0])),
        C.Entry("APO-Precond", "APO-Precond", C.grid(lr=[1e-3, 1e-4], meta_lr=[0.1, 0.03], lambda_fsd=[0.0], lambda_wsd=[0.0])),
    ]


def plan(args) -> list[C.PlanItem]:
    return [C.plan_item(task(args.quick), entries(args.quick), args, seeds=[0])]


def run(args, progress=None) -> dict:
    return C.run_plan(args, NAME, TITLE, plan(args), progress, C.plot_tasks(NAME))


def claims(result: dict) -> list[dict]:
    """APO-LR and APO-Precond end below SGD at its best fixed lr."""
    t = "Rosenbrock"
    sgd = C.method_stat(result, t, "SGD (best fixed lr)")
    rows = []
    for label in ("APO-LR(SGD)", "APO-Precond"):
        v = C.method_stat(result, t, label)
        holds = (v < sgd) if C.finite(v, sgd) else None
        rows.append(C.claim(
            f"{label} ends below the best fixed-lr SGD", "yes (Fig. 7)",
            f"{label} {C.fmt(v)} vs SGD {C.fmt(sgd)}", holds))
    return rows


if __name__ == "__main__":
    from paper import rosenbrock as _self  # run under the package name, so workers can import it

    C.experiment_main(_self.run, __doc__)

"""Deep autoencoder (paper §6.2.2, Fig. 4 right): the 8-layer sigmoid autoencoder of Martens &
Grosse (2015) — 784-1000-500-250-30-250-500-1000-784 — scaled to the 64 pixels of scikit-learn's
digits: 64-128-64-32-8-32-64-128-64, sigmoid, sparse initialization, Bernoulli likelihood
(binary cross-entropy summed over pixels) plus ½·1e-5·‖θ‖². SGDm, Adam, KFAC, EKFAC (sampled
Fisher with a Bernoulli likelihood when available) and APO-Precond (fsd="bernoulli"). Chosen on
and reporting the final training loss, as the paper (App. B.3).

    python python/paper/autoencoder.py [--quick] [--steps N] [--seeds S] [--out DIR]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import common as C  # noqa: E402

NAME = "autoencoder"
TITLE = "Deep autoencoder (§6.2.2, Fig. 4 right)"
TASK = "Digits autoencoder"
WIDTHS = (64, 128, 64, 32, 8, 32, 64, 128, 64)


def task(quick: bool) -> C.Task:
    return C.Task(
        name=TASK, data="digits", model=functools.partial(C.mlp, WIDTHS, act="sigmoid", init="sparse"),
        loss="bce_sum", metric="loss", batch_size=128, steps=150 if quick else 2500,
        fsd="bernoulli", likelihood="bernoulli", select_on="train", report_on="train", l2=1e-5,
        description="digits pixels in [0, 1], " + "-".join(map(str, WIDTHS)) +
                    " sigmoid, sparse init, batch 128; BCE summed over pixels",
    )


def entries(quick: bool) -> list[C.Entry]:
    if quick:
        return [
            C.Entry("SGDm", "SGDm", C.grid(lr=[0.1, 0.03])),
            C.Entry("Adam", "Adam", C.grid(lr=[1e-2, 3e-3])),
            C.Entry("KFAC", "KFAC", C.grid(lr=[0.03], damping=[0.1, 0.01])),
            C.Entry("EKFAC", "EKFAC", C.grid(lr=[0.03], damping=[0.1, 0.01])),
            C.Entry("APO-Precond", "APO-Precond", C.grid(lr=[0.1], meta_lr=[0.1, 0.03], lambda_fsd=[0.1], lambda_wsd=[0.0])),
        ]
    return [
        C.Entry("SGDm", "SGDm", C.grid(lr=[0.3, 0.1, 0.03, 0.01])),
        C.Entry("Adam", "Adam", C.grid(lr=[3e-2, 1e-2, 3e-3, 1e-3])),
        C.Entry("KFAC", "KFAC", C.grid(lr=[0.1, 0.03], damping=[0.1, 0.01])),
        C.Entry("EKFAC", "EKFAC", C.grid(lr=[0.1, 0.03], damping=[0.1, 0.01])),
        C.Entry("APO-Precond", "APO-Precond",
                C.grid(lr=[0.3, 0.1], meta_lr=[0.1], lambda_fsd=[0.1], lambda_wsd=[0.0, 1.0])),
    ]


def plan(args) -> list[C.PlanItem]:
    return [C.plan_item(task(args.quick), entries(args.quick), args)]


def run(args, progress=None) -> dict:
    return C.run_plan(args, NAME, TITLE, plan(args), progress, C.plot_tasks(NAME))


def claims(result: dict) -> list[dict]:
    """APO-Precond ≥ 10 % below the best first-order method; KFAC (sampled Fisher) below Adam."""
    apo = C.method_stat(result, TASK, "APO-Precond")
    fo_label, fo = C.best_of(result, TASK, ["SGDm", "Adam"], higher_is_better=False)
    kfac = C.method_stat(result, TASK, "KFAC")
    adam = C.method_stat(result, TASK, "Adam")
    mc = result.get("features", {}).get("kfac_mc_fisher", "missing")
    gain = (1 - apo / fo) if C.finite(apo, fo) and fo > 0 else None
    return [
        C.claim("APO-Precond ≥ 10 % below the best first-order method (final training loss)",
                "APO-Precond converges faster than first-order methods (Fig. 4)",
                f"APO-Precond {C.fmt(apo)} vs {fo_label or 'first-order'} {C.fmt(fo)} "
                f"({'n/a' if gain is None else f'{100 * abs(gain):.1f} % ' + ('lower' if gain >= 0 else 'higher')})",
                (apo <= 0.9 * fo) if C.finite(apo, fo) else None),
        C.claim("KFAC (sampled Fisher) below Adam (final training loss)",
                "KFAC is the strongest method here (Fig. 4; Martens & Grosse 2015)",
                f"KFAC {C.fmt(kfac)} vs Adam {C.fmt(adam)}",
                (kfac < adam) if (mc == "available" and C.finite(kfac, adam)) else None,
                "" if mc == "available" else f"not decidable: {mc}"),
    ]


if __name__ == "__main__":
    from paper import autoencoder as _self

    C.experiment_main(_self.run, __doc__)

"""APO-Precond's two structures side by side: structure="full" (S free, m×n) against
structure="kron" (S² = u vᵀ, so P = L ⊗ R), on the MNIST-1D MLP of the classification experiment
(§6.2.3; test accuracy, chosen on validation) and the digits autoencoder (§6.2.2; final training
loss). Each structure gets the grid its experiment gives APO-Precond, the same steps and the same
seeds (grid on seed 0, the chosen point on every seed; mean ± std), so the only difference is the
structure. Writes kron_vs_full.json (every run, with its preconditioner statistics) and
kron_vs_full.md (the table) under --out.

    python python/paper/kron_vs_full.py [--quick] [--steps N] [--seeds S] [--out DIR]
    python python/paper/kron_vs_full.py --s2-fit N [--out DIR]

``--s2-fit N`` measures how much of what "full" learns kron cannot hold: it trains "full" for N
steps (seed 0, the point chosen in --out's kron_vs_full.json, no lr schedule) and, per layer,
fits the learnt log S² with the kron family log S² = a_i + b_j (row + column means), reporting
the spread of log S², the fraction the fit explains and the residual as a factor (exp of its std).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import autoencoder, classification  # noqa: E402
from paper import common as C  # noqa: E402

NAME = "kron_vs_full"
TITLE = "APO-Precond: structure full vs kron"
STRUCTURES = ("full", "kron")
DEFAULT_OUT = C.DEFAULT_OUT / NAME


def _apo_grid(entries: list[C.Entry]) -> list[dict]:
    return next(e.grid for e in entries if e.label == "APO-Precond")


def plan(args) -> list[C.PlanItem]:
    tasks = [
        (classification.mnist1d_mlp_task(150 if args.quick else 3000),
         _apo_grid(classification.entries(args.quick, methods=("APO-Precond",)))),
        (autoencoder.task(args.quick), _apo_grid(autoencoder.entries(args.quick))),
    ]
    return [C.plan_item(task, [C.Entry(f"APO-Precond {s}", "APO-Precond", [dict(hp, structure=s) for hp in grid])
                               for s in STRUCTURES], args)
            for task, grid in tasks]


def table(result: dict) -> str:
    """The markdown table: per task and structure, the reported metric (mean ± std over seeds),
    the chosen point, the wall time per run and the mean ‖A−I‖_F, ‖B−I‖_F at the end of training."""
    lines = [f"# {TITLE}", "",
             "| task | metric | structure | mean ± std (n) | chosen point | s / run | ‖A−I‖ | ‖B−I‖ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tname, t in result["tasks"].items():
        metric = f"{t['report_on']} {t['metric']}" + (" (%)" if t["metric"] == "accuracy" else "")
        for label, m in t["methods"].items():
            chosen = ", ".join(f"{k}={v}" for k, v in m["chosen"].items() if k != "structure")
            secs = sum(m["time_s"]) / len(m["time_s"])
            dists = [(s.get("a_dist", 0.0), s.get("b_dist", 0.0))
                     for r in m["runs"] for s in (r.get("precond_stats") or {}).values()]
            a = sum(d[0] for d in dists) / max(1, len(dists))
            b = sum(d[1] for d in dists) / max(1, len(dists))
            lines.append(f"| {tname} | {metric} | {label.split()[-1]} | {C.fmt_ms(m['mean'], m['std'])} ({m['n']}) "
                         f"| {chosen} | {secs:.1f} | {a:.3g} | {b:.3g} |")
    s = result["settings"]
    steps = ", ".join(f"{k}: {t['steps']}" for k, t in result["tasks"].items())
    lines += ["", f"steps per run: {steps}; "
                  f"seeds {s['seeds']}; {s['device']} {s['dtype']}, {s['jobs']} job(s) × {s['threads']} thread(s); "
                  f"torch {s['torch']}; {result['elapsed_s']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def run(args, progress=None) -> dict:
    result = C.run_plan(args, NAME, TITLE, plan(args), progress, C.plot_tasks(NAME))
    (Path(args.out) / f"{NAME}.md").write_text(table(result))
    return result


def s2_fit(args, steps: int) -> str:
    """The ``--s2-fit`` table (see the module docstring)."""
    from apo_kernels.optim import APOPrecond

    lines = [f"log S² learnt by structure=\"full\" after {steps} steps (seed 0, chosen point, fixed lr), "
             "fitted by the kron family a_i + b_j:", "",
             "| task | layer | shape | std of log S² | explained by u vᵀ | residual factor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for item in plan(args):
        task = item.task
        hp = C.chosen_point(args.out, NAME, task.name, "APO-Precond full")
        if hp is None:
            raise FileNotFoundError(f"--s2-fit needs {Path(args.out) / (NAME + '.json')} from a full run")
        hp = {k: v for k, v in hp.items() if k not in ("schedule", "structure")}
        torch.manual_seed(0)
        data = C.load_data(task.data, task.data_kwargs, "cpu", "fp32")
        model = task.model()
        opt = APOPrecond(model, fsd=task.fsd if task.fsd != "bernoulli" else C.bernoulli_kl, **hp)
        x, y = data.x_train, data.y_train
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (task.batch_size,), generator=gen)
            xb, yb = x[idx], y[idx]

            def closure():
                opt.zero_grad()
                loss = C.loss_value(task.loss, model(xb), yb, xb)
                if task.l2:
                    loss = loss + 0.5 * task.l2 * sum((p * p).sum() for p in model.parameters())
                loss.backward()
                return loss

            opt.step(closure, fsd_inputs=(xb,))
        for layer in opt.layers:
            log_s2 = 2.0 * layer.precond.S.double()  # s_param="log": S² = exp(2S)
            fit = log_s2.mean(1, keepdim=True) + log_s2.mean(0, keepdim=True) - log_s2.mean()
            resid = log_s2 - fit
            lines.append(f"| {task.name} | {layer.name} | {tuple(log_s2.shape)} | {float(log_s2.std()):.2f} "
                         f"| {float(1 - resid.var() / log_s2.var()):.2f} | ×{float(torch.exp(resid.std())):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = C.parser(__doc__)
    parser.add_argument("--s2-fit", type=C.cli_int(1), default=None, metavar="N",
                        help="instead of the comparison: fit full's learnt S² after N steps by u vᵀ")
    parser.set_defaults(out=str(DEFAULT_OUT))
    args = C.parse_flags(parser)
    if args.s2_fit is not None:
        text = s2_fit(args, args.s2_fit)
        (Path(args.out) / f"{NAME}_s2_fit.md").write_text(text)
        print(text)
        sys.exit(0)
    try:
        with C.Progress(enabled=not args.no_progress) as prog:
            args.progress = prog
            res = run(args)
    finally:
        C.shutdown_workers()
    print(Path(args.out) / f"{NAME}.md")
    print(table(res))

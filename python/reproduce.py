"""Run the APO paper's experiments offline and write RESULTS.md: one table per experiment with
the paper's claim beside what was measured here and whether it holds, plus the plots.

    python python/reproduce.py                     # full run (sized for ~1 h on a 2-core CPU)
    python python/reproduce.py --quick             # smoke test, a few minutes at most
    python python/reproduce.py --only rosenbrock,autoencoder --out build/paper
    python python/reproduce.py --report-only       # rebuild RESULTS.md from the JSONs in --out

Each experiment writes <out>/<name>.json (and its PNGs) as soon as it finishes, so a partial run
is usable; RESULTS.md marks experiments without a JSON as "not run". Every experiment is also
runnable alone: python python/paper/<name>.py --help.
"""
from __future__ import annotations

import datetime
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper import common as C  # noqa: E402

EXPERIMENTS = ("rosenbrock", "ill_conditioned", "regression_mlp", "autoencoder", "classification",
               "apo_lr", "low_precision", "ablations")


def module(name: str):
    return importlib.import_module(f"paper.{name}")


def parse(argv=None):
    ap = C.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma list of experiments ({', '.join(EXPERIMENTS)})")
    ap.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md from existing JSONs")
    ap.add_argument("--estimate", type=C.cli_int(0), default=0, metavar="STEPS",
                    help="time every row at its first grid point for STEPS steps (one process) and print "
                         "the extrapolated wall-clock of each experiment with these flags; runs nothing else")
    args = C.parse_flags(ap, argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(EXPERIMENTS)
    for n in names:
        if n not in EXPERIMENTS:
            ap.error(f"--only: unknown experiment {n!r}; choose from {', '.join(EXPERIMENTS)}")
    args.names = names
    return args


def run_all(args) -> dict[str, float]:
    """Run the selected experiments in order; returns seconds per experiment."""
    times = {}
    with C.Progress(enabled=not args.no_progress) as progress:
        args.progress = progress
        try:
            for name in args.names:
                t0 = time.perf_counter()
                try:
                    module(name).run(args, progress)
                except Exception:  # one broken experiment must not lose the others' results
                    C.write_json(Path(args.out) / f"{name}.json",
                                 {"experiment": name, "error": traceback.format_exc()[-3000:]})
                    print(f"{name} failed:\n{traceback.format_exc()}", file=sys.stderr)
                times[name] = time.perf_counter() - t0
        finally:
            C.shutdown_workers()
    return times


# ------------------------------------------------------------------------------------------
# RESULTS.md
# ------------------------------------------------------------------------------------------
def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _hp(hp: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()) or "-"


def _grid_score(score, diverged: bool) -> str:
    """A grid point's score, marked when its run diverged with a finite score (it ended above its
    start, or raised); "diverged" alone when the score itself is not finite."""
    if score is None:
        return "diverged"
    return f"{C.fmt(score)} (diverged)" if diverged else C.fmt(score)


def results_table(tres: dict) -> list[str]:
    """One row per method: chosen point, reported metric mean ± std, stability, cost."""
    unit = " (%)" if tres["metric"] == "accuracy" else ""
    metric = f"{tres['report_on']} {tres['metric']}{unit}"
    lines = [f"| method | chosen point | {metric}, mean ± std | seeds | diverged | skipped steps "
             f"| s/run | grid ({tres['select_on']} {tres['metric']}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, m in tres["methods"].items():
        grid = "; ".join(f"{_hp(hp)} → {_grid_score(s, bad)}" for hp, s, bad in
                         zip(m["grid"], m["grid_scores"], m["grid_diverged"])) if len(m["grid"]) > 1 else "-"
        mean = C.fmt_ms(m["mean"], m["std"]) if m["mean"] is not None else f"diverged ({m['diverged']}/{m['n']})"
        t = sum(m["time_s"]) / len(m["time_s"]) if m["time_s"] else None
        lines.append("| " + " | ".join(_cell(x) for x in (
            label, _hp(m["chosen"]), mean, m["n"], m["diverged"], sum(m["skipped_steps"]),
            C.fmt(t, 3), grid)) + " |")
    notes = sorted({f"{label}: {n}" for label, m in tres["methods"].items() for n in m.get("notes", [])})
    notes += [f"{label}: {_hp(r['point'])} rejected (diverged with seed(s) {r['diverged_seeds']})"
              for label, m in tres["methods"].items() for r in m.get("rejected", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return lines


def claims_table(rows: list[dict]) -> list[str]:
    lines = ["| claim | paper | measured here | holds here? |", "| --- | --- | --- | --- |"]
    for r in rows:
        h = C.holds_text(r["holds"]) + (f" ({r['why']})" if r.get("why") else "")
        lines.append("| " + " | ".join(_cell(x) for x in (r["claim"], r["paper"], r["measured"], h)) + " |")
    return lines


def report(out: Path, names=EXPERIMENTS, times: dict | None = None) -> Path:
    """Write <out>/RESULTS.md from the JSONs there; returns its path."""
    out = Path(out)
    sections, summary, meta = [], [], None
    for i, name in enumerate(names, 1):
        mod = module(name)
        path = out / f"{name}.json"
        head = f"## {i}. {mod.TITLE}"
        if not path.exists():
            sections += [head, "", "not run", ""]
            summary.append((mod.TITLE, "not run", "-"))
            continue
        result = C.read_json(path)
        if "error" in result:
            sections += [head, "", "failed:", "", "```", result["error"].strip(), "```", ""]
            summary.append((mod.TITLE, "failed (see its section)", "-"))
            continue
        meta = meta or result
        rows = mod.claims(result)
        s = result["settings"]
        sections += [head, "",
                     f"{'quick' if s['quick'] else 'full'} settings; {s['device']}, "
                     f"{s['dtype']}; {result['elapsed_s']:.0f} s wall-clock for the whole experiment "
                     f"({s['jobs']} worker process(es)).", "", "**Claims**", ""]
        sections += claims_table(rows) + [""]
        for r in rows:
            summary.append((mod.TITLE, r["claim"], C.holds_text(r["holds"])))
        for tname, tres in result["tasks"].items():
            sections += [f"**{tname}** — {tres.get('description', '')}; {tres['steps']} steps, "
                         f"batch {tres['batch_size']}, {tres['dtype']}, seeds {tres['seeds']}, "
                         f"chosen on {tres['select_on']} {tres['metric']}"
                         + (f"; reused from {tres['reused_from']}" if tres.get("reused_from") else ""), ""]
            sections += results_table(tres) + [""]
        if result.get("base_points_from"):
            sections += ["Base points from: " + ", ".join(f"{k} ← {v}" for k, v in result["base_points_from"].items()), ""]
        sections += [f"![{p}]({p})" for p in result.get("plots", [])] + [""]

    lines = ["# The APO paper's experiments, reproduced offline", "",
             "Generated by `python python/reproduce.py`; every \"holds here?\" is computed from the "
             "numbers below by the experiment's `claims()` function (yes / no / n/a when a number is "
             "missing or the tested feature is not available). Hyperparameters are chosen per method "
             "from grids of the same size, declared in each script.", ""]
    if meta is not None:
        s = meta["settings"]
        lines += [f"torch {s['torch']}, {s['cpu_count']} CPU(s), device {s['device']}; "
                  f"written {datetime.datetime.now().isoformat(timespec='minutes')}.", ""]
        lines += ["Optional optimizer features at run time:", "", "| feature | status |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in meta.get("features", {}).items()] + [""]
    if times:
        lines += ["Wall-clock per experiment (this invocation): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                  + f"; total {sum(times.values()):.0f} s.", ""]
    lines += ["## Summary", "", "| experiment | claim | holds here? |", "| --- | --- | --- |"]
    lines += [f"| {_cell(a)} | {_cell(b)} | {c} |" for a, b, c in summary] + [""]
    path = out / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + sections))
    return path


def estimate(args, probe_steps: int) -> dict[str, float]:
    """Extrapolated seconds per experiment: each row timed for ``probe_steps`` steps in this
    process (one thread per worker, as in a run), scaled to its runs × steps, divided by --jobs."""
    import torch

    torch.set_num_threads(args.threads if args.jobs == 1 else 1)
    out = {}
    print("experiment       wall-clock now   CPU-time based (an idle machine)")
    for name in args.names:
        wall = cpu = 0.0
        for item in module(name).plan(args):
            C.load_data(item.task.data, item.task.data_kwargs, args.device, "fp64" if item.dtype == "fp64" else "fp32")
            for e in item.entries:
                spec = C.RunSpec(task=item.task, method=e.method, hp=e.grid[0], seed=0,
                                 steps=probe_steps, device=args.device, dtype=item.dtype)
                t0, c0 = time.perf_counter(), time.process_time()
                C.train(spec)
                scale = (len(e.grid) + len(item.seeds) - 1) * item.steps / probe_steps
                wall += (time.perf_counter() - t0) * scale
                cpu += (time.process_time() - c0) * scale
        out[name] = wall / args.jobs
        n = sum(i.n_runs() for i in module(name).plan(args))
        print(f"{name:16s} ~{wall / args.jobs:6.0f} s        ~{cpu / args.jobs:6.0f} s   ({n} runs)")
    print(f"{'total':16s} ~{sum(out.values()):6.0f} s with --jobs {args.jobs}")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.estimate:
        estimate(args, args.estimate)
        return 0
    times = None
    if not args.report_only:
        t0 = time.perf_counter()
        times = run_all(args)
        print(f"ran {', '.join(args.names)} in {time.perf_counter() - t0:.0f} s")
    path = report(args.out, times=times)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``apo-bench`` / ``python -m apo_kernels.bench``: the micro-benchmarks of apo-kernels.

    apo-bench --quick                      # ≤ 60 s on a 2-core CPU: every section, small sizes
    apo-bench                              # full run on the GPU if present, else the CPU
    apo-bench --device cpu --sizes 256,1024 --dtype fp32,bf16 --backend cpu --out my_dir

Sections: op (forward/backward per backend vs the torch chain; grouped vs per-layer loop over
ResNet-18 / 12-block transformer / 64 small layers), precond (APO vs KFAC vs EKFAC cost per step vs
width), train (end-to-end step time of SGD, Adam, KFAC, EKFAC, APO-LR, APO-Precond, timed round-robin;
MLPs, the MNIST-1D-sized MLP 40-256-256-10 on 2 threads, a CNN), lowprec
(half-precision inv/cholesky/eigh tried for real). Prints tables, writes results.json,
summary.md and op.png / precond.png / train.png into --out (default apo_bench_out/).
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .._args import cli_device, cli_int, cli_ints

SECTIONS = ("op", "precond", "train", "lowprec")


def _names(choices):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(choices)}")
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apo-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (≤ 60 s on a 2-core CPU)")
    p.add_argument("--device", type=functools.partial(cli_device, auto=True), default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--sizes", type=cli_ints, help="op sizes m=n (default CPU 256,512,1024,2048; GPU 256…8192)")
    p.add_argument("--widths", type=cli_ints, help="layer widths of the preconditioner-cost section")
    p.add_argument("--train-widths", type=cli_ints, help="MLP widths of the end-to-end section")
    p.add_argument("--dtype", type=_names({"fp32", "bf16", "fp16"}), help="comma list of fp32,bf16,fp16 (default all)")
    p.add_argument("--backend", default="auto",
                   help="comma list of registered op backends to time (see apo_kernels.backends()); "
                        "auto = every one usable on the device, ranked above the reference fallback")
    p.add_argument("--sections", type=_names(set(SECTIONS)), default=list(SECTIONS), help="comma list of " + ",".join(SECTIONS))
    p.add_argument("--layer-sets", type=_names({"small64", "resnet18", "transformer12"}),
                   default=["small64", "resnet18", "transformer12"], help="layer sets of the grouped benchmark")
    p.add_argument("--threads", type=cli_int(1),
                   help="torch CPU threads (default: torch's choice; the small-model training problem: 2)")
    p.add_argument("--out", default="apo_bench_out", help="output folder (JSON, Markdown, PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _pick_backends(arg: str, device) -> tuple[list[str], dict[str, str]]:
    from .common import timed_backends

    wanted = None if arg == "auto" else [x.strip() for x in arg.split(",") if x.strip()]
    try:
        return timed_backends(device.type, wanted)
    except ValueError as exc:
        raise SystemExit(f"apo-bench: --backend: {exc}") from None


def make_config(args, tick=lambda d: None):
    import torch

    from .common import Config

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("apo-bench: --device cuda but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"apo-bench: --device {dev} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    gpu, quick = device.type == "cuda", args.quick
    if gpu:
        sizes = [256, 1024, 4096] if quick else [256, 512, 1024, 2048, 4096, 8192]
        widths = [1024, 4096] if quick else [1024, 2048, 4096]
        train_w = [1024] if quick else [1024, 2048]
    elif quick:
        sizes, widths, train_w = [128, 256, 512], [128, 256], [256]
    else:
        sizes, widths, train_w = [256, 512, 1024, 2048], [256, 512, 1024, 2048], [1024, 2048]
    dtypes = args.dtype or (["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"])
    backends, skipped = _pick_backends(args.backend, device)
    return Config(
        device=device, quick=quick, sizes=args.sizes or sizes, dtypes=dtypes, backends=backends,
        skipped_backends=skipped, widths=args.widths or widths, layer_sets=args.layer_sets,
        train_widths=args.train_widths or train_w, sections=args.sections, threads=args.threads, tick=tick,
    )


def _estimate_ticks(cfg) -> int:
    n = 0
    if "op" in cfg.sections:
        n += sum(1 + len(cfg.backends) for d in cfg.dtypes for s in cfg.sizes if cfg.size_ok(s, d))
        from .op_bench import n_grouped_ticks

        n += n_grouped_ticks(cfg)
    if "precond" in cfg.sections:  # APO, APO-kron, KFAC, EKFAC per width and dtype
        half = [d for d in ("bf16", "fp16") if d in cfg.dtypes][:1]  # as precond_bench picks it
        n += 4 * sum(1 for d in ["fp32"] + half for w in cfg.widths if cfg.size_ok(w, d))
    if "train" in cfg.sections:
        from .train_bench import n_ticks

        n += n_ticks(cfg)
    if "lowprec" in cfg.sections:
        n += 3 if cfg.quick else 9
    return n


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=200)
    progress = Progress(TextColumn("[bold]apo-bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, disable=quiet)
    return console, progress


def _output_folder(path: str) -> Path:
    """``--out``, created and written to once before any section runs: a folder that cannot be
    written is an error at the start, not after the run."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"apo-bench: --out {path}: cannot write there ({e.strerror or e})") from None
    return out


def run(args) -> dict:
    """Run the selected sections; returns the result dict (also written to ``args.out``)."""
    from . import lowprec, op_bench, precond_bench, report, train_bench
    from .common import cpu_gemm_rates
    from .timing import env_info, thread_handoff_ns

    try:
        import rich  # noqa: F401
    except ImportError:
        raise SystemExit("apo-bench needs rich (the bench extra): pip install 'apo-kernels[bench]'") from None
    t_start = time.perf_counter()
    out = _output_folder(args.out)
    console, progress = _progress(args.no_progress)
    task = progress.add_task("starting", total=1)

    def tick(desc: str):
        progress.update(task, advance=1, description=desc)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = make_config(args, tick)
    progress.update(task, total=_estimate_ticks(cfg), completed=0)
    res: dict = {}
    meta = env_info(cfg.device)
    meta["command"] = " ".join(["apo-bench"] + [shlex.quote(a) for a in sys.argv[1:]]) if sys.argv else "apo-bench"
    meta["timing"] = cfg.timer.method
    meta["quick"] = cfg.quick
    res["meta"] = meta
    res["config"] = dict(sizes=cfg.sizes, dtypes=cfg.dtypes, backends=cfg.backends, skipped_backends=cfg.skipped_backends,
                         widths=cfg.widths, train_widths=cfg.train_widths, layer_sets=cfg.layer_sets, sections=cfg.sections,
                         cpu_half_cap={d: cfg.half_cap(d) for d in cfg.dtypes if d != "fp32"})
    notes = []
    for d in cfg.dtypes:
        if cfg.half_cap(d):
            rates = cpu_gemm_rates()
            notes.append(f"CPU {d} capped at size {cfg.half_cap(d)}: this CPU's {d} 128² matmul ran at "
                         f"{rates[d]:.2g} GFLOP/s against {rates['fp32']:.3g} in fp32 (no {d} GEMM units)")
    for b, why in cfg.skipped_backends.items():
        notes.append(f"backend {b} not timed: {why}")
    res["notes"] = notes
    # the CPU threads' round trip at the start, before each grouped layer set and training problem and
    # after each section: where it moved, the timings on either side do not compare
    if cfg.device.type == "cpu":
        handoff = meta["thread_handoff_ns"] = {}

        def probe(where: str):
            handoff[where] = thread_handoff_ns()

        cfg.probe = probe
    cfg.probe("start")
    runs = {"op": op_bench.run, "precond": precond_bench.run, "train": train_bench.run, "lowprec": lowprec.run}
    with progress:
        for name in SECTIONS:
            if name in cfg.sections:
                res[name] = runs[name](cfg)
                cfg.probe(f"after {name}")
        progress.update(task, description="done", completed=progress.tasks[0].total)
    res["targets"] = report.evaluate_targets(res, cfg.is_cuda)
    try:
        meta["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    meta["wall_s"] = time.perf_counter() - t_start
    report.print_tables(res, console)
    res["plots"] = report.plot(res, out)
    meta["wall_s"] = time.perf_counter() - t_start
    report.write_json(res, out / "results.json")
    (out / "summary.md").write_text(report.markdown(res))
    written = [out / "results.json", out / "summary.md"] + [out / p for p in res["plots"]]
    print(f"wrote {', '.join(map(str, written))} in {meta['wall_s']:.1f} s")
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""apo-bench smoke test: the --quick mode end to end (JSON sections, finite positive timings, PNGs),
and the bench's plumbing: the timing call, the summary of repeats, the targets table, the backends.

The CI run of the benchmark is `python -m apo_kernels.bench --quick` in a subprocess, as a user runs
it (≤ 60 s on an idle 2-core machine). Targets are only reported by the bench, never asserted; no
test here asserts a time.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from apo_kernels.bench import op_bench, report, timing, train_bench
from apo_kernels.bench.__main__ import _pick_backends, build_parser, make_config
from apo_kernels.bench.common import divide_times, num_threads
from apo_kernels.bench.common import timed_backends
from apo_kernels.bench.shapes import layer_set
from apo_kernels.ops import Backend, reference, register, unregister, usable
from conftest import ROOT, load_python_script, load_script, python_script

# the steps one optimizer takes in a quick train section: per round a block and its untimed warm step
QUICK_RUN_STEPS = (train_bench.INTERVAL + 1) * (timing.QUICK.warmup + timing.QUICK.rounds)


def _timings(rows):
    return [r["median_ms"] for r in rows if "median_ms" in r]


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_section_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "apo_kernels.bench", "--quick", "--device", "cpu", "--no-progress",
                           "--out", str(blocker / "results")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"apo-bench: --out {blocker / 'results'}: cannot write there" in proc.stderr
    assert proc.stdout == ""  # nothing ran


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("apo_bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench decides for itself; interpreted Triton is never timed
    # One thread: on a shared machine two OpenMP threads stall each other under load (a 10-step
    # block took 3 s with two threads, 0.15 s with one, at load 13 on 2 cores); this checks the plumbing.
    proc = subprocess.run(
        [sys.executable, "-m", "apo_kernels.bench", "--quick", "--device", "cpu", "--threads", "1", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_quick_json_sections(quick_run):
    out, res, _ = quick_run
    assert set(res) >= {"meta", "config", "op", "precond", "train", "lowprec", "targets", "plots"}
    meta = res["meta"]
    for key in ("device_name", "torch", "triton", "date", "backends", "command", "timing"):
        assert meta[key], key
    assert meta["quick"] is True
    assert res["op"]["single"] and res["op"]["grouped"] and res["precond"] and res["train"] and res["lowprec"]


def test_quick_run_probes_the_threads_handoff_around_each_section_layer_set_and_training_problem(quick_run):
    out, res, _ = quick_run
    probes = res["meta"]["thread_handoff_ns"]
    cfg = make_config(build_parser().parse_args(["--quick", "--device", "cpu", "--threads", "1"]))
    problems = [f"before {label}" for label, *_ in train_bench.problems(cfg)]
    assert len(problems) == 3 and problems[-1] == "before CNN c=8 32×32 batch=32"
    layer_sets = [f"before grouped {layer_set(name, cfg.scale)[0]}" for name in cfg.layer_sets]
    assert layer_sets and "before grouped 64 layers 32–128" in layer_sets
    assert list(probes) == ["start", *layer_sets, "after op", "after precond", *problems, "after train",
                            "after lowprec"]
    assert all(ns is None for ns in probes.values())  # --threads 1: no second thread to hand off to
    assert f"two CPU threads' cache-line round trip (ns): start –, {layer_sets[0]} –" in (out / "summary.md").read_text()


def test_thread_handoff_probe_times_a_round_trip_between_two_threads():
    with num_threads(2):
        ns = torch.ops.apo.cpu_thread_handoff_ns(2000)
        assert math.isfinite(ns) and 1.0 < ns < 1e6  # a cache line's round trip: tens to hundreds of ns
        assert timing.thread_handoff_ns() > 1.0
    with num_threads(1):
        assert math.isnan(torch.ops.apo.cpu_thread_handoff_ns(2000)) and timing.thread_handoff_ns() is None


@pytest.mark.parametrize("rounds", [0, -5, 10**6 + 1])
def test_thread_handoff_probe_refuses_a_bad_round_count(rounds):
    with pytest.raises(ValueError, match=rf"rounds must be in \[1, 1000000\], got {rounds}"):
        torch.ops.apo.cpu_thread_handoff_ns(rounds)


def test_summary_says_when_the_threads_handoff_moved_during_the_run():
    steady = report._handoff_lines({"start": 80.0, "after op": 95.5})
    assert steady == ["- two CPU threads' cache-line round trip (ns): start 80, after op 95.5"]
    moved = report._handoff_lines({"start": 80.0, "after op": None, "after train": 350.0})
    assert moved[0].startswith("- two CPU threads' cache-line round trip (ns): start 80, after op –, after train 350 —")
    assert "it moved during the run" in moved[0]
    assert report._handoff_lines(None) == [] and "moved" not in report._handoff_lines({"start": None})[0]


def test_summary_says_when_a_probe_saw_the_second_thread_descheduled():
    far = report._handoff_lines({"start": 320.0, "after op": 380.0})  # cores far apart: no stalls
    assert "taken away" not in far[0] and "moved" not in far[0]
    stalling = report._handoff_lines({"start": 320.0, "after train": 2600.0})
    assert "a probe read over 450 ns: the second thread's CPU was taken away at times" in stalling[0]
    assert "it moved during the run" in stalling[0]
    assert "taken away" in report._handoff_lines({"start": 520.0, "after op": 700.0})[0]


def test_quick_timings_finite_positive_with_ratios(quick_run):
    _, res, _ = quick_run
    for name, rows in [("op", res["op"]["single"]), ("grouped", res["op"]["grouped"]), ("precond", res["precond"])]:
        ts = _timings(rows)
        assert ts and all(math.isfinite(t) and t > 0 for t in ts), name
        assert all("ratio" in r and r["ratio"] > 0 for r in rows if "median_ms" in r), name
    # torch.optim, the baselines and the APO optimizers run on every problem and stay finite; only
    # rows of optional peer packages may carry an error instead of a time.
    core = {"SGD", "Adam", "KFAC", "EKFAC", "APO-LR(SGD)", "APO-LR(SGD) λ_FSD=0", "APO-Precond"}
    for case in {r["case"] for r in res["train"]}:
        rows = {r["impl"]: r for r in res["train"] if r["case"] == case}
        assert core <= rows.keys(), case
        for name in core:
            assert "median_ms" in rows[name] and math.isfinite(rows[name]["final_loss"]), (case, rows[name])
    assert all(math.isfinite(t) and t > 0 for t in _timings(res["train"]))
    for r in res["train"]:
        assert "median_ms" in r or r.get("error"), r


def test_quick_small_model_rows(quick_run):
    # the MNIST-1D-sized MLP: the baselines, both APO optimizers and APO-Precond's plain step alone,
    # timed in the same interleaved rounds as every problem, on the threads asked for
    _, res, _ = quick_run
    small = {r["impl"]: r for r in res["train"] if r["problem"] == "small-mlp"}
    assert {"SGD", "Adam", "KFAC", "APO-LR(SGD)", "APO-Precond", train_bench.NO_META,
            train_bench.NO_META_KRON} <= small.keys()
    assert all(r["case"] == "MLP 40-256-256-10 batch=100, 1 thread" and r["batch"] == 100 for r in small.values())
    plain = small[train_bench.NO_META]
    assert "median_ms" in plain and plain["ratio"] > 0 and plain["threads"] == 1
    assert [r for r in res["train"] if r["impl"] == train_bench.NO_META] == [plain]  # the small model only
    kron = small[train_bench.NO_META_KRON]
    assert "median_ms" in kron and kron["ratio"] > 0 and kron["threads"] == 1 and math.isfinite(kron["final_loss"])
    assert [r for r in res["train"] if r["impl"] == train_bench.NO_META_KRON] == [kron]
    # the op alone on the optimizer's layers, timed with them; the floor is SGD's row plus it
    op, floor = small[train_bench.OP_ALONE], small[train_bench.FLOOR]
    assert op["median_ms"] > 0 and op["threads"] == 1 and "steps" not in op
    assert floor["median_ms"] == pytest.approx(small["SGD"]["median_ms"] + op["median_ms"])
    assert floor["ratio"] == pytest.approx(floor["median_ms"] / small["SGD"]["median_ms"]) and floor["ratio"] > 1
    for r in res["train"]:
        if "median_ms" in r and "estimate" not in r:  # one warm-up block, then one block per round,
            assert r["reps"] == timing.QUICK.rounds      # each right after an untimed step of its own
            if r["impl"] != train_bench.OP_ALONE:
                assert r["steps"] == QUICK_RUN_STEPS
    assert "round-robin" in res["meta"]["timing"]
    keys = {t["key"]: t for t in res["targets"]}
    assert keys["small-model-overhead"]["status"] in {"PASS", "MISS"}  # measured, not N/A
    assert keys["small-model-floor"]["status"] in {"PASS", "MISS"}
    assert keys["small-model-overhead-kron"]["status"] in {"PASS", "MISS"}
    assert sum(t["key"] == "apo-lr-throughput" and t["measured"] is not None for t in res["targets"]) == 3


def test_quick_apo_lr_bound_on_every_problem(quick_run):
    """Every training problem times APO-LR's bound (SGD + a meta-step's passes only) with the rest,
    and the report compares it with SGD on each: the row's measured bound on APO-LR's throughput."""
    _, res, _ = quick_run
    cases = {r["case"] for r in res["train"]}
    for impl, key in ((train_bench.BOUND, "apo-lr-throughput-bound"),
                      (train_bench.OWN_BATCH, "apo-lr-throughput-own-batch"),
                      (train_bench.BOUND_OWN, "apo-lr-throughput-bound-own-batch")):
        rows = {r["case"]: r for r in res["train"] if r["impl"] == impl}
        assert rows.keys() == cases
        for r in rows.values():
            assert r["median_ms"] > 0 and r["steps"] == QUICK_RUN_STEPS
            assert math.isfinite(r["final_loss"])
        checks = [t for t in res["targets"] if t["key"] == key]
        assert len(checks) == len(cases) and all(t["status"] in {"PASS", "MISS"} and t["measured"] > 0 for t in checks)


def test_quick_precond_kron_rows_in_table(quick_run):
    out, res, _ = quick_run
    kron = [r for r in res["precond"] if r["impl"] == "APO-kron"]
    assert kron and all(r["median_ms"] > 0 and r["ratio_vs_kfac"] > 0 and r["ratio_vs_ekfac"] > 0 for r in kron)
    (header,) = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| dtype | width")]
    assert "APO-kron" in header and "kron/KFAC" in header and "kron/EKFAC" in header


def test_quick_every_row_warmed_up_and_repeated(quick_run):
    # every timed row (the end-to-end blocks too) is a median of at least 3 repeats with its spread
    _, res, _ = quick_run
    for name, rows in [("op", res["op"]["single"]), ("grouped", res["op"]["grouped"]), ("train", res["train"])]:
        timed = [r for r in rows if "median_ms" in r]
        assert timed, name
        for r in timed:
            assert r["reps"] >= 3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], (name, r)
    assert "warmed up" in res["meta"]["timing"]
    # the grouped comparison: blocks of calls timed round-robin, one loop and one grouped row per direction
    grouped = [r for r in res["op"]["grouped"] if "median_ms" in r]
    rounds = op_bench.GROUPED_ROUNDS_PER_SETTING * timing.QUICK.rounds
    assert all(r["reps"] == rounds and r["calls"] >= 1 for r in grouped)
    for direction in ("forward", "backward"):
        impls = {r["impl"] for r in grouped if r["direction"] == direction}
        assert "loop: torch chain" in impls and any(i.startswith("grouped: ") for i in impls), direction
    # on the CPU the grouped forward also on one thread, and its floor: that time over the thread count
    be = res["config"]["backends"][0]
    forward = {r["impl"]: r for r in grouped if r["direction"] == "forward" and r["layer_set"] == "small64"}
    one, floor = forward[op_bench.ONE_THREAD.format(backend=be)], forward[op_bench.GROUPED_FLOOR.format(backend=be)]
    assert floor["threads"] == 1  # the run's --threads
    assert floor["median_ms"] == pytest.approx(one["median_ms"] / floor["threads"])
    assert floor["ratio"] == pytest.approx(floor["median_ms"] / forward["loop: torch chain"]["median_ms"])
    assert not any(op_bench.GROUPED_FLOOR.format(backend=be) == r["impl"] for r in grouped if r["direction"] == "backward")
    keys = {t["key"]: t for t in res["targets"]}
    assert keys["cpu-grouped-small-layers-floor"]["status"] in {"PASS", "MISS"}  # measured, not N/A


def test_quick_targets_and_lowprec_reported(quick_run):
    out, res, stdout = quick_run
    assert res["targets"] and all(t["status"] in {"PASS", "MISS", "N/A"} and t["reason"] and t["why"]
                                  for t in res["targets"])
    assert {t["key"] for t in res["targets"]} == {t.key for t in report.TARGETS if t.device in (None, "cpu")}
    assert "Targets" in stdout
    text = json.dumps(res["targets"], ensure_ascii=False) + (out / "summary.md").read_text()
    assert not re.search(r"issue|#\d", text, re.IGNORECASE)
    half = [r for r in res["lowprec"] if r["dtype"] in ("bf16", "fp16")]
    assert half and all(r["outcome"] for r in half)


def test_quick_plots_and_summary(quick_run):
    out, res, _ = quick_run
    assert res["plots"]
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (out / "summary.md").read_text().startswith("# apo-bench results")


@pytest.mark.parametrize("argv,flag", [(["--dtype", "fp64"], "--dtype"), (["--sizes", "a,b"], "--sizes"),
                                       (["--sections", "nope"], "--sections"), (["--threads", "0"], "--threads"),
                                       (["--threads", "two"], "--threads"), (["--sizes", "0"], "--sizes"),
                                       (["--sizes", "256,-3"], "--sizes"), (["--widths", ",,"], "--widths"),
                                       (["--train-widths", "0"], "--train-widths"), (["--device", "mps"], "--device"),
                                       (["--device", "cuda:x"], "--device")])
def test_bad_flags_exit_with_usage(argv, flag, capsys):
    # argparse's usage error: exit status 2 and a message naming the flag (--help also exits, with 0)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"argument {flag}" in err


# --------------------------------------------------------------------------------------------
# The timing call and the summary of repeats
# --------------------------------------------------------------------------------------------
def test_summarize_median_quantiles_min():
    got = timing.summarize([0.005, 0.001, 0.003, 0.002, 0.004])  # seconds, any order
    assert got["reps"] == 5 and got["min_ms"] == pytest.approx(1.0) and got["median_ms"] == pytest.approx(3.0)
    assert got["p20_ms"] == pytest.approx(1.8) and got["p80_ms"] == pytest.approx(4.2)  # inclusive deciles
    one = timing.summarize([0.002])
    assert one["median_ms"] == one["p20_ms"] == one["p80_ms"] == pytest.approx(2.0) and one["reps"] == 1
    with pytest.raises(ValueError, match="times_s"):
        timing.summarize([])


class _FakeMeasurement:
    def __init__(self, times, number_per_run=1):
        self.times, self.number_per_run = times, number_per_run


def test_timer_warms_up_then_tops_up_to_min_reps(monkeypatch):
    """The CPU path: warm-up calls before torch's Timer sees ``fn``, torch's current thread count, and
    at least min_reps repeats even when blocked_autorange returns fewer (a call slower than its warm-up)."""
    calls, seen = [], {}

    class FakeTimer:
        def __init__(self, stmt, globals, num_threads):
            seen.update(calls_before=len(calls), num_threads=num_threads)
            self.fn = globals["fn"]

        def blocked_autorange(self, min_run_time):
            seen["min_run_time"] = min_run_time
            self.fn()
            return _FakeMeasurement([0.002])

        def timeit(self, number):
            self.fn()
            return _FakeMeasurement([0.004])

    monkeypatch.setattr("torch.utils.benchmark.Timer", FakeTimer)
    t = timing.Timer("cpu", quick=True)
    got = t(lambda: calls.append(1))
    s = timing.QUICK
    assert seen["calls_before"] == s.warmup >= 1
    assert seen["num_threads"] == torch.get_num_threads()
    assert seen["min_run_time"] >= s.min_time_s
    assert got["reps"] == s.min_reps >= 3 and got["median_ms"] == pytest.approx(4.0) and got["min_ms"] == pytest.approx(2.0)


def test_interleaved_times_round_robin():
    """The callables compared with each other run in turn, round after round (warm-up round first),
    so load that comes and goes hits every one alike; one that raises is reported and dropped."""
    calls, rounds = [], []
    t = timing.Timer("cpu", quick=True)

    def fn(name, fail_at=None):
        def call():
            calls.append(name)
            if calls.count(name) == fail_at:
                raise RuntimeError(f"{name} failed")

        return call

    got = t.interleaved(dict(a=fn("a"), b=fn("b"), c=fn("c", fail_at=2)), rounds=3, on_round=rounds.append)
    assert t.settings.warmup == 1
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["a", "b"] * 2
    assert rounds == ["warm-up round", "round 1/3", "round 2/3", "round 3/3"]
    assert got["a"]["reps"] == got["b"]["reps"] == 3 and all(got[k]["median_ms"] >= 0 for k in "ab")
    assert got["c"] == dict(error="RuntimeError: c failed")
    assert t.interleaved(dict(a=fn("a")))["a"]["reps"] == timing.QUICK.rounds >= 3
    # a warm call of its own right before each call of a callable that has one, untimed
    calls.clear()
    timed = t.interleaved(dict(a=fn("a"), b=fn("b")), rounds=2, before=dict(a=fn("warm a")))
    assert calls == ["warm a", "a", "b"] * 3 and timed["a"]["reps"] == timed["b"]["reps"] == 2
    for bad, exc in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="rounds"):
            t.interleaved(dict(a=fn("a")), rounds=bad)


def test_small_model_problem_threads_and_plain_step_interval():
    # 2 threads unless --threads says otherwise; the plain-step row never reaches its next meta-step
    args = build_parser().parse_args(["--quick", "--device", "cpu", "--sections", "train"])
    small = [p for p in train_bench.problems(make_config(args)) if p[1] == "small-mlp"]
    assert [(p[0], p[3], p[4]) for p in small] == [("MLP 40-256-256-10 batch=100, 2 threads", (100, 40), 2)]
    args = build_parser().parse_args(["--quick", "--device", "cpu", "--threads", "1"])
    assert {p[4] for p in train_bench.problems(make_config(args))} == {1}
    model = train_bench.small_mlp()
    assert [tuple(p.shape) for p in model.parameters() if p.dim() == 2] == [(256, 40), (256, 256), (10, 256)]
    opt, fsd_batch = train_bench._optimizers(include_peers=False, run_steps=60)[train_bench.NO_META](model)
    assert fsd_batch == "other" and opt.meta_interval > 60 and "meta_interval > run" in train_bench.NO_META
    opt, _ = train_bench._optimizers(include_peers=False, run_steps=60)[train_bench.NO_META_KRON](train_bench.small_mlp())
    assert opt.structure == "kron" and opt.meta_interval > 60


def test_progress_total_counts_every_tick(monkeypatch):
    # the bar's total is the ticks the sections make (precond: 4 rows per width, train: one per round)
    from apo_kernels.bench import precond_bench
    from apo_kernels.bench.__main__ import _estimate_ticks

    class CountingTimer(timing.Timer):  # no timing: the sections' own ticks are what is counted
        def __call__(self, fn):
            return timing.summarize([1e-3] * 3)

        def interleaved(self, fns, rounds=None, on_round=lambda desc: None, before=None):
            for r in range(self.settings.warmup + self.settings.rounds):
                on_round(f"round {r}")
            return {name: timing.summarize([1e-3] * 3) for name in fns}

    ticks = []
    args = build_parser().parse_args(["--quick", "--device", "cpu", "--sections", "precond,train", "--widths", "16,32",
                                      "--train-widths", "8", "--dtype", "fp32,bf16"])
    cfg = make_config(args, tick=ticks.append)
    cfg.timer = CountingTimer("cpu", quick=True)
    precond_bench.run(cfg)
    train_bench.run(cfg)
    assert len(ticks) == _estimate_ticks(cfg) == 4 * 4 + 3 * (timing.QUICK.warmup + timing.QUICK.rounds)


def test_timer_on_cpu_returns_a_summary():
    got = timing.Timer("cpu", quick=True)(lambda: torch.ones(16).sum())
    assert set(got) == {"median_ms", "p20_ms", "p80_ms", "min_ms", "reps"}
    assert got["reps"] >= timing.QUICK.min_reps and all(math.isfinite(got[k]) and got[k] > 0 for k in got)
    assert "blocked_autorange" in timing.Timer("cpu").method


# --------------------------------------------------------------------------------------------
# Targets: a table of data, checked on the rows of one run
# --------------------------------------------------------------------------------------------
def _row(section, case, impl, ms, dtype="fp32", size=256, **extra):
    return dict(section=section, case=case, impl=impl, dtype=dtype, size=size, median_ms=ms, **extra)


def _result(single=(), grouped=(), precond=(), train=(), backends=("cpu",)):
    return dict(config=dict(backends=list(backends)), op=dict(single=list(single), grouped=list(grouped)),
                precond=list(precond), train=list(train))


def test_targets_compare_rows_of_the_same_cell():
    res = _result(
        single=[_row("op", "forward", "torch chain", 2.0, size=256), _row("op", "forward", "cpu", 1.0, size=256),
                _row("op", "forward", "torch chain", 4.0, size=512), _row("op", "forward", "cpu", 5.0, size=512)],
        grouped=[_row("grouped", "64 small forward", "loop: torch chain", 10.0, size="64 layers", layer_set="small64", direction="forward"),
                 _row("grouped", "64 small forward", "grouped: cpu", 4.5, size="64 layers", layer_set="small64", direction="forward"),
                 _row("grouped", "64 small forward", "floor: grouped cpu on one thread ÷ threads", 3.8, size="64 layers",
                      layer_set="small64", direction="forward")],
        train=[_row("train", "MLP", "SGD", 1.0, size=None, problem="mlp"), _row("train", "MLP", "APO-LR(SGD)", 2.0, size=None, problem="mlp"),
               _row("train", "CNN", "SGD", 1.0, size=None, problem="cnn"), _row("train", "CNN", "APO-LR(SGD)", 1.1, size=None, problem="cnn")],
    )
    got = {(t["key"], t["target"]): t for t in report.evaluate_targets(res, is_cuda=False)}
    by_key = {}
    for (key, _), t in got.items():
        by_key.setdefault(key, []).append(t)
    assert not any(t.device == "cuda" for t in report.TARGETS if t.key in by_key)  # CPU targets only
    (grouped,) = by_key["cpu-grouped-small-layers"]
    assert grouped["measured"] == pytest.approx(0.45) and grouped["status"] == "MISS" and grouped["threshold"] == "≤ 0.4"
    (floor,) = by_key["cpu-grouped-small-layers-floor"]
    assert floor["measured"] == pytest.approx(0.38) and floor["status"] == "PASS"
    (large,) = by_key["cpu-single-large-forward"]  # the largest size only
    assert "512" in large["target"] and large["measured"] == pytest.approx(1.25) and large["status"] == "MISS"
    throughput = {t["target"]: t for t in by_key["apo-lr-throughput"]}  # SGD / APO-LR, one per problem
    assert throughput["APO-LR throughput vs SGD [MLP]"]["measured"] == pytest.approx(0.5)
    assert throughput["APO-LR throughput vs SGD [MLP]"]["status"] == "MISS"
    assert throughput["APO-LR throughput vs SGD [CNN]"]["measured"] == pytest.approx(1 / 1.1)
    assert throughput["APO-LR throughput vs SGD [CNN]"]["status"] == "PASS"
    for t in by_key["cpu-precond-vs-ekfac-w1024"] + by_key["cpu-precond-vs-kfac-w2048"]:  # no precond rows
        assert t["status"] == "N/A" and t["measured"] is None and "not measured" in t["reason"]


def test_targets_kron_small_model_and_throughput_rows():
    parts = {f"{p}_ms": 0.1 for p in ("apo_forward", "apo_meta", "kron_apply", "kron_meta", "factor_update",
                                        "kfac_inverse", "kfac_apply", "ekfac_eigh", "ekfac_scale", "ekfac_apply")}

    def precond(w, apo, kron, kfac, ekfac):
        return [_row("precond", f"w={w}", impl, ms, size=w, ratio_vs_kfac=ms / kfac, ratio_vs_ekfac=ms / ekfac, **parts)
                for impl, ms in (("APO", apo), ("APO-kron", kron), ("KFAC", kfac), ("EKFAC", ekfac))]

    small = "MLP 40-256-256-10 batch=100, 2 threads"
    train = [_row("train", small, impl, ms, size=None, problem="small-mlp") for impl, ms in
             (("SGD", 1.0), ("APO-LR(SGD)", 1.1), ("APO-Precond", 3.0), (train_bench.NO_META, 1.9),
              (train_bench.NO_META_KRON, 2.1))]
    res = _result(precond=precond(1024, 5.0, 1.1, 1.0, 3.0) + precond(2048, 20.0, 13.0, 10.0, 25.0), train=train)
    got = {t["key"]: t for t in report.evaluate_targets(res, is_cuda=False)}
    assert got["cpu-kron-vs-kfac-w1024"]["measured"] == pytest.approx(1.1) and got["cpu-kron-vs-kfac-w1024"]["status"] == "PASS"
    assert got["cpu-kron-vs-ekfac-w1024"]["measured"] == pytest.approx(1.1 / 3) and got["cpu-kron-vs-ekfac-w1024"]["status"] == "PASS"
    assert got["cpu-kron-vs-kfac-w2048"]["measured"] == pytest.approx(1.3) and got["cpu-kron-vs-kfac-w2048"]["status"] == "MISS"
    assert got["cpu-kron-vs-ekfac-w2048"]["measured"] == pytest.approx(0.52) and got["cpu-kron-vs-ekfac-w2048"]["status"] == "MISS"
    assert {got[f"cpu-kron-vs-{b}-w{w}"]["threshold"] for b in ("kfac", "ekfac") for w in (1024, 2048)} == {"≤ 1.2", "≤ 0.5"}
    plain = got["small-model-overhead"]  # the plain step, not the row with its meta-steps
    assert plain["measured"] == pytest.approx(1.9) and plain["status"] == "PASS" and plain["threshold"] == "≤ 2"
    assert small in plain["target"]
    kron = got["small-model-overhead-kron"]
    assert kron["measured"] == pytest.approx(2.1) and kron["status"] == "MISS" and kron["threshold"] == "≤ 2"
    assert got["apo-lr-throughput"]["measured"] == pytest.approx(1 / 1.1) and got["apo-lr-throughput"]["status"] == "PASS"
    assert got["apo-lr-throughput"]["threshold"] == "≥ 0.85"
    # the table shows kron next to APO, KFAC and EKFAC
    (title, header, rows), = [t for t in report.tables(res) if t[0].startswith("2.")]
    assert header[:6] == ["dtype", "width", "APO", "APO-kron", "KFAC", "EKFAC"]
    assert rows[0][3] == "1.100" and "kron apply" in rows[0][-1]


def test_targets_worst_row_and_a_new_entry():
    rows = [_row("op", "forward", "torch chain", 1.0, size=s) for s in (256, 512, 1024)]
    rows += [_row("op", "forward", "cuda", ms, size=s) for s, ms in ((256, 0.5), (512, 0.9), (1024, 0.7))]
    got = report.evaluate_targets(_result(single=rows, backends=("cuda",)), is_cuda=True)
    (worst,) = [t for t in got if t["key"] == "gpu-fused-forward-fp32"]
    assert worst["measured"] == pytest.approx(0.9) and "512" in worst["target"] and worst["status"] == "PASS"
    # a new target is one entry of data
    new = report.Target("toy", None, "op at {size} vs chain", "op", dict(impl="cuda", size=1024),
                        dict(impl="torch chain"), ">=", 2.0, "a speed-up the toy asks for", inverse=True)
    (toy,) = report.evaluate_targets(_result(single=rows, backends=("cuda",)), is_cuda=True, targets=(new,))
    assert toy == dict(key="toy", target="op at 1024 vs chain", threshold="≥ 2", why="a speed-up the toy asks for",
                       measured=pytest.approx(1 / 0.7), status="MISS", reason="cuda 0.7 ms vs torch chain 1 ms")


def test_target_texts_cite_no_tracker_numbers():
    for t in report.TARGETS:
        assert not re.search(r"issue|#\d", f"{t.key} {t.label} {t.why}", re.IGNORECASE), t.key


# --------------------------------------------------------------------------------------------
# Backends: the registry's, as the bench picks them
# --------------------------------------------------------------------------------------------
@pytest.fixture
def toy_backends():
    added = []

    def add(name, priority, why=None):
        register(Backend(name=name, devices=("cpu",), priority=priority, family=reference.FAMILY,
                         why_unavailable=lambda: why))
        added.append(name)

    yield add
    for name in added:
        unregister(name)


def test_bench_times_the_registry_backends_above_the_reference(toy_backends):
    names = usable("cpu")
    assert timed_backends("cpu")[0] == (names[: names.index("reference")] or ["reference"])
    toy_backends("toy_fast", 1000)
    toy_backends("toy_interpreted", -100)
    toy_backends("toy_missing", 500, why="toy library not installed")
    timed, skipped = timed_backends("cpu")
    assert timed[0] == "toy_fast" and "reference" not in timed[1:] and "toy_interpreted" not in timed
    assert "ranked below the reference" in skipped["toy_interpreted"]
    assert skipped["toy_missing"] == "unavailable: toy library not installed"
    assert _pick_backends("toy_fast,toy_missing", torch.device("cpu")) == (
        ["toy_fast"], {"toy_missing": "unavailable: toy library not installed"})
    with pytest.raises(SystemExit, match="--backend.*unknown backend"):
        _pick_backends("no_such_backend", torch.device("cpu"))


@pytest.mark.parametrize("own_batch", [False, True], ids=["other batch", "own batch"])
def test_meta_passes_only_makes_a_meta_steps_passes_and_sgds_update(own_batch):
    """APO-LR's bound row: every 10 steps one more closure and, for the FSD term on another batch, a
    forward at θ and a forward + backward at θ' (none when the FSD batch is the step's own: the term
    rides on the closure's passes); the update is plain SGD's from the step's own gradient, bit for
    bit."""
    torch.manual_seed(0)
    model = train_bench.small_mlp(d_in=6, width=5, classes=3)
    twin = train_bench.small_mlp(d_in=6, width=5, classes=3)
    twin.load_state_dict(model.state_dict())
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    bound, plain = train_bench.MetaPassesOnly(model, sgd(model), 0.1, own_batch=own_batch), sgd(twin)
    forwards, backwards = [], []
    model.register_forward_hook(lambda m, i, o: forwards.append(torch.is_grad_enabled()))
    model[0].weight.register_hook(lambda g: backwards.append(1))
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        x, y, x_fsd = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen), torch.randn(4, 6, generator=gen)
        for opt, m in ((bound, model), (plain, twin)):
            def closure(opt=opt, m=m):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss
            opt.step(closure, fsd_inputs=(x,) if own_batch else (x_fsd,)) if opt is bound else opt.step(closure)
    # steps 0 and 10 are meta-steps: 12 closures + 2 more; FSD on another batch: a forward at θ'
    # each and one at θ without a graph
    fsd_passes = 0 if own_batch else 2
    assert forwards.count(True) == 12 + 2 + fsd_passes and forwards.count(False) == fsd_passes
    assert len(backwards) == 12 + 2 + fsd_passes
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_cpu_half_precision_is_capped_only_where_it_measured_slow(monkeypatch):
    """The cap on CPU half-precision sizes follows the measured GEMM rates: a dtype ten times slower
    than fp32 is capped (and the run says so with the rates), one as fast is timed at every size."""
    from apo_kernels.bench import common

    rates = common.cpu_gemm_rates()
    assert set(rates) == {"fp32", "bf16", "fp16"} and all(math.isfinite(r) and r > 0 for r in rates.values())
    cfg = make_config(build_parser().parse_args(["--device", "cpu", "--dtype", "fp32,bf16,fp16"]))
    monkeypatch.setattr(common, "cpu_gemm_rates", lambda: {"fp32": 100.0, "bf16": 200.0, "fp16": 0.7})
    assert cfg.half_cap("fp32") is None and cfg.half_cap("bf16") is None
    assert cfg.half_cap("fp16") == common.CPU_HALF_CAP["full"]
    assert cfg.size_ok(2048, "bf16") and cfg.size_ok(2048, "fp32") and not cfg.size_ok(2048, "fp16")
    assert cfg.size_ok(common.CPU_HALF_CAP["full"], "fp16")
    quick = make_config(build_parser().parse_args(["--quick", "--device", "cpu"]))
    assert quick.half_cap("fp16") == common.CPU_HALF_CAP["quick"]


def test_plain_step_parts_diagnosis_runs_and_reports_every_variant():
    # python/measure_meta_overhead.py --plain-step-parts: the diagnosis the README's log quotes
    proc = subprocess.run([sys.executable, python_script("measure_meta_overhead"), "--plain-step-parts",
                           "--rows", "small", "--repeats", "2",
                           "--threads", "1", "--clock", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) µs\s+\(\s*([+-][0-9.]+) µs over SGD\)$", proc.stdout, re.M)
    assert [name for name, _, _ in rows] == ["SGD", "APO-LR plain step", "its check and step apart",
                                             "without the gradient check", "without the lr swap",
                                             "without both"], proc.stdout
    assert all(float(t) > 0 for _, t, _ in rows) and float(rows[0][2]) == 0.0


def test_precond_plain_step_measure_reports_every_variant():
    # python/measure_precond_plain_step.py: the fused momentum op's A/B the README's log quotes
    proc = subprocess.run([sys.executable, python_script("measure_precond_plain_step"), "--repeats", "2",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) ms\s+([0-9.]+)× SGD$", proc.stdout, re.M)
    names = [name for name, _, _ in rows]
    assert names == [f"{opt}, {tag}{suffix}" for tag in ("with biases", "without biases")
                     for opt, suffix in (("SGD", ""), ("APO-Precond", ""), ("APO-Precond", ", unfused"))], proc.stdout
    assert all(float(t) > 0 for _, t, _ in rows)
    assert [float(r) for name, _, r in rows if name.startswith("SGD")] == [1.0, 1.0]


def test_bf16_model_step_measure_reports_every_variant_and_both_updates_train():
    # python/measure_bf16_model_step.py: the A/B of φ's bf16 image the README's log quotes (its time
    # rows, and its quality rows in a short run)
    script = python_script("measure_bf16_model_step")
    proc = subprocess.run([sys.executable, script, "--width", "64", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) ms\s+([0-9.]+)× SGD$", proc.stdout, re.M)
    assert [name for name, _, _ in rows] == ["SGD+momentum"] + [
        f"APO-Precond {s}, {phi}" for s in ("full", "kron") for phi in ("φ's bf16 image", "float32 φ")], proc.stdout
    assert all(float(t) > 0 for _, t, _ in rows) and float(rows[0][2]) == 1.0
    pytest.importorskip("mnist1d", reason="the quality run trains on MNIST-1D (the paper extra)")
    proc = subprocess.run([sys.executable, script, "--quality", "--seeds", "1", "--steps", "30", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accs = re.findall(r"test acc ([0-9.]+) ±", proc.stdout)
    assert len(accs) == 2 and all(10.0 < float(a) <= 100.0 for a in accs), proc.stdout


def test_meta_step_parts_diagnosis_accounts_for_the_whole_meta_step():
    # python/measure_meta_overhead.py --meta-step-parts: every piece is reported, and with "the rest"
    # the closures and APO's own pieces add up to the meta-step (the FSD term is inside a closure)
    proc = subprocess.run([sys.executable, python_script("measure_meta_overhead"), "--meta-step-parts",
                           "--rows", "small", "--repeats", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict((name.strip(), float(t)) for name, t in
                re.findall(r"^\s+(\S.*?)\s+(-?[0-9.]+) µs$", proc.stdout, re.M))
    own = ["gradient check at θ", "lookahead direction Δ (SGD: its plan)", "snapshot of θ",
           "θ' = θ + Δ and ‖Δ‖² (SGD: and Δ)", "θ restored",
           "meta-gradient ⟨∇θ'Q, Δ⟩ and Adam step on φ", "clamp and record φ", "base step"]
    plain = ["its closure", "its gradient check and base step"]
    assert set(own) | set(plain) | {"meta-step", "closures at θ and θ'", "of which the FSD value and gradient",
                                    "the rest", "plain step", "the rest of it"} == set(rows), proc.stdout
    assert all(rows[name] > 0 for name in own + ["closures at θ and θ'", "of which the FSD value and gradient"])
    assert rows["of which the FSD value and gradient"] < rows["closures at θ and θ'"] < rows["meta-step"]
    parts = rows["closures at θ and θ'"] + sum(rows[name] for name in own) + rows["the rest"]
    assert parts == pytest.approx(rows["meta-step"], abs=1.0)  # each row rounded to 0.1 µs
    assert rows["its closure"] < rows["plain step"] < rows["meta-step"]
    assert all(rows[name] > 0 for name in plain)  # the plain step goes through the check and the base step
    assert sum(rows[name] for name in plain) + rows["the rest of it"] == pytest.approx(rows["plain step"], abs=1.0)


def test_free_pieces_oracle_reports_every_variant():
    # python/measure_meta_overhead.py --free-pieces: every variant's throughput, SGD's 1 by definition
    proc = subprocess.run([sys.executable, python_script("measure_meta_overhead"), "--free-pieces",
                           "--rows", "small", "--repeats", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+)$", proc.stdout, re.M)
    assert [name for name, *_ in rows] == ["SGD", "APO-LR", "Δ, meta-gradient, φ's step free",
                                           "the same, and no gradient check on meta-steps",
                                           "passes only (the bound)"], proc.stdout
    assert float(rows[0][3]) == 1.0 and all(float(r[3]) > 0 for r in rows)


def test_direct_calls_switch_what_they_name_and_put_them_back(monkeypatch, capsys):
    # python/measure_meta_overhead.py --direct-calls: each variant runs with its own switches (the
    # one-call checked step, the one-pass lookahead and the direct base step each called on the
    # variants that keep it), every variant is reported, and the shortcuts are back on afterwards
    from apo_kernels import _step_hooks
    from apo_kernels.ops import backends

    if backends.native_sgd_lookahead is None:
        pytest.skip("the native module apo_kernels._C is not built")
    script = load_python_script("measure_meta_overhead")
    native, single, checked = backends.native_sgd_lookahead, _step_hooks._single_tensor_sgd_step, backends.native_sgd_step
    seen = {"one pass": 0, "direct": 0, "one call": 0}

    def counted(name, fn):
        def run(*args):
            seen[name] += 1
            return fn(*args)
        return run

    one_pass, direct, one_call = counted("one pass", native), counted("direct", single), counted("one call", checked)
    monkeypatch.setattr(backends, "native_sgd_lookahead", one_pass)
    monkeypatch.setattr(_step_hooks, "_single_tensor_sgd_step", direct)
    monkeypatch.setattr(backends, "native_sgd_step", one_call)
    script.direct_calls("small", 1, "wall")
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+)$", out, re.M)
    assert [name for name, *_ in rows] == ["SGD", "APO-LR", "its check and base step apart",
                                           "and its base step through torch's step",
                                           "and Δ formed before θ' is written", "passes only (the bound)"], out
    # blocks of 10 steps, a warm-up, then an untimed and a timed one: APO-LR's meta-steps with the one
    # pass (3 variants × 3 blocks); its base steps in one checked call (1 variant × 30 steps but the
    # first, which creates the momentum buffers by the direct call), by the direct call (1 variant ×
    # 30 steps, and that first step)
    assert seen == {"one pass": 9, "direct": 31, "one call": 29}
    assert backends.native_sgd_lookahead is one_pass and _step_hooks._single_tensor_sgd_step is direct
    assert backends.native_sgd_step is one_call


def test_joint_fsd_switches_only_its_variants_and_puts_it_back(monkeypatch, capsys):
    # python/measure_meta_overhead.py --joint-fsd: the FSD term joined to the closure in the "joint"
    # variants only (APO-LR's and its bound's), every variant reported, the switch back on afterwards
    from apo_kernels.bench import train_bench
    from apo_kernels.optim import objective

    seen = {"APO-LR": 0, "bound": 0}

    def counted(name, fn):
        def run(model):
            seen[name] += 1
            return fn(model)
        return run

    apo, bound = counted("APO-LR", objective.rows_independent), counted("bound", train_bench.rows_independent)
    monkeypatch.setattr(objective, "rows_independent", apo)
    monkeypatch.setattr(train_bench, "rows_independent", bound)
    script = load_python_script("measure_meta_overhead")
    script.joint_fsd("small", 1, "wall")
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+)$", out, re.M)
    assert [name for name, *_ in rows] == ["SGD", "APO-LR, joint", "APO-LR, apart", "passes only (the bound), joint",
                                           "passes only (the bound), apart"], out
    # one meta-step per block: a warm-up, an untimed and a timed block of each joint variant
    assert seen == {"APO-LR": 3, "bound": 3}
    assert objective.rows_independent is apo and train_bench.rows_independent is bound


def test_free_pieces_oracle_frees_what_it_names(monkeypatch):
    # the oracle's variants skip exactly the pieces they name: Δ is formed once, φ never moves, the
    # meta-steps' gradient check at θ is not computed (a plain step's is in its native base step);
    # the plain APO-LR beside them does all three
    from apo_kernels.bench.train_bench import base_sgd, closure_for, small_mlp
    from apo_kernels.optim import _core, lr as apo_lr

    calls = {"directions": 0, "check": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(apo_lr, "lr_directions", counted("directions", apo_lr.lr_directions))
    monkeypatch.setattr(apo_lr, "fused_sgd_lookahead", counted("directions", apo_lr.fused_sgd_lookahead))
    monkeypatch.setattr(_core, "all_finite", counted("check", _core.all_finite))
    script = load_python_script("measure_meta_overhead")
    x, y = torch.randn(100, 40), torch.randint(0, 10, (100,))
    for free in ((), ("meta",), ("meta", "check")):
        calls.update(directions=0, check=0)
        model = small_mlp()
        opt = script._FreePieces(model, base_sgd(model), lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=2, free=free)
        phi0 = opt.log_lr.clone()
        for _ in range(6):
            opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
        assert opt.meta_steps == 3 and opt.skipped_steps == 0
        assert calls["directions"] == (1 if "meta" in free else 3)
        assert torch.equal(opt.log_lr, phi0) == ("meta" in free)
        assert calls["check"] == (0 if "check" in free else 3)


def test_small_model_op_measurement_runs():
    # csrc/test/measure_small_model_op.py: the measurement the log quotes for the op on the small
    # MLP's layers; every row printed with a positive time
    script = ROOT / "csrc" / "test" / "measure_small_model_op.py"
    proc = subprocess.run([sys.executable, str(script), "--threads", "1", "--repeats", "2", "--blocks", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^(momentum step|kron step).*?([0-9.]+) us$", proc.stdout, re.M)
    assert len(rows) == 10 and all(float(t) > 0 for _, t in rows), proc.stdout


BLAS_SWAP = ROOT / "csrc" / "test" / "measure_blas_swap.py"


def _blas_swap_skip_reason():
    import shutil

    if load_script(BLAS_SWAP, "measure_blas_swap").find_openblas() is None:
        return "numpy's wheel OpenBLAS (numpy.libs/libscipy_openblas64_*.so) is not installed: it is the other BLAS"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the sgemm_ shim"
    return None


BLAS_SWAP_SKIP = _blas_swap_skip_reason()


@pytest.mark.skipif(BLAS_SWAP_SKIP is not None, reason=str(BLAS_SWAP_SKIP))
def test_blas_swap_measurement_runs_both_blas_through_the_shim():
    # csrc/test/measure_blas_swap.py: the measurement the log quotes; it stops with an error when
    # either BLAS got no call of the op through its shim (so a run cannot time MKL twice)
    proc = subprocess.run([sys.executable, str(BLAS_SWAP), "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diff = float(re.search(r"max relative difference (\S+)", proc.stdout).group(1))
    assert diff < 1e-5, proc.stdout
    rows = re.findall(r"^\s+(grouped (?:forward|backward), (?:MKL|OpenBLAS))\s+([0-9.]+) \[", proc.stdout, re.M)
    assert len(rows) == 4 and all(float(t) > 0 for _, t in rows), proc.stdout
    assert re.search(r"^\s+OpenBLAS\s+[0-9.]+ ms", proc.stdout, re.M), proc.stdout


def test_grouped_floor_is_the_one_thread_time_over_the_threads():
    # the one-thread variant runs on one thread and gives the caller's threads back, error or not
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert op_bench._on_one_thread(torch.get_num_threads)() == 1 and torch.get_num_threads() == 2

        def fails():
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            op_bench._on_one_thread(fails)()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    one = dict(median_ms=4.0, p20_ms=3.0, p80_ms=5.0, reps=9, calls=3)
    assert divide_times(one, 2) == dict(median_ms=2.0, p20_ms=1.5, p80_ms=2.5, reps=9, calls=3)


def test_bf16_operand_emulation_rounds_every_gemm_operand():
    # python/measure_bf16_gemm_quality.py: the op it emulates is the exact op up to bf16 operand rounding
    quality = load_python_script("measure_bf16_gemm_quality")
    g = torch.Generator().manual_seed(0)
    m, n = 37, 23
    grad = torch.randn(m, n, generator=g)
    A, B = torch.randn(m, m, generator=g) / m ** 0.5, torch.randn(n, n, generator=g) / n ** 0.5
    S = torch.rand(m, n, generator=g) + 0.5
    exact = reference.precondition(grad.double(), A.double(), S.double(), B.double())

    def bf16(t):  # an operand as a bf16 GEMM reads it, in float64
        return t.float().bfloat16().double()

    gb = bf16(grad) @ bf16(B)
    m_ = S * (bf16(A).T @ bf16(gb)).float()  # ⊙S² in fp32, as the emulation
    expected = bf16(bf16(A) @ bf16(m_)) @ bf16(B).T
    got = quality.precondition_bf16_operands(grad, A, S, B).double()
    # fp32 against float64 products may flip a rare bf16 rounding (6e-8 here); a missing rounding
    # of any operand costs ≈ 2⁻⁹ (1.7e-3 without the rounding of S ⊙ H)
    assert float((got - expected).abs().max() / expected.abs().max()) < 3e-4
    err = float((got - exact).abs().max() / exact.abs().max())
    assert 1e-4 < err < 3e-2, err  # bf16's rounding (2^-9 relative per operand), not fp32's
    # identity factors skip their GEMMs, as in the op
    torch.testing.assert_close(quality.precondition_bf16_operands(grad, None, S, None), S * grad)


def test_bf16_quality_script_runs_every_variant():
    proc = subprocess.run([sys.executable, python_script("measure_bf16_gemm_quality"),
                           "--experiments", "ill_conditioned", "--seeds", "2", "--steps", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\S.*?)\s+median (\S+), mean (\S+) ± (\S+)\s+\[(.*)\]$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["cpu", "reference", "reference, bf16 GEMM operands"], proc.stdout
    for *_, values in rows:
        vals = [float(v) for v in values.split(",")]
        assert len(vals) == 2 and all(math.isfinite(v) and v > 0 for v in vals)
    # the emulation changes the run (its values differ from the exact backends') but not by much
    cpu, emulated = ([float(v) for v in rows[k][4].split(",")] for k in (0, 2))
    assert cpu != emulated and all(abs(a - b) < 0.1 * a for a, b in zip(cpu, emulated))


def test_pytest_benchmark_suites_run():
    """``pytest bench/`` (the pytest-benchmark suites of the op and of the FSD term's KL), each
    benchmark run once with timing off: every case passes or is skipped with its reason, none fails."""
    env = dict(os.environ, APO_BENCH_DEVICE="cpu")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-v", "-p", "no:cacheprovider", "-rs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b\d+ passed\b", proc.stdout) and " failed" not in proc.stdout, tail
    for suite in ("test_bench_op.py::test_forward", "test_bench_fsd.py::test_kl_value_and_grad"):
        assert re.search(re.escape(suite) + r"\S* PASSED", proc.stdout), (suite, tail)


BRGEMM_RATES = ROOT / "csrc" / "test" / "brgemm_rates.cpp"


def _brgemm_rates_skip_reason():
    import shutil

    if shutil.which("g++") is None:
        return "no C++ compiler (g++) to build csrc/test/brgemm_rates.cpp"
    if not hasattr(torch.ops.apo, "cpu_gemm_engine"):
        return "apo_kernels._C is not built"
    return None


BRGEMM_RATES_SKIP = _brgemm_rates_skip_reason()


@pytest.mark.skipif(BRGEMM_RATES_SKIP is not None, reason=str(BRGEMM_RATES_SKIP))
def test_brgemm_rates_measurement_builds_and_runs(tmp_path):
    # csrc/test/brgemm_rates.cpp: the rates the log quotes for the CPU GEMM engine, built as its
    # header says; every row printed, the AVX-512 transposes equal to the scalar ones, the ragged
    # widths' last columns bit for bit the micro-kernel's
    torch_dir = os.path.dirname(torch.__file__)
    exe = tmp_path / "brgemm_rates"
    subprocess.run(["g++", "-O3", "-std=c++20", str(BRGEMM_RATES), f"-I{ROOT / 'csrc'}", f"-I{torch_dir}/include",
                    "-o", str(exe), f"-L{torch_dir}/lib", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir}/lib"],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(exe), "0.01"], check=True, capture_output=True, text=True, timeout=120).stdout
    assert f"engine here: {torch.ops.apo.cpu_gemm_engine()}" in out, out
    rows = re.findall(r"fp32 MKL +([0-9.]+) +brgemm +([0-9.]+) GFLOP/s .* bf16 brgemm +([0-9.]+|n/a)", out)
    assert len(rows) == 6 and all(x == "n/a" or float(x) > 0 for row in rows for x in row), out
    assert out.count("(same: yes)") == 4, out
    # the ragged widths through cpu_gemm.h: the micro-kernel's bits, overwriting and adding
    assert out.count("(same bits: yes)") == 7 and "NO)" not in out, out

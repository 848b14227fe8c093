"""apo-bench smoke test: the --quick mode end to end (JSON sections, finite positive timings, PNGs).

This is the CI run of the benchmark: `python -m apo_kernels.bench --quick` in a subprocess, as a user
runs it (≤ 60 s on an idle 2-core machine). Targets are only reported by the bench, never asserted.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from apo_kernels.bench.__main__ import build_parser


def _timings(rows):
    return [r["median_ms"] for r in rows if "median_ms" in r]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("apo_bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench decides for itself; interpreted Triton is never timed
    proc = subprocess.run(
        [sys.executable, "-m", "apo_kernels.bench", "--quick", "--device", "cpu", "--no-progress", "--out", str(out)],
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


def test_quick_targets_and_lowprec_reported(quick_run):
    _, res, stdout = quick_run
    assert res["targets"] and all(t["status"] in {"PASS", "MISS", "N/A"} and t["reason"] for t in res["targets"])
    assert "Targets" in stdout
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
                                       (["--sections", "nope"], "--sections")])
def test_bad_flags_exit_with_usage(argv, flag, capsys):
    # argparse's usage error: exit status 2 and a message naming the flag (--help also exits, with 0)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"argument {flag}" in err

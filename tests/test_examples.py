"""The runnable examples under python/ that README lists: each runs as a user runs it and still
shows what README says it shows (read off its printed lines)."""
import re
import subprocess
import sys

from conftest import python_script


def _run(name: str, *flags: str) -> str:
    proc = subprocess.run([sys.executable, python_script(name), *flags], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_apo_precond_regression_beats_the_best_fixed_lr_sgd():
    out = _run("apo_precond_regression")
    sgd = [float(v) for v in re.findall(r"^SGD.*best lr \S+: loss (\S+)$", out, flags=re.M)]
    apo = [float(v) for v in re.findall(r"^APOPrecond momentum \S+: loss (\S+)", out, flags=re.M)]
    assert len(sgd) == 2 and len(apo) == 2, out
    assert max(apo) < min(sgd), out


def test_apo_lr_quadratic_reaches_the_best_fixed_lr_from_every_start():
    out = _run("apo_lr_quadratic")
    ratios = [float(v) for v in re.findall(r"^APO-LR from lr \S+\s+loss \S+ \((\S+)x best fixed\)", out, flags=re.M)]
    assert len(ratios) == 4, out
    assert max(ratios) < 1.25, out  # from lr 1e3 down to 1e-4: within 25 % of the best fixed lr's loss
    assert "effective lr" in out and "meta_batch='fresh'" in out, out


def test_custom_optimizer_on_the_lower_layer_trains():
    out = _run("custom_optimizer")
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+loss (\S+)", out, flags=re.M)]
    assert len(losses) >= 3, out
    assert losses[-1] < 0.1 * losses[0], out

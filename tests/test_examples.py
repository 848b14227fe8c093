"""The runnable examples under python/ that README lists, and README's own code snippets: each runs
as a user runs it and still shows what README says it shows."""
import re
import subprocess
import sys

import pytest

from conftest import PYTHON_SCRIPTS, python_script


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


def test_the_readme_op_snippet_runs_as_written():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The op API"):]
    snippet = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    namespace: dict = {}
    exec(compile(snippet, "README.md (the op API)", "exec"), namespace)
    import torch
    assert torch.equal(namespace["flags"], torch.tensor([True, True]))
    assert [tuple(y.shape) for y in namespace["Ys"]] == [(64, 33), (10, 65)]
    assert namespace["dA"].shape == (256, 256) and namespace["dS2"].shape == (256, 512)


def test_the_readme_optimizer_snippet_runs_with_a_model_and_loaders():
    from conftest import ROOT
    import torch

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\nimport torch\nfrom apo_kernels.optim import APOLR, APOPrecond")
    snippet = readme[start + len("```python\n"):readme.index("\n```\n", start)]
    torch.manual_seed(0)
    namespace = {  # what the snippet takes as given: a model, a criterion, two loaders
        "model": torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)),
        "criterion": torch.nn.CrossEntropyLoss(),
        "loader": [(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(12)],
        "fsd_loader": [(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(12)],
    }
    exec(compile(snippet, "README.md (the optimizers)", "exec"), namespace)
    opt = namespace["opt"]
    assert opt.meta_steps == 2 and opt.skipped_steps == 0 and torch.isfinite(namespace["loss"])


SCRIPTS = sorted(p.stem for p in PYTHON_SCRIPTS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_and_refuses_an_unknown_flag(name):
    # --help prints the usage and runs nothing; an unknown flag is argparse's error (exit 2), not a run
    out = _run(name, "--help")
    assert out.startswith(f"usage: {name}.py"), out
    proc = subprocess.run([sys.executable, python_script(name), "--no-such-flag"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr, proc.stderr

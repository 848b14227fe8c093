"""Shared test set-up.

Triton's interpreter must be switched on before triton is first imported, so it is decided here,
at collection start, by torch's own query: without a usable CUDA device the Triton kernels run
interpreted on CPU tensors (that is how CI tests them); with one they run compiled. (Importing
torch does not import triton.)
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import apo_kernels  # noqa: E402
from apo_kernels.ops.backends import get, registered  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]  # the repository
PYTHON_SCRIPTS = ROOT / "python"


def python_script(name: str) -> str:
    """The path of ``python/<name>.py`` (the runnable examples and measurement scripts)."""
    return str(PYTHON_SCRIPTS / f"{name}.py")


def load_script(path, name: str):
    """The script at ``path`` imported as module ``name``, without running its ``main``."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_python_script(name: str):
    """``python/<name>.py`` imported as a module, without running its ``main``."""
    return load_script(python_script(name), name)


def env_with(name: str, value: str) -> dict:
    """This process's environment with ``name`` set to ``value``."""
    env = dict(os.environ)
    env[name] = value
    return env


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository under ``env``, its output captured as text (for choices a
    process makes once, at its first use, from its environment)."""
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def cpuinfo_fields():
    """The first processor's fields in /proc/cpuinfo (vendor_id, cpu family, flags, …), or None where
    it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def backend_skip_reason(backend: str, device_type: str = "cpu"):
    """Why ``backend`` cannot run on ``device_type`` tensors here (None: it can)."""
    entry = get(backend)
    if device_type not in entry.devices:
        return f"runs on {'/'.join(entry.devices)} tensors here, not {device_type}"
    status = entry.status()
    if not status.startswith("available"):
        return status
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    return None


def device_backends(device_type: str):
    """The registered backends for tensors of ``device_type`` (those whose entry lists it) as pytest
    params, each skipped with its reason when it cannot run here."""
    params = []
    for entry in registered():
        if device_type not in entry.devices:
            continue
        reason = backend_skip_reason(entry.name, device_type)
        marks = [pytest.mark.skip(reason=f"{entry.name}: {reason}")] if reason else []
        params.append(pytest.param(entry.name, marks=marks, id=entry.name))
    return params


def cpu_backends():
    """Backends that run on CPU tensors here, each skipped with its reason when unavailable."""
    return device_backends("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

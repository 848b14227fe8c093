"""Shared test set-up.

Triton's interpreter must be switched on before triton is first imported, so it is decided here,
at collection start, by torch's own query: without a usable CUDA device the Triton kernels run
interpreted on CPU tensors (that is how CI tests them); with one they run compiled. (Importing
torch does not import triton.)
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import apo_kernels  # noqa: E402


def backend_skip_reason(backend: str):
    status = apo_kernels.backends()[backend]
    return None if status.startswith("available") else status


def cpu_backends():
    """Backends that run on CPU tensors here, each skipped with its reason when unavailable."""
    params = []
    for name in ("cpu", "triton", "reference"):
        reason = backend_skip_reason(name)
        if name == "triton" and reason is None and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "triton runs on CUDA tensors here (TRITON_INTERPRET is not set)"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""Helpers of the pytest-benchmark suites (a uniquely named module, not conftest: tests/ has one too)."""
import os

import pytest
import torch

from apo_kernels.bench.common import timed_backends as _timed_backends

DEVICE = torch.device(os.environ.get("APO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def timed_backends():
    """The registry's backends for DEVICE, as apo-bench picks them: the timed ones, then the others
    that run on this device type, skipped with the reason."""
    timed, skipped = _timed_backends(DEVICE.type)
    return [pytest.param(b, id=b) for b in timed] + [
        pytest.param(b, marks=[pytest.mark.skip(reason=f"{b}: {why}")], id=b) for b, why in skipped.items()
    ]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)

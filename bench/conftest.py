"""pytest-benchmark suites of apo-kernels: ``pytest bench/ --benchmark-only``.

The device is CUDA when torch sees one, else the CPU (override: APO_BENCH_DEVICE=cpu|cuda).
On the GPU every timed function synchronizes before returning, so the launch is not all that is timed.
Triton is timed only compiled on a GPU (its CPU interpreter is a correctness tool, not a backend to time).
"""
import pytest

from bench_utils import DEVICE


@pytest.fixture
def device():
    return DEVICE

"""pytest-benchmark suites of apo-kernels: ``pytest bench/ --benchmark-only``.

The device is CUDA when torch sees one, else the CPU (override: APO_BENCH_DEVICE=cpu|cuda).
On the GPU every timed function synchronizes before returning, so the launch is not all that is timed.
Backends come from the registry, as apo-bench picks them (a backend ranked below the reference
fallback, such as Triton's CPU interpreter, is a correctness tool: skipped with the reason).
"""
import pytest

from bench_utils import DEVICE


@pytest.fixture
def device():
    return DEVICE

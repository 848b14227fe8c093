"""pytest-benchmark: the FSD term's KL value and gradient (every meta-step's, with ``fsd="kl"``),
``apo::kl_value_and_grad`` against the torch expression it replaces
(``pytest bench/test_bench_fsd.py --benchmark-only``; compare within a group).

Shapes (rows × classes): the MNIST-1D classifier's output (100 × 10) and more of its rows, 100
classes, a 1000-class batch (256 × 1000 and 4096 × 1000), short odd rows (5000 × 33) and a language
model's few tokens over a 50 257-word vocabulary (8 × 50 257). One thread: OMP_NUM_THREADS=1.
"""
import pytest
import torch

from apo_kernels.ops import backends
from apo_kernels.optim.discrepancy import kl_value_and_grad_torch

from bench_utils import DEVICE, sync

SHAPES = [(100, 10), (1000, 10), (128, 100), (256, 1000), (5000, 33), (8, 50257), (4096, 1000)]
IMPLS = {"apo::kl_value_and_grad": backends.native_kl_value_and_grad, "torch expression": kl_value_and_grad_torch}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_kl_value_and_grad(benchmark, impl, shape):
    fn = IMPLS[impl]
    if fn is None:
        pytest.skip("the native module apo_kernels._C is not built")
    benchmark.group = f"kl value and grad {shape[0]}x{shape[1]}"
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(shape, generator=gen).to(DEVICE)
    old = torch.randn(shape, generator=gen).to(DEVICE)

    def timed():
        out = fn(new, old, 0.1)
        sync()
        return out

    benchmark.pedantic(timed, warmup_rounds=5, rounds=100, iterations=1)

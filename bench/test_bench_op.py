"""pytest-benchmark: the op's forward and backward per backend vs the hand-written torch chain, and
the grouped op vs a per-layer loop (``pytest bench/ --benchmark-only``; compare within a group).

Sizes: CPU 256, 1024; GPU 1024, 4096 (override with APO_BENCH_SIZES=256,512). fp32 and bf16
(bf16 only on GPU: this CPU's bf16 GEMMs run at ~0.7 GFLOP/s, see bench/results/).
"""
import os

import pytest
import torch

import apo_kernels
from apo_kernels.bench.op_bench import MASK, _chain_backward, _inputs, chain
from apo_kernels.bench.shapes import layer_set

from bench_utils import DEVICE, sync, timed_backends

GPU = DEVICE.type == "cuda"
SIZES = [int(s) for s in os.environ.get("APO_BENCH_SIZES", "1024,4096" if GPU else "256,1024").split(",")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16} if GPU else {"fp32": torch.float32}
SCALE = "gpu" if GPU else "quick"


def _layer(size, dtype):
    return _inputs(size, size, dtype, DEVICE, torch.Generator().manual_seed(0))


def _run(benchmark, fn):
    def timed():
        out = fn()
        sync()
        return out

    benchmark.pedantic(timed, warmup_rounds=1, rounds=5 if not GPU else 50, iterations=1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["torch chain"] + timed_backends())
def test_forward(benchmark, impl, dname, size):
    benchmark.group = f"forward {dname} {size}"
    G, A, S, B, _ = _layer(size, DTYPES[dname])
    if impl == "torch chain":
        _run(benchmark, lambda: chain(G, A, S, B))
    else:
        _run(benchmark, lambda: apo_kernels.precondition(G, A, S, B, backend=impl))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["torch chain (autograd)"] + timed_backends())
def test_backward_meta(benchmark, impl, dname, size):
    """(dA, dS, dB) given dY: the meta-gradient's outputs."""
    benchmark.group = f"backward {dname} {size}"
    G, A, S, B, dY = _layer(size, DTYPES[dname])
    if impl.startswith("torch chain"):
        _run(benchmark, lambda: _chain_backward(G, A, S, B, dY))
    else:
        _run(benchmark, lambda: apo_kernels.precondition_backward(dY, G, A, S, B, output_mask=MASK, backend=impl))


@pytest.mark.parametrize("set_name", ["small64", "resnet18"])
@pytest.mark.parametrize("impl", ["loop: torch chain"] + [pytest.param(f"grouped: {p.values[0]}", marks=p.marks, id=f"grouped-{p.id}") for p in timed_backends()])
def test_grouped_forward(benchmark, set_name, impl):
    label, shapes = layer_set(set_name, SCALE)
    benchmark.group = f"grouped forward {label}"
    gen = torch.Generator().manual_seed(0)
    Gs, As, Ss, Bs, _ = (list(x) for x in zip(*[_inputs(m, n, torch.float32, DEVICE, gen) for m, n in shapes]))
    if impl == "loop: torch chain":
        _run(benchmark, lambda: [chain(g, a, s, b) for g, a, s, b in zip(Gs, As, Ss, Bs)])
    else:
        be = impl.split(": ")[1]
        _run(benchmark, lambda: apo_kernels.precondition_grouped(Gs, As, Ss, Bs, backend=be))

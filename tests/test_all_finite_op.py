"""``apo::all_finite(tensors) -> Tensor``: whether every value of every tensor is finite, as a 0-d
bool tensor on their device; the optimizers' per-step guard (``apo_kernels._numerics.all_finite``).

Oracle: ``torch.isfinite(t).all()`` per tensor. Exact (a yes/no answer, no tolerance). The inputs
cover what the CPU kernel treats differently: contiguous float32 / float64 (the integer exponent
test, split over threads above 3·2^15 elements), contiguous bfloat16 / float16 (their exponent bits,
split above twice as many elements: the same bytes), every other floating and complex dtype and every
strided view (ATen's isfinite), integer and bool tensors (always finite), empty tensors and lists.
A NaN, +inf or -inf goes to a random position, the last element included (the tail after the last
whole SIMD vector).
"""
import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends

pytestmark = pytest.mark.skipif(backends.native_all_finite is None,
                                reason="the native module apo_kernels._C is not built")

BAD = [float("nan"), float("inf"), -float("inf")]
SHAPES = [(1,), (7,), (15,), (16,), (17,), (33, 5), (3, 129), (2, 3, 31)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
BIG = (1 << 18) * 3 + 5  # far above the kernel's grain (3·2^15 elements): the threaded path
GRAIN = 3 << 15  # the kernel's: tensors above it are split over the threads


def op(tensors):
    return torch.ops.apo.all_finite(tensors)


def oracle(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def layouts(t):
    """The tensor itself and two strided views of the same values' kind."""
    yield t
    if t.dim() >= 2:
        yield t.transpose(0, 1)
    yield t.reshape(-1)[::2]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_isfinite_with_one_bad_value_anywhere(dtype, shape):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    for t in layouts(base):
        assert op([t]).dtype == torch.bool and op([t]).dim() == 0
        assert bool(op([t])) is True is oracle([t])
        for bad in BAD:
            for pos in (int(torch.randint(t.numel(), (1,), generator=gen)), t.numel() - 1):
                u = t.clone()  # t's strides (clone keeps a dense layout)
                u[torch.unravel_index(torch.tensor(pos), u.shape)] = bad
                others = [torch.randn(5, generator=gen), torch.ones(3, dtype=torch.int64)]
                assert bool(op([u])) is False is oracle([u])
                assert bool(op(others + [u])) is False  # the bad tensor last in the list
                assert bool(op([u] + others)) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [GRAIN, GRAIN + 1, 2 * GRAIN + 1, BIG])
def test_large_tensor_threaded_path(dtype, n):
    t = torch.randn(n).to(dtype)
    assert bool(op([t])) is True
    half = (n + 1) // 2  # where two threads' shares meet
    # first; where the two threads' shares meet; either side of 2^18 elements; last
    for pos in (0, half - 1, half, (1 << 18) - 1, 1 << 18, n - 1):
        if pos < n:
            u = t.clone()
            u[pos] = float("inf")
            assert bool(op([u])) is False, pos


def test_integer_bool_and_empty_inputs_are_finite():
    assert bool(op([])) is True
    assert bool(op([torch.zeros(0), torch.empty(0, 3, dtype=torch.float64)])) is True
    assert bool(op([torch.arange(5), torch.ones(2, dtype=torch.bool), torch.zeros(3, dtype=torch.uint8)])) is True
    assert bool(op([torch.arange(5), torch.tensor([1.0, float("nan")])])) is False


def test_reads_only():
    t = torch.tensor([1.0, float("nan"), float("inf"), -0.0])
    version, before = t._version, t.clone()
    op([t])
    assert t._version == version
    assert torch.equal(t.isnan(), before.isnan()) and torch.equal(t.nan_to_num(), before.nan_to_num())


def test_tensors_on_two_devices_are_refused_by_name():
    with pytest.raises(ValueError, match="tensors: every tensor must be on one device"):
        op([torch.ones(2), torch.ones(2, device="meta")])


def test_opcheck():
    torch.library.opcheck(torch.ops.apo.all_finite.default, ([torch.randn(4, 3), torch.randn(7).double()],))
    torch.library.opcheck(torch.ops.apo.all_finite.default, ([torch.tensor([1.0, float("inf")])],))


def test_optimizers_guard_uses_it_on_cpu(monkeypatch):
    """``_numerics.all_finite`` (every optimizer's gradient check) answers CPU tensors with one call
    of the op, None entries left out; its answer is the oracle's."""
    from apo_kernels import _numerics

    calls = []
    real = backends.native_all_finite

    def counting(tensors):
        calls.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(backends, "native_all_finite", counting)
    ts = [torch.randn(3, 4), None, torch.randn(5).double()]
    assert _numerics.all_finite(ts) is True and calls == [2]
    ts[2][1] = float("nan")
    assert _numerics.all_finite(ts) is False
    assert _numerics.all_finite_scratch([torch.randn(2), torch.tensor([float("inf")])]) is False


def test_traced_by_torch_compile_and_called_with_tensors_that_require_grad():
    fn = torch.compile(lambda t: torch.ops.apo.all_finite([t, t * 2]), fullgraph=True, backend="aot_eager")
    assert bool(fn(torch.randn(4))) is True
    assert bool(fn(torch.tensor([1.0, float("nan")]))) is False
    assert bool(op([torch.randn(3, requires_grad=True)])) is True

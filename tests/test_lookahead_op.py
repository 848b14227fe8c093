"""``apo::lookahead_write(params, deltas, out) -> Tensor``: out = θ + Δ per parameter and Σ‖Δ‖² as a
0-d float64 tensor; the meta-step's lookahead (``apo_kernels.optim.snapshot``).

Oracles: out against ``torch.add(θ, Δ)`` (the same dtype) or ``(θ.to(Δ.dtype) + Δ).to(θ.dtype)``
(a half-precision θ with a float32 Δ), bit for bit: both are one rounded addition. Σ‖Δ‖² against the
float64 sum of Δ's squares, to 1e-12 relative (float64 accumulations in another order). The inputs
cover what the CPU kernel treats differently: float32 / float64 laid out densely and alike in all
three tensors, row- or column-major (its own loop over memory, split over threads above 2^16
elements), and everything else (ATen's ops): layouts that differ, strided views, half-precision
parameters, mixed dtypes. A NaN or inf in Δ, anywhere (the last element included, past the last
whole SIMD vector), makes the sum not finite.
"""
import math

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends

pytestmark = pytest.mark.skipif(backends.native_lookahead_write is None,
                                reason="the native module apo_kernels._C is not built")

SHAPES = [(1,), (7,), (15,), (17,), (33, 5), (3, 129), (2, 3, 31), (2, 3, 5, 7), (1 << 16) * 2 + 3]
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float16)]
BAD = [float("nan"), float("inf"), -float("inf")]


def op(params, deltas, out):
    return torch.ops.apo.lookahead_write(params, deltas, out)


def expected(theta, delta):
    return torch.add(theta, delta) if theta.dtype == delta.dtype else (theta.to(delta.dtype) + delta).to(theta.dtype)


def fresh(shape, dtype, gen, scale=1.0):
    shape = (shape,) if isinstance(shape, int) else shape
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def layouts(t):
    """The tensor itself and a strided view of another tensor holding the same values."""
    yield t
    if t.dim() >= 2:
        yield t.transpose(0, 1).contiguous().transpose(0, 1)  # the same shape, column-major
    yield torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # every other element of a buffer


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_add_and_float64_sum_of_squares(shape, dtypes):
    p_dtype, d_dtype = dtypes
    gen = torch.Generator().manual_seed(hash((shape, str(dtypes))) % 2**31)
    theta = fresh(shape, p_dtype, gen)
    delta = fresh(shape, d_dtype, gen, scale=1e-2)
    for t in layouts(theta):
        for d in layouts(delta):
            out = torch.full_like(t, float("nan"))
            got = op([t], [d], [out])
            assert got.dtype == torch.float64 and got.dim() == 0
            assert torch.equal(out, expected(t, d))
            ref = float((d.double() ** 2).sum())
            assert math.isclose(float(got), ref, rel_tol=1e-12), (float(got), ref)


def test_many_parameters_sum_over_all_and_leave_inputs_unwritten():
    gen = torch.Generator().manual_seed(0)
    thetas = [fresh(s, torch.float32, gen) for s in [(5, 3), (200000,), (4,)]] + [fresh((9, 2), torch.float64, gen)]
    deltas = [fresh(t.shape, t.dtype, gen) for t in thetas]
    before = [t.clone() for t in thetas + deltas]
    versions = [t._version for t in thetas + deltas]
    outs = [torch.empty_like(t) for t in thetas]
    got = float(op(thetas, deltas, outs))
    assert math.isclose(got, sum(float((d.double() ** 2).sum()) for d in deltas), rel_tol=1e-12)
    for o, t, d in zip(outs, thetas, deltas):
        assert torch.equal(o, torch.add(t, d))
    assert all(torch.equal(a, b) for a, b in zip(thetas + deltas, before))
    assert [t._version for t in thetas + deltas] == versions


@pytest.mark.parametrize("dtypes", DTYPES[:4], ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_a_non_finite_delta_anywhere_makes_the_sum_not_finite(dtypes):
    p_dtype, d_dtype = dtypes
    gen = torch.Generator().manual_seed(1)
    n = (1 << 16) * 3 + 5  # several chunks of the threaded loop, and a tail
    theta = fresh(n, p_dtype, gen)
    for bad in BAD:
        for pos in (0, (1 << 16) - 1, 1 << 16, n // 2, n - 1):
            delta = fresh(n, d_dtype, gen)
            delta[pos] = bad
            small = [fresh(7, torch.float32, gen)]
            got = op(small + [theta], [fresh(7, torch.float32, gen), delta], [torch.empty(7), torch.empty_like(theta)])
            assert not math.isfinite(float(got)), (bad, pos)


def test_float64_deltas_whose_squares_overflow_are_not_finite():
    theta = torch.zeros(3, dtype=torch.float64)
    assert float(op([theta], [torch.tensor([1e200, 0.0, 1.0], dtype=torch.float64)], [torch.empty(3, dtype=torch.float64)])) == math.inf


def test_empty_lists_and_tensors():
    assert float(op([], [], [])) == 0.0
    assert float(op([torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)])) == 0.0


def test_bad_inputs_are_refused_by_name():
    t, d, o = torch.randn(3, 4), torch.randn(3, 4), torch.empty(3, 4)
    cases = [
        (([t], [d, d], [o]), ValueError, "params, deltas, out must have the same length"),
        (([t], [torch.randn(4, 3)], [o]), ValueError, r"deltas\[0\] must have the shape of params\[0\]"),
        (([t], [d], [torch.empty(12)]), ValueError, r"out\[0\] must have the shape of params\[0\]"),
        (([t], [d], [torch.empty(3, 4, dtype=torch.float64)]), TypeError, r"out\[0\] has dtype torch.float64 but params\[0\] has torch.float32"),
        (([t], [torch.ones(3, 4, dtype=torch.int64)], [o]), TypeError, r"deltas\[0\] has dtype torch.int64"),
        (([t], [d.to_sparse()], [o]), ValueError, r"deltas\[0\] must be a dense \(strided\) tensor"),
        (([t], [d], [torch.empty(1, 4).expand(3, 4)]), ValueError, r"out\[0\] has elements that share memory"),
        (([t], [d], [t]), ValueError, r"out\[0\] shares memory with params\[0\]"),
        (([t], [d], [d]), ValueError, r"out\[0\] shares memory with deltas\[0\]"),
        # a meta tensor sends the call to the fake kernel, which names the lists
        (([t], [d], [torch.empty(3, 4, device="meta")]), ValueError, r"params, deltas, out: every tensor must be on one device"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    t = [fresh((4, 3), torch.float32, gen), fresh((7,), torch.float64, gen)]
    d = [fresh((4, 3), torch.float32, gen), fresh((7,), torch.float64, gen)]
    torch.library.opcheck(torch.ops.apo.lookahead_write.default, (t, d, [torch.empty(4, 3), torch.empty(7, dtype=torch.float64)]))


def test_snapshot_writes_the_lookahead_with_it_and_returns_the_sum(monkeypatch):
    """``ModelSnapshot.write`` (every meta-step's θ' = θ + Δ) is one call of the op per device; its
    ‖Δ‖² is the op's, and the restore gives θ back."""
    from apo_kernels.optim.snapshot import ModelSnapshot

    calls = []
    real = backends.native_lookahead_write

    def counting(params, deltas, out):
        calls.append(len(params))
        return real(params, deltas, out)

    monkeypatch.setattr(backends, "native_lookahead_write", counting)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    deltas = [torch.randn_like(p) for p in params]
    snap = ModelSnapshot(model, params)
    sum_sq = snap.write(deltas)
    assert calls == [4]
    assert math.isclose(sum_sq, sum(float((d.double() ** 2).sum()) for d in deltas), rel_tol=1e-12)
    assert all(torch.equal(p.detach(), b + d) for p, b, d in zip(params, before, deltas))
    snap.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_the_python_fallback_agrees(monkeypatch):
    """Without the native module the snapshot forms the same θ' and the same sum."""
    from apo_kernels.optim.snapshot import add_and_sum_squares

    gen = torch.Generator().manual_seed(3)
    values = [fresh((6, 5), torch.float32, gen), fresh((9,), torch.bfloat16, gen)]
    deltas = [fresh((6, 5), torch.float32, gen), fresh((9,), torch.float32, gen)]
    native_out = [torch.empty_like(v) for v in values]
    native = add_and_sum_squares(values, deltas, native_out)
    monkeypatch.setattr(backends, "native_lookahead_write", None)
    python_out = [torch.empty_like(v) for v in values]
    fallback = add_and_sum_squares(values, deltas, python_out)
    assert math.isclose(native, fallback, rel_tol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(native_out, python_out))


def test_composite_kernel_agrees_with_the_cpu_kernel():
    """The composite kernel (CompositeExplicitAutograd: what CUDA and every other device run), reached
    on CPU tensors by redispatching to its key: the same θ' bit for bit, the same sum to 1e-12."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    gen = torch.Generator().manual_seed(4)
    thetas = [fresh((33, 5), torch.float32, gen), fresh((200003,), torch.float32, gen),
              fresh((7,), torch.float64, gen), fresh((9,), torch.bfloat16, gen)]
    deltas = [fresh(t.shape, torch.float32 if t.dtype == torch.bfloat16 else t.dtype, gen) for t in thetas]
    cpu_out = [torch.empty_like(t) for t in thetas]
    composite_out = [torch.empty_like(t) for t in thetas]
    cpu = float(op(thetas, deltas, cpu_out))
    other = float(torch.ops.apo.lookahead_write.default.redispatch(composite, thetas, deltas, composite_out))
    assert math.isclose(cpu, other, rel_tol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(cpu_out, composite_out))
    deltas[1][-1] = float("nan")
    assert not math.isfinite(float(torch.ops.apo.lookahead_write.default.redispatch(composite, thetas, deltas, composite_out)))
    assert float(torch.ops.apo.lookahead_write.default.redispatch(composite, [], [], [])) == 0.0
    with pytest.raises(ValueError, match=r"out\[0\] shares memory with params\[0\]"):
        torch.ops.apo.lookahead_write.default.redispatch(composite, thetas[:1], deltas[:1], thetas[:1])

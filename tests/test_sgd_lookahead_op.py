"""``apo::sgd_lookahead(params, grads, momenta, grad_coef, momentum_coef, decay_coef, deltas, out) -> Tensor``:
APO-LR's lookahead for torch.optim.SGD in one pass (``apo_kernels.optim.lr.fused_sgd_lookahead``).
Per parameter Δ = a·g + b·m + c·θ into deltas, θ' = θ + Δ into out, and Σ‖Δ‖² as a 0-d float64 tensor.

Oracles: Δ against the float64 value of a·g + b·m + c·θ, within 4 units of Δ's dtype's rounding of
the terms' magnitudes (each product and sum is rounded once: 1–3 roundings, float32 or float64); out
against ``(θ.to(Δ.dtype) + Δ).to(θ.dtype)`` with the op's own Δ, bit for bit (one rounded addition);
Σ‖Δ‖² against the float64 sum of the op's Δ squared, to 1e-12 relative. The inputs cover what the CPU
kernel treats differently: float32 / float64 laid out densely and alike in every tensor (its own
loop, split over threads above 2^14 elements), every combination of the momentum and decay terms,
and everything else (ATen's ops): other layouts, half-precision parameters with float32 deltas. A
NaN or inf in g, m or (with a decay term) θ, anywhere, makes the sum not finite.
"""
import math

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends
from test_lookahead_op import BAD, fresh  # the lookahead_write tests' inputs: values and non-finite ones

pytestmark = pytest.mark.skipif(backends.native_sgd_lookahead is None,
                                reason="the native module apo_kernels._C is not built")

SHAPES = [(1,), (7,), (17,), (33, 5), (3, 129), (2, 3, 31), (1 << 16) * 2 + 3]
# (θ's dtype, Δ's dtype): g and m in Δ's dtype, as the optimizer calls it; a half θ has a float32 Δ
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float32)]
TERMS = [(False, 0.0), (True, 0.0), (False, -0.003), (True, -0.003)]  # (momentum term, decay_coef)
A, B = -0.1, -0.09


def op(params, grads, momenta, a, b, c, deltas, out):
    return torch.ops.apo.sgd_lookahead(params, grads, momenta, a, b, c, deltas, out)


def column_major(t):
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t


def check(theta, grad, mom, c, delta, out, got):
    """The op's results against the oracles of the module docstring."""
    terms = [A * grad.double(), *([B * mom.double()] if mom is not None else []),
             *([c * theta.double()] if c != 0.0 else [])]
    ref = sum(terms)
    size = sum(t.abs() for t in terms)
    eps = torch.finfo(delta.dtype).eps
    assert torch.all((delta.double() - ref).abs() <= 4 * eps * size + 1e-300), float((delta.double() - ref).abs().max())
    assert torch.equal(out, (theta.to(delta.dtype) + delta).to(theta.dtype))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert math.isclose(float(got), float((delta.double() ** 2).sum()), rel_tol=1e-12)


@pytest.mark.parametrize("terms", TERMS, ids=lambda t: f"momentum={t[0]}-decay={t[1]}")
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_float64_terms_and_the_rounded_sum(shape, dtypes, terms):
    p_dtype, d_dtype = dtypes
    with_momentum, c = terms
    gen = torch.Generator().manual_seed(hash((shape, str(dtypes), terms)) % 2**31)
    theta = fresh(shape, p_dtype, gen)
    grad = fresh(shape, d_dtype, gen)
    mom = fresh(shape, d_dtype, gen) if with_momentum else None
    for layout in (lambda t: t, column_major):  # one layout for all: the dense loop, or ATen's ops
        t, g = layout(theta), layout(grad)
        m = None if mom is None else layout(mom)
        delta, out = layout(torch.full_like(grad, float("nan"))), layout(torch.full_like(theta, float("nan")))
        got = op([t], [g], [] if m is None else [m], A, B, c, [delta], [out])
        check(t, g, m, c, delta, out, got)


def test_layouts_that_differ_and_many_parameters_sum_over_all_and_leave_inputs_unwritten():
    gen = torch.Generator().manual_seed(0)
    thetas = [fresh(s, torch.float32, gen) for s in [(5, 3), (200000,), (4,)]] + [fresh((9, 2), torch.float64, gen)]
    grads = [fresh(t.shape, t.dtype, gen) for t in thetas]
    grads[0] = column_major(grads[0])  # a gradient laid out unlike its parameter: ATen's ops for that one
    moms = [fresh(t.shape, t.dtype, gen) for t in thetas]
    before = [t.clone() for t in thetas + grads + moms]
    versions = [t._version for t in thetas + grads + moms]
    deltas = [torch.empty_like(t) for t in thetas]
    outs = [torch.empty_like(t) for t in thetas]
    got = op(thetas, grads, moms, A, B, -0.01, deltas, outs)
    for t, g, m, d, o in zip(thetas, grads, moms, deltas, outs):
        check(t, g, m, -0.01, d, o, torch.tensor(float((d.double() ** 2).sum()), dtype=torch.float64))
    assert math.isclose(float(got), sum(float((d.double() ** 2).sum()) for d in deltas), rel_tol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(thetas + grads + moms, before))
    assert [t._version for t in thetas + grads + moms] == versions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["grads", "momenta", "params"])
def test_a_non_finite_input_anywhere_makes_the_sum_not_finite(dtype, where):
    gen = torch.Generator().manual_seed(1)
    n = (1 << 16) * 3 + 5  # several chunks of the threaded loop, and a tail
    for bad in BAD:
        for pos in (0, (1 << 16) - 1, 1 << 16, n // 2, n - 1):
            args = {name: [fresh(7, dtype, gen), fresh(n, dtype, gen)] for name in ("params", "grads", "momenta")}
            args[where][1][pos] = bad
            deltas = [torch.empty(7, dtype=dtype), torch.empty(n, dtype=dtype)]
            outs = [torch.empty(7, dtype=dtype), torch.empty(n, dtype=dtype)]
            got = op(args["params"], args["grads"], args["momenta"], A, B, -0.01, deltas, outs)
            assert not math.isfinite(float(got)), (bad, pos)


def test_without_a_decay_term_theta_is_only_added():
    """decay_coef = 0 adds no term (SGD without weight decay): an inf in θ gives an inf θ', not a NaN Δ."""
    theta = torch.tensor([1.0, math.inf])
    delta, out = torch.empty(2), torch.empty(2)
    got = op([theta], [torch.ones(2)], [], A, B, 0.0, [delta], [out])
    assert torch.equal(delta, torch.full((2,), A, dtype=torch.float32)) and math.isfinite(float(got))
    assert out[1] == math.inf


def test_empty_lists_and_tensors():
    assert float(op([], [], [], A, B, 0.0, [], [])) == 0.0
    z = torch.zeros(0)
    assert float(op([z], [z], [z], A, B, 0.1, [torch.zeros(0)], [torch.zeros(0)])) == 0.0


def test_bad_inputs_are_refused_by_name():
    t, g, m = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)

    def call(params=None, grads=None, momenta=None, deltas=None, out=None):
        return op(params or [t], grads or [g], [m] if momenta is None else momenta, A, B, 0.0,
                  deltas or [torch.empty(3, 4)], out or [torch.empty(3, 4)])

    cases = [
        (dict(grads=[g, g]), ValueError, "params, grads, deltas, out .* must have the same length"),
        (dict(momenta=[m, m]), ValueError, "params, grads, deltas, out .* must have the same length"),
        (dict(grads=[torch.randn(4, 3)]), ValueError, r"grads\[0\] must have the shape of params\[0\]"),
        (dict(momenta=[torch.randn(12)]), ValueError, r"momenta\[0\] must have the shape of params\[0\]"),
        (dict(deltas=[torch.empty(3, 5)]), ValueError, r"deltas\[0\] must have the shape of params\[0\]"),
        (dict(out=[torch.empty(3, 4, dtype=torch.float64)]), TypeError,
         r"out\[0\] has dtype torch.float64 but params\[0\] has torch.float32"),
        (dict(grads=[torch.ones(3, 4, dtype=torch.int64)]), TypeError, r"grads\[0\] has dtype torch.int64"),
        (dict(momenta=[m.to_sparse()]), ValueError, r"momenta\[0\] must be a dense \(strided\) tensor"),
        (dict(deltas=[torch.empty(1, 4).expand(3, 4)]), ValueError, r"deltas\[0\] has elements that share memory"),
        (dict(out=[t]), ValueError, r"out\[0\] shares memory with params\[0\]"),
        (dict(deltas=[g]), ValueError, r"deltas\[0\] shares memory with grads\[0\]"),
        (dict(out=[m]), ValueError, r"out\[0\] shares memory with momenta\[0\]"),
        # a meta tensor sends the call to the fake kernel, which names the lists
        (dict(out=[torch.empty(3, 4, device="meta")]), ValueError,
         r"params, grads, momenta, deltas, out: every tensor must be on one device"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kwargs)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    shapes = [((4, 3), torch.float32), ((7,), torch.float64)]
    params, grads, moms = ([fresh(s, d, gen) for s, d in shapes] for _ in range(3))
    deltas, outs = ([torch.empty(s, dtype=d) for s, d in shapes] for _ in range(2))
    torch.library.opcheck(torch.ops.apo.sgd_lookahead.default, (params, grads, moms, A, B, -0.01, deltas, outs))


def test_composite_kernel_agrees_with_the_cpu_kernel():
    """The composite kernel (CompositeExplicitAutograd: what CUDA and every other device run), reached
    on CPU tensors by redispatching to its key: Δ within its rounding of the CPU kernel's (ATen's add
    may fuse a product into the sum), θ' the rounded θ + Δ of its own Δ, the sum to 1e-6."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    gen = torch.Generator().manual_seed(4)
    thetas = [fresh((33, 5), torch.float32, gen), fresh((200003,), torch.float32, gen),
              fresh((7,), torch.float64, gen), fresh((9,), torch.bfloat16, gen)]
    grads = [fresh(t.shape, torch.float32 if t.dtype == torch.bfloat16 else t.dtype, gen) for t in thetas]
    moms = [fresh(g.shape, g.dtype, gen) for g in grads]
    results = []
    for call in (lambda *a: op(*a), lambda *a: torch.ops.apo.sgd_lookahead.default.redispatch(composite, *a)):
        deltas, outs = [torch.empty_like(g) for g in grads], [torch.empty_like(t) for t in thetas]
        got = call(thetas, grads, moms, A, B, -0.01, deltas, outs)
        for t, g, m, d, o in zip(thetas, grads, moms, deltas, outs):
            check(t, g, m, -0.01, d, o, torch.tensor(float((d.double() ** 2).sum()), dtype=torch.float64))
        results.append(float(got))
    assert math.isclose(*results, rel_tol=1e-6)
    grads[1][-1] = float("nan")
    deltas, outs = [torch.empty_like(g) for g in grads], [torch.empty_like(t) for t in thetas]
    assert not math.isfinite(float(torch.ops.apo.sgd_lookahead.default.redispatch(
        composite, thetas, grads, moms, A, B, -0.01, deltas, outs)))
    assert float(torch.ops.apo.sgd_lookahead.default.redispatch(composite, [], [], [], A, B, 0.0, [], [])) == 0.0
    with pytest.raises(ValueError, match=r"out\[0\] shares memory with params\[0\]"):
        torch.ops.apo.sgd_lookahead.default.redispatch(composite, thetas[:1], grads[:1], [], A, B, 0.0,
                                                       [torch.empty_like(grads[0])], thetas[:1])

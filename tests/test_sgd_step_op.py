"""``apo::sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov, maximize) -> Tensor``:
torch.optim.SGD's per-tensor step, taken only when every gradient is finite (APO-LR's plain step,
``apo_kernels._step_hooks.checked_sgd_step``). Returns a 0-d bool tensor: True when taken.

Oracles: torch's own step (``torch.optim.sgd._single_tensor_sgd``, the CPU default) on copies of the
same tensors, bit for bit, for every hyperparameter combination torch allows; and the float64 value
of the step's formula, within a few units of the dtype's rounding of the terms' magnitudes. The
inputs cover what the CPU kernel treats differently: float32 / float64 laid out densely and alike
in every tensor (its own loop, split over threads above 2^16 elements), and everything else (ATen's
ops): other layouts, half precision. A NaN or inf in any gradient, anywhere, writes nothing.
"""
import itertools

import pytest
import torch
from torch.optim import sgd as torch_sgd

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends
from test_lookahead_op import BAD, fresh  # the lookahead_write tests' inputs: values and non-finite ones

pytestmark = pytest.mark.skipif(backends.native_sgd_step is None,
                                reason="the native module apo_kernels._C is not built")

SHAPES = [(1,), (7,), (31,), (33, 5), (3, 129), (2, 3, 31), (1 << 16) * 2 + 3]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (momentum, dampening, weight_decay, nesterov, maximize), the op's order: every combination
# torch.optim.SGD accepts
HYPER = [h for h in itertools.product((0.0, 0.9), (0.0, 0.1), (0.0, 1e-3), (False, True), (False, True))
         if not h[3] or (h[0] > 0 and h[1] == 0)]
LR = 0.0123
# float64 formula's tolerance in units of the dtype's eps, times the terms' magnitudes
ULPS = 8


def op(params, grads, momenta, lr, momentum, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    return torch.ops.apo.sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov, maximize)


def column_major(t):
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t


def torchs_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's per-tensor step on copies: (params, momenta) after it."""
    ps, bufs = [p.clone() for p in params], [m.clone() for m in momenta] if momentum != 0 else [None] * len(params)
    torch_sgd._single_tensor_sgd(ps, list(grads), bufs, None, None, weight_decay=weight_decay, momentum=momentum,
                                 lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize,
                                 has_sparse_grad=False)
    return ps, bufs if momentum != 0 else []


def check_formula(theta, grad, mom, new_theta, new_mom, momentum, dampening, weight_decay, nesterov, maximize):
    """The step against its float64 formula, with each term's magnitude bounding the rounding."""
    t, g = theta.double(), grad.double() * (-1.0 if maximize else 1.0)
    g, size = g + weight_decay * t, g.abs() + weight_decay * t.abs()
    if momentum != 0:
        b = momentum * mom.double() + (1.0 - dampening) * g
        b_size = momentum * mom.double().abs() + (1.0 - dampening) * size
        eps = torch.finfo(theta.dtype).eps
        assert torch.all((new_mom.double() - b).abs() <= ULPS * eps * b_size + 1e-300)
        g, size = (g + momentum * b, size + momentum * b_size) if nesterov else (b, b_size)
    ref = t - LR * g
    eps = torch.finfo(theta.dtype).eps
    assert torch.all((new_theta.double() - ref).abs() <= ULPS * eps * (t.abs() + LR * size) + 1e-300)


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "mom={}-damp={}-wd={}-nest={}-max={}".format(*h))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_is_torchs_step_bit_for_bit_and_the_float64_formula(shape, dtype, hyper):
    momentum = hyper[0]
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), hyper)) % 2**31)
    theta, grad, mom = (fresh(shape, dtype, gen) for _ in range(3))
    for layout in (lambda t: t, column_major):  # one layout for all: the dense loop, or ATen's ops
        t, g, m = layout(theta.clone()), layout(grad), layout(mom.clone())
        expected = torchs_step([t], [g], [m], LR, *hyper)
        got = op([t], [g], [m] if momentum != 0 else [], LR, *hyper)
        assert got.dtype == torch.bool and got.dim() == 0 and bool(got)
        assert torch.equal(t, expected[0][0])
        if momentum != 0:
            assert torch.equal(m, expected[1][0])
        check_formula(theta, grad, mom, t, m, *hyper)


def test_many_parameters_and_layouts_that_differ_in_one_call():
    """One call over parameters of several sizes and dtypes, one gradient laid out unlike its parameter
    (ATen's ops for that one): each is torch's step, and the gradients are not written."""
    gen = torch.Generator().manual_seed(0)
    thetas = [fresh(s, torch.float32, gen) for s in [(5, 3), (200000,), (4,)]] + [fresh((9, 2), torch.float64, gen)]
    grads = [fresh(t.shape, t.dtype, gen) for t in thetas]
    grads[0] = column_major(grads[0])
    moms = [fresh(t.shape, t.dtype, gen) for t in thetas]
    hyper = (0.9, 0.0, 1e-2, True, False)
    expected = torchs_step(thetas, grads, moms, LR, *hyper)
    grads_before = [g.clone() for g in grads]
    assert bool(op(thetas, grads, moms, LR, *hyper))
    assert all(torch.equal(a, b) for a, b in zip(thetas + moms, expected[0] + expected[1]))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_non_finite_gradient_anywhere_writes_nothing(dtype):
    gen = torch.Generator().manual_seed(1)
    n = (1 << 16) * 3 + 5  # several chunks of the threaded loop, and a tail
    for bad in BAD:
        for k, pos in ((0, 3), (1, 0), (1, (1 << 16) - 1), (1, n // 2), (1, n - 1)):
            params = [fresh(7, dtype, gen), fresh(n, dtype, gen)]
            grads = [fresh(7, dtype, gen), fresh(n, dtype, gen)]
            moms = [fresh(7, dtype, gen), fresh(n, dtype, gen)]
            grads[k][pos] = bad
            before = [t.clone() for t in params + moms]
            got = op(params, grads, moms, LR, 0.9, weight_decay=1e-3)
            assert got.dtype == torch.bool and not bool(got), (bad, k, pos)
            assert all(torch.equal(a, b) for a, b in zip(params + moms, before)), (bad, k, pos)


def test_non_finite_params_or_momenta_are_stepped_as_torch_does():
    """Only the gradients are guarded (as APO-LR's check at θ): a non-finite θ or buffer is stepped as
    torch steps it."""
    theta, mom = torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([float("nan"), 0.5, 1.0])
    grad = torch.ones(3)
    expected = torchs_step([theta], [grad], [mom], LR, 0.9, 0.0, 1e-3, False, False)
    assert bool(op([theta], [grad], [mom], LR, 0.9, weight_decay=1e-3))
    for got, want in ((theta, expected[0][0]), (mom, expected[1][0])):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert not theta.isfinite().all() and not mom.isfinite().all()


def test_empty_lists_and_tensors():
    assert bool(op([], [], [], LR, 0.9))
    z = torch.zeros(0)
    assert bool(op([z], [z], [torch.zeros(0)], LR, 0.9))


def test_bad_inputs_are_refused_by_name_and_nothing_is_written():
    t, g, m = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    before = [t.clone(), g.clone(), m.clone()]

    def call(params=None, grads=None, momenta=None, lr=LR, momentum=0.9, dampening=0.0, weight_decay=0.0,
             nesterov=False):
        return op(params or [t], grads or [g], [m] if momenta is None else momenta, lr, momentum, dampening,
                  weight_decay, nesterov)

    same_length = "params and grads must have the same length and momenta one tensor per parameter"
    cases = [
        (dict(grads=[g, g]), ValueError, same_length),
        (dict(momenta=[]), ValueError, same_length),
        (dict(momentum=0.0), ValueError, same_length),  # a momentum buffer at momentum = 0
        (dict(grads=[torch.randn(4, 3)]), ValueError, r"grads\[0\] must have the shape of params\[0\]"),
        (dict(momenta=[torch.randn(12)]), ValueError, r"momenta\[0\] must have the shape of params\[0\]"),
        (dict(grads=[g.double()]), TypeError, r"grads\[0\] has dtype torch.float64 but params\[0\] has torch.float32"),
        (dict(params=[torch.ones(3, 4, dtype=torch.int64)]), TypeError, r"params\[0\] has dtype torch.int64"),
        (dict(momenta=[m.to_sparse()]), ValueError, r"momenta\[0\] must be a dense \(strided\) tensor"),
        (dict(params=[torch.randn(1, 4).expand(3, 4)]), ValueError, r"params\[0\] has elements that share memory"),
        (dict(momenta=[g]), ValueError, r"momenta\[0\] shares memory with grads\[0\]"),
        (dict(momenta=[t]), ValueError, r"params\[0\] shares memory with momenta\[0\]"),
        (dict(params=[t, t[1]], grads=[g, g[1]], momenta=[m, m[0]]), ValueError,
         r"params\[0\] shares memory with params\[1\]"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number >= 0, got nan"),
        (dict(lr=-0.1), ValueError, "lr must be a finite number >= 0"),
        (dict(momentum=-0.5), ValueError, "momentum must be a finite number >= 0"),
        (dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number >= 0"),
        (dict(dampening=float("nan")), ValueError, "dampening must be a finite number"),
        (dict(nesterov=True, dampening=0.1), ValueError, "nesterov requires momentum > 0 and dampening = 0"),
        (dict(nesterov=True, momentum=0.0, momenta=[]), ValueError, "nesterov requires momentum > 0"),
        # a meta tensor sends the call to the fake kernel, which names the lists
        (dict(momenta=[torch.empty(3, 4, device="meta")]), ValueError,
         r"params, grads, momenta: every tensor must be on one device"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kwargs)
        assert all(torch.equal(a, b) for a, b in zip((t, g, m), before)), kwargs


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    shapes = [((4, 3), torch.float32), ((7,), torch.float64)]
    params, grads, moms = ([fresh(s, d, gen) for s, d in shapes] for _ in range(3))
    torch.library.opcheck(torch.ops.apo.sgd_step.default, (params, grads, moms, LR, 0.9, 0.0, 1e-3, True, False))


def test_composite_kernel_is_torchs_step_too():
    """The composite kernel (CompositeExplicitAutograd: what CUDA and every other device run), reached
    on CPU tensors by redispatching to its key: torch's step bit for bit (ATen's ops, torch's order),
    nothing written on a non-finite gradient, the same refusals."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    redispatch = torch.ops.apo.sgd_step.default.redispatch
    gen = torch.Generator().manual_seed(4)
    thetas = [fresh((33, 5), torch.float32, gen), fresh((200003,), torch.float32, gen),
              fresh((7,), torch.float64, gen), fresh((9,), torch.bfloat16, gen)]
    grads = [fresh(t.shape, t.dtype, gen) for t in thetas]
    moms = [fresh(t.shape, t.dtype, gen) for t in thetas]
    for hyper in [(0.9, 0.1, 1e-3, False, True), (0.9, 0.0, 0.0, True, False)]:
        ps, ms = [t.clone() for t in thetas], [m.clone() for m in moms]
        expected = torchs_step(ps, grads, ms, LR, *hyper)
        assert bool(redispatch(composite, ps, grads, ms, LR, *hyper))
        assert all(torch.equal(a, b) for a, b in zip(ps + ms, expected[0] + expected[1]))
    bad = [g.clone() for g in grads]
    bad[1][-1] = float("nan")
    ps, ms = [t.clone() for t in thetas], [m.clone() for m in moms]
    assert not bool(redispatch(composite, ps, bad, ms, LR, 0.9, 0.0, 0.0, False, False))
    assert all(torch.equal(a, b) for a, b in zip(ps + ms, thetas + moms))
    assert bool(redispatch(composite, [], [], [], LR, 0.9, 0.0, 0.0, False, False))
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with momenta\[0\]"):
        redispatch(composite, ps[:1], grads[:1], ps[:1], LR, 0.9, 0.0, 0.0, False, False)

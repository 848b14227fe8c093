"""The fused momentum step with bias gradients: ``precondition_momentum_grouped(..., bias_grads=...)``.

A layer with a bias gradient b (m,) has the gradient matrix G = [g | b], g its first n − 1 columns:
the op reads g and b as they are (a linear or conv layer's weight and bias gradients, no
concatenation). Oracle: the same call on the concatenated matrix, whose v and Y
tests/test_momentum_op.py holds to float64 and to SGD's rounding bit for bit. v here is bit for
bit ``m.mul(μ).add_(G)`` and Y bit for bit that call's (one v, the same kernels), for every dtype
and backend; one float64 check of Y (1e-10, float32 1e-5 as tests/test_op.py's TOL) on top. The
registered op's composite kernel (the GPU's) gives the CPU kernel's v bit for bit and its Y to
float32 rounding.
"""
import math

import pytest
import torch

import apo_kernels
from apo_kernels.ops import reference
from conftest import backend_skip_reason, cpu_backends
from test_momentum_op import ENTRY_POINTS, MU, assert_refused_untouched, flag_pair, nan_like, skip_unsupported
from test_op import TOL

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (m, n) of the whole matrix, whether the layer has a bias column, (A None, B None)
LAYERS = [
    ((37, 6), True, (False, False)),
    ((300, 9), False, (True, False)),  # no bias in a call with biases
    ((3, 2), True, (False, True)),
    ((2000, 33), True, (True, False)),  # tall, identity A: the CPU kernel's blocks of 992 rows
    ((4, 1), True, (False, False)),  # the bias column alone: g is (4, 0)
    ((5, 7), True, (True, True)),
]


def make(layers, dtype, strided_bias=False):
    """(weight grads, bias grads, momenta, As, Ss, Bs) for ``layers``; a strided bias gradient is a
    column of a wider matrix."""
    gs, bs, ms, As, Ss, Bs = [], [], [], [], [], []
    for (m, n), bias, (no_a, no_b) in layers:
        gs.append(torch.randn(m, n - 1 if bias else n).to(dtype))
        b = torch.randn(m, 3)[:, 1] if strided_bias else torch.randn(m)
        bs.append(b.to(dtype) if bias else None)
        ms.append(torch.randn(m, n).to(dtype))
        As.append(None if no_a else (torch.eye(m) + torch.randn(m, m) / m**0.5).to(dtype))
        Ss.append((torch.rand(m, n) + 0.5).to(dtype))
        Bs.append(None if no_b else (torch.eye(n) + torch.randn(n, n) / n**0.5).to(dtype))
    return gs, bs, ms, As, Ss, Bs


def whole(gs, bs):
    return [g if b is None else torch.cat([g, b.unsqueeze(1)], dim=1) for g, b in zip(gs, bs)]


def call(backend, gs, bs, ms, As, Ss, Bs, carry=False, out=None):
    vs = nan_like(ms)
    out = nan_like(ms) if out is None else out
    flags = apo_kernels.precondition_momentum_grouped(gs, ms, MU, As, Ss, Bs, vs=vs, out=out, carry=carry,
                                                      bias_grads=bs, backend=backend)
    return flag_pair(flags, gs), vs, out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided_bias", [False, True], ids=["bias", "strided-bias"])
def test_bias_column_is_the_concatenated_matrix(backend, dtype, strided_bias):
    skip_unsupported(backend, dtype)
    gs, bs, ms, As, Ss, Bs = make(LAYERS, dtype, strided_bias)
    flags, vs, out = call(backend, gs, bs, ms, As, Ss, Bs)
    Gs = whole(gs, bs)
    want_flags, want_vs, want_out = call(backend, Gs, None, ms, As, Ss, Bs)
    assert flags == want_flags == (True, True)
    for i, (v, y, G, M) in enumerate(zip(vs, out, Gs, ms)):
        assert torch.equal(v, M.mul(MU).add_(G)), f"layer {i}: v is not SGD's rounding"
        assert torch.equal(v, want_vs[i]) and torch.equal(y, want_out[i]), f"layer {i}"
    if dtype in TOL:
        for i, (y, v, A, S, B) in enumerate(zip(out, vs, As, Ss, Bs)):
            y64 = reference.precondition(v.double(), *(None if t is None else t.double() for t in (A, S, B)))
            err = ((y.double() - y64).norm() / y64.norm()).item()
            assert err <= TOL[dtype], f"layer {i}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


@pytest.mark.parametrize("backend", cpu_backends())
def test_carried_step_with_a_bias_column(backend):
    """carry=True: out = μ·out + Y([g | b]), as with the concatenated matrix."""
    gs, bs, ms, As, Ss, Bs = make(LAYERS, torch.float32)
    held = [torch.randn(M.shape) for M in ms]
    got = call(backend, gs, bs, ms, As, Ss, Bs, carry=True, out=[h.clone() for h in held])
    want = call(backend, whole(gs, bs), None, ms, As, Ss, Bs, carry=True, out=[h.clone() for h in held])
    assert got[0] == want[0] == (True, True)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (interpreted Triton: inf·0)
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_bias_gradient_is_flagged(backend, value):
    gs, bs, ms, As, Ss, Bs = make(LAYERS, torch.float32)
    bs[3][1999] = value  # the last row of the tall layer's last block
    flags, _, _ = call(backend, gs, bs, ms, As, Ss, Bs)
    assert flags[0] is False


@pytest.mark.parametrize("carry", [False, True], ids=["Y(v)", "carried"])
def test_composite_kernel_takes_bias_columns(carry):
    """The registered op's composite kernel (CompositeExplicitAutograd: every device but CPU, a GPU's
    included), run here on CPU tensors by redispatch, gives the CPU kernel's v and flags and its Y to
    float32 rounding."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    op = torch.ops.apo.precondition_momentum_grouped.default
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    gs, bs, ms, As, Ss, Bs = make(LAYERS, torch.float32)
    held = [torch.randn(M.shape) for M in ms]
    results = []
    for run in (lambda *a: op.redispatch(composite, *a), op):
        vs, out = nan_like(ms), [h.clone() for h in held]
        results.append((flag_pair(run(gs, ms, MU, As, Ss, Bs, vs, out, carry, bs), gs), vs, out))
    (flags, vs, out), (want_flags, want_vs, want_out) = results
    assert flags == want_flags == (True, True)
    for i in range(len(ms)):
        assert torch.equal(vs[i], want_vs[i]), f"layer {i}: v"
        torch.testing.assert_close(out[i], want_out[i], rtol=1e-5, atol=1e-6, msg=f"layer {i}: Y")


def test_all_none_bias_grads_is_no_bias():
    gs, _, ms, As, Ss, Bs = make([((5, 4), False, (False, False))], torch.float32)
    a = call("cpu", gs, [None], ms, As, Ss, Bs)
    b = call("cpu", gs, None, ms, As, Ss, Bs)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2]))


# ---------------------------------------------------------------------------------------------
# Refusals: the public function (every backend) and the registered op, same messages, nothing written
# ---------------------------------------------------------------------------------------------
def _args():
    gs, bs, ms, As, Ss, Bs = make([((3, 5), True, (False, False)), ((2, 4), False, (True, False))],
                                  torch.float32)
    return dict(gs=gs, bs=bs, ms=ms, As=As, Ss=Ss, Bs=Bs, vs=[torch.zeros_like(m) for m in ms],
                out=[torch.zeros_like(m) for m in ms])


def _set(key, i, make_value):
    def edit(a):
        a[key][i] = make_value(a)
    return edit


ERRORS = {
    "bias-too-short": (lambda a: a.update(bs=a["bs"][:1]), ValueError,
                       r"bias_grads must have one entry per layer \(2\), got 1"),
    "bias-wrong-length": (_set("bs", 0, lambda a: torch.zeros(4)), ValueError,
                          r"layer 0: bias_grad must have shape \(m,\), one value per row of grad \(3\), got shape \(4,\)"),
    "bias-2d": (_set("bs", 0, lambda a: torch.zeros(3, 1)), ValueError,
                r"layer 0: bias_grad must have shape \(m,\).*got shape \(3, 1\)"),
    "bias-wrong-dtype": (_set("bs", 0, lambda a: torch.zeros(3, dtype=torch.float64)), TypeError,
                         r"layer 0: bias_grad has dtype torch.float64 but grad has torch.float32"),
    "bias-int": (_set("bs", 0, lambda a: torch.zeros(3, dtype=torch.int64)), TypeError,
                 r"layer 0: bias_grad has dtype torch.int64; supported dtypes"),
    "grad-3d": (_set("gs", 0, lambda a: torch.zeros(3, 4, 1)), ValueError,
                r"layer 0: grad with a bias_grad must be 2-D \(m, n - 1\), got shape \(3, 4, 1\)"),
    "momenta-without-bias-column": (_set("ms", 0, lambda a: torch.zeros(3, 4)), ValueError,
                                    r"layer 0: momenta must have the shape of the matrix \[grad \| bias_grad\] "
                                    r"\(3, 5\), got shape \(3, 4\)"),
    "vs-without-bias-column": (_set("vs", 0, lambda a: torch.zeros(3, 4)), ValueError,
                               r"layer 0: vs must have the shape of grad \(3, 5\), got \(3, 4\)"),
    "S-without-bias-column": (_set("Ss", 0, lambda a: torch.ones(3, 4)), ValueError,
                              r"layer 0: S must have shape \(3, 5\)"),
    "vs-shares-bias": (_set("bs", 0, lambda a: a["vs"][1].view(-1)[:3]), ValueError,
                       r"vs\[1\] shares memory with bias_grads\[0\]"),
}


def _entry(where):
    if where == "op":
        def op(gs, bs, ms, As, Ss, Bs, vs, out):
            return torch.ops.apo.precondition_momentum_grouped(gs, ms, MU, As, Ss, Bs, vs, out, False, bs)
        return op

    def public(gs, bs, ms, As, Ss, Bs, vs, out):
        return apo_kernels.precondition_momentum_grouped(gs, ms, MU, As, Ss, Bs, vs=vs, out=out, bias_grads=bs,
                                                         backend=where)
    return public


@pytest.mark.parametrize("where", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_bias_arguments_are_refused(where, case):
    edit, exc, message = ERRORS[case]
    a = _args()
    edit(a)
    assert_refused_untouched(
        lambda: _entry(where)(a["gs"], a["bs"], a["ms"], a["As"], a["Ss"], a["Bs"], a["vs"], a["out"]),
        a["vs"] + a["out"], exc, message)


def test_bias_grads_must_be_a_list():
    a = _args()
    with pytest.raises(TypeError, match="bias_grads must be a list or tuple of tensors or None, got Tensor"):
        apo_kernels.precondition_momentum_grouped(a["gs"], a["ms"], MU, a["As"], a["Ss"], a["Bs"], vs=a["vs"],
                                                  out=a["out"], bias_grads=a["bs"][0])


def test_registered_op_with_bias_grads_passes_opcheck():
    """The fake kernel takes bias_grads (schema ``Tensor?[]? bias_grads=None``), checks them and gives
    the flags' shape: opcheck passes (schema, fake, mutations of vs and out)."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    gs, bs, ms, As, Ss, Bs = make(LAYERS[:3], torch.float32)
    args = (gs, ms, MU, As, Ss, Bs, nan_like(ms), nan_like(ms), False, bs)
    torch.library.opcheck(torch.ops.apo.precondition_momentum_grouped.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        g, m, s, v, o = torch.empty(5, 3), torch.empty(5, 4), torch.empty(5, 4), torch.empty(5, 4), torch.empty(5, 4)
        with pytest.raises(ValueError, match=r"layer 0: bias_grad must have shape \(m,\)"):
            torch.ops.apo.precondition_momentum_grouped([g], [m], MU, [None], [s], [None], [v], [o], False,
                                                        [torch.empty(4)])

"""The public op on every backend that runs on CPU tensors, against the float64 reference.

Tolerances (relative Frobenius error vs float64 on the same, already-rounded inputs):
float64 1e-10, float32 1e-5; float16/bfloat16: the "fp32 accumulation, rounded once" contract of
tests/_contract.py (within u of the oracle, and below 0.8x the torch chain's own error in that
dtype), for forward, backward, batched and grouped.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import _contract
import apo_kernels
from apo_kernels.ops import reference
from apo_kernels.ops.backends import get
from conftest import cpu_backends

SHAPES = [(1, 1), (1, 7), (7, 1), (17, 129), (64, 64), (257, 63), (130, 500)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # half precision: tests/_contract.py
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASKS = [(True, True, True, True), (False, True, True, True), (True, False, False, False), (False, False, True, False)]


def make_layer(m, n, dtype, batch=None, requires_grad=False):
    """Random inputs on the scale APO sees them: A, B near identity, S positive."""
    lead = () if batch is None else (batch,)
    G = torch.randn(*lead, m, n)
    A = torch.eye(m) + torch.randn(*lead, m, m) / m**0.5
    S = torch.rand(*lead, m, n) + 0.5
    B = torch.eye(n) + torch.randn(*lead, n, n) / n**0.5
    return [t.to(dtype).requires_grad_(requires_grad) for t in (G, A, S, B)]


def ids(shape):
    return "x".join(map(str, shape))


def check_close(out, ref, dtype, chain=None, what="", backend=None):
    """out vs the float64 ``ref``; ``chain``: the same output by the torch formulas in ``dtype``
    (required for half precision). Interpreted Triton stores bfloat16 rounded toward zero."""
    truncated = backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    policy = _contract.TRUNCATED_ONCE if truncated else _contract.policy(backend, dtype)
    _contract.check(out, ref, dtype, TOL.get(dtype), chain=chain, what=what, policy=policy)


def skip_unsupported(backend, dtype, m, n):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend has no float64 (its kernels are fp32/fp16/bf16; tested to raise TypeError)")
    # Triton's interpreter runs a 512³ matmul in ~1.7 s: keep the biggest shapes to compiled backends.
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and m * n > 20000:
        pytest.skip("shape too large for Triton's interpreter in CI time; covered on GPU")


# ---------------------------------------------------------------------------------------------
# Forward / backward against float64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_forward_matches_float64(backend, dtype, shape):
    skip_unsupported(backend, dtype, *shape)
    G, A, S, B = make_layer(*shape, dtype)
    out = apo_kernels.precondition(G, A, S, B, backend=backend)
    assert out.shape == G.shape and out.dtype == dtype
    ref = reference.precondition(*(t.double() for t in (G, A, S, B)))
    check_close(out, ref, dtype, chain=reference.precondition(G, A, S, B), what="Y", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (17, 129), (64, 64), (257, 63)], ids=ids)
def test_backward_matches_float64(backend, dtype, shape):
    skip_unsupported(backend, dtype, *shape)
    G, A, S, B = make_layer(*shape, dtype, requires_grad=True)
    dY = torch.randn(shape).to(dtype)
    apo_kernels.precondition(G, A, S, B, backend=backend).backward(dY)
    refs = reference.precondition_backward(*(t.detach().double() for t in (dY, G, A, S, B)))
    chains = reference.precondition_backward(*(t.detach() for t in (dY, G, A, S, B)))
    for name, t, ref, chain in zip("GASB", (G, A, S, B), refs, chains):
        assert t.grad is not None and t.grad.dtype == dtype, name
        check_close(t.grad, ref, dtype, chain=chain, what=f"d{name}", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_triton_rejects_float64_naming_the_argument(backend):
    if backend != "triton":
        pytest.skip("only the triton backend lacks float64")
    with pytest.raises(TypeError, match="grad.*float64"):
        apo_kernels.precondition(*make_layer(3, 4, torch.float64), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("GASB"[i] if b else "-" for i, b in enumerate(m)))
def test_backward_op_computes_only_the_mask(backend, mask):
    G, A, S, B = make_layer(17, 29, torch.float32)
    dY = torch.randn(17, 29)
    outs = apo_kernels.precondition_backward(dY, G, A, S, B, output_mask=mask, backend=backend)
    refs = reference.precondition_backward(*(t.double() for t in (dY, G, A, S, B)))
    for wanted, out, ref in zip(mask, outs, refs):
        if wanted:
            check_close(out, ref, torch.float32)
        else:
            assert out is None


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_batched_layers(backend, dtype):
    G, A, S, B = make_layer(13, 21, dtype, batch=3, requires_grad=True)
    dY = torch.randn(3, 13, 21).to(dtype)
    out = apo_kernels.precondition(G, A, S, B, backend=backend)
    out.backward(dY)
    ins = [t.detach() for t in (dY, G, A, S, B)]
    f64 = [t.double() for t in ins]
    check_close(out, reference.precondition(*f64[1:]), dtype, chain=reference.precondition(*ins[1:]), what="Y",
                backend=backend)
    chains = reference.precondition_backward(*ins)
    for name, t, ref, chain in zip("GASB", (G, A, S, B), reference.precondition_backward(*f64), chains):
        check_close(t.grad, ref, dtype, chain=chain, what=f"d{name}", backend=backend)


GROUP = [(1, 1), (7, 1), (1, 7), (17, 129), (64, 64), (33, 20), (5, 5)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_grouped_matches_float64(backend, dtype):
    layers = [make_layer(m, n, dtype, requires_grad=True) for m, n in GROUP]
    grads, As, Ss, Bs = (list(x) for x in zip(*layers))
    outs = apo_kernels.precondition_grouped(grads, As, Ss, Bs, backend=backend)
    dYs = [torch.randn(o.shape).to(dtype) for o in outs]
    torch.autograd.backward(outs, dYs)
    for i, (out, dY) in enumerate(zip(outs, dYs)):
        ins = [t.detach() for t in (dY, grads[i], As[i], Ss[i], Bs[i])]
        f64 = [t.double() for t in ins]
        check_close(out, reference.precondition(*f64[1:]), dtype, chain=reference.precondition(*ins[1:]),
                    what=f"layer {i}: Y", backend=backend)
        layer = (grads[i], As[i], Ss[i], Bs[i])
        chains = reference.precondition_backward(*ins)
        for name, t, ref, chain in zip("GASB", layer, reference.precondition_backward(*f64), chains):
            check_close(t.grad, ref, dtype, chain=chain, what=f"layer {i}: d{name}", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_grouped_backward_meta_gradient(backend):
    layers = [make_layer(m, n, torch.float32) for m, n in GROUP]
    grads, As, Ss, Bs = (list(x) for x in zip(*layers))
    dYs = [torch.randn_like(g) for g in grads]
    d_grads, dAs, dSs, dBs = apo_kernels.precondition_grouped_backward(dYs, grads, As, Ss, Bs, backend=backend)
    assert d_grads == []
    for i in range(len(GROUP)):
        refs = reference.precondition_backward(*(t.double() for t in (dYs[i], grads[i], As[i], Ss[i], Bs[i])))
        for out, ref in zip((dAs[i], dSs[i], dBs[i]), refs[1:]):
            check_close(out, ref, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_and_transposed_inputs(backend):
    G, A, S, B = make_layer(23, 11, torch.float32)
    Gt = G.T.contiguous().T  # same values, transposed strides
    A2 = torch.randn(23, 46)[:, ::2]  # strided view
    A2.copy_(A)
    out = apo_kernels.precondition(Gt, A2, S.T.contiguous().T, B.T.contiguous().T, backend=backend)
    check_close(out, reference.precondition(*(t.double() for t in (G, A, S, B))), torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_widths_around_simd_multiples(backend, dtype):
    """Widths just below, at and above multiples of 16, where the CPU kernel computes a layer with
    both factors at a padded width: single and grouped, B row- or column-major, against float64."""
    skip_unsupported(backend, dtype, 70, 129)
    shapes = [(5, 15), (9, 16), (12, 17), (40, 31), (33, 33), (3, 47), (70, 129), (1, 2)]
    layers = [make_layer(m, n, dtype) for m, n in shapes]
    for k, (G, A, S, B) in enumerate(layers):
        if k % 2:
            layers[k][3] = B.T.contiguous().T  # same values, column-major
    grouped = apo_kernels.precondition_grouped(*(list(t) for t in zip(*layers)), backend=backend)
    for (G, A, S, B), out_grouped in zip(layers, grouped):
        ref = reference.precondition(*(t.double() for t in (G, A, S, B)))
        out = apo_kernels.precondition(G, A, S, B, backend=backend)
        assert out.shape == G.shape and out.is_contiguous()
        check_close(out, ref, dtype, backend=backend)
        check_close(out_grouped, ref, dtype, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=ids)
def test_zero_size_dims(backend, shape):
    G, A, S, B = make_layer(*shape, torch.float32, requires_grad=True)
    out = apo_kernels.precondition(G, A, S, B, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert A.grad.shape == A.shape and B.grad.shape == B.shape
    batched = make_layer(3, 4, torch.float32, batch=0)
    assert apo_kernels.precondition(*batched, backend=backend).shape == (0, 3, 4)
    assert apo_kernels.precondition_grouped([], [], [], [], backend=backend) == []


def _round_every_gemm(dtype):
    """The op's formulas with every GEMM (and ⊙) result rounded to ``dtype``: what the half
    contract must reject."""
    def r(x):
        return x.to(dtype).float()

    def forward(G, A, S, B):
        return r(r(A @ r(S * r(A.T @ r(G @ B)))) @ B.T)

    def backward(dY, G, A, S, B):
        GB, dYB = r(G @ B), r(dY @ B)
        H, D = r(A.T @ GB), r(A.T @ dYB)
        M, E = r(S * H), r(S * D)
        AE, AM = r(A @ E), r(A @ M)
        return (r(AE @ B.T), r(r(dYB @ M.T) + r(GB @ E.T)), r(D * H), r(r(dY.T @ AM) + r(G.T @ AE)))

    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 64), (17, 129)], ids=ids)
def test_half_contract_rejects_rounding_every_gemm(dtype, shape):
    """The half-precision contract passes fp32 computation rounded once, and fails an
    implementation that rounds every intermediate to half (its error is the torch chain's)."""
    G, A, S, B = make_layer(*shape, dtype)
    dY = torch.randn(shape).to(dtype)
    ins = [t.float() for t in (dY, G, A, S, B)]
    f64 = [t.double() for t in ins]
    oracle = [reference.precondition(*f64[1:]), *reference.precondition_backward(*f64)]
    chain = [reference.precondition(G, A, S, B), *reference.precondition_backward(dY, G, A, S, B)]
    once = [reference.precondition(*ins[1:]).to(dtype), *(o.to(dtype) for o in reference.precondition_backward(*ins))]
    forward, backward = _round_every_gemm(dtype)
    every = [forward(*ins[1:]).to(dtype), *(o.to(dtype) for o in backward(*ins))]
    for name, o, ref, c, bad in zip(("Y", "dG", "dA", "dS", "dB"), once, oracle, chain, every):
        _contract.check_half(o, ref, c, dtype, name)
        with pytest.raises(AssertionError, match="intermediates are rounded"):
            _contract.check_half(bad, ref, c, dtype, name)


# ---------------------------------------------------------------------------------------------
# Autograd, torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_gradcheck_float64(backend):
    # first and second derivatives: a double backward (create_graph=True) runs the reference
    # formulas, which autograd differentiates (the fused backward has no derivative of its own)
    inputs = make_layer(4, 6, torch.float64, requires_grad=True)
    single = lambda *t: apo_kernels.precondition(*t, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(single, inputs)
    assert torch.autograd.gradgradcheck(single, inputs)
    layers = [make_layer(m, n, torch.float64, requires_grad=True) for m, n in [(3, 2), (1, 4)]]
    flat = [t for layer in layers for t in layer]

    def grouped(*flat):
        per = [flat[i : i + 4] for i in range(0, len(flat), 4)]
        return tuple(apo_kernels.precondition_grouped(*(list(x) for x in zip(*per)), backend=backend))

    assert torch.autograd.gradcheck(grouped, flat)
    assert torch.autograd.gradgradcheck(grouped, flat)


# torch.func's own transforms call torch.jit.script, which this torch deprecates
@pytest.mark.filterwarnings("ignore:`torch.jit.script")
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_torch_func_transforms_run_the_reference_formulas(backend):
    # torch.library's autograd does not support torch.func transforms: under one, the public
    # functions run the plain-torch reference, so grad, jacrev, hessian and vmap give its values
    G, A, S, B = make_layer(4, 6, torch.float64)
    Gs = torch.randn(3, 4, 6, dtype=torch.float64)

    def y(g, a, s, b):
        return apo_kernels.precondition(g, a, s, b, backend=backend)

    def y_grouped(g, a, s, b):  # a None factor on the second layer
        return torch.cat([t.reshape(-1) for t in apo_kernels.precondition_grouped(
            [g, g[:2, :3]], [a, None], [s, s[:2, :3]], [b, b[:3, :3]], backend=backend)])

    def ref(g, a, s, b):
        return reference.precondition(g, a, s, b)

    def ref_grouped(g, a, s, b):
        return torch.cat([reference.precondition(g, a, s, b).reshape(-1),
                          reference.precondition(g[:2, :3], None, s[:2, :3], b[:3, :3]).reshape(-1)])

    for ours, theirs in ((y, ref), (y_grouped, ref_grouped)):
        torch.testing.assert_close(torch.func.grad(lambda s: ours(G, A, s, B).square().sum())(S),
                                   torch.func.grad(lambda s: theirs(G, A, s, B).square().sum())(S))
        torch.testing.assert_close(torch.func.jacrev(ours, argnums=(1, 3))(G, A, S, B),
                                   torch.func.jacrev(theirs, argnums=(1, 3))(G, A, S, B))
        torch.testing.assert_close(torch.func.hessian(lambda a: ours(G, a, S, B).square().sum())(A),
                                   torch.func.hessian(lambda a: theirs(G, a, S, B).square().sum())(A))
        torch.testing.assert_close(torch.vmap(lambda g: ours(g, A, S, B))(Gs),
                                   torch.stack([theirs(g, A, S, B) for g in Gs]))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_public_backward_functions_are_differentiable(backend):
    # called with inputs that require grad in grad mode, the public backward functions give
    # results autograd can differentiate: here checked against finite differences
    layer = make_layer(4, 6, torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def single(grad_out, *t):
        return tuple(o for o in apo_kernels.precondition_backward(grad_out, *t, output_mask=(True,) * 4,
                                                                   backend=backend) if o is not None)

    assert torch.autograd.gradcheck(single, (grad_out, *layer))

    def grouped(grad_out, *t):
        outs = apo_kernels.precondition_grouped_backward([grad_out], *([x] for x in t), output_mask=(True,) * 4,
                                                         backend=backend)
        return tuple(o[0] for o in outs)

    assert torch.autograd.gradcheck(grouped, (grad_out, *layer))


def registered_op_families():
    """One backend per family of registered (torch.library) ops in the registry, for CPU tensors
    (cpu and cuda share the native ops; the reference is plain torch, no registered op)."""
    by_family = {}
    for p in cpu_backends():
        family = get(p.values[0]).family
        if family is None or family is reference.FAMILY:
            continue
        kept = by_family.get(id(family))
        if kept is None or (kept.marks and not p.marks):  # a backend that runs here wins
            by_family[id(family)] = p
    return list(by_family.values())


@pytest.mark.parametrize("backend", registered_op_families())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_every_registered_op(backend, dtype):
    fam = get(backend).family
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's tl.dot has no float64")
    G, A, S, B = make_layer(5, 3, dtype, requires_grad=True)
    dY = torch.randn(5, 3, dtype=dtype)
    torch.library.opcheck(fam.forward, (G, A, S, B))
    Gb, Ab, Sb, Bb = make_layer(4, 3, dtype, batch=2, requires_grad=True)
    torch.library.opcheck(fam.forward, (Gb, Ab, Sb, Bb))
    detached = [t.detach() for t in (G, A, S, B)]
    for mask in ([True] * 4, [False, True, True, True]):
        torch.library.opcheck(fam.backward, (dY, *detached, mask))
    layers = [make_layer(m, n, dtype, requires_grad=True) for m, n in [(3, 2), (1, 4), (6, 6)]]
    lists = [list(x) for x in zip(*layers)]
    torch.library.opcheck(fam.grouped, tuple(lists))
    dYs = [torch.randn_like(g) for g in lists[0]]
    det = [[t.detach() for t in ts] for ts in lists]
    torch.library.opcheck(fam.grouped_backward, (dYs, *det, [False, True, True, True]))


def saved_by_autograd(fn):
    """The tensors autograd saves while ``fn()`` builds its graph, by storage address."""
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


# which inputs the backward reads for each needed gradient (the formulas in reference.py)
SAVED_WHEN_ONLY = {"G": "ASB", "A": "GASB", "S": "GAB", "B": "GASB"}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("needed", list(SAVED_WHEN_ONLY))
def test_autograd_saves_only_what_the_backward_reads(backend, needed):
    """The registered autograd saves, per input needing a gradient, only the inputs its backward
    formula reads, and the gradient is still right with the others unsaved."""
    if backend == "reference":
        pytest.skip("reference: plain torch autograd decides what it saves")
    ins = make_layer(6, 5, torch.float32)
    named = dict(zip("GASB", ins))
    named[needed].requires_grad_()
    dY = torch.randn(6, 5)
    out, saved = saved_by_autograd(lambda: apo_kernels.precondition(*ins, backend=backend))
    assert sorted(saved) == sorted(named[k].data_ptr() for k in SAVED_WHEN_ONLY[needed])
    out.backward(dY)
    refs = dict(zip("GASB", reference.precondition_backward(*(t.detach().double() for t in (dY, *ins)))))
    check_close(named[needed].grad, refs[needed], torch.float32)

    layers = [make_layer(m, n, torch.float32) for m, n in [(3, 2), (4, 4)]]
    lists = [list(x) for x in zip(*layers)]
    k = "GASB".index(needed)
    for t in lists[k]:
        t.requires_grad_()
    outs, saved = saved_by_autograd(lambda: apo_kernels.precondition_grouped(*lists, backend=backend))
    expected = [t.data_ptr() for name in SAVED_WHEN_ONLY[needed] for t in lists["GASB".index(name)]]
    assert sorted(saved) == sorted(expected)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for i, t in enumerate(lists[k]):
        ref = reference.precondition_backward(*(x.detach().double() for x in (torch.ones_like(outs[i]), *layers[i])))[k]
        check_close(t.grad, ref, torch.float32)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_torch_compile_fullgraph(backend):
    def step(G, A, S, B):
        Y = apo_kernels.precondition(G, A, S * S, B, backend=backend)
        return (Y * Y).sum()

    compiled = torch.compile(step, fullgraph=True)
    inputs = make_layer(9, 5, torch.float32, requires_grad=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_loss = step(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    check_close(loss, ref_loss, torch.float32)
    for g, r in zip(grads, ref_grads):
        check_close(g, r, torch.float32)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------
def test_kronecker_identity_3x4():
    G, A, S, B = make_layer(3, 4, torch.float64)
    P = reference.preconditioner_matrix(A, S, B)
    Y = apo_kernels.precondition(G, A, S, B)
    torch.testing.assert_close(Y.reshape(-1), P @ G.reshape(-1), rtol=1e-12, atol=1e-12)


dims = st.integers(min_value=1, max_value=12)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 2**31 - 1))
def test_properties(backend, m, n, seed):
    torch.manual_seed(seed)
    G, A, S, B = make_layer(m, n, torch.float64)
    # identity φ returns G
    eye = apo_kernels.precondition(G, torch.eye(m, dtype=torch.float64), torch.ones_like(G),
                                   torch.eye(n, dtype=torch.float64), backend=backend)
    torch.testing.assert_close(eye, G)
    # linear in G
    G2 = torch.randn_like(G)
    lhs = apo_kernels.precondition(2.5 * G - G2, A, S, B, backend=backend)
    rhs = 2.5 * apo_kernels.precondition(G, A, S, B, backend=backend) - apo_kernels.precondition(G2, A, S, B, backend=backend)
    torch.testing.assert_close(lhs, rhs)
    # with S squared the preconditioner is PSD: ⟨G, P G⟩ ≥ 0
    S_signed = torch.randn_like(S)
    inner = (G * apo_kernels.precondition(G, A, S_signed * S_signed, B, backend=backend)).sum()
    assert inner >= -1e-10 * G.norm() ** 2


# ---------------------------------------------------------------------------------------------
# Backend choice and bad input
# ---------------------------------------------------------------------------------------------
def test_backends_report_every_backend():
    status = apo_kernels.backends()
    assert set(status) == {"cuda", "triton", "cpu", "reference"}
    assert status["reference"] == "available"
    for name, text in status.items():
        assert text.startswith("available") or text.startswith("unavailable: "), (name, text)
    if not torch.cuda.is_available():
        assert status["cuda"].startswith("unavailable")


def test_required_backends_are_built():
    """CI sets APO_REQUIRE_BACKENDS so that a broken build fails instead of skipping."""
    required = [b for b in os.environ.get("APO_REQUIRE_BACKENDS", "").split(",") if b]
    if not required:
        pytest.skip("APO_REQUIRE_BACKENDS not set (CI sets it)")
    status = apo_kernels.backends()
    missing = {b: status[b] for b in required if not status[b].startswith("available")}
    assert not missing


def test_env_var_forces_backend(monkeypatch):
    G, A, S, B = make_layer(3, 4, torch.float32)
    monkeypatch.setenv("APO_KERNELS_BACKEND", "reference")
    assert apo_kernels.ops.resolve_backend("auto", G.device) == "reference"
    monkeypatch.setenv("APO_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="APO_KERNELS_BACKEND"):
        apo_kernels.precondition(G, A, S, B)


def test_unavailable_backend_says_why():
    G, A, S, B = make_layer(3, 4, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        apo_kernels.precondition(G, A, S, B, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        apo_kernels.precondition(G, A, S, B, backend="fast")


BAD_INPUTS = {
    "1-D grad": (lambda G, A, S, B: (G[0], A, S, B), ValueError, "grad must be 2-D"),
    "4-D grad": (lambda G, A, S, B: (G[None, None], A, S, B), ValueError, "grad must be 2-D"),
    "integer dtype": (lambda G, A, S, B: (G.long(), A, S, B), TypeError, "grad has dtype torch.int64"),
    "mixed dtypes": (lambda G, A, S, B: (G, A.double(), S, B), TypeError, "A has dtype"),
    "wrong A shape": (lambda G, A, S, B: (G, A[:, :-1], S, B), ValueError, "A must have shape"),
    "wrong S shape": (lambda G, A, S, B: (G, A, S.T, B), ValueError, "S must have shape"),
    "wrong B shape": (lambda G, A, S, B: (G, A, S, B[:-1, :-1]), ValueError, "B must have shape"),
    "A ndim differs": (lambda G, A, S, B: (G, A[None], S, B), ValueError, "A must have 2 dims"),
    "sparse B": (lambda G, A, S, B: (G, A, S, B.to_sparse()), ValueError, "B must be a dense"),
    "broadcastable S": (lambda G, A, S, B: (G, A, S[:1], B), ValueError, "S must have shape"),
    "device mismatch": (lambda G, A, S, B: (G, A.to("meta"), S, B), ValueError, "A is on meta"),
    "not a tensor": (lambda G, A, S, B: (G, A.tolist(), S, B), TypeError, "A must be a torch.Tensor"),
    "batch mismatch": (
        lambda G, A, S, B: (G.expand(3, -1, -1), A.expand(2, -1, -1), S.expand(3, -1, -1), B.expand(3, -1, -1)),
        ValueError, "batch size",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    make, exc, msg = BAD_INPUTS[case]
    args = make(*make_layer(4, 3, torch.float32))
    with pytest.raises(exc, match=msg):
        apo_kernels.precondition(*args)
    with pytest.raises(exc, match=msg):
        apo_kernels.precondition_backward(torch.zeros(4, 3), *args) if case != "1-D grad" else apo_kernels.precondition(*args)


def test_bad_backward_and_grouped_input():
    G, A, S, B = make_layer(4, 3, torch.float32)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        apo_kernels.precondition_backward(torch.zeros(3, 4), G, A, S, B)
    with pytest.raises(ValueError, match="output_mask"):
        apo_kernels.precondition_backward(G, G, A, S, B, output_mask=(True, True))
    with pytest.raises(TypeError, match="output_mask"):
        apo_kernels.precondition_backward(G, G, A, S, B, output_mask=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="same length"):
        apo_kernels.precondition_grouped([G, G], [A], [S], [B])
    with pytest.raises(TypeError, match="grads must be a list"):
        apo_kernels.precondition_grouped(G, [A], [S], [B])
    with pytest.raises(ValueError, match="layer 1: grouped layers must be 2-D"):
        batched = make_layer(4, 3, torch.float32, batch=2)
        apo_kernels.precondition_grouped([G, batched[0]], [A, batched[1]], [S, batched[2]], [B, batched[3]])
    with pytest.raises(TypeError, match="layer 1: dtype"):
        apo_kernels.precondition_grouped([G, G.double()], [A, A.double()], [S, S.double()], [B, B.double()])
    with pytest.raises(ValueError, match="layer 0: S must have shape"):
        apo_kernels.precondition_grouped([G], [A], [S.T], [B])


def test_zero_size_and_empty_calls_check_their_arguments():
    G, A, S, B = make_layer(0, 3, torch.float32)
    for call in (
        lambda: apo_kernels.precondition(G, A, S, B, backend="fast"),
        lambda: apo_kernels.precondition_backward(G, G, A, S, B, backend="fast"),
        lambda: apo_kernels.precondition_grouped([], [], [], [], backend="fast"),
        lambda: apo_kernels.precondition_grouped_backward([], [], [], [], [], backend="fast"),
    ):
        with pytest.raises(ValueError, match="backend must be one of"):
            call()
    with pytest.raises(TypeError, match="grad_outs must be a list"):
        apo_kernels.precondition_grouped_backward(None, [G], [A], [S], [B])
    with pytest.raises(ValueError, match="output_mask"):
        apo_kernels.precondition_grouped_backward([], [], [], [], [], output_mask=(True,))


HUGE = 1 << 22  # (HUGE, HUGE) float32: 64 TiB, more than any machine's memory


def _expanded(*shape):
    return torch.ones(1).expand(*shape)  # valid shape, no memory


def test_result_too_big_for_memory_is_refused_before_allocation():
    big = [_expanded(HUGE, HUGE) for _ in range(4)]
    with pytest.raises(ValueError, match=f"grad of shape \\({HUGE}, {HUGE}\\): the result needs {4 * HUGE**2} bytes"):
        apo_kernels.precondition(*big)
    # the backward's result is what its mask asks for: dB (n, n) of a thin layer
    thin = [_expanded(1, HUGE), _expanded(1, HUGE), _expanded(1, 1), _expanded(1, HUGE), _expanded(HUGE, HUGE)]
    with pytest.raises(ValueError, match=f"output_mask=\\[False, False, False, True\\] needs {4 * HUGE**2} bytes"):
        apo_kernels.precondition_backward(*thin, output_mask=(False, False, False, True))
    with pytest.raises(ValueError, match="grads \\(2 layers\\): the result needs"):
        G, A, S, B = make_layer(3, 4, torch.float32)
        apo_kernels.precondition_grouped([G, big[0]], [A, big[1]], [S, big[2]], [B, big[3]])
    # the registered ops refuse it too (C++ kernels and the Triton ops), with the size
    ops = torch.ops.apo
    with pytest.raises(ValueError, match=f"needs {4 * HUGE**2} bytes"):
        ops.precondition(*big)
    with pytest.raises(ValueError, match=f"needs {4 * HUGE**2} bytes"):
        ops.precondition_backward(*thin, [False, False, False, True])
    if hasattr(ops, "triton_precondition"):
        with pytest.raises(ValueError, match=f"needs {4 * HUGE**2} bytes"):
            ops.triton_precondition(*big)


@pytest.mark.parametrize("backend", registered_op_families())
def test_registered_ops_check_their_inputs(backend):
    """Direct calls of torch.ops.apo.{,triton_}precondition* are refused like the public API's
    (the fuzz test, test_fuzz_ops.py, covers many more malformed calls in subprocesses)."""
    fam = get(backend).family
    fwd, bwd, grouped = fam.forward, fam.backward, fam.grouped
    G, A, S, B = make_layer(4, 3, torch.float32)
    with pytest.raises(ValueError, match="A must have shape \\(4, 4\\) for grad of shape \\(4, 3\\)"):
        fwd(G, torch.randn(3, 3), S, B)
    with pytest.raises(ValueError, match="S must have shape"):
        fwd(G, A, S[:1], B)  # broadcastable S
    with pytest.raises(ValueError, match="grad must be 2-D"):
        fwd(G[None, None], A, S, B)
    with pytest.raises(TypeError, match="A has dtype torch.int64"):
        fwd(G, A.long(), S, B)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        bwd(G.T, G, A, S, B, [True] * 4)
    # mixed dtypes across the layers of a grouped call
    G2, A2, S2, B2 = make_layer(2, 5, torch.float64)
    with pytest.raises(TypeError, match="layer 1: dtype torch.float64 differs"):
        grouped([G, G2], [A, A2], [S, S2], [B, B2])


@pytest.mark.parametrize("backend", registered_op_families())
def test_meta_input_mixed_with_cpu_is_refused(backend):
    """A meta tensor makes the Meta (fake) kernel win dispatch: it must refuse the mix, not return
    an uninitialized CPU tensor; all-meta calls still work (shape propagation)."""
    fam = get(backend).family
    fwd, grouped = fam.forward, fam.grouped
    G, A, S, B = make_layer(4, 3, torch.float32)
    with pytest.raises(ValueError, match="A is on meta but grad is on cpu"):
        fwd(G, A.to("meta"), S, B)
    with pytest.raises(ValueError, match="grad_out is on meta"):
        fam.backward(G.to("meta"), G, A, S, B, [True] * 4)
    with pytest.raises(ValueError, match="layer 1: S is on meta"):
        grouped([G, G], [A, A], [S, S.to("meta")], [B, B])
    meta = [t.to("meta") for t in (G, A, S, B)]
    with pytest.raises(ValueError, match="layer 1: device cpu differs from layer 0's meta"):
        grouped([meta[0], G], [meta[1], A], [meta[2], S], [meta[3], B])
    out = fwd(*meta)
    assert out.device.type == "meta" and out.shape == G.shape


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_torch_compile_reports_shape_errors_at_trace_time(backend):
    """The fake kernels check shapes with torch._check: a mismatch fails while tracing, with the
    message naming the argument, also with symbolic (dynamic) shapes."""
    def bad(G, A, S, B):
        return torch.ops.apo.precondition(G, A, S[:, :2], B)

    G, A, S, B = make_layer(5, 3, torch.float32)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="S must have shape"):
        torch.compile(bad, fullgraph=True, dynamic=True, backend="eager")(G, A, S, B)

    def good(G, A, S, B):
        return apo_kernels.precondition(G, A, S, B, backend=backend)

    compiled = torch.compile(good, fullgraph=True, dynamic=True)
    for m, n in [(5, 3), (7, 2)]:
        args = make_layer(m, n, torch.float32)
        check_close(compiled(*args), reference.precondition(*(t.double() for t in args)), torch.float32)


# ---------------------------------------------------------------------------------------------
# The public grouped call: the op checks every layer (no second pass in Python on the happy path),
# and a call the dispatcher refuses is still reported by name, the same way on every backend
# ---------------------------------------------------------------------------------------------
_GROUPED_MISTAKES = {
    "A a float": ("As", 1.0, TypeError, r"layer 0: A must be a torch\.Tensor, got float"),
    "S a list": ("Ss", [1.0, 2.0], TypeError, r"layer 0: S must be a torch\.Tensor, got list"),
    "A sparse": ("As", "sparse", ValueError, r"layer 0: A must be a dense \(strided\) tensor"),
    "A of the wrong shape": ("As", "wrong shape", ValueError, r"layer 0: A must have shape \(4, 4\)"),
    "S float64": ("Ss", "float64", TypeError, r"layer 0: S has dtype torch\.float64 but grad has torch\.float32"),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mistake", list(_GROUPED_MISTAKES))
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_public_grouped_call_names_a_bad_argument_on_every_backend(backend, mistake, grad_mode):
    slot, value, exc, message = _GROUPED_MISTAKES[mistake]
    G, S = torch.randn(4, 3, requires_grad=grad_mode), torch.rand(4, 3)
    lists = {"grads": [G], "As": [torch.eye(4)], "Ss": [S], "Bs": [None]}
    lists[slot] = [{"sparse": torch.eye(4).to_sparse(), "wrong shape": torch.eye(3),
                    "float64": S.double()}.get(value, value) if isinstance(value, str) else value]
    with torch.set_grad_enabled(grad_mode), pytest.raises(exc, match=message):
        apo_kernels.precondition_grouped(lists["grads"], lists["As"], lists["Ss"], lists["Bs"], backend=backend)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_torch_compile_fullgraph_grouped_without_grad(backend):
    """The grouped call with nothing to differentiate (an optimizer's step) traces too."""
    def step(G, A, S, B):
        return sum(y.sum() for y in apo_kernels.precondition_grouped([G, G[:2]], [A, None], [S, S[:2]], [B, B],
                                                                        backend=backend))

    inputs = make_layer(9, 5, torch.float32)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        check_close(compiled(*inputs), step(*inputs), torch.float32)
    check_close(compiled(*inputs), step(*inputs), torch.float32)

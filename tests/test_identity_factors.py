"""Identity factors: A=None / B=None on every backend, against the float64 reference with explicit eye.

Each backend runs with None factors (single, batched and grouped with None and matrices mixed per
layer; forward and backward for every output mask; autograd). The oracle is the float64 reference
on the same inputs with ``torch.eye`` in place of each None. Tolerances as in tests/test_op.py:
float64 1e-10, float32 1e-5 (relative Frobenius); float16/bfloat16 the "fp32 accumulation, rounded
once" contract of tests/_contract.py. When both factors are identity, Y, dG and dS are elementwise
products, which the plain torch chain also rounds only once: there only the oracle bound (within u)
applies, not the torch-chain bound.
"""
import os

import pytest
import torch

import _contract
import apo_kernels
from apo_kernels.ops import reference
from apo_kernels.ops.backends import get
from conftest import device_backends
from test_op import MASKS, TOL, make_layer

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 1), (17, 29), (33, 9)]
IDENTITY = {"A": (True, False), "B": (False, True), "AB": (True, True)}  # which factor is None

# every backend on the device types it may run on (cpu and cuda tensors), each skipped with its reason
ON_DEVICES = [
    pytest.param(p.values[0], device, marks=p.marks, id=f"{p.id}-{device}")
    for device in ("cpu", "cuda")
    for p in device_backends(device)
]


def mask_id(mask):
    return "".join("GASB"[i] if b else "-" for i, b in enumerate(mask))


def interpreted(backend, device):
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def skip_unsupported(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend has no float64 (tested to raise TypeError in tests/test_op.py)")


def layer(m, n, dtype, device, identity, batch=None, requires_grad=False):
    """(G, A or None, S, B or None) and the float64 oracle's inputs with explicit eye."""
    G, A, S, B = make_layer(m, n, dtype, batch=batch)
    no_a, no_b = identity
    A = None if no_a else A
    B = None if no_b else B
    ins = [None if t is None else t.to(device).requires_grad_(requires_grad) for t in (G, A, S, B)]
    return ins, oracle_inputs(*ins)


def oracle_inputs(G, A, S, B):
    """float64 copies on CPU, each None replaced by an explicit identity (batched like G)."""
    *lead, m, n = G.shape

    def eye(k):
        e = torch.eye(k, dtype=torch.float64)
        return e.expand(*lead, k, k).clone() if lead else e

    f64 = lambda t: t.detach().double().cpu()  # noqa: E731
    return [f64(G), eye(m) if A is None else f64(A), f64(S), eye(n) if B is None else f64(B)]


def chain_inputs(ins):
    return [None if t is None else t.detach().cpu() for t in ins]


def check(out, oracle, chain, dtype, what, backend, device, elementwise=False):
    """``out`` against the float64 ``oracle``; ``chain``: the torch formulas in ``dtype``."""
    policy = (_contract.TRUNCATED_ONCE if interpreted(backend, device) and dtype == torch.bfloat16
              else _contract.policy(backend, dtype))
    out = out.detach().cpu()
    if dtype in _contract.HALF_DTYPES and elementwise:
        assert out.dtype == dtype and out.shape == oracle.shape, what
        u = _contract.UNIT_ROUNDOFF[dtype] * (2.0 if policy == _contract.TRUNCATED_ONCE else 1.0)
        err = _contract.rel_err(out, oracle)
        assert err <= u + _contract.FP32_SLACK, f"{what} ({dtype}): error {err:.3g} > one rounding"
        return
    _contract.check(out, oracle, dtype, TOL.get(dtype), chain=chain, what=what, policy=policy)


# ---------------------------------------------------------------------------------------------
# Single layer and batched
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("identity", list(IDENTITY.values()), ids=list(IDENTITY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(backend, device, dtype, identity, shape):
    skip_unsupported(backend, device, dtype)
    ins, f64 = layer(*shape, dtype, device, identity)
    out = apo_kernels.precondition(*ins, backend=backend)
    assert out.shape == ins[0].shape and out.dtype == dtype and out.device.type == device
    check(out, reference.precondition(*f64), reference.precondition(*chain_inputs(ins)), dtype, "Y",
          backend, device, elementwise=all(identity))


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("identity", list(IDENTITY.values()), ids=list(IDENTITY))
@pytest.mark.parametrize("mask", MASKS + [(False, False, False, True), (False, True, False, False)], ids=mask_id)
def test_backward_every_mask(backend, device, dtype, identity, mask):
    skip_unsupported(backend, device, dtype)
    ins, f64 = layer(17, 29, dtype, device, identity)
    dY = torch.randn(17, 29).to(dtype).to(device)
    outs = apo_kernels.precondition_backward(dY, *ins, output_mask=mask, backend=backend)
    refs = reference.precondition_backward(dY.double().cpu(), *f64)
    chains = reference.precondition_backward(dY.cpu(), *chain_inputs(ins))
    present = (True, not identity[0], True, not identity[1])
    for name, wanted, here, out, ref, chain in zip(("dG", "dA", "dS", "dB"), mask, present, outs, refs, chains):
        if wanted and here:
            elementwise = all(identity) and name in ("dG", "dS")
            check(out, ref, chain, dtype, name, backend, device, elementwise=elementwise)
        else:
            assert out is None, f"{name}: masked off or an identity factor's gradient must be None"


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("identity", list(IDENTITY.values()), ids=list(IDENTITY))
def test_registered_op_returns_empty_identity_gradient(backend, device, identity):
    """The registered ops put an empty (0,) tensor where the public functions put None."""
    family = get(backend).family
    ins, _ = layer(5, 3, torch.float32, device, identity)
    dY = torch.randn(5, 3, device=device)
    outs = family.backward(dY, *ins, [True] * 4)
    for k, is_identity in ((1, identity[0]), (3, identity[1])):
        if not is_identity:
            assert outs[k].shape == ins[k].shape
        elif backend == "reference":
            assert outs[k] is None  # plain Python family: None is its empty slot
        else:
            assert outs[k].shape == (0,), f"slot {k}: {tuple(outs[k].shape)}"


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("identity", list(IDENTITY.values()), ids=list(IDENTITY))
def test_batched_with_autograd(backend, device, dtype, identity):
    ins, f64 = layer(13, 21, dtype, device, identity, batch=3, requires_grad=True)
    dY = torch.randn(3, 13, 21).to(dtype).to(device)
    out = apo_kernels.precondition(*ins, backend=backend)
    out.backward(dY)
    chain = chain_inputs(ins)
    check(out, reference.precondition(*f64), reference.precondition(*chain), dtype, "Y", backend, device,
          elementwise=all(identity))
    refs = reference.precondition_backward(dY.double().cpu(), *f64)
    chains = reference.precondition_backward(dY.cpu(), *chain)
    for name, t, ref, c in zip("GASB", ins, refs, chains):
        if t is None:
            continue
        check(t.grad, ref, c, dtype, f"d{name}", backend, device, elementwise=all(identity) and name in "GS")


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("identity", list(IDENTITY.values()), ids=list(IDENTITY))
def test_gradcheck_float64(backend, device, identity):
    skip_unsupported(backend, device, torch.float64)
    ins, _ = layer(4, 3, torch.float64, device, identity, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: apo_kernels.precondition(*t, backend=backend), tuple(ins))
    assert torch.autograd.gradgradcheck(lambda *t: apo_kernels.precondition(*t, backend=backend), tuple(ins))


# ---------------------------------------------------------------------------------------------
# Grouped: None and matrices mixed per layer
# ---------------------------------------------------------------------------------------------
GROUP = [((1, 1), (True, True)), ((7, 1), (False, True)), ((1, 7), (True, False)),
         ((17, 29), (False, False)), ((33, 9), (True, False)), ((6, 6), (False, True)), ((5, 3), (True, True))]


def group(dtype, device, requires_grad=False):
    layers = [layer(m, n, dtype, device, identity, requires_grad=requires_grad) for (m, n), identity in GROUP]
    lists = [list(x) for x in zip(*(ins for ins, _ in layers))]
    return lists, [f64 for _, f64 in layers]


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_forward_and_autograd(backend, device, dtype):
    """Autograd reaches the matrices of a list that also holds None (the registered op's autograd
    cannot: torch.library treats such a list as one opaque argument)."""
    skip_unsupported(backend, device, dtype)
    (grads, As, Ss, Bs), f64s = group(dtype, device, requires_grad=True)
    outs = apo_kernels.precondition_grouped(grads, As, Ss, Bs, backend=backend)
    dYs = [torch.randn(o.shape).to(dtype).to(device) for o in outs]
    torch.autograd.backward(outs, dYs)
    for i, ((_, identity), out, dY, f64) in enumerate(zip(GROUP, outs, dYs, f64s)):
        ins = (grads[i], As[i], Ss[i], Bs[i])
        chain = chain_inputs(ins)
        both = all(identity)
        check(out, reference.precondition(*f64), reference.precondition(*chain), dtype, f"layer {i}: Y",
              backend, device, elementwise=both)
        refs = reference.precondition_backward(dY.double().cpu(), *f64)
        chains = reference.precondition_backward(dY.cpu(), *chain)
        for name, t, ref, c in zip("GASB", ins, refs, chains):
            if t is None:
                continue
            assert t.grad is not None, f"layer {i}: d{name} did not reach the input"
            check(t.grad, ref, c, dtype, f"layer {i}: d{name}", backend, device, elementwise=both and name in "GS")


@pytest.mark.parametrize("backend,device", ON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", MASKS + [(False, True, False, True)], ids=mask_id)
def test_grouped_backward_every_mask(backend, device, dtype, mask):
    (grads, As, Ss, Bs), f64s = group(dtype, device)
    dYs = [torch.randn(g.shape).to(dtype).to(device) for g in grads]
    outs = apo_kernels.precondition_grouped_backward(dYs, grads, As, Ss, Bs, output_mask=mask, backend=backend)
    for k, (name, wanted, out) in enumerate(zip(("dG", "dA", "dS", "dB"), mask, outs)):
        if not wanted:
            assert out == [], f"{name} masked off: an empty list"
            continue
        assert len(out) == len(GROUP), name
        factors = As if k == 1 else Bs if k == 3 else None
        for i, (dY, f64) in enumerate(zip(dYs, f64s)):
            if factors is not None and factors[i] is None:
                assert out[i] is None, f"layer {i}: {name} of an identity factor must be None"
                continue
            ins = (grads[i], As[i], Ss[i], Bs[i])
            ref = reference.precondition_backward(dY.double().cpu(), *f64)[k]
            chain = reference.precondition_backward(dY.cpu(), *chain_inputs(ins))[k]
            both = all(GROUP[i][1])
            check(out[i], ref, chain, dtype, f"layer {i}: {name}", backend, device, elementwise=both and k in (0, 2))


@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_grouped_registered_op_identity_slots(backend, device):
    """The registered grouped backward: an empty (0,) tensor in an identity layer's dA/dB slot."""
    family = get(backend).family
    (grads, As, Ss, Bs), _ = group(torch.float32, device)
    dYs = [torch.randn_like(g) for g in grads]
    _, dAs, _, dBs = family.grouped_backward(dYs, grads, As, Ss, Bs, [False, True, True, True])
    for factors, outs in ((As, dAs), (Bs, dBs)):
        for f, o in zip(factors, outs):
            if f is not None:
                assert o.shape == f.shape
            elif backend == "reference":
                assert o is None
            else:
                assert o.shape == (0,)


@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_grouped_gradcheck_float64(backend, device):
    skip_unsupported(backend, device, torch.float64)
    shapes = [((3, 2), (True, False)), ((2, 3), (False, True)), ((2, 2), (True, True)), ((3, 3), (False, False))]
    layers = [layer(m, n, torch.float64, device, identity, requires_grad=True)[0] for (m, n), identity in shapes]
    lists = [list(x) for x in zip(*layers)]
    flat = [t for ts in lists for t in ts if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        rebuilt = [[None if t is None else next(it) for t in ts] for ts in lists]
        return tuple(apo_kernels.precondition_grouped(*rebuilt, backend=backend))

    assert torch.autograd.gradcheck(fn, tuple(flat))
    assert torch.autograd.gradgradcheck(fn, tuple(flat))  # GroupedAutograd's double backward


# ---------------------------------------------------------------------------------------------
# No identity matrix is formed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_tall_identity_side_is_never_materialized(backend, device):
    """m = 2**20 with A=None: an explicit identity would hold 2**40 elements (4 TiB in fp32)."""
    if interpreted(backend, device):
        pytest.skip("Triton's interpreter runs one program per tile in Python: 2**20 rows take minutes")
    m, n = 1 << 20, 2
    G = torch.randn(m, n, device=device)
    S = torch.rand(m, n, device=device) + 0.5
    B = torch.eye(n, device=device) + 0.1 * torch.randn(n, n, device=device)
    Y = apo_kernels.precondition(G, None, S, B, backend=backend)
    expected = ((S.double() * (G.double() @ B.double())) @ B.double().T)
    check(Y, expected.cpu(), None, torch.float32, "Y", backend, device)
    _, dA, dS, dB = apo_kernels.precondition_backward(torch.ones_like(G), G, None, S, B, backend=backend)
    assert dA is None and dS.shape == (m, n) and dB.shape == (n, n)


# ---------------------------------------------------------------------------------------------
# Registered ops: torch.library's own checks, and what autograd saves
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_opcheck_with_identity_factors(backend, device):
    """Fake kernels, schemas and autograd registration of the registered ops with None factors."""
    family = get(backend).family
    if backend == "reference":
        pytest.skip("reference: plain torch functions, no registered op to check")
    for identity in IDENTITY.values():
        ins, _ = layer(5, 3, torch.float32, device, identity, requires_grad=True)
        torch.library.opcheck(family.forward, tuple(ins))
        dY = torch.randn(5, 3, device=device)
        detached = [None if t is None else t.detach() for t in ins]
        torch.library.opcheck(family.backward, (dY, *detached, [True] * 4))
    (grads, As, Ss, Bs), _ = group(torch.float32, device)
    torch.library.opcheck(family.grouped, (grads, As, Ss, Bs))
    dYs = [torch.randn_like(g) for g in grads]
    torch.library.opcheck(family.grouped_backward, (dYs, grads, As, Ss, Bs, [True] * 4))


@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_grouped_autograd_with_identity_saves_only_what_it_reads(backend, device):
    """Only S needs a gradient (dS = D ⊙ H reads G, A, B): S is not saved, and no None slot is."""
    if backend == "reference":
        pytest.skip("reference: plain torch autograd decides what it saves")
    (grads, As, Ss, Bs), f64s = group(torch.float32, device)
    for s in Ss:
        s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        outs = apo_kernels.precondition_grouped(grads, As, Ss, Bs, backend=backend)
    expected = [t.data_ptr() for ts in (grads, As, Bs) for t in ts if t is not None]
    assert sorted(saved) == sorted(expected)
    dYs = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dYs)
    for i, (s, dY, f64) in enumerate(zip(Ss, dYs, f64s)):
        ref = reference.precondition_backward(dY.double().cpu(), *f64)[2]
        check(s.grad, ref, None, torch.float32, f"layer {i}: dS", backend, device)


@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_torch_compile_with_identity_factors(backend, device):
    """torch.compile(fullgraph=True) traces the public functions with None factors (single, and
    grouped with None mixed per layer: its own autograd), and gradients match eager."""
    if interpreted(backend, device):
        pytest.skip("Triton's interpreter: custom_op launches under compile are covered eagerly above")

    def step(G, A, S, B, G2, S2, B2):
        Y = apo_kernels.precondition(G, None, S * S, B, backend=backend)
        Ys = apo_kernels.precondition_grouped([G, G2], [A, None], [S, S2], [None, B2], backend=backend)
        return (Y * Y).sum() + sum((y * y).sum() for y in Ys)

    ins = [*make_layer(5, 3, torch.float32), *[make_layer(4, 2, torch.float32)[k] for k in (0, 2, 3)]]
    ins = [t.to(device).requires_grad_() for t in ins]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*ins), ins)
    eager = torch.autograd.grad(step(*ins), ins)
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e)

"""The carried momentum step, ``precondition_momentum_grouped(..., carry=True)``, on every backend
that runs on CPU tensors.

Per layer i, with out[i] holding on entry Y(momenta[i]) (the previous step's direction):
``vs[i] = μ·momenta[i] + grads[i]`` (bit for bit torch.optim.SGD's) and
``out[i] = μ·out[i] + Y(grads[i])``, Y(v) in exact arithmetic. The CPU kernel forms Y(grads) only on
the nonzero rows of an identity-A layer (the embedding case); other layers and backends compose it.

Oracle: Y(v) in float64 from the same inputs; out enters as Y(momenta) + 0.5, so the carried result
is Y(v) + μ·0.5 (a call that formed Y(v) afresh would fail). Tolerances, relative Frobenius error: float64 1e-10,
float32 1e-5 (tests/test_op.py's TOL): the carried direction adds two roundings per element
(μ·out, then the sum) to the op's own error. Rows of grads that are zero: out's row is μ·out's row,
bit for bit ``out.mul(μ)``.
"""
import math

import pytest
import torch

import _contract
import apo_kernels
from conftest import backend_skip_reason, cpu_backends
from test_momentum_op import MU, flag_pair, make_step, nan_like, oracle, skip_tall, skip_unsupported, torch_v
from test_op import TOL

FULL_DTYPES = [torch.float32, torch.float64]
TALL = (5000, 64)
# (shape, (A None, B None), fraction of grad rows that are nonzero)
LAYERS = [
    (TALL, (True, False), 0.05),     # an embedding: identity A, most rows untouched
    ((1500, 33), (True, False), 0.3),
    ((700, 9), (True, True), 0.5),   # identity A and B: Y = S ⊙ G
    ((37, 29), (False, False), 1.0),  # dense factors: composed
    ((9, 300), (False, True), 1.0),
]


def sparse_rows(grads, fractions, seed=0):
    """Zero all rows of each grad but a random ``fraction`` of them (returns the kept rows)."""
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for g, frac in zip(grads, fractions):
        keep = torch.rand(g.shape[0], generator=gen) < frac
        g[~keep] = 0
        kept.append(keep)
    return kept


# added to the carried direction on entry: a call that ignored it (forming Y(v) afresh) would miss
# μ·OFFSET in every element
OFFSET = 0.5


def carried(backend, dtype, layers=LAYERS, mu=MU, offset=0.0):
    """grads (sparse rows), momenta, factors, and out = Y(momenta) + offset, Y by the op itself."""
    grads, momenta, As, Ss, Bs = make_step([(shape, ident) for shape, ident, _ in layers], dtype)
    kept = sparse_rows(grads, [frac for *_, frac in layers])
    out = [y + offset for y in apo_kernels.precondition_grouped(momenta, As, Ss, Bs, backend=backend)]
    return grads, momenta, As, Ss, Bs, out, kept


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
def test_carry_matches_float64(backend, dtype):
    skip_unsupported(backend, dtype)
    skip_tall(backend)
    grads, momenta, As, Ss, Bs, out, kept = carried(backend, dtype, offset=OFFSET)
    before = [o.clone() for o in out]
    vs = nan_like(grads)
    flags = apo_kernels.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs=vs, out=out, carry=True,
                                                      backend=backend)
    assert flag_pair(flags, grads) == (True, True)
    _, y64 = oracle(grads, momenta, MU, As, Ss, Bs)
    for i, (g, m, v, o, y, prev, rows) in enumerate(zip(grads, momenta, vs, out, y64, before, kept)):
        assert torch.equal(v, torch_v(g, m, MU)), f"layer {i}: v is not bit for bit m.mul(μ).add_(g)"
        _contract.check(o, y + MU * OFFSET, dtype, TOL[dtype], what=f"layer {i}: carried Y")
        if As[i] is None:  # an untouched row: μ·out exactly
            assert torch.equal(o[~rows], prev[~rows].mul(MU)), f"layer {i}: untouched rows are not μ·out"


@pytest.mark.parametrize("backend", cpu_backends())
def test_carry_over_steps_stays_with_the_direct_direction(backend):
    """Ten carried steps (new sparse gradients each) stay within float32's tolerance of Y(v)
    formed directly: the carried rounding errors decay with μ instead of growing."""
    skip_tall(backend)
    layers = LAYERS[:2]
    grads, momenta, As, Ss, Bs, out, _ = carried(backend, torch.float32, layers)
    for t in range(10):
        vs = [torch.empty_like(g) for g in grads]
        flags = apo_kernels.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs=vs, out=out,
                                                          carry=True, backend=backend)
        assert flag_pair(flags, grads) == (True, True)
        momenta = vs
        grads = [torch.randn_like(g) for g in grads]
        sparse_rows(grads, [frac for *_, frac in layers], seed=t + 1)
    direct = apo_kernels.precondition_grouped(momenta, As, Ss, Bs, backend=backend)
    for i, (o, y) in enumerate(zip(out, direct)):
        _contract.check(o, y.double(), torch.float32, TOL[torch.float32], what=f"layer {i} after 10 carried steps")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["nan-grad", "inf-out", "finite"])
def test_carry_flags(backend, case):
    """A NaN in a touched row of grads makes v and out non-finite; an inf in an untouched row of the
    carried out makes out non-finite only."""
    skip_tall(backend)
    grads, momenta, As, Ss, Bs, out, kept = carried(backend, torch.float32, LAYERS[:2])
    rows = kept[0].nonzero().flatten()
    if case == "nan-grad":
        grads[0][rows[0], 3] = math.nan
    elif case == "inf-out":
        out[0][(~kept[0]).nonzero().flatten()[-1], 5] = math.inf
    vs = nan_like(grads)
    flags = apo_kernels.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs=vs, out=out, carry=True,
                                                      backend=backend)
    want = {"nan-grad": (False, False), "inf-out": (True, False), "finite": (True, True)}[case]
    assert flag_pair(flags, grads) == want


@pytest.mark.parametrize("carry", [1, "yes", None])
def test_carry_must_be_a_bool(carry):
    grads, momenta, As, Ss, Bs = make_step([((3, 4), (True, False))], torch.float32)
    with pytest.raises(TypeError, match="carry"):
        apo_kernels.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs=nan_like(grads),
                                                  out=nan_like(grads), carry=carry)


def test_registered_op_with_carry_passes_opcheck_and_compiles():
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    grads, momenta, As, Ss, Bs, out, _ = carried("cpu", torch.float32, LAYERS[1:4])
    vs = nan_like(grads)
    torch.library.opcheck(torch.ops.apo.precondition_momentum_grouped.default,
                          (grads, momenta, MU, As, Ss, Bs, vs, [o.clone() for o in out], True))

    @torch.compile(fullgraph=True, backend="eager")
    def carried_step(grads, momenta, As, Ss, Bs, vs, out):
        return torch.ops.apo.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs, out, carry=True)

    eager_out = [o.clone() for o in out]
    torch.ops.apo.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, nan_like(grads), eager_out, True)
    assert flag_pair(carried_step(grads, momenta, As, Ss, Bs, vs, out), grads) == (True, True)
    for a, b in zip(out, eager_out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("carry", [False, True], ids=["Y(v)", "carried"])
def test_composite_kernel_on_cpu_tensors(carry):
    """The op's composite kernel (CompositeExplicitAutograd: what CUDA and every other device run),
    reached on CPU tensors by redispatching to its key: v bit for bit SGD's, Y or the carried Y
    against float64, the flags."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    grads, momenta, As, Ss, Bs, out, _ = carried("cpu", torch.float32, LAYERS[1:], offset=OFFSET)
    if not carry:
        out = nan_like(grads)
    vs = nan_like(grads)
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    flags = torch.ops.apo.precondition_momentum_grouped.default.redispatch(
        composite, grads, momenta, MU, As, Ss, Bs, vs, out, carry)
    assert flag_pair(flags, grads) == (True, True)
    _, y64 = oracle(grads, momenta, MU, As, Ss, Bs)
    for i, (g, m, v, o, y) in enumerate(zip(grads, momenta, vs, out, y64)):
        assert torch.equal(v, torch_v(g, m, MU)), f"layer {i}: v"
        _contract.check(o, y + MU * OFFSET if carry else y, torch.float32, TOL[torch.float32], what=f"layer {i}: Y")
    grads[0][0, 0] = math.nan
    flags = torch.ops.apo.precondition_momentum_grouped.default.redispatch(
        composite, grads, momenta, MU, As, Ss, Bs, vs, out, carry)
    assert flag_pair(flags, grads) == (False, False)

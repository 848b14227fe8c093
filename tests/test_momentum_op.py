"""The fused momentum step, ``precondition_momentum_grouped``, on every backend that runs on CPU tensors.

Per layer i: ``vs[i] = μ·momenta[i] + grads[i]`` (torch.optim.SGD's rounding, bit for bit
``momenta[i].mul(μ).add_(grads[i])``) and ``out[i] = precondition(vs[i], As[i], Ss[i], Bs[i])``;
the call returns (every v finite, every Y finite). The cpu backend runs the fused C++ kernel (the
direct path for 2-D float32/float64 with row-major outputs, row-blocked for a tall identity-A layer;
the ATen path for float16/bfloat16 and strided outputs); reference and triton compose it from their
grouped op (dispatch.py's ``_momentum_grouped_composite``).

Oracle: v and Y computed in float64 from the same (already-rounded) inputs, Y by
``apo_kernels.ops.reference``. Tolerances, relative Frobenius error:

- v: within two roundings of the exact μ·m + g (the product and the sum, each rounded once), in
  Frobenius norm ``‖v − v64‖ ≤ u·(‖μ·m‖ + ‖v64‖)`` with u the dtype's unit roundoff (float64 2⁻⁵³,
  float32 2⁻²⁴, float16 2⁻¹¹, bfloat16 2⁻⁸); and, for every dtype, bit for bit ``m.mul(μ).add_(g)``.
- Y, float64 1e-10 and float32 1e-5 (tests/test_op.py's TOL) against the end-to-end float64 oracle.
- Y, float16/bfloat16 (looser): the "fp32 accumulation, rounded once" contract of tests/_contract.py
  on the op's own, rounded v (interpreted Triton's bfloat16 stores truncate: TRUNCATED_ONCE); an
  elementwise Y (both factors identity) is held only to the oracle bound, as in
  tests/test_identity_factors.py. End to end against the float64 oracle on the exact v:
  ``HALF_END_TO_END_U · u`` (v's two roundings carried through the near-identity factors, plus Y's
  own rounding).
"""
import math
import os

import pytest
import torch

import _contract
import apo_kernels
from apo_kernels.ops import reference
from conftest import backend_skip_reason, cpu_backends
from test_op import TOL

MU = 0.9
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FULL_DTYPES = [torch.float32, torch.float64]
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, **_contract.UNIT_ROUNDOFF}
HALF_END_TO_END_U = 4.0

# which factor is None (identity): (A None, B None)
IDENTITY = {"factors": (False, False), "A": (True, False), "B": (False, True), "AB": (True, True)}
SHAPES = [(37, 5), (3, 1), (1, 9), (300, 9), (2, 3)]
# several layers of different shapes, identity mixed per layer
MIXED = [
    ((37, 5), IDENTITY["factors"]),
    ((3, 1), IDENTITY["A"]),
    ((1, 9), IDENTITY["B"]),
    ((300, 9), IDENTITY["A"]),
    ((2, 3), IDENTITY["factors"]),
    ((4, 6), IDENTITY["AB"]),
]
LAYOUTS = {name: [(shape, identity) for shape in SHAPES] for name, identity in IDENTITY.items()}
LAYOUTS["mixed"] = MIXED
SENTINEL = -12345.0  # fills output buffers around the tiles the op must write
TALL = (5000, 64)  # identity A, 64 columns: the CPU kernel's row-blocked path (512-row blocks)


def interpreted(backend):
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def skip_tall(backend):
    if interpreted(backend):
        pytest.skip("the tall layer is for the CPU kernel's row-blocked path; too large for Triton's "
                    "interpreter in CI time (~2 s a call)")


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend has no float64 (its kernels are fp32/fp16/bf16; "
                    "test_triton_rejects_float64 checks the TypeError)")


def make_step(layers, dtype, momenta_transposed=()):
    """grads, momenta, As, Ss, Bs for ``layers`` [((m, n), (A None, B None)), ...], distributed as
    tests/test_op.py's make_layer (A, B near identity, S positive), no factor formed for an identity
    one; the layers whose index is in ``momenta_transposed`` get a transposed momentum buffer."""
    grads, momenta, As, Ss, Bs = [], [], [], [], []
    for i, ((m, n), (no_a, no_b)) in enumerate(layers):
        grads.append(torch.randn(m, n).to(dtype))
        momenta.append(torch.randn(n, m).to(dtype).T if i in momenta_transposed else torch.randn(m, n).to(dtype))
        As.append(None if no_a else (torch.eye(m) + torch.randn(m, m) / m**0.5).to(dtype))
        Ss.append((torch.rand(m, n) + 0.5).to(dtype))
        Bs.append(None if no_b else (torch.eye(n) + torch.randn(n, n) / n**0.5).to(dtype))
    return grads, momenta, As, Ss, Bs


def nan_like(ts):
    """Outputs filled with NaN: an element the op does not write shows up."""
    return [torch.full_like(t, math.nan, memory_format=torch.contiguous_format) for t in ts]


def step(backend, grads, momenta, mu, As, Ss, Bs, vs=None, out=None):
    vs = nan_like(grads) if vs is None else vs
    out = nan_like(grads) if out is None else out
    flags = apo_kernels.precondition_momentum_grouped(grads, momenta, mu, As, Ss, Bs, vs=vs, out=out,
                                                      backend=backend)
    return flag_pair(flags, grads), vs, out


def flag_pair(flags, grads=()):
    """The op's flags, a bool tensor (2,) on the inputs' device, as (v finite, Y finite)."""
    assert flags.dtype == torch.bool and flags.shape == (2,)
    assert flags.device == (grads[0].device if len(grads) else torch.device("cpu"))
    return tuple(flags.tolist())


def f64(t):
    return None if t is None else t.double()


def oracle(grads, momenta, mu, As, Ss, Bs):
    """float64 v and Y on the same inputs."""
    v64 = [m.double() * mu + g.double() for g, m in zip(grads, momenta)]
    y64 = [reference.precondition(v, f64(A), f64(S), f64(B)) for v, A, S, B in zip(v64, As, Ss, Bs)]
    return v64, y64


def torch_v(g, m, mu):
    return m.mul(mu).add_(g)


def check_v(v, v64, mu_m, dtype, what):
    """v within two roundings of the exact μ·m + g: each element within u·(|μ·m| + |v|), so in
    Frobenius norm ‖v − v64‖ ≤ u·(‖μ·m‖ + ‖v64‖) (``mu_m``: μ·m in float64)."""
    assert v.dtype == dtype and v.shape == v64.shape, what
    u = UNIT[dtype]
    err = (v.double() - v64).norm().item()
    bound = u * (mu_m.norm().item() + v64.norm().item()) * (1 + 4 * u)
    assert err <= bound, f"{what}: ‖v − v64‖ = {err:.3g} > two roundings' {bound:.3g} ({dtype})"


def check_y(y, v, A, S, B, y64, dtype, backend, what):
    """Y of one layer; ``v``: the op's own v (the rounded input Y is computed from)."""
    assert y.dtype == dtype and y.shape == y64.shape, what
    if dtype not in _contract.HALF_DTYPES:
        _contract.check(y, y64, dtype, TOL[dtype], what=what)
        return
    policy = _contract.TRUNCATED_ONCE if interpreted(backend) and dtype == torch.bfloat16 else _contract.ROUNDED_ONCE
    on_v = reference.precondition(v.double(), f64(A), f64(S), f64(B))
    u = _contract.UNIT_ROUNDOFF[dtype]
    if A is None and B is None:  # Y = S ⊙ v: the torch chain rounds once too; only the oracle bound
        r = 2.0 if policy == _contract.TRUNCATED_ONCE else 1.0
        err = _contract.rel_err(y, on_v)
        assert err <= r * u + _contract.FP32_SLACK, f"{what} ({dtype}): error {err / u:.3f}u > one rounding"
    else:
        _contract.check(y, on_v, dtype, None, chain=reference.precondition(v, A, S, B), what=what, policy=policy)
    err = _contract.rel_err(y, y64)
    assert err <= HALF_END_TO_END_U * u, f"{what} ({dtype}): end-to-end error {err / u:.3f}u > {HALF_END_TO_END_U:g}u"


def check_step(backend, dtype, grads, momenta, mu, As, Ss, Bs, vs, out):
    v64, y64 = oracle(grads, momenta, mu, As, Ss, Bs)
    for i, (g, m, A, S, B) in enumerate(zip(grads, momenta, As, Ss, Bs)):
        check_v(vs[i], v64[i], m.double() * mu, dtype, f"layer {i}: v")
        check_y(out[i], vs[i], A, S, B, y64[i], dtype, backend, f"layer {i}: Y")


# ---------------------------------------------------------------------------------------------
# 1. Against float64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda s: f"identity-{s}")
def test_matches_float64(backend, dtype, layout):
    skip_unsupported(backend, dtype)
    grads, momenta, As, Ss, Bs = make_step(LAYOUTS[layout], dtype, momenta_transposed=(0,))
    flags, vs, out = step(backend, grads, momenta, MU, As, Ss, Bs)
    assert flags == (True, True)
    check_step(backend, dtype, grads, momenta, MU, As, Ss, Bs, vs, out)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("no_b", [False, True], ids=["B", "B-identity"])
@pytest.mark.parametrize("tiled", [False, True], ids=["fresh-outputs", "column-block-outputs"])
def test_tall_identity_a_layer(backend, dtype, no_b, tiled):
    """A tall identity-A layer (the CPU kernel's row-blocked path, 10 blocks of rows, the last one
    short), with small layers in the same call; its vs and out fresh, or the two column blocks of one
    (5000, 129) matrix (row stride 129, the last column untouched)."""
    skip_unsupported(backend, dtype)
    skip_tall(backend)
    layers = [(TALL, (True, no_b)), ((2, 3), IDENTITY["factors"]), ((37, 5), IDENTITY["A"])]
    grads, momenta, As, Ss, Bs = make_step(layers, dtype)
    vs, out = nan_like(grads), nan_like(grads)
    if tiled:
        m, n = TALL
        X = torch.full((m, 2 * n + 1), SENTINEL, dtype=dtype)
        vs[0], out[0] = X[:, :n], X[:, n:2 * n]
    flags, vs, out = step(backend, grads, momenta, MU, As, Ss, Bs, vs=vs, out=out)
    assert flags == (True, True)
    check_step(backend, dtype, grads, momenta, MU, As, Ss, Bs, vs, out)
    for i, (g, m, v) in enumerate(zip(grads, momenta, vs)):
        assert torch.equal(v, torch_v(g, m, MU)), f"layer {i}: v is not bit for bit m.mul(μ).add_(g)"
    if tiled:
        assert bool((X[:, -1] == SENTINEL).all()), "the column after the output tiles changed"


def test_registered_op_matches_public_function():
    """torch.ops.apo.precondition_momentum_grouped (the cpu backend's kernel), called directly."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    grads, momenta, As, Ss, Bs = make_step(MIXED, torch.float32, momenta_transposed=(1,))
    vs, out = nan_like(grads), nan_like(grads)
    flags = torch.ops.apo.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs, out)
    assert flag_pair(flags, grads) == (True, True)
    check_step("cpu", torch.float32, grads, momenta, MU, As, Ss, Bs, vs, out)
    _, vs2, out2 = step("cpu", grads, momenta, MU, As, Ss, Bs)
    for i in range(len(grads)):
        assert torch.equal(vs[i], vs2[i]) and torch.equal(out[i], out2[i]), f"layer {i}"


# ---------------------------------------------------------------------------------------------
# 2. v is torch.optim.SGD's buf.mul_(μ).add_(g), bit for bit
# ---------------------------------------------------------------------------------------------
MOMENTA = [0.9, 0.0, 1.0, -0.5, 1 / 3]


def check_v_bits(backend, dtype, mu):
    grads, momenta, As, Ss, Bs = make_step(MIXED, dtype, momenta_transposed=(0, 3))
    _, vs, out = step(backend, grads, momenta, mu, As, Ss, Bs)
    for i, (g, m, v) in enumerate(zip(grads, momenta, vs)):
        want = torch_v(g, m, mu)
        assert torch.equal(v, want), (
            f"layer {i} {tuple(g.shape)}: v differs from m.mul({mu}).add_(g) in {(v != want).sum().item()} "
            f"of {v.numel()} elements ({dtype})")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("mu", MOMENTA, ids=lambda mu: f"mu={mu:.3g}")
def test_v_bit_identical_to_torch(backend, dtype, mu):
    skip_unsupported(backend, dtype)
    check_v_bits(backend, dtype, mu)


@pytest.mark.parametrize("backend", cpu_backends())
def test_triton_rejects_float64(backend):
    if backend != "triton":
        pytest.skip("only the triton backend lacks float64")
    grads, momenta, As, Ss, Bs = make_step(MIXED[:2], torch.float64)
    with pytest.raises(TypeError, match="float64"):
        step(backend, grads, momenta, MU, As, Ss, Bs)


# ---------------------------------------------------------------------------------------------
# 3. The finiteness flags
# ---------------------------------------------------------------------------------------------
FLAG_CASES = {
    "finite": (None, (True, True)),
    "nan-grad": ("grads", (False, False)),
    "inf-momentum-buffer": ("momenta", (False, False)),
    "v-overflows": ("overflow", (False, False)),
    "inf-S": ("Ss", (True, False)),
}


def spoil(kind, lists, layer, row, col):
    """Make one element of layer ``layer`` non-finite (or, "overflow", make its v overflow)."""
    grads, momenta, As, Ss, Bs = lists
    if kind == "grads":
        grads[layer][row, col] = math.nan
    elif kind == "momenta":
        momenta[layer][row, col] = -math.inf
    elif kind == "overflow":
        big = torch.finfo(grads[layer].dtype).max
        grads[layer][row, col] = big
        momenta[layer][row, col] = big
    elif kind == "Ss":
        Ss[layer][row, col] = math.inf


FLAG_LAYERS = [((7, 4), IDENTITY["factors"]), ((3, 1), IDENTITY["A"]), ((1, 9), IDENTITY["B"]),
               ((6, 5), IDENTITY["AB"])]


def check_flags(backend, dtype, case, layer):
    kind, want = FLAG_CASES[case]
    lists = make_step(FLAG_LAYERS, dtype)
    if kind is not None:
        m, n = lists[0][layer].shape
        spoil(kind, lists, layer, m - 1, n // 2)
    flags, vs, out = step(backend, *lists[:2], MU, *lists[2:])
    assert flags == want, f"{case} in layer {layer}: flags {flags}, expected {want}"
    v_ok = all(bool(torch.isfinite(v).all()) for v in vs)
    y_ok = all(bool(torch.isfinite(y).all()) for y in out)
    assert (v_ok, y_ok) == want, "the flags must say whether the written v and Y are finite"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Triton's interpreter, inf S
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case,layer", [("finite", 0)] + [(c, k) for c in list(FLAG_CASES)[1:] for k in range(4)],
                         ids=lambda x: f"layer{x}" if isinstance(x, int) else x)
def test_finite_flags(backend, case, layer):
    """float32: one bad layer (each of four, identity factors differing) among several sets the flag."""
    check_flags(backend, torch.float32, case, layer)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, *_contract.HALF_DTYPES], ids=str)
@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_finite_flags_other_dtypes(backend, dtype, case):
    """The other dtypes (float16/bfloat16: the CPU kernel's ATen path), the bad value in layer 0."""
    skip_unsupported(backend, dtype)
    check_flags(backend, dtype, case, 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["nan-grad", "inf-S"])
@pytest.mark.parametrize("row", [0, 2600, TALL[0] - 1], ids=lambda r: f"row{r}")
def test_finite_flags_tall_layer(backend, dtype, case, row):
    """The row-blocked path reads finiteness block by block: a bad value in the first, a middle or the
    last (short) block of rows."""
    skip_unsupported(backend, dtype)
    skip_tall(backend)
    kind, want = FLAG_CASES[case]
    lists = make_step([((2, 3), IDENTITY["factors"]), (TALL, IDENTITY["A"])], dtype)
    spoil(kind, lists, 1, row, 17)
    flags, _, _ = step(backend, *lists[:2], MU, *lists[2:])
    assert flags == want


# ---------------------------------------------------------------------------------------------
# 4. Outputs as tiles of bigger buffers, written in place
# ---------------------------------------------------------------------------------------------
TILE_LAYERS = [((7, 4), IDENTITY["factors"]), ((3, 1), IDENTITY["A"]), ((1, 9), IDENTITY["B"]),
               ((300, 9), IDENTITY["A"]), ((5, 5), IDENTITY["AB"])]


def tiles(layout, shapes, dtype):
    """(buffers, vs, out, views) for outputs laid out as ``layout``; ``views(bufs)`` makes the (v, Y)
    views of each layer on any tensors shaped like the buffers (to mark the tiles)."""
    if layout == "columns":  # per layer, one (m, 2n + 3) matrix: vs and out column blocks, gaps around
        def views(bufs):
            return [(b[:, 1:1 + n], b[:, n + 2:2 * n + 2]) for b, (m, n) in zip(bufs, shapes)]
        bufs = [torch.full((m, 2 * n + 3), SENTINEL, dtype=dtype) for m, n in shapes]
    elif layout == "rows":  # per layer, one (2m + 3, n) matrix: vs and out row blocks, gaps around
        def views(bufs):
            return [(b[1:1 + m], b[m + 2:2 * m + 2]) for b, (m, n) in zip(bufs, shapes)]
        bufs = [torch.full((2 * m + 3, n), SENTINEL, dtype=dtype) for m, n in shapes]
    elif layout == "flat":  # every vs and out a contiguous tile of one flat buffer, one element apart
        total = sum(2 * (m * n + 1) for m, n in shapes) + 1

        def views(bufs):
            flat, off, pairs = bufs[0], 1, []
            for m, n in shapes:
                v = flat[off:off + m * n].view(m, n)
                off += m * n + 1
                y = flat[off:off + m * n].view(m, n)
                off += m * n + 1
                pairs.append((v, y))
            return pairs
        bufs = [torch.full((total,), SENTINEL, dtype=dtype)]
    elif layout == "strided":  # vs transposed views, out every other column: the kernel's ATen path
        def views(bufs):
            return [(bt.T, by[:, ::2]) for bt, by in zip(bufs[0::2], bufs[1::2])]
        bufs = [b for m, n in shapes for b in (torch.full((n, m), SENTINEL, dtype=dtype),
                                               torch.full((m, 2 * n), SENTINEL, dtype=dtype))]
    else:
        raise AssertionError(layout)
    pairs = views(bufs)
    return bufs, [p[0] for p in pairs], [p[1] for p in pairs], views


def check_tiles(bufs, before, views):
    """Nothing outside the tiles changed."""
    marks = [torch.ones_like(b, dtype=torch.bool) for b in bufs]
    for v, y in views(marks):
        v.fill_(False)
        y.fill_(False)
    for k, (b, b0, keep) in enumerate(zip(bufs, before, marks)):
        assert torch.equal(b[keep], b0[keep]), f"buffer {k}: elements outside the output tiles changed"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["columns", "rows", "flat", "strided"])
def test_outputs_written_in_place_into_tiles(backend, dtype, layout):
    skip_unsupported(backend, dtype)
    grads, momenta, As, Ss, Bs = make_step(TILE_LAYERS, dtype)
    bufs, vs, out, views = tiles(layout, [s for s, _ in TILE_LAYERS], dtype)
    before = [b.clone() for b in bufs]
    vs_ptrs = [t.data_ptr() for t in vs]
    flags, vs2, out2 = step(backend, grads, momenta, MU, As, Ss, Bs, vs=vs, out=out)
    assert flags == (True, True)
    assert [t.data_ptr() for t in vs2] == vs_ptrs
    check_step(backend, dtype, grads, momenta, MU, As, Ss, Bs, vs, out)
    for i, (g, m, v) in enumerate(zip(grads, momenta, vs)):
        assert torch.equal(v, torch_v(g, m, MU)), f"layer {i}: v (a {layout} tile) is not m.mul(μ).add_(g)"
    check_tiles(bufs, before, views)


def inputs_and_outputs_as_column_blocks(dtype, m=6, n=4):
    """grads, momenta, vs and out as the four adjacent column blocks of one (m, 4n + 1) matrix (its last
    column left over): disjoint tiles of one buffer, which are allowed."""
    X = torch.randn(m, 4 * n + 1).to(dtype)
    G, M, V, Y = (X[:, k * n:(k + 1) * n] for k in range(4))
    V.fill_(math.nan)
    Y.fill_(math.nan)
    _, _, As, Ss, Bs = make_step([((m, n), IDENTITY["factors"])], dtype)
    return X, [G], [M], As, Ss, Bs, [V], [Y]


@pytest.mark.parametrize("backend", cpu_backends())
def test_inputs_and_outputs_in_one_matrix(backend):
    """Adjacent column blocks of one row-major matrix share no element: the call is accepted and
    correct, and the column past the last block is untouched."""
    X, grads, momenta, As, Ss, Bs, vs, out = inputs_and_outputs_as_column_blocks(torch.float32)
    g0, m0, last = grads[0].clone(), momenta[0].clone(), X[:, -1].clone()
    flags, _, _ = step(backend, grads, momenta, MU, As, Ss, Bs, vs=vs, out=out)
    assert flags == (True, True)
    assert torch.equal(grads[0], g0) and torch.equal(momenta[0], m0) and torch.equal(X[:, -1], last)
    assert torch.equal(vs[0], torch_v(g0, m0, MU))
    check_step(backend, torch.float32, [g0], [m0], MU, As, Ss, Bs, vs, out)


def test_registered_op_accepts_disjoint_column_blocks():
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    X, grads, momenta, As, Ss, Bs, vs, out = inputs_and_outputs_as_column_blocks(torch.float64)
    g0, m0 = grads[0].clone(), momenta[0].clone()
    assert flag_pair(torch.ops.apo.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs, out)) == (True, True)
    check_step("cpu", torch.float64, [g0], [m0], MU, As, Ss, Bs, vs, out)


# ---------------------------------------------------------------------------------------------
# 5. Errors: the public function and the registered op, same messages
# ---------------------------------------------------------------------------------------------
def _public(backend):
    def call(grads, momenta, mu, As, Ss, Bs, vs, out):
        return apo_kernels.precondition_momentum_grouped(grads, momenta, mu, As, Ss, Bs, vs=vs, out=out,
                                                         backend=backend)
    return call


def _registered_op(grads, momenta, mu, As, Ss, Bs, vs, out):
    return torch.ops.apo.precondition_momentum_grouped(grads, momenta, mu, As, Ss, Bs, vs, out)


ENTRY_POINTS = [pytest.param(p.values[0], marks=p.marks, id=f"public-{p.id}") for p in cpu_backends()]
_CPU_SKIP = backend_skip_reason("cpu")
ENTRY_POINTS.append(pytest.param(
    "op", id="torch.ops.apo", marks=[pytest.mark.skip(reason=f"cpu: {_CPU_SKIP}")] if _CPU_SKIP else []))


def entry(name):
    return _registered_op if name == "op" else _public(name)


def _error_args():
    """Two float32 layers, (3, 4) with both factors and (2, 5) with identity A, and fresh outputs."""
    grads, momenta, As, Ss, Bs = make_step([((3, 4), IDENTITY["factors"]), ((2, 5), IDENTITY["A"])],
                                           torch.float32)
    vs = [torch.zeros_like(g) for g in grads]
    out = [torch.zeros_like(g) for g in grads]
    return dict(grads=grads, momenta=momenta, mu=MU, As=As, Ss=Ss, Bs=Bs, vs=vs, out=out)


def _overlapping_grad(a):
    X = torch.randn(3, 6)
    a["grads"][0] = X[:, :4]
    a["out"][0] = X[:, 2:]  # columns 2, 3 shared


def _overlapping_momenta(a):
    X = torch.randn(2, 6)
    a["momenta"][1] = X[:, :5]
    a["vs"][1] = X[:, 1:]  # columns 1-4 shared


def _overlapping_flat(a):
    flat = torch.randn(20)
    a["grads"][0] = flat[:12].view(3, 4)
    a["out"][0] = flat[6:18].view(3, 4)  # half of the grad's elements


def _two_overlaps(a):
    a["out"][1] = a["grads"][1]
    a["vs"][1] = a["Ss"][1]  # vs comes before out: this pair is the one named, wherever it lies in memory


def _set(key, i, make):
    def edit(a):
        a[key][i] = make(a)
    return edit


def _drop(key):
    def edit(a):
        a[key] = a[key][:-1]
    return edit


def _mu(value):
    def edit(a):
        a["mu"] = value
    return edit


ERRORS = {
    "vs-is-momenta": (_set("vs", 0, lambda a: a["momenta"][0]), ValueError,
                      r"vs\[0\] shares memory with momenta\[0\]; the outputs must not overlap"),
    "vs-overlaps-momenta-columns": (_overlapping_momenta, ValueError, r"vs\[1\] shares memory with momenta\[1\]"),
    "out-is-vs": (_set("out", 1, lambda a: a["vs"][1]), ValueError, r"vs\[1\] shares memory with out\[1\]"),
    "out-is-grad": (_set("out", 0, lambda a: a["grads"][0]), ValueError, r"out\[0\] shares memory with grads\[0\]"),
    "out-overlaps-grad-columns": (_overlapping_grad, ValueError, r"out\[0\] shares memory with grads\[0\]"),
    "out-overlaps-grad-flat": (_overlapping_flat, ValueError, r"out\[0\] shares memory with grads\[0\]"),
    "out-overlaps-S": (_set("out", 0, lambda a: a["Ss"][0]), ValueError, r"out\[0\] shares memory with Ss\[0\]"),
    "two-overlaps": (_two_overlaps, ValueError, r"vs\[1\] shares memory with Ss\[1\]"),
    "vs-twice": (_set("vs", 1, lambda a: a["vs"][0].view(2, 6)[:, :5]), ValueError,
                 r"vs\[0\] shares memory with vs\[1\]"),
    "momenta-too-short": (_drop("momenta"), ValueError, r"momenta must have one tensor per layer \(2\), got 1"),
    "vs-too-short": (_drop("vs"), ValueError, r"vs must have one tensor per layer \(2\), got 1"),
    "out-too-short": (_drop("out"), ValueError, r"out must have one tensor per layer \(2\), got 1"),
    "vs-wrong-shape": (_set("vs", 0, lambda a: torch.zeros(4, 3)), ValueError,
                       r"layer 0: vs must have the shape of grad \(3, 4\), got \(4, 3\)"),
    "momenta-wrong-shape": (_set("momenta", 1, lambda a: torch.zeros(2, 5, 1)), ValueError,
                            r"layer 1: momenta must have the shape of grad \(2, 5\), got \(2, 5, 1\)"),
    "out-wrong-dtype": (_set("out", 1, lambda a: torch.zeros(2, 5, dtype=torch.float64)), TypeError,
                        r"layer 1: out has dtype torch.float64 but grad has torch.float32"),
    "momenta-wrong-dtype": (_set("momenta", 0, lambda a: torch.zeros(3, 4, dtype=torch.bfloat16)), TypeError,
                            r"layer 0: momenta has dtype torch.bfloat16 but grad has torch.float32"),
    "nan-momentum": (_mu(math.nan), ValueError, r"momentum must be a finite number"),
    "inf-momentum": (_mu(-math.inf), ValueError, r"momentum must be a finite number"),
    "out-expanded": (_set("out", 0, lambda a: torch.zeros(1, 4).expand(3, 4)), ValueError,
                     r"layer 0: out has elements that share memory \(an expanded tensor\); it is written"),
    "vs-expanded": (_set("vs", 1, lambda a: torch.zeros(2, 1).expand(2, 5)), ValueError,
                    r"layer 1: vs has elements that share memory \(an expanded tensor\)"),
}


def assert_refused_untouched(call, tensors, exc, message):
    """``call()`` raises ``exc`` matching ``message`` and writes none of ``tensors``."""
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=message):
        call()
    for k, (t, t0) in enumerate(zip(tensors, before)):
        assert torch.equal(t, t0), f"a refused call wrote tensor {k}"


@pytest.mark.parametrize("where", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_arguments_are_refused(where, case):
    edit, exc, message = ERRORS[case]
    a = _error_args()
    edit(a)
    tensors = [t for key in ("grads", "momenta", "As", "Ss", "Bs", "vs", "out") for t in a[key] if t is not None]
    assert_refused_untouched(
        lambda: entry(where)(a["grads"], a["momenta"], a["mu"], a["As"], a["Ss"], a["Bs"], a["vs"], a["out"]),
        tensors, exc, message)


def _shares(a, b) -> bool:
    """Brute force: whether two views of one storage have an element in common."""
    def offsets(t):
        return {t.storage_offset() + i * t.stride(0) + j * t.stride(1)
                for i in range(t.shape[0]) for j in range(t.shape[1])}
    return bool(offsets(a) & offsets(b))


def test_overlap_rule_is_exact_for_row_views():
    """Two equal-shape row views with one row stride, anywhere in one flat buffer (blocks of matrices
    that start at any offset: an optimizer's tiles): the input rule refuses them exactly when they
    share an element, in the Python checks and in the registered op's."""
    from apo_kernels.ops._validate import _may_share
    reason = backend_skip_reason("cpu")
    gen = torch.Generator().manual_seed(11)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))
    flat = torch.zeros(400)
    seen = {True: 0, False: 0}
    for _ in range(300):
        ld = pick(1, 9)
        rows, cols = pick(1, 5), pick(1, ld)
        span = (rows - 1) * ld + cols
        a = flat.as_strided((rows, cols), (ld, 1), pick(0, 60))
        b = flat.as_strided((rows, cols), (ld, 1), pick(max(0, a.storage_offset() - span), a.storage_offset() + span))
        want = _shares(a, b)
        seen[want] += 1
        assert _may_share(a, b) == _may_share(b, a) == want, (ld, rows, cols, a.storage_offset(), b.storage_offset())
        if reason is None:  # the C++ rule: vs and out of one layer
            G, M = torch.randn(rows, cols), torch.randn(rows, cols)
            call = lambda: torch.ops.apo.precondition_momentum_grouped(
                [G], [M], MU, [None], [torch.ones(rows, cols)], [None], [a], [b])
            if want:
                with pytest.raises(ValueError, match=r"vs\[0\] shares memory with out\[0\]"):
                    call()
            else:
                call()
    assert min(seen.values()) > 50  # both answers were put to the test


# ---------------------------------------------------------------------------------------------
# 6. Empty lists
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_lists(backend):
    assert flag_pair(apo_kernels.precondition_momentum_grouped([], [], MU, [], [], [], vs=[], out=[],
                                                               backend=backend)) == (True, True)
    with pytest.raises(ValueError, match=r"momentum must be a finite number"):
        apo_kernels.precondition_momentum_grouped([], [], math.nan, [], [], [], vs=[], out=[], backend=backend)


def test_registered_op_empty_lists():
    """No layers: nothing to compute, every (no) v and Y is finite."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    assert flag_pair(torch.ops.apo.precondition_momentum_grouped([], [], MU, [], [], [], [], [])) == (True, True)


# ---------------------------------------------------------------------------------------------
# 7. v in float16/bfloat16 is SGD's rounding too (last: the cases above run first under -x)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", list(_contract.HALF_DTYPES), ids=str)
@pytest.mark.parametrize("mu", MOMENTA, ids=lambda mu: f"mu={mu:.3g}")
def test_v_bit_identical_to_torch_half(backend, dtype, mu):
    """The op's docstring promises SGD's rounding for every dtype: in float16/bfloat16 torch's
    ``m.mul(μ)`` multiplies in float32 by the float μ, then rounds (μ itself is not rounded to the
    tensor's dtype), then ``add_(g)`` rounds again."""
    check_v_bits(backend, dtype, mu)


# ---------------------------------------------------------------------------------------------
# 8. torch.library: the registered op's fake kernel, opcheck and torch.compile
# ---------------------------------------------------------------------------------------------
def test_registered_op_passes_opcheck_and_compiles():
    """The fake kernel checks the inputs and gives the flags' shape, so opcheck passes (schema,
    fake, mutations of vs and out) and torch.compile(fullgraph=True) traces a call."""
    reason = backend_skip_reason("cpu")
    if reason:
        pytest.skip(f"cpu: {reason}")
    grads, momenta, As, Ss, Bs = make_step(MIXED[:3], torch.float32)
    vs, out = nan_like(grads), nan_like(grads)
    args = (grads, momenta, MU, As, Ss, Bs, vs, out)
    torch.library.opcheck(torch.ops.apo.precondition_momentum_grouped.default, args)

    @torch.compile(fullgraph=True, backend="eager")
    def fused_step(grads, momenta, As, Ss, Bs, vs, out):
        return torch.ops.apo.precondition_momentum_grouped(grads, momenta, MU, As, Ss, Bs, vs, out)

    torch.ops.apo.precondition_momentum_grouped(*args)  # eager (opcheck ran on copies)
    vs2, out2 = nan_like(grads), nan_like(grads)
    assert flag_pair(fused_step(grads, momenta, As, Ss, Bs, vs2, out2), grads) == (True, True)
    for a, b, c, d in zip(vs, vs2, out, out2):
        assert torch.equal(a, b) and torch.equal(c, d)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = [torch.empty(5, 3) for _ in range(5)]
        with pytest.raises(ValueError, match=r"layer 0: vs must have the shape of grad \(5, 3\), got \(3, 5\)"):
            torch.ops.apo.precondition_momentum_grouped([fake[0]], [fake[1]], MU, [None], [fake[2]], [None],
                                                        [torch.empty(3, 5)], [fake[4]])

"""Triton backend: the kernels of apo_kernels.ops.triton_kernels against the float64 reference.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when triton is *imported* (jit decorators read TRITON_INTERPRET then), so it must be set
before that: tests/conftest.py sets it for the whole session; the lines below do the same when
this file is run on its own, and only if triton is not imported yet (setting it later would not
switch the already-decorated kernels and would only confuse ``is_interpreter()``).

Sizes are kept small: the interpreter runs each program in Python (a 512³ matmul takes ~1.7 s).
The ahead-of-time compile check (sm_80/sm_90, no GPU) runs in a subprocess without
TRITON_INTERPRET, since interpreted kernels cannot be compiled.
"""
import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

tk = pytest.importorskip("apo_kernels.ops.triton_kernels", reason="triton is not installed")
import _contract  # noqa: E402
from apo_kernels.ops import reference as ref  # noqa: E402
from apo_kernels.ops import triton_aot  # noqa: E402

INTERPRETED = tk.is_interpreter()
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA device and TRITON_INTERPRET!=1 (set it before triton is imported)"
)

# Relative Frobenius error bounds vs the float64 reference (of the dtype-rounded inputs).
# On a GPU fp32 dots run as tf32x3 (or tf32 if torch allows it), hence the looser GPU bound.
TOL = {torch.float32: 1e-5 if INTERPRETED else 5e-5}
if not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
    TOL[torch.float32] = 5e-3


def half_policy(dtype):
    """float16/bfloat16 contract (tests/_contract.py): fp32 intermediates, rounded once on store. The
    interpreter's bf16 cast truncates (rounded once toward zero); on a GPU it rounds to nearest."""
    return _contract.TRUNCATED_ONCE if INTERPRETED and dtype == torch.bfloat16 else _contract.ROUNDED_ONCE


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 1), (17, 129), (64, 64), (257, 63)]
ALL = (True, True, True, True)
META = (False, True, True, True)


def _ids(shape):
    return "x".join(map(str, shape))


def dtype_id(dtype):
    """Test id of a dtype; interpreted, fp16/bf16 dots are computed in fp32 (the interpreter cannot
    do bf16 arithmetic), so those ids say that their half-precision dot operands never ran."""
    name = str(dtype).replace("torch.", "")
    return f"{name}-interpreted-fp32-dots" if INTERPRETED and dtype != torch.float32 else name


def make(m, n, dtype=torch.float32, L=None, seed=0):
    """(dY, G, A, S, B) in ``dtype``; A, B scaled by 1/√dim so fp16 stays far from overflow."""
    gen = torch.Generator().manual_seed(seed + 1000 * m + n)
    b = () if L is None else (L,)

    def r(*shape, scale=1.0):
        return (torch.randn(*b, *shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return r(m, n), r(m, n), r(m, m, scale=m ** -0.5), r(m, n), r(n, n, scale=n ** -0.5)


def rel_err(x, ref64):
    assert x.dtype != torch.float64
    den = ref64.norm().clamp_min(1e-30)
    return ((x.double() - ref64).norm() / den).item()


def check(out, expected, dtype, what="", chain=None):
    """``chain``: the same output by the torch formulas in ``dtype`` (half precision needs it)."""
    assert out.is_contiguous(), what
    assert torch.isfinite(out).all(), what
    return _contract.check(out, expected, dtype, TOL.get(dtype), chain=chain, what=what, policy=half_policy(dtype))


def d64(*ts):
    return [t.double().cpu() for t in ts]


@pytest.fixture
def force_tiled(monkeypatch):
    """Send every layer to the tiled-GEMM path."""
    monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)


# --------------------------------------------------------------------------------------------
# forward / backward of one layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward(shape, dtype):
    if dtype != torch.float32 and shape == (257, 63):
        pytest.skip("half precision covered on the tiled path by (17, 129); keeps the interpreter fast")
    _, G, A, S, B = make(*shape, dtype)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), dtype, "Y",
          chain=ref.precondition(G, A, S, B))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("mask", [ALL, META], ids=["all", "meta"])
def test_backward_fp32(shape, mask):
    dY, G, A, S, B = make(*shape)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, mask)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B), output_mask=mask)
    for name, need, o, r in zip(("dG", "dA", "dS", "dB"), mask, outs, refs):
        if need:
            check(o, r, torch.float32, name)
        else:
            assert o is None, name


@pytest.mark.parametrize("shape", [(7, 1), (64, 64), (17, 129)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_backward_half(shape, dtype):
    dY, G, A, S, B = make(*shape, dtype)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B))
    chains = ref.precondition_backward(dY, G, A, S, B)
    for name, o, r, c in zip(("dG", "dA", "dS", "dB"), outs, refs, chains):
        check(o, r, dtype, name, chain=c)


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("mask", [m for m in __import__("itertools").product((False, True), repeat=4)],
                         ids=lambda m: "".join("TF"[not v] for v in m))
def test_backward_every_mask(mask, path, monkeypatch):
    if path == "tiled":
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    dY, G, A, S, B = make(9, 5)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, mask)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B), output_mask=mask)
    for name, need, o, r in zip(("dG", "dA", "dS", "dB"), mask, outs, refs):
        if need:
            check(o, r, torch.float32, name)
        else:
            assert o is None, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_tiled_path_on_small_shapes(force_tiled, dtype):
    dY, G, A, S, B = make(20, 33, dtype)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), dtype, "Y",
          chain=ref.precondition(G, A, S, B))
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    refs, chains = ref.precondition_backward(*d64(dY, G, A, S, B)), ref.precondition_backward(dY, G, A, S, B)
    for name, o, r, c in zip(("dG", "dA", "dS", "dB"), outs, refs, chains):
        check(o, r, dtype, name, chain=c)


def _recorded_kernels(fn, shapes, dtype=torch.float32):
    """Names of the kernels ``fn`` launches for meta layers of ``shapes`` (recording mode)."""
    layers = [[torch.empty(*sh, dtype=dtype, device="meta") for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]
              for m, n in shapes]
    with triton_aot.recording() as rec:
        fn(layers)
    return sorted({k.__name__ for k, *_ in rec})


def test_fused_path_limit():
    """Layers up to FUSED_MAX_DIM take the fused programs (batched and grouped), larger ones the GEMMs."""
    lim = tk.FUSED_MAX_DIM
    single = lambda ls: tk.triton_precondition(*ls[0][1:])  # noqa: E731
    grouped_bwd = lambda ls: tk.triton_precondition_grouped_backward(*(list(c) for c in zip(*ls)), ALL)  # noqa: E731
    assert _recorded_kernels(single, [(lim, lim)]) == ["_fused_fwd_kernel"]
    assert _recorded_kernels(single, [(lim + 1, 3)]) == ["_gemm_kernel"]
    assert _recorded_kernels(grouped_bwd, [(lim, 5), (3, lim)]) == ["_grouped_bwd_kernel"]
    assert _recorded_kernels(grouped_bwd, [(lim, 5), (lim + 1, 5)]) == ["_gemm_kernel", "_grouped_bwd_kernel"]


def test_fused_boundary():
    dY, G, A, S, B = make(tk.FUSED_MAX_DIM, 50, torch.bfloat16)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.bfloat16, "Y",
          chain=ref.precondition(G, A, S, B))


@pytest.mark.parametrize("shape", [(5, 3), (40, 130)], ids=_ids)
def test_batched(shape):
    dY, G, A, S, B = make(*shape, L=3)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, ref.precondition_backward(*d64(dY, G, A, S, B))):
        check(o, r, torch.float32, name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "tiled"])
def test_non_contiguous(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    m, n = 12, 7
    dY, G, A, S, B = make(n, m)  # transposed views below are (m, n)
    _, _, A2, _, B2 = make(m, n)
    dYt, Gt, St = dY.t(), G.t(), S.t()
    At = A2.t()
    Bs = torch.cat([B2, B2], dim=1)[:, ::2]  # column stride 2
    assert not (Gt.is_contiguous() or At.is_contiguous() or Bs.is_contiguous())
    check(tk.triton_precondition(Gt, At, St, Bs), ref.precondition(*d64(Gt, At, St, Bs)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dYt, Gt, At, St, Bs, ALL)
    refs = ref.precondition_backward(*d64(dYt, Gt, At, St, Bs))
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, refs):
        check(o, r, torch.float32, name)
    # batched, with the batch dim not outermost in memory
    L = 2
    Gb = torch.randn(m, L, n, device=DEVICE).transpose(0, 1)
    Ab = torch.randn(L, m, m, device=DEVICE).transpose(1, 2) / m ** 0.5
    Sb = torch.randn(L, m, n, device=DEVICE)
    Bb = torch.randn(L, n, n, device=DEVICE) / n ** 0.5
    check(tk.triton_precondition(Gb, Ab, Sb, Bb), ref.precondition(*d64(Gb, Ab, Sb, Bb)), torch.float32, "Yb")


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=_ids)
def test_zero_size(shape):
    m, n = shape
    dY, G, A, S, B = (torch.randn(*sh, device=DEVICE) for sh in ((m, n), (m, n), (m, m), (m, n), (n, n)))
    y = tk.triton_precondition(G, A, S, B)
    assert y.shape == (m, n)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for o, r in zip(outs, ref.precondition_backward(dY, G, A, S, B)):
        assert o.shape == r.shape and torch.equal(o, r.to(o.dtype))


# --------------------------------------------------------------------------------------------
# grouped
# --------------------------------------------------------------------------------------------

GROUP = [(1, 1), (7, 1), (1, 7), (17, 129), (64, 64), (33, 20), (7, 1), (130, 9)]


def _group(dtype):
    return [make(m, n, dtype, seed=i) for i, (m, n) in enumerate(GROUP)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grouped_forward(dtype):
    layers = _group(dtype)
    _, G, A, S, B = (list(c) for c in zip(*layers))
    outs = tk.triton_precondition_grouped(G, A, S, B)
    assert len(outs) == len(GROUP)
    chains = ref.precondition_grouped(G, A, S, B)
    for i, (y, r) in enumerate(zip(outs, ref.precondition_grouped(*(d64(*c) for c in (G, A, S, B))))):
        check(y, r, dtype, f"layer {i}", chain=chains[i])


@pytest.mark.parametrize("mask", [ALL, META, (False, False, True, False)], ids=["all", "meta", "dS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_grouped_backward(mask, dtype):
    layers = _group(dtype)
    cols = [list(c) for c in zip(*layers)]
    outs = tk.triton_precondition_grouped_backward(*cols, mask)
    refs = ref.precondition_grouped_backward(*(d64(*c) for c in cols), output_mask=mask)
    chains = ref.precondition_grouped_backward(*cols, output_mask=mask)
    for k, name in enumerate(("dG", "dA", "dS", "dB")):
        if not mask[k]:
            assert outs[k] == []
            continue
        assert len(outs[k]) == len(GROUP)
        for i, (o, r) in enumerate(zip(outs[k], refs[k])):
            check(o, r, dtype, f"{name}[{i}]", chain=chains[k][i])


def test_grouped_one_launch_per_block_shape(monkeypatch):
    """All small layers with one padded block shape go through a single grouped launch."""
    launches = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda k, grid, *a, **kw: (launches.append((k.__name__, grid)), real(k, grid, *a, **kw)))
    shapes = [(3, 5), (9, 2), (16, 16), (20, 3)]  # blocks 16×16, 16×16, 16×16, 32×16
    layers = [make(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    _, G, A, S, B = (list(c) for c in zip(*layers))
    tk.triton_precondition_grouped(G, A, S, B)
    assert sorted(launches) == [("_grouped_fwd_kernel", (1,)), ("_grouped_fwd_kernel", (3,))]


def test_grouped_copies_one_table_per_call(monkeypatch):
    """Layers of several launches (block shapes, identity patterns) share one table copy per call."""
    tables = []
    real = tk._table
    monkeypatch.setattr(tk, "_table", lambda rows, *a: (tables.append(len(rows)), real(rows, *a))[1])
    shapes = [(3, 5), (20, 3), (9, 2)]  # blocks 16×16, 32×16, 16×16
    layers = [make(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    dY, G, A, S, B = (list(c) for c in zip(*layers))
    A[2] = None  # a third launch: the identity pattern of layer 2
    ys = tk.triton_precondition_grouped(G, A, S, B)
    outs = tk.triton_precondition_grouped_backward(dY, G, A, S, B, ALL)
    assert tables == [3, 3]
    for i, (dy, g, a, s, b) in enumerate(zip(dY, G, A, S, B)):  # each launch read its own rows
        a64 = torch.eye(g.shape[0], dtype=torch.float64) if a is None else a.double()
        check(ys[i], ref.precondition(g.double(), a64, s.double(), b.double()), torch.float32, f"Y[{i}]")
        refs = ref.precondition_backward(*d64(dy, g), a64, *d64(s, b))
        _check_backward([o[i] for o in outs], refs, None, ALL, a, b, torch.float32, f"layer {i}: ")


def test_grouped_empty_and_zero_layers():
    assert tk.triton_precondition_grouped([], [], [], []) == []
    assert tk.triton_precondition_grouped_backward([], [], [], [], [], ALL) == ([], [], [], [])
    dY, G, A, S, B = make(4, 3)
    z = [torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 0, device=DEVICE), torch.zeros(0, 3, device=DEVICE),
         torch.zeros(3, 3, device=DEVICE)]
    outs = tk.triton_precondition_grouped([G, z[0]], [A, z[1]], [S, z[2]], [B, z[3]])
    assert outs[1].shape == (0, 3)
    dG, dA, dS, dB = tk.triton_precondition_grouped_backward([dY, z[0]], [G, z[0]], [A, z[1]], [S, z[2]],
                                                             [B, z[3]], ALL)
    assert dB[1].shape == (3, 3) and torch.equal(dB[1], torch.zeros_like(dB[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compiled_half_layers_never_round_an_intermediate(dtype, monkeypatch):
    """Compiled for a GPU (the launches are recorded, not run), a product gets fp16/bf16 dot operands
    only when both are the layer's own half inputs, which half holds exactly: every fp32
    intermediate enters its products in fp32, so the result is rounded once, on store (the
    interpreted tests check the values against tests/_contract.py; the interpreter computes every
    dot in fp32, so only the compiled launch configuration shows this)."""
    monkeypatch.setattr(tk, "is_interpreter", lambda: False)
    half_gemms = 0
    for m, n in [(13, 7), (129, 200)]:
        for a_id, b_id in [(False, False), (True, False), (False, True)]:
            dY, G, A, S, B = [torch.empty(*sh, dtype=dtype, device="meta")
                              for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]
            A, B = (None if a_id else A), (None if b_id else B)
            with triton_aot.recording() as rec:
                tk.triton_precondition(G, A, S, B)
                tk.triton_precondition_backward(dY, G, A, S, B, ALL)
                tk.triton_precondition_grouped_backward([dY], [G], [A], [S], [B], ALL)
            for kernel, args, consts, _ in rec:
                if consts["DOT_DT"] == 0:
                    continue
                assert kernel is tk._gemm_kernel, f"{kernel.__name__} {m}x{n}: half dot operands"
                operands = ("x", "y", "x2", "y2") if consts["DUAL"] else ("x", "y")
                got = {k: args[k].dtype for k in operands}
                assert all(d == dtype for d in got.values()), f"{m}x{n}, identity {a_id, b_id}: {got}"
                half_gemms += 1
    assert half_gemms > 0  # products of two half inputs (G B, dY B, Aᵀ G, ...) still use tensor cores


# --------------------------------------------------------------------------------------------
# identity factors: A = None / B = None
# --------------------------------------------------------------------------------------------

IDENTITIES = {"A": (True, False), "B": (False, True), "AB": (True, True)}
NAMES = ("dG", "dA", "dS", "dB")


def _identity_layer(shape, identity, dtype=torch.float32, L=None, seed=0):
    """(dY, G, A, S, B) with None for the identity factors, and the float64 oracle's inputs with
    explicit ``torch.eye`` in their place."""
    dY, G, A, S, B = make(*shape, dtype, L=L, seed=seed)
    a_id, b_id = IDENTITIES[identity] if isinstance(identity, str) else identity
    A, B = (None if a_id else A), (None if b_id else B)
    eye = lambda k: torch.eye(k, dtype=torch.float64).expand(*G.shape[:-2], k, k)  # noqa: E731
    A64 = eye(G.shape[-2]) if A is None else A.double().cpu()
    B64 = eye(G.shape[-1]) if B is None else B.double().cpu()
    return (dY, G, A, S, B), (*d64(dY, G), A64, *d64(S), B64)


def _eye_chain(dY, G, A, S, B):
    """The torch chain in the layer's dtype with explicit eye factors (the half contract's reference)."""
    eye = lambda k: torch.eye(k, dtype=G.dtype, device=G.device).expand(*G.shape[:-2], k, k)  # noqa: E731
    return dY, G, eye(G.shape[-2]) if A is None else A, S, eye(G.shape[-1]) if B is None else B


def _check_backward(outs, refs, chains, mask, A, B, dtype, what=""):
    """The requested gradients against the oracle; an identity factor's slot is an empty (0,) tensor."""
    for k, name in enumerate(NAMES):
        identity = (k == 1 and A is None) or (k == 3 and B is None)
        if not mask[k]:
            assert outs[k] is None, f"{what}{name}"
        elif identity:
            assert outs[k].shape == (0,) and outs[k].dtype == dtype, f"{what}{name}: {outs[k].shape}"
        else:
            check(outs[k], refs[k], dtype, f"{what}{name}", chain=None if chains is None else chains[k])


# Odd shapes: the fused programs (13×7, padded to 16×16 blocks), the tiled GEMMs forced on the same
# shape (masked tails in one tile), and a layer that is tiled on its own (n > FUSED_MAX_DIM).
IDENTITY_CASES = [("fused", (13, 7)), ("tiled", (13, 7)), ("tiled", (17, 129))]


@pytest.mark.parametrize("identity", list(IDENTITIES))
@pytest.mark.parametrize("case", IDENTITY_CASES, ids=lambda c: f"{c[0]}-{_ids(c[1])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_identity_factors(dtype, case, identity, monkeypatch):
    """A = None / B = None give the op with explicit eye factors: forward and every gradient; the
    identity factor's gradient slot is an empty (0,) tensor."""
    path, shape = case
    if dtype != torch.float32 and shape == (17, 129):
        pytest.skip("half precision covered on the tiled path by the forced 13x7 case; keeps the interpreter fast")
    if path == "tiled":
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    (dY, G, A, S, B), oracle_in = _identity_layer(shape, identity, dtype)
    chain_in = _eye_chain(dY, G, A, S, B)
    half = dtype != torch.float32
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*oracle_in[1:]), dtype, "Y",
          chain=ref.precondition(*chain_in[1:]) if half else None)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    _check_backward(outs, ref.precondition_backward(*oracle_in), ref.precondition_backward(*chain_in) if half else None,
                    ALL, A, B, dtype)


@pytest.mark.parametrize("identity", list(IDENTITIES))
@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_identity_factors_every_mask(path, identity, monkeypatch):
    if path == "tiled":
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    (dY, G, A, S, B), oracle_in = _identity_layer((9, 5), identity)
    for mask in __import__("itertools").product((False, True), repeat=4):
        outs = tk.triton_precondition_backward(dY, G, A, S, B, mask)
        refs = ref.precondition_backward(*oracle_in, output_mask=mask)
        _check_backward(outs, refs, None, mask, A, B, torch.float32, f"mask {mask}: ")


@pytest.mark.parametrize("identity", list(IDENTITIES))
@pytest.mark.parametrize("shape", [(5, 3), (40, 130)], ids=_ids)
def test_identity_factors_batched(shape, identity):
    (dY, G, A, S, B), oracle_in = _identity_layer(shape, identity, L=3)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*oracle_in[1:]), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    _check_backward(outs, ref.precondition_backward(*oracle_in), None, ALL, A, B, torch.float32)


def _gemm_launches(fn, *layer):
    """How many tiled GEMMs ``fn(*layer)`` launches (recorded: one entry per autotune candidate;
    the first config is a candidate of every GEMM)."""
    with triton_aot.recording() as rec:
        fn(*layer)
    return sum(k is tk._gemm_kernel and c["BLOCK_M"] == tk.GEMM_CONFIGS[0][0] for k, _, c, _ in rec)


@pytest.mark.parametrize("identity,forward,backward", [
    (None, 4, 10), ("A", 2, 4), ("B", 2, 4), ("AB", 0, 0),
])
def test_identity_factors_skip_their_gemms(identity, forward, backward):
    """Tiled path: no GEMM multiplies by an identity factor (4 forward and 10 backward GEMMs with
    both factors; an identity A or B halves the forward; both leave elementwise products only)."""
    m, n = 129, 200
    a_id, b_id = IDENTITIES.get(identity, (False, False))
    dY, G, A, S, B = [torch.empty(*sh, device="meta") for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]
    A, B = (None if a_id else A), (None if b_id else B)
    assert _gemm_launches(tk.triton_precondition, G, A, S, B) == forward
    assert _gemm_launches(tk.triton_precondition_backward, dY, G, A, S, B, ALL) == backward


def test_identity_factors_are_constexprs_of_the_fused_programs():
    """The fused programs are compiled per identity pattern (A_ID, B_ID), so an identity costs no product."""
    m, n = 13, 7
    dY, G, A, S, B = [torch.empty(*sh, device="meta") for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]
    with triton_aot.recording() as rec:
        tk.triton_precondition(G, None, S, B)
        tk.triton_precondition_backward(dY, G, A, S, None, ALL)
        tk.triton_precondition_grouped([G, G, G], [None, A, None], [S, S, S], [B, B, None])
    flags = [(k.__name__, c["A_ID"], c["B_ID"]) for k, _, c, _ in rec]
    assert flags == [("_fused_fwd_kernel", True, False), ("_fused_bwd_kernel", False, True),
                     ("_grouped_fwd_kernel", True, False), ("_grouped_fwd_kernel", False, False),
                     ("_grouped_fwd_kernel", True, True)]
    assert rec[1][2]["NEED_B"] is False  # an identity factor's gradient is never computed


# Per layer: (A identity, B identity). Layers of 256+ elements (the half contract's torch-chain
# bound) keep at least one factor, so that an intermediate is left for that bound to see.
GROUP_IDENTITY = [(True, True), (True, False), (True, True), (True, False), (False, True), (False, False),
                  (False, True), (True, False)]


def _group_with_identities(dtype):
    layers = [_identity_layer(sh, ids, dtype, seed=i) for i, (sh, ids) in enumerate(zip(GROUP, GROUP_IDENTITY))]
    cols = [list(c) for c in zip(*(x for x, _ in layers))]
    oracle = [list(c) for c in zip(*(o for _, o in layers))]
    chains = [list(c) for c in zip(*(_eye_chain(*x) for x, _ in layers))]
    return cols, oracle, chains


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grouped_identity_factors(dtype):
    """Grouped forward with a different identity pattern per layer (fused table and tiled layers)."""
    cols, oracle, chains = _group_with_identities(dtype)
    outs = tk.triton_precondition_grouped(*cols[1:])
    want = ref.precondition_grouped(*oracle[1:])
    chain = ref.precondition_grouped(*chains[1:])
    for i, y in enumerate(outs):
        check(y, want[i], dtype, f"layer {i} ({GROUP[i]}, identity {GROUP_IDENTITY[i]})",
              chain=chain[i] if dtype != torch.float32 else None)


@pytest.mark.parametrize("mask", [ALL, META, (True, False, True, False)], ids=["all", "meta", "dG-dS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_grouped_backward_identity_factors(dtype, mask):
    cols, oracle, chains = _group_with_identities(dtype)
    outs = tk.triton_precondition_grouped_backward(*cols, mask)
    refs = ref.precondition_grouped_backward(*oracle, output_mask=mask)
    chain = ref.precondition_grouped_backward(*chains, output_mask=mask) if dtype != torch.float32 else None
    for k, name in enumerate(NAMES):
        if not mask[k]:
            assert outs[k] == [], name
            continue
        assert len(outs[k]) == len(GROUP), name
    for i, (A, B) in enumerate(zip(cols[2], cols[4])):
        _check_backward([o[i] if o else None for o in outs], [r[i] if r else None for r in refs],
                        None if chain is None else [c[i] if c else None for c in chain], mask, A, B, dtype,
                        f"layer {i}: ")


# --------------------------------------------------------------------------------------------
# devices, dtypes, AOT compile
# --------------------------------------------------------------------------------------------


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    G = torch.randn(3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.triton_precondition(G, torch.eye(3), G, torch.eye(4))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.triton_precondition_grouped([G], [torch.eye(3)], [G], [torch.eye(4)])


def test_float64_is_rejected():
    G = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.triton_precondition(G, G.new_ones(3, 3), G, G.new_ones(4, 4))


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU-only: compiled kernels and autotune need a CUDA device")
def test_gpu_large_layer_autotuned():
    dY, G, A, S, B = make(300, 200, torch.bfloat16)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.bfloat16, "Y",
          chain=ref.precondition(G, A, S, B))


def test_aot_compile_sm80_sm90():
    """Every kernel (smoke set: fp32 + bf16, fused + tiled + grouped) compiles for sm_80 and sm_90
    with the runtime's specialization, without register spills."""
    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "apo_kernels.ops.triton_aot", "--level", "smoke", "--arch", "80", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout and "max stack" in proc.stdout


# --------------------------------------------------------------------------------------------
# launch plumbing: index width, grid limits, layer tables, devices, streams, CUDA graphs
# --------------------------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="GPU-only: needs a CUDA device (compiled Triton kernels)")


def test_gemm_candidates_are_the_compiled_ones():
    """The autotuner's candidates come from the same rule as the variants triton_aot compiles: the
    GEMMs of a half input and an fp32 intermediate never take the config that spilled for them,
    whatever the problem size (the size pruning keeps one candidate)."""
    import triton

    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_warps=w, num_stages=st)
               for bm, bn, bk, gm, w, st in tk.GEMM_CONFIGS]
    half, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    mixed = dict(x=half, y=f32, x2=half, y2=f32, DUAL=True)
    plain = dict(x=f32, y=f32, x2=f32, y2=f32, DUAL=True)
    for size in (8, 40, 1000):
        for args in (mixed, plain):
            kept = tk._prune_gemm_configs(configs, {}, M=size, N=size, **args)
            assert kept and {tk._config_tuple(c) for c in kept} <= set(tk.gemm_configs(args, args))
    assert tk._MIXED_EXCLUDED not in tk.gemm_configs(mixed, mixed)
    assert tk.gemm_configs(plain, plain) == tk.GEMM_CONFIGS


def test_gemm_index_width_follows_the_offsets(monkeypatch):
    """The tiled GEMMs switch to int64 index arithmetic exactly when an offset reaches 2^31."""
    def idx64_flags():
        m, n = 129, 200
        ls = [torch.empty(*sh, device="meta") for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]
        with triton_aot.recording() as rec:
            tk.triton_precondition_backward(*ls, ALL)
        return {c["IDX64"] for k, _, c, _ in rec if k is tk._gemm_kernel}

    assert idx64_flags() == {False}
    monkeypatch.setattr(tk, "INT32_OFFSETS", 30000)  # B's largest offset (39999) crosses it, m×n ones (≤ 25799) not
    assert idx64_flags() == {False, True}


def test_gemm_int64_indexing_is_correct(force_tiled, monkeypatch):
    """The int64 index path of the GEMM kernel (forced on a small layer) computes the same op."""
    monkeypatch.setattr(tk, "INT32_OFFSETS", 0)
    dY, G, A, S, B = make(20, 33)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, ref.precondition_backward(*d64(dY, G, A, S, B))):
        check(o, r, torch.float32, name)


def test_table_rows_are_padded_int64():
    table = tk._table([[1, 2, 3], [4, 5, 6]], 8, torch.empty(0))
    assert table.dtype == torch.int64 and table.shape == (2, 8)
    assert table[:, :3].tolist() == [[1, 2, 3], [4, 5, 6]] and not table[:, 3:].any()


def test_captured_table_parts_are_never_reused():
    """Tables copied under CUDA-graph capture come from an arena whose parts are handed out once."""
    arena = tk._CapturedTableArena()
    arena.SIZE = 24
    arena.buf = torch.zeros(arena.SIZE, dtype=torch.int64)  # pinned on a GPU; plain memory is enough here
    a = arena.take(torch.arange(8).view(2, 4))
    b = arena.take(torch.full((2, 4), 7))
    assert a.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and b.tolist() == [[7] * 4] * 2  # a not overwritten
    assert a.data_ptr() != b.data_ptr()
    with pytest.raises(RuntimeError, match="no pinned memory left"):
        arena.take(torch.zeros(9, dtype=torch.int64))


@requires_gpu
def test_fused_programs_do_not_spill():
    """The runtime's own register report (n_spills) of every fused program a 64×64 layer launches."""
    compiled = []
    real = tk._launch

    def spy(*args, **kwargs):
        k = real(*args, **kwargs)
        compiled.append(k)
        return k

    tk._launch = spy
    try:
        for dtype in (torch.float32, torch.bfloat16):
            dY, G, A, S, B = make(64, 64, dtype)
            tk.triton_precondition(G, A, S, B)
            tk.triton_precondition_backward(dY, G, A, S, B, ALL)
            tk.triton_precondition_grouped_backward([dY, dY], [G, G], [A, A], [S, S], [B, B], ALL)
        torch.cuda.synchronize()
    finally:
        tk._launch = real
    assert len(compiled) == 6
    spills = {k.name: k.n_spills for k in compiled if k.n_spills}
    assert not spills, f"register spills: {spills}"


@requires_gpu
def test_batch_beyond_grid_axis_limit(force_tiled):
    """L = 70000 > 65535 (the limit of grid axes 1 and 2) on the tiled GEMMs."""
    dY, G, A, S, B = make(3, 2, L=70000)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, ref.precondition_backward(*d64(dY, G, A, S, B))):
        check(o, r, torch.float32, name)


@requires_gpu
def test_gemm_offsets_beyond_int32():
    """A GEMM whose X has more than 2^31 elements (4 GiB of bf16): rows past the int32 limit are right."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    M, K, N = 2**21 + 64, 1024, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.float32)
    tk._gemm(1, M, N, K, tk._Op(x), tk._Op(y), c, dtype=torch.bfloat16)
    for rows in (slice(0, 64), slice(M - 64, M)):  # the last rows start past 2^31 elements of x
        want = x[rows].double() @ y.double()
        err = ((c[rows].double() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"rows {rows}: relative error {err:.2e}"


@requires_gpu
def test_runs_on_current_stream():
    """Inputs are written on a side stream after a long sleep, then the op is called there: a launch
    on any other stream would read them before they are written (NaN) and fail."""
    layers = [make(m, n, seed=i) for i, (m, n) in enumerate([(7, 5), (64, 64), (130, 70)])]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        staged = [[torch.full_like(t, float("nan")) for t in layer] for layer in layers]
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist
        for dst, src in zip(staged, layers):
            for d, t in zip(dst, src):
                d.copy_(t)
        singles = [tk.triton_precondition(*ls[1:]) for ls in staged]
        grouped = tk.triton_precondition_grouped_backward(*(list(c) for c in zip(*staged)), ALL)
    side.synchronize()
    for (dY, G, A, S, B), y, i in zip(layers, singles, range(len(layers))):
        check(y, ref.precondition(*d64(G, A, S, B)), torch.float32, f"Y[{i}]")
        refs = ref.precondition_backward(*d64(dY, G, A, S, B))
        for k, name in enumerate(("dG", "dA", "dS", "dB")):
            check(grouped[k][i], refs[k], torch.float32, f"{name}[{i}]")


@requires_gpu
def test_cuda_graph_capture_and_replay():
    """The grouped op (fused table path + tiled layers) and a batched layer, captured into a CUDA
    graph, replayed on new input values after pinned host memory was churned: every replay must
    read its own tables."""
    shapes = [(7, 5), (33, 64), (64, 64), (16, 3), (130, 70)]
    layers = [make(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    cols = [list(c) for c in zip(*layers)]
    batch = make(9, 12, L=3, seed=99)

    def run():
        ys = tk.triton_precondition_grouped(*cols[1:])
        grads = tk.triton_precondition_grouped_backward(*cols, ALL)
        yb = tk.triton_precondition(*batch[1:])
        return ys, grads, yb

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, autotunes
        run()
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys, grads, yb = run()

    for replay in range(2):
        gen = torch.Generator().manual_seed(100 + replay)
        for t in [*(t for c in cols for t in c), *batch]:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).div_(t.shape[-1] ** 0.5))
        churn = [torch.full((4096,), -1, dtype=torch.int64).pin_memory() for _ in range(32)]
        graph.replay()
        torch.cuda.synchronize()
        del churn
        want_y = ref.precondition_grouped(*(d64(*c) for c in cols[1:]))
        want_g = ref.precondition_grouped_backward(*(d64(*c) for c in cols))
        for i in range(len(shapes)):
            check(ys[i], want_y[i], torch.float32, f"replay {replay} Y[{i}]")
            for k, name in enumerate(("dG", "dA", "dS", "dB")):
                check(grads[k][i], want_g[k][i], torch.float32, f"replay {replay} {name}[{i}]")
        check(yb, ref.precondition(*d64(*batch[1:])), torch.float32, f"replay {replay} batched Y")


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_launches_on_the_inputs_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1."""
    torch.cuda.set_device(0)
    layers = [[t.to("cuda:1") for t in make(m, n, seed=i)] for i, (m, n) in enumerate([(7, 5), (64, 64), (130, 70)])]
    for dY, G, A, S, B in layers:
        check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.float32, "Y")
    outs = tk.triton_precondition_grouped_backward(*(list(c) for c in zip(*layers)), ALL)
    for i, (dY, G, A, S, B) in enumerate(layers):
        for k, r in enumerate(ref.precondition_backward(*d64(dY, G, A, S, B))):
            assert outs[k][i].device == G.device
            check(outs[k][i], r, torch.float32, f"output {k} of layer {i}")
    assert torch.cuda.current_device() == 0


@requires_gpu
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_public_autograd_on_cuda(grouped):
    """apo_kernels.precondition(_grouped) with backend="triton": autograd gradients vs float64 autograd."""
    import apo_kernels

    layers = [make(m, n, seed=i) for i, (m, n) in enumerate([(7, 5), (64, 64), (130, 70)])]
    if not grouped:
        layers = layers[1:2]
    leaves = [[t.clone().requires_grad_(True) for t in layer[1:]] for layer in layers]
    leaves64 = [[t.detach().double().cpu().requires_grad_(True) for t in ls] for ls in leaves]
    weights = [layer[0] for layer in layers]
    if grouped:
        ys = apo_kernels.precondition_grouped(*(list(c) for c in zip(*leaves)), backend="triton")
        ys64 = ref.precondition_grouped(*(list(c) for c in zip(*leaves64)))
    else:
        ys = [apo_kernels.precondition(*leaves[0], backend="triton")]
        ys64 = [ref.precondition(*leaves64[0])]
    sum((y * w).sum() for y, w in zip(ys, weights)).backward()
    sum((y * w.double().cpu()).sum() for y, w in zip(ys64, weights)).backward()
    for i, (ls, ls64) in enumerate(zip(leaves, leaves64)):
        for name, t, t64 in zip(("G", "A", "S", "B"), ls, ls64):
            check(t.grad.contiguous(), t64.grad, torch.float32, f"layer {i} d{name}")

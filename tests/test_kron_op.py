"""``apo::kron_precondition(grad, L, R, out) -> ()``: out = L·G·R, the step of APO-Precond's kron
structure (``apo_kernels.optim.kron``); L or R None is an identity side.

Oracle: the float64 product of the same inputs, relative Frobenius error ≤ 1e-5 (float32), 1e-10
(float64), 1e-2 (float16, bfloat16: ATen's mm). The inputs cover what the CPU kernel treats
differently: float32 on the oneDNN engine (blocks of rows of L·G, then ·R, over the threads; the
row blocks of a big layer, transposed L and R, a column-major or sliced grad, an out that is not
row-major, which goes to ATen's mm) and ATen's mm for the rest. On the oneDNN engine the bits are
the same at 1, 2 and 3 threads; on the BLAS engine they are torch.mm's, (L·G)·R. The suite runs
under the engine this machine picks and again under the other one (tests/test_cpu_gemm.py).
"""
import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import _validate, backends

pytestmark = pytest.mark.skipif(backends.native_kron_precondition is None,
                                reason="the native module apo_kernels._C is not built")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(1, 1), (10, 257), (256, 41), (37, 53), (130, 7), (300, 1100)]


def op(G, L, R, out):
    torch.ops.apo.kron_precondition(G, L, R, out)
    return out


SIDES = ["L and R", "L only", "R only", "neither"]


def make(m, n, dtype, seed, layout="row-major", sides="L and R"):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    L = torch.randn(m, m, generator=gen, dtype=torch.float64) / m ** 0.5
    R = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    if sides in ("R only", "neither"):
        L = None
    if sides in ("L only", "neither"):
        R = None
    want = (G if L is None else L @ G) if R is None else (G if L is None else L @ G) @ R
    G, L, R = (None if x is None else x.to(dtype) for x in (G, L, R))
    if layout == "transposed":  # column-major grad, L and R
        G, L, R = (None if x is None else x.t().contiguous().t() for x in (G, L, R))
    elif layout == "sliced":  # grad a column slice of a wider matrix
        G = torch.cat([G, torch.zeros(m, 3, dtype=dtype)], 1)[:, :n]
    return G, L, R, want


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("layout", ["row-major", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64(threads, dtype, layout):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, (m, n) in enumerate(SHAPES):
            for sides in SIDES:
                G, L, R, want = make(m, n, dtype, seed=k, layout=layout, sides=sides)
                got = op(G, L, R, torch.empty(m, n, dtype=dtype))
                assert relative_error(got, want) <= TOL[dtype], (m, n, sides)
    finally:
        torch.set_num_threads(before)


def test_an_out_that_is_not_row_major():
    G, L, R, want = make(37, 53, torch.float32, seed=5)
    out = torch.empty(53, 37).t()
    assert relative_error(op(G, L, R, out), want) <= TOL[torch.float32]


def test_same_bits_on_any_thread_count_and_torch_mm_on_blas():
    before = torch.get_num_threads()
    try:
        for k, (m, n) in enumerate(SHAPES + [(1030, 70), (5000, 64)]):
            for sides in SIDES[:3]:
                G, L, R, _ = make(m, n, torch.float32, seed=10 + k, sides=sides)
                outs = []
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    outs.append(op(G, L, R, torch.empty(m, n)))
                if torch.ops.apo.cpu_gemm_engine().startswith("onednn"):
                    assert all(torch.equal(outs[0], o) for o in outs[1:]), (m, n, sides)
                else:  # ATen's mm, as the matmul route computes it (here at 3 threads both)
                    LG = G if L is None else torch.mm(L, G)
                    assert torch.equal(outs[-1], LG if R is None else torch.mm(LG, R)), (m, n, sides)
    finally:
        torch.set_num_threads(before)


def test_empty_layers():
    for m, n in [(0, 5), (4, 0), (0, 0)]:
        out = op(torch.empty(m, n), torch.empty(m, m), torch.empty(n, n), torch.empty(m, n))
        assert out.shape == (m, n)


def test_composite_kernel_agrees():
    """The composite kernel (every device but CPU), reached on CPU tensors by redispatching to its key."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for sides in SIDES:
        G, L, R, want = make(67, 45, torch.float32, seed=7, sides=sides)
        out = torch.empty(67, 45)
        torch.ops.apo.kron_precondition.default.redispatch(composite, G, L, R, out)
        assert relative_error(out, want) <= TOL[torch.float32], sides
    with pytest.raises(ValueError, match="out shares memory with grad"):
        torch.ops.apo.kron_precondition.default.redispatch(composite, G, L, R, G)


def _bad_cases():
    G, L, R = torch.randn(5, 3), torch.randn(5, 5), torch.randn(3, 3)
    out = torch.empty(5, 3)
    return [
        ((torch.randn(5), L, R, out), ValueError, r"grad must be 2-D \(m, n\), got shape \(5,\)"),
        ((G, torch.randn(3, 3), R, out), ValueError, r"L must have shape \(5, 5\) for grad of shape \(5, 3\), got \(3, 3\)"),
        ((G, L, torch.randn(3, 4), out), ValueError, r"R must have shape \(3, 3\) for grad of shape \(5, 3\), got \(3, 4\)"),
        ((G, L.double(), R, out), TypeError, r"L has dtype torch.float64 but grad has torch.float32"),
        ((G, L, R.int(), out), TypeError, r"R has dtype torch.int32; supported dtypes"),
        ((G, L, R, torch.empty(3, 5)), ValueError, r"out must have the shape of grad \(5, 3\), got \(3, 5\)"),
        ((G, L, R, torch.empty(5, 3, dtype=torch.float64)), TypeError, r"out has dtype torch.float64 but grad has"),
        ((G, L, R, torch.empty(1, 3).expand(5, 3)), ValueError, r"out has elements that share memory"),
        ((G, L, R, G), ValueError, r"out shares memory with grad"),
        ((G, L, R, L[:, :3]), ValueError, r"out shares memory with L"),
        ((G.to_sparse(), L, R, out), ValueError, r"grad must be a dense \(strided\) tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_are_refused_naming_them(case):
    """The C++ kernel and the Python rules (the fake kernel's) refuse alike, with the same message."""
    args, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        torch.ops.apo.kron_precondition(*args)
    with pytest.raises(error, match=message):
        _validate.check_kron(*args)


def test_a_meta_tensor_reaches_the_fake_kernel():
    G = torch.empty(5, 3, device="meta")
    with pytest.raises(ValueError, match=r"L must have shape \(5, 5\)"):
        torch.ops.apo.kron_precondition(G, torch.empty(3, 3, device="meta"), torch.empty(3, 3, device="meta"),
                                        torch.empty(5, 3, device="meta"))
    torch.ops.apo.kron_precondition(G, torch.empty(5, 5, device="meta"), torch.empty(3, 3, device="meta"),
                                    torch.empty(5, 3, device="meta"))


def test_opcheck():
    G, L, R, _ = make(9, 7, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.apo.kron_precondition.default, (G, L, R, torch.empty(9, 7)))


@pytest.mark.parametrize("fixed", ["none", "left", "right"])
def test_the_kron_step_calls_it_once_per_layer(monkeypatch, fixed):
    """KronPreconditioner.apply with at most one block per side is one call of the op, into ``out``
    (a fixed side: None there, its diag(u) or diag(v) applied after), and gives what the matmul route
    gives (within rounding: the oneDNN engine sums in another order, the scaling comes last)."""
    from apo_kernels.optim.kron import KronPreconditioner

    calls = []
    real = backends.native_kron_precondition

    def counting(G, L, R, out):
        calls.append((G.shape, L is None, R is None))
        return real(G, L, R, out)

    pc = KronPreconditioner(40, 21, init_s=0.7, learn_left=fixed != "left", learn_right=fixed != "right")
    with torch.no_grad():
        for F in pc.A + pc.B:
            F.add_(torch.randn_like(F) / F.shape[0])
        pc.su.add_(torch.randn_like(pc.su) * 0.1)
        pc.sv.add_(torch.randn_like(pc.sv) * 0.1)
    G = torch.randn(40, 21)
    monkeypatch.setattr(backends, "native_kron_precondition", counting)
    out = torch.empty(40, 21)
    assert pc.apply(G, out=out) is out and calls == [((40, 21), fixed == "left", fixed == "right")]
    monkeypatch.setattr(backends, "native_kron_precondition", None)
    Ls, Rs = pc.factors()
    L = torch.diag(pc.u()) if Ls[0] is None else Ls[0]
    R = torch.diag(pc.v()) if Rs[0] is None else Rs[0]
    matmul = pc.apply(G)
    assert relative_error(out, (L.double() @ G.double() @ R.double())) <= TOL[torch.float32]
    assert relative_error(matmul, out.double()) <= TOL[torch.float32]


def test_the_optimizer_keeps_no_work_buffer_when_every_layer_takes_the_op():
    """``structure="kron"``: every layer with one learnt block per side takes the op, which keeps its
    own intermediate, so the step buffers hold no (m, n) work matrix; a fixed side (a row scaling)
    or a blocked layout takes the matmul route, which needs it."""
    from apo_kernels.optim import APOPrecond
    from apo_kernels.optim.kron import KronPreconditioner

    assert KronPreconditioner(6, 5).native_step
    assert KronPreconditioner(6, 5, learn_left=False).native_step
    assert not KronPreconditioner(6, 5, learn_left=False, learn_right=False).native_step
    assert not KronPreconditioner(6, 5, max_dim=4).native_step
    for max_dim, has_work in ((2048, False), (8, True)):
        model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
        opt = APOPrecond(model, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, structure="kron", meta_interval=0,
                         max_precond_dim=max_dim)
        x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        assert (opt._buffers.work is not None) == has_work, max_dim


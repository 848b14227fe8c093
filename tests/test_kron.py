"""The Kronecker-factored preconditioner (apo_kernels.optim.kron) and APOPrecond(structure="kron").

The reference is autograd through the explicit Kronecker product (L ⊗ R)·vec(G) in float64, with
L = blockdiag(A_i diag(u_i) A_iᵀ) and R = blockdiag(B_j diag(v_j) B_jᵀ) built from φ itself.
The meta-gradient is kron's closed form (∂L = dY·(G·R)ᵀ, ∂R = (L·G)ᵀ·dY, then through
L = A diag(u) Aᵀ), no op call; a second reference for it is the op's fused backward at S² = u vᵀ
followed by the chain rule ∂u = ∂S²·v, ∂v = ∂S²ᵀ·u, on the op backends that take float64 ("cpu"
when the native module is built, "reference").
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apo_kernels.ops.backends import usable
from apo_kernels.optim import APOPrecond, StructuredPreconditioner
from apo_kernels.optim.kron import KronPreconditioner
from apo_kernels.optim.preconditioners import meta_backward_many
from _tiny import one_thread, mlp, data, closure_for  # noqa: F401  (one_thread: autouse fixture)

FLOAT64_BACKENDS = [b for b in ("cpu", "reference") if b in usable("cpu")]
F64 = dict(rtol=1e-10, atol=1e-12)  # float64 against float64 autograd: only summation order differs

# (m, n, max_dim, learn_left, learn_right): odd shapes, splits on one or both sides, identity sides
CASES = [
    (5, 3, None, True, True),
    (7, 5, 3, True, True),       # both sides split (blocks 3+2+2 / 3+2)
    (9, 4, 4, True, False),      # rows split, right side fixed identity
    (5, 9, 4, True, False),      # rows split, a fixed right side longer than max_dim: never split
    (7, 5, None, False, True),   # left fixed identity (an embedding's vocabulary side)
    (6, 7, 4, False, True),      # left identity, columns split
    (4, 3, None, False, False),  # both sides identity: Y = (u vᵀ)⊙G
    (1, 6, None, False, True),   # a parameter flattened to one row (small_full_max)
]


def random_kron(m, n, max_dim, learn_left, learn_right, s_param="log", seed=0):
    torch.manual_seed(seed)
    pc = KronPreconditioner(m, n, init_s=0.7, max_dim=max_dim, learn_left=learn_left,
                            learn_right=learn_right, s_param=s_param, dtype=torch.float64)
    with torch.no_grad():
        for t in pc.A + pc.B:
            t.add_(0.4 * torch.randn_like(t))
        for t in (pc.su, pc.sv):
            t.add_(0.3 * torch.randn_like(t))
    return pc


def explicit(pc, A, su, sv, B):
    """(L ⊗ R) as an (mn, mn) matrix, differentiable in the given φ tensors."""
    to_pos = (lambda s: torch.exp(2 * s)) if pc.s_param == "log" else (lambda s: s * s)
    u, v = to_pos(su), to_pos(sv)

    def side(blocks, scale, offsets):
        if not blocks:  # fixed identity side: diag of the scales
            return torch.diag(scale)
        return torch.block_diag(*[(b * scale[o0:o1]) @ b.T for b, (o0, o1) in zip(blocks, offsets)])

    L, R = side(A, u, pc.row_blocks), side(B, v, pc.col_blocks)
    # Y = L·G·R and R = Rᵀ, so the row-major vec(Y) = (L ⊗ R)·vec(G)
    return torch.kron(L, R)


@pytest.mark.parametrize("s_param", ["log", "linear"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_apply_and_meta_gradient_match_autograd_through_explicit_kron(case, s_param):
    m, n = case[:2]
    pc = random_kron(*case, s_param=s_param)
    g = torch.Generator().manual_seed(5)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    dY = torch.randn(m, n, generator=g, dtype=torch.float64)

    leaves = [t.detach().clone().requires_grad_(True) for t in pc.parameters()]
    nA, nB = len(pc.A), len(pc.B)
    A, su, sv, B = leaves[:nA], leaves[nA], leaves[nA + 1], leaves[nA + 2:]
    y_ref = explicit(pc, A, su, sv, B) @ G.reshape(-1)
    ref_grads = torch.autograd.grad((y_ref * dY.reshape(-1)).sum(), leaves)

    torch.testing.assert_close(pc.apply(G), y_ref.detach().reshape(m, n), **F64)
    assert len(ref_grads) == len(pc.parameters()) == nA + 2 + nB
    for backend in FLOAT64_BACKENDS:
        for t in pc.parameters():
            t.grad = None
        pc.meta_backward(dY, G, backend=backend)
        for t, r in zip(pc.parameters(), ref_grads):
            torch.testing.assert_close(t.grad, r, **F64, msg=lambda s: f"{backend}: {s}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_apply_into_given_buffers_is_the_fresh_apply_bit_for_bit(case):
    """apply(G, out=, work=) writes the same values as the fresh apply; with one block per side Y is
    ``out`` itself (a blocked layout assembles a fresh Y and leaves the buffers alone)."""
    pc = random_kron(*case)
    m, n = pc.shape
    G = torch.randn(m, n, dtype=torch.float64)
    out, work = torch.full((m, n), float("nan"), dtype=torch.float64), torch.empty(m, n, dtype=torch.float64)
    Y = pc.apply(G, out=out, work=work)
    assert torch.equal(Y, pc.apply(G))
    single = len(pc.row_blocks) == 1 and len(pc.col_blocks) == 1
    assert (Y is out) == single and (single or bool(out.isnan().all()))


def test_kron_is_the_full_structure_at_rank_one_s2():
    """Same Y as StructuredPreconditioner (the op) with S² = u vᵀ, A, B copied; split tiles too."""
    pc = random_kron(7, 5, 3, True, True)
    full = StructuredPreconditioner(7, 5, max_dim=3, dtype=torch.float64)
    with torch.no_grad():
        for dst, src in zip(full.A + full.B, pc.A + pc.B):
            dst.copy_(src)
        full.S.copy_(0.5 * torch.log(pc.S2()))
    G = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(pc.apply(G), full.apply(G, backend="reference"), **F64)


def test_factors_are_cached_until_phi_changes():
    pc = random_kron(6, 4, None, True, True)
    L1, R1 = pc.factors()
    L2, R2 = pc.factors()
    assert L1[0] is L2[0] and R1[0] is R2[0]  # no φ write: no rebuild
    G = torch.randn(6, 4, dtype=torch.float64)
    # every way φ changes is seen: a meta-optimizer step, a recovery's rescale, an in-place edit
    opt = torch.optim.Adam(pc.parameters(), lr=0.1)
    for t in pc.parameters():
        t.grad = torch.randn_like(t)
    opt.step()
    ref = explicit(pc, pc.A, pc.su, pc.sv, pc.B) @ G.reshape(-1)
    torch.testing.assert_close(pc.apply(G), ref.reshape(6, 4), **F64)
    before = pc.apply(G)
    pc.scale_s2(0.25)
    torch.testing.assert_close(pc.apply(G), 0.25 * before, **F64)
    with torch.no_grad():
        pc.B[0].mul_(2.0)
    torch.testing.assert_close(pc.apply(G), 4 * 0.25 * before, **F64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_closed_form_meta_gradient_is_the_ops_backward_at_rank_one_s2(case, monkeypatch):
    """The closed form against the op's fused backward through the full structure with the same A,
    B and S² = u vᵀ, then ∂u = ∂S²·v, ∂v = ∂S²ᵀ·u; and the closed form calls no op."""
    m, n, max_dim, learn_left, learn_right = case
    pc = random_kron(*case)
    full = StructuredPreconditioner(m, n, max_dim=max_dim, learn_left=learn_left, learn_right=learn_right,
                                    dtype=torch.float64)
    with torch.no_grad():
        for dst, src in zip(full.A + full.B, pc.A + pc.B):
            dst.copy_(src)
        full.S.copy_(0.5 * torch.log(pc.S2()))  # "log": S² = exp(2S)
    g = torch.Generator().manual_seed(9)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    dY = torch.randn(m, n, generator=g, dtype=torch.float64)
    u, v = pc.u(), pc.v()
    for backend in FLOAT64_BACKENDS:
        for t in full.parameters():
            t.grad = None
        full.meta_backward(dY, G, backend=backend)
        dS2 = full.S.grad / (2.0 * full.S2())  # undo ∂S = 2·S²⊙∂S²
        expect_su, expect_sv = 2.0 * u * (dS2 @ v), 2.0 * v * (dS2.T @ u)  # then through u = exp(2·su)
        for t in pc.parameters():
            t.grad = None

        def no_op(*args, **kwargs):
            raise AssertionError("kron's meta-gradient called the op")

        with monkeypatch.context() as mp:
            mp.setattr("apo_kernels.optim.preconditioners._grouped_backward", no_op)
            pc.meta_backward(dY, G, backend=backend)
        torch.testing.assert_close(pc.su.grad, expect_su, **F64)
        torch.testing.assert_close(pc.sv.grad, expect_sv, **F64)
        for a, b in zip(pc.A + pc.B, full.A + full.B):
            torch.testing.assert_close(a.grad, b.grad, **F64)


def test_many_layers_take_their_own_meta_gradient():
    """meta_backward_many over kron preconditioners (mixed identity sides) = each layer's own
    closed form, the same values."""
    pcs = [random_kron(*c, seed=i) for i, c in enumerate(CASES[:5])]
    Gs = [torch.randn(pc.shape, dtype=torch.float64) for pc in pcs]
    dYs = [torch.randn(pc.shape, dtype=torch.float64) for pc in pcs]
    meta_backward_many(pcs, dYs, Gs, backend="reference")
    grouped = [t.grad.clone() for pc in pcs for t in pc.parameters()]
    for pc, dY, G in zip(pcs, dYs, Gs):
        for t in pc.parameters():
            t.grad = None
        pc.meta_backward(dY, G, backend="reference")
    for a, b in zip(grouped, [t.grad for pc in pcs for t in pc.parameters()]):
        torch.testing.assert_close(a, b, **F64)


def test_fixed_side_has_no_factor_matrix():
    pc = KronPreconditioner(100000, 8, learn_left=False)
    assert [tuple(t.shape) for t in pc.parameters()] == [(100000,), (8,), (8, 8)]
    G = torch.randn(100000, 8)
    torch.testing.assert_close(pc.apply(G), G)  # init_s = 1: identity step


@pytest.mark.parametrize("bad, exc", [(0.0, ValueError), (-1.0, ValueError), ("1", TypeError)])
def test_bad_init_s_names_the_argument(bad, exc):
    with pytest.raises(exc, match="init_s"):
        KronPreconditioner(3, 3, init_s=bad)


# --------------------------------------------------------------------------------------------
# APOPrecond(structure="kron")
# --------------------------------------------------------------------------------------------
def kw(**extra):
    base = dict(lr=0.1, lambda_fsd=0.1, lambda_wsd=0.1, meta_lr=0.05, meta_interval=3)
    base.update(extra)
    return base


@pytest.mark.parametrize("bad, exc", [("block", ValueError), ("Kron", ValueError), (1, TypeError), (None, TypeError)])
def test_structure_is_validated(bad, exc):
    with pytest.raises(exc, match="structure"):
        APOPrecond(mlp(), structure=bad, **kw())


def test_kron_without_meta_learning_is_the_full_structure():
    """meta_lr = 0: φ stays at its start (S² = init_s² in both), so both structures take the same
    steps (SGD with momentum), including the meta-steps' recoveries."""
    x, y = data(dtype=torch.float64)
    models = [mlp(dtype=torch.float64), mlp(dtype=torch.float64)]
    opts = [APOPrecond(m, structure=s, **kw(meta_lr=0.0)) for m, s in zip(models, ("full", "kron"))]
    for _ in range(7):
        for m, o in zip(models, opts):
            o.step(closure_for(o, m, x, y), fsd_inputs=(x,))
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, **F64)


def test_kron_trains_and_its_step_uses_the_current_factors():
    x, y = data()
    model = mlp()
    opt = APOPrecond(model, structure="kron", **kw())
    loss0 = closure_for(opt, model, x, y)().item()
    for _ in range(30):
        opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
    assert opt.meta_steps == 10 and opt.skipped_steps == 0
    assert closure_for(opt, model, x, y)().item() < 0.7 * loss0
    stats = opt.preconditioner_stats()
    assert stats["0"]["a_dist"] > 0 and stats["0"]["b_dist"] > 0  # the factors were learnt
    # the step after the last meta-step used L, R of the current φ
    for layer in opt.layers:
        pc = layer.precond
        G = torch.randn(pc.shape, dtype=torch.float64)
        K = explicit(pc, [a.double() for a in pc.A], pc.su.double(), pc.sv.double(), [b.double() for b in pc.B])
        torch.testing.assert_close(pc.apply(G.float()).double(), (K @ G.reshape(-1)).reshape(pc.shape),
                                   rtol=1e-4, atol=1e-6)  # float32 φ


def test_kron_state_dict_round_trip_resumes_bit_identically():
    x, y = data()

    def make():
        m = mlp()
        return m, APOPrecond(m, structure="kron", **kw(meta_interval=2))

    m1, o1 = make()
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))
    sd_model, sd_opt = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))
    m2, o2 = make()
    o2.step(closure_for(o2, m2, x, y), fsd_inputs=(x,))  # its cached L, R must not survive the load
    m2.load_state_dict(sd_model)
    o2.load_state_dict(sd_opt)
    for _ in range(5):
        o2.step(closure_for(o2, m2, x, y), fsd_inputs=(x,))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(o1.phi, o2.phi):
        assert torch.equal(a, b)


def test_state_dict_of_the_other_structure_is_refused():
    kron = APOPrecond(mlp(), structure="kron", **kw())
    full = APOPrecond(mlp(), **kw())
    with pytest.raises(ValueError, match="structure"):
        full.load_state_dict(kron.state_dict())
    with pytest.raises(ValueError, match="structure"):
        kron.load_state_dict(full.state_dict())


def test_kron_embedding_keeps_the_vocabulary_side_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 6), nn.Flatten(), nn.Linear(12, 3))
    opt = APOPrecond(model, structure="kron", **kw())
    emb = opt.layers[0].precond
    assert emb.A == [] and emb.su.shape == (50,) and emb.B[0].shape == (6, 6)
    x = torch.randint(0, 50, (16, 2))
    y = torch.randint(0, 3, (16,))
    for _ in range(4):
        opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
    assert opt.meta_steps == 2 and opt.skipped_steps == 0

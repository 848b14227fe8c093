"""APO-Precond (apo_kernels.optim.APOPrecond) and the lower layer it stands on (optim.snapshot, optim.objective, optim.preconditioners).

Small models only (2 CPU cores); the whole file runs in well under a minute.
"""
import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import apo_kernels
from apo_kernels.optim import APOPrecond, StructuredPreconditioner
from apo_kernels.optim.objective import proximal_objective_grad
from apo_kernels.optim import preconditioners
from apo_kernels.optim.preconditioners import split_sizes
from apo_kernels.layers import LinearView, register_layer
from apo_kernels.ops import reference
from _tiny import one_thread, mlp, data, closure_for  # noqa: F401  (one_thread: autouse fixture)





def opt_kwargs(**kw):
    base = dict(lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    base.update(kw)
    return base


# --------------------------------------------------------------------------------------------
# Exactness: identity φ, restoration, resume
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_identity_phi_without_meta_steps_is_sgd_bit_for_bit(momentum, weight_decay):
    # lr = 1/16 and s_param="linear": S = 1/4 is exact, so S² = lr exactly and A = B = I are exact
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    x, y = data()
    apo = APOPrecond(m1, **opt_kwargs(lr=0.0625, meta_interval=0, momentum=momentum,
                                      weight_decay=weight_decay, update_scale=1.0, s_param="linear"))
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=momentum, weight_decay=weight_decay)
    for _ in range(5):
        apo.step(closure_for(apo, m1, x, y))
        sgd.step(closure_for(sgd, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_step_without_closure_uses_existing_grads_and_meta_step_requires_closure():
    m = mlp()
    x, y = data()
    opt = APOPrecond(m, **opt_kwargs(meta_interval=2))
    with pytest.raises(ValueError, match="closure"):
        F.cross_entropy(m(x), y).backward()
        opt.step()  # step 0 is a meta-step
    loss = opt.step(closure_for(opt, m, x, y))
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    before = [p.clone() for p in m.parameters()]
    assert opt.step() is None  # step 1: no meta-update, plain loss.backward(); opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def test_meta_step_restores_params_buffers_grads_and_rng_exactly():
    torch.manual_seed(0)
    m = BNNet()
    x, y = data()
    params = list(m.parameters())
    opt = APOPrecond(m, **opt_kwargs())
    closure_for(opt, m, x, y)()
    deltas = [torch.randn_like(p) for p in params]
    state = ([p.clone() for p in params], [b.clone() for b in m.buffers()],
             [p.grad.clone() for p in params], torch.get_rng_state())
    proximal_objective_grad(m, params, deltas, closure_for(opt, m, x, y),
                            fsd_inputs=(x,), lambda_fsd=1.0, lambda_wsd=1.0)
    for a, b in zip(state[0], params):
        assert torch.equal(a, b)
    for a, b in zip(state[1], m.buffers()):
        assert torch.equal(a, b)
    for a, b in zip(state[2], params):
        assert torch.equal(a, b.grad)
    assert torch.equal(state[3], torch.get_rng_state())

    # End to end: with meta_lr = 0 a meta-step changes nothing, so a run with meta-steps (BN +
    # dropout + FSD forwards in train mode) equals a run without, parameters and buffers alike.
    torch.manual_seed(0)
    m1 = BNNet()
    m2 = copy.deepcopy(m1)
    o1 = APOPrecond(m1, **opt_kwargs(meta_lr=0.0, meta_interval=1, lambda_fsd=1.0, lambda_wsd=0.1))
    o2 = APOPrecond(m2, **opt_kwargs(meta_interval=0))
    for o, mm in ((o1, m1), (o2, m2)):
        torch.manual_seed(5)
        for _ in range(4):
            o.step(closure_for(o, mm, x, y), fsd_inputs=(x,))
    assert o1.meta_steps == 4
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(m1.buffers(), m2.buffers()):
        assert torch.equal(a, b)


def test_a_meta_step_moves_the_version_counters_of_phi():
    """The meta-optimizer is torch's fused Adam on CPU, which writes φ without moving its version
    counters; the caches built from φ (kron's L and R, the carried direction) read them, so a meta-step
    moves them itself."""
    x, y = data()
    for structure in ("full", "kron"):
        m = mlp()
        opt = APOPrecond(m, **opt_kwargs(meta_interval=1, structure=structure))
        assert all(g["fused"] for g in opt.meta_optimizer.param_groups)
        before = [t._version for t in opt.phi]
        opt.step(closure_for(opt, m, x, y), fsd_inputs=(x,))
        assert opt.meta_steps == 1
        assert all(t._version > v for t, v in zip(opt.phi, before)), structure


def test_state_dict_round_trip_resumes_bit_identically():
    x, y = data()

    def make():
        m = mlp()
        return m, APOPrecond(m, **opt_kwargs(meta_interval=2, lambda_fsd=0.5, lambda_wsd=0.1))

    m1, o1 = make()
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))
    sd_model = copy.deepcopy(m1.state_dict())
    sd_opt = copy.deepcopy(o1.state_dict())
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))

    m2, o2 = make()
    m2.load_state_dict(sd_model)
    o2.load_state_dict(sd_opt)
    assert o2.step_count == 5
    for _ in range(5):
        o2.step(closure_for(o2, m2, x, y), fsd_inputs=(x,))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(o1.phi, o2.phi):
        assert torch.equal(a, b)
    assert o1.meta_steps == o2.meta_steps == 5


# --------------------------------------------------------------------------------------------
# Meta-gradient
# --------------------------------------------------------------------------------------------
class MixedNet(nn.Module):
    """Embedding + Linear (bias) + LayerNorm (diagonal) in float64."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.fc = nn.Linear(3 + 4, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, tok, x):
        h = torch.cat([self.emb(tok), x], dim=-1)
        return self.out(torch.tanh(self.ln(self.fc(h))))


@pytest.mark.parametrize("max_dim", [None, 4], ids=["dense", "blocked"])
def test_meta_gradient_matches_central_finite_differences_float64(max_dim):
    torch.manual_seed(0)
    m = MixedNet().double()
    tok = torch.randint(0, 5, (12,))
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    opt = APOPrecond(m, lr=0.1, lambda_fsd=0.3, lambda_wsd=0.5, meta_lr=0.01, momentum=0.5,
                     update_scale=0.9, max_precond_dim=max_dim)
    assert all(t.dtype == torch.float64 for t in opt.phi)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(tok, x), y)
        loss.backward()
        return loss

    opt.step(closure, fsd_inputs=(tok, x))  # non-trivial momentum buffers and φ
    with torch.no_grad():
        for t in opt.phi:
            t.add_(0.05 * torch.randn_like(t))
    _, grads = opt.meta_gradient(closure, fsd_inputs=(tok, x))
    eps = 1e-4
    checked = 0
    for t, g in zip(opt.phi, grads):
        flat = t.view(-1)
        for idx in {0, t.numel() // 2, t.numel() - 1}:
            old = flat[idx].item()
            flat[idx] = old + eps
            qp = opt.meta_objective(closure, fsd_inputs=(tok, x))
            flat[idx] = old - eps
            qm = opt.meta_objective(closure, fsd_inputs=(tok, x))
            flat[idx] = old
            fd = (qp - qm) / (2 * eps)
            assert g.view(-1)[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
            checked += 1
    assert checked >= 3 * len(opt.phi) - 6


# --------------------------------------------------------------------------------------------
# Layer mapping, blocking, grouping
# --------------------------------------------------------------------------------------------
def test_split_sizes_rule():
    assert split_sizes(7, None) == [7]
    assert split_sizes(7, 7) == [7]
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(1025, 1024) == [513, 512]
    assert sum(split_sizes(4097, 1000)) == 4097 and max(split_sizes(4097, 1000)) <= 1000


def test_blocked_preconditioner_equals_block_diagonal_factors():
    torch.manual_seed(0)
    pc = StructuredPreconditioner(7, 6, max_dim=3, init_s=0.7, dtype=torch.float64)
    assert [a.shape[0] for a in pc.A] == [3, 2, 2] and [b.shape[0] for b in pc.B] == [3, 3]
    with torch.no_grad():
        for t in pc.parameters():
            t.add_(0.3 * torch.randn_like(t))
    G = torch.randn(7, 6, dtype=torch.float64)
    Y = pc.apply(G, backend="reference")
    A = torch.block_diag(*pc.A)
    B = torch.block_diag(*pc.B)
    assert torch.allclose(Y, reference.precondition(G, A, pc.S2(), B), rtol=1e-12, atol=1e-12)


def test_layer_mapping_tied_weights_and_unsupported_modules():
    class Odd(nn.Module):  # an unsupported module type with a 2-D parameter
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, h):
            return h @ self.w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.conv = nn.Conv2d(2, 4, 3, groups=2)
            self.odd = Odd()
            self.norm = nn.LayerNorm(3)
            self.head = nn.Linear(3, 10)
            self.head.weight = self.emb.weight  # tied

        def forward(self, tok):
            return self.head(self.norm(self.odd(self.emb(tok))))

    net = Net()
    opt = APOPrecond(net, **opt_kwargs())
    kinds = {l.name: (l.kind, l.m, l.n) for l in opt.layers}
    assert kinds == {"emb": ("embedding", 10, 3), "conv": ("conv", 4, 1 * 3 * 3 + 1)}
    emb_layer = next(l for l in opt.layers if l.name == "emb")
    assert not emb_layer.precond.learn_left and emb_layer.precond.learn_right
    diag_names = {name for name, _, _ in opt.diagonals}
    assert diag_names == {"odd.w", "norm.weight", "norm.bias", "head.bias"}
    assert len(opt._params) == len({id(p) for p in net.parameters()})  # tied weight once
    # training through the tied weight works; its gradient (both uses) is preconditioned once
    tok = torch.randint(0, 10, (8,))
    target = torch.randint(0, 10, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(tok), target)
        loss.backward()
        return loss

    losses = [opt.step(closure, fsd_inputs=(tok,)).item() for _ in range(30)]
    assert losses[-1] < losses[0]
    stats = opt.preconditioner_stats()
    assert set(stats) == {"emb", "conv"} | diag_names
    assert stats["emb"]["b_dist"] > 0 and stats["emb"]["a_dist"] == 0


def test_one_grouped_call_per_step(monkeypatch):
    calls = {"fwd": 0, "bwd": 0, "fused": 0}
    fwd, bwd = preconditioners._grouped, preconditioners._grouped_backward
    fused = preconditioners.momentum_precondition_many

    def count_fused(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    def count_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def count_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(preconditioners, "_grouped", count_fwd)  # the op, public or registered
    monkeypatch.setattr(preconditioners, "_grouped_backward", count_bwd)
    monkeypatch.setattr("apo_kernels.optim.precond.momentum_precondition_many", count_fused)
    m = mlp()
    x, y = data()
    opt = APOPrecond(m, **opt_kwargs(meta_interval=3))
    opt.step(closure_for(opt, m, x, y))  # meta-step: lookahead + update, one backward
    assert calls == {"fwd": 2, "bwd": 1, "fused": 0}
    # plain step: one grouped call for both layers (on the CPU backend the fused momentum op's)
    opt.step(closure_for(opt, m, x, y))
    assert calls["fwd"] + calls["fused"] == 3 and calls["bwd"] == 1
    assert calls["fused"] == (1 if opt._fused_layers else 0)


def test_warmup_follows_sgd_momentum_while_phi_is_learnt():
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    x, y = data()
    apo = APOPrecond(m1, **opt_kwargs(lr=0.0625, meta_interval=1, warmup_steps=3, momentum=0.9))
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9)
    phi0 = [t.clone() for t in apo.phi]
    for _ in range(3):
        apo.step(closure_for(apo, m1, x, y))
        sgd.step(closure_for(sgd, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(phi0, apo.phi))


# --------------------------------------------------------------------------------------------
# It works: ill-conditioned quadratic, small CNN
# --------------------------------------------------------------------------------------------
def ill_conditioned_regression(d=4, n=64, cond_exp=3.5):
    """Full-batch least squares, features with a rotated spectrum: cond(E[x̃x̃ᵀ]) = 10^3.5."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    Z = torch.randn(n, d, generator=g)
    Z = Z - Z.mean(0)
    Z = Z @ torch.linalg.inv(torch.linalg.cholesky(Z.T @ Z / n)).T  # exactly white, mean zero
    X = Z @ torch.diag(torch.logspace(0, -cond_exp, d).sqrt()) @ Q.T
    y = X @ torch.randn(d, 1, generator=g) + 0.5
    return X, y


def run_regression(make_opt, X, y, steps):
    torch.manual_seed(1)
    m = nn.Linear(X.shape[1], 1)
    opt = make_opt(m)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (m(X) - y).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return (0.5 * (m(X) - y).pow(2).mean()).item()


def test_ill_conditioned_quadratic_beats_best_fixed_lr_sgd_by_100x():
    X, y = ill_conditioned_regression()
    Xa = torch.cat([X, torch.ones(len(X), 1)], 1).double()
    ev = torch.linalg.eigvalsh(Xa.T @ Xa / len(X))
    assert ev.max() / ev.min() >= 1000
    steps = 500
    sgd = min(run_regression(lambda m: torch.optim.SGD(m.parameters(), lr=lr), X, y, steps)
              for lr in torch.logspace(-1, 0.5, 13).tolist())  # 0.1 … 3.16 (diverges above 2/λmax)
    # plain preconditioned steps (no momentum) against plain SGD: the gain is the preconditioner's
    apo = run_regression(lambda m: APOPrecond(m, lr=1.0, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.1,
                                              meta_interval=1, momentum=0.0), X, y, steps)
    assert apo * 100 <= sgd, (apo, sgd)


def test_diverging_initial_lr_recovers_at_the_first_meta_step():
    X, y = ill_conditioned_regression()
    sgd = run_regression(lambda m: torch.optim.SGD(m.parameters(), lr=1e3, momentum=0.9), X, y, 20)
    assert not sgd < 1e10  # lr 1e3 diverges (far above 2(1 + μ)/λmax)
    made = []

    def apo(lr):
        def make(m):
            made.append(APOPrecond(m, lr=lr, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.1, momentum=0.9))
            return made[-1]
        return run_regression(make, X, y, 500)

    good = min(apo(1.0), apo(0.1))  # started at stable lrs
    recovered = apo(1e3)
    opt = made[-1]
    # step 0's lookahead was worse than not stepping: S² was cut before the first real update
    assert opt.recoveries >= 1 and opt.skipped_steps == 0 and opt.meta_steps == 50
    assert recovered <= 10 * good, (recovered, good)


def test_small_cnn_with_conv_linear_embedding_trains():
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.emb = nn.Embedding(3, 4)
            self.fc = nn.Linear(4 * 4 * 4 + 4, 2)

        def forward(self, img, tag):
            h = F.max_pool2d(torch.relu(self.bn(self.conv(img))), 2).flatten(1)
            return self.fc(torch.cat([h, self.emb(tag)], 1))

    torch.manual_seed(0)
    img = torch.randn(32, 1, 8, 8)
    tag = torch.randint(0, 3, (32,))
    y = ((img[:, 0, :4].mean((1, 2)) > 0) ^ (tag == 1)).long()
    net = CNN()
    opt = APOPrecond(net, lr=0.05, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=5)
    assert {l.kind for l in opt.layers} == {"conv", "embedding", "linear"}

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(img, tag), y)
        loss.backward()
        return loss

    losses = [opt.step(closure, fsd_inputs=(img, tag)).item() for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    assert opt.meta_steps == 12 and opt.skipped_steps == 0


# --------------------------------------------------------------------------------------------
# Robustness: non-finite, memory, autocast, GradScaler, arguments
# --------------------------------------------------------------------------------------------
def test_non_finite_loss_is_skipped_and_non_finite_lookahead_shrinks_s():
    m = mlp()
    x, y = data()
    opt = APOPrecond(m, **opt_kwargs(meta_interval=1))
    opt.step(closure_for(opt, m, x, y))
    snapshot = lambda: ([p.clone() for p in m.parameters()], [t.clone() for t in opt.phi],
                        [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()])
    before = snapshot()

    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    opt.step(closure_for(opt, m, bad_x, y))  # non-finite loss and gradient at θ: nothing to learn
    assert opt.skipped_steps == 1 and opt.step_count == 1 and opt.recoveries == 0
    for a, b in zip(before, snapshot()):
        assert all(torch.equal(u, v) for u, v in zip(a, b))

    calls = {"n": 0}

    def nan_at_lookahead():  # finite at θ, NaN at every lookahead θ'
        calls["n"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y) * (1.0 if calls["n"] == 1 else float("nan"))
        loss.backward()
        return loss

    opt.step(nan_at_lookahead)
    tries = 1 + APOPrecond.MAX_RECOVERIES_PER_STEP
    assert calls["n"] == 1 + tries  # bounded retries, then the step ends
    assert opt.recoveries == tries and opt.skipped_steps == 2 and opt.step_count == 2
    after = snapshot()
    for a, b in zip(before[0] + before[2], after[0] + after[2]):  # θ and momentum untouched
        assert torch.equal(a, b)
    s_tensors = {id(layer.precond.S) for layer in opt.layers}
    for t, a, b in zip(opt.phi, before[1], after[1]):
        if id(t) in s_tensors:  # each failure divided S² by 10 (S stored as a log: −ln(10)/2)
            assert torch.allclose(b, a - tries * 0.5 * math.log(10.0), rtol=0, atol=1e-5)
        else:  # A and B untouched
            assert torch.equal(a, b)
    assert len(opt.meta_optimizer.state) == 0  # the moments, estimated at the old scale, are reset
    assert opt.meta_due()  # the next step retries the meta-update whatever meta_interval says
    opt.step(closure_for(opt, m, x, y))  # training goes on
    assert opt.step_count == 3 and opt.meta_steps == 2 and opt.skipped_steps == 2


def _plain_stepper():
    """An optimizer past its first steps (momentum and step buffers in use), with no meta-steps,
    and a snapshot of θ and the momentum."""
    m = mlp()
    x, y = data()
    opt = APOPrecond(m, **opt_kwargs(meta_interval=0, momentum=0.9))
    for _ in range(2):
        opt.step(closure_for(opt, m, x, y))
    snapshot = lambda: [t.clone() for p in m.parameters() for t in (p, opt.state[p]["momentum_buffer"])]
    return m, x, y, opt, snapshot


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plain_step_skips_a_non_finite_gradient_without_counting_it(bad):
    # the plain step reads the gradients' finiteness off v = μ·buf + g: one bad entry must show
    m, x, y, opt, snapshot = _plain_stepper()
    closure_for(opt, m, x, y)()
    before = snapshot()
    list(m.parameters())[2].grad[1, 3] = bad
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 2 and opt.recoveries == 0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    opt.step(closure_for(opt, m, x, y))  # training goes on
    assert opt.step_count == 3 and opt.skipped_steps == 1


def test_plain_step_skips_a_non_finite_loss_with_finite_gradients():
    m, x, y, opt, snapshot = _plain_stepper()
    before = snapshot()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss.detach() * float("nan")  # the gradient is finite, the reported loss is not

    opt.step(closure)
    assert opt.skipped_steps == 1 and opt.step_count == 2 and opt.recoveries == 0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def test_momentum_overflowing_from_finite_gradients_is_an_update_failure_not_a_bad_gradient():
    """v = μ·buf + g overflows from finite values: the gradients are finite, so the step counts and
    φ shrinks (a non-finite update), θ and the momentum are untouched."""
    m, x, y, opt, snapshot = _plain_stepper()
    big = torch.finfo(torch.float32).max
    with torch.no_grad():
        for p in m.parameters():
            opt.state[p]["momentum_buffer"].fill_(big)
            p.grad = torch.full_like(p, big)
    before = snapshot()
    opt.step()
    assert opt.step_count == 3 and opt.skipped_steps == 1
    assert opt.recoveries == 1 + APOPrecond.MAX_RECOVERIES_PER_STEP
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def _live_tensor_count():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_memory_is_flat_no_graph_survives_a_meta_step():
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = data()
    opt = APOPrecond(m, **opt_kwargs(meta_interval=10, lambda_fsd=0.5, lambda_wsd=0.1))
    closure = closure_for(opt, m, x, y)
    for _ in range(100):
        opt.step(closure, fsd_inputs=(x,))
    n100 = _live_tensor_count()
    for _ in range(1900):
        opt.step(closure, fsd_inputs=(x,))
    # ≤, not ==: in the full suite, caches of earlier tests may release tensors meanwhile; a leak
    # of even one tensor per meta-step would add 190
    assert _live_tensor_count() <= n100
    assert opt.meta_steps == 200
    assert all(not t.requires_grad and t.grad is None for t in opt.phi)
    assert all(p.grad_fn is None for p in m.parameters())


def test_autocast_bf16_on_cpu_trains_with_fp32_phi():
    m = mlp()
    x, y = data(64)
    opt = APOPrecond(m, **opt_kwargs(lr=0.2, meta_interval=2, lambda_fsd=0.5))

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # FSD forwards run under it too
            losses.append(opt.step(closure, fsd_inputs=(x,)).item())
    assert losses[-1] < losses[0]
    assert all(t.dtype == torch.float32 for t in opt.phi) and opt.skipped_steps == 0


def test_grad_scaler_unscales_before_preconditioning_and_skips_overflow():
    x, y = data()

    def run(use_scaler, steps=6, poison_at=None):
        m = mlp()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
        opt = APOPrecond(m, **opt_kwargs(meta_interval=2, lambda_wsd=0.1), grad_scaler=scaler)
        for t in range(steps):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y)
                scale = 1.0 if t != poison_at else float("inf")
                (scaler.scale(loss * scale) if scaler else loss).backward()
                return loss
            opt.step(closure)
            if scaler:
                scaler.update()
        return m, opt, scaler

    m_ref, _, _ = run(False)
    m_sc, _, _ = run(True)
    # scaling by a power of two and unscaling is exact in fp32: identical trajectories
    for a, b in zip(m_ref.parameters(), m_sc.parameters()):
        assert torch.equal(a, b)
    _, opt, scaler = run(True, poison_at=3)
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(lr="0.1"), TypeError, "lr"),
        (dict(meta_interval=-1), ValueError, "meta_interval"),
        (dict(meta_interval=1.5), TypeError, "meta_interval"),
        (dict(fsd="js"), ValueError, "fsd"),
        (dict(fsd=3), TypeError, "fsd"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(lambda_wsd=-1.0), ValueError, "lambda_wsd"),
        (dict(meta_lr=float("nan")), ValueError, "meta_lr"),
        (dict(max_precond_dim=0), ValueError, "max_precond_dim"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(update_scale=0.0), ValueError, "update_scale"),
        (dict(warmup_steps=-2), ValueError, "warmup_steps"),
        (dict(s_param="sqrt"), ValueError, "s_param"),
        (dict(meta_batch="other"), ValueError, "meta_batch"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):  # \b: "lr" must not match inside "meta_lr"
        APOPrecond(mlp(), **opt_kwargs(**kwargs))


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="model"):
        APOPrecond(nn.ReLU(), **opt_kwargs())
    with pytest.raises(TypeError, match="model"):
        APOPrecond([torch.zeros(2)], **opt_kwargs())


# --------------------------------------------------------------------------------------------
# Learning-rate schedulers: the real update scales with the scheduled lr / initial lr
# --------------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.25),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    # max_lr / div_factor = 1/16: the scheduler's initial lr is the optimizer's lr
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=25 / 16, total_steps=12),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "LinearLR warm-up": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_scale_the_real_update_exactly(name):
    # identity φ with S² = lr = 1/16 exactly: the real update is (scheduled lr / initial lr)·S²·v, i.e.
    # torch.optim.SGD(momentum) with the same scheduler, bit for bit (OneCycleLR cycles momentum too)
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    x, y = data()
    apo = APOPrecond(m1, **opt_kwargs(lr=0.0625, meta_interval=0, momentum=0.9, update_scale=1.0,
                                      s_param="linear"))
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9)
    s1, s2 = SCHEDULERS[name](apo), SCHEDULERS[name](sgd)
    lrs = set()
    for _ in range(10):
        apo.step(closure_for(apo, m1, x, y))
        sgd.step(closure_for(sgd, m2, x, y))
        lrs.add(apo.param_groups[0]["lr"])
        s1.step()
        s2.step()
    assert len(lrs) > 1  # the schedule did move the lr
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_scheduler_decay_is_not_learnt_back_by_the_lookahead():
    x, y = data(dtype=torch.float64)

    def make():
        m = mlp(torch.float64)
        return m, APOPrecond(m, **opt_kwargs(meta_interval=1, lambda_wsd=0.1))

    (m1, o1), (m2, o2) = make(), make()
    sched = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=1e-3)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore")
        sched.step()
    assert o2.schedule_factor() == pytest.approx(1e-3) and o1.schedule_factor() == 1.0
    # the meta-objective and its gradient are those of the base step, whatever the schedule
    q1, g1 = o1.meta_gradient(closure_for(o1, m1, x, y))
    q2, g2 = o2.meta_gradient(closure_for(o2, m2, x, y))
    assert q1 == q2 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    # ... while the real update is 1000x smaller
    before = [p.clone() for p in m2.parameters()]
    o1.step(closure_for(o1, m1, x, y))
    o2.step(closure_for(o2, m2, x, y))
    d1 = torch.cat([(p - b).flatten() for p, b in zip(m1.parameters(), before)])
    d2 = torch.cat([(p - b).flatten() for p, b in zip(m2.parameters(), before)])
    assert torch.allclose(d2, 1e-3 * d1, rtol=1e-9, atol=0.0)


# --------------------------------------------------------------------------------------------
# small_full_max: a full preconditioner for small parameters no layer owns
# --------------------------------------------------------------------------------------------
class Rosenbrock(nn.Module):
    """Rosenbrock in z = M·x + 0.1·c[:2]: x (2,) and M (2, 2) are small, c (6,) is not."""

    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([-1.5, 2.5], dtype=torch.float64))
        self.M = nn.Parameter(torch.tensor([[1.0, 0.2], [-0.1, 0.9]], dtype=torch.float64))
        self.c = nn.Parameter(torch.linspace(-0.5, 0.5, 6, dtype=torch.float64))

    def forward(self):
        z = self.M @ self.x + 0.1 * self.c[:2]
        return (1 - z[0]) ** 2 + 100 * (z[1] - z[0] ** 2) ** 2 + 0.5 * self.c.pow(2).sum()


def test_small_full_preconditioner_layout_and_meta_gradient_against_autograd():
    torch.manual_seed(0)
    m = Rosenbrock()
    opt = APOPrecond(m, lr=1e-4, lambda_fsd=0.3, lambda_wsd=0.5, meta_lr=0.01, momentum=0.5, fsd="mse",
                     small_full_max=4)
    assert [(l.name, l.kind, l.m, l.n) for l in opt.layers] == [("x", "full", 1, 2), ("M", "full", 1, 4)]
    assert [name for name, _, _ in opt.diagonals] == ["c"]
    x_pc = opt.layers[0].precond
    assert not x_pc.learn_left and x_pc.learn_right and x_pc.parameters() == [x_pc.S, x_pc.B[0]]

    def closure():
        opt.zero_grad()
        loss = m()
        loss.backward()
        return loss

    opt.step(closure, fsd_inputs=())  # a momentum buffer and a meta-step: φ is no longer the identity
    with torch.no_grad():
        for t in opt.phi:
            t.add_(0.1 * torch.randn_like(t))
    _, grads = opt.meta_gradient(closure, fsd_inputs=())

    # the same Q(φ) written with autograd: θ' = θ − c·Y(φ), Y = (S²⊙(v·B))·Bᵀ for the flattened
    # small parameters, S²⊙v for c; v = μ·buffer + g; c = the momentum catch-up of a buffer holding
    # 2 gradients: its steady length 1/(1−μ) over its length now 1 + μ
    closure()
    params = dict(m.named_parameters())
    v = {n: 0.5 * opt.state[p]["momentum_buffer"] + p.grad for n, p in params.items()}
    phi = [t.detach().clone().requires_grad_(True) for t in opt.phi]
    by_name = dict(zip(["x", "M"], [(phi[0], phi[1]), (phi[2], phi[3])]))
    Y = {}
    for name, (S, B) in by_name.items():
        G = v[name].reshape(1, -1)
        Y[name] = ((torch.exp(2 * S) * (G @ B)) @ B.T).reshape(params[name].shape)
    Y["c"] = torch.exp(2 * phi[4]) * v["c"]
    c = (1 / (1 - 0.5)) / (1 + 0.5)
    new = {n: p.detach() - c * Y[n] for n, p in params.items()}
    f_new = torch.func.functional_call(m, new, ())
    f_old = m().detach()
    Q = f_new + 0.3 * 0.5 * (f_new - f_old) ** 2 + 0.5 * 0.5 * sum((c * y).pow(2).sum() for y in Y.values())
    expected = torch.autograd.grad(Q, phi)
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)


def test_small_full_max_argument():
    with pytest.raises(ValueError, match=r"\bsmall_full_max\b"):
        APOPrecond(Rosenbrock(), **opt_kwargs(small_full_max=0))
    with pytest.raises(TypeError, match=r"\bsmall_full_max\b"):
        APOPrecond(Rosenbrock(), **opt_kwargs(small_full_max=2.0))
    opt = APOPrecond(Rosenbrock(), **opt_kwargs())  # default: every unowned parameter is diagonal
    assert opt.layers == [] and len(opt.diagonals) == 3


def test_deepcopy_steps_like_the_original_and_groups_are_fixed():
    torch.manual_seed(0)
    m = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    opt = APOPrecond(m, **opt_kwargs(meta_interval=2, lambda_wsd=0.1))
    opt.step(closure_for(opt, m, x, y))
    twin = copy.deepcopy(opt)  # φ, momentum, the meta-optimizer and the model travel together
    for _ in range(3):
        opt.step(closure_for(opt, opt.model, x, y))
        twin.step(closure_for(twin, twin.model, x, y))
    assert twin.meta_steps == opt.meta_steps == 2
    for a, b in zip(opt.phi + list(opt.model.parameters()), twin.phi + list(twin.model.parameters())):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^param_group\b"):  # φ is built for the parameters given at construction
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)]})


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(m=0, n=3), ValueError, "m"),
    (dict(m=2.0, n=3), TypeError, "m"),
    (dict(m=2, n=-1), ValueError, "n"),
    (dict(m=2, n=3, max_dim=0), ValueError, "max_dim"),
    (dict(m=2, n=3, init_s=0.0), ValueError, "init_s"),
    (dict(m=2, n=3, init_s="1"), TypeError, "init_s"),
    (dict(m=2, n=3, s_param=None), TypeError, "s_param"),
])
def test_structured_preconditioner_arguments_are_checked(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        StructuredPreconditioner(**kwargs)


# --------------------------------------------------------------------------------------------
# The plain step's buffers: v is written where the op reads it, never over .grad or the momentum
# --------------------------------------------------------------------------------------------
class _Mixed(nn.Module):
    """A layer of every built-in layout (conv 4-D weight + bias, linear, embedding without bias)
    and a diagonal parameter (LayerNorm)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(7, 3)
        self.conv = nn.Conv2d(3, 2, 2)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, tok):
        e = self.emb(tok).transpose(1, 2).reshape(-1, 3, 3, 3)  # (N, 3, 3, 3) from 9 tokens each
        return self.out(self.norm(self.conv(e).flatten(1)))


def test_layer_split_from_recorded_geometry_matches_the_layout_split():
    """The per-step split rebuilds each part from the geometry recorded at construction: the same
    views (values, shapes, strides, storage) as the layout's own split, for a fresh matrix and for
    one inside a bigger buffer; a matrix that is not contiguous goes through the layout's split."""
    opt = APOPrecond(_Mixed(), **opt_kwargs())
    kinds = {layer.kind for layer in opt.layers}
    assert {"conv", "linear", "embedding"} <= kinds
    for layer in opt.layers:
        assert layer.view_geometry is not None  # every built-in layout splits into views
        flat = torch.randn(layer.m * layer.n + 5)
        for Y in (torch.randn(layer.m, layer.n), flat[5:].view(layer.m, layer.n),
                  torch.randn(layer.n, layer.m).t()):
            got, want = layer.split(Y), layer.layer.split(Y)
            assert len(got) == len(want) == len(layer.params)
            for g, w, p in zip(got, want, layer.params):
                assert g.shape == w.shape == p.shape and g.stride() == w.stride()
                assert g.data_ptr() == w.data_ptr() and torch.equal(g, w)


def _mixed_data():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, 7, (5, 9), generator=g), torch.randint(0, 3, (5,), generator=g)


def _randomize_phi(opt, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in opt.phi:
            t.add_(0.2 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def test_plain_step_is_a_direct_implementation_bit_for_bit():
    """Updates and momentum over steps that take every path of the step's preparation (buffers
    fresh, held, restored by load_state_dict, a parameter without a gradient) equal a direct
    implementation: v = μ·buf + (g + wd·θ) per tensor, G concatenated per layer, one public grouped
    op call, θ −= update_scale·Y."""
    m, (tok, y) = _Mixed(), _mixed_data()
    kw = dict(lr=0.05, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0, momentum=0.9,
              weight_decay=0.01, update_scale=0.9, carry_direction=False)  # carried: its own test below
    opt = APOPrecond(m, **kw)
    _randomize_phi(opt)
    assert [layer.kind for layer in opt.layers] == ["embedding", "conv", "linear"] and len(opt.diagonals) == 2

    ref_theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref_buf = {}
    for step in range(5):
        if step == 3:  # the state as a checkpoint restores it: fresh tensors, not the optimizer's own
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.zero_grad()
        F.cross_entropy(m(tok), y).backward()
        if step == 2:
            m.norm.bias.grad = None  # no gradient: no update, its momentum kept
        params = dict(m.named_parameters())
        v = {}
        for n, p in params.items():
            if p.grad is None:
                continue
            g = torch.add(p.grad, ref_theta[n], alpha=0.01)
            v[n] = g.clone() if n not in ref_buf else torch.mul(ref_buf[n], 0.9).add_(g)
        Gs, As, S2s, Bs = [], [], [], []
        for layer in opt.layers:
            w = v[layer.name + ".weight"].reshape(layer.m, -1)
            Gs.append(w if layer.bias is None else torch.cat([w, v[layer.name + ".bias"][:, None]], dim=1))
            pc = layer.precond
            As.append(pc.A[0] if pc.A else None)
            S2s.append(torch.exp(2.0 * pc.S))
            Bs.append(pc.B[0])
        Ys = apo_kernels.precondition_grouped(Gs, As, S2s, Bs, backend="cpu")
        Y = {}
        for layer, G in zip(opt.layers, Ys):
            Y[layer.name + ".weight"] = G[:, :layer.n - (layer.bias is not None)].reshape(layer.weight.shape)
            if layer.bias is not None:
                Y[layer.name + ".bias"] = G[:, -1]
        for name, _, d in opt.diagonals:
            if name in v:
                Y[name] = torch.exp(2.0 * d.S) * v[name]
        for n in v:
            ref_theta[n].add_(Y[n], alpha=-0.9)
            ref_buf[n] = v[n]

        opt.step()
        assert opt.skipped_steps == 0
        for n, p in params.items():
            assert torch.equal(p, ref_theta[n]), (step, n)
            assert torch.equal(opt.state[p]["momentum_buffer"], ref_buf[n]), (step, n)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_plain_step_concatenates_nothing_and_momentum_never_aliases_grad(monkeypatch, structure):
    """Plain steps with zero_grad(set_to_none=False) (.grad written in place every step): no layer
    matrix is built by concatenation, no momentum buffer shares memory with a gradient, and with
    identity φ the parameters follow torch.optim.SGD bit for bit."""
    from apo_kernels.layers import LayerView

    built = {"n": 0}
    matrix = LayerView.matrix

    def counting(self, *a, **k):
        built["n"] += 1
        return matrix(self, *a, **k)

    m1, (tok, y) = _Mixed(), _mixed_data()
    m2 = copy.deepcopy(m1)
    # lr = 1/16, S = 1/4 ("linear") and update_scale 1: S² = lr exactly, A = B = I exactly
    apo = APOPrecond(m1, lr=0.0625, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0,
                     momentum=0.9, weight_decay=0.01, update_scale=1.0, s_param="linear", structure=structure)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9, weight_decay=0.01)
    monkeypatch.setattr(LayerView, "matrix", counting)
    for _ in range(4):
        for opt, m in ((apo, m1), (sgd, m2)):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(m(tok), y).backward()
            opt.step()
        grads = [p.grad for p in m1.parameters()]
        for p in m1.parameters():
            buf = apo.state[p]["momentum_buffer"]
            assert all(buf.untyped_storage().data_ptr() != g.untyped_storage().data_ptr() for g in grads)
    assert built["n"] == 0
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(apo.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


def test_skipped_update_leaves_momentum_and_parameters_untouched():
    """A step whose update is not finite (S² overflows float32) is skipped after its retries: θ and
    every momentum buffer keep their values, and the next step builds on the old momentum."""
    m, (tok, y) = _Mixed(), _mixed_data()
    opt = APOPrecond(m, lr=0.05, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0, momentum=0.5)
    closure = closure_for(opt, m, tok, y)
    for _ in range(2):
        opt.step(closure)
    params = list(m.parameters())
    theta = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    S = [t.detach().clone() for t in opt.phi]
    with torch.no_grad():
        for layer in opt.layers:
            layer.precond.S.fill_(60.0)  # S² = e^120: inf in float32 even after 4 shrinks by 10
    opt.step(closure)
    assert opt.skipped_steps == 1 and opt.recoveries == 1 + APOPrecond.MAX_RECOVERIES_PER_STEP
    for p, t, b in zip(params, theta, momentum):
        assert torch.equal(p, t) and torch.equal(opt.state[p]["momentum_buffer"], b)

    with torch.no_grad():
        for t, s in zip(opt.phi, S):
            t.copy_(s)
    closure()
    expected = [torch.mul(b, 0.5).add_(p.grad) for p, b in zip(params, momentum)]
    opt.step()
    assert opt.skipped_steps == 1
    for p, e in zip(params, expected):
        assert torch.equal(opt.state[p]["momentum_buffer"], e)


def test_momentum_switched_off_and_on_keeps_its_buffers_as_sgd_does():
    """Steps with param_groups' momentum set to 0 neither use nor overwrite the momentum buffers
    (their v goes through the spare buffer); switched back on, the old buffers continue — as in
    torch.optim.SGD, bit for bit with identity φ."""
    m1, (tok, y) = _Mixed(), _mixed_data()
    m2 = copy.deepcopy(m1)
    apo = APOPrecond(m1, lr=0.0625, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0,
                     momentum=0.9, update_scale=1.0, s_param="linear")
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9)
    for mom in (0.9, 0.9, 0.0, 0.0, 0.0, 0.9, 0.9):
        for opt, m in ((apo, m1), (sgd, m2)):
            opt.param_groups[0]["momentum"] = mom
            opt.zero_grad()
            F.cross_entropy(m(tok), y).backward()
            opt.step()
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a, b)
            assert torch.equal(apo.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


class _CopyingView(LinearView):
    """A registered layout whose split returns copies: its matrix cannot live in the step buffers."""

    name = "copying"

    def split(self, Y, weight_shape, bias_shape=None):
        return Y[:, :-1].reshape(weight_shape).clone(), Y[:, -1].reshape(bias_shape).clone()


class _CopyingLinear(nn.Linear):
    pass


register_layer(_CopyingLinear, _CopyingView())


def test_a_layout_whose_split_copies_still_steps_like_sgd():
    """A layer whose split copies gets one buffer block per parameter and its matrix built per step;
    with identity φ the updates and momentum are torch.optim.SGD's, bit for bit."""
    torch.manual_seed(0)
    m1 = nn.Sequential(_CopyingLinear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    m2 = copy.deepcopy(m1)
    x, y = data()
    apo = APOPrecond(m1, **opt_kwargs(lr=0.0625, meta_interval=0, momentum=0.9, update_scale=1.0, s_param="linear"))
    assert [layer.kind for layer in apo.layers] == ["copying", "linear"]
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9)
    for _ in range(3):
        apo.step(closure_for(apo, m1, x, y))
        sgd.step(closure_for(sgd, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b) and torch.equal(apo.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


class _WholeMatrices(nn.Module):
    """Layers whose matrix is their one parameter (an embedding, a linear without bias) or their
    weight with the bias as its last column (a linear with bias), which the CPU backend's plain steps
    give to the fused momentum op, next to a parameter it does not (a LayerNorm's diagonal)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(600, 6)  # tall: the kernel's row blocks
        self.mix = nn.Linear(12, 12, bias=False)
        self.norm = nn.LayerNorm(12)
        self.out = nn.Linear(12, 3)

    def forward(self, tok):
        return self.out(self.norm(self.mix(self.emb(tok).flatten(1))))


def step_alike(fused, m1, plain, m2, x, y):
    """One step of each optimizer on the same batch; θ, the momentum and φ stay bit for bit equal."""
    for opt, m in ((fused, m1), (plain, m2)):
        opt.step(closure_for(opt, m, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(fused.state[a]["momentum_buffer"], plain.state[b]["momentum_buffer"])
    assert all(torch.equal(a, b) for a, b in zip(fused.phi, plain.phi))


def test_fused_momentum_step_is_bit_for_bit_the_unfused_step(monkeypatch):
    """The fused momentum op (v and Y of whole-matrix layers in one pass) changes no value: θ, φ and
    the momentum follow the unfused step exactly, over plain steps, meta-steps (whose lookahead
    starts from the fused Y) and a recovery."""
    torch.manual_seed(0)
    tok, y = torch.randint(0, 600, (16, 2)), torch.randint(0, 3, (16,))
    m1 = _WholeMatrices()
    m2 = copy.deepcopy(m1)
    kw = opt_kwargs(lr=0.05, meta_interval=3, weight_decay=0.01, backend="cpu", carry_direction=False)
    fused, plain = APOPrecond(m1, **kw), APOPrecond(m2, **kw)
    assert [layer.name for layer in fused._fused_layers] == ["emb", "mix", "out"]
    plain._fused_layers = []
    calls = []
    real = preconditioners.momentum_precondition_many

    def counting(*args, **kwargs):
        calls.append(fused.step_count)
        return real(*args, **kwargs)

    monkeypatch.setattr("apo_kernels.optim.precond.momentum_precondition_many", counting)
    for step in range(8):
        if step == 5:  # an update too large to take: both shrink S² and retry the same way
            for opt in (fused, plain):
                with torch.no_grad():
                    opt.layers[0].precond.S.fill_(60.0)
        step_alike(fused, m1, plain, m2, tok, y)
    # every step with momentum buffers (from step 1) took the fused op: a plain step for its update,
    # a meta-step (3, 6 and 7, after the failed 5 and 6 asked for one at once) for its lookahead
    assert calls == list(range(1, 8))
    assert fused.meta_steps == plain.meta_steps > 0
    assert fused.recoveries == plain.recoveries > 0


def test_carried_direction_follows_the_unfused_step(monkeypatch):
    """With carry_direction (the default) the embedding's direction is carried, Y_t = μ·Y_{t−1} +
    Y(g_t), on every fused step whose φ and momentum are those of the previous update: a plain step
    after a plain step, a meta-step's lookahead; after a meta-step, a restored state or an update
    whose Ys were formed apart (gradients the fused op does not take) Y(v) is formed again. θ and the momentum stay within float32 rounding of the unfused step's."""
    torch.manual_seed(0)
    tok, y = torch.randint(0, 600, (16, 2)), torch.randint(0, 3, (16,))
    m1 = _WholeMatrices()
    m2 = copy.deepcopy(m1)
    kw = opt_kwargs(lr=0.05, meta_interval=4, backend="cpu")
    carried, plain = APOPrecond(m1, **kw), APOPrecond(m2, **kw)
    assert [layer.name for layer in carried._carried_layers] == ["emb"]  # identity A; "mix" learns A
    plain._fused_layers = []
    calls = []
    real = preconditioners.momentum_precondition_many

    def recording(*args, carry=False, **kwargs):
        calls.append((carried.step_count, carry))
        return real(*args, carry=carry, **kwargs)

    monkeypatch.setattr("apo_kernels.optim.precond.momentum_precondition_many", recording)
    def strided_grads(opt, m):  # the fused layers' gradients column-major: a step without the fused op
        def closure():
            loss = closure_for(opt, m, tok, y)()
            for layer in (m.emb, m.mix, m.out):
                layer.weight.grad = layer.weight.grad.T.contiguous().T
            return loss
        return closure

    for step in range(13):
        if step == 6:  # a checkpoint restored: the next step forms Y(v) from the loaded momentum
            carried.load_state_dict(copy.deepcopy(carried.state_dict()))
        for opt, m in ((carried, m1), (plain, m2)):
            opt.step(strided_grads(opt, m) if step == 10 else closure_for(opt, m, tok, y))
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(carried.state[a]["momentum_buffer"], plain.state[b]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)
    assert carried.meta_steps == plain.meta_steps == 4
    carrying = sorted({step for step, carry in calls if carry})
    # 0: no momentum yet; 1, 5, 6 (restored), 9, 11 (after step 10's update from Ys formed apart):
    # Y(v); 4 and 8: a meta-step's lookahead carries
    assert carrying == [2, 3, 4, 7, 8, 12]
    assert sorted({step for step, _ in calls}) == [s for s in range(1, 13) if s != 10]


class _BiasFree(nn.Module):
    """Linear layers without bias (the fused momentum step's layers); the second, 13 columns wide,
    starts 16 values into the step buffers, so column blocks of width 4 do not start at a multiple of
    its row stride there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(3, 13, bias=False)
        self.c = nn.Linear(13, 6, bias=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _WithBiases(nn.Module):
    """A conv and linear layers with bias (their matrices: the weight, bias as the last column)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv1d(2, 3, 3)
        self.a = nn.Linear(12, 9)
        self.b = nn.Linear(9, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("max_precond_dim", [None, 4], ids=["whole", "tiles"])
def test_fused_step_with_bias_columns_is_bit_for_bit_the_unfused_step(max_precond_dim):
    """Layers with bias take the fused op, which reads the weight and bias gradients as they are:
    θ, φ and the momentum follow the unfused step exactly, over plain steps and meta-steps, with the
    bias column in a layer's last column block (tiles: row and column blocks of width ≤ 4)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 6), torch.randint(0, 4, (8,))
    m1 = _WithBiases()
    m2 = copy.deepcopy(m1)
    kw = opt_kwargs(lr=0.05, meta_interval=3, weight_decay=0.01, max_precond_dim=max_precond_dim, backend="cpu")
    fused, plain = APOPrecond(m1, **kw), APOPrecond(m2, **kw)
    assert [layer.name for layer in fused._fused_layers] == ["conv", "a", "b"]
    if max_precond_dim:
        assert [layer.precond.col_blocks[-1] for layer in fused.layers] == [(4, 7), (10, 13), (7, 10)]
    plain._fused_layers = []
    for _ in range(7):
        step_alike(fused, m1, plain, m2, x, y)
    assert fused.meta_steps == plain.meta_steps > 0 and fused.skipped_steps == 0


def test_fused_step_takes_column_blocks_anywhere_in_the_buffers():
    """Column blocks of a layer's matrix are disjoint wherever the matrix starts in the step buffers:
    the op's overlap rule is exact for row views, so the fused momentum step runs on them."""
    model = _BiasFree()
    x, y = torch.randn(8, 4), torch.randint(0, 6, (8,))
    opt = APOPrecond(model, **opt_kwargs(meta_interval=2, max_precond_dim=4, backend="cpu"))
    assert [layer.name for layer in opt._fused_layers] == ["a", "b", "c"]
    assert len(opt.layers[2].precond.col_blocks) == 4
    for _ in range(4):
        opt.step(closure_for(opt, model, x, y))
    assert opt.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_deepcopy_of_a_fused_optimizer_steps_like_the_original():
    """A copy's parameters are new objects: its parameter index is rebuilt, so its fused steps find
    their gradients and follow the original's bit for bit."""
    model = _BiasFree()
    x, y = torch.randn(8, 4), torch.randint(0, 6, (8,))
    opt = APOPrecond(model, **opt_kwargs(meta_interval=2, backend="cpu"))
    opt.step(closure_for(opt, model, x, y))
    twin = copy.deepcopy(opt)
    for _ in range(3):
        for o in (opt, twin):
            o.step(closure_for(o, o.model, x, y))
    assert opt._fused_layers and twin.meta_steps == opt.meta_steps == 2
    for a, b in zip(list(opt.model.parameters()) + opt.phi, list(twin.model.parameters()) + twin.phi):
        assert torch.equal(a, b)


def test_carry_direction_must_be_a_bool():
    with pytest.raises(TypeError, match="carry_direction"):
        APOPrecond(_WholeMatrices(), **opt_kwargs(lr=0.05, carry_direction=1))

"""KFAC / EKFAC baselines: factors against curvlinops, training, argument validation, state_dict."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apo_kernels.baselines import EKFAC, KFAC
from apo_kernels.baselines.kfac import factored_damping

OPTIMIZERS = [KFAC, EKFAC]


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 3),
    )


def _one_step_factors(opt_cls, model, x, y):
    opt = opt_cls(model, lr=1e-3, damping=1e-3, stat_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return opt


# --------------------------------------------------------------------------------------------
# Kronecker factors against a maintained curvature library (test-only dependency)
# --------------------------------------------------------------------------------------------
def _curvlinops_factors(model, x, y):
    curvlinops = pytest.importorskip(
        "curvlinops", reason="curvlinops-for-pytorch not installed (pip install curvlinops-for-pytorch)"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvlinops.KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),  # reduction="mean", as our convention assumes
            params,
            [(x, y)],
            fisher_type="empirical",  # our factors use the real loss's gradients
            kfac_approx="expand",
            separate_weight_and_bias=False,  # bias as an extra input column, like ours
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_factors_match_curvlinops(opt_cls, arch):
    torch.manual_seed(1)
    if arch == "mlp":
        model, x = _mlp(), torch.randn(16, 6)
    else:
        model, x = _cnn(), torch.randn(8, 3, 7, 7)
    y = torch.randint(0, 3, (x.shape[0],))
    ref_A, ref_G = _curvlinops_factors(copy.deepcopy(model), x, y)
    opt = _one_step_factors(opt_cls, model, x, y)
    names = {id(m): n for n, m in model.named_modules()}
    assert len(opt.layers) == len(ref_A) == len(ref_G)
    for layer in opt.layers:
        name = names[id(layer.module)]
        st = opt.state[layer.weight]
        assert st["A"].dtype == torch.float32 and st["G"].dtype == torch.float32
        torch.testing.assert_close(st["A"], ref_A[name].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["G"], ref_G[name].float(), rtol=1e-5, atol=1e-7)


def test_kfac_direction_is_damped_kronecker_solve():
    """One step of lr 1 without momentum is exactly ((A+λ_A I) ⊗ (G+λ_G I))⁻¹ vec(∇W)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=1.0, damping=0.1, momentum=0.0, stat_decay=0.0)
    w0 = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1).clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).double()
    w1 = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    st = opt.state[model[0].weight]
    A, G = st["A"].double(), st["G"].double()
    la, lg = factored_damping(st["A"], st["G"], 0.1)
    Fish = torch.kron(A + la * torch.eye(5, dtype=A.dtype), G + lg * torch.eye(3, dtype=A.dtype))
    vec = lambda M: M.T.reshape(-1)  # column stacking
    expected = torch.linalg.solve(Fish, vec(grad))
    torch.testing.assert_close(vec((w0 - w1).double()), expected, rtol=1e-4, atol=1e-6)


def test_ekfac_right_after_eigh_equals_eigen_kfac():
    """With the scale just reset to λ_G λ_Aᵀ, EKFAC's direction is (A⊗G + λI)⁻¹ vec(∇W)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = EKFAC(model, lr=1.0, damping=0.1, momentum=0.0, stat_decay=0.0)
    w0 = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1).clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).double()
    w1 = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    st = opt.state[model[0].weight]
    Fish = torch.kron(st["A"].double(), st["G"].double()) + 0.1 * torch.eye(15, dtype=torch.float64)
    vec = lambda M: M.T.reshape(-1)
    torch.testing.assert_close(vec((w0 - w1).double()), torch.linalg.solve(Fish, vec(grad)), rtol=1e-4, atol=1e-6)


def test_ekfac_scale_is_per_example_second_moment():
    """After a non-refresh step (stat_decay 0) s = mean_n (Q_Gᵀ ∇W_n Q_A)², ∇W_n per-example grads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = EKFAC(model, lr=1e-3, damping=0.1, momentum=0.0, stat_decay=0.0, inverse_interval=10)
    for step in range(2):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if step == 1:
            st = opt.state[model[0].weight]
            QA, QG = st["QA"].double(), st["QG"].double()
            per_ex = []
            for n in range(16):
                model.zero_grad()
                F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
                per_ex.append(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).double())
            expected = torch.stack([(QG.T @ g @ QA) ** 2 for g in per_ex]).mean(0)
        opt.step(closure)
    torch.testing.assert_close(opt.state[model[0].weight]["scale"].double(), expected, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Training, intervals, fallbacks
# --------------------------------------------------------------------------------------------
def _train(model, opt, x, y, steps, use_closure=True):
    losses = []
    for i in range(steps):
        idx = torch.arange(i * 32, (i + 1) * 32) % x.shape[0]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        if use_closure:
            losses.append(float(opt.step(closure).detach()))
        else:
            losses.append(float(closure().detach()))
            assert opt.step() is None
    return losses


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("use_closure", [True, False], ids=["closure", "grad"])
def test_reduces_loss_on_classification(opt_cls, use_closure):
    torch.manual_seed(0)
    x = torch.randn(512, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)
    model = _mlp(seed=1)
    opt = opt_cls(model, lr=0.03, damping=0.1)
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
    _train(model, opt, x, y, 60, use_closure)
    with torch.no_grad():
        after = float(F.cross_entropy(model(x), y))
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_reduces_loss_on_cnn_with_other_params(opt_cls):
    """Conv2d + Linear are preconditioned; BatchNorm's affine params take the SGD-momentum path."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, groups=2), nn.ReLU(),  # grouped conv: SGD fallback
        nn.Flatten(), nn.Linear(6 * 3 * 3, 4),
    )
    opt = opt_cls(model, lr=0.03, damping=0.1)
    assert len(opt.layers) == 2 and len(opt.other_params) == 4
    x, y = torch.randn(64, 3, 7, 7), torch.randint(0, 4, (64,))
    losses = _train(model, opt, x, y, 30)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_intervals(opt_cls):
    model = _mlp()
    opt = opt_cls(model, lr=0.01, damping=0.1, factor_interval=2, inverse_interval=3)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    key = "G_inv" if opt_cls is KFAC else "QG"
    seen_inv, seen_A = [], []
    for _ in range(7):
        _train(model, opt, x, y, 1)
        st = opt.state[model[0].weight]
        seen_inv.append(st[key].clone())
        seen_A.append(st["G"].clone())  # G moves with the weights; A of layer 0 sees fixed data
    changed = lambda seq: [not torch.equal(seq[i], seq[i - 1]) for i in range(1, len(seq))]
    assert changed(seen_inv) == [False, False, True, False, False, True]  # steps 3, 6 refresh
    assert changed(seen_A) == [False, True, False, True, False, True]  # steps 2, 4, 6 capture


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(lr=-0.1), "lr"),
        (dict(inverse_interval=0), "inverse_interval"),
        (dict(inverse_interval=2.5), "inverse_interval"),
        (dict(factor_interval=0), "factor_interval"),
        (dict(momentum=1.0), "momentum"),
        (dict(stat_decay=1.5), "stat_decay"),
        (dict(weight_decay=-1e-4), "weight_decay"),
    ],
)
def test_bad_arguments_name_the_argument(opt_cls, kwargs, name):
    args = dict(lr=0.01, damping=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        opt_cls(_mlp(), **args)


def test_model_type_and_empty_model():
    with pytest.raises(TypeError, match="model"):
        KFAC([torch.zeros(2, requires_grad=True)], lr=0.1, damping=0.1)
    with pytest.raises(ValueError, match="parameters"):
        KFAC(nn.ReLU(), lr=0.1, damping=0.1)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_dict_round_trip(opt_cls):
    torch.manual_seed(0)
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    model = _mlp()
    opt = opt_cls(model, lr=0.03, damping=0.1, inverse_interval=3, weight_decay=1e-4)
    _train(model, opt, x, y, 4)
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = opt_cls(model2, lr=0.5, damping=0.5, inverse_interval=3, weight_decay=1e-4)
    opt2.load_state_dict(sd)
    assert opt2.steps == opt.steps == 4
    assert opt2.param_groups[0]["lr"] == 0.03
    _train(model, opt, x, y, 5)
    _train(model2, opt2, x, y, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Low precision: what really happens when a half-precision factor is inverted
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inverse_really_tried(dtype):
    """torch's linalg has no half kernels on CPU: record that it refuses (the baselines invert in fp32).

    If a future torch accepts it, the result must at least be reported as inaccurate or accurate --
    the bench prints the residual; here we only pin down that it is not silently used by KFAC.
    """
    torch.manual_seed(0)
    a = torch.randn(256, 64)
    M = (a.T @ a / 256 + 0.1 * torch.eye(64)).to(dtype)
    outcome = {}
    for name, fn in [("inv", torch.linalg.inv), ("eigh", torch.linalg.eigh), ("cholesky", torch.linalg.cholesky)]:
        try:
            out = fn(M)
        except (RuntimeError, NotImplementedError) as exc:
            outcome[name] = f"error: {exc}"
        else:
            if name == "inv":
                res = float((M.double() @ out.double() - torch.eye(64, dtype=torch.float64)).abs().max())
                outcome[name] = f"residual {res:.2e}"
            else:
                outcome[name] = "ran"
    print(dtype, outcome)  # visible with -s; apo-bench reports the same in its JSON
    assert set(outcome) == {"inv", "eigh", "cholesky"}


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_bf16_model_inverts_in_fp32(opt_cls):
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)
    model = _mlp(seed=1, dtype=torch.bfloat16)
    opt = opt_cls(model, lr=0.03, damping=0.1)
    xb = x.bfloat16()
    with torch.no_grad():
        before = float(F.cross_entropy(model(xb).float(), y))
    _train(model, opt, xb, y, 40)
    with torch.no_grad():
        after = float(F.cross_entropy(model(xb).float(), y))
    st = opt.state[model[0].weight]
    key = "A_inv" if opt_cls is KFAC else "QA"
    assert st[key].dtype == torch.float32 and st["A"].dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16
    assert after < 0.5 * before, (before, after)


# --------------------------------------------------------------------------------------------
# Non-finite values never reach the factors, the momentum or θ
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_non_finite_loss_skips_the_step(opt_cls):
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = opt_cls(model, lr=0.1, damping=1e-2, inverse_interval=1)

    def closure(scale=1.0):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * scale
        loss.backward()
        return loss

    opt.step(closure)  # factors, curvature and momentum exist now
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}
    loss = opt.step(lambda: closure(float("nan")))
    assert not torch.isfinite(loss)
    assert opt.skipped_steps == 1 and opt.steps == 1
    for p, b in zip(model.parameters(), before_params):
        assert torch.equal(p, b)
    assert opt.state.keys() == before_state.keys()
    for p, st in opt.state.items():
        for key, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, before_state[p][key]), key
    opt.step(closure)  # training goes on
    assert opt.steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_eigenbasis_falls_back_to_float64_when_float32_eigh_fails(monkeypatch, failure):
    """LAPACK's fp32 eigh can fail to converge, or return NaN without raising, on rank-deficient factors."""
    from apo_kernels.baselines import ekfac

    real_eigh = torch.linalg.eigh

    def eigh_failing_in_fp32(M):
        evals, evecs = real_eigh(M)
        if M.dtype != torch.float32:
            return evals, evecs
        if failure == "raise":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return evals.fill_(float("nan")), evecs

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_fp32)
    a = torch.randn(40, 9)
    a[:, 3] = 0.0  # a dead unit: exactly rank deficient
    M = a.T @ a / 40
    evals, evecs = ekfac.eigenbasis(M)
    assert evals.dtype == evecs.dtype == torch.float32
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, M, atol=1e-5, rtol=1e-5)


def test_ekfac_trains_the_bench_cnn_without_nan():
    """The benchmark's CNN has dead ReLU units; its rank-deficient factors once made fp32 eigh
    return NaN on the second refresh (step 20), which then poisoned every parameter."""
    from apo_kernels.bench.train_bench import small_cnn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = small_cnn(8)
    opt = EKFAC(model, lr=0.01, damping=0.1, inverse_interval=10)
    batches = [(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
               for _ in range(4)]
    for i in range(31):
        x, y = batches[i % 4]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isfinite(loss), f"step {i}"
    assert all(torch.isfinite(p).all() for p in model.parameters())

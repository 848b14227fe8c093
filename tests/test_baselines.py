"""KFAC / EKFAC baselines: factors against curvlinops, training, argument validation, state_dict."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apo_kernels.baselines import EKFAC, KFAC
from apo_kernels.baselines.kfac import LIKELIHOODS, MAX_PI, damped_inverse, damped_inverse_ex, factored_damping

from _tiny import closure_for

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


# the loss each likelihood's closure computes (a mean over the batch of −log p(y|f), up to a constant)
CLOSURE_LOSS = {
    "categorical": lambda out, y: F.cross_entropy(out, y),
    "bernoulli": lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0],
    "gaussian": lambda out, y: 0.5 * F.mse_loss(out, y, reduction="sum") / out.shape[0],
}


def _targets(likelihood, out_shape, gen=None):
    if likelihood == "categorical":
        return torch.randint(0, out_shape[1], (out_shape[0],), generator=gen)
    if likelihood == "bernoulli":
        return torch.rand(out_shape, generator=gen).round()
    return torch.randn(out_shape, generator=gen)


def _one_step_factors(opt_cls, model, x, y, loss="categorical", **kwargs):
    opt = opt_cls(model, lr=1e-3, damping=1e-3, stat_decay=0.0, **kwargs)

    def closure():
        opt.zero_grad()
        loss_value = CLOSURE_LOSS[loss](model(x), y)
        loss_value.backward()
        return loss_value

    opt.step(closure)
    return opt


# --------------------------------------------------------------------------------------------
# Kronecker factors against a maintained curvature library (curvlinops-for-pytorch, in the
# "test" extra: required, never skipped)
# --------------------------------------------------------------------------------------------
# curvlinops' loss for each likelihood, and the factor by which its G exceeds ours: its MSELoss is
# Σ(f − y)² (Gaussian of variance ½: G doubles), and a "sum" reduction drops our 1/N.
CURVLINOPS_LOSS = {
    "categorical": (lambda: nn.CrossEntropyLoss(), lambda n: 1.0),
    "bernoulli": (lambda: nn.BCEWithLogitsLoss(reduction="sum"), lambda n: float(n)),
    "gaussian": (lambda: nn.MSELoss(reduction="sum"), lambda n: 2.0 * n),
}


def _curvlinops_factors(model, x, y, fisher_type="empirical", likelihood="categorical", seed=2147483647):
    """curvlinops' (A, G) per layer name, G rescaled to our convention (mean of −log p over the batch)."""
    import curvlinops

    loss_fn, g_scale = CURVLINOPS_LOSS[likelihood]
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvlinops.KFACLinearOperator(
            model,
            loss_fn(),
            params,
            [(x, y)],
            fisher_type=fisher_type,
            seed=seed,
            kfac_approx="expand",
            separate_weight_and_bias=False,  # bias as an extra input column, like ours
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
    scale = g_scale(x.shape[0])
    return op._input_covariances, {k: v / scale for k, v in op._gradient_covariances.items()}


def _assert_factors_match(opt, model, ref_A, ref_G, rtol=1e-5, atol=1e-7):
    names = {id(m): n for n, m in model.named_modules()}
    assert len(opt.layers) == len(ref_A) == len(ref_G)
    for layer in opt.layers:
        name = names[id(layer.module)]
        st = opt.state[layer.weight]
        assert st["A"].dtype == torch.float32 and st["G"].dtype == torch.float32
        torch.testing.assert_close(st["A"], ref_A[name].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["G"], ref_G[name].float(), rtol=rtol, atol=atol)


def _model_and_input(arch, likelihood="categorical"):
    torch.manual_seed(1)
    if arch == "mlp":
        model, x = _mlp(), torch.randn(16, 6)
    else:
        model, x = _cnn(), torch.randn(8, 3, 7, 7)
    return model, x, _targets(likelihood, (x.shape[0], 3))


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_factors_match_curvlinops(opt_cls, arch):
    """Empirical Fisher (the default): float32 factors equal curvlinops' to float32 rounding."""
    model, x, y = _model_and_input(arch)
    ref_A, ref_G = _curvlinops_factors(copy.deepcopy(model), x, y)
    opt = _one_step_factors(opt_cls, model, x, y)
    _assert_factors_match(opt, model, ref_A, ref_G)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_mc_factors_match_curvlinops_with_the_same_seed(opt_cls, likelihood, arch):
    """fisher="mc": with the sampling seed of curvlinops' MC Fisher, the same targets are drawn and
    A, G agree to float32 rounding (G rescaled for curvlinops' loss convention, see CURVLINOPS_LOSS)."""
    model, x, y = _model_and_input(arch, likelihood)
    ref_A, ref_G = _curvlinops_factors(copy.deepcopy(model), x, y, "mc", likelihood, seed=1234)
    _, emp_G = _curvlinops_factors(copy.deepcopy(model), x, y, "empirical", likelihood)
    opt = _one_step_factors(opt_cls, model, x, y, likelihood, fisher="mc", likelihood=likelihood, seed=1234)
    _assert_factors_match(opt, model, ref_A, ref_G, rtol=1e-4, atol=1e-7)
    # and they are not the empirical factors (the sampled targets differ from y)
    last = opt.layers[-1]
    name = {id(m): n for n, m in model.named_modules()}[id(last.module)]
    assert not torch.allclose(opt.state[last.weight]["G"], emp_G[name].float(), rtol=1e-2)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_factors_converge_to_the_exact_fisher(likelihood):
    """In expectation the sampled G is the exact Fisher's (curvlinops' "type-2": E over y in closed
    form). 16 inputs each repeated 4000 times in one batch: G is a mean over 64000 draws, so the
    Monte-Carlo error is about 1/sqrt(4000) ≈ 1.6 % per entry; tolerance 6 % of max|G|."""
    model, x, y = _model_and_input("mlp", likelihood)
    ref_A, ref_G = _curvlinops_factors(copy.deepcopy(model), x, y, "type-2", likelihood)
    reps = 4000
    xr, yr = x.repeat(reps, 1), y.repeat(reps, *([1] * (y.dim() - 1)))
    opt = _one_step_factors(KFAC, model, xr, yr, likelihood, fisher="mc", likelihood=likelihood, seed=5)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in opt.layers:
        G, ref = opt.state[layer.weight]["G"].double(), ref_G[names[id(layer.module)]].double()
        err = float((G - ref).abs().max() / ref.abs().max())
        assert err < 0.06, (likelihood, names[id(layer.module)], err)


def _one_plain_step(optimizer_cls):
    """One step of lr 1, no momentum, on a 4→3 linear layer: (the layer's optimizer state, ∇W with the
    bias as a last column and W before minus W after, both float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = optimizer_cls(model, lr=1.0, damping=0.1, momentum=0.0, stat_decay=0.0, kl_clip=None)

    def weight(w, b):
        return torch.cat([w, b[:, None]], 1)

    w0 = weight(model[0].weight.detach(), model[0].bias.detach()).clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    grad = weight(model[0].weight.grad, model[0].bias.grad).double()
    step = (w0 - weight(model[0].weight.detach(), model[0].bias.detach())).double()
    return opt.state[model[0].weight], grad, step


def _vec(M):
    return M.T.reshape(-1)  # column stacking


def test_kfac_direction_is_damped_kronecker_solve():
    """One step of lr 1 without momentum is exactly ((A+λ_A I) ⊗ (G+λ_G I))⁻¹ vec(∇W)."""
    st, grad, step = _one_plain_step(KFAC)
    A, G = st["A"].double(), st["G"].double()
    la, lg = factored_damping(st["A"], st["G"], 0.1)
    Fish = torch.kron(A + la * torch.eye(5, dtype=A.dtype), G + lg * torch.eye(3, dtype=A.dtype))
    torch.testing.assert_close(_vec(step), torch.linalg.solve(Fish, _vec(grad)), rtol=1e-4, atol=1e-6)


def test_ekfac_right_after_eigh_equals_eigen_kfac():
    """With the scale just reset to λ_G λ_Aᵀ, EKFAC's direction is (A⊗G + λI)⁻¹ vec(∇W)."""
    st, grad, step = _one_plain_step(EKFAC)
    Fish = torch.kron(st["A"].double(), st["G"].double()) + 0.1 * torch.eye(15, dtype=torch.float64)
    torch.testing.assert_close(_vec(step), torch.linalg.solve(Fish, _vec(grad)), rtol=1e-4, atol=1e-6)


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
            probe = copy.deepcopy(model)  # its hooks are inert: these backwards do not feed the optimizer
            for n in range(16):
                probe.zero_grad()
                F.cross_entropy(probe(x[n : n + 1]), y[n : n + 1]).backward()
                per_ex.append(torch.cat([probe[0].weight.grad, probe[0].bias.grad[:, None]], 1).double())
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
    "kwargs, name, error",
    [
        (dict(damping=0.0), "damping", ValueError),
        (dict(damping=-1.0), "damping", ValueError),
        (dict(damping=float("nan")), "damping", ValueError),
        (dict(damping=True), "damping", TypeError),
        (dict(lr=-0.1), "lr", ValueError),
        (dict(lr="0.1"), "lr", TypeError),
        (dict(lr=True), "lr", TypeError),
        (dict(lr=torch.tensor(0.1)), "lr", TypeError),
        (dict(lr=float("inf")), "lr", ValueError),
        (dict(inverse_interval=0), "inverse_interval", ValueError),
        (dict(inverse_interval=2.5), "inverse_interval", TypeError),
        (dict(inverse_interval=True), "inverse_interval", TypeError),
        (dict(factor_interval=0), "factor_interval", ValueError),
        (dict(factor_interval="1"), "factor_interval", TypeError),
        (dict(momentum=1.0), "momentum", ValueError),
        (dict(momentum="0.9"), "momentum", TypeError),
        (dict(stat_decay=1.5), "stat_decay", ValueError),
        (dict(weight_decay=-1e-4), "weight_decay", ValueError),
        (dict(kl_clip=0.0), "kl_clip", ValueError),
        (dict(kl_clip="1e-3"), "kl_clip", TypeError),
        (dict(fisher="type-2"), "fisher", ValueError),
        (dict(fisher=None), "fisher", TypeError),  # a wrong type: TypeError, as for every argument
        (dict(fisher="mc"), "likelihood", ValueError),  # mc needs the likelihood
        (dict(fisher="mc", likelihood="poisson"), "likelihood", ValueError),
        (dict(likelihood="categorical"), "likelihood", ValueError),  # ignored by the empirical Fisher
        (dict(fisher="mc", likelihood="categorical", seed="0"), "seed", TypeError),
        (dict(fisher="mc", likelihood="categorical", seed=1.5), "seed", TypeError),
    ],
)
def test_bad_arguments_name_the_argument(opt_cls, kwargs, name, error):
    args = dict(lr=0.01, damping=0.1) | kwargs
    with pytest.raises(error, match=rf"^{name}\b"):
        opt_cls(_mlp(), **args)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_step_argument_is_checked(opt_cls):
    model = _mlp()
    opt = opt_cls(model, lr=0.01, damping=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="^closure"):
        opt.step(5)
    assert opt.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


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
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_never_inverts_in_half(monkeypatch, opt_cls, dtype):
    """torch's linalg has no half kernels on CPU (and half has 3-4 significant digits): KFAC / EKFAC
    must hand every factor to cholesky / inv / eigh in float32 or float64 whatever the model's dtype,
    keep the curvature in float32, and apply it in the model's dtype."""
    seen = []

    def recording(fn):
        def wrapper(M, *args, **kwargs):
            seen.append((fn.__name__, M.dtype))
            return fn(M, *args, **kwargs)

        return wrapper

    for name in ("cholesky_ex", "inv", "eigh"):
        monkeypatch.setattr(torch.linalg, name, recording(getattr(torch.linalg, name)))
    torch.manual_seed(0)
    model = _mlp(seed=1, dtype=dtype)
    opt = opt_cls(model, lr=0.03, damping=0.1, inverse_interval=1)
    x, y = torch.randn(64, 6).to(dtype), torch.randint(0, 3, (64,))
    _train(model, opt, x, y, 3)
    assert seen, "no factorization was recorded"
    assert {dt for _, dt in seen} <= {torch.float32, torch.float64}, seen
    st = opt.state[model[0].weight]
    for key in ("A", "G") + (("A_inv", "G_inv") if opt_cls is KFAC else ("QA", "QG", "scale")):
        assert st[key].dtype == torch.float32, key
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())


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


# --------------------------------------------------------------------------------------------
# Sampled Fisher: own generator, .grad untouched, reproducible
# --------------------------------------------------------------------------------------------
def _closure_for(opt, model, x, y, loss="categorical", set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        value = CLOSURE_LOSS[loss](model(x), y)
        value.backward()
        return value

    return closure


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_mc_sampling_leaves_grad_and_global_rng_alone(opt_cls):
    """The sampled backward neither writes .grad nor draws from torch's global generator."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = _mlp()
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    opt = opt_cls(model, lr=0.01, damping=0.1, fisher="mc", likelihood="categorical", momentum=0.0)
    rng = torch.get_rng_state()
    opt.step(_closure_for(opt, model, x, y))
    assert torch.equal(torch.get_rng_state(), rng)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)  # the user's gradient, not the sampled one
    assert all("G" in opt.state[L.weight] for L in opt.layers)


def test_mc_sampling_is_reproducible_and_seeded():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    runs = {}
    for tag, seed in [("a", 3), ("b", 3), ("c", 4)]:
        model = _mlp()
        opt = KFAC(model, lr=0.05, damping=0.1, fisher="mc", likelihood="categorical", seed=seed)
        for _ in range(5):
            opt.step(_closure_for(opt, model, x, y))
        runs[tag] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt.state[model[2].weight]["G"])
    assert torch.equal(runs["a"][0], runs["b"][0]) and torch.equal(runs["a"][1], runs["b"][1])
    assert not torch.equal(runs["a"][1], runs["c"][1])


def test_mc_state_dict_restores_the_sampler():
    """After load_state_dict the next draws are the ones the saved run would have made."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = _mlp()
    opt = KFAC(model, lr=0.05, damping=0.1, fisher="mc", likelihood="categorical", seed=7)
    for _ in range(3):
        opt.step(_closure_for(opt, model, x, y))
    model2 = _mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = KFAC(model2, lr=0.05, damping=0.1, fisher="mc", likelihood="categorical", seed=0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        opt.step(_closure_for(opt, model, x, y))
        opt2.step(_closure_for(opt2, model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_mc_warns_when_the_model_is_bypassed():
    """Calling the layers without the hooked model never draws targets: warned, factors not updated."""
    model = _mlp()
    opt = KFAC(model, lr=0.05, damping=0.1, fisher="mc", likelihood="categorical")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        out = x
        for layer in model:  # not model(x)
            out = layer(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="fisher='mc'"):
        opt.step(closure)
    assert not any("G" in opt.state[L.weight] for L in opt.layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mc_refuses_a_non_tensor_output():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), x

    model = TupleOut()
    opt = KFAC(model, lr=0.05, damping=0.1, fisher="mc", likelihood="categorical")
    with pytest.raises(TypeError, match="fisher='mc'"):
        model(torch.randn(5, 4))
    assert opt.steps == 0


# --------------------------------------------------------------------------------------------
# No state aliases .grad: zero_grad(set_to_none=False) and accumulation change nothing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_zeroing_grad_in_place_changes_nothing(opt_cls, fisher, micro_batches):
    """20 steps with zero_grad(set_to_none=False) -- which overwrites .grad in place, as DDP's bucket
    views and gradient accumulation do -- are bit-identical to set_to_none=True. With 2
    micro-batches, .grad accumulates and each step sees their mean."""
    torch.manual_seed(0)
    x = torch.randn(20 * 32, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)
    mc = dict(fisher="mc", likelihood="categorical") if fisher == "mc" else {}
    finals = []
    for set_to_none in (True, False):
        model = _mlp(seed=1)
        opt = opt_cls(model, lr=0.05, damping=0.1, inverse_interval=3, weight_decay=1e-4, **mc)
        # several micro-batches: the factors are the last one's, which the optimizer says once
        said = (pytest.warns(RuntimeWarning, match="ran more than once") if micro_batches > 1
                else contextlib.nullcontext())
        with said:
            for i in range(20):
                xb, yb = x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]

                def closure():
                    opt.zero_grad(set_to_none=set_to_none)
                    for xm, ym in zip(xb.chunk(micro_batches), yb.chunk(micro_batches)):
                        loss = F.cross_entropy(model(xm), ym) / micro_batches
                        loss.backward()
                    return loss

                opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*finals):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Damping floor and curvature recovery: a dead layer or a failed factorization never raises
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "trace_a, trace_g",
    [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (1e30, 1e-45), (1e-45, 1e30), (float("inf"), 1.0), (2.0, 0.5)],
)
def test_factored_damping_has_a_floor_on_each_side(trace_a, trace_g):
    """λ_A·λ_G = damping and each side ≥ sqrt(damping)/MAX_PI, even when a trace vanishes (dead
    ReLU units) or is not finite; in the ordinary case π = sqrt(ratio of mean traces)."""
    damping = 1e-2
    A, G = torch.eye(5) * trace_a, torch.eye(3) * trace_g
    lam_a, lam_g = factored_damping(A, G, damping)
    floor = damping**0.5 / MAX_PI
    assert lam_a >= floor * (1 - 1e-12) and lam_g >= floor * (1 - 1e-12), (lam_a, lam_g)
    assert abs(lam_a * lam_g - damping) < 1e-9
    for M, lam in ((A, lam_a), (G, lam_g)):
        inv = damped_inverse(M, lam)
        assert (inv is None) == (not torch.isfinite(M).all()), (M, lam)
    if (trace_a, trace_g) == (2.0, 0.5):
        assert lam_a == pytest.approx(2.0 * damping**0.5)


def test_damped_inverse_falls_back_when_cholesky_fails(monkeypatch):
    """A rank-deficient factor whose float32 Cholesky fails: the inverse comes from float64 (or from
    the eigendecomposition of M's PSD part), equal to the float64 (M + λI)⁻¹; no exception."""
    torch.manual_seed(0)
    a = torch.randn(10, 8)
    a[:, 2] = 0.0  # a dead unit
    M = a.T @ a / 10
    expected = torch.linalg.inv(M.double() + 1e-3 * torch.eye(8, dtype=torch.float64))
    real = torch.linalg.cholesky_ex
    for failing in ({torch.float32}, {torch.float32, torch.float64}):
        def cholesky_failing(A, **kw):
            L, info = real(A, **kw)
            return (L, torch.ones_like(info)) if A.dtype in failing else (L, info)

        monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky_failing)
        inv, fell_back = damped_inverse_ex(M, 1e-3)
        assert fell_back and inv.dtype == torch.float32
        torch.testing.assert_close(inv.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_training_survives_dead_layers_and_failing_factorizations(monkeypatch, opt_cls):
    """A ReLU net whose first hidden layer is dead (zero-trace G, zero activations downstream) and
    whose every Cholesky, inv and eigh fails after step 3: no exception, finite parameters, the
    previous curvature is kept and every fallback is counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit dead: G of layer 0 is exactly 0
    opt = opt_cls(model, lr=0.05, damping=1e-2, inverse_interval=1, fisher="mc", likelihood="categorical")
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    closure = _closure_for(opt, model, x, y)
    for _ in range(3):
        opt.step(closure)
    assert float(opt.state[model[0].weight]["G"].trace()) == 0.0

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg: The factorization could not be completed")

    def cholesky_fails(A, **kwargs):
        L = torch.zeros_like(A)
        return L, torch.ones(A.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky_fails)
    monkeypatch.setattr(torch.linalg, "inv", fail)
    monkeypatch.setattr(torch.linalg, "eigh", fail)
    before = {p: {k: v.clone() for k, v in st.items() if k in ("A_inv", "QA")} for p, st in opt.state.items()}
    for _ in range(5):
        loss = opt.step(closure)
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.recoveries["kept_previous_curvature"] == 5 * len(opt.layers)
    for p, kept in before.items():  # the curvature from step 3 is still in use
        for key, v in kept.items():
            assert torch.equal(opt.state[p][key], v)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_large_lr_does_not_run_away_with_the_default_step_bound(opt_cls, fisher):
    """lr 0.1 with momentum 0.9 and damping 1e-2 on a ReLU MLP: without a step bound the loss
    reaches ~1e25 within 60 steps and ends NaN (as on MNIST-1D); the default kl_clip keeps every
    step finite and the loss falls."""
    torch.manual_seed(0)
    x = torch.randn(400, 40)
    y = (x[:, :10] * x[:, 10:20]).argmax(1)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    mc = dict(fisher="mc", likelihood="categorical") if fisher == "mc" else {}
    opt = opt_cls(model, lr=0.1, damping=1e-2, **mc)
    losses = []
    for i in range(60):
        idx = torch.arange(i * 50, (i + 1) * 50) % 400
        losses.append(float(opt.step(_closure_for(opt, model, x[idx], y[idx])).detach()))
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    assert opt.skipped_steps == 0 and max(losses) < 3.0, losses
    assert final < 0.5 * losses[0], (losses[0], final)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_state_dict_of_other_shapes_is_refused_before_anything_is_loaded(cls, fisher):
    # conv, a linear without bias and a norm scale: every kind of saved tensor (factors, inverses,
    # eigenbases, EKFAC's scale, momentum) is checked against the shape this model gives it
    def trained(width):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 5, bias=False),
                              nn.LayerNorm(5))
        kwargs = dict(fisher=fisher, likelihood="categorical") if fisher == "mc" else {}
        opt = cls(model, lr=0.05, damping=1e-2, momentum=0.9, **kwargs)
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
        for _ in range(12):
            opt.step(_closure_for(opt, model, x, y))
        return opt

    opt = trained(4)
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"^state_dict: .* has shape .* where .* expected"):
        opt.load_state_dict(trained(6).state_dict())
    now = opt.state_dict()
    assert now["state"].keys() == kept["state"].keys()
    assert all(torch.equal(v, kept["state"][i][k]) for i, st in now["state"].items() for k, v in st.items()
               if torch.is_tensor(v))
    opt.load_state_dict(kept)  # its own state, every key included, still loads


# --------------------------------------------------------------------------------------------
# Copies: of the optimizer (with its model), and of the model alone
# --------------------------------------------------------------------------------------------
COPY_CASES = {"KFAC": (KFAC, {}), "EKFAC": (EKFAC, {}),
              "KFAC mc": (KFAC, {"fisher": "mc", "likelihood": "categorical"})}


def _kfac_steps(opt, model, x, y, n):
    for _ in range(n):
        opt.step(closure_for(opt, model, x, y))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("case", list(COPY_CASES))
def test_a_copied_optimizer_hooks_its_own_model_and_steps_like_the_original(case, how):
    cls, kw = COPY_CASES[case]
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = cls(model, lr=0.05, damping=1e-2, inverse_interval=2, **kw)
    _kfac_steps(opt, model, x, y, 2)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.model is not model and twin.layers[0].module is not model[0]
    _kfac_steps(twin, twin.model, x, y, 3)  # the copy's forwards feed the copy, not the original
    assert all(layer.a is None and layer.g is None for layer in opt.layers)
    _kfac_steps(opt, model, x, y, 3)
    for a, b in zip(model.parameters(), twin.model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.model.parameters()):
        for key, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][key]) if isinstance(v, torch.Tensor) else v == twin.state[q][key]


@pytest.mark.parametrize("case", list(COPY_CASES))
def test_a_copy_of_the_model_alone_feeds_no_optimizer_and_pickles(case):
    cls, kw = COPY_CASES[case]
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = cls(model, lr=0.05, damping=1e-2, **kw)
    _kfac_steps(opt, model, x, y, 1)
    ema = copy.deepcopy(model)  # an EMA or teacher copy, run in training mode with gradients
    F.cross_entropy(ema(x), y).backward()
    assert all(layer.a is None and layer.g is None for layer in opt.layers) and not opt._pending
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module, hooks included: the optimizer does not travel with it
    assert buf.getbuffer().nbytes < 20_000
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    _kfac_steps(opt, model, x, y, 1)  # and the original still captures its own model's rows
    assert opt.steps == 2 and "A" in opt.state[model[0].weight]


# --------------------------------------------------------------------------------------------
# A layer with a gradient but no captured rows is said, not silently left without factors
# --------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """nn.MultiheadAttention uses out_proj's weight without calling out_proj (F.multi_head_attention_forward)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_layers_whose_forward_hook_sees_nothing_are_named_once(opt_cls):
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    model = _Attention()
    opt = opt_cls(model, lr=0.05, damping=1e-2)
    with pytest.warns(RuntimeWarning, match=rf"^{opt_cls.__name__}: layer\(s\) 'attn.out_proj' got a gradient, but "
                                            r"their forward hook captured no inputs") as record:
        _kfac_steps(opt, model, x, y, 3)
    assert len([w for w in record if "captured no inputs" in str(w.message)]) == 1  # once, not per step
    assert "A" in opt.state[model.head.weight] and "A" not in opt.state[model.attn.out_proj.weight]

    mlp, x2 = _mlp(), torch.randn(16, 6)
    opt = opt_cls(mlp, lr=0.05, damping=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training mode, every layer called: nothing to say
        _kfac_steps(opt, mlp, x2, y.repeat(2), 2)
    mlp.eval()  # e.g. to freeze normalization statistics: no layer captures
    opt = opt_cls(mlp, lr=0.05, damping=1e-2)
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) '0', '2' got a gradient.*eval mode"):
        _kfac_steps(opt, mlp, x2, y.repeat(2), 1)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_remove_hooks_removes_every_hook_after_a_load_and_a_copy_keeps_them_removed(opt_cls):
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = opt_cls(model, lr=0.05, damping=1e-2)
    _kfac_steps(opt, model, x, y, 1)
    opt.load_state_dict(opt.state_dict())  # torch.optim's load calls __setstate__ too
    opt.remove_hooks()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    twin = copy.deepcopy(opt)  # an optimizer detached from its model stays detached in a copy
    assert not twin.model[0]._forward_hooks and not twin.model[2]._forward_hooks


class _Twice(nn.Module):
    """One Linear applied twice (weight sharing across calls)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_layer_applied_twice_keeps_one_calls_inputs_and_output_gradients_and_says_so(opt_cls):
    from apo_kernels.baselines.kfac import kronecker_factors

    model, x, y = _Twice(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    rows, grads = [], []  # each call's [input, 1] rows and output gradients, on a copy before the step
    twin = copy.deepcopy(model)

    def record(module, inputs, output):
        rows.append(torch.cat([inputs[0], torch.ones(len(inputs[0]), 1)], 1).detach())
        output.register_hook(lambda g: grads.insert(0, g.detach()))  # backward runs the calls in reverse

    twin.shared.register_forward_hook(record)
    F.cross_entropy(twin(x), y).backward()
    opt = opt_cls(model, lr=0.05, damping=1e-2, stat_decay=0.0)
    with pytest.warns(RuntimeWarning, match=rf"^{opt_cls.__name__}: layer\(s\) 'shared' ran more than once"):
        _kfac_steps(opt, model, x, y, 1)
    A, G = kronecker_factors(rows[-1], grads[-1], 16)  # the last call's inputs with its own gradients
    torch.testing.assert_close(opt.state[model.shared.weight]["A"], A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[model.shared.weight]["G"], G, rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        _kfac_steps(opt, model, x, y, 2)

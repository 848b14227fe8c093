"""APO-LR (apo_kernels.optim.APOLR): lookahead = base optimizer, meta-gradient, behaviour, state."""
import copy
import functools
import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from apo_kernels.ops import backends
from apo_kernels.optim import APOLR, lr_directions
from apo_kernels.optim.lr import NOT_LINEAR_IN_LR
from _tiny import one_thread, closure_for  # noqa: F401  (one_thread: autouse fixture)




def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(dtype=torch.float32, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop-centered-momentum-wd": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True,
                                                                  weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adagrad (generic probe)": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


@pytest.mark.parametrize("name", list(BASES))
def test_lookahead_equals_a_copy_of_the_base_optimizer_stepping(name):
    m = mlp(torch.float64)
    x, y = batch(torch.float64)
    base = BASES[name](m.parameters())
    for k in range(4):  # state (momentum, moments, step) at a non-trivial point; state frozen below
        base.zero_grad()
        F.cross_entropy(m(x + 0.1 * k), y).backward()
        if k < 3:
            base.step()
    lr = base.param_groups[0]["lr"]
    state_before = copy.deepcopy(base.state_dict())
    params = [list(m.parameters())]
    dirs = lr_directions(base, params)
    lookahead = [p.detach() + lr * d for p, d in zip(params[0], dirs[0])]
    assert base.state_dict()["state"].keys() == state_before["state"].keys()
    for k, st in state_before["state"].items():  # the base optimizer's state was not touched
        for key, v in st.items():
            cur = base.state_dict()["state"][k][key]
            assert torch.equal(torch.as_tensor(cur), torch.as_tensor(v)), (k, key)
    m_copy = copy.deepcopy(m)
    real = BASES[name](m_copy.parameters())
    real.load_state_dict(copy.deepcopy(state_before))
    for p, q in zip(m.parameters(), m_copy.parameters()):
        q.grad = p.grad.clone()
    real.step()
    for a, b in zip(lookahead, m_copy.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(NOT_LINEAR_IN_LR), ids=lambda t: t.__name__)
def test_base_optimizers_whose_update_is_not_linear_in_lr_are_refused_at_construction(kind):
    m = mlp()
    with pytest.raises(TypeError, match=rf"^base_optimizer: {kind.__name__}'s .*; it is not supported"):
        APOLR(m, kind(m.parameters()), lambda_fsd=0.0, lambda_wsd=0.0)


class _StepSizeInState(torch.optim.Optimizer):
    """SGD whose step size is read from the group's lr at its first step and kept in its state (as
    ASGD and Rprop do): linear in lr at the first step only."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                eta = self.state[p].setdefault("eta", group["lr"])
                p.add_(p.grad, alpha=-eta)


class _PlainSGD(_StepSizeInState):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def test_generic_probe_refuses_an_update_that_stops_following_lr_and_keeps_state_and_params():
    m = mlp()
    x, y = batch()
    opt = APOLR(m, _StepSizeInState(m.parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=2)
    opt.step(closure_for(opt, m, x, y))  # meta-step 0: no state yet, eta is the probe's lr (linear)
    opt.step(closure_for(opt, m, x, y))
    before = [p.detach().clone() for p in m.parameters()]
    etas = [opt.base_optimizer.state[p]["eta"] for p in m.parameters()]
    with pytest.raises(TypeError, match=r"^base_optimizer: _StepSizeInState's step at lr = 2 is .* away from twice "
                                        r"its step at lr = 1"):
        opt.step(closure_for(opt, m, x, y))
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert [opt.base_optimizer.state[p]["eta"] for p in m.parameters()] == etas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [_PlainSGD, torch.optim.Adagrad], ids=["custom SGD", "Adagrad"])
def test_generic_probe_accepts_updates_linear_in_lr_in_low_precision(kind, dtype):
    # a bfloat16 Δθ of a small step is rounded by a few ulps of θ: that is not nonlinearity
    m = mlp(dtype)
    x, y = batch()
    x = x.to(dtype)
    opt = APOLR(m, kind(m.parameters(), lr=1e-3), lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=1)
    for _ in range(4):
        opt.step(closure_for(opt, m, x, y))
    assert opt.meta_steps == 4 and opt.skipped_steps == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lookahead_of_a_group_where_only_some_parameters_have_momentum(nesterov, dtype):
    """SGD's parameters that share coefficients and gradient dtype are stepped together (one
    foreach op per term): a group where one layer has no momentum buffer yet (it had no gradient
    before) mixes both kinds, and every parameter's direction must still be the base optimizer's own
    step, taken here in float64 on exact float64 copies of the state (a bfloat16 model's direction
    is formed in float32: within float32 rounding of it)."""
    m = mlp(dtype)
    x, y = batch(dtype)
    hyper = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    base = torch.optim.SGD(m.parameters(), **hyper)
    first = list(m[0].parameters())
    for k in range(3):
        base.zero_grad()
        F.cross_entropy(m(x + 0.1 * k), y).backward()
        for p in first:
            p.grad = None  # the first layer: no gradient, so no momentum buffer
        base.step()
    base.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert {("momentum_buffer" in base.state.get(p, {})) for p in m.parameters()} == {True, False}
    params = list(m.parameters())
    (dirs,) = lr_directions(base, [params])
    m64 = copy.deepcopy(m).double()
    real = torch.optim.SGD(m64.parameters(), **hyper)
    state = copy.deepcopy(base.state_dict())
    for st in state["state"].values():
        st["momentum_buffer"] = st["momentum_buffer"].double()
    real.load_state_dict(state)
    for p, q in zip(params, m64.parameters()):
        q.grad = p.grad.double()
    before = [q.detach().clone() for q in m64.parameters()]
    real.step()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for d, q, q0 in zip(dirs, m64.parameters(), before):
        assert d.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(d.double(), (q.detach() - q0) / 0.1, **tol)


@pytest.mark.parametrize("name,per_group", [("sgd-nesterov-wd", False), ("adamw-amsgrad", False),
                                            ("rmsprop-centered-momentum-wd", True)])
def test_meta_gradient_matches_central_finite_differences_float64(name, per_group):
    m = mlp(torch.float64)
    x, y = batch(torch.float64)
    groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.05}]
    base = BASES[name](groups)
    opt = APOLR(m, base, lambda_fsd=0.3, lambda_wsd=0.5, per_group=per_group, meta_interval=0)
    closure = closure_for(opt, m, x, y)
    for _ in range(3):
        opt.step(closure)
    _, (grad,) = opt.meta_gradient(closure, fsd_inputs=(x,))
    eps = 1e-5
    for k in range(grad.numel()):
        old = opt.log_lr[k].item()

        def q_at(v):
            opt.log_lr[k] = v
            return opt.meta_objective(closure, fsd_inputs=(x,))

        fd = (q_at(old + eps) - q_at(old - eps)) / (2 * eps)
        q_at(old)
        assert grad[k].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_meta_steps_off_is_the_base_optimizer_exactly():
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    x, y = batch()
    o1 = APOLR(m1, torch.optim.Adam(m1.parameters(), lr=0.01), lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=0)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.01)
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y))
        o2.step(closure_for(o2, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o1.lr == 0.01


# --------------------------------------------------------------------------------------------
# Behaviour on a quadratic (least squares; Hessian eigenvalues 0.18 … 1.18 so 2/λmax ≈ 1.7)
# --------------------------------------------------------------------------------------------
def regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=g) * torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4])
    y = X @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(256, 1, generator=g)
    return X, y


def run_regression(lr0, *, steps=300, batch_size=None, meta_batch="same", base="sgd", momentum=0.0):
    X, y = regression()
    torch.manual_seed(1)
    m = nn.Linear(5, 1)
    b = (torch.optim.SGD(m.parameters(), lr=lr0, momentum=momentum) if base == "sgd"
         else torch.optim.Adam(m.parameters(), lr=lr0))
    opt = APOLR(m, b, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=10, meta_batch=meta_batch)
    gen = torch.Generator().manual_seed(2)

    def closure_on(idx):
        def closure():
            opt.zero_grad()
            loss = 0.5 * (m(X[idx]) - y[idx]).pow(2).mean()
            loss.backward()
            return loss
        return closure

    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch_size,), generator=gen) if batch_size else slice(None)
        fresh = torch.randint(0, len(X), (batch_size,), generator=gen) if batch_size else slice(None)
        opt.step(closure_on(idx), meta_closure=closure_on(fresh) if meta_batch == "fresh" else None)
    with torch.no_grad():
        return opt, (0.5 * (m(X) - y).pow(2).mean()).item()


def fixed_lr_regression_loss(lr, steps=300, momentum=0.0):
    X, y = regression()
    torch.manual_seed(1)
    m = nn.Linear(5, 1)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (m(X) - y).pow(2).mean()).backward()
        opt.step()
    with torch.no_grad():
        return (0.5 * (m(X) - y).pow(2).mean()).item()


def test_learning_rate_100x_too_small_grows():
    opt, loss_apo = run_regression(0.01)
    history = [lrs[0] for _, lrs in opt.lr_history]
    assert len(history) == 31 and history[0] == 0.01 and history[-1] == opt.lr
    # every meta-step raises it; the first by exactly meta_lr = 0.1 in log lr (a bias-corrected second
    # moment: torch's RMSprop made it 1.0, a jump by e), the others here by no more
    steps = [math.log(b / a) for a, b in zip(history, history[1:])]
    assert steps[0] == pytest.approx(0.1, rel=1e-6)
    assert all(0 < s <= 0.1 * 1.01 for s in steps)
    assert opt.lr > 3 * 0.01
    assert loss_apo < 0.5 * fixed_lr_regression_loss(0.01)
    opt_adam, _ = run_regression(0.001, base="adam")
    assert opt_adam.lr > 10 * 0.001


@functools.lru_cache(maxsize=None)
def best_fixed_lr_sgd_momentum_loss(steps=500):
    """The best final loss of SGD(momentum 0.9) over fixed lrs 1e-4 … 10 (above 2(1 + μ)/λmax ≈ 3.2
    they diverge)."""
    fixed = [fixed_lr_regression_loss(10 ** (k / 4), steps=steps, momentum=0.9) for k in range(-16, 5)]
    return min(v for v in fixed if math.isfinite(v))


@pytest.mark.parametrize("lr0", [1e3, 1e1, 1e-4])
def test_sgd_momentum_from_any_start_ends_within_10x_of_the_best_fixed_lr(lr0):
    best = best_fixed_lr_sgd_momentum_loss()
    start = fixed_lr_regression_loss(lr0, steps=0)
    opt, loss = run_regression(lr0, steps=500, momentum=0.9)
    assert math.isfinite(loss) and loss <= 10 * best, (loss, best)
    assert loss - best <= 0.01 * (start - best), (loss, best, start)  # and most of the way there
    assert opt.skipped_steps == 0
    if lr0 > 2:  # step 0's lookahead was worse than not stepping: the lr was cut before any real update
        after_step_0 = [lrs[0] for step, lrs in opt.lr_history if step == 0][-1]
        assert opt.recoveries >= 1 and after_step_0 < 2


def test_diverging_learning_rate_shrinks():
    opt, loss = run_regression(4.0)  # > 2/λmax: plain SGD with it diverges
    assert opt.lr < 1.7 and math.isfinite(loss) and loss < 0.1


@pytest.mark.parametrize("meta_lr", [1e3, 1e30])
def test_a_huge_meta_lr_keeps_the_learnt_lr_a_finite_nonzero_double(meta_lr):
    # one Adam step on log lr moves it by about meta_lr: past ±709, exp(φ − φ₀) overflowed (an
    # OverflowError in the lr swap), and an lr above the largest float32 made torch's SGD step raise.
    # φ now stays within LOG_LR_REACH of φ₀, and the lr at most the largest float32.
    from apo_kernels._args import FLOAT32_MAX
    from apo_kernels.optim.lr import LOG_LR_REACH

    m = mlp()
    x, y = batch()
    opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.1, lambda_wsd=0.0,
                meta_lr=meta_lr, meta_interval=2)
    for _ in range(6):
        opt.step(closure_for(opt, m, x, y), fsd_inputs=(x,))
    assert opt.meta_steps + opt.recoveries > 0
    for _, lrs in opt.lr_history:
        assert all(0.0 < lr <= FLOAT32_MAX * (1 + 1e-12) for lr in lrs)
        assert all(abs(math.log(lr / 0.1)) <= LOG_LR_REACH * (1 + 1e-12) for lr in lrs)


def test_fresh_batch_ablation_decays_the_learning_rate_faster():
    same, _ = run_regression(0.3, steps=600, batch_size=8)
    fresh, _ = run_regression(0.3, steps=600, batch_size=8, meta_batch="fresh")
    assert fresh.lr < 0.5 * same.lr
    with pytest.raises(ValueError, match="meta_closure"):
        m = nn.Linear(2, 1)
        o = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.0, meta_batch="fresh")
        o.step(lambda: m(torch.ones(1, 2)).sum())


# --------------------------------------------------------------------------------------------
# State, robustness, arguments
# --------------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_bit_identically():
    x, y = batch()

    def make():
        m = mlp()
        return m, APOLR(m, torch.optim.Adam(m.parameters(), lr=0.01), lambda_fsd=0.5, lambda_wsd=0.1,
                        meta_interval=2)

    m1, o1 = make()
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))
    sd_m, sd_o = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    for _ in range(5):
        o1.step(closure_for(o1, m1, x, y), fsd_inputs=(x,))
    m2, o2 = make()
    m2.load_state_dict(sd_m)
    o2.load_state_dict(sd_o)
    for _ in range(5):
        o2.step(closure_for(o2, m2, x, y), fsd_inputs=(x,))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o1.lr == o2.lr and o1.lr_history == o2.lr_history


def test_non_finite_step_is_skipped_with_lr_and_params_unchanged():
    m = mlp()
    x, y = batch()
    opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=1)
    opt.step(closure_for(opt, m, x, y))
    before = [p.clone() for p in m.parameters()], opt.lr
    bad = x.clone()
    bad[0, 0] = float("inf")
    opt.step(closure_for(opt, m, bad, y))
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], m.parameters())) and opt.lr == before[1]


@pytest.mark.skipif(backends.native_dot_sum is None, reason="the native module apo_kernels._C is not built")
@pytest.mark.parametrize("per_group", [False, True])
def test_meta_gradient_from_one_native_dot_sum_per_group_matches_the_dot_per_parameter(per_group, monkeypatch):
    """The meta-gradient Σ ⟨∇θ'Q, Δ⟩ of each group (of all groups with one lr) is one apo::dot_sum call
    (float64 sums); without the native op it is a float64 dot per parameter: the same value to 1e-12."""
    x, y = batch()

    def meta_gradient():
        model = mlp()
        params = list(model.parameters())
        base = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.03}], lr=0.05, momentum=0.9)
        opt = APOLR(model, base, lambda_fsd=0.1, lambda_wsd=0.1, per_group=per_group)
        opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
        return opt.meta_gradient(closure_for(opt, model, x, y), fsd_inputs=(x,))[1][0]

    calls = []
    native = backends.native_dot_sum
    monkeypatch.setattr(backends, "native_dot_sum", lambda a, b: calls.append(len(a)) or native(a, b))
    with_op = meta_gradient()
    # the probe's meta-gradient (the step's own is apo::dot_adam_step's): one call per group, of its two
    # parameters; with one lr for both groups one call of all four
    assert calls == ([2, 2] if per_group else [4])
    monkeypatch.setattr(backends, "native_dot_sum", None)
    torch.testing.assert_close(with_op, meta_gradient(), rtol=1e-12, atol=0)


def _two_group_apolr(model, checked=True):
    """APO-LR with one learnt lr per group over a two-group SGD (nesterov; the second group with its
    own lr and weight decay); ``checked=False``: a hook on the base optimizer's step, so that its
    steps are torch's own, after the separate check."""
    params = list(model.parameters())
    base = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "weight_decay": 0.01}],
                           lr=0.05, momentum=0.9, nesterov=True)
    if not checked:
        base.register_step_post_hook(lambda *args: None)
    return APOLR(model, base, lambda_fsd=0.0, lambda_wsd=0.1, meta_interval=3, per_group=True)


def _poisoned(closure, model, value):
    """The closure with ``value`` written into the last parameter's gradient after its backward."""
    def run():
        loss = closure()
        list(model.parameters())[-1].grad.view(-1)[0] = value
        return loss
    return run


@pytest.mark.skipif(backends.native_sgd_step is None, reason="the native module apo_kernels._C is not built")
def test_plain_steps_in_one_native_call_match_the_check_and_torchs_step(monkeypatch):
    """APO-LR's plain steps over torch's default SGD are one checked native call per group
    (apo::sgd_step): bit for bit the check and then torch's own step, with meta-steps among them, per
    group lrs, and a plain step whose gradient holds a NaN (in the second group only) skipped alike,
    nothing written anywhere and the step not counted."""
    calls = []
    native = backends.native_sgd_step
    monkeypatch.setattr(backends, "native_sgd_step", lambda *args: calls.append(len(args[0])) or native(*args))
    models = [mlp(), mlp()]
    opts = [_two_group_apolr(models[0]), _two_group_apolr(models[1], checked=False)]
    x, y = batch()
    for k in range(8):
        state = [([p.clone() for p in m.parameters()], [o.state[p]["momentum_buffer"].clone() for p in m.parameters()]
                  if o.step_count else None) for m, o in zip(models, opts)]
        for m, o in zip(models, opts):
            closure = closure_for(o, m, x, y)
            o.step(_poisoned(closure, m, float("nan")) if k == 5 else closure)
        if k == 5:  # a plain step: skipped, nothing written, not counted
            for (params, bufs), m, o in zip(state, models, opts):
                assert o.skipped_steps == 1 and o.step_count == 5
                assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
                assert all(torch.equal(a, o.state[p]["momentum_buffer"]) for a, p in zip(bufs, m.parameters()))
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
            assert torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])
        assert opts[0].learnt_lrs == opts[1].learnt_lrs
    # one call per group on the plain steps 1, 2, 4, 6 and on the base steps of the meta-steps 3 and 7
    # (step 0's creates the buffers: torch's); none on the NaN step, whose gradients of both groups
    # are checked before either group's call
    assert opts[0].meta_steps == 3 and calls == [2] * 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_step_finiteness_check_is_exact_when_sums_overflow_or_cancel(dtype):
    # the step's check sums each gradient first: a sum that overflows from finite values must not
    # skip a step, and inf − inf (a NaN sum) or a lone NaN/±inf anywhere must
    from apo_kernels._numerics import all_finite
    big = torch.finfo(dtype).max
    finite = [torch.full((3, 5), big, dtype=dtype)[:, ::2], torch.tensor([-big, -big], dtype=dtype)]
    assert all_finite(finite)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for k in range(2):
            ts = [t.clone() for t in finite]
            ts[k].view(-1)[-1] = bad
            assert not all_finite([None, *ts])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")], dtype=dtype)])
    assert all_finite([torch.zeros(0, dtype=dtype), None])


def test_grad_scaler_and_autocast():
    x, y = batch()

    def run(scaler):
        m = mlp()
        opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0, lambda_wsd=0.1,
                    meta_interval=2, grad_scaler=scaler)
        for _ in range(6):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y)
                (scaler.scale(loss) if scaler else loss).backward()
                return loss
            opt.step(closure)
            if scaler:
                scaler.update()
        return m, opt

    m_ref, o_ref = run(None)
    m_sc, o_sc = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m_sc.parameters()))
    assert o_ref.lr == o_sc.lr

    m = mlp()
    opt = APOLR(m, torch.optim.Adam(m.parameters(), lr=0.01), lambda_fsd=1.0, lambda_wsd=0.0, meta_interval=2)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(opt.step(closure, fsd_inputs=(x,)).item())
    assert losses[-1] < losses[0] and opt.log_lr.dtype == torch.float64 and opt.meta_steps == 5


def test_bad_arguments_raise_naming_the_argument():
    m = mlp()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"\bbase_optimizer\b"):
        APOLR(m, "sgd", lambda_fsd=0.0, lambda_wsd=0.0)
    with pytest.raises(ValueError, match=r"\blr\b"):
        APOLR(m, torch.optim.SGD(m.parameters(), lr=0.0), lambda_fsd=0.0, lambda_wsd=0.0)
    with pytest.raises(ValueError, match=r"\bbase_optimizer\b"):
        APOLR(m, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.0)
    with pytest.raises(ValueError, match=r"\bmeta_interval\b"):
        APOLR(m, sgd, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=-1)
    with pytest.raises(ValueError, match=r"\bfsd\b"):
        APOLR(m, sgd, lambda_fsd=0.0, lambda_wsd=0.0, fsd="l1")
    with pytest.raises(ValueError, match=r"\blambda_fsd\b"):
        APOLR(m, sgd, lambda_fsd=-1.0, lambda_wsd=0.0)
    with pytest.raises(ValueError, match=r"\bmodel\b"):
        APOLR(nn.ReLU(), sgd, lambda_fsd=0.0, lambda_wsd=0.0)
    opt = APOLR(m, sgd, lambda_fsd=1.0, lambda_wsd=0.0)
    x, y = batch()
    with pytest.raises(ValueError, match=r"\bfsd_inputs\b"):
        opt.step(closure_for(opt, m, x, y))
    with pytest.raises(ValueError, match=r"\bclosure\b"):
        opt.step()


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam])
def test_a_base_optimizer_that_ascends_the_loss_is_refused_while_meta_steps_are_on(kind):
    # Q minimizes the closure's loss: over an ascending base optimizer the meta-step would only shrink the lr
    m = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match=r"^base_optimizer: param group 0 has maximize=True"):
        APOLR(m, kind(m.parameters(), lr=0.1, maximize=True), lambda_fsd=0.0, lambda_wsd=0.0)
    # with meta-steps off APOLR is the base optimizer, and ascends as it does
    opt = APOLR(m, kind(m.parameters(), lr=0.1, maximize=True), lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=0)
    before = F.cross_entropy(m(x), y).item()
    for _ in range(3):
        opt.step(closure_for(opt, m, x, y))
    assert F.cross_entropy(m(x), y).item() > before
    # a group switched to maximize after construction: refused at the next meta-step, before the closure runs
    opt = APOLR(m, kind([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=0.1),
                lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=2)
    opt.step(closure_for(opt, m, x, y))
    opt.step(closure_for(opt, m, x, y))  # a plain step
    opt.param_groups[1]["maximize"] = True
    theta = [p.detach().clone() for p in m.parameters()]
    calls = []
    with pytest.raises(ValueError, match=r"^base_optimizer: param group 1 has maximize=True"):
        opt.step(lambda: calls.append(1))
    assert not calls and all(torch.equal(p, q) for p, q in zip(m.parameters(), theta))


# --------------------------------------------------------------------------------------------
# Learning-rate schedulers compose with the learnt lr as a multiplier
# --------------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.25),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=30, cycle_momentum=False),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "LinearLR warm-up": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
}


@pytest.mark.parametrize("attach_to", ["base optimizer", "APOLR"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_without_meta_steps_is_the_scheduled_base_optimizer_exactly(name, attach_to):
    # a scheduler on APOLR itself schedules the base optimizer: they share param_groups
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    x, y = batch()
    apo = APOLR(m1, torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0, lambda_wsd=0.0,
                meta_interval=0)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s1, s2 = SCHEDULERS[name](apo if attach_to == "APOLR" else apo.base_optimizer), SCHEDULERS[name](sgd)
    for _ in range(10):
        apo.step(closure_for(apo, m1, x, y))
        sgd.step(closure_for(sgd, m2, x, y))
        s1.step()
        s2.step()
        assert apo.lr == sgd.param_groups[0]["lr"] == apo.base_optimizer.param_groups[0]["lr"]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_multiplies_the_learnt_lr_and_keeps_its_own_schedule(name):
    m = mlp(torch.float64)
    x, y = batch(torch.float64)
    base = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = APOLR(m, base, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=2)
    sched = SCHEDULERS[name](base)
    reference = SCHEDULERS[name](torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    initial = 0.1  # the lr at APOLR's construction is the schedule's reference (OneCycleLR's own start differs)
    closure = closure_for(opt, m, x, y)
    for _ in range(20):
        # the group holds the schedule alone, the learnt lr lives in φ
        assert base.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
        assert opt.lr == pytest.approx(opt.learnt_lrs[0] * base.param_groups[0]["lr"] / initial, rel=1e-12)
        if opt.meta_due():
            opt.step(closure)
        else:  # a step without meta-update: its real update uses exactly opt.lr
            before = [p.detach().clone() for p in m.parameters()]
            lr = opt.lr
            closure()
            grads = [p.grad.clone() for p in m.parameters()]
            opt.step()
            for p, b, g in zip(m.parameters(), before, grads):
                assert torch.equal(p, b.add(g, alpha=-lr))  # torch.optim.SGD's own operation
        sched.step()
        reference.optimizer.step()
        reference.step()
    assert opt.meta_steps == 10 and opt.learnt_lrs[0] != 0.1  # the learnt lr moved


def test_lookahead_ignores_the_schedule():
    x, y = batch(torch.float64)

    def make():
        m = mlp(torch.float64)
        return m, APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0,
                        lambda_wsd=0.1, meta_interval=1)

    (m1, o1), (m2, o2) = make(), make()
    sched = torch.optim.lr_scheduler.StepLR(o2.base_optimizer, step_size=1, gamma=1e-3)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore")
        sched.step()
    assert o2.lr == pytest.approx(1e-4) and o2.learnt_lrs == o1.learnt_lrs == [0.1]
    q1, g1 = o1.meta_gradient(closure_for(o1, m1, x, y))
    q2, g2 = o2.meta_gradient(closure_for(o2, m2, x, y))
    assert q1 == q2 and torch.equal(g1[0], g2[0])


# --------------------------------------------------------------------------------------------
# APOLR is a torch.optim.Optimizer (the base of APOPrecond too) over the base optimizer's groups
# --------------------------------------------------------------------------------------------
def test_apolr_is_a_torch_optimizer_over_the_base_optimizers_groups_and_state():
    m = mlp()
    base = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt = APOLR(m, base, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    x, y = batch()
    opt.step(closure_for(opt, m, x, y))
    assert all("momentum_buffer" in opt.state[p] for p in m.parameters())
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))  # torch.optim's step hooks
    opt.step(closure_for(opt, m, x, y))
    assert calls == [opt]


def test_apolr_deepcopy_steps_like_the_original_and_groups_are_fixed():
    m = mlp(torch.float64)
    x, y = batch(torch.float64)
    opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0, lambda_wsd=0.1,
                meta_interval=2)
    opt.step(closure_for(opt, m, x, y))
    twin = copy.deepcopy(opt)  # copies the model and the base optimizer with it
    for _ in range(3):
        opt.step(closure_for(opt, opt.model, x, y))
        twin.step(closure_for(twin, twin.model, x, y))
    assert twin.learnt_lrs == opt.learnt_lrs and twin.meta_steps == opt.meta_steps == 2
    for a, b in zip(opt.model.parameters(), twin.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^param_group\b"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    # nor through the base optimizer, whose groups are APOLR's: refused by name at the next step,
    # before anything moves (it used to fail with an IndexError deep in the lookahead)
    before = [p.detach().clone() for p in opt.model.parameters()]
    opt.base_optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)]})
    with pytest.raises(ValueError, match=r"^base_optimizer: 2 param groups where APOLR was built for 1"):
        opt.step(closure_for(opt, opt.model, x, y))
    assert all(torch.equal(p, b) for p, b in zip(opt.model.parameters(), before))

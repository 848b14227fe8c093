"""APOLR / APOPrecond in the situations a real training loop creates: gradients written in place
(zero_grad(set_to_none=False), gradient accumulation), parameters outside the base optimizer,
steps too large to evaluate, and bad arguments."""
import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from apo_kernels.optim import APOLR, APOPrecond
from _tiny import one_thread, mlp, data, closure_for  # noqa: F401  (one_thread: autouse fixture)





def accumulating_closure(opt, model, batches, *, set_to_none):
    """zero_grad, then one backward per micro-batch into the same .grad; returns the summed loss."""
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        total = 0.0
        for x, y in batches:
            loss = F.cross_entropy(model(x), y) / len(batches)
            loss.backward()
            total = total + loss.detach()
        return total
    return closure


# --------------------------------------------------------------------------------------------
# No optimizer state may alias .grad
# --------------------------------------------------------------------------------------------
MICRO_BATCHES = {
    "one batch": [data()],
    "2 micro-batches": [data(8, seed=1), data(8, seed=2)],
}


def _apo_precond_identity(model):
    # lr = 1/16 and s_param="linear": S = 1/4 exactly, so S² = lr and A = B = I are exact
    return APOPrecond(model, lr=0.0625, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0,
                      momentum=0.9, update_scale=1.0, s_param="linear")


def _apo_lr_frozen(model):
    # meta-steps on every step with meta_lr = 0: the lookahead runs (and rewrites .grad in place
    # under set_to_none=False), the lr never moves
    return APOLR(model, torch.optim.SGD(model.parameters(), lr=0.0625, momentum=0.9),
                 lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.0, meta_interval=1)


@pytest.mark.parametrize("batches", list(MICRO_BATCHES), ids=list(MICRO_BATCHES))
@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads-kept", "grads-none"])
@pytest.mark.parametrize("make", [_apo_precond_identity, _apo_lr_frozen], ids=["APOPrecond", "APOLR"])
def test_bit_identical_to_sgd_momentum_when_grads_are_written_in_place(make, set_to_none, batches):
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    apo = make(m1)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625, momentum=0.9)
    mb = MICRO_BATCHES[batches]
    for _ in range(20):
        apo.step(accumulating_closure(apo, m1, mb, set_to_none=set_to_none))
        sgd.step(accumulating_closure(sgd, m2, mb, set_to_none=set_to_none))
    assert apo.step_count == 20
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# A meta-step leaves every parameter's .grad as the closure left it at θ
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads-kept", "grads-none"])
def test_grads_outside_the_base_optimizer_are_restored_bit_for_bit(set_to_none):
    m = mlp()
    x, y = data()
    m[2].bias.requires_grad_(False)  # a frozen parameter keeps grad None
    opt = APOLR(m, torch.optim.SGD([m[2].weight], lr=0.1, momentum=0.9),
                lambda_fsd=0.5, lambda_wsd=0.1, meta_interval=1)

    def closure():  # zeroes the whole model: m[0] is outside the base optimizer
        m.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        reference = copy.deepcopy(m)  # θ before the step: its gradient is what .grad must hold after
        opt.step(closure, fsd_inputs=(x,))
        reference.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(reference(x), y).backward()
        assert opt.meta_steps > 0
        for p, q in zip(m[0].parameters(), reference[0].parameters()):
            assert torch.equal(p.grad, q.grad)
        assert m[2].bias.grad is None


# --------------------------------------------------------------------------------------------
# Arguments that used to corrupt silently: refused at construction (or at step), by name
# --------------------------------------------------------------------------------------------
def _apolr(**kw):
    m = mlp()
    return APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1), **{"lambda_fsd": 0.0, "lambda_wsd": 0.0, **kw})


def _precond(**kw):
    base = dict(lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    base.update(kw)
    return APOPrecond(mlp(), **base)


@pytest.mark.parametrize(
    "make,kwargs,exc,name",
    [
        (_apolr, dict(max_lr=float("nan")), ValueError, "max_lr"),
        (_apolr, dict(max_lr=0.0), ValueError, "max_lr"),
        (_apolr, dict(max_lr=float("inf")), ValueError, "max_lr"),
        (_apolr, dict(max_lr="1"), TypeError, "max_lr"),
        (_apolr, dict(min_lr=0.0), ValueError, "min_lr"),
        (_apolr, dict(min_lr=-1e-3), ValueError, "min_lr"),
        (_apolr, dict(min_lr=1.0, max_lr=0.5), ValueError, "min_lr"),
        (_apolr, dict(per_group="no"), TypeError, "per_group"),
        (_apolr, dict(per_group=1), TypeError, "per_group"),
        (_precond, dict(meta_betas=(0.5,)), ValueError, "meta_betas"),
        (_precond, dict(meta_betas=None), TypeError, "meta_betas"),
        (_precond, dict(meta_betas=(0.5, 1.0)), ValueError, "meta_betas"),
        (_precond, dict(meta_betas=(0.5, "0.9")), TypeError, "meta_betas"),
        # S² = lr / update_scale must be a normal number of φ's dtype (float32 here)
        (_precond, dict(lr=1e30, update_scale=1e-9), ValueError, "update_scale"),
        (_precond, dict(lr=1e-30, update_scale=1e10), ValueError, "update_scale"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_bad_arguments_raise_at_construction_naming_the_argument(make, kwargs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        make(**kwargs)


def test_unavailable_backend_is_refused_at_construction():
    import apo_kernels
    for backend, status in apo_kernels.backends().items():
        if status.startswith("available"):
            continue
        with pytest.raises(ValueError, match=r"\bbackend\b"):
            _precond(backend=backend)
    if not apo_kernels.backends()["cuda"].startswith("available"):
        with pytest.raises(ValueError, match=r"\bbackend\b.*unavailable"):
            _precond(backend="cuda")
    else:  # CUDA is here, but the model is on CPU: the cuda backend cannot run on it
        with pytest.raises(ValueError, match=r"\bbackend\b"):
            _precond(backend="cuda")


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
@pytest.mark.parametrize(
    "step_kwargs,name",
    [
        (dict(closure=5), "closure"),
        (dict(meta_closure=3), "meta_closure"),
        (dict(fsd_inputs=5), "fsd_inputs"),
    ],
)
def test_bad_step_arguments_raise_naming_the_argument(make, step_kwargs, name):
    opt = make(meta_interval=1)
    x, y = data()
    model = opt.model

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    kwargs = dict(closure=closure)
    kwargs.update(step_kwargs)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        opt.step(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.step_count == 0


def _closure_returning(opt, model, x, y, form):
    """The usual closure, returning ``form(loss)`` instead of the loss."""
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return form(loss)
    return closure


# the closure's loss as the closure returns it; a meta-step reads it as a scalar
LOSS_FORMS = {
    "0-d tensor": lambda loss: loss,
    "(1,) tensor": lambda loss: loss.reshape(1),
    "Python float": lambda loss: loss.item(),
    "numpy float64": lambda loss: np.float64(loss.item()),
}


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
@pytest.mark.parametrize("form", list(LOSS_FORMS), ids=list(LOSS_FORMS))
def test_a_closure_may_return_its_loss_as_a_number_or_one_element_tensor(make, form):
    # the same trajectory, meta-steps (and the first one's overshoot test against the loss at θ)
    # included, whatever scalar form the loss comes back in
    def run(to_form):
        torch.manual_seed(0)
        opt = make(meta_interval=2)
        model, (x, y) = opt.model, data()
        closure = _closure_returning(opt, model, x, y, to_form)
        returned = [opt.step(closure) for _ in range(5)]
        return opt, [p.detach().clone() for p in model.parameters()], returned

    opt, params, returned = run(LOSS_FORMS[form])
    _, expected, _ = run(LOSS_FORMS["0-d tensor"])
    assert opt.meta_steps == 3 and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
    assert type(returned[0]) is type(LOSS_FORMS[form](torch.tensor(1.0)))  # step returns it as it came


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
@pytest.mark.parametrize("meta_batch", ["same", "fresh"])
@pytest.mark.parametrize("bad,exc", [(lambda loss: loss.expand(3), ValueError), (lambda loss: "loss", TypeError),
                                     (lambda loss: True, TypeError)], ids=["per-sample tensor", "str", "bool"])
def test_a_meta_step_refuses_a_loss_that_is_not_a_scalar_naming_the_closure(make, meta_batch, bad, exc):
    opt = make(meta_interval=1, meta_batch=meta_batch)
    model, (x, y) = opt.model, data()
    closure = _closure_returning(opt, model, x, y, bad)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(exc, match=r"\bclosure\b.*scalar"):
        opt.step(closure, meta_closure=closure if meta_batch == "fresh" else None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.step_count == 0


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
def test_a_meta_step_whose_closure_never_called_backward_is_refused_naming_the_closure(make):
    opt = make(meta_interval=1)
    model, (x, y) = opt.model, data()

    def closure():  # forgot loss.backward()
        opt.zero_grad()
        return F.cross_entropy(model(x), y)

    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^closure\b.*backward"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.step_count == 0


def _trained(kind, width=8):
    """APOLR(SGD+momentum) or APOPrecond on a 4-width-3 MLP after three steps (one meta-step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
    opt = (APOLR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0, lambda_wsd=0.0,
                 meta_interval=2) if kind == "APOLR"
           else APOPrecond(model, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=2))
    x, y = data()
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
    return opt


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
def test_a_state_dict_that_does_not_fit_is_refused_before_anything_is_loaded(kind):
    opt = _trained(kind)
    kept = copy.deepcopy(opt.state_dict())
    other_kind = _trained("APOPrecond" if kind == "APOLR" else "APOLR").state_dict()
    with pytest.raises(ValueError, match=rf"^state_dict: this is not {kind}'s state"):
        opt.load_state_dict(other_kind)
    with pytest.raises(ValueError, match=r"^state_dict: .*shape.*where.*expected"):
        opt.load_state_dict(_trained(kind, width=12).state_dict())
    with pytest.raises(TypeError, match=r"^state_dict must be"):
        opt.load_state_dict([1, 2])
    assert _same_state(opt.state_dict(), kept)  # nothing was loaded
    opt.load_state_dict(kept)  # its own state still loads


# where a NaN can sit in each optimizer's saved state: (entry named in the error, its tensor in the dict)
POISONED_ENTRIES = {
    "APOLR": [("log_lr", lambda st: st["log_lr"]),
              (r"base_optimizer\['state'\]\[0\]\['momentum_buffer'\]",
               lambda st: st["base_optimizer"]["state"][0]["momentum_buffer"]),
              (r"meta_optimizer\['state'\]\[0\]\['exp_avg_sq'\]", lambda st: st["meta_optimizer"]["state"][0]["exp_avg_sq"])],
    "APOPrecond": [(r"phi\[0\]", lambda st: st["phi"][0]),
                   (r"momentum\[1\]", lambda st: st["momentum"][1]),
                   (r"meta_optimizer\['state'\]\[2\]\['exp_avg'\]", lambda st: st["meta_optimizer"]["state"][2]["exp_avg"])],
}


@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
def test_a_state_dict_holding_a_nan_is_refused_naming_the_entry(kind):
    # a NaN loaded into φ made every later meta-step retry and shrink it without end, every step skipped
    opt = _trained(kind)
    kept = copy.deepcopy(opt.state_dict())
    for name, entry in POISONED_ENTRIES[kind]:
        bad = copy.deepcopy(kept)
        entry(bad).view(-1)[-1] = float("nan")
        with pytest.raises(ValueError, match=rf"^state_dict: {name} holds a NaN or inf, which no step recovers from"):
            opt.load_state_dict(bad)
        assert _same_state(opt.state_dict(), kept)  # nothing was loaded
    opt.load_state_dict(kept)


@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
def test_resuming_with_a_scheduler_on_the_optimizer_continues_the_schedule_bit_for_bit(kind):
    # the usual resume: build model, optimizer and scheduler, load the optimizer's state and the
    # scheduler's, go on; a chainable scheduler multiplies the lr the optimizer's groups hold
    x, y = data()

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = (APOLR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.1,
                     lambda_wsd=0.3, meta_interval=2) if kind == "APOLR"
               else APOPrecond(model, lr=0.1, lambda_fsd=0.1, lambda_wsd=1.0, meta_lr=0.01, meta_interval=2))
        return model, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)

    def train(model, opt, sched, steps):
        for _ in range(steps):
            opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
            sched.step()

    m1, o1, s1 = make()
    train(m1, o1, s1, 3)
    saved = copy.deepcopy((m1.state_dict(), o1.state_dict(), s1.state_dict()))
    train(m1, o1, s1, 4)
    m2, o2, s2 = make()
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    if kind == "APOLR":  # one set of groups and state, the base optimizer's, after a load as before
        assert o2.param_groups is o2.base_optimizer.param_groups and o2.state is o2.base_optimizer.state
    assert o2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.7 ** 3)
    train(m2, o2, s2, 4)
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.7 ** 7)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
def test_autocast_around_step_evaluates_the_lookahead_not_stale_casts(make):
    # an autocast region open around step() caches each parameter's bf16 copy for as long as it is
    # open: the lookahead closure must still compute at θ', so Q and ∇φQ are those of a region
    # opened inside the closure alone, bit for bit
    opt = make(lambda_wsd=0.3)
    model, (x, y) = opt.model, data()

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    q_inside, grad_inside = opt.meta_gradient(closure)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_around, grad_around = opt.meta_gradient(closure)
    assert q_around == q_inside and all(torch.equal(a, b) for a, b in zip(grad_around, grad_inside))
    # and a training loop in that style takes its meta-steps instead of shrinking φ on each
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step(closure)
    assert opt.meta_steps == 2 and opt.skipped_steps == 0 and opt.recoveries == 0


# --------------------------------------------------------------------------------------------
# A step too large to evaluate shrinks the step; training never stalls
# --------------------------------------------------------------------------------------------
def _make_apolr(model, lr, **kw):
    return APOLR(model, torch.optim.SGD(model.parameters(), lr=lr), lambda_fsd=0.0, lambda_wsd=0.0, **kw)


def _make_precond(model, lr, **kw):
    return APOPrecond(model, lr=lr, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.05, **kw)


@pytest.mark.parametrize("make", [_make_apolr, _make_precond], ids=["APOLR", "APOPrecond"])
@pytest.mark.parametrize("dtype,lr", [(torch.float32, 1e25), (torch.float16, 1e5)], ids=["fp32-lr1e25", "fp16-lr1e5"])
def test_absurd_initial_lr_does_not_stall(make, dtype, lr):
    m = mlp(dtype)
    x, y = data(64)
    x = x.to(dtype)
    opt = make(m, lr)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        return loss

    with torch.no_grad():
        start = float(F.cross_entropy(m(x).float(), y))
    skipped = []
    for _ in range(40):
        opt.step(closure)
        skipped.append(opt.skipped_steps)
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    with torch.no_grad():
        end = float(F.cross_entropy(m(x).float(), y))
    # a few steps are spent shrinking the step (at most 1 + 3 retries each), then it trains
    assert opt.recoveries > 0 and skipped[-1] == skipped[19] and skipped[-1] < 20
    assert opt.step_count == 40 and opt.meta_steps >= 2
    assert end < 0.9 * start, (start, end)


def _fp32_closure(opt, m, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("case", ["fp16 Adam eps=1e-8", "RMSprop eps=0 at a zero gradient"])
def test_apolr_keeps_its_lr_when_no_lr_makes_the_base_direction_finite(case):
    # The base optimizer's own direction (lr = 1) is 0/0 or x/0: shrinking the lr cannot help, so
    # the step is skipped with a warning that says why, and the learnt lr is not destroyed.
    if case.startswith("fp16"):
        m, (x, y) = mlp(torch.float16), data(16)
        x = x.half()
        with pytest.warns(UserWarning, match=r"base_optimizer: param group 0's eps=1e-08 is 0 in float16"):
            opt = APOLR(m, torch.optim.Adam(m.parameters(), lr=0.01), lambda_fsd=0.1, lambda_wsd=0.3)
        hint = r"eps=1e-08 is 0 in float16"
    else:
        m, (x, y) = mlp(), data(16)
        x[:, 0] = 0.0  # the first layer's weight column 0 gets a zero gradient: RMSprop divides 0 by 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # eps = 0 is not a float16 rounding: nothing to say yet
            opt = APOLR(m, torch.optim.RMSprop(m.parameters(), lr=0.01, eps=0.0), lambda_fsd=0.1, lambda_wsd=0.3)
        hint = r"makes the lookahead finite; the step is skipped"
    before = [p.detach().clone() for p in m.parameters()]
    closure = _fp32_closure(opt, m, x, y)
    for _ in range(3):
        with pytest.warns(RuntimeWarning, match=r"APOLR: the base optimizer's \((Adam|RMSprop)\) step direction is "
                                                r"not finite although every gradient is.*" + hint) as record:
            opt.step(closure, fsd_inputs=(x,))
        assert {w.filename for w in record} == {__file__}  # attributed to the user's step call
    assert opt.learnt_lrs == [0.01] and opt.recoveries == 0 and opt.meta_steps == 0
    assert opt.skipped_steps == 3 and len(opt.base_optimizer.state) == 0
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))


def test_apolr_with_fp16_adam_and_an_eps_it_can_hold_trains_without_warnings():
    m, (x, y) = mlp(torch.float16), data(16)
    x = x.half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = APOLR(m, torch.optim.Adam(m.parameters(), lr=0.01, eps=1e-4), lambda_fsd=0.1, lambda_wsd=0.3,
                    meta_interval=3)
        closure = _fp32_closure(opt, m, x, y)
        losses = [float(opt.step(closure, fsd_inputs=(x,)).detach()) for _ in range(12)]
    assert opt.skipped_steps == 0 and opt.meta_steps == 4 and losses[-1] < losses[0]


def _backward(loss):
    loss.backward()
    return loss


def _step_with_every_lookahead_poisoned(poison):
    """APOLR over SGD+momentum with a meta-step on every step: three clean steps, then one whose
    closure ends with ``poison(model, loss)`` (which calls backward and returns the loss) at every
    lookahead, never at θ. That step must fail every retry and be skipped with θ and the momentum
    untouched, the learnt lr divided by 10 per try and the meta-optimizer's moments reset. Returns
    (opt, closure, calls) with the poison switched off, for what the caller checks next."""
    m = mlp()
    x, y = data()
    opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0, lambda_wsd=0.0,
                meta_interval=1)
    calls = {"n": 0, "poison": False}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        return poison(m, loss) if calls["poison"] and calls["n"] > 1 else _backward(loss)

    for _ in range(3):
        opt.step(closure)
    assert not opt._searching  # the overshoot search is over: the finiteness checks alone decide
    params = [p.clone() for p in m.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in m.parameters()]
    log_lr = opt.log_lr.clone()
    calls.update(n=0, poison=True)
    opt.step(closure)
    tries = 1 + APOLR.MAX_RECOVERIES_PER_STEP
    assert calls["n"] == 1 + tries and opt.recoveries == tries and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert all(torch.equal(a, opt.base_optimizer.state[p]["momentum_buffer"])
               for a, p in zip(momentum, m.parameters()))
    # each failure divided the lr by 10; the meta-optimizer's moments were reset
    assert opt.log_lr.item() == pytest.approx(log_lr.item() - tries * math.log(10.0), abs=1e-12)
    assert len(opt.meta_optimizer.state) == 0
    calls.update(poison=False)
    return opt, closure, calls


def test_non_finite_lookahead_never_reaches_apolr_state():
    # finite at θ, NaN at every lookahead
    opt, closure, _ = _step_with_every_lookahead_poisoned(lambda m, loss: _backward(loss * float("nan")))
    assert opt.meta_due()  # the next step is a meta-step again
    opt.step(closure)
    assert opt.meta_steps == 4 and opt.skipped_steps == 1 and math.isfinite(opt.lr)


def test_non_finite_lookahead_gradient_at_a_finite_loss_is_caught_by_the_meta_gradient():
    """APO-LR leaves ∇θ'Q without a finiteness pass of its own: an inf in it (the loss at θ' finite)
    makes ⟨∇θ'Q, Δ⟩ non-finite, and the meta-step recovers as from any non-finite meta-gradient,
    with θ, the momentum and the meta-optimizer's state untouched."""
    def inf_in_one_gradient(m, loss):
        _backward(loss)
        next(m.parameters()).grad[0, 0] = float("inf")
        return loss

    opt, _, _ = _step_with_every_lookahead_poisoned(inf_in_one_gradient)
    assert torch.isfinite(opt.log_lr).all()


def test_objective_of_a_non_finite_delta_is_nan_without_calling_the_closure():
    """The pass that writes θ' finds Δ not finite: Q is NaN, no gradient, the closure is not called,
    and θ and the gradients at θ are back as they were."""
    from apo_kernels.optim.objective import proximal_objective_grad

    m = mlp()
    x, y = data()
    F.cross_entropy(m(x), y).backward()
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    deltas = [torch.full_like(p, 1e-3) for p in params]
    deltas[-1][0] = float("nan")
    called = []
    obj = proximal_objective_grad(m, params, deltas, lambda: called.append(1), lambda_wsd=1.0)
    assert called == [] and obj.grads == []
    assert all(math.isnan(v) for v in (obj.value, obj.loss, obj.fsd, obj.wsd))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(p.grad is g for p, g in zip(params, grads))
    deltas[-1][0] = 1e-3  # finite: ½‖Δ‖² is the WSD term, from the same pass

    def closure():
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    obj = proximal_objective_grad(m, params, deltas, closure, lambda_wsd=1.0)
    assert obj.wsd == pytest.approx(0.5 * sum(float((d.double() ** 2).sum()) for d in deltas), rel=1e-12)


@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
def test_one_process_checks_f_at_theta_only_when_the_fsd_term_is_not_finite(kind, monkeypatch):
    """On one process a finite FSD term at θ' says f(x̃; θ) is usable, so a healthy meta-step makes no
    check of it (a cold native call after the forward); a NaN in it is still caught, by that check."""
    from apo_kernels.optim import objective
    checked = []
    real = objective._fsd_finite_at_theta
    monkeypatch.setattr(objective, "_fsd_finite_at_theta", lambda *a: checked.append(1) or real(*a))
    m, (x, y) = mlp(), data()
    opt = (APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.1, lambda_wsd=0.0,
                 meta_interval=1) if kind == "APOLR" else
           APOPrecond(m, lr=0.1, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=1))
    closure = closure_for(opt, m, x, y)
    clean = x[:5] + 0.5
    for _ in range(2):
        opt.step(closure, fsd_inputs=(clean,))
    assert opt.meta_steps == 2 and not checked
    bad = clean.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="fsd_inputs: the FSD term is not finite even at θ' = θ"):
        opt.step(closure, fsd_inputs=(bad,))
    assert checked == [1] and opt.meta_steps == 2


@pytest.mark.parametrize("joint", [True, False], ids=["rows-joined", "apart"])
@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
def test_a_non_finite_fsd_batch_skips_the_meta_step_keeps_phi_and_takes_the_step(kind, joint):
    """A NaN in f(x̃; θ) (here from the FSD batch) makes the FSD term non-finite at every θ': no
    step size helps. The meta-step is skipped with a warning naming fsd_inputs, φ and the
    meta-optimizer's state are kept, and the real update is taken (the step's gradients are
    finite). Before, every retry shrank φ by 10: one such batch left APO-LR's lr 10⁻⁴ times smaller."""
    # apart: a Flatten from dimension 0 (undone at once) hides that the rows are independent, so the FSD
    # passes at θ' run on their own instead of inside the closure's
    m = mlp() if joint else nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Flatten(0), nn.Unflatten(0, (-1, 8)),
                                          nn.Linear(8, 3))
    x, y = data()

    def make(model, meta_interval):
        if kind == "APOLR":
            return APOLR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.1,
                         lambda_wsd=0.0, meta_interval=meta_interval)
        return APOPrecond(model, lr=0.1, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=meta_interval)

    opt = make(m, meta_interval=2)
    closure = closure_for(opt, m, x, y)
    clean = x[:5] + 0.5
    for _ in range(2):
        opt.step(closure, fsd_inputs=(clean,))
    phi = [p.detach().clone() for p in opt.phi]
    meta_state = copy.deepcopy(opt.meta_optimizer.state_dict())
    theta = [p.detach().clone() for p in m.parameters()]
    twin_model = copy.deepcopy(m)  # the same state stepping with meta-steps off: the plain step
    twin = make(twin_model, meta_interval=0)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.step(closure_for(twin, twin_model, x, y))
    bad = clean.clone()
    bad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=rf"{kind}: fsd_inputs: the FSD term is not finite even at θ' = θ.*"
                                            r"the meta-step is skipped, φ kept and the step taken") as record:
        opt.step(closure, fsd_inputs=(bad,))
    assert {w.filename for w in record} == {__file__}
    assert all(torch.equal(p, q) for p, q in zip(opt.phi, phi))
    assert opt.meta_optimizer.state_dict()["state"].keys() == meta_state["state"].keys()
    assert opt.recoveries == 0 and opt.skipped_steps == 0 and opt.meta_steps == 1
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(m.parameters(), theta))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin_model.parameters()))
    opt.step(closure, fsd_inputs=(bad,))  # a plain step: the FSD batch is not used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure, fsd_inputs=(clean,))  # the next meta-step, on a clean batch
    assert opt.meta_steps == 2 and opt.recoveries == 0


@pytest.mark.parametrize("make", [_make_apolr, _make_precond], ids=["APOLR", "APOPrecond"])
def test_a_fresh_meta_batch_tells_a_nan_in_its_data_from_a_step_too_large(make):
    """meta_batch="fresh": the step never sees the meta-batch's loss at θ, so after a lookahead that
    is not finite the meta-closure is run at θ itself. A NaN in that batch: the meta-step is skipped
    with a warning naming meta_closure, φ kept and the step taken. A step too large: φ shrinks."""
    m = mlp()
    x, y = data(64)
    opt = make(m, 0.1, meta_batch="fresh", meta_interval=2)
    meta_x = x.flip(0).clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    def meta_closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(meta_x), y)
        loss.backward()
        return loss

    opt.step(closure, meta_closure=meta_closure)
    opt.step(closure, meta_closure=meta_closure)
    phi = [p.detach().clone() for p in opt.phi]
    theta = [p.detach().clone() for p in m.parameters()]
    twin_model = copy.deepcopy(m)  # the same state stepping with meta-steps off: the plain step
    twin = make(twin_model, 0.1, meta_batch="fresh", meta_interval=0)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.step(closure_for(twin, twin_model, x, y))
    meta_x[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"meta_closure: its loss is not finite at θ itself \(Δ = 0\), so no "
                                            r"step size helps; the meta-step is skipped, φ kept and the step taken"):
        opt.step(closure, meta_closure=meta_closure)
    assert all(torch.equal(p, q) for p, q in zip(opt.phi, phi))
    assert opt.recoveries == 0 and opt.skipped_steps == 0 and opt.meta_steps == 1
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(m.parameters(), theta))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin_model.parameters()))
    # a lookahead that overflows, on a clean fresh batch, is a step too large: φ shrinks
    m = mlp()  # (the closures read m, opt and meta_x when called)
    opt = make(m, 1e38, meta_batch="fresh")
    meta_x = x.flip(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(closure, meta_closure=meta_closure)
    assert opt.recoveries > 0 and all(torch.isfinite(p).all() for p in m.parameters())


def test_the_meta_objective_probe_names_a_non_finite_fsd_batch():
    m = mlp()
    x, y = data()
    opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda_fsd=0.1, lambda_wsd=0.0)
    bad = x.clone()
    bad[0, 0] = float("nan")  # (an inf would not do: tanh of ±inf is ±1)
    with pytest.raises(ValueError, match=r"^fsd_inputs: the FSD term is not finite even at θ' = θ"):
        opt.meta_objective(closure_for(opt, m, x, y), fsd_inputs=(bad,))
    # an infinite output is the discrepancy's to judge: masked logits (−inf) are fine under "kl",
    # and make ½‖new − old‖² NaN at θ' = θ under "mse"
    masked = _MaskedLogits()
    for fsd, usable in (("kl", True), ("mse", False)):
        opt = APOLR(masked, torch.optim.SGD(masked.parameters(), lr=0.1), lambda_fsd=0.1, lambda_wsd=0.0, fsd=fsd)
        probe = lambda: opt.meta_objective(closure_for(opt, masked, x, y.clamp(max=1)), fsd_inputs=(x + 0.5,))
        if usable:
            assert math.isfinite(probe())
        else:
            with pytest.raises(ValueError, match=r"^fsd_inputs: the FSD term is not finite even at θ' = θ"):
                probe()


# --------------------------------------------------------------------------------------------
# fsd="bernoulli"
# --------------------------------------------------------------------------------------------
def test_bernoulli_discrepancy_matches_the_float64_formula_and_is_stable():
    from apo_kernels.optim import discrepancy
    g = torch.Generator().manual_seed(0)
    old = 4 * torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    new = old + torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    p, q = torch.sigmoid(old), torch.sigmoid(new)
    direct = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum((1, 2)).mean()
    got = discrepancy.bernoulli(new, old)
    assert got.dtype == torch.float64 and torch.allclose(got, direct, rtol=1e-12, atol=0)
    # float32 inputs are computed in float32: within a few float32 ulps of the float64 value
    got32 = discrepancy.bernoulli(new.float(), old.float())
    assert got32.dtype == torch.float32 and abs(got32.double() - direct) <= 1e-5 * direct
    assert discrepancy.resolve("bernoulli") is discrepancy.bernoulli
    # logits far beyond where σ rounds to 0 or 1 (the direct formula gives nan / inf there)
    old = torch.tensor([[60.0, -60.0, 60.0, 0.0]], requires_grad=False)
    new = torch.tensor([[55.0, -70.0, -60.0, 0.0]], requires_grad=True)
    v = discrepancy.bernoulli(new, old)
    v.backward()
    # 60 vs 55 and −60 vs −70: ≈ e^-55 ≈ 0; 60 vs −60: log σ(60) − log σ(−60) ≈ 0 + 60; 0 vs 0: 0
    assert torch.isfinite(v) and v.item() == pytest.approx(60.0, rel=1e-6)
    assert torch.isfinite(new.grad).all()
    assert discrepancy.bernoulli(old, old).item() == 0.0
    with pytest.raises(TypeError, match=r"\bfsd\b"):
        discrepancy.bernoulli((new,), old)
    # an output masked to ±inf in both (probability 0 or 1 exactly) adds nothing, and its gradient is 0
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    unmasked = discrepancy.bernoulli(b[:, 2:], a[:, 2:])
    a[:, 0], b[:, 0], a[:, 1], b[:, 1] = -math.inf, -math.inf, math.inf, math.inf
    value, grad = discrepancy.value_and_grad(discrepancy.bernoulli, b, a)
    assert torch.allclose(value, unmasked, rtol=1e-12, atol=0) and grad[:, :2].eq(0).all()


def test_apo_precond_refuses_a_real_update_beyond_the_parameters_range():
    # no meta-steps: only the real update can notice that S² is too large for fp16 parameters
    m = mlp(torch.float16)
    x, y = data(64)
    opt = APOPrecond(m, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0)
    with torch.no_grad():
        for layer in opt.layers:  # S² ≈ 1e9 (S is stored as a log): finite in φ's float32, θ − Y is not in fp16
            layer.precond.S.add_(0.5 * math.log(1e10))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x.half()).float(), y)
        loss.backward()
        return loss

    start = [p.clone() for p in m.parameters()]
    opt.step(closure)  # 4 attempts, none fits: no update at all, S² is 1e4 smaller
    assert opt.skipped_steps == 1 and opt.recoveries == 1 + APOPrecond.MAX_RECOVERIES_PER_STEP
    assert all(torch.equal(a, b) for a, b in zip(start, m.parameters()))
    assert all("momentum_buffer" not in opt.state[p] for p in m.parameters())  # momentum untouched too
    for _ in range(4):  # nothing non-finite is ever written (without meta-steps nothing checks the
        opt.step(closure)  # loss an update leads to: a huge but finite θ stays huge, as with SGD)
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, m.parameters()))


# ---- momentum catch-up: the lookahead judges the step a warmed-up momentum buffer takes ----------
def _step_lengths(make_optimizer, steps=200):
    """Lengths of a torch optimizer's successive steps on one float64 scalar under gradient 1."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer(p)
    out = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        out.append(float(before - p.detach()))
    return out


@pytest.mark.parametrize("mu,dampening,nesterov", [(0.9, 0.0, False), (0.5, 0.3, False), (0.9, 0.0, True)])
def test_momentum_catch_up_is_the_growth_of_torch_sgd_step_under_a_steady_gradient(mu, dampening, nesterov):
    from apo_kernels.optim._core import momentum_catch_up
    steps = _step_lengths(lambda p: torch.optim.SGD([p], lr=1.0, momentum=mu, dampening=dampening, nesterov=nesterov))
    for k in (1, 2, 5, 30):
        assert momentum_catch_up(mu, k, dampening=dampening, nesterov=nesterov) == pytest.approx(steps[-1] / steps[k - 1], rel=1e-9)
    assert momentum_catch_up(0.0, 1) == 1.0


def test_momentum_catch_up_of_rmsprop_buffer_starting_at_zero():
    from apo_kernels.optim._core import momentum_catch_up
    # alpha=0: the denominator is |g|
    steps = _step_lengths(lambda p: torch.optim.RMSprop([p], lr=1.0, momentum=0.8, alpha=0.0, eps=0.0))
    for k in (1, 3, 10):
        assert momentum_catch_up(0.8, k, starts_at_grad=False) == pytest.approx(steps[-1] / steps[k - 1], rel=1e-9)


def test_apolr_first_lookahead_of_sgd_momentum_is_the_warmed_up_step():
    """At step 0 torch.optim.SGD's buffer is g, but the step it heads for is g/(1−μ): the lookahead
    must judge that one (else a good lr looks 10× safer than it is at μ = 0.9)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    apo = APOLR(model, base, lambda_fsd=0.0, lambda_wsd=0.0)
    x = torch.randn(8, 3)

    def closure():
        apo.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    closure()
    plan = apo._prepare()
    deltas = apo._lookahead_deltas(plan)
    if plan.form_deltas is not None:  # Δ is formed in the pass that writes θ' (apo::sgd_lookahead)
        plan.form_deltas([p.detach() for p in plan.params], [torch.empty_like(p) for p in plan.params])
    for p, d in zip(plan.params, deltas):
        assert torch.allclose(d, -0.01 * 10.0 * p.grad, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# One argument checker (apo_kernels._args): wrong type → TypeError, bad value → ValueError, the
# message starts with the argument's name, whichever optimizer is given the mistake
# --------------------------------------------------------------------------------------------
def test_argument_checker_rules():
    from apo_kernels import _args
    cases = [
        (lambda: _args.check_number("lr", "0.1"), TypeError),
        (lambda: _args.check_number("lr", True), TypeError),
        (lambda: _args.check_number("lr", torch.tensor(0.1)), TypeError),
        (lambda: _args.check_number("lr", float("nan")), ValueError),
        (lambda: _args.check_number("lr", 0.0, low=0.0, low_ok=False), ValueError),
        (lambda: _args.check_number("lr", 1.0, high=1.0, high_ok=False), ValueError),
        (lambda: _args.check_int("lr", 2.0), TypeError),
        (lambda: _args.check_int("lr", False), TypeError),
        (lambda: _args.check_int("lr", 0, low=1), ValueError),
        (lambda: _args.check_choice("lr", None, ("a", "b")), TypeError),
        (lambda: _args.check_choice("lr", "c", ("a", "b")), ValueError),
        (lambda: _args.check_bool("lr", 1), TypeError),
        (lambda: _args.check_pair("lr", 0.5), TypeError),
        (lambda: _args.check_pair("lr", (0.5,)), ValueError),
        (lambda: _args.check_pair("lr", (0.5, "x")), TypeError),
    ]
    for call, exc in cases:
        with pytest.raises(exc, match=r"^lr\b"):
            call()
    assert _args.check_number("lr", 3) == 3.0 and isinstance(_args.check_number("lr", 3), float)
    assert _args.check_pair("betas", [0, 0.5], high=1.0) == (0.0, 0.5)


def _kfac(**kw):
    from apo_kernels.baselines import KFAC
    return KFAC(mlp(), **{"lr": 0.1, "damping": 1e-3, **kw})


@pytest.mark.parametrize("make,kwargs,exc,name", [
    (_apolr, dict(meta_batch=None), TypeError, "meta_batch"),
    (_precond, dict(meta_batch=None), TypeError, "meta_batch"),
    (_precond, dict(s_param=2), TypeError, "s_param"),
    (_precond, dict(momentum=True), TypeError, "momentum"),
    (_kfac, dict(momentum=True), TypeError, "momentum"),
    (_precond, dict(momentum=-0.5), ValueError, "momentum"),
    (_kfac, dict(momentum=-0.5), ValueError, "momentum"),
    (_precond, dict(meta_interval=2.0), TypeError, "meta_interval"),
    (_kfac, dict(inverse_interval=2.0), TypeError, "inverse_interval"),
    (_kfac, dict(fisher=None), TypeError, "fisher"),
    # coefficients that scale float32 tensors stop at the largest float32 (torch's step raised, naming nothing)
    (_apolr, dict(lambda_wsd=1e300), ValueError, "lambda_wsd"),
    (_precond, dict(lambda_fsd=1e39), ValueError, "lambda_fsd"),
    (_apolr, dict(min_lr=1e300), ValueError, "min_lr"),
    (_precond, dict(weight_decay=1e300), ValueError, "weight_decay"),
    (_kfac, dict(weight_decay=1e300), ValueError, "weight_decay"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_the_same_mistake_raises_the_same_exception_in_every_optimizer(make, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        make(**kwargs)


# --------------------------------------------------------------------------------------------
# Sparse gradients: refused by name, not an error from deep inside a kernel
# --------------------------------------------------------------------------------------------
def _sparse_model(sparse: bool):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 3))


def test_lazy_modules_before_their_first_forward():
    # APOPrecond builds φ from each layer's shape: an uninitialized lazy module is refused by name,
    # and after one forward pass the optimizer builds and trains. APOLR needs no shapes up front:
    # its base optimizer holds the parameters, which the first forward materializes in place.
    x, y = data()

    def lazy_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))

    with pytest.raises(ValueError, match=r"\bmodel\b.*'0\.weight'.*forward pass"):
        APOPrecond(lazy_mlp(), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    materialized = lazy_mlp()
    materialized(x)
    lazy = lazy_mlp()
    opts = {"APOPrecond": APOPrecond(materialized, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.1, meta_lr=0.01, meta_interval=2),
            "APOLR": APOLR(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.1,
                           meta_interval=2)}
    for opt in opts.values():
        losses = []
        for _ in range(6):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(opt.model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
        assert opt.meta_steps == 3 and opt.skipped_steps == 0 and losses[-1] < losses[0]


@pytest.mark.parametrize("which", ["APOLR", "APOPrecond"])
def test_sparse_gradients_are_refused_by_name(which):
    def build(model):
        if which == "APOLR":
            return APOLR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0,
                         lambda_wsd=0.0, meta_interval=2)
        return APOPrecond(model, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=2)

    with pytest.raises(ValueError, match=r"'0' \(Embedding\) has sparse=True"):
        build(_sparse_model(True))
    # switched to sparse gradients after construction: refused at the step, before any state changes
    model = _sparse_model(False)
    opt = build(model)
    model[0].sparse = True
    tok, y = torch.randint(0, 50, (8, 3)), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(tok), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match=r"parameter 0 of shape \(50, 4\) has a torch.sparse_coo gradient"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model[0].sparse = False
    opt.step(closure)  # dense again: training goes on
    assert opt.step_count == 1


# --------------------------------------------------------------------------------------------
# discrepancy.value_and_grad: the built-ins' closed-form gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kl", "mse", "bernoulli"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 9), (1, 1), (5,)])
def test_value_and_grad_matches_autograd_in_float64_on_odd_shapes(name, shape):
    from apo_kernels.optim import discrepancy
    fsd = discrepancy.resolve(name)
    g = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    old = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    new = (old + torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    want = fsd(new, old)
    (want_grad,) = torch.autograd.grad(want, new)
    value, grad = discrepancy.value_and_grad(fsd, new, old)
    assert not value.requires_grad and not grad.requires_grad and new.grad is None
    assert torch.allclose(value, want.detach(), rtol=1e-12, atol=1e-15)
    assert grad.dtype == torch.float64 and torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
    # scale multiplies the gradient only (the fused FSD term passes λ_FSD times the loss scale)
    scaled_value, scaled = discrepancy.value_and_grad(fsd, new, old, scale=-2.5)
    assert torch.equal(scaled_value, value) and torch.allclose(scaled, -2.5 * want_grad, rtol=1e-10, atol=1e-14)
    # float32 logits: computed in float32, returned in the output's dtype
    value32, grad32 = discrepancy.value_and_grad(fsd, new.detach().float(), old.float())
    assert grad32.dtype == torch.float32 and torch.allclose(grad32.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert abs(value32.double() - want.detach()) <= 1e-5 * max(1.0, abs(want.item()))


def test_value_and_grad_of_a_callable_goes_through_autograd_and_bad_input_names_it():
    from apo_kernels.optim import discrepancy
    new = torch.randn(4, 3, dtype=torch.float64)
    old = torch.randn(4, 3, dtype=torch.float64)
    value, grad = discrepancy.value_and_grad(lambda a, b: ((a - b) ** 3).sum(), new, old)
    assert torch.allclose(value, ((new - old) ** 3).sum()) and torch.allclose(grad, 3 * (new - old) ** 2)
    _, scaled = discrepancy.value_and_grad(lambda a, b: ((a - b) ** 3).sum(), new, old, scale=0.5)
    assert torch.allclose(scaled, 1.5 * (new - old) ** 2)
    # a callable that ignores the output: the gradient is zero, not None
    assert discrepancy.value_and_grad(lambda a, b: b.sum(), new, old)[1].eq(0).all()
    with pytest.raises(TypeError, match=r"\bnew\b"):
        discrepancy.value_and_grad(discrepancy.kl, (new,), old)


class _MaskedLogits(nn.Module):
    """An MLP whose last logit is masked (−inf), as a vocabulary's padding token or an invalid action."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.register_buffer("mask", torch.tensor([0.0, 0.0, float("-inf")]))

    def forward(self, x):
        return self.net(x) + self.mask


@pytest.mark.parametrize("kind", ["APOLR", "APOPrecond"])
@pytest.mark.parametrize("own_batch", [False, True], ids=["other batch", "own batch"])
def test_masked_logits_leave_the_fsd_term_finite_and_meta_steps_succeed(kind, own_batch):
    # KL(p_old ‖ p_new) with a class of probability 0 in both: that class adds nothing (0·log 0),
    # so every meta-step succeeds (it used to be NaN, and each meta-step shrank φ instead)
    torch.manual_seed(0)
    model = _MaskedLogits()
    opt = (APOLR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.5, lambda_wsd=0.1,
                 meta_interval=2) if kind == "APOLR"
           else APOPrecond(model, lr=0.1, lambda_fsd=0.5, lambda_wsd=0.1, meta_lr=0.01, meta_interval=2))
    x, y = data()
    y = y.clamp(max=1)  # the labels avoid the masked class
    for _ in range(6):
        opt.step(closure_for(opt, model, x, y), fsd_inputs=(x if own_batch else data(seed=5)[0],))
    assert opt.meta_steps == 3 and opt.recoveries == 0 and opt.skipped_steps == 0
    assert math.isfinite(opt.last_meta["fsd"]) and opt.last_meta["fsd"] > 0


@pytest.mark.parametrize("make", [_apolr, _precond], ids=["APOLR", "APOPrecond"])
@pytest.mark.parametrize("own_batch", [False, True], ids=["other batch", "own batch"])
def test_a_callable_fsd_that_does_not_return_one_number_is_refused_naming_fsd(make, own_batch):
    # per-sample discrepancies (not averaged) and a Python number: a ValueError naming fsd, on the
    # closed-form path, the ride on the closure and the autograd path alike, with nothing changed
    from apo_kernels.optim import discrepancy
    for bad in (lambda new, old: (new - old).pow(2).sum(-1), lambda new, old: 0.5):
        opt = make(meta_interval=1, lambda_fsd=0.1, fsd=bad)
        model, (x, y) = opt.model, data()
        before = [p.clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"^fsd: a callable fsd must return"):
            opt.step(closure_for(opt, model, x, y), fsd_inputs=(x if own_batch else data(seed=5)[0],))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.step_count == 0
    # the built-ins passed as functions keep their closed form; a scalar-valued callable runs as given
    assert discrepancy.resolve(discrepancy.kl) is discrepancy.kl

    @dataclasses.dataclass
    class HalfMSE:  # a callable object with __eq__ and so no __hash__
        weight: float = 0.5

        def __call__(self, new, old):
            return self.weight * (new - old).pow(2).mean()

    assert discrepancy.resolve(HalfMSE())(torch.ones(2), torch.zeros(2)).item() == 0.5
    opt = make(meta_interval=1, lambda_fsd=0.1, fsd=lambda new, old: (new - old).pow(2).mean())
    x, y = data()
    opt.step(closure_for(opt, opt.model, x, y), fsd_inputs=(x,))
    assert opt.meta_steps == 1


def test_apo_precond_warns_once_when_a_parameter_frozen_at_construction_is_unfrozen():
    # φ is built at construction for the parameters that require grad then; one unfrozen later is
    # not trained (unlike a torch.optim optimizer built over all parameters): a warning names it
    model = mlp()
    model[0].requires_grad_(False)
    opt = APOPrecond(model, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.1, meta_lr=0.01, meta_interval=2)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still frozen: nothing to say
        for _ in range(3):
            opt.step(closure_for(opt, model, x, y))
    model[0].requires_grad_(True)
    frozen_weight = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'0\.weight' \(and 1 more\) was frozen when the optimizer was built") as seen:
        for _ in range(6):
            opt.step(closure_for(opt, model, x, y))
    assert len([w for w in seen if "was frozen" in str(w.message)]) == 1
    assert torch.equal(model[0].weight, frozen_weight) and opt.skipped_steps == 0

"""The FSD term on another batch carried by the closure's forward and backward at θ' (``JointFSD``):
which models it applies to (``rows_independent``), the passes a meta-step then makes, and that it
computes what the FSD term's own forward and backward compute, to rounding, or falls back to them."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apo_kernels.optim import APOLR, APOPrecond, objective
from apo_kernels.optim.objective import proximal_objective_grad, rows_independent
from _tiny import (one_thread, data, closure_for, assert_same_objective, assert_trained_alike,  # noqa: F401
                   trained_state)  # (one_thread: autouse fixture)


def _mlp(dtype=torch.float64, seed=0, *middle):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), *middle, nn.Linear(8, 3)).to(dtype)


class _Scale(nn.Module):  # a module of the user's: its forward could read the batch as a whole
    def forward(self, x):
        return 2.0 * x


class _SequentialOfItsOwn(nn.Sequential):
    def forward(self, x):
        return super().forward(x) - x.mean(0)


def test_rows_independent_takes_only_row_wise_sequential_models():
    assert rows_independent(_mlp())
    assert rows_independent(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.GELU(), nn.LayerNorm(5),
                                          nn.Dropout(0.0), nn.Linear(5, 2)))
    assert rows_independent(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)))
    assert not rows_independent(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten()))  # writes θ
    assert rows_independent(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)).eval())  # dropout off
    assert not rows_independent(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)))  # draws masks
    assert not rows_independent(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))  # mixes rows
    assert not rows_independent(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))  # slower joined
    assert not rows_independent(nn.Sequential(nn.Flatten(0), nn.Linear(12, 2)))  # flattens the rows
    assert not rows_independent(_mlp(torch.float64, 0, _Scale()))
    assert not rows_independent(_SequentialOfItsOwn(nn.Linear(4, 4)))
    m = _mlp()
    handle = m[1].register_forward_hook(lambda *_: None)
    assert not rows_independent(m)  # a hook may read the batch as a whole
    handle.remove()
    assert rows_independent(m)
    m[2].forward = lambda x: x.mean(0, keepdim=True).expand_as(x)  # a forward set on the instance
    assert not rows_independent(m)
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not rows_independent(_mlp())
    finally:
        handle.remove()


@contextlib.contextmanager
def _passes(model):
    """Counts forwards of ``model`` (calls of its first layer's forward, counted at its class: a
    hook on the model would keep it off the joint pass) and backward passes through it (a hook on
    that layer's weight gradient)."""
    first, count = model[0], {"forwards": 0, "backwards": 0}
    cls, forward = type(model[0]), type(model[0]).forward

    def counted(mod, *args):
        count["forwards"] += mod is first
        return forward(mod, *args)

    handle = first.weight.register_hook(lambda g: count.__setitem__("backwards", count["backwards"] + 1))
    cls.forward = counted
    try:
        yield count
    finally:
        cls.forward = forward
        handle.remove()


def _apo_lr(model):
    return APOLR(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                 lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=3)


def _apo_precond(model):
    return APOPrecond(model, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=3)


OPTIMIZERS = {"APOLR": _apo_lr, "APOPrecond": _apo_precond}


@pytest.mark.parametrize("row_wise", [True, False], ids=["row-wise", "a-layer-of-its-own"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_meta_step_with_fsd_on_another_batch_makes_one_pass_at_the_lookahead(name, row_wise):
    # meta-step: the closure at θ, a forward at θ on the FSD batch without a graph, then at θ' the
    # closure on its batch with the FSD rows appended (1 forward, 1 backward) on a row-wise model,
    # else the closure and the FSD term's own forward and backward
    m = _mlp(torch.float32) if row_wise else _mlp(torch.float32, 0, _Scale())
    x, y = data()
    x_fsd = data(n=11, seed=5)[0]
    opt = OPTIMIZERS[name](m)
    closure = closure_for(opt, m, x, y)
    per_step = []
    with _passes(m) as count:
        for _ in range(6):
            opt.step(closure, fsd_inputs=(x_fsd,))
            per_step.append((count["forwards"], count["backwards"]))
            count.update(forwards=0, backwards=0)
    assert opt.meta_steps == 2 and opt.recoveries == 0 and opt.skipped_steps == 0
    meta = (3, 2) if row_wise else (4, 3)
    assert per_step == [meta, (1, 1), (1, 1)] * 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_joint_fsd_trains_as_the_fsd_terms_own_passes(name, monkeypatch):
    # the same float64 run with the FSD term carried by the closure at θ' and with passes of its own:
    # θ, φ and Q agree to rounding (the rows are computed in one batch instead of two)
    runs = []
    for joint in (True, False):
        if not joint:
            monkeypatch.setattr(objective, "rows_independent", lambda model: False)
        m = _mlp()
        x, y = data(dtype=torch.float64)
        x_fsd = data(n=11, dtype=torch.float64, seed=5)[0]
        opt = OPTIMIZERS[name](m)
        closure = closure_for(opt, m, x, y)
        for _ in range(7):
            opt.step(closure, fsd_inputs=(x_fsd,))
        assert opt.meta_steps == 3
        runs.append(trained_state(m, opt))
    assert_trained_alike(*runs)


def _objective(m, closure, x_fsd, joint, *, fsd="kl", grad_scale=None):
    params = list(m.parameters())
    deltas = [0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
              for i, p in enumerate(params)]
    with _passes(m) as count:
        obj = proximal_objective_grad(m, params, deltas, closure, fsd_inputs=(x_fsd,), lambda_fsd=0.7,
                                      lambda_wsd=0.3, fsd=fsd, grad_scale=grad_scale, joint_fsd=joint)
    return obj, (count["forwards"], count["backwards"])


def _loss_closure(m, x, y, scale=1.0, body=None):
    params = list(m.parameters())

    def closure():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(m(x), y) if body is None else body()
        (loss * scale).backward()
        return loss
    return closure


@pytest.mark.parametrize("fsd", ["kl", "mse", "bernoulli", "callable"])
def test_joint_fsd_equals_the_fsd_terms_own_forward_and_backward(fsd):
    fsd_fn = (lambda new, old: (new - old).abs().pow(3).sum()) if fsd == "callable" else fsd
    m = _mlp()
    x, y = data(dtype=torch.float64)
    x_fsd = data(n=11, dtype=torch.float64, seed=5)[0]
    closure = _loss_closure(m, x, y)
    joint, passes = _objective(m, closure, x_fsd, True, fsd=fsd_fn)
    assert passes == (2, 1)  # a forward at θ, the closure at θ' with the FSD rows appended
    separate, passes = _objective(m, closure, x_fsd, False, fsd=fsd_fn)
    assert passes == (3, 2)  # a forward at θ, the closure at θ', the FSD term's forward and backward
    assert_same_objective(joint, separate)


def test_joint_fsd_is_scaled_with_the_loss():
    # a GradScaler's closure backpropagates scale·J: the FSD rows must ride at the same scale
    m = _mlp()
    x, y = data(dtype=torch.float64)
    x_fsd = data(n=11, dtype=torch.float64, seed=5)[0]
    joint, passes = _objective(m, _loss_closure(m, x, y, scale=1024.0), x_fsd, True, grad_scale=1024.0)
    assert passes == (2, 1)
    separate, _ = _objective(m, _loss_closure(m, x, y), x_fsd, False)
    assert_same_objective(joint, separate)


def test_joint_fsd_rides_on_the_first_call_with_gradients_and_falls_back_otherwise():
    m = _mlp()
    x, y = data(dtype=torch.float64)
    x_fsd = data(n=11, dtype=torch.float64, seed=5)[0]
    separate, _ = _objective(m, _loss_closure(m, x, y), x_fsd, False)

    def looks_first():  # a call without gradients, then the loss's: the second carries the rows
        with torch.no_grad():
            m(x)
        return F.cross_entropy(m(x), y)

    def calls_twice():  # the first call carries the rows; the second runs on its own batch alone
        return F.cross_entropy(m(x), y) + 0.0 * m(x).sum()

    for body in (looks_first, calls_twice):
        obj, passes = _objective(m, _loss_closure(m, x, y, body=body), x_fsd, True)
        assert passes == (2 + (body is calls_twice) + (body is looks_first), 1)
        assert_same_objective(obj, separate)

    def keyword_input():  # inputs it cannot match: the FSD term's own passes
        return F.cross_entropy(m(input=x), y)

    obj, passes = _objective(m, _loss_closure(m, x, y, body=keyword_input), x_fsd, True)
    assert passes == (3, 2)
    assert_same_objective(obj, separate)

    def under_autocast():  # f(x̃; θ') would be formed unlike f(x̃; θ): the FSD term's own passes
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
            out = m(x)
        return F.cross_entropy(out.double(), y)

    obj, passes = _objective(m, _loss_closure(m, x, y, body=under_autocast), x_fsd, True)
    assert passes == (3, 2)


def test_joint_fsd_reruns_the_closure_when_its_backward_passes_twice():
    m = _mlp()
    x, y = data(dtype=torch.float64)
    x_fsd = data(n=11, dtype=torch.float64, seed=5)[0]
    separate, _ = _objective(m, _loss_closure(m, x, y), x_fsd, False)
    params = list(m.parameters())

    def closure():  # two backward passes through one output: the rows' gradient would count twice
        for p in params:
            p.grad = None
        loss = F.cross_entropy(m(x), y)
        (0.5 * loss).backward(retain_graph=True)
        (0.5 * loss).backward()
        return loss

    obj, passes = _objective(m, closure, x_fsd, True)
    # forwards: at θ, the joint closure, the closure again alone, the FSD term's own; backwards: two
    # in each closure, one of the FSD term's own
    assert passes == (4, 5)
    assert_same_objective(obj, separate)

"""What a meta-step does to the model: how many forward and backward passes it makes (the FSD term
reuses the step's own forward when its batch is the step's), and that the lookahead writes θ' into buffers of its own, reused from one meta-step to the next, while θ and the
gradients at θ are never copied (no timings here: apo-bench and python/measure_meta_overhead.py
measure them)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from apo_kernels.optim import APOLR, APOPrecond, lr_directions
from apo_kernels.optim.objective import StepForward, proximal_objective_grad
from apo_kernels.optim.snapshot import RNGState, lookahead, parameters_of, submodules
from hypothesis import given, settings, strategies as st
from _tiny import (one_thread, mlp, data, assert_same_objective, assert_trained_alike,  # noqa: F401
                   trained_state)  # (one_thread: autouse fixture)


def _apo_lr(model, lambda_fsd):
    return APOLR(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                 lambda_fsd=lambda_fsd, lambda_wsd=0.0, meta_interval=3)


def _apo_precond(model, lambda_fsd):
    return APOPrecond(model, lr=0.01, lambda_fsd=lambda_fsd, lambda_wsd=0.0, meta_lr=0.01, meta_interval=3)


OPTIMIZERS = {"APOLR": _apo_lr, "APOPrecond": _apo_precond}


class PassCounter:
    """Forwards of the whole model (a forward hook) and backward passes through it (a hook on the
    first layer's weight gradient, which every backward and autograd.grad computes)."""

    def __init__(self, model):
        self.forwards = self.backwards = 0
        model.register_forward_hook(lambda *_: self._count("forwards"))
        model[0].weight.register_hook(lambda g: self._count("backwards"))

    def _count(self, what):
        setattr(self, what, getattr(self, what) + 1)

    def take(self):
        out = (self.forwards, self.backwards)
        self.forwards = self.backwards = 0
        return out


def _closure(opt, model, x, y, on_call=None):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if on_call is not None:
            on_call()
        return loss
    return closure


@pytest.mark.parametrize("fsd_batch", ["other", "own"])
@pytest.mark.parametrize("lambda_fsd", [0.1, 0.0], ids=["fsd", "no-fsd"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_meta_step_makes_only_the_passes_it_needs(name, lambda_fsd, fsd_batch):
    # plain step: the closure (1 forward, 1 backward). Meta-step: the closure at θ and at θ'
    # (2 + 2), and with the FSD term on another batch a forward at θ without a graph and a forward
    # + backward at θ'; when the FSD batch is the step's own, the closure's forward at θ is f(x̃; θ)
    # and its forward and backward at θ' carry the FSD term: no pass more than without it. (The
    # counter's hook on the model keeps the FSD term on another batch off the closure's passes:
    # tests/test_joint_fsd.py counts the passes of a model without hooks.)
    m = mlp()
    x, y = data()
    x_fsd = data(seed=5)[0] if fsd_batch == "other" else x
    opt = OPTIMIZERS[name](m, lambda_fsd)
    count = PassCounter(m)
    closure = _closure(opt, m, x, y)
    per_step = []
    for _ in range(6):
        opt.step(closure, fsd_inputs=(x_fsd,))
        per_step.append(count.take())
    assert opt.meta_steps == 2 and opt.recoveries == 0 and opt.skipped_steps == 0
    meta = (4, 3) if lambda_fsd and fsd_batch == "other" else (2, 2)
    assert per_step == [meta, (1, 1), (1, 1)] * 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsd_on_the_steps_own_batch_trains_as_with_forwards_of_its_own(name):
    # the same float64 run with the FSD batch passed as the closure's own tensor (the FSD term rides
    # on the closure's passes) and as an equal copy (forwards of its own): θ, φ and Q agree to
    # rounding (the FSD gradient is summed at the output instead of at the parameters)
    runs = []
    for own in (True, False):
        m = mlp(torch.float64)
        x, y = data(dtype=torch.float64)
        opt = OPTIMIZERS[name](m, 0.1)
        closure = _closure(opt, m, x, y)
        for _ in range(7):
            opt.step(closure, fsd_inputs=(x if own else x.clone(),))
        assert opt.meta_steps == 3
        runs.append(trained_state(m, opt))
    assert_trained_alike(*runs)


def _objective(m, x, y, closure, *, own, fsd="kl", grad_scale=None, lambda_fsd=0.7):
    """Q and ∇θ'Q at θ + Δ (fixed Δ) after a step's closure at θ, the FSD batch the closure's own
    tensor (``own``) or an equal copy; and the passes the objective made."""
    params = list(m.parameters())
    deltas = [0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
              for i, p in enumerate(params)]
    fsd_inputs = (x if own else x.clone(),)
    watch = StepForward(m, fsd_inputs)
    rng = RNGState()
    with watch:
        closure()
    count = PassCounter(m)
    obj = proximal_objective_grad(m, params, deltas, closure, fsd_inputs=fsd_inputs, lambda_fsd=lambda_fsd,
                                  lambda_wsd=0.3, fsd=fsd, grad_scale=grad_scale, rng=rng, step_forward=watch)
    return obj, count.take()


def _loss_closure(m, x, y, scale=1.0, extra=None):
    params = list(m.parameters())

    def closure():
        for p in params:
            p.grad = None
        if extra is not None:
            extra("before")
        loss = F.cross_entropy(m(x), y)
        (loss * scale).backward()
        if extra is not None:
            extra("after")
        return loss
    return closure


@pytest.mark.parametrize("fsd", ["kl", "mse", "bernoulli", "callable"])
def test_fsd_carried_by_the_closure_equals_its_own_forward_and_backward(fsd):
    fsd_fn = (lambda new, old: (new - old).abs().pow(3).sum()) if fsd == "callable" else fsd
    m = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    closure = _loss_closure(m, x, y)
    fused, passes = _objective(m, x, y, closure, own=True, fsd=fsd_fn)
    assert passes == (1, 1)  # the closure at θ' only
    separate, passes = _objective(m, x, y, closure, own=False, fsd=fsd_fn)
    assert passes == (3, 2)  # the closure, a forward at θ, a forward + backward at θ'
    assert_same_objective(fused, separate)


def test_fsd_carried_by_the_closure_is_scaled_with_the_loss():
    # a GradScaler's closure backpropagates scale·J: the FSD term must ride at the same scale
    m = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    fused, passes = _objective(m, x, y, _loss_closure(m, x, y, scale=1024.0), own=True, grad_scale=1024.0)
    assert passes == (1, 1)
    separate, _ = _objective(m, x, y, _loss_closure(m, x, y), own=False)
    assert_same_objective(fused, separate)


def test_fsd_falls_back_to_passes_of_its_own_where_the_closure_cannot_carry_it():
    m = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    separate, _ = _objective(m, x, y, _loss_closure(m, x, y), own=False)
    calls = {"n": 0}

    def draws_at_the_lookahead(when):  # other draws before the model's call at θ': other masks, maybe
        calls["n"] += 1
        if when == "before" and calls["n"] > 2:
            torch.rand(3)

    fallback, passes = _objective(m, x, y, _loss_closure(m, x, y, extra=draws_at_the_lookahead), own=True)
    assert passes == (2, 2)  # the closure at θ', and a forward + backward of the FSD term's own
    assert_same_objective(fallback, separate)

    def calls_again_after_the_backward(when):  # the closure at θ' calls the model twice: ambiguous
        calls["n"] += 1
        if when == "after" and calls["n"] > 2:
            m(x)

    calls["n"] = 0
    rerun, passes = _objective(m, x, y, _loss_closure(m, x, y, extra=calls_again_after_the_backward), own=True)
    assert passes == (5, 3)  # the closure twice (two forwards, one backward each), the FSD term's own
    assert_same_objective(rerun, separate)


def test_fsd_on_a_model_returning_a_dict_runs_passes_of_its_own():
    # the term rides only on a Tensor output; a dict (a callable fsd reads it) keeps its own passes
    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(torch.float64)

        def forward(self, x):
            return {"logits": self.net(x)}

    m = DictNet()
    x, y = data(dtype=torch.float64)
    params = list(m.parameters())

    def closure():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(m(x)["logits"], y)
        loss.backward()
        return loss

    fsd = lambda new, old: F.mse_loss(new["logits"], old["logits"])  # noqa: E731
    results = []
    for fsd_inputs in ((x,), (x.clone(),)):
        watch = StepForward(m, fsd_inputs)
        rng = RNGState()
        with watch:
            closure()
        deltas = [0.05 * torch.ones_like(p) for p in params]
        calls = []
        handle = m.register_forward_hook(lambda *_: calls.append(1))
        results.append(proximal_objective_grad(m, params, deltas, closure, fsd_inputs=fsd_inputs, lambda_fsd=0.5,
                                               fsd=fsd, rng=rng, step_forward=watch))
        handle.remove()
        assert len(calls) == (2 if fsd_inputs[0] is x else 3)  # the closure and the term's forward at θ'
    assert_same_objective(*results)


def test_reused_forward_replays_its_dropout_masks_at_the_lookahead():
    # with Δ = 0 the FSD term is exactly 0 only if the forward at θ' draws the masks of the
    # reused forward at θ
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3))
    x, y = data()
    params = list(m.parameters())

    def closure():
        for p in params:
            p.grad = None
        torch.rand(7)  # the closure draws before the model: the masks are the model call's own
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    for replayed in (True, False):  # the closure at θ' carries the FSD term / draws other masks
        rng = RNGState()
        watch = StepForward(m, (x,))
        with watch:
            closure()
        assert watch.reusable() is not None
        count = PassCounter(m)
        obj = proximal_objective_grad(m, params, [torch.zeros_like(p) for p in params], closure, fsd_inputs=(x,),
                                      lambda_fsd=1.0, step_forward=watch, rng=rng if replayed else None)
        assert obj.fsd == 0.0
        assert count.take() == ((1, 1) if replayed else (2, 2))


def test_step_forward_is_reused_only_when_it_computed_what_a_forward_at_theta_would():
    m = mlp()
    x, _ = data()

    def watched(call):
        watch = StepForward(m, (x,))
        with watch:
            call()
        assert not m._forward_hooks and not m._forward_pre_hooks  # the hooks live for the closure only
        return watch

    assert watched(lambda: m(x)).reusable() is not None
    assert watched(lambda: m(x.clone())).reusable() is None  # other tensors: no reuse
    assert watched(lambda: (m(x), m(x))).reusable() is None  # two calls: which one is ambiguous
    assert watched(lambda: m(x).mul_(2.0)).reusable() is None  # its output written in place
    watch = watched(lambda: m(x))
    with torch.no_grad():
        x.add_(1.0)  # the inputs written in place after the forward
    assert watch.reusable() is None
    watch = watched(lambda: m(x))
    m.eval()  # a forward at θ now would run in another mode
    assert watch.reusable() is None
    m.train()
    assert watch.reusable() is not None


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lookahead_buffers_are_reused_and_theta_and_grads_are_not_copied(name):
    m = mlp()
    x, y = data()
    opt = OPTIMIZERS[name](m, 0.1)
    params = list(m.parameters())
    theta_ptrs = [p.data_ptr() for p in params]
    seen = {"calls": 0, "lookahead": [], "grad_at_theta": None}

    def on_call():
        seen["calls"] += 1
        if seen["calls"] % 2 == 1:  # the step's closure at θ: the gradients the update must use
            seen["grad_at_theta"] = [p.grad for p in params]
        else:  # the meta-step's closure at θ'
            seen["lookahead"].append([p.data_ptr() for p in params])

    closure = _closure(opt, m, x, y, on_call)
    opt.meta_interval = 1
    graded = []
    for _ in range(3):
        opt.step(closure, fsd_inputs=(x,))
        graded.append(all(p.grad is g for p, g in zip(params, seen["grad_at_theta"])))
    assert opt.meta_steps == 3 and opt.recoveries == 0
    first, *later = seen["lookahead"]
    assert all(ptrs == first for ptrs in later)  # the same buffers at every meta-step
    assert all(a != b for a, b in zip(first, theta_ptrs))  # θ' is not written over θ ...
    assert [p.data_ptr() for p in params] == theta_ptrs  # ... and θ stays where it was
    assert graded == [True] * 3  # .grad is the closure's own gradient at θ again, not a copy of it


def test_lookahead_context_restores_theta_grads_and_buffers_bit_for_bit():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    x, y = data()
    F.cross_entropy(m(x), y).backward()
    params = [m[0].weight, m[2].bias]  # some parameters move, the others' gradients must survive too
    before = [t.detach().clone() for t in (*m.parameters(), *m.buffers())]
    grads = [p.grad.clone() for p in m.parameters()]
    deltas = [torch.full_like(p, 0.5, dtype=torch.float64) for p in params]
    with lookahead(m, params, deltas):
        assert all(p.grad is None for p in m.parameters())
        for p, v, d in zip(params, (before[0], before[5]), deltas):
            assert torch.equal(p, (v.double() + d).float())  # formed in Δ's dtype, rounded once
        F.cross_entropy(m(x), y).backward()  # moves BatchNorm statistics and writes .grad
    after = [t.detach() for t in (*m.parameters(), *m.buffers())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))


class _OwnWalk(torch.nn.Module):
    """A module that lists its submodules its own way (here: without its children)."""

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self


class _ReversedParameters(torch.nn.Sequential):
    """A container whose ``parameters()`` lists them in reverse."""

    def parameters(self, recurse=True):
        return iter(list(super().parameters(recurse))[::-1])


@st.composite
def _module_trees(draw):
    """A random module tree: nested containers, a module and a parameter shared between places,
    None entries, buffers, and now and then a class with its own walk."""
    shared_leaf, shared_param = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.zeros(1))

    def build(depth):
        kind = draw(st.sampled_from(["leaf", "shared", "seq", "own"] if depth < 3 else ["leaf", "shared"]))
        if kind == "leaf":
            leaves = [lambda: torch.nn.Linear(2, 2), lambda: torch.nn.BatchNorm1d(2), torch.nn.Identity]
            m = draw(st.sampled_from(leaves))()
        elif kind == "shared":
            m = shared_leaf
        else:
            m = (torch.nn.Sequential if kind == "seq" else _OwnWalk)()
            for i in range(draw(st.integers(0, 3))):
                m.add_module(f"c{i}", build(depth + 1))
            if draw(st.booleans()):
                m.register_module("none", None)
            if draw(st.booleans()):
                m.register_parameter("tied", shared_param)
            if draw(st.booleans()):
                m.register_parameter("empty", None)
        return m

    root = draw(st.sampled_from([torch.nn.Sequential, _ReversedParameters]))()
    for i in range(draw(st.integers(1, 4))):
        root.add_module(f"r{i}", build(0))
    return root


@settings(max_examples=60, deadline=None)
@given(_module_trees(), st.data())
def test_the_snapshots_walk_lists_what_modules_and_parameters_list(model, data):
    assert [id(m) for m in submodules(model)] == [id(m) for m in model.modules()]
    params = list(model.parameters())
    assert [id(p) for p in parameters_of(model, submodules(model))] == [id(p) for p in params]
    first = data.draw(st.permutations(params)) if params else []
    first = first[:data.draw(st.integers(0, len(first)))]
    expected = list({id(p): p for p in (*first, *params)}.values())
    assert [id(p) for p in parameters_of(model, submodules(model), first=first)] == [id(p) for p in expected]


SGD_CONFIGS = {
    "momentum": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening-maximize-wd": dict(momentum=0.5, dampening=0.3, maximize=True, weight_decay=0.1),
    "plain-wd": dict(weight_decay=0.1),
}


@pytest.mark.parametrize("steps_before", [0, 2], ids=["no-buffer-yet", "buffer"])
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_scaled_sgd_direction_equals_a_copy_of_sgd_stepping(config, steps_before):
    # the lookahead forms scale·d in one pass per term; it must still be SGD's step with lr = scale
    m = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    sgd = torch.optim.SGD(m.parameters(), lr=0.3, **SGD_CONFIGS[config])
    for k in range(steps_before + 1):
        sgd.zero_grad()
        F.cross_entropy(m(x + 0.1 * k), y).backward()
        if k < steps_before:
            sgd.step()
    params = list(m.parameters())
    (deltas,) = lr_directions(sgd, [params], scales=[0.3])
    copied = copy.deepcopy(m)
    real = torch.optim.SGD(copied.parameters(), lr=0.3, **SGD_CONFIGS[config])
    real.load_state_dict(copy.deepcopy(sgd.state_dict()))
    for p, q in zip(params, copied.parameters()):
        q.grad = p.grad.clone()
    real.step()
    for p, d, q in zip(params, deltas, copied.parameters()):
        assert torch.allclose(p.detach() + d, q.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps_before", [0, 2], ids=["no-buffer-yet", "buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_apolr_forms_sgds_delta_in_the_pass_that_writes_the_lookahead(config, dtype, steps_before, monkeypatch):
    """APO-LR over SGD forms Δ in the pass that writes θ' (``apo::sgd_lookahead``, one call per set of
    coefficients): Q and ∂Q/∂log lr equal those of Δ formed first (``lr_directions``, then the write),
    to the rounding of Δ's dtype (the two round Δ's sums in another way: ATen's add fuses a product)."""
    from apo_kernels.ops import backends

    native = backends.native_sgd_lookahead
    if native is None:
        pytest.skip("the native module apo_kernels._C is not built")
    calls = []
    results = {}
    for name, impl in (("one pass", lambda *a: calls.append(len(a[0])) or native(*a)), ("Δ first", None)):
        monkeypatch.setattr(backends, "native_sgd_lookahead", impl)
        torch.manual_seed(0)
        m = mlp(dtype)
        x, y = data(dtype=dtype)
        opt = APOLR(m, torch.optim.SGD(m.parameters(), lr=0.05, **SGD_CONFIGS[config]), lambda_fsd=0.1,
                    lambda_wsd=0.01, meta_interval=0)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss

        for _ in range(steps_before):
            opt.step(closure)
        results[name] = opt.meta_gradient(closure, fsd_inputs=(x + 0.5,))
    assert calls and sum(calls) == len(list(mlp(dtype).parameters()))
    (q1, (g1,)), (q2, (g2,)) = results["one pass"], results["Δ first"]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert math.isclose(q1, q2, rel_tol=tol)
    assert torch.allclose(g1, g2, rtol=100 * tol, atol=0.0), (g1, g2)

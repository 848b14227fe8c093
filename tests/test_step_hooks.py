"""The optimizers' step wrapper (apo_kernels._step_hooks): torch.optim's step hooks and profiler range
exactly when someone listens, and no profiler range otherwise (``zero_grad``'s range too); and
torch.optim's state-dict hooks."""
import contextlib
import functools
import warnings

import pytest
import torch
from torch.optim import optimizer as torch_optimizer

from apo_kernels import _step_hooks
from apo_kernels.baselines import EKFAC, KFAC
from apo_kernels.ops import backends
from apo_kernels.optim import APOLR, APOPrecond
from apo_kernels.optim import lr as apo_lr
from _tiny import one_thread, mlp, data, closure_for  # noqa: F401  (one_thread: autouse fixture)

OPTIMIZERS = {
    "APOLR": lambda m: APOLR(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda_fsd=0.0,
                             lambda_wsd=0.1, meta_interval=2),
    "APOPrecond": lambda m: APOPrecond(m, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.1, meta_lr=0.01,
                                     meta_interval=2),
    "KFAC": lambda m: KFAC(m, lr=0.1, damping=0.1),
    "EKFAC": lambda m: EKFAC(m, lr=0.1, damping=0.1),
}


def _setup(name):
    model = mlp()
    return model, OPTIMIZERS[name](model), *data()


@contextlib.contextmanager
def _ranges_refused(refused):
    """torch.autograd.profiler.record_function raises for the ranges ``refused(name)`` picks while
    inside; other ranges open as usual."""
    original = torch.autograd.profiler.record_function

    def Refused(name, *args, **kwargs):
        if refused(name):
            raise AssertionError(f"record_function was opened: {name}")
        return original(name, *args, **kwargs)

    torch.autograd.profiler.record_function = Refused
    try:
        yield
    finally:
        torch.autograd.profiler.record_function = original


def _record_function_raises(opt):
    """Inside it ``opt``'s step range raises: shows whether its step opens one (zero_grad's and the base
    optimizer's step open theirs as usual)."""
    return _ranges_refused(lambda name: name == f"Optimizer.step#{type(opt).__name__}.step")


def _zero_grad_range_raises():
    """Inside it any optimizer's zero_grad range raises."""
    return _ranges_refused(lambda name: name.startswith("Optimizer.zero_grad#"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_is_wrapped_once_and_opens_no_profiler_range_when_nobody_listens(name):
    model, opt, x, y = _setup(name)
    cls = type(opt)
    assert cls.step.hooked is True  # torch.optim did not wrap it again
    with _record_function_raises(opt):
        for _ in range(3):  # a meta-step and plain steps
            opt.step(closure_for(opt, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_instance_step_hooks_run_through_torchs_wrapper(name):
    model, opt, x, y = _setup(name)
    calls = []
    closure = closure_for(opt, model, x, y)

    def pre(o, args, kwargs):
        calls.append(("pre", o, args))
        return (o, closure), kwargs  # a pre-hook may replace the arguments, self first (torch.optim's contract)

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, args)))
    loss = opt.step(None if name.endswith("KFAC") else closure)  # KFAC needs the closure: from the hook
    assert [c[0] for c in calls] == ["pre", "post"] and all(c[1] is opt for c in calls)
    assert calls[1][2] == (opt, closure) and torch.isfinite(torch.as_tensor(loss))
    with _record_function_raises(opt), pytest.raises(AssertionError, match="record_function"):
        opt.step(closure)  # with a hook registered the step goes through torch's wrapper and its range


@pytest.mark.parametrize("name", ["APOLR", "APOPrecond"])
def test_global_step_hooks_run(name):
    model, opt, x, y = _setup(name)
    calls = []
    handles = [torch_optimizer.register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
               torch_optimizer.register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", o)))]
    try:
        opt.step(closure_for(opt, model, x, y))
    finally:
        for h in handles:
            h.remove()
    ours = [when for when, o in calls if o is opt]  # the meta- and base optimizers' steps call them too
    assert ours == ["pre", "post"] and calls[0] == ("pre", opt) and calls[-1] == ("post", opt)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_profiler_sees_the_step_range(name):
    model, opt, x, y = _setup(name)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure_for(opt, model, x, y))
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{name}.step" in names


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_grad_opens_no_profiler_range_when_nobody_listens(name):
    model, opt, x, y = _setup(name)
    opt.step(closure_for(opt, model, x, y))
    assert any(p.grad is not None for p in model.parameters())
    with _zero_grad_range_raises():
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step(closure_for(opt, model, x, y))  # the closures zero the grads the same way
    with _zero_grad_range_raises(), pytest.raises(AssertionError, match="record_function"):
        opt.zero_grad(set_to_none=False)  # zeroing in place is torch's own call


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_grad_in_place_and_under_a_profiler_is_torchs(name):
    model, opt, x, y = _setup(name)
    opt.step(closure_for(opt, model, x, y))
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    opt.step(closure_for(opt, model, x, y))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert any(e.name.startswith("Optimizer.zero_grad#") for e in prof.events())


def test_apolr_zero_grad_is_a_base_optimizers_own():
    """A base optimizer with a zero_grad of its own (its class's or the instance's) gets that call."""
    class Counting(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none=True):
            Counting.calls += 1
            super().zero_grad(set_to_none)

    model, (x, y) = mlp(), data()
    opt = APOLR(model, Counting(model.parameters(), lr=0.1), lambda_fsd=0.0, lambda_wsd=0.1, meta_interval=0)
    opt.step(closure_for(opt, model, x, y))
    assert Counting.calls == 1
    calls = []
    opt.base_optimizer.zero_grad = lambda set_to_none=True: calls.append(set_to_none)
    opt.zero_grad(set_to_none=False)
    assert calls == [False] and Counting.calls == 1


def test_lr_scheduler_sees_the_step():
    """A scheduler patches the optimizer instance's step to notice calls: stepping it in order warns
    nothing, and the schedule advances."""
    model, opt, x, y = _setup("APOPrecond")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(opt, model, x, y))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 2)


@pytest.mark.parametrize("name", ["APOLR", "APOPrecond"])
def test_meta_optimizer_steps_quietly_unless_someone_listens(name):
    """The meta-optimizer (a stock torch.optim.Adam the APO optimizer drives) follows the same rule:
    no profiler range of its own; its hooks and a scheduler's wrapper on it still run."""
    model, opt, x, y = _setup(name)
    meta = opt.meta_optimizer
    with _record_function_raises(meta):
        opt.step(closure_for(opt, model, x, y))  # step 0 is a meta-step
    assert opt.meta_steps == 1
    calls = []
    meta.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    sched = torch.optim.lr_scheduler.StepLR(meta, step_size=1, gamma=0.5)  # wraps meta.step on the instance
    for _ in range(2):
        opt.step(closure_for(opt, model, x, y))  # step 2 is a meta-step (meta_interval=2)
    assert calls == [meta] and meta._opt_called
    lr0 = meta.param_groups[0]["lr"]
    sched.step()
    assert meta.param_groups[0]["lr"] == pytest.approx(lr0 / 2)


@pytest.mark.parametrize("name", ["APOLR", "APOPrecond"])
def test_a_schedulers_call_counter_alone_keeps_the_meta_optimizer_quiet(name):
    """A scheduler's call counter on the meta-optimizer's step, with nobody listening, is stood in for:
    the step opens no profiler range, and the counter's flag is set as its wrapper sets it."""
    model, opt, x, y = _setup(name)
    meta = opt.meta_optimizer
    torch.optim.lr_scheduler.StepLR(meta, step_size=1, gamma=0.5)  # wraps meta.step on the instance
    meta._opt_called = False
    with _record_function_raises(meta):
        opt.step(closure_for(opt, model, x, y))  # step 0 is a meta-step
    assert opt.meta_steps == 1 and meta._opt_called


def test_apolr_base_optimizer_steps_quietly_unless_someone_listens():
    """APO-LR's base optimizer (the user's torch.optim.SGD) follows the same rule: its step opens no
    profiler range of its own in a quiet loop; its hooks, a scheduler's wrapper on it and a running
    profiler still see every call."""
    model, opt, x, y = _setup("APOLR")
    base = opt.base_optimizer
    with _record_function_raises(base):
        for _ in range(3):  # a meta-step and plain steps
            opt.step(closure_for(opt, model, x, y))
    assert opt.step_count == 3 and opt.skipped_steps == 0
    calls = []
    base.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)  # wraps base.step on the instance
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stepping the scheduler after the base optimizer warns nothing
        opt.step(closure_for(opt, model, x, y))
        sched.step()
    assert calls == [base] and base._opt_called
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure_for(opt, model, x, y))
    assert "Optimizer.step#SGD.step" in {e.name for e in prof.events()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_hooks_run_as_torch_optim_runs_them(name):
    # register_state_dict_pre/post_hook and register_load_state_dict_pre/post_hook: called in that
    # order with torch's arguments; a post hook's dict replaces the state_dict, a load pre-hook's dict
    # is what loads (here: the step counter of APO's state, the lr of KFAC's torch.optim state), and
    # the load post-hook sees the loaded state
    model, opt, x, y = _setup(name)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
    calls = []
    apo = name in ("APOLR", "APOPrecond")

    def post(o, state):
        calls.append(("post", o is opt))
        return {**state, "tagged": True}

    def load_pre(o, state):
        calls.append(("load_pre", state.get("tagged")))
        state = {k: v for k, v in state.items() if k != "tagged"}
        if apo:
            return state | {"step": 7}
        return state | {"param_groups": [{**g, "lr": 0.07} for g in state["param_groups"]]}

    def seen(o):
        return o.step_count if apo else o.param_groups[0]["lr"]

    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", seen(o))))
    state = opt.state_dict()
    assert state["tagged"] is True
    opt.load_state_dict(state)
    assert "tagged" in state  # the pre-hook got a copy
    assert calls == [("pre", True), ("post", True), ("load_pre", True), ("load_post", 7 if apo else 0.07)]


def _assert_same_parameters_and_state(ref, fast):
    """Every parameter of every group, and its state tensors, bit for bit alike in the two optimizers."""
    for pa, pb in zip([p for g in ref.param_groups for p in g["params"]],
                      [p for g in fast.param_groups for p in g["params"]]):
        assert torch.equal(pa, pb)
        assert ref.state[pa].keys() == fast.state[pb].keys()
        for key in ref.state[pa]:
            a, b = ref.state[pa][key], fast.state[pb][key]
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape) and torch.equal(a, b), key


def _adam_pair(make_params, **kwargs):
    """Two fused Adams over equal copies of the same parameters (groups: (params, extra options))."""
    pairs = []
    for _ in range(2):
        groups = [{"params": ps, **extra} for ps, extra in make_params()]
        pairs.append((groups, torch.optim.Adam(groups, fused=True, **kwargs)))
    return pairs


@pytest.mark.parametrize("kwargs", [dict(lr=0.05), dict(lr=0.01, betas=(0.0, 0.9)), dict(lr=0.02, amsgrad=True),
                                    dict(lr=0.03, weight_decay=0.1, maximize=True, eps=1e-6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_step_gives_torchs_bits(kwargs, dtype):
    """The direct kernel call takes torch's fused Adam step exactly: the same parameters, moments and
    step counters, bit for bit, over several steps of fresh gradients, with groups of their own lr, a
    parameter without a gradient (untouched, no state) and one whose gradient appears later."""
    gen = torch.Generator().manual_seed(7)

    def make_params():
        torch.manual_seed(3)
        return [([torch.randn(5, 3, dtype=dtype), torch.randn(7, dtype=dtype)], {}),
                ([torch.randn(1, dtype=dtype), torch.randn(2, 2, dtype=dtype)], {"lr": 0.2})]

    (groups_a, ref), (groups_b, fast) = _adam_pair(make_params, **kwargs)
    for step in range(4):
        for ga, gb in zip(groups_a, groups_b):
            for k, (pa, pb) in enumerate(zip(ga["params"], gb["params"])):
                late = ga is groups_a[1] and k == 1 and step < 2  # no gradient on the first two steps
                g = None if late else torch.randn(pa.shape, generator=gen, dtype=dtype)
                pa.grad, pb.grad = g, (None if g is None else g.clone())
        ref.step()
        assert _step_hooks._fused_adam_step(fast) is True
        _assert_same_parameters_and_state(ref, fast)


@pytest.mark.parametrize("case", ["not fused", "decoupled weight decay", "AdamW", "tensor lr", "two dtypes",
                                  "grad scaler", "SGD"])
def test_fused_adam_step_leaves_other_optimizers_to_torch(case):
    """Anything but a plain fused Adam over one device and dtype per group is refused before anything
    changes (the caller then takes torch's own step)."""
    p = torch.randn(4)
    q = torch.randn(3, dtype=torch.float64) if case == "two dtypes" else torch.randn(3)
    params = [p, q]
    make = {
        "not fused": lambda: torch.optim.Adam(params, lr=0.1),
        "decoupled weight decay": lambda: torch.optim.Adam(params, lr=0.1, fused=True, decoupled_weight_decay=True),
        "AdamW": lambda: torch.optim.AdamW(params, lr=0.1, fused=True),
        "tensor lr": lambda: torch.optim.Adam(params, lr=torch.tensor(0.1), fused=True),
        "two dtypes": lambda: torch.optim.Adam(params, lr=0.1, fused=True),
        "grad scaler": lambda: torch.optim.Adam(params, lr=0.1, fused=True),
        "SGD": lambda: torch.optim.SGD(params, lr=0.1),
    }[case]
    opt = make()
    if case == "grad scaler":
        opt.grad_scale = torch.ones(())
    for t in params:
        t.grad = torch.ones_like(t)
    before = [t.clone() for t in params]
    assert _step_hooks._fused_adam_step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and len(opt.state) == 0


def test_meta_optimizer_step_goes_straight_to_the_kernel_and_matches_torchs():
    """An APO optimizer's fused meta-Adam takes the direct kernel call when nobody listens: the same φ
    as torch's own step (a listener on the twin's meta-optimizer) after a few meta-steps."""
    torch.manual_seed(0)
    model, opt, x, y = _setup("APOPrecond")
    torch.manual_seed(0)
    twin_model, twin, _, _ = _setup("APOPrecond")
    calls = []
    original = _step_hooks._fused_adam_step
    _step_hooks._fused_adam_step = lambda o: calls.append(o) or original(o)
    try:
        for _ in range(3):
            opt.step(closure_for(opt, model, x, y))
        twin.meta_optimizer.register_step_post_hook(lambda o, args, kwargs: None)  # torch's own step
        for _ in range(3):
            twin.step(closure_for(twin, twin_model, x, y))
    finally:
        _step_hooks._fused_adam_step = original
    assert opt.meta_steps == twin.meta_steps == 2 and calls == [opt.meta_optimizer] * 2
    for a, b in zip(opt.phi, twin.phi):
        assert torch.equal(a, b)


@pytest.mark.skipif(backends.native_dot_adam_step is None, reason="the native module apo_kernels._C is not built")
@pytest.mark.parametrize("per_group", [False, True])
def test_apolr_meta_gradient_and_step_in_one_native_call_match_torchs_step(per_group, monkeypatch):
    """APO-LR's meta-gradient and φ's Adam step are one apo::dot_adam_step call when nobody listens to
    the meta-optimizer: φ, its moments and θ the same bits as the dot sums, ``.grad`` and torch's own
    step (a listener on the twin's meta-optimizer), over meta-steps of a two-group SGD."""
    def run(listen):
        torch.manual_seed(0)
        model = mlp()
        params = list(model.parameters())
        base = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.03}], lr=0.05, momentum=0.9)
        opt = APOLR(model, base, lambda_fsd=0.1, lambda_wsd=0.1, meta_interval=2, per_group=per_group)
        if listen:
            opt.meta_optimizer.register_step_post_hook(lambda o, args, kwargs: None)
        x, y = data()
        for _ in range(5):
            opt.step(closure_for(opt, model, x, y), fsd_inputs=(x,))
        return opt, model

    calls = []
    native = backends.native_dot_adam_step
    monkeypatch.setattr(backends, "native_dot_adam_step", lambda *args: calls.append(args[2]) or native(*args))
    opt, model = run(listen=False)
    assert calls == [[2, 2] if per_group else [4]] * 3 and opt.meta_steps == 3
    twin, twin_model = run(listen=True)
    assert len(calls) == 3 and twin.meta_steps == 3  # the twin's steps are torch's
    assert torch.equal(opt.log_lr, twin.log_lr) and opt.log_lr._version > 0
    ours, theirs = opt.meta_optimizer.state[opt.log_lr], twin.meta_optimizer.state[twin.log_lr]
    assert all(torch.equal(ours[k], theirs[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    assert opt.log_lr.grad is None and opt.lr_history == twin.lr_history


@pytest.mark.skipif(backends.native_dot_adam_step is None, reason="the native module apo_kernels._C is not built")
def test_dot_adam_step_leaves_other_optimizers_to_torch():
    """Where one native call is not ``opt.step()`` (another optimizer or group, a second parameter, someone
    listening, a pair off the CPU), ``dot_adam_step`` returns None and changes nothing."""
    a, b = [torch.randn(3, 2)], [torch.randn(3, 2)]
    cases = {
        "foreach Adam": lambda phi: torch.optim.Adam([phi], lr=0.1),
        "amsgrad": lambda phi: torch.optim.Adam([phi], lr=0.1, amsgrad=True, fused=True),
        "weight decay": lambda phi: torch.optim.Adam([phi], lr=0.1, weight_decay=0.1, fused=True),
        "maximize": lambda phi: torch.optim.Adam([phi], lr=0.1, maximize=True, fused=True),
        "a tensor lr": lambda phi: torch.optim.Adam([phi], lr=torch.tensor(0.1), fused=True),
        "AdamW": lambda phi: torch.optim.AdamW([phi], lr=0.1, fused=True),
        "SGD": lambda phi: torch.optim.SGD([phi], lr=0.1),
        "two parameters": lambda phi: torch.optim.Adam([phi, torch.zeros(1, dtype=torch.float64)], lr=0.1, fused=True),
        "a step hook": lambda phi: _hooked(torch.optim.Adam([phi], lr=0.1, fused=True)),
    }
    for name, make in cases.items():
        phi = torch.zeros(1, dtype=torch.float64)
        opt = make(phi)
        assert _step_hooks.dot_adam_step(opt, a, b, [1]) is None, name
        assert torch.equal(phi, torch.zeros(1, dtype=torch.float64)) and len(opt.state) == 0, name
    phi = torch.zeros(1, dtype=torch.float64)
    opt = torch.optim.Adam([phi], lr=0.1, fused=True)
    meta = [torch.randn(3, 2, device="meta")]
    assert _step_hooks.dot_adam_step(opt, meta, meta, [1]) is None and len(opt.state) == 0  # off the CPU
    assert _step_hooks.dot_adam_step(opt, a, b, [1]) is not None and phi.item() != 0.0  # the plain case steps


def _hooked(opt):
    opt.register_step_pre_hook(lambda o, args, kwargs: None)
    return opt


SGD_CONFIGS = [dict(lr=0.05), dict(lr=0.01, momentum=0.9),
               dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
               dict(lr=0.03, momentum=0.5, dampening=0.3, maximize=True, weight_decay=0.1)]


# the two direct SGD steps: (optimizer options, the function, whether a group may mix dtypes)
DIRECT_SGD = {"fused": (dict(fused=True), "_fused_sgd_step", False),
              "per-tensor": (dict(), "_single_tensor_sgd_step", True)}


# a tensor lr with the fused step is left to torch (test_fused_sgd_step_leaves_other_optimizers_to_torch)
DIRECT_SGD_CASES = ([("fused", kwargs) for kwargs in SGD_CONFIGS]
                    + [("per-tensor", kwargs) for kwargs in SGD_CONFIGS + [dict(lr=torch.tensor(0.04), momentum=0.9)]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direct, kwargs", DIRECT_SGD_CASES)
def test_direct_sgd_step_gives_torchs_bits(direct, kwargs, dtype):
    """The direct call takes torch's SGD step exactly: the same parameters and momentum buffers, bit
    for bit, over several steps of fresh gradients, with groups of their own lr, the buffers' first
    step included, and a parameter without a gradient (untouched, no state); the per-tensor step also
    with a group of two dtypes and a parameter whose gradient, and so its buffer, appears later. The
    fused step gets a whole group late instead (torch's own fused step fails on a group where only
    some parameters have a buffer, which the direct call leaves to it)."""
    options, name, mixed = DIRECT_SGD[direct]
    gen = torch.Generator().manual_seed(7)
    momentum = kwargs.get("momentum", 0)

    def make():
        torch.manual_seed(3)
        odd = torch.float64 if mixed else dtype
        groups = [{"params": [torch.randn(5, 3, dtype=dtype), torch.randn(7, dtype=dtype)]},
                  {"params": [torch.randn(1, dtype=odd), torch.randn(2, 2, dtype=dtype)], "lr": 0.2}]
        return groups, torch.optim.SGD(groups, **options, **kwargs)

    (groups_a, ref), (groups_b, fast) = make(), make()
    for step in range(4):
        for ga, gb in zip(groups_a, groups_b):
            for k, (pa, pb) in enumerate(zip(ga["params"], gb["params"])):
                late = ga is groups_a[1] and step < 2 and (k == 1 or (not mixed and momentum != 0))
                g = None if late else torch.randn(pa.shape, generator=gen, dtype=pa.dtype)
                pa.grad, pb.grad = g, (None if g is None else g.clone())
        ref.step()
        assert getattr(_step_hooks, name)(fast) is True
        _assert_same_parameters_and_state(ref, fast)


@pytest.mark.parametrize("case", ["not fused", "foreach", "tensor lr", "tensor weight decay", "two dtypes",
                                  "grad scaler", "a buffer for some parameters only", "Adam"])
def test_fused_sgd_step_leaves_other_optimizers_to_torch(case):
    """Anything but a plain fused SGD over one device and dtype per group, with a buffer for every
    parameter of a group or for none, is refused before anything changes (the caller then takes
    torch's own step)."""
    p = torch.randn(4)
    q = torch.randn(3, dtype=torch.float64) if case == "two dtypes" else torch.randn(3)
    params = [p, q]
    make = {
        "not fused": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "foreach": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
        "tensor lr": lambda: torch.optim.SGD(params, lr=torch.tensor(0.1), momentum=0.9, fused=True),
        "tensor weight decay": lambda: torch.optim.SGD(params, lr=0.1, weight_decay=torch.tensor(0.1), fused=True),
        "two dtypes": lambda: torch.optim.SGD(params, lr=0.1, fused=True),
        "grad scaler": lambda: torch.optim.SGD(params, lr=0.1, fused=True),
        "a buffer for some parameters only": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
        "Adam": lambda: torch.optim.Adam(params, lr=0.1, fused=True),
    }[case]
    opt = make()
    if case == "grad scaler":
        opt.grad_scale = torch.ones(())
    if case == "a buffer for some parameters only":
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    for t in params:
        t.grad = torch.ones_like(t)
    before = [t.clone() for t in params]
    state_before = {k: dict(v) for k, v in opt.state.items()}
    assert _step_hooks._fused_sgd_step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert {k: dict(v) for k, v in opt.state.items()} == state_before


@pytest.mark.parametrize("direct", list(DIRECT_SGD))
def test_apolr_base_sgd_takes_the_direct_step_and_matches_torchs(direct, monkeypatch):
    """APO-LR over a fused SGD, or torch's default SGD on CPU, steps it by the direct call when nobody
    listens: the same parameters and momentum buffers, bit for bit, as a twin whose base optimizer
    has a listener (torch's own step), over steps with meta-steps among them. Over the default SGD
    the steps after the first (which creates the momentum buffers) are the native checked step
    (``checked_sgd_step``)."""
    options, name, _ = DIRECT_SGD[direct]

    def make():
        torch.manual_seed(0)
        model = mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, **options)
        return model, APOLR(model, base, lambda_fsd=0.0, lambda_wsd=0.1, meta_interval=2)

    (model, opt), (twin_model, twin) = make(), make()
    twin.base_optimizer.register_step_post_hook(lambda o, args, kwargs: None)
    x, y = data()
    calls = []
    original = getattr(_step_hooks, name)
    monkeypatch.setattr(_step_hooks, name, lambda o: calls.append(o) or original(o))
    native_calls, native = [], apo_lr.checked_sgd_step

    def counted(o, lrs):
        done = native(o, lrs)
        if done is not None:
            native_calls.append(o)
        return done

    monkeypatch.setattr(apo_lr, "checked_sgd_step", counted)
    for _ in range(5):
        opt.step(closure_for(opt, model, x, y))
        twin.step(closure_for(twin, twin_model, x, y))
    native_steps = 4 if direct == "per-tensor" and backends.native_sgd_step is not None else 0
    assert native_calls == [opt.base_optimizer] * native_steps
    assert opt.meta_steps == twin.meta_steps == 3 and calls.count(opt.base_optimizer) == 5 - native_steps
    assert twin.base_optimizer not in calls
    assert opt.learnt_lrs == twin.learnt_lrs
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], twin.state[b]["momentum_buffer"])


def _optimizer_for(case: str, params):
    """The optimizer of a refusal case: torch's SGD with momentum unless the case names another."""
    return {
        "foreach": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
        "fused": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
        "tensor lr": lambda: torch.optim.SGD(params, lr=torch.tensor(0.1), momentum=0.9),
        "Adam": lambda: torch.optim.Adam(params, lr=0.1),
    }.get(case, lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9))()


@pytest.mark.parametrize("case", ["foreach", "fused", "grad scaler", "sparse gradient", "meta device", "Adam"])
def test_single_tensor_sgd_step_leaves_other_optimizers_to_torch(case):
    """A group that asks for foreach or fused, a parameter off the CPU, a sparse gradient or a grad
    scaler's flags are left to torch's own step, before anything changes."""
    device = "meta" if case == "meta device" else "cpu"
    p, q = torch.randn(4, device=device), torch.randn(3, device=device)
    params = [p, q]
    opt = _optimizer_for(case, params)
    if case == "grad scaler":
        opt.found_inf = torch.zeros(())
    for t in params:
        t.grad = torch.ones_like(t)
    if case == "sparse gradient":
        q.grad = torch.ones_like(q).to_sparse()
    before = [t.clone() for t in params]
    assert _step_hooks._single_tensor_sgd_step(opt) is False
    if device == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert len(opt.state) == 0


@pytest.mark.skipif(backends.native_sgd_step is None, reason="the native module apo_kernels._C is not built")
@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=str)
def test_checked_sgd_step_is_torchs_step_at_the_lrs_given(kwargs):
    """``checked_sgd_step(opt, lrs)``: torch's default SGD step with group k's lr taken as lrs[k], bit for
    bit, over two groups (the second with its own lr), a parameter without a gradient left alone; a
    NaN in the second group's gradient writes nothing in either group."""
    gen = torch.Generator().manual_seed(3)

    def make():
        ps = [torch.randn(5, 3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}]
        return ps, torch.optim.SGD(groups, **kwargs)

    (ps, opt), (twin_ps, twin) = make(), make()
    lrs = [0.011, 0.07]
    for step in range(4):
        grads = [torch.randn(5, 3, generator=gen) for _ in ps]
        for p, q, g in zip(ps, twin_ps, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ps[1].grad = twin_ps[1].grad = None  # no gradient: no step, no state
        for group, lr in zip(twin.param_groups, lrs):
            group["lr"] = lr
        twin.step()
        expected = None if step == 0 and kwargs.get("momentum", 0) else True  # torch creates the buffers
        done = _step_hooks.checked_sgd_step(opt, lrs)
        if done is None:
            assert expected is None
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
            opt.step()
        assert done is expected
        assert all(torch.equal(a, b) for a, b in zip(ps, twin_ps))
        assert all(torch.equal(opt.state[a]["momentum_buffer"], twin.state[b]["momentum_buffer"])
                   for a, b in zip(ps, twin_ps) if b in twin.state)
    assert ps[1] not in opt.state or "momentum_buffer" not in opt.state[ps[1]]
    ps[2].grad = torch.randn(5, 3, generator=gen)
    ps[2].grad[4, 2] = float("nan")
    ps[0].grad = torch.randn(5, 3, generator=gen)
    before = [p.clone() for p in ps] + [s["momentum_buffer"].clone() for s in opt.state.values()
                                        if s.get("momentum_buffer") is not None]
    assert _step_hooks.checked_sgd_step(opt, lrs) is False
    after = list(ps) + [s["momentum_buffer"] for s in opt.state.values() if s.get("momentum_buffer") is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.skipif(backends.native_sgd_step is None, reason="the native module apo_kernels._C is not built")
@pytest.mark.parametrize("case", ["foreach", "fused", "tensor lr", "tensor momentum", "no buffer yet", "grad scaler",
                                  "gradient of another dtype", "sparse gradient", "meta device", "step hook",
                                  "global step hook", "step wrapped on the instance", "Adam"])
def test_checked_sgd_step_leaves_other_cases_to_the_caller(case):
    """Where the native step is not torch's step, or someone listens to the step, ``checked_sgd_step``
    returns None having changed nothing (the caller then checks and steps as before)."""
    device = "meta" if case == "meta device" else "cpu"
    p, q = torch.randn(4, device=device), torch.randn(3, device=device)
    params = [p, q]
    opt = _optimizer_for(case, params)
    for t in params:
        t.grad = torch.ones_like(t)
        if case != "no buffer yet" and isinstance(opt, torch.optim.SGD):
            opt.state[t]["momentum_buffer"] = torch.zeros_like(t)
    if case == "tensor momentum":
        opt.param_groups[0]["momentum"] = torch.tensor(0.9)
    if case == "grad scaler":
        opt.found_inf = torch.zeros(())
    if case == "gradient of another dtype":
        q.grad_dtype = None  # torch refuses a gradient of another dtype unless told
        q.grad = torch.ones(3, dtype=torch.float64)
    if case == "sparse gradient":
        q.grad = torch.ones_like(q).to_sparse()
    undo = []
    if case == "step hook":
        undo.append(opt.register_step_pre_hook(lambda *args: None))
    if case == "global step hook":
        undo.append(torch_optimizer.register_optimizer_step_pre_hook(lambda *args: None))
    if case == "step wrapped on the instance":  # as an lr scheduler that counts the calls does
        opt.step = functools.partial(type(opt).step, opt)
    before = [t.clone() for t in params]
    state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    try:
        assert _step_hooks.checked_sgd_step(opt, [0.05]) is None
    finally:
        for handle in undo:
            handle.remove()
    if device == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert opt.state.keys() == state_before.keys()
    if device == "cpu":
        assert all(torch.equal(opt.state[k][n], v) for k, s in state_before.items() for n, v in s.items())


@pytest.mark.skipif(backends.native_sgd_step is None, reason="the native module apo_kernels._C is not built")
def test_apolr_with_a_scheduler_on_its_base_sgd_takes_the_native_step_and_torchs_bits(monkeypatch):
    """An lr scheduler on APO-LR's base SGD wraps its step on the instance to record the call
    (``_opt_called``); the native checked step stands in for that wrapper: it records the call as the
    wrapper does, the scheduler raises no warning of a call before the optimizer's step, and the
    parameters and buffers are bit for bit those of a twin whose base steps are torch's own (a hook)."""
    def make(hooked):
        torch.manual_seed(0)
        model = mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        if hooked:
            base.register_step_post_hook(lambda *args: None)
        sched = torch.optim.lr_scheduler.StepLR(base, step_size=2, gamma=0.5)
        return model, APOLR(model, base, lambda_fsd=0.0, lambda_wsd=0.1, meta_interval=3), sched

    (model, opt, sched), (twin_model, twin, twin_sched) = make(False), make(True)
    native_calls, native = [], apo_lr.checked_sgd_step
    monkeypatch.setattr(apo_lr, "checked_sgd_step",
                        lambda o, lrs: (lambda done: native_calls.append(done) or done)(native(o, lrs)))
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler's "lr_scheduler.step() before optimizer.step()"
        for _ in range(6):
            opt.base_optimizer._opt_called = False
            opt.step(closure_for(opt, model, x, y))
            assert opt.base_optimizer._opt_called
            twin.step(closure_for(twin, twin_model, x, y))
            sched.step()
            twin_sched.step()
    assert native_calls.count(True) == 5  # every step but the first (which creates the buffers)
    assert opt.learnt_lrs == twin.learnt_lrs and sched.get_last_lr() == twin_sched.get_last_lr()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], twin.state[b]["momentum_buffer"])

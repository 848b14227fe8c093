"""torch.optim's step wrapper, opened only when something listens.

Every ``torch.optim.Optimizer`` subclass gets its ``step`` wrapped by torch (``profile_hook_step``): the
global and per-optimizer step hooks run around it, inside a profiler range named
``Optimizer.step#<Class>.step``. The range is opened on every call, profiler or not: two op calls
through ``torch.ops.profiler``, 9 µs in a tight loop but about 60 µs right after a backward, a few
percent of a small model's step. ``step_with_hooks`` gives a step the same behaviour with that cost only when it buys something:
with a hook registered or a profiler running, the call goes through torch's own wrapper; otherwise
``step`` runs directly, followed by ``_optimizer_step_code`` (the profiler's Python-tracer entry).
The wrapper is marked ``hooked``, so torch does not wrap it again.

``zero_grad_quietly`` does the same for ``zero_grad``, whose profiler range torch opens on every call
too: run cold after a step that opened none, it took 48 µs on the small MLP where it takes 24 µs after
torch's own step, whose range had just run (the clearing itself is 5 µs).

``warn_at_caller``: a warning raised inside a step, attributed to the user's ``step`` call however
many wrappers (this one, ``torch.no_grad``) stand between.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim import sgd as _torch_sgd

from ._numerics import all_finite
from .ops import backends

__all__ = ["checked_sgd_step", "dot_adam_step", "step_with_hooks", "step_quietly", "stock_zero_grad",
           "warn_at_caller", "zero_grad_quietly"]


def _anyone_listening(opt: torch.optim.Optimizer) -> bool:
    return bool(torch.autograd.profiler._is_profiler_enabled
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def step_with_hooks(step: Callable) -> Callable:
    """Decorate an Optimizer subclass's ``step`` (see the module docstring)."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if _anyone_listening(self):
            return hooked(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # torch.optim.Optimizer._patch_step_function: already wrapped
    return wrapper


def zero_grad_quietly(opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """torch's ``Optimizer.zero_grad(opt, set_to_none)`` (the caller's word that it is ``opt``'s),
    without its profiler range when no profiler runs: setting every gradient to None is then all it
    does. ``set_to_none=False`` (gradients zeroed in place) or a running profiler: torch's call."""
    if not set_to_none or torch.autograd.profiler._is_profiler_enabled:
        torch.optim.Optimizer.zero_grad(opt, set_to_none)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None


def stock_zero_grad(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.zero_grad`` is torch's own (neither its class nor the instance has another)."""
    return type(opt).zero_grad is torch.optim.Optimizer.zero_grad and "zero_grad" not in vars(opt)


def _counted_by_a_scheduler(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step`` on the instance is an lr scheduler's call counter around the class's own
    step (torch's ``patch_track_step_called``: it sets ``opt._opt_called`` and calls that step), which
    a direct call stands in for by setting the flag itself (``_record_call``). Any other replacement
    is someone's own."""
    own = vars(opt).get("step")
    return getattr(own, "_wrapped_by_lr_sched", False) and getattr(own, "__wrapped__", None) is type(opt).step


def _quiet(opt: torch.optim.Optimizer) -> bool:
    """Whether a direct call may stand in for ``opt.step()``: the class's step is torch's wrapper
    (``hooked``), no hook or profiler listens, and the instance's step is the class's own or a
    scheduler's call counter around it."""
    return (getattr(type(opt).step, "hooked", False) and ("step" not in vars(opt) or _counted_by_a_scheduler(opt))
            and not _anyone_listening(opt))


def _record_call(opt: torch.optim.Optimizer) -> None:
    """What ``opt.step()`` records beyond the step, after a direct call (``_quiet``): a scheduler's
    call counter's flag, and the profiler's Python-tracer entry."""
    if "step" in vars(opt):  # (a quiet optimizer's own step: the scheduler's counter)
        opt._opt_called = True
    opt._optimizer_step_code()


def step_quietly(opt: torch.optim.Optimizer):
    """``opt.step()`` for a stock torch optimizer that an APO optimizer drives itself (its
    meta-optimizer), with the same rule: torch's wrapper only when someone listens, or when the
    instance's step was replaced by anything but a scheduler's call counter (``_quiet``). A fused
    ``torch.optim.Adam`` or ``torch.optim.SGD`` goes straight to its kernel, and a CPU
    ``torch.optim.SGD`` with torch's default step to that step's function (``_direct_step``)."""
    inner = getattr(type(opt).step, "__wrapped__", None)
    if inner is None or not _quiet(opt):
        return opt.step()
    out = None if _direct_step(opt) else inner(opt)
    _record_call(opt)
    return out


def _direct_step(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` took its step by a direct call of what torch's step calls (True), or is left
    to torch's step (False, nothing changed)."""
    kind = type(opt)
    if kind is torch.optim.Adam:
        return _fused_adam_step(opt)
    if kind is torch.optim.SGD:  # one of the two, by the groups' choice (a mix takes torch's step)
        fused = all(group["fused"] is True for group in opt.param_groups)
        return _fused_sgd_step(opt) if fused else _single_tensor_sgd_step(opt)
    return False


def _scaler_flags(opt: torch.optim.Optimizer) -> bool:
    """Whether a grad scaler has set ``grad_scale``/``found_inf`` on the optimizer for its step."""
    return getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None


def _one_kind(params: list) -> bool:
    """Real dense tensors of one device and dtype, their gradients alike: what a fused kernel takes."""
    kind = (params[0].device, params[0].dtype)
    return all((p.device, p.dtype) == kind and p.grad.layout == torch.strided and not p.is_complex()
               and (p.grad.device, p.grad.dtype) == kind for p in params)


def _direct_groups(opt: torch.optim.Optimizer, plain_group: Callable[[dict], bool],
                   plain_params: Callable[[list], bool] = _one_kind):
    """[(group, its parameters with a gradient)] for a direct call: every group that has a gradient
    passes ``plain_group``, its parameters with a gradient pass ``plain_params`` (by default one
    kind of tensor, ``_one_kind``), and no grad scaler's flags are on the optimizer. None otherwise."""
    if _scaler_flags(opt):
        return None
    calls = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if not plain_group(group) or not plain_params(params):
            return None
        calls.append((group, params))
    return calls


def _plain_fused_adam_group(group: dict) -> bool:
    """A group whose step is ``torch._fused_adam_`` with a float lr and nothing else around it."""
    return (group["fused"] is True and not group["capturable"] and not group["differentiable"]
            and not group.get("decoupled_weight_decay", False) and not isinstance(group["lr"], torch.Tensor))


@torch.no_grad()
def _fused_adam_step(opt: torch.optim.Optimizer) -> bool:
    """One step of a fused ``torch.optim.Adam`` whose groups each hold real dense tensors of one
    device and dtype, as torch's own step makes it: the same lazy state, the step counters advanced
    by one, one ``torch._fused_adam_`` per group with the group's hyperparameters (same kernel, same
    arguments: the same bits). torch's Python around the kernel (state lists rebuilt, tensors sorted by
    device and dtype per group) costs 30–60 µs per group on a meta-step, several times the kernel on
    φ's small tensors. Returns False, having changed nothing, for any other optimizer or group
    (including a grad scaler's ``grad_scale``/``found_inf`` on it): the caller then takes torch's step."""
    if type(opt) is not torch.optim.Adam:
        return False
    calls = _direct_groups(opt, _plain_fused_adam_group)
    if calls is None:
        return False
    state = opt.state
    steps = []
    for group, params in calls:
        for p in params:
            steps.append(_fused_adam_state(opt, group, p)["step"])
    if not calls:
        return True
    torch._foreach_add_(steps, 1)
    for group, params in calls:
        st = [state[p] for p in params]
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in st],
                           [s["exp_avg_sq"] for s in st], [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [],
                           [s["step"] for s in st], amsgrad=group["amsgrad"], lr=group["lr"], beta1=float(beta1),
                           beta2=float(beta2), weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=group["maximize"], grad_scale=None, found_inf=None)
    return True


def _fused_adam_state(opt: torch.optim.Adam, group: dict, p: torch.Tensor) -> dict:
    """``p``'s state in a fused ``torch.optim.Adam``, created as Adam._init_group creates it when empty."""
    state = opt.state[p]
    if len(state) == 0:
        _torch_optimizer._device_dtype_check_for_fused(p)
        state["step"] = torch.zeros((), dtype=_torch_optimizer._get_scalar_dtype(is_fused=True), device=p.device)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def dot_adam_step(opt: torch.optim.Optimizer, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                  segments: Sequence[int]) -> Optional[list[float]]:
    """The step of ``opt``, a fused ``torch.optim.Adam`` on one 1-D CPU parameter, whose gradient entry
    e is Σ ⟨a_i, b_i⟩ (float64) over the e-th run of ``segments[e]`` consecutive pairs: one native call,
    ``apo::dot_adam_step``, that forms the gradient and takes torch's step (its counter, then its kernel
    with the group's hyperparameters: the same bits as ``.grad`` set to that gradient and ``opt.step()``).
    ``.grad`` is not touched. Returns the gradient as floats, the step taken only when every entry is
    finite (nothing written otherwise). None, having changed nothing, where that is not ``opt.step()``:
    no native module, another optimizer or group (weight decay, amsgrad, maximize, a tensor lr), a pair
    off the CPU, someone listening to the step, a grad scaler's flags (the caller then sets ``.grad``
    and steps)."""
    op = backends.native_dot_adam_step
    if op is None or type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or not _quiet(opt):
        return None
    group = opt.param_groups[0]
    if (len(group["params"]) != 1 or _scaler_flags(opt) or not _plain_fused_adam_group(group) or group["amsgrad"]
            or group["weight_decay"] != 0 or group["maximize"]):
        return None
    param = group["params"][0]
    if not param.is_cpu or param.dim() != 1 or param.numel() != len(segments) or not all(
            t.is_cpu for t in (*a, *b)):
        return None
    state = _fused_adam_state(opt, group, param)
    beta1, beta2 = group["betas"]
    grad = op(list(a), list(b), list(segments), param, state["exp_avg"], state["exp_avg_sq"], state["step"],
              group["lr"], float(beta1), float(beta2), group["eps"]).tolist()
    if all(map(math.isfinite, grad)):
        _record_call(opt)
    return grad


def _plain_fused_sgd_group(group: dict) -> bool:
    """A group whose step is ``torch._fused_sgd_`` with a float lr and weight decay."""
    return (group["fused"] is True and not group["differentiable"] and not isinstance(group["lr"], torch.Tensor)
            and not isinstance(group["weight_decay"], torch.Tensor))


@torch.no_grad()
def _fused_sgd_step(opt: torch.optim.Optimizer) -> bool:
    """One step of a fused ``torch.optim.SGD`` as torch's own step makes it (``_fused_sgd``): per
    group one ``torch._fused_sgd_`` with the group's hyperparameters, on momentum buffers created
    empty (``is_first_step``: the kernel sets them to the gradient) when no parameter of the group has
    one yet, then stored in the state. Same kernel, same arguments: the same bits. torch's Python
    around it (the device and dtype sort, the per-parameter state walk) costs about as much as the
    kernel on a small model, on every plain step of APO-LR. Returns False, having changed nothing,
    for any other optimizer or group, a grad scaler's flags on it, or a group where only some
    parameters have a buffer (a gradient that appeared later): the caller then takes torch's step."""
    if type(opt) is not torch.optim.SGD:
        return False
    calls = _direct_groups(opt, _plain_fused_sgd_group)
    if calls is None:
        return False
    buffers = []
    for group, params in calls:
        if group["momentum"] == 0:
            buffers.append(None)
            continue
        bufs = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
        missing = sum(b is None for b in bufs)
        if 0 < missing < len(bufs) or any(b is not None and (b.device, b.dtype, b.shape) != (p.device, p.dtype, p.shape)
                                           for b, p in zip(bufs, params)):
            return False
        buffers.append(bufs)
    if calls and getattr(opt, "_need_device_dtype_check_for_fused", True):  # SGD._init_group's one check
        _torch_optimizer._device_dtype_check_for_fused(calls[0][1][0])
        opt._need_device_dtype_check_for_fused = False
    for (group, params), bufs in zip(calls, buffers):
        grads = [p.grad for p in params]
        first = bufs is not None and bufs[0] is None
        if first:
            bufs = [torch.empty_like(g) for g in grads]
        torch._fused_sgd_(params, grads, [] if bufs is None else bufs, weight_decay=group["weight_decay"],
                          momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                          nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=first,
                          grad_scale=None, found_inf=None)
        if bufs is not None:
            for p, b in zip(params, bufs):
                opt.state[p]["momentum_buffer"] = b
    return True


def _plain_single_tensor_sgd_group(group: dict) -> bool:
    """A group whose step is ``torch.optim.sgd._single_tensor_sgd`` on CPU: neither foreach nor fused
    asked for (torch's default picks the per-tensor step for CPU tensors), not differentiable."""
    return not group["foreach"] and not group["fused"] and not group["differentiable"]


@torch.no_grad()
def _single_tensor_sgd_step(opt: torch.optim.Optimizer) -> bool:
    """One step of a ``torch.optim.SGD`` whose step is torch's per-tensor loop (the default on CPU), as
    torch's own step makes it: per group ``torch.optim.sgd._single_tensor_sgd`` with the group's
    hyperparameters on the state's momentum buffers (None where a parameter has none yet: the
    function creates it), which are then stored in the state. The same function and arguments: the
    same bits. What it skips is torch's Python around it (the grad-mode wrapper, the state walk, the
    foreach/fused choice), 5–15 µs of a small model's plain step of APO-LR in the training loop. Returns
    False, having changed nothing, for a group that asks for foreach or fused, a parameter off the CPU
    (torch's default may pick foreach there), a sparse gradient, a grad scaler's flags on it, or a
    torch without that function: the caller then takes torch's step."""
    single = getattr(_torch_sgd, "_single_tensor_sgd", None)
    if type(opt) is not torch.optim.SGD or single is None:
        return False
    calls = _direct_groups(opt, _plain_single_tensor_sgd_group,
                           lambda params: all(p.is_cpu and p.grad.layout == torch.strided for p in params))
    if calls is None:
        return False
    for group, params in calls:
        momentum = group["momentum"]
        bufs = [opt.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        single(params, [p.grad for p in params], bufs, None, None, weight_decay=group["weight_decay"],
               momentum=momentum, lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
               maximize=group["maximize"], has_sparse_grad=False)
        for p, b in zip(params, bufs):
            opt.state[p]["momentum_buffer"] = b
    return True


def _plain_native_sgd_group(group: dict) -> bool:
    """A group ``apo::sgd_step`` steps as torch does: its per-tensor step (``_plain_single_tensor_sgd_group``)
    with float hyperparameters (a tensor lr is read back as a float by torch, another rounding)."""
    return _plain_single_tensor_sgd_group(group) and not any(
        isinstance(group[k], torch.Tensor) for k in ("lr", "momentum", "dampening", "weight_decay"))


@torch.no_grad()
def checked_sgd_step(opt: torch.optim.Optimizer, lrs: Sequence[float]) -> Optional[bool]:
    """A CPU ``torch.optim.SGD``'s step with group k's lr taken as ``lrs[k]``, taken only when every
    gradient is finite: True when taken, False (nothing written) when a gradient is not finite. One
    ``apo::sgd_step`` per group, bit for bit torch's per-tensor step (the CPU default), where the
    guard and the step were a check and three ATen ops per parameter. None, having changed nothing,
    where that call is not torch's step: no native module, another optimizer, a group asking for
    foreach or fused or with a tensor hyperparameter, a parameter off the CPU or a gradient in another
    dtype or layout, a parameter without a momentum buffer yet (the step that creates them is
    torch's), a grad scaler's flags, or someone listening to the step (hooks, a profiler, a wrapper of
    its step on the instance other than an lr scheduler's call counter, whose flag is set here as its
    wrapper sets it): the caller then checks and steps as before."""
    op = backends.native_sgd_step
    if op is None or type(opt) is not torch.optim.SGD or not _quiet(opt):
        return None
    groups = _direct_groups(opt, _plain_native_sgd_group, lambda params: all(
        p.is_cpu and p.grad.layout == torch.strided and p.grad.dtype == p.dtype for p in params))
    if groups is None:
        return None
    lr_of = {id(group): float(lr) for group, lr in zip(opt.param_groups, lrs)}
    calls = []
    for group, params in groups:
        bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
        if any(b is None for b in bufs):
            return None
        calls.append((group, params, [p.grad for p in params], bufs, lr_of[id(group)]))
    if len(calls) > 1 and not all_finite(g for _, _, grads, _, _ in calls for g in grads):
        return False  # every group checked before any is written
    for group, params, grads, bufs, lr in calls:
        if not op(params, grads, bufs, lr, group["momentum"], group["dampening"], group["weight_decay"],
                  group["nesterov"], group["maximize"]):
            return False
    _record_call(opt)
    return True


# with the separator: a user's folder named apo_kernels_examples/ or torchvision/ is not ours
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first frame outside apo_kernels and torch: the user's
    ``step`` call, however many decorators (no_grad, step hooks) wrap it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)

"""APO-LR: meta-learn the learning rate of any torch.optim optimizer with the proximal objective.

φ = log of the learnt lr (positive by construction; a scheduler on the base optimizer multiplies
it, see APOLR). For SGD (momentum, Nesterov, dampening, weight decay),
RMSprop (centered, momentum) and Adam/AdamW (amsgrad) the update is linear in lr:

    θ'(lr) = θ + lr · d,      d = the base optimizer's step with lr = 1 and its state frozen

so ∂Q/∂φ = lr · ⟨∇θ'Q, d⟩. ``d`` is computed here by the same formulas torch.optim uses (state is
read, never written); any other optimizer falls back to stepping it with lr = 1 on a saved copy of
its state and parameters (exact whenever its update is linear in lr, as for Adagrad, Adamax, …),
and with lr = 2 to check that it is. torch.optim's optimizers that are not linear in lr (LBFGS,
Rprop, ASGD, Adafactor: ``NOT_LINEAR_IN_LR``) are refused at construction.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._args import FLOAT32_MAX, check_bool, check_number, check_optimizer_state_shapes, check_type
from .._numerics import all_finite, loss_finite
from .._step_hooks import (checked_sgd_step, dot_adam_step, step_quietly, step_with_hooks, stock_zero_grad,
                           zero_grad_quietly)
from ..ops import backends
from ._core import (APOCore, _Plan, check_common_args, check_state_finite, momentum_catch_up,
                    with_load_state_dict_hooks, with_state_dict_hooks)
from .snapshot import LookaheadBuffers


def _cdtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _grad(p: Tensor, group: dict) -> Tensor:
    g = p.grad
    return -g if group.get("maximize", False) else g


def _sgd_coefficients(group: dict, has_buf: bool) -> tuple[float, float]:
    """(c_buf, c_g) of torch.optim.SGD's update for lr = 1, which is linear in (momentum buffer, ±g,
    θ): u = c_buf·buf + c_g·(±g) + c_g·wd·θ, so d = −u needs no intermediate. With g' = ±g + wd·θ: no
    momentum u = g'; new buffer b = μ·buf + (1−τ)·g' (b = g' when there is no buffer yet); u = b, or
    g' + μ·b with Nesterov."""
    mom, damp = group["momentum"], group["dampening"]
    if mom == 0:
        return 0.0, 1.0
    if not has_buf:
        return 0.0, (1.0 + mom if group["nesterov"] else 1.0)
    if group["nesterov"]:
        return mom * mom, 1.0 + mom * (1.0 - damp)
    return mom, 1.0 - damp


def _sgd_terms(group: dict, has_buf: bool, scale: float) -> tuple[float, float, float]:
    """(a, b, c) with scale·d = a·g + b·buf + c·θ for torch.optim.SGD's step at lr = 1
    (``_sgd_coefficients``, with maximize's sign and the weight decay folded in); c = 0 without
    weight decay."""
    c_buf, c_g = _sgd_coefficients(group, has_buf)
    sign = -1.0 if group.get("maximize", False) else 1.0
    return -scale * sign * c_g, -scale * c_buf, -scale * c_g * group["weight_decay"]


def _sgd_directions(params: list[Tensor], group: dict, opt_state: dict, scale: float,
                    buffers: Optional[LookaheadBuffers] = None) -> list[Tensor]:
    """scale · d per parameter of one group for torch.optim.SGD, one pass per term. The parameters
    that share coefficients (all with a momentum buffer, or all without) and gradient dtype are done
    together, one foreach op per term: the same per-element arithmetic as one op per parameter, for
    a few dispatches in all. d is in the compute dtype (a half-precision gradient is upcast first),
    written into ``buffers`` when given (fresh tensors otherwise)."""
    mom = group["momentum"]
    sets: dict[tuple[bool, bool], list[tuple[int, Tensor, Optional[Tensor]]]] = {}
    for i, p in enumerate(params):
        buf = opt_state.get(p, {}).get("momentum_buffer") if mom != 0 else None
        sets.setdefault((buf is not None, p.grad.dtype == _cdtype(p.grad)), []).append((i, p, buf))
    out: list[Optional[Tensor]] = [None] * len(params)
    for (has_buf, in_cdtype), members in sets.items():
        a, b, c = _sgd_terms(group, has_buf, scale)
        index, ps, bufs = zip(*members)
        if buffers is not None:  # the same arithmetic into memory kept from one meta-step to the next
            ds = [buffers.for_param(p, _cdtype(p.grad)) for p in ps]
            for p, d in zip(ps, ds):
                if in_cdtype:
                    torch.mul(p.grad, a, out=d)
                else:
                    d.copy_(p.grad).mul_(a)
        elif in_cdtype:
            ds = torch._foreach_mul([p.grad for p in ps], a)
        else:  # upcast copies, scaled in place
            ds = [p.grad.to(_cdtype(p.grad)) for p in ps]
            torch._foreach_mul_(ds, a)
        if b != 0.0:
            torch._foreach_add_(ds, list(bufs), alpha=b)
        if c != 0:
            torch._foreach_add_(ds, [p.detach() for p in ps], alpha=c)
        for i, d in zip(index, ds):
            out[i] = d
    return out


def fused_sgd_lookahead(optimizer: torch.optim.Optimizer, params_by_group: list[list[Tensor]], scales: list[float],
                        buffers: LookaheadBuffers):
    """APO-LR's lookahead for torch.optim.SGD in one native pass: (Δ's buffers per group, form) where
    ``form(values, out) -> ‖Δ‖²`` writes Δ = scale·d into the buffers (``_sgd_terms``, the terms of
    ``_sgd_directions`` in the same order) and θ + Δ into out, ``apo::sgd_lookahead``: one
    read of g, the momentum buffer and θ, one write of Δ and θ', where forming Δ first read g and the
    buffer, wrote Δ, then read Δ and θ again. ``values`` and ``out`` follow the groups' parameter order.
    The gradients are taken now (the lookahead sets ``.grad`` aside before it forms Δ). None where the
    op does not apply: no native module, another optimizer, a tensor hyperparameter, a parameter off
    the CPU, or a gradient not in its compute dtype (the caller forms Δ first, ``lr_directions``)."""
    op = backends.native_sgd_lookahead
    if op is None or _kind(optimizer) != "sgd":
        return None
    calls, deltas, grads = [], [], []
    for group, params, scale in zip(optimizer.param_groups, params_by_group, scales):
        mom = group["momentum"]
        if any(isinstance(group[k], Tensor) for k in ("weight_decay", "momentum", "dampening")):
            return None
        sets: dict[bool, list[tuple[int, Optional[Tensor]]]] = {}
        for p in params:
            if not p.is_cpu or p.grad.dtype != _cdtype(p.grad) or p.grad.dtype != p.dtype:
                return None
            buf = optimizer.state.get(p, {}).get("momentum_buffer") if mom != 0 else None
            sets.setdefault(buf is not None, []).append((len(grads), buf))
            grads.append(p.grad)
            deltas.append(buffers.for_param(p))
        for has_buf, members in sets.items():
            a, b, c = _sgd_terms(group, has_buf, scale)
            calls.append(([i for i, _ in members], [m for _, m in members] if b != 0.0 else [], a, b, c))

    def form(values: list[Tensor], out: list[Tensor]) -> float:
        total = 0.0
        for index, bufs, a, b, c in calls:
            total += float(op([values[i] for i in index], [grads[i] for i in index], bufs, a, b, c,
                              [deltas[i] for i in index], [out[i] for i in index]))
        return total

    by_group, k = [], 0
    for params in params_by_group:
        by_group.append(deltas[k:k + len(params)])
        k += len(params)
    return by_group, form


def _rmsprop_direction(p: Tensor, group: dict, state: dict) -> Tensor:
    g = _grad(p, group)
    alpha, eps, wd, mom = group["alpha"], group["eps"], group["weight_decay"], group["momentum"]
    if wd != 0:
        g = g.add(p, alpha=wd)
    sq = state.get("square_avg")
    sq = torch.zeros_like(p) if sq is None else sq
    sq = sq.mul(alpha).addcmul_(g, g, value=1 - alpha)
    if group["centered"]:
        ga = state.get("grad_avg")
        ga = torch.zeros_like(p) if ga is None else ga
        ga = ga.lerp(g, 1 - alpha)
        avg = sq.addcmul(ga, ga, value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(eps)
    if mom > 0:
        buf = state.get("momentum_buffer")
        buf = torch.zeros_like(p) if buf is None else buf
        return -buf.mul(mom).addcdiv_(g, avg)
    return -(g / avg)


def _adam_direction(p: Tensor, group: dict, state: dict, decoupled: bool) -> Tensor:
    g = _grad(p, group)
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    extra = None
    if wd != 0:
        if decoupled:
            extra = p.mul(-wd)  # θ(1 − lr·wd) = θ + lr·(−wd·θ)
        else:
            g = g.add(p, alpha=wd)
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    m = torch.zeros_like(p) if m is None else m
    v = torch.zeros_like(p) if v is None else v
    m = m.lerp(g, 1 - beta1)
    v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
    step = float(state["step"]) + 1.0 if "step" in state else 1.0
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    if group.get("amsgrad", False):
        vmax = state.get("max_exp_avg_sq")
        v = v if vmax is None else torch.maximum(vmax, v)
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    d = -(m / bc1) / denom
    return d if extra is None else d + extra


def _sum_of_dots(xs: list[Tensor], ys: list[Tensor]) -> float:
    """Σ ⟨x_i, y_i⟩ as a Python float: tensors on one device in one call of the native ``apo::dot_sum``
    (products and sums in float64), else a dot per pair, summed in float64 in order."""
    if not xs:
        return 0.0
    if backends.native_dot_sum is not None:
        try:
            return float(backends.native_dot_sum(xs, ys))
        except ValueError:  # tensors on several devices: a dot per pair below
            pass
    total = 0.0
    for x, y in zip(xs, ys):
        total += float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()))
    return total


def _is_decoupled(opt, group) -> bool:
    return bool(group.get("decoupled_weight_decay", False)) or isinstance(opt, torch.optim.AdamW)


def _kind(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """"sgd" / "rmsprop" / "adam" for the optimizers whose step is written out here (exact types:
    a subclass may change the step), else None."""
    return {torch.optim.SGD: "sgd", torch.optim.RMSprop: "rmsprop",
            torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}.get(type(optimizer))


def _eps_underflow(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """What is wrong when an Adam/RMSprop group's eps rounds to 0 in its parameters' dtype (float16
    and eps below 3e-8, half its smallest subnormal): the step divides by 0 wherever a second
    moment underflows; else None."""
    if _kind(optimizer) not in ("adam", "rmsprop"):
        return None
    for k, group in enumerate(optimizer.param_groups):
        eps = float(group["eps"])
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            if dtype.itemsize < 4 and eps != 0.0 and torch.tensor(eps, dtype=dtype).item() == 0.0:
                return (f"param group {k}'s eps={eps:g} is 0 in {str(dtype).replace('torch.', '')}: the step "
                        f"divides by 0 wherever a second moment underflows; use eps >= "
                        f"{torch.finfo(dtype).smallest_normal:.0e} or float32 parameters")
    return None


def _check_not_maximizing(optimizer: torch.optim.Optimizer) -> None:
    """A meta-step learns the lr that minimizes the closure's loss at the lookahead. A group with
    ``maximize=True`` ascends that loss, so the meta-step would shrink its lr toward 0 every time:
    refused by name rather than learnt wrong."""
    for k, g in enumerate(optimizer.param_groups):
        if g.get("maximize", False):
            raise ValueError(f"base_optimizer: param group {k} has maximize=True, but APO-LR learns the lr that "
                             "minimizes the closure's loss, so it would shrink this lr toward 0; return the "
                             "negated objective from the closure and keep maximize=False (or meta_interval=0)")


def _scaled(d: Tensor, scale: float) -> Tensor:
    d = d.to(_cdtype(d))  # d is fresh: scaled in place
    return d if scale == 1.0 else d.mul_(scale)


@torch.no_grad()
def lr_directions(optimizer: torch.optim.Optimizer, params_by_group: list[list[Tensor]],
                  scales: Optional[list[float]] = None,
                  buffers: Optional[LookaheadBuffers] = None) -> list[list[Tensor]]:
    """d per parameter (per group): the base optimizer's step for lr = 1, its state untouched;
    times ``scales[k]`` for group k when given (formed with d, no extra pass for SGD).

    ``params_by_group[k]`` lists group k's parameters that have a ``.grad``. Returns tensors of
    each parameter's shape in float32 (float64 for float64 parameters) that the caller may modify:
    freshly allocated, or for SGD, when ``buffers`` (a ``LookaheadBuffers``) is given, that
    object's buffers, rewritten by the next call with it. Exact formulas for SGD/RMSprop/Adam/AdamW,
    else a generic probe.
    """
    kind = _kind(optimizer)
    scales = [1.0] * len(params_by_group) if scales is None else [float(s) for s in scales]
    if kind is None:
        return [[_scaled(d, s) for d in dirs]
                for dirs, s in zip(_generic_directions(optimizer, params_by_group), scales)]
    out = []
    for group, params, scale in zip(optimizer.param_groups, params_by_group, scales):
        if kind == "sgd":
            out.append(_sgd_directions(params, group, optimizer.state, scale, buffers))
            continue
        dirs = []
        for p in params:
            st = optimizer.state.get(p, {})
            if kind == "rmsprop":
                dirs.append(_scaled(_rmsprop_direction(p, group, st), scale))
            else:
                dirs.append(_scaled(_adam_direction(p, group, st, _is_decoupled(optimizer, group)), scale))
        out.append(dirs)
    return out


# how far (in log) the learnt lr may move from its initial value: e^700 ≈ 1e304, short of where exp
# overflows (e^709.8) or underflows
LOG_LR_REACH = 700.0

# torch.optim optimizers whose update is not lr times a direction that lr does not change
NOT_LINEAR_IN_LR = {
    torch.optim.LBFGS: "LBFGS's update is not linear in lr (a line search per step)",
    torch.optim.Rprop: "Rprop's lr is only its first step size (its per-entry step sizes adapt in its state)",
    torch.optim.ASGD: "ASGD's step size eta is kept in its state and decays nonlinearly in lr",
}
if hasattr(torch.optim, "Adafactor"):
    NOT_LINEAR_IN_LR[torch.optim.Adafactor] = "Adafactor's step is min(lr, 1/√t) times a relative step"

# the generic probe's test of linearity: a step at lr = 2 must be twice the step at lr = 1 within
# this fraction, beyond the parameters' own rounding (a few ulps of θ per entry)
LINEARITY_RTOL = 0.1


@torch.no_grad()
def _generic_directions(optimizer, params_by_group):
    """Step a saved copy with lr = 1 and with lr = 2 and read Δθ; restores parameters, state and lr
    exactly. An update that is not linear in lr (the step at lr = 2 is not twice the one at lr = 1)
    is refused with a TypeError naming base_optimizer: θ + lr·d would not be its lookahead."""
    all_params = [p for ps in params_by_group for p in ps]
    d1 = _probe_step(optimizer, all_params, 1.0)
    d2 = _probe_step(optimizer, all_params, 2.0)
    off = math.sqrt(sum(float((b.double() - 2.0 * a.double()).square().sum()) for a, b in zip(d1, d2)))
    size = math.sqrt(sum(float((2.0 * a.double()).square().sum()) for a in d1))
    rounding = 4.0 * math.sqrt(sum(float((torch.finfo(p.dtype).eps * p.double()).square().sum())
                                   for p in all_params))
    if math.isfinite(off) and math.isfinite(size) and off > LINEARITY_RTOL * size + rounding:
        raise TypeError(f"base_optimizer: {type(optimizer).__name__}'s step at lr = 2 is {off / max(size, 1e-300):.3g} "
                        f"(relative) away from twice its step at lr = 1; APO-LR's lookahead θ + lr·d needs an "
                        f"update linear in lr")
    out, k = [], 0
    for ps in params_by_group:
        out.append(d1[k:k + len(ps)])
        k += len(ps)
    return out


def _probe_step(optimizer, params: list[Tensor], lr: float) -> list[Tensor]:
    """Δθ of one step of ``optimizer`` with every group's lr set to ``lr``; parameters, state and lr
    are restored exactly."""
    values = [p.detach().clone() for p in params]
    saved_state = {p: copy.deepcopy(optimizer.state[p]) for p in params if p in optimizer.state}
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        return [p.detach() - v for p, v in zip(params, values)]
    finally:
        for p, v in zip(params, values):
            p.copy_(v)
        for p in params:
            if p in saved_state:
                optimizer.state[p] = saved_state[p]
            else:
                optimizer.state.pop(p, None)
        for g, v in zip(optimizer.param_groups, saved_lr):
            g["lr"] = v


class _LRPlan(_Plan):
    def __init__(self, params_by_group):
        self.params_by_group = params_by_group
        self.params = [p for ps in params_by_group for p in ps]
        self.deltas = None  # Δ per group, set by the lookahead


class APOLR(APOCore):
    """Adapt the learning rate of ``base_optimizer`` with APO (Algorithm 1, φ = log of the learnt lr).

    Args:
        model: the module being trained (called for the FSD term; its buffers are restored).
        base_optimizer: a torch.optim optimizer over (some of) ``model``'s parameters, every param
            group with an ``lr``. Its own ``step`` performs the real update.
        lambda_fsd, lambda_wsd: weights of the function- and weight-space proximity terms.
        meta_lr: step of the meta-optimizer on log lr (0.1: the lr moves by about 10% per meta-step).
        meta_interval: a meta-step every this many steps (0: never).
        fsd: "kl" (logits), "mse" (regression), "bernoulli" (multi-label logits) or a
            callable(new_out, old_out) -> scalar.
        per_group: one learnt lr per param group (True) or one shared log-scale for all groups,
            which keeps the groups' lr ratios (False, default).
        meta_batch: "same" (Algorithm 1) or "fresh" — ablation: the lookahead loss uses
            ``step(..., meta_closure=...)`` on another batch (short-horizon bias, App. D).
        grad_scaler: a torch.amp.GradScaler whose ``scale(loss).backward()`` the closure uses.
        min_lr, max_lr: optional clamps on the learnt lr (numbers > 0, min_lr <= max_lr).

    APOLR is a torch.optim.Optimizer (the base it shares with APOPrecond) whose ``param_groups``
    and ``state`` ARE the base optimizer's (the same objects): a scheduler, a step hook or a
    hyperparameter change applies to either alike. Groups are fixed at construction (φ has one
    entry per group): ``add_param_group`` raises.

    Learning-rate schedulers compose as a multiplier. A torch.optim.lr_scheduler on
    ``base_optimizer`` (or on APOLR) owns ``param_groups[k]["lr"]``; APO-LR learns its own lr per group
    (initialised to the group's initial lr: its "initial_lr" if a scheduler recorded one, else its
    lr at construction). The base optimizer steps with

        effective lr = learnt lr × param_groups[k]["lr"] / initial lr

    swapped into the group for its ``step`` only, so chainable and closed-form schedulers alike see
    their own schedule in the group. The lookahead uses the learnt lr without the schedule's factor:
    the meta-step learns the greedy lr at the base step, and a decay cannot be learnt back.

    The meta-step minimizes the closure's loss, so a base optimizer that ascends it (a group with
    ``maximize=True``) is refused while meta-steps are on: return the negated objective instead.

    A lookahead that is not finite means the lr is too large to evaluate: the learnt lr is divided
    by 10 and the meta-step retried (``recoveries``; see ``apo_kernels.optim._core``). Unless the base
    optimizer's direction at lr = 1 is itself not finite (float16 Adam with an eps that is 0 in
    float16): no lr helps then, so the step is skipped with a RuntimeWarning and the lr kept.

    Attributes:
        lr: the effective lr of group 0 (what the next real step uses); ``lrs`` all groups'.
        learnt_lrs: the learnt lr per group (the effective lr without the schedule's factor).
        lr_history: list of (step, [learnt lr per group]) — the initial lrs and one entry per
            meta-step or recovery.
        skipped_steps, recoveries, meta_steps, last_meta (Q and its terms at the latest meta-step).

    φ is float64 (a scalar per group: exact enough that exp(log lr) never drifts, and free).
    """

    # ∂Q/∂log lr = ⟨∇θ'Q, Δ⟩ with Δ finite: a NaN or inf in ∇θ'Q makes it NaN or inf, which the
    # meta-gradient's check catches, so ∇θ'Q needs no pass of its own
    CHECK_LOOKAHEAD_GRADS = False

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        lambda_fsd: float,
        lambda_wsd: float,
        meta_lr: float = 0.1,
        meta_interval: int = 10,
        fsd: Union[str, Callable] = "kl",
        per_group: bool = False,
        meta_batch: str = "same",
        grad_scaler=None,
        min_lr: Optional[float] = None,
        max_lr: Optional[float] = None,
    ):
        check_common_args(model, lambda_fsd, lambda_wsd, meta_lr, meta_interval, fsd, meta_batch, grad_scaler)
        check_bool("per_group", per_group)
        bounds = {}
        for name, v in (("min_lr", min_lr), ("max_lr", max_lr)):
            bounds[name] = None if v is None else check_number(name, v, low=0.0, low_ok=False, high=FLOAT32_MAX)
        if None not in bounds.values() and bounds["min_lr"] > bounds["max_lr"]:
            raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr} > max_lr={max_lr}")
        check_type("base_optimizer", base_optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        if type(base_optimizer) in NOT_LINEAR_IN_LR:  # APO-LR's lookahead is θ + lr·d
            raise TypeError(f"base_optimizer: {NOT_LINEAR_IN_LR[type(base_optimizer)]}; it is not supported")
        model_params = {id(p) for p in model.parameters()}
        for k, g in enumerate(base_optimizer.param_groups):
            if "lr" not in g:
                raise ValueError(f"base_optimizer: param group {k} has no 'lr' hyperparameter")
            for key in ("lr", "initial_lr"):
                lr = float(g.get(key, 1.0))
                if not lr > 0.0 or not math.isfinite(lr):
                    raise ValueError(f"{key} of base_optimizer's param group {k} must be a finite number > 0 "
                                     f"(APO-LR learns log lr), got {lr}")
            for p in g["params"]:
                if id(p) not in model_params:
                    raise ValueError("base_optimizer holds a parameter that is not one of model.parameters()")
        if meta_interval > 0:
            _check_not_maximizing(base_optimizer)
        hint = _eps_underflow(base_optimizer)
        if hint is not None:  # its own steps would write NaN into θ: the plain steps are its steps
            warnings.warn(f"base_optimizer: {hint}", UserWarning, stacklevel=2)
        torch.optim.Optimizer.__init__(self, [{"params": list(g["params"])} for g in base_optimizer.param_groups], {})
        # one set of groups and one per-parameter state, the base optimizer's: a scheduler on either
        # optimizer schedules both, and a hyperparameter set in one group is set in both
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self.model = model
        self.base_optimizer = base_optimizer
        self.lambda_fsd, self.lambda_wsd = float(lambda_fsd), float(lambda_wsd)
        self.meta_interval, self.fsd, self.meta_batch = meta_interval, fsd, meta_batch
        self.grad_scaler = grad_scaler
        self.per_group = per_group
        self.min_lr, self.max_lr = bounds["min_lr"], bounds["max_lr"]
        # the initial lr per group: where the learnt lr starts, and the schedule's reference
        self._lr0 = [float(g.get("initial_lr", g["lr"])) for g in base_optimizer.param_groups]
        init = [math.log(lr) for lr in self._lr0] if self.per_group else [math.log(self._lr0[0])]
        self.log_lr = torch.tensor(init, dtype=torch.float64)  # φ
        self._log_lr0 = init  # φ₀ as floats: every read of φ − φ₀ would otherwise read a tensor back too
        self.meta_lr = float(meta_lr)
        self.meta_optimizer = self._make_meta_optimizer()
        self._init_core()
        self._direction_buffers = LookaheadBuffers()  # Δ of every meta-step (SGD) is written here
        self.lr_history: list[tuple[int, list[float]]] = [(0, self.learnt_lrs)]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_factors_cache", None)  # keyed by tensor versions, which a copy does not keep
        return state

    def _make_meta_optimizer(self) -> torch.optim.Optimizer:
        # fused: torch's one kernel on φ's scalars, which ``dot_adam_step`` (else ``step_quietly``) calls directly
        return torch.optim.Adam([self.log_lr], lr=self.meta_lr, betas=(0.0, 0.9), fused=True)

    # ---- public ------------------------------------------------------------------------
    @property
    def phi(self) -> list[Tensor]:
        """The meta-learnt tensors: [log_lr] (shape (groups,) or (1,), float64)."""
        return [self.log_lr]

    def _learnt_factors(self) -> list[float]:
        """learnt lr / its initial value per group: exp(φ − φ₀), exactly 1 until φ moves. Kept until
        φ changes (any in-place write moves a tensor's version) or φ₀ is replaced: every step reads it,
        and a read of φ back to Python costs more there than the rest of the lr swap."""
        cached = getattr(self, "_factors_cache", None)
        if cached is not None and cached[0] == self._factors_key():
            return cached[1]
        return self._keep_factors(self.log_lr.tolist())

    def _factors_key(self) -> tuple:
        return id(self.log_lr), self.log_lr._version, id(self._log_lr0)

    def _keep_factors(self, values: list[float]) -> list[float]:
        """The factors of φ's ``values`` (just read from it), kept for φ as it is now."""
        f = [math.exp(v - v0) for v, v0 in zip(values, self._log_lr0)]  # float64 either way
        f = f if self.per_group else f * len(self._lr0)
        self._factors_cache = (self._factors_key(), f)
        return f

    @property
    def learnt_lrs(self) -> list[float]:
        """The learnt lr per param group (without a scheduler's factor)."""
        return [lr0 * f for lr0, f in zip(self._lr0, self._learnt_factors())]

    @property
    def lrs(self) -> list[float]:
        """The effective lr per group: learnt lr × param_groups[k]["lr"] / initial lr (what the base
        optimizer steps with). Formed as the group's lr × exp(φ − φ₀), so it is the group's (scheduled)
        lr exactly while φ has not moved."""
        return [float(g["lr"]) * f for g, f in zip(self.base_optimizer.param_groups, self._learnt_factors())]

    @property
    def lr(self) -> float:
        return self.lrs[0]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if stock_zero_grad(self.base_optimizer):
            zero_grad_quietly(self.base_optimizer, set_to_none)
        else:
            self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @step_with_hooks
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, *, fsd_inputs=None, meta_closure=None):
        """One step of Algorithm 1; returns the closure's loss (None without a closure).

        Without a closure the gradients already in ``.grad`` are used — allowed only on steps
        with no meta-update (``meta_due()`` is False). ``fsd_inputs``: a tuple of inputs for
        ``model(*fsd_inputs)`` (needed when lambda_fsd != 0 on a meta-step).
        """
        if len(self.base_optimizer.param_groups) != len(self._lr0):  # a group added to it since
            raise ValueError(f"base_optimizer: {len(self.base_optimizer.param_groups)} param groups where APOLR was "
                             f"built for {len(self._lr0)}; φ holds one learnt lr per group, fixed at construction: "
                             f"build APOLR after the base optimizer's last add_param_group")
        if self.meta_due():  # a group's hyperparameters may have changed since construction
            _check_not_maximizing(self.base_optimizer)
        return self._run_step(closure, fsd_inputs, meta_closure)

    # ---- hooks ---------------------------------------------------------------------------
    def _all_params(self):
        return [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def _scaler_target(self):
        return self.base_optimizer

    def _device_type(self) -> str:
        return self.base_optimizer.param_groups[0]["params"][0].device.type

    def _prepare(self):
        return _LRPlan([[p for p in g["params"] if p.grad is not None] for g in self.base_optimizer.param_groups])

    def _lookahead_scales(self, plan) -> list[float]:
        # Δ = learnt lr·c·d, c the momentum catch-up factor. ⟨∇θ'Q, Δ⟩ stays ∂Q/∂log lr (Δ is linear in lr).
        return [lr * self._catch_up(group, params) for lr, group, params in
                zip(self.learnt_lrs, self.base_optimizer.param_groups, plan.params_by_group)]

    def _lookahead_deltas(self, plan):
        scales = self._lookahead_scales(plan)
        fused = fused_sgd_lookahead(self.base_optimizer, plan.params_by_group, scales, self._direction_buffers)
        if fused is not None:  # Δ formed in the pass that writes θ'
            plan.deltas, plan.form_deltas = fused
        else:
            plan.deltas = lr_directions(self.base_optimizer, plan.params_by_group, scales, self._direction_buffers)
        return [d for ds in plan.deltas for d in ds]

    def _no_step_size_helps(self, plan) -> Optional[str]:
        # Δ = lr·c·d: when d itself (lr = 1) is not finite, no learnt lr makes θ' finite
        with self._no_autocast():
            directions = [d for ds in lr_directions(self.base_optimizer, plan.params_by_group) for d in ds]
        if all_finite(directions):
            return None
        why = (f"the base optimizer's ({type(self.base_optimizer).__name__}) step direction is not finite "
               "although every gradient is, so no learning rate makes the lookahead finite")
        hint = _eps_underflow(self.base_optimizer)
        return why if hint is None else f"{why} ({hint})"

    def _catch_up(self, group: dict, params: list) -> float:
        """The lookahead judges the step a warmed-up momentum buffer will take (``momentum_catch_up``)."""
        mom = float(group.get("momentum", 0.0) or 0.0)
        if mom == 0.0 or not params:
            return 1.0
        state = self.base_optimizer.state.get(params[0], {})
        if "momentum_buffer" not in state or state["momentum_buffer"] is None:
            k = 1  # this step creates the buffer
        elif "step" in state:  # RMSprop counts its steps
            k = int(state["step"]) + 1
        else:  # torch.optim.SGD does not: the steps taken through this optimizer
            k = self._apo_step + 1
        kind = _kind(self.base_optimizer)
        if kind == "sgd":
            return momentum_catch_up(mom, k, dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]))
        if kind == "rmsprop":
            return momentum_catch_up(mom, k, starts_at_grad=False)
        return 1.0

    def _meta_gradient_terms(self, plan) -> tuple[list[Tensor], list[int]]:
        """Δ of every parameter in order, and how many of them each learnt lr's sum takes: ∂Q/∂log lr_k =
        lr_k · Σ_{p in group k} ⟨∇θ'Q_p, d_p⟩ = Σ ⟨∇θ'Q_p, Δ_p⟩, a group's run each, or one run of every
        parameter for one lr over all groups. Both ways of forming the meta-gradient sum these runs, so
        they agree to the bit."""
        deltas = [d for ds in plan.deltas for d in ds]
        return deltas, ([len(ds) for ds in plan.deltas] if self.per_group else [len(deltas)])

    def _meta_backward(self, plan, dQ) -> bool:
        dQ = list(dQ)
        deltas, runs = self._meta_gradient_terms(plan)
        grads, k = [], 0
        for n in runs:
            grads.append(_sum_of_dots(dQ[k:k + n], deltas[k:k + n]))
            k += n
        self.log_lr.grad = torch.tensor(grads, dtype=torch.float64)
        return all(map(math.isfinite, grads))  # read off the Python floats: no check of its own

    def _meta_backward_and_step(self, plan, dQ) -> Optional[bool]:
        # the sums of _meta_backward and φ's Adam step in one native call (dot_adam_step), where the
        # meta-optimizer's step is torch's fused kernel: cold after the lookahead's backward, the dot, the
        # gradient tensor and torch's step were four calls and its Python
        deltas, runs = self._meta_gradient_terms(plan)
        grads = dot_adam_step(self.meta_optimizer, list(dQ), deltas, runs)
        return None if grads is None else all(map(math.isfinite, grads))

    def _clamp_and_record(self):
        # φ stays within ±LOG_LR_REACH of φ₀, where exp(φ − φ₀) is a finite, nonzero double, and the learnt
        # lr at most the largest float32, which torch's steps take for float32 parameters: one meta-step of
        # a huge meta_lr could carry φ past either (an OverflowError in the lr swap, a RuntimeError in the
        # base step), and shrinks past the other end (an lr of exactly 0, which no meta-gradient moves)
        lo = -math.inf if self.min_lr is None else math.log(self.min_lr)
        hi = math.log(FLOAT32_MAX) - 1e-6  # (a margin: lr0·exp(φ − φ₀) rounds)
        hi = hi if self.max_lr is None else min(hi, math.log(self.max_lr))
        values = self.log_lr.tolist()
        clamped = [min(max(v, v0 - LOG_LR_REACH, lo), v0 + LOG_LR_REACH, hi) for v, v0 in zip(values, self._log_lr0)]
        if clamped != values:
            self.log_lr.copy_(torch.tensor(clamped, dtype=self.log_lr.dtype))
        self._keep_factors(clamped)  # (the values φ now holds: the learnt lrs need no second read)
        self.lr_history.append((self._apo_step, self.learnt_lrs))

    def _after_meta_step(self):
        self._clamp_and_record()

    def _shrink_phi(self, factor: float):
        self.log_lr.add_(math.log(factor))
        self._clamp_and_record()

    def _checked_plain_update(self, loss, plan) -> Optional[bool]:
        # SGD: the gradient check and its step in one native call per group (checked_sgd_step)
        if not loss_finite(loss):
            return False
        return checked_sgd_step(self.base_optimizer, self.lrs)

    def _apply(self, plan) -> bool:
        # SGD: its step with the effective lr passed to it, where checked_sgd_step applies
        done = checked_sgd_step(self.base_optimizer, self.lrs)
        if done is not None:
            return done
        # the effective lr only for the base optimizer's step; the scheduler's values are restored
        saved = [g["lr"] for g in self.base_optimizer.param_groups]
        saved = [v.clone() if isinstance(v, Tensor) else v for v in saved]
        try:
            for g, lr in zip(self.base_optimizer.param_groups, self.lrs):
                if isinstance(g["lr"], Tensor):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
            step_quietly(self.base_optimizer)  # its hooks and a profiler still see the step
        finally:
            for g, v in zip(self.base_optimizer.param_groups, saved):
                if isinstance(v, Tensor):
                    g["lr"].copy_(v)
                else:
                    g["lr"] = v
        return True

    # ---- state -----------------------------------------------------------------------------
    def _check_base_state_shapes(self, base_state: dict) -> None:
        """For the optimizers whose step is written out here, every saved buffer has its
        parameter's shape (torch.optim loads any shape and fails at a later step)."""
        if _kind(self.base_optimizer) is None:
            return
        check_optimizer_state_shapes(base_state, [p for g in self.base_optimizer.param_groups for p in g["params"]],
                                     lambda p, key: p.shape, "the base optimizer's ")

    @with_state_dict_hooks
    def state_dict(self) -> dict:
        """Base optimizer state, φ, meta-optimizer, counters and the lr history."""
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "log_lr": self.log_lr.clone(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            **self._core_state(),
            "lr_history": [(s, list(l)) for s, l in self.lr_history],
            "lr0": list(self._lr0),
        }

    @with_load_state_dict_hooks
    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; tensors are mapped to this optimizer's devices. A state that
        does not fit this optimizer (another kind, other groups, another model's shapes) is refused
        before anything is loaded."""
        self._check_state_keys(state, ("base_optimizer", "log_lr", "meta_optimizer", "lr_history", "lr0"))
        if tuple(state["log_lr"].shape) != tuple(self.log_lr.shape):
            raise ValueError(f"state_dict: {tuple(state['log_lr'].shape)[0]} learnt lr(s) where "
                             f"{self.log_lr.numel()} expected (per_group={self.per_group}, "
                             f"{len(self.param_groups)} param groups)")
        self._check_base_state_shapes(state["base_optimizer"])
        check_state_finite({"log_lr": state["log_lr"],
                            "base_optimizer['state']": state["base_optimizer"].get("state", {}),
                            "meta_optimizer['state']": state["meta_optimizer"].get("state", {})})
        self.base_optimizer.load_state_dict(state["base_optimizer"])
        # torch.optim's load builds new param_groups and state objects: share them again, or a
        # scheduler on this optimizer would schedule groups the base optimizer no longer reads
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        with torch.no_grad():
            self.log_lr.copy_(state["log_lr"].to(self.log_lr.device, self.log_lr.dtype))
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self._load_core_state(state)
        self.lr_history = [(s, list(l)) for s, l in state["lr_history"]]
        self._lr0 = list(state["lr0"])
        self._log_lr0 = [math.log(lr) for lr in self._lr0] if self.per_group else [math.log(self._lr0[0])]

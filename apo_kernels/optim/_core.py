"""The step loop shared by APOLR and APOPrecond (Algorithm 1 of APO, torch.optim closure style).

A subclass supplies these hooks; only ``_apply`` and ``_shrink_phi`` mutate state:

    _prepare()              -> plan         everything derived from the current ``.grad`` (at θ);
                                            independent of φ, so it serves lookahead and update
    _lookahead_deltas(plan) -> list[Tensor] Δ(φ) per parameter of ``plan.params``: θ' = θ + Δ
    _meta_backward(plan, dQ) -> bool|None  set ``.grad`` of φ from ∇θ'Q (list like the deltas);
                                            whether it is finite where the subclass knows, else
                                            None (then it is checked here)
    _meta_backward_and_step(plan, dQ)       on one process, the meta-gradient and φ's step in one
        -> bool|None                        call where the subclass has one (False: not finite,
                                            nothing written), else None (the default)
    _apply(plan) -> bool                    the real update θ ← u(θ, φ, B) with the (new) φ, and
                                            its state update; False (nothing written) when the
                                            update it would write is not finite
    _shrink_phi(factor)                     multiply φ's step size by factor < 1 (a recovery)
    _no_step_size_helps(plan) -> str|None   after a non-finite lookahead: why no step size can make
                                            it finite (then φ is kept and the step skipped), or None
    _checked_plain_update(loss, plan)       a step without a meta-update: the check of the loss and
        -> bool|None                        gradients at θ and ``_apply`` in one pass where the subclass
                                            has one (True: applied; False: not finite, nothing
                                            written), else None (checked, then applied, as on a
                                            meta-step)

Recoveries: a step too large to evaluate is information, not an error.
- A non-finite lookahead, meta-objective or meta-gradient: φ's step size is multiplied by SHRINK
  (0.1).
- While the step size is not yet validated (the first meta-step, and the first after any
  recovery; same-batch meta-steps only), a lookahead worse than not stepping, Q(Δ) > Q(0) = J_B(θ), along a descent direction:
  the step is multiplied by t* ∈ [0.01, 1/2), the minimum of the quadratic along Δ through Q(0),
  its slope ⟨∇J_B(θ), Δ⟩ and Q(Δ) (``_overshoot_factor``), i.e. the step is shortened as far as a
  quadratic model says it is too long. Later meta-steps leave this to the meta-gradient: one
  minibatch's line search is noisy, which is what APO amortizes.
Each recovery resets the meta-optimizer's moments (estimated at the old scale, they would push φ
back), counts in ``recoveries`` and retries the meta-step with the shrunk φ, at most
MAX_RECOVERIES_PER_STEP times in one step. The real update is taken only after a meta-step
succeeded, so it uses a φ whose lookahead was finite (and, while searching, no worse than not
stepping). If every
retry failed, the step takes no update (``skipped_steps``), the step counter advances and the next
step is a meta-step again whatever ``meta_interval`` says. A real update that would not be finite
(``_apply`` returns False) is retried the same way. A non-finite loss or gradient at θ is
different: it says nothing about φ, so that step is skipped with θ, φ and all state untouched and
the step counter not advanced. A lookahead that no step size makes finite (APO-LR: the base
optimizer's own direction is not finite although the gradients are, e.g. Adam's eps rounding to 0 in
float16) is not a recovery either: φ is kept, the step is skipped with a warning that says why, and
the next step retries. Nor is an FSD batch on which the FSD term is not finite even at θ' = θ (a NaN
in the data): no step size helps there, and the step's own gradients are finite, so the meta-step
is skipped with a warning, φ kept, and the real update taken with it. The same holds for a fresh
meta-batch (``meta_batch="fresh"``) whose loss is not finite at θ itself: after a failed lookahead
its closure is run once at Δ = 0 to tell the two apart. Non-finite values never reach θ,
momentum, φ or the meta-optimizer.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.graph import increment_version
from torch import Tensor, nn

from .._args import FLOAT32_MAX, check_choice, check_int, check_number, check_type
from .. import distributed
from .._numerics import all_finite, all_finite_scratch, checked_loss, loss_scalar, no_autocast
from .._step_hooks import step_quietly, warn_at_caller, zero_grad_quietly
from . import discrepancy
from .snapshot import LookaheadBuffers, RNGState, cuda_devices_of
from .objective import FSDReferenceNotFinite, StepForward, proximal_objective_grad


META_BATCHES = ("same", "fresh")


def check_common_args(model, lambda_fsd, lambda_wsd, meta_lr, meta_interval, fsd, meta_batch, grad_scaler):
    """Shared argument rules; every error names its argument."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    distributed.refuse_fsdp(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (model.parameters() is empty or frozen)")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(f"model: {name!r} ({type(module).__name__}) has sparse=True; APO needs dense "
                             f"gradients (the lookahead and the preconditioners read every row): build it "
                             f"with sparse=False")
    for name, v in (("lambda_fsd", lambda_fsd), ("lambda_wsd", lambda_wsd)):
        check_number(name, v, high=FLOAT32_MAX)  # they scale float32 gradients
    check_number("meta_lr", meta_lr)
    check_int("meta_interval", meta_interval, low=0)  # 0 turns meta-steps off
    discrepancy.resolve(fsd)
    check_choice("meta_batch", meta_batch, META_BATCHES)
    if grad_scaler is not None and not hasattr(grad_scaler, "unscale_"):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def check_dense_grads(params) -> None:
    """A sparse ``.grad`` (a module switched to sparse gradients after construction) is refused by
    name before any arithmetic: the optimizers' fused checks and buffers are dense-only."""
    for i, p in enumerate(params):
        g = p.grad
        if g is not None and g.layout != torch.strided:
            raise TypeError(f"parameter {i} of shape {tuple(p.shape)} has a {g.layout} gradient; APO needs "
                            f"dense gradients (for nn.Embedding / nn.EmbeddingBag: sparse=False)")


def check_step_args(closure, fsd_inputs, meta_closure) -> None:
    """Type rules of ``step``'s arguments, checked on every step (before anything is computed)."""
    if closure is not None and not callable(closure):
        raise TypeError(f"closure must be a callable (zero grads, forward, backward, return the loss), "
                        f"got {type(closure).__name__}")
    if meta_closure is not None and not callable(meta_closure):
        raise TypeError(f"meta_closure must be a callable like closure, got {type(meta_closure).__name__}")
    if fsd_inputs is not None and not isinstance(fsd_inputs, (tuple, list, Tensor)):
        raise TypeError(f"fsd_inputs must be a tuple of inputs for model(*fsd_inputs) (or one Tensor), "
                        f"got {type(fsd_inputs).__name__}")


def momentum_catch_up(mu: float, k: int, *, dampening: float = 0.0, nesterov: bool = False,
                      starts_at_grad: bool = True) -> float:
    """How many times longer a heavy-ball step along a steady gradient becomes once the momentum
    buffer has warmed up than it is after k accumulations (≥ 1; 1 without momentum).

    The lookahead of a meta-step judges one step, but a young momentum buffer keeps growing: right
    after the first gradient the buffer is g while the step it is heading for is g/(1−μ), 10× longer
    at μ = 0.9. Judged at its young length, a step size looks 1/(1−μ) times safer than it is, and a
    meta-step started at a good lr takes it past the edge of stability (measured on ReLU nets).
    The lookahead therefore scales the step by this factor (bias correction, as Adam's for its
    moments). ``starts_at_grad``: torch.optim.SGD's buffer starts at g; RMSprop's at 0.
    """
    if mu == 0.0:
        return 1.0
    if starts_at_grad:
        young = mu ** (k - 1) + (1.0 - dampening) * (1.0 - mu ** (k - 1)) / (1.0 - mu)
    else:
        young = (1.0 - mu ** k) / (1.0 - mu)
    steady = (1.0 - dampening) / (1.0 - mu)
    if nesterov:
        young, steady = 1.0 + mu * young, 1.0 + mu * steady
    if not (young > 0.0 and steady > 0.0):
        return 1.0
    return max(1.0, steady / young)


def with_state_dict_hooks(state_dict: Callable) -> Callable:
    """An APO optimizer's own ``state_dict`` with torch.optim's state-dict hooks around it, as
    ``torch.optim.Optimizer.state_dict`` runs them (``register_state_dict_pre_hook``: before;
    ``…_post_hook``: after, its return value, when not None, replacing the dict)."""
    @functools.wraps(state_dict)
    def wrapper(self):
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = state_dict(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        return state
    return wrapper


def with_load_state_dict_hooks(load_state_dict: Callable) -> Callable:
    """An APO optimizer's own ``load_state_dict`` with torch.optim's load hooks around it, as
    ``torch.optim.Optimizer.load_state_dict`` runs them (the pre-hooks on a shallow copy, each may
    return the dict to load; the post-hooks after loading)."""
    @functools.wraps(load_state_dict)
    def wrapper(self, state):
        state = state.copy() if isinstance(state, dict) else state
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        load_state_dict(self, state)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
    return wrapper


def check_state_finite(entries: dict) -> None:
    """Every floating tensor of a state being loaded is finite. ``entries``: label -> part of the
    state (φ, buffers, a torch optimizer's per-parameter ``state``; not hyperparameters, where a user
    may keep an inf on purpose). A NaN in φ would otherwise load, and then every meta-step would
    retry and shrink it without end, every step skipped: refused before anything is loaded, naming
    the entry."""
    def walk(x, path: str) -> None:
        if isinstance(x, Tensor):
            if not all_finite([x]):  # (an integer tensor is finite)
                raise ValueError(f"state_dict: {path} holds a NaN or inf, which no step recovers from; "
                                 "nothing was loaded")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    for label, part in entries.items():
        walk(part, label)


class _NoStepSizeHelps(Exception):
    """A meta-step failed in a way that no step size fixes (``APOCore._no_step_size_helps``).
    ``update``: whether the step's real update may still be taken with φ as it is (the failure lies
    in the meta-step's own batch, not in the step)."""

    def __init__(self, update: bool = False):
        super().__init__()
        self.update = update


class _Plan:
    """What one step derives from the gradient at θ (subclasses add fields). ``form_deltas``: set by a
    ``_lookahead_deltas`` that returns Δ's buffers unformed, to form Δ in the pass that writes θ'
    (``proximal_objective_grad``'s argument of that name)."""

    params: list
    form_deltas: Optional[Callable] = None


class APOCore(torch.optim.Optimizer):
    """The base of APOLR and APOPrecond: a torch.optim.Optimizer (param_groups, state, step hooks,
    lr schedulers) with the closure-driven step of Algorithm 1; see the module docstring for the
    hooks. A subclass calls ``torch.optim.Optimizer.__init__`` and then ``_init_core()``.
    """

    model: nn.Module
    lambda_fsd: float
    lambda_wsd: float
    meta_interval: int
    fsd: object
    grad_scaler: Optional[object]
    meta_batch: str
    meta_optimizer: torch.optim.Optimizer

    MAX_RECOVERIES_PER_STEP = 3  # each one costs a closure: bounded, so a step always ends
    SHRINK = 0.1                 # a recovery multiplies φ's step size (APO-LR's lr, APO-Precond's S²) by this
    OVERSHOOT_MIN_FACTOR = 0.01  # the most one overshoot recovery shrinks the step by
    # Whether ∇θ'Q is checked for finiteness before the meta-backward. A subclass whose meta-gradient
    # is a contraction of ∇θ'Q with the finite Δ may skip it: a NaN or inf there makes the
    # contraction NaN or inf (x·inf, 0·inf, NaN·x), and the meta-gradient's own check catches it.
    CHECK_LOOKAHEAD_GRADS = True

    def _init_core(self):
        self._apo_step = 0      # steps taken (a step skipped for a non-finite gradient does not count)
        self.skipped_steps = 0  # steps without a real update
        self.recoveries = 0     # times φ's step was shrunk because it was too large to evaluate
        self.meta_steps = 0
        self._meta_pending = False  # the last meta-step failed every retry: the next step retries
        self._searching = True      # the step size is not validated yet: first meta-step, or after a recovery
        self.last_meta: Optional[dict] = None  # Q and its terms at the latest meta-step
        self._replicas = distributed.replicas_of(self.model)  # the ranks every decision is agreed with
        self._groups_fixed = True   # φ is built for the groups given at construction
        self._lookahead_buffers = LookaheadBuffers()  # θ' of every meta-step is written here

    def add_param_group(self, param_group: dict) -> None:
        """Only during construction: φ (and the parameter plan) is built for the groups given then."""
        if getattr(self, "_groups_fixed", False):
            raise ValueError(f"param_group: {type(self).__name__} builds φ for the parameters given at "
                             "construction; construct a new optimizer to train more parameters")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; φ, the model and the
        # meta-optimizer must travel too (copy.deepcopy, pickle)
        return self.__dict__.copy()

    # ---- hooks ---------------------------------------------------------------------------
    def _prepare(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _lookahead_deltas(self, plan) -> list[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _meta_backward(self, plan, dQ: Sequence[Tensor]) -> Optional[bool]:  # pragma: no cover
        raise NotImplementedError

    def _apply(self, plan) -> bool:  # pragma: no cover
        raise NotImplementedError

    def _shrink_phi(self, factor: float) -> None:  # pragma: no cover
        raise NotImplementedError

    def _after_meta_step(self) -> None:
        pass

    def _scaler_target(self):
        return self

    def _device_type(self) -> str:
        return next(iter(self.model.parameters())).device.type

    def _no_autocast(self):
        """Our arithmetic runs outside any autocast region the user opened around step(); with none
        open on the model's device there is nothing to leave (and no context to pay for each step)."""
        if not torch._C._is_any_autocast_enabled():  # the common case: one call, no device lookup
            return contextlib.nullcontext()
        device_type = self._device_type()
        return no_autocast(device_type) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, without its profiler range when no profiler runs (``zero_grad_quietly``)."""
        zero_grad_quietly(self, set_to_none)

    # ---- the step ------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self._apo_step

    def meta_due(self) -> bool:
        """Whether the next ``step`` does a meta-update: every ``meta_interval`` steps from step 0,
        and the step after one whose meta-update failed every recovery."""
        return self.meta_interval > 0 and (self._meta_pending or self._apo_step % self.meta_interval == 0)

    def _meta_grads(self) -> list[Optional[Tensor]]:
        return [p.grad for g in self.meta_optimizer.param_groups for p in g["params"]]

    def _zero_meta_grads(self) -> None:
        # the meta-optimizer's zero_grad by the rule of its step: a profiler range only when one listens
        zero_grad_quietly(self.meta_optimizer)

    def _first_closure(self, closure, watch=None):
        loss = None
        if closure is not None:
            with torch.enable_grad(), (watch or contextlib.nullcontext()):
                loss = closure()
        scale = None
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            # records found_inf for scaler.update(); the lookahead's grads are unscaled by hand
            self.grad_scaler.unscale_(self._scaler_target())
            scale = float(self.grad_scaler.get_scale())
        return loss, scale

    def _grads_finite(self, loss, plan) -> bool:
        # a rank whose own loss is not finite makes every rank skip (grads are DDP's average)
        return self._replicas.all_true(self._local_grads_finite(loss, plan),
                                       "the finiteness of the loss and gradients at θ")

    def _local_grads_finite(self, loss, plan) -> bool:
        """Whether this rank's loss and gradients at θ are finite (a subclass may read it off a
        cheaper witness computed by ``_prepare``)."""
        # one check for both (on CPU one native call: after a backward every extra call costs tens of µs)
        return all_finite([checked_loss(loss), *(p.grad for p in self._all_params())])

    def _run_step(self, closure: Optional[Callable], fsd_inputs, meta_closure: Optional[Callable]):
        check_step_args(closure, fsd_inputs, meta_closure)
        meta = self.meta_due()
        if meta:
            if closure is None:
                raise ValueError(
                    "closure is required on a meta-update step (every meta_interval steps): "
                    "call step(closure) with a closure that zeroes grads, computes the loss and calls backward"
                )
            if self.lambda_fsd != 0.0 and fsd_inputs is None:
                raise ValueError("fsd_inputs is required on a meta-update step when lambda_fsd != 0")
            if self.meta_batch == "fresh" and meta_closure is None:
                raise ValueError("meta_closure (a closure on a fresh batch) is required with meta_batch='fresh'")
        rng0 = RNGState(cuda_devices_of(self._all_params())) if meta else None
        # on a meta-step the closure's own forward at θ may be the FSD term's f(x̃; θ) (StepForward)
        step_forward = (StepForward(distributed.local_module(self.model), fsd_inputs, rng0.cuda_devices)
                        if meta and self.lambda_fsd != 0.0 and fsd_inputs is not None else None)
        loss, scale = self._first_closure(closure, step_forward)
        check_dense_grads(self._all_params())
        if meta and all(p.grad is None for p in self._all_params()):
            raise ValueError("closure: no parameter has a gradient after it ran; a meta-step needs the closure "
                             "to call backward on the loss")
        # our arithmetic runs outside any autocast region the user opened around step(); the
        # model forwards of the meta-step (closure, FSD) run under it, as the user intended
        with self._no_autocast():
            plan = self._prepare()  # changes no state: a step skipped below leaves it as it was
            fused = None if meta or self._replicas.world != 1 else self._checked_plain_update(loss, plan)
        if fused is False or (fused is None and not self._grads_finite(loss, plan)):
            self.skipped_steps += 1
            return loss
        loss_at_theta = None
        if meta and self.meta_batch == "same" and loss is not None:
            # Q at Δ = 0 (both proximity terms vanish there), over every rank's batch
            loss_at_theta = self._replicas.mean(loss_scalar(loss), "the loss at θ")
        meta_ok = True
        if meta:
            args = (closure if self.meta_batch == "same" else meta_closure, fsd_inputs, scale,
                    rng0 if self.meta_batch == "same" else None, loss_at_theta, step_forward)
            meta_ok = self._with_recoveries(lambda: self._meta_update(plan, *args))
        updated = fused or (meta_ok and self._with_recoveries(lambda: self._apply_outside_autocast(plan)))
        if not updated:
            self.skipped_steps += 1
        # after a failure, learn the (shrunk) step again at once rather than meta_interval steps later
        self._meta_pending = not updated and self.meta_interval > 0
        self._apo_step += 1
        return loss

    def _with_recoveries(self, attempt: Callable[[], Optional[float]]) -> bool:
        """Run ``attempt()`` until it succeeds (returns None); after each failure it returns the
        factor by which φ's step must shrink, and φ is shrunk. At most 1 + MAX_RECOVERIES_PER_STEP
        attempts; after a last failure φ is still shrunk, so the next step starts smaller. A failure
        that no step size fixes (``_NoStepSizeHelps``) ends the attempts with φ as it was; the result
        is then whether the step's update may still be taken (its ``update``)."""
        for _ in range(self.MAX_RECOVERIES_PER_STEP + 1):
            try:
                factor = attempt()
            except _NoStepSizeHelps as failure:
                return failure.update
            if factor is None:
                return True
            self._recover(factor)
        return False

    def _apply_outside_autocast(self, plan) -> Optional[float]:
        with self._no_autocast():
            return None if self._apply(plan) else self.SHRINK

    def _recover(self, factor: float) -> None:
        self._shrink_phi(factor)
        # the moments were estimated for the old scale of φ (and would push it back up)
        self.meta_optimizer.state.clear()
        self.recoveries += 1
        self._searching = True

    def _meta_update(self, plan, closure, fsd_inputs, scale, rng, loss_at_theta, step_forward) -> Optional[float]:
        """One meta-step; None when done, else the factor by which φ's step must shrink first."""
        try:
            found = self._objective(plan, closure, fsd_inputs, scale, rng, step_forward)
        except FSDReferenceNotFinite as e:  # the FSD batch is at fault: keep φ, take the step
            warn_at_caller(f"{type(self).__name__}: {e}; the meta-step is skipped, φ kept and the step taken",
                           RuntimeWarning)
            raise _NoStepSizeHelps(update=True) from None
        if found is None:
            why = self._no_step_size_helps(plan)
            if why is not None:  # shrinking φ would only destroy it: keep it and skip this step
                warn_at_caller(f"{type(self).__name__}: {why}; the step is skipped and φ kept", RuntimeWarning)
                raise _NoStepSizeHelps
            if self.meta_batch == "fresh" and not self._loss_finite_at_theta(plan, closure, scale):
                warn_at_caller(f"{type(self).__name__}: meta_closure: its loss is not finite at θ itself (Δ = 0), so "
                               "no step size helps; the meta-step is skipped, φ kept and the step taken",
                               RuntimeWarning)
                raise _NoStepSizeHelps(update=True)
            return self.SHRINK
        obj, deltas = found
        if self._searching and loss_at_theta is not None and obj.value > loss_at_theta:
            factor = self._overshoot_factor(plan, deltas, loss_at_theta, obj.value)
            if factor is not None:
                return factor
        if not self._meta_step(plan, obj.grads):
            return self.SHRINK
        self.meta_steps += 1
        self._searching = False
        self.last_meta = {"step": self._apo_step, "Q": obj.value, "loss": obj.loss,
                          "fsd": obj.fsd, "wsd": obj.wsd}
        self._after_meta_step()
        return None

    def _meta_step(self, plan, dQ) -> bool:
        """The meta-gradient from ∇θ'Q and the meta-optimizer's step on φ; False, with nothing written,
        when the meta-gradient is not finite (on every rank: the ranks agree before φ is written)."""
        with self._no_autocast():
            done = self._meta_backward_and_step(plan, dQ) if self._replicas.world == 1 else None
        if done is False:
            return False
        if done is None:
            self._zero_meta_grads()
            with self._no_autocast():
                finite = self._meta_backward(plan, dQ)
            if finite is None:
                finite = all_finite_scratch(self._meta_grads())
            if not self._replicas.all_true(finite, "the meta-gradient's finiteness"):
                self._zero_meta_grads()
                return False
            step_quietly(self.meta_optimizer)
            self._zero_meta_grads()
        if done or any(g.get("fused") for g in self.meta_optimizer.param_groups):
            # torch's fused Adam writes φ without moving its version counters, which the caches
            # built from φ read (kron's L and R, the carried direction, APO-LR's learnt lrs)
            increment_version([p for g in self.meta_optimizer.param_groups for p in g["params"]])
        return True

    def _meta_backward_and_step(self, plan, dQ) -> Optional[bool]:
        """On one process: the meta-gradient and φ's step in one call where the subclass has one (True:
        taken; False: the meta-gradient is not finite and nothing was written), else None (the
        default: ``_meta_backward``, then the meta-optimizer's step)."""
        return None

    def _loss_finite_at_theta(self, plan, closure, scale) -> bool:
        """After a lookahead that is not finite on a fresh meta-batch (whose loss at θ the step never
        saw): whether that batch's loss is finite at θ itself, Δ = 0. Where it is not (a NaN in the
        batch), no step size helps. The closure runs as at θ', θ and ``.grad`` restored after it."""
        zeros = [torch.zeros_like(p) for p in plan.params]
        obj = proximal_objective_grad(distributed.local_module(self.model), plan.params, zeros, closure,
                                      grad_scale=scale, buffers=self._lookahead_buffers)
        return self._replicas.all_true(math.isfinite(obj.loss), "the finiteness of the meta-batch's loss at θ")

    def _checked_plain_update(self, loss, plan) -> Optional[bool]:
        """None: no fused check and update here (the default). On one process only: with several
        replicas the check is agreed between them before anything is written."""
        return None

    def _no_step_size_helps(self, plan) -> Optional[str]:
        """After a non-finite lookahead: why no step size can make it finite, or None (the
        default: a smaller step may)."""
        return None

    def _overshoot_factor(self, plan, deltas, q0: float, q1: float) -> Optional[float]:
        """The lookahead θ + Δ is worse than not stepping (Q(Δ) > Q(0) = J_B(θ)). Along a descent
        direction (slope s0 = ⟨∇J_B(θ), Δ⟩ < 0) the quadratic q(t) = Q(0) + s0·t + c·t² through
        Q(Δ) has its minimum at t* = −s0 / (2c) < 1/2, c = Q(Δ) − Q(0) − s0 > 0: the step is 1/t*
        times too long. Returns t* (at least OVERSHOOT_MIN_FACTOR), or None off a descent direction
        (no step length helps there; the meta-gradient handles it)."""
        with self._no_autocast():  # float64: a huge step's slope must not overflow
            s0 = sum(float(torch.dot(p.grad.reshape(-1).double(), d.reshape(-1).double()))
                     for p, d in zip(plan.params, deltas) if p.grad is not None)
        if not s0 < 0.0:
            return None
        t = -s0 / (2.0 * (q1 - q0 - s0))
        return max(t, self.OVERSHOOT_MIN_FACTOR) if math.isfinite(t) else self.SHRINK

    def _objective(self, plan, closure, fsd_inputs, scale, rng, step_forward=None):
        """(Q at the lookahead, the deltas), or None when either is not finite."""
        with self._no_autocast():
            deltas = self._lookahead_deltas(plan)
        obj = proximal_objective_grad(  # FSD forwards outside DDP: their gradient is averaged below
            distributed.local_module(self.model), plan.params, deltas, closure, fsd_inputs=fsd_inputs,
            lambda_fsd=self.lambda_fsd, lambda_wsd=self.lambda_wsd, fsd=self.fsd,
            grad_scale=scale, rng=rng, buffers=self._lookahead_buffers, step_forward=step_forward,
            form_deltas=plan.form_deltas, joint_fsd=self._replicas.world == 1,
            all_ranks=None if self._replicas.world == 1 else self._replicas.all_true,
        )
        if not math.isfinite(obj.wsd):  # Δ is not finite (found by the pass that writes θ'; Δ is
            return None                 # the same on every rank, so every rank returns here)
        self._replicas.average_objective(obj, with_grads=self.lambda_fsd != 0.0)
        if not math.isfinite(obj.value):
            return None
        if self.CHECK_LOOKAHEAD_GRADS and not all_finite_scratch(obj.grads):  # our own tensors
            return None
        return obj, deltas

    # ---- non-mutating probes (tests, diagnostics, finite differences) --------------------
    @torch.no_grad()
    def meta_gradient(self, closure: Callable, fsd_inputs=None) -> tuple[float, list[Tensor]]:
        """(Q, ∇φQ) at the current θ, φ for this closure's batch, without changing θ, φ or state.

        ∇φQ is a list in ``self.phi``'s order (clones). The closure is called
        twice (at θ and at θ'); ``.grad`` of the model is left holding the gradient at θ.
        """
        loss, scale = self._first_closure_probe(closure)
        with self._no_autocast():
            plan = self._prepare()
        found = self._objective(plan, closure, fsd_inputs, scale, None)
        if found is None:
            raise FloatingPointError("non-finite meta-objective")
        obj = found[0]
        phi = self.phi
        saved = [p.grad for p in phi]
        self._zero_meta_grads()
        with self._no_autocast():
            self._meta_backward(plan, obj.grads)
        out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in phi]
        for p, g in zip(phi, saved):
            p.grad = g
        return obj.value, out

    @torch.no_grad()
    def meta_objective(self, closure: Callable, fsd_inputs=None) -> float:
        """Q(φ) at the current θ, φ for this closure's batch (θ, φ and state unchanged)."""
        loss, scale = self._first_closure_probe(closure)
        with self._no_autocast():
            plan = self._prepare()
        found = self._objective(plan, closure, fsd_inputs, scale, None)
        return float("nan") if found is None else found[0].value

    def _first_closure_probe(self, closure):
        check_step_args(closure, None, None)
        if closure is None:
            raise ValueError("closure is required: the meta-objective is evaluated on the closure's batch")
        with torch.enable_grad():
            loss = closure()
        check_dense_grads(self._all_params())
        scale = None
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale = float(self.grad_scaler.get_scale())
            for p in self._all_params():
                if p.grad is not None:
                    p.grad.mul_(1.0 / scale)
        return loss, scale

    def _all_params(self) -> list[Tensor]:  # pragma: no cover
        raise NotImplementedError

    # ---- state shared by both optimizers --------------------------------------------------
    def _core_state(self) -> dict:
        return {"step": self._apo_step, "skipped_steps": self.skipped_steps, "recoveries": self.recoveries,
                "meta_steps": self.meta_steps, "meta_pending": self._meta_pending, "searching": self._searching}

    CORE_STATE_KEYS = ("step", "skipped_steps", "meta_steps")

    def _check_state_keys(self, state, keys: Sequence[str]) -> None:
        """A ``load_state_dict`` argument is a dict with this optimizer's keys (and the core's): a
        state saved by another optimizer, or by another kind of APO optimizer, is refused by name
        before anything is loaded."""
        owner = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be the dict {owner}.state_dict() returns, got {type(state).__name__}")
        missing = [k for k in (*keys, *self.CORE_STATE_KEYS) if k not in state]
        if missing:
            raise ValueError(f"state_dict: this is not {owner}'s state (it has no {missing[0]!r}): load what "
                             f"{owner}.state_dict() saved")

    def _load_core_state(self, state: dict) -> None:
        self._apo_step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.recoveries = int(state.get("recoveries", 0))
        self.meta_steps = int(state["meta_steps"])
        self._meta_pending = bool(state.get("meta_pending", False))
        self._searching = bool(state.get("searching", self.meta_steps == 0))

"""APO's proximal meta-objective and its gradient at the lookahead.

APO (Amortized Proximal Optimization, Algorithm 1) meta-learns the parameters φ of an update rule
θ' = θ + Δ(φ) by descending the proximal meta-objective on the batch B that produced the gradient:

    Q(φ) = J_B(θ') + λ_FSD · mean_{x̃∈B'} D_F(f(x̃; θ'), f(x̃; θ)) + (λ_WSD/2) · ‖θ' − θ‖²

g = ∇J_B(θ) does not depend on φ, so ∇φQ = (∂Δ/∂φ)ᵀ ∇θ'Q: one extra forward/backward of the real
model at θ' gives ∇θ'Q (``proximal_objective_grad``), and the update rule maps it back to φ (for
the structured preconditioner that map is the op's registered backward, see
``apo_kernels.optim.preconditioners``). No second-order autograd, no graph kept.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .._numerics import all_finite, loss_scalar
from . import discrepancy
from .snapshot import LookaheadBuffers, ModelSnapshot, RNGState, borrowed, cuda_devices_of, submodules

__all__ = ["FSDReferenceNotFinite", "JointFSD", "MetaObjective", "StepForward", "proximal_objective_grad",
           "rows_independent"]


class FSDReferenceNotFinite(ValueError):
    """The FSD term is not finite even at θ' = θ: the model's output at θ on ``fsd_inputs`` holds a
    NaN, or an inf the discrepancy cannot take. Then no step size makes Q finite: the batch is at
    fault, not φ."""


def _fsd_finite_at_theta(fsd_fn, old_out) -> bool:
    """Whether D_F(f(x̃; θ), f(x̃; θ)), the FSD term at θ' = θ, is finite. A finite output passes
    (the common case, one native check); an infinite one passes where the discrepancy takes it
    (masked logits, −inf, under "kl")."""
    if all_finite(_tensors(old_out)):
        return True
    with torch.no_grad():
        return math.isfinite(float(fsd_fn(old_out, old_out)))


def _refuse_unless(usable: bool) -> None:
    if not usable:
        raise FSDReferenceNotFinite(
            "fsd_inputs: the FSD term is not finite even at θ' = θ (the model's output at θ on them "
            "holds a NaN, or an inf that fsd cannot take), so no step size makes it finite")


def _detach_tree(x):
    if isinstance(x, Tensor):  # the common output, without the pytree walk (tens of µs on a small model)
        return x.detach()
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def _own_gradient(g: Optional[Tensor], delta: Tensor) -> Tensor:
    """The closure's gradient at θ' as a tensor of Δ's dtype that nothing else writes: the
    closure's own tensor when it is one (the snapshot set the old one aside, so the backward made
    a new one), else a copy (another dtype, or a view into memory DDP's next backward rewrites)."""
    if g is None:
        return torch.zeros_like(delta)
    g = g.detach()
    return g if g.dtype == delta.dtype and not borrowed(g) else g.to(delta.dtype, copy=True)


def _tensors(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, tuple) and all(isinstance(t, Tensor) for t in tree):  # model inputs, as a rule
        return list(tree)
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _autocast_state() -> tuple:
    if not torch._C._is_any_autocast_enabled():  # the common case, one call: no region open anywhere
        return ()
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class _CallHooks:
    """While open (a context manager), ``self._before`` and ``self._after`` hook every call of
    ``self.module`` (a forward pre-hook and a forward hook, keyword arguments included)."""

    module: nn.Module

    def __enter__(self):
        self._handles = [self.module.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.module.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


class StepForward(_CallHooks):
    """f(x̃; θ) for the FSD term from the step's own forward, when the FSD batch is the step's batch.

    A context manager around the step's closure at θ: for that call only, hooks on ``module`` (the
    module the FSD forwards call) record a call whose positional inputs are the very tensors of
    ``fsd_inputs`` (``is``; no keyword arguments): its output, detached, and the RNG state its
    forward started from. ``reusable()`` hands them to the FSD term instead of a forward at θ
    without a graph, only when that forward would compute the same thing: exactly one such call,
    neither the inputs nor the output written in place since (version counters), and the model's
    train/eval flags and the autocast state as they were then. The FSD forward at θ' then starts
    from the recorded RNG state, so it replays that call's dropout masks: D_F compares θ and θ' under
    equal masks, as when both FSD forwards run (there from a fresh draw, here from the step's own).
    """

    def __init__(self, module: nn.Module, fsd_inputs, cuda_devices: Sequence[int] = ()):
        self.module = module
        self.inputs = tuple(fsd_inputs) if isinstance(fsd_inputs, (tuple, list)) else (fsd_inputs,)
        self.cuda_devices = list(cuda_devices)
        self._submodules: Optional[list[nn.Module]] = None  # whose train/eval flags the setting compares
        self.calls = 0  # calls on exactly the FSD inputs
        self._rng_at_call: Optional[RNGState] = None
        self._found: Optional[tuple] = None

    def _matches(self, args, kwargs) -> bool:
        return not kwargs and len(args) == len(self.inputs) and all(a is b for a, b in zip(args, self.inputs))

    def _before(self, module, args, kwargs):
        self._rng_at_call = RNGState(self.cuda_devices) if self._matches(args, kwargs) else None

    def _after(self, module, args, kwargs, output):
        if self._rng_at_call is None:
            return
        self.calls += 1
        out = _detach_tree(output)
        self._found = (out, self._rng_at_call, self._state(out))
        self._rng_at_call = None

    def _state(self, out) -> tuple:
        if self._submodules is None:  # walked at the first call on the FSD inputs (none: an FSD batch of its own)
            self._submodules = submodules(self.module)
        return ([t._version for t in _tensors(self.inputs)], [t._version for t in _tensors(out)],
                [m.training for m in self._submodules], _autocast_state())

    def reusable(self) -> Optional[tuple]:
        """(f(x̃; θ) detached, the RNG state its forward started from), or None."""
        if self.calls != 1:
            return None
        out, rng, state = self._found
        return (out, rng) if self._state(out) == state else None

    def same_setting(self) -> bool:
        """Whether a forward now on the FSD inputs runs as the recorded one did: the inputs unwritten,
        the model's train/eval flags and the autocast state as then."""
        _, _, (inputs, _, flags, autocast) = self._found
        return ([t._version for t in _tensors(self.inputs)] == inputs
                and [m.training for m in self._submodules] == flags and _autocast_state() == autocast)


def _joinable(fsd_inputs, old_out) -> bool:
    """Whether the FSD inputs are tensors of one number of rows and f(x̃; θ) one tensor of those rows:
    what appending them to the closure's batch needs (``JointFSD``)."""
    if not isinstance(old_out, Tensor) or old_out.dim() == 0 or not fsd_inputs:
        return False
    return all(isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == old_out.shape[0] for x in fsd_inputs)


class FusedFSD(_CallHooks):
    """The FSD term at θ' carried by the closure's own forward and backward at θ', when the FSD
    batch is the step's batch (the paper's App. D: f(x̃; θ') serves the loss and the FSD term).

    A context manager around the closure at θ' (after ``StepForward`` supplied f(x̃; θ)). When the
    model is called on the very FSD inputs, D_F(f(x̃; θ'), f(x̃; θ)) and its gradient with respect to
    that output are formed from the output alone (output-sized work), and a hook on the output adds
    ``coef`` (λ_FSD times the loss scale) times that gradient to the gradient the closure's backward
    sends through it: the closure's own backward then yields ∇θ'(J + λ_FSD·D_F), one forward and
    backward at θ' instead of two. The chain rule makes it the same gradient as a forward of its own.

    It is used only where that forward would compute the same thing: one call on exactly those
    inputs (``is``), started from the RNG state f(x̃; θ)'s forward started from (the same dropout
    masks), with the setting of that forward (``StepForward.same_setting``), returning a Tensor that
    needs a gradient. A second call before the backward withdraws the addition. ``outcome()`` says
    afterwards what the closure's gradient holds: "fused" (the FSD term's gradient, once), "absent"
    (none of it: the caller runs the FSD forward and backward of its own) or "spoilt" (added, but
    the closure went on to call the model on those inputs again, or to backward twice: the caller
    runs the closure again without this).
    """

    def __init__(self, watch: StepForward, old_out, rng: RNGState, fsd_fn, coef: float):
        self.watch, self.old_out, self.rng, self.fsd_fn, self.coef = watch, old_out, rng, fsd_fn, coef
        self.module = watch.module
        self.calls = self.added = self.fired = 0
        self.value: Optional[float] = None
        self._matched = self._eligible = False  # the current call is on the FSD inputs / may carry the term
        self._grad_out: Optional[Tensor] = None

    def _before(self, module, args, kwargs):
        matches = self.watch._matches(args, kwargs)
        self._eligible = matches and self.calls == 0 and self.rng.is_current() and self.watch.same_setting()
        self._matched = matches

    def _after(self, module, args, kwargs, output):
        if not self._matched:
            return
        self.calls += 1
        if not (self._eligible and isinstance(output, Tensor) and output.requires_grad):
            return
        value, self._grad_out = discrepancy.value_and_grad(self.fsd_fn, output, self.old_out, self.coef)
        self.value = float(value)
        output.register_hook(self._add)

    def _add(self, g: Tensor) -> Tensor:
        self.fired += 1
        if self.calls != 1:  # a second call on the FSD inputs: which output is f(x̃; θ') is ambiguous
            return g
        self.added += 1
        return g + self._grad_out.to(g.dtype)

    def outcome(self) -> str:
        if self.added == 0:
            return "absent"
        return "fused" if (self.added, self.fired, self.calls) == (1, 1, 1) else "spoilt"


# Modules whose forward maps each row of a batch (dim 0) on its own and draws no random numbers. A
# model that is an nn.Sequential of these computes, on a batch with rows appended, for each row what
# it computes on that row's batch alone (to rounding), so the FSD forward at θ' can ride on the
# closure's forward at θ' (``JointFSD``). Convolutions are left out on measurement: a CNN's (c = 32,
# 32×32, batch 128) closure with the FSD batch appended took 1.39× the time of the two passes apart,
# its activations outgrowing the caches, where MLPs' took 0.82–0.84× (w = 256 to 2048, batch 100–256).
# BatchNorm in training mode mixes the rows; anything else (a class of the user's, a subclass of
# these, a parametrized layer) is not known to keep them apart.
_ROW_WISE = tuple(getattr(nn, name) for name in (
    "Identity", "Linear", "Embedding", "LayerNorm", "RMSNorm",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid",
    "Softplus", "Softsign", "Hardtanh", "Hardswish", "Hardsigmoid", "Hardshrink", "Softshrink", "Tanhshrink",
    "LogSigmoid", "Threshold") if hasattr(nn, name))
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def rows_independent(model: nn.Module) -> bool:
    """Whether ``model`` is known to map the rows of its input batch each on its own, drawing no random
    numbers: an nn.Sequential (or one module) of ``_ROW_WISE`` modules, dropout only where it is off
    (eval mode or p = 0), nn.Flatten only from dimension 1 on, nn.Embedding only without ``max_norm``,
    no forward set on an instance and no module hooks anywhere (a hook may read the batch as a whole)."""
    if any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS):
        return False
    stack = [model]  # (a walk that stops at the first module not known: a user's model class at once)
    while stack:
        m = stack.pop()
        stack.extend(c for c in m._modules.values() if c is not None)
        kind = type(m)
        if "forward" in vars(m) or any(getattr(m, name, None) for name in _MODULE_HOOKS):
            return False  # (a forward set on the instance is not its class's)
        if kind is nn.Embedding and m.max_norm is not None:
            return False  # (its forward renormalizes the rows it reads in place: more rows, other θ')
        if kind is nn.Sequential or kind in _ROW_WISE:
            continue
        if kind in _DROPOUT:
            if m.training and m.p > 0:
                return False
        elif not (kind is nn.Flatten and m.start_dim >= 1):
            return False
    return True


class JointFSD(_CallHooks):
    """The FSD forward and backward at θ' carried by the closure's own forward and backward at θ', when
    the FSD batch is another batch and the model maps rows each on its own (``rows_independent``).

    A context manager around the closure at θ'. The closure's first call of the model with gradients
    on, whose positional inputs match the FSD inputs (as many tensors, each of the FSD input's dtype,
    device and shape past dim 0; no keyword arguments) and whose autocast state is the one f(x̃; θ)
    was formed under (the state at construction), runs on its inputs with the FSD inputs' rows
    appended: its last rows are f(x̃; θ'), from which D_F(f(x̃; θ'), f(x̃; θ)) and its gradient at
    those rows are formed, and the closure gets the first rows, its own output. A hook on the whole
    output adds ``coef`` (λ_FSD times the loss scale) times that gradient to the rows the closure's
    backward leaves at zero: the closure's backward then yields ∇θ'(J + λ_FSD·D_F), one forward and one
    backward where there were two of each. ``outcome()`` as ``FusedFSD``'s: "fused" (the FSD
    gradient added once), "absent" (the closure made no such call, or no backward through it: the
    caller runs the FSD passes of its own) or "spoilt" (a second backward through that call: the
    caller runs the closure again without this).
    """

    def __init__(self, module: nn.Module, fsd_inputs: Sequence[Tensor], old_out: Tensor, fsd_fn, coef: float):
        self.module, self.inputs, self.old_out = module, tuple(fsd_inputs), old_out
        self.fsd_fn, self.coef = fsd_fn, coef
        self.calls = self.fired = 0
        self.value: Optional[float] = None
        self._rows: Optional[int] = None  # the rows of the call being carried, between its two hooks
        self._pad: Optional[Tensor] = None
        self._autocast = _autocast_state()  # f(x̃; θ)'s: f(x̃; θ') must be formed alike

    def _matches(self, args, kwargs) -> bool:
        return not kwargs and len(args) == len(self.inputs) and all(
            isinstance(a, Tensor) and a.dim() >= 1 and a.dtype == x.dtype and a.device == x.device
            and a.shape[1:] == x.shape[1:] for a, x in zip(args, self.inputs))

    def _before(self, module, args, kwargs):
        if (self.calls or not torch.is_grad_enabled() or not self._matches(args, kwargs)
                or _autocast_state() != self._autocast):
            return None
        self.calls += 1
        self._rows = args[0].shape[0]
        return tuple(torch.cat((a, x)) for a, x in zip(args, self.inputs)), kwargs

    def _after(self, module, args, kwargs, output):
        if self._rows is None:
            return None
        n, self._rows = self._rows, None
        if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != n + self.old_out.shape[0]:
            raise RuntimeError("JointFSD: a model that maps rows each on its own returned "
                               f"{type(output).__name__} of another number of rows")
        value, grad = discrepancy.value_and_grad(self.fsd_fn, output[n:], self.old_out, self.coef)
        self.value = float(value)
        if output.requires_grad:
            self._pad = torch.cat((grad.new_zeros((n, *grad.shape[1:])), grad))
            output.register_hook(self._add)
        return output[:n]

    def _add(self, g: Tensor) -> Tensor:
        self.fired += 1
        return g if self.fired > 1 else g + self._pad.to(g.dtype)

    def outcome(self) -> str:
        if self.fired == 0:
            return "absent"
        return "fused" if self.fired == 1 else "spoilt"


@dataclass
class MetaObjective:
    """Result of ``proximal_objective_grad``.

    value: Q(φ) as a float; loss / fsd / wsd: its three terms (fsd is D_F before λ_FSD, wsd is
    ½‖Δ‖² before λ_WSD); grads: ∇θ'Q per parameter, in the dtype of the deltas. A Δ that is not
    finite cannot be evaluated: then every term is NaN (wsd not finite) and grads is empty.
    """

    value: float
    loss: float
    fsd: float
    wsd: float
    grads: list = field(default_factory=list)


def proximal_objective_grad(
    model: nn.Module,
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    closure: Callable[[], Tensor],
    *,
    fsd_inputs: Optional[Sequence] = None,
    lambda_fsd: float = 0.0,
    lambda_wsd: float = 0.0,
    fsd: Union[str, Callable] = "kl",
    grad_scale: Optional[float] = None,
    rng: Optional[RNGState] = None,
    buffers: Optional[LookaheadBuffers] = None,
    step_forward: Optional[StepForward] = None,
    form_deltas: Optional[Callable[[list, list], float]] = None,
    joint_fsd: bool = False,
    all_ranks: Optional[Callable[[bool, str], bool]] = None,
) -> MetaObjective:
    """Q(φ) and ∇θ'Q at θ' = θ + Δ, using the real model; θ is restored exactly afterwards.

    Args:
        model: the module whose ``params`` are updated; called as ``model(*fsd_inputs)`` for FSD.
        params: the parameters Δ applies to (those with a gradient this step).
        deltas: Δ per parameter, same shapes; their dtype is the dtype of the returned gradients.
        closure: the step's closure (zero grads, forward on the SAME batch, backward, return loss).
        fsd_inputs: a tuple of positional inputs for the FSD forwards; needed when λ_FSD ≠ 0.
        grad_scale: the GradScaler's current scale if the closure scales its loss (grads are
            divided by it).
        rng: RNG state to replay before the closure (the step's dropout masks).
        buffers: where θ' is written (``LookaheadBuffers``); pass the same one on every call to
            reuse its memory.
        step_forward: a ``StepForward`` that watched the step's closure at θ: when it saw the model
            called on ``fsd_inputs`` themselves, that output is f(x̃; θ) (no FSD forward at θ, and
            the FSD term rides on the closure at θ').
        form_deltas: ``deltas`` are buffers not formed yet: ``form_deltas(θ, out)`` writes Δ into them
            and θ + Δ into out in the pass that writes θ' (``ModelSnapshot.write``), returning ‖Δ‖².
        joint_fsd: with the FSD term on another batch, let the FSD forward and backward at θ' ride on
            the closure's (``JointFSD``) where the model maps rows each on its own
            (``rows_independent``). Off where the closure's backward is not all there is to the
            gradient (an optimizer over several processes averages the FSD gradient itself).
        all_ranks: ``all_ranks(flag, what)`` is True when ``flag`` is True on every process (the
            check of f(x̃; θ) must end every rank's meta-step alike); None: one process.

    Raises ``FSDReferenceNotFinite`` (θ, buffers and the RNG restored) when the FSD term is not
    finite even at θ' = θ: over several processes checked before θ' is written, on one process only
    when the term at θ' came out not finite (a finite one says f(x̃; θ) is usable).

    Passes over the model: the closure at θ' (forward + backward) and, when λ_FSD ≠ 0, a forward
    at θ without a graph and a forward + backward at θ' on ``fsd_inputs``. When ``step_forward``
    has f(x̃; θ) (the FSD batch is the step's batch) neither is made: the closure's forward at θ'
    is f(x̃; θ') too and its backward carries the FSD term (``FusedFSD``), so a meta-step costs the
    passes it costs without the FSD term. With ``joint_fsd`` on a model that maps rows each on its
    own, the FSD forward and backward at θ' run inside the closure's, on its batch with the FSD rows
    appended (``JointFSD``): one forward and one backward at θ' in all. ∇θ'Q is the gradient the
    closure's backward wrote (taken, not copied), plus λ_FSD times FSD's where a backward of its own
    computed that. Over the parameters: one pass writes θ' and sums ‖Δ‖² (the WSD term, and the
    check that Δ is finite: when it is not, nothing more is computed and Q is NaN).

    The FSD forwards at θ and θ' run from the same RNG state (equal dropout masks; with
    ``step_forward``, the state the step's own forward started from) and under the caller's
    autocast state; FSD's backward goes through ``torch.autograd.grad`` so it does not
    touch ``.grad``. Global RNG state is restored on exit, so meta-steps do not shift the user's
    random stream.
    """
    fsd_fn = discrepancy.resolve(fsd)
    need_fsd = lambda_fsd != 0.0
    if need_fsd and fsd_inputs is None:
        raise ValueError("fsd_inputs is required when lambda_fsd != 0 (pass step(..., fsd_inputs=(x,)))")
    if need_fsd and not isinstance(fsd_inputs, (tuple, list)):
        fsd_inputs = (fsd_inputs,)
    params = list(params)
    rng_outer = RNGState(cuda_devices_of(params))
    # snapshot before the first forward: the FSD forward at θ moves BatchNorm statistics too
    snap = ModelSnapshot(model, params, buffers)
    fsd_value = 0.0
    try:
        old_out, rider = None, None  # rider: the FSD term carried by the closure at θ'
        if need_fsd:
            coef = lambda_fsd * (1.0 if grad_scale is None else grad_scale)
            found = None if step_forward is None else step_forward.reusable()
            if found is not None:
                old_out, rng_fsd = found
                rider = FusedFSD(step_forward, old_out, rng_fsd, fsd_fn, coef)
            else:
                rng_fsd = rng_outer  # (nothing has drawn since: the state to replay)
                with torch.no_grad():
                    old_out = _detach_tree(model(*fsd_inputs))
                if joint_fsd and _joinable(fsd_inputs, old_out) and rows_independent(model):
                    rider = JointFSD(model, fsd_inputs, old_out, fsd_fn, coef)
            if all_ranks is not None:  # every rank must end its meta-step alike: agreed before θ' is written
                _refuse_unless(all_ranks(_fsd_finite_at_theta(fsd_fn, old_out), "the finiteness of the FSD term at θ"))
        sum_sq = snap.write(deltas, form_deltas)  # ‖Δ‖², from the pass that writes θ'
        if not math.isfinite(sum_sq):  # Δ is not finite: there is no θ' to evaluate
            nan = float("nan")
            return MetaObjective(value=nan, loss=nan, fsd=nan, wsd=nan, grads=[])
        if rng is not None:
            rng.restore()
        # where the closure starts, for the rerun a spoilt ride needs (the state rng holds, when given)
        rng_closure = rng if rng is not None or rider is None else RNGState(rng_outer.cuda_devices)
        with torch.enable_grad(), (rider or contextlib.nullcontext()):
            loss = closure()
        if rider is not None and rider.outcome() == "spoilt":  # once more, without the FSD term
            for p in snap.grad_params:  # as the snapshot left them: DDP's bucket views stay in place
                if p.grad is not None and not borrowed(p.grad):
                    p.grad = None
            rng_closure.restore()
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError("the closure must return the loss for a meta-step")
        grads = [_own_gradient(p.grad, d) for p, d in zip(params, deltas)]
        if grad_scale is not None and grad_scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / grad_scale)
        if rider is not None and rider.outcome() == "fused":
            fsd_value = rider.value
        elif need_fsd:
            rng_fsd.restore()
            with torch.enable_grad():
                out = model(*fsd_inputs)
                if isinstance(out, Tensor):  # D_F's own gradient in closed form where it has one
                    f, grad_out = discrepancy.value_and_grad(fsd_fn, out, old_out)
                    fsd_grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
                else:
                    f = fsd_fn(out, old_out)
                    fsd_grads = torch.autograd.grad(f, params, allow_unused=True)
            fsd_value = float(f.detach())
            del out
            # g is our own tensor: accumulate in place, one foreach op (.to: no copy in g's dtype)
            pairs = [(g, fg) for g, fg in zip(grads, fsd_grads) if fg is not None]
            if pairs:
                torch._foreach_add_([g for g, _ in pairs], [fg.to(g.dtype) for g, fg in pairs], alpha=lambda_fsd)
            del f, fsd_grads
        if need_fsd and all_ranks is None and not math.isfinite(fsd_value):
            # on one process f(x̃; θ) is checked only once the term at θ' is not finite: a finite
            # D_F(f(x̃; θ'), f(x̃; θ)) holds no NaN of f(x̃; θ), and the check, a cold call there, is spared
            _refuse_unless(_fsd_finite_at_theta(fsd_fn, old_out))
        loss_value = loss_scalar(loss)
        del loss, old_out
    finally:
        snap.restore()
        rng_outer.restore()
    wsd = 0.5 * sum_sq
    if lambda_wsd != 0.0:
        torch._foreach_add_(grads, [d.detach() for d in deltas], alpha=lambda_wsd)
    value = loss_value + lambda_fsd * fsd_value + lambda_wsd * wsd
    return MetaObjective(value=value, loss=loss_value, fsd=fsd_value, wsd=wsd, grads=grads)


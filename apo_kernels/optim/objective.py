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

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from . import discrepancy
from .snapshot import LookaheadBuffers, ModelSnapshot, RNGState, borrowed, cuda_devices_of

__all__ = ["MetaObjective", "proximal_objective_grad"]


def _detach_tree(x):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def _own_gradient(g: Optional[Tensor], delta: Tensor) -> Tensor:
    """The closure's gradient at θ' as a tensor of Δ's dtype that nothing else writes: the
    closure's own tensor when it is one (the snapshot set the old one aside, so the backward made
    a new one), else a copy (another dtype, or a view into memory DDP's next backward rewrites)."""
    if g is None:
        return torch.zeros_like(delta)
    g = g.detach()
    return g if g.dtype == delta.dtype and not borrowed(g) else g.to(delta.dtype, copy=True)


@dataclass
class MetaObjective:
    """Result of ``proximal_objective_grad``.

    value: Q(φ) as a float; loss / fsd / wsd: its three terms (fsd is D_F before λ_FSD, wsd is
    ½‖Δ‖² before λ_WSD); grads: ∇θ'Q per parameter, in the dtype of the deltas.
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

    Passes over the model: the closure at θ' (forward + backward) and, when λ_FSD ≠ 0, a forward
    at θ without a graph and a forward + backward at θ' on ``fsd_inputs``. ∇θ'Q is the gradient
    the closure's backward wrote (taken, not copied) plus λ_FSD times FSD's.

    The FSD forwards at θ and θ' run from the same RNG state (equal dropout masks) and under the
    caller's autocast state; FSD's backward goes through ``torch.autograd.grad`` so it does not
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
        old_out = None
        if need_fsd:
            rng_fsd = RNGState(rng_outer.cuda_devices)
            with torch.no_grad():
                old_out = _detach_tree(model(*fsd_inputs))
        snap.write(deltas)
        if rng is not None:
            rng.restore()
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("the closure must return the loss for a meta-step")
        grads = [_own_gradient(p.grad, d) for p, d in zip(params, deltas)]
        if grad_scale is not None and grad_scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / grad_scale)
        if need_fsd:
            rng_fsd.restore()
            with torch.enable_grad():
                f = fsd_fn(model(*fsd_inputs), old_out)
                fsd_grads = torch.autograd.grad(f, params, allow_unused=True)
            fsd_value = float(f.detach())
            for g, fg in zip(grads, fsd_grads):  # g is our own copy: accumulate in place
                if fg is not None:
                    g.add_(fg.to(g.dtype), alpha=lambda_fsd)
            del f, fsd_grads
        loss_value = float(loss.detach())
        del loss, old_out
    finally:
        snap.restore()
        rng_outer.restore()
    wsd = 0.5 * sum(float(torch.linalg.vector_norm(d.detach())) ** 2 for d in deltas)
    if lambda_wsd != 0.0:
        for g, d in zip(grads, deltas):
            g.add_(d.detach(), alpha=lambda_wsd)
    value = loss_value + lambda_fsd * fsd_value + lambda_wsd * wsd
    return MetaObjective(value=value, loss=loss_value, fsd=fsd_value, wsd=wsd, grads=grads)


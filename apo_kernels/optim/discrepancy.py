"""Function-space discrepancies D_F(new, old) for APO's proximal meta-objective.

Each function takes the model's outputs at the lookahead θ' (``new``, differentiable) and at the
current θ (``old``, detached) and returns a scalar averaged over the batch. Outputs are cast to
float32 (or kept float64) first, so the term is accurate under autocast.

- ``"kl"``:  mean over the batch of KL(softmax(old) ‖ softmax(new)) over the last dim, i.e. from
  the current predictive distribution to the lookahead's. ``new``/``old``: logits (…, C).
- ``"mse"``: mean over the batch of ½‖new − old‖² (summed over the output dims); regression.
- ``"bernoulli"``: mean over the batch of Σ_outputs KL(Bernoulli(σ(old)) ‖ Bernoulli(σ(new))):
  independent binary outputs (multi-label classification, a sigmoid autoencoder's pixels) given
  as logits (N, …).
- a callable ``fsd(new, old) -> scalar Tensor`` for anything else (tuple/dict outputs, …).

``value_and_grad(fsd, new, old)`` gives D_F and its gradient with respect to ``new``: in closed form
for the three built-ins (a handful of elementwise ops; on a small model autograd's graph around
them cost 2–3× as much as the ops themselves; for ``kl`` one native call, ``apo::kl_value_and_grad``,
where the native module is built), through autograd for a callable.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import backends

Discrepancy = Callable[[object, object], Tensor]


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p·(log p − log q) per entry, 0 where p = 0 (0·log 0 = 0): a masked class or output (an
    infinite logit) adds nothing rather than 0·(−inf − −inf) = NaN."""
    return torch.where(p == 0, 0.0, p * (log_p - log_q))


def kl(new: Tensor, old: Tensor) -> Tensor:
    """KL(p_old ‖ p_new) over the last dim, averaged over all leading dims. Shapes (…, C). A class
    with p_old = 0 (a masked logit, −inf) adds nothing."""
    if not isinstance(new, Tensor) or not isinstance(old, Tensor):
        raise TypeError("fsd='kl' needs the model to return a logits Tensor; pass a callable fsd instead")
    log_new = F.log_softmax(_upcast(new), dim=-1)
    log_old = F.log_softmax(_upcast(old), dim=-1)
    return _kl_terms(log_old.exp(), log_old, log_new).sum(-1).mean()


def mse(new: Tensor, old: Tensor) -> Tensor:
    """½‖new − old‖² summed over the output dims, averaged over the batch (dim 0). Shapes (N, …)."""
    if not isinstance(new, Tensor) or not isinstance(old, Tensor):
        raise TypeError("fsd='mse' needs the model to return a Tensor; pass a callable fsd instead")
    diff = _upcast(new) - _upcast(old)
    if diff.ndim == 0:
        return 0.5 * diff * diff
    return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(-1).mean()


def bernoulli(new: Tensor, old: Tensor) -> Tensor:
    """Σ over output dims of KL(Bern(σ(old)) ‖ Bern(σ(new))), averaged over the batch (dim 0).

    Logits in, shapes (N, …). With log σ(x) = logsigmoid(x) and log(1 − σ(x)) = logsigmoid(−x):
    KL = σ(a)·(log σ(a) − log σ(b)) + σ(−a)·(log σ(−a) − log σ(−b)), a = old, b = new — finite and
    accurate for logits of any size (no log of a rounded 0 or 1); a term whose probability is 0 adds
    nothing, so ±inf logits in both (masked outputs) give 0.
    """
    if not isinstance(new, Tensor) or not isinstance(old, Tensor):
        raise TypeError("fsd='bernoulli' needs the model to return a logits Tensor; pass a callable fsd instead")
    a, b = _upcast(old), _upcast(new)
    kl_elem = (_kl_terms(torch.sigmoid(a), F.logsigmoid(a), F.logsigmoid(b))
               + _kl_terms(torch.sigmoid(-a), F.logsigmoid(-a), F.logsigmoid(-b)))
    if kl_elem.ndim == 0:
        return kl_elem
    return kl_elem.reshape(kl_elem.shape[0], -1).sum(-1).mean()


_BY_NAME = {"kl": kl, "mse": mse, "bernoulli": bernoulli}


def _rows(x: Tensor, leading: str) -> int:
    """What the built-in averages over: every leading dim ("all", kl) or dim 0 ("first")."""
    if x.ndim == 0:
        return 1
    return x.numel() // x.shape[-1] if leading == "all" else x.shape[0]


def _kl_value_and_grad(new: Tensor, old: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # One native call where there is one (apo::kl_value_and_grad): on a small model's outputs each
    # op's call, not its arithmetic, is the cost, and log_softmax over a few classes is slow per row.
    if backends.native_kl_value_and_grad is not None and new.ndim >= 1:
        x = _upcast(new)
        return backends.native_kl_value_and_grad(x, old.to(x.dtype), scale)
    return kl_value_and_grad_torch(new, old, scale)


def kl_value_and_grad_torch(new: Tensor, old: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``value_and_grad(kl, new, old, scale)`` with torch's ops: the native op's fallback, and what it
    is timed against (bench/test_bench_fsd.py)."""
    # ∂/∂z KL(p_old ‖ softmax(z)) = softmax(z) − p_old per row (p_old sums to one), over the rows.
    # Few ops, in place: _kl_terms' rule without its temporaries (torch.where there took this
    # function from 25 to 33 ms on 4096×1000 logits, measured back to back).
    log_new = F.log_softmax(_upcast(new), dim=-1)
    log_old = F.log_softmax(_upcast(old), dim=-1)
    p_old = log_old.exp()
    rows = _rows(new, "all")
    value = log_old.sub_(log_new).mul_(p_old).masked_fill_(p_old == 0, 0.0).sum().div_(rows)
    return value, log_new.exp_().sub_(p_old).mul_(scale / rows)


def _mse_value_and_grad(new: Tensor, old: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    diff = _upcast(new) - _upcast(old)
    rows = _rows(new, "first")
    return 0.5 * diff.pow(2).sum() / rows, diff.mul_(scale / rows)


def _bernoulli_value_and_grad(new: Tensor, old: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # ∂/∂b of the per-entry KL above is σ(b) − σ(a)
    value = bernoulli(new, old)
    return value, torch.sigmoid(_upcast(new)).sub_(torch.sigmoid(_upcast(old))).mul_(scale / _rows(new, "first"))


_CLOSED_FORM = {kl: _kl_value_and_grad, mse: _mse_value_and_grad, bernoulli: _bernoulli_value_and_grad}


def value_and_grad(fsd: Discrepancy, new, old, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(D_F(new, old) detached, ``scale`` · ∂D_F/∂new in ``new``'s dtype) for a Tensor ``new``
    (treated as a leaf: nothing flows into the graph that produced it). ``fsd``: a ``resolve``d
    discrepancy."""
    if not isinstance(new, Tensor):
        raise TypeError(f"new must be a Tensor, got {type(new).__name__}")
    closed = _CLOSED_FORM.get(fsd)
    if closed is not None and isinstance(old, Tensor) and new.numel() > 0:
        with torch.no_grad():
            value, grad = closed(new.detach(), old.detach(), float(scale))
        return value, grad.to(new.dtype)
    with torch.enable_grad():
        leaf = new.detach().requires_grad_(True)
        value = fsd(leaf, old)
        # a discrepancy that does not read ``new`` has a zero gradient
        (grad,) = torch.autograd.grad(value, leaf, allow_unused=True) if value.requires_grad else (None,)
    if grad is None:
        return value.detach(), torch.zeros_like(leaf)
    return value.detach(), grad if scale == 1.0 else grad.mul_(scale)


def resolve(fsd: Union[str, Discrepancy]) -> Discrepancy:
    """``"kl"`` / ``"mse"`` / ``"bernoulli"`` / a callable → the discrepancy function; ValueError/TypeError
    naming ``fsd``."""
    if isinstance(fsd, str):
        if fsd not in _BY_NAME:
            raise ValueError(f"fsd must be one of {sorted(_BY_NAME)} or a callable, got {fsd!r}")
        return _BY_NAME[fsd]
    if callable(fsd):  # the built-ins keep their closed form (by identity: a callable may be unhashable)
        return fsd if any(fsd is f for f in _CLOSED_FORM) else _scalar_checked(fsd)
    raise TypeError(f"fsd must be a str or a callable(new_out, old_out) -> Tensor, got {type(fsd).__name__}")


def _scalar_checked(fn: Callable) -> Discrepancy:
    """A user's discrepancy, whose value must be one number (Q adds it; autograd differentiates it):
    anything else is refused naming ``fsd`` when a meta-step calls it."""
    @functools.wraps(fn)
    def checked(new, old):
        value = fn(new, old)
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"fsd: a callable fsd must return the discrepancy as a one-element tensor "
                             f"(averaged over the batch), got {got}")
        return value.reshape(())
    return checked

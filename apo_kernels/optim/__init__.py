"""APO optimizers built on the structured preconditioner op.

    from apo_kernels.optim import APOLR, APOPrecond

- ``APOLR(model, base_optimizer, lambda_fsd=..., lambda_wsd=...)``: meta-learns the learning rate
  (log lr) of any torch.optim optimizer.
- ``APOPrecond(model, lr=..., lambda_fsd=..., lambda_wsd=..., meta_lr=...)``: meta-learns a
  structured preconditioner A·(S²⊙(AᵀGB))·Bᵀ per layer.

Both use torch.optim's closure convention: ``opt.step(closure, fsd_inputs=(x,))`` returns the loss.
The lower layer (lookahead, proximal objective, per-parameter preconditioners) is
``apo_kernels.optim.meta``; the discrepancies are in ``apo_kernels.optim.discrepancy``.
"""
from . import discrepancy, meta
from .lr import APOLR, lr_directions
from .meta import (
    DiagonalPreconditioner,
    StructuredPreconditioner,
    lookahead,
    proximal_objective_grad,
)
from .precond import APOPrecond

__all__ = [
    "APOLR",
    "APOPrecond",
    "StructuredPreconditioner",
    "DiagonalPreconditioner",
    "lookahead",
    "proximal_objective_grad",
    "lr_directions",
    "meta",
    "discrepancy",
]

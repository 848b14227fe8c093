"""APO optimizers built on the structured preconditioner op.

    from apo_kernels.optim import APOLR, APOPrecond

- ``APOLR(model, base_optimizer, lambda_fsd=..., lambda_wsd=...)``: meta-learns the learning rate
  (log lr) of any torch.optim optimizer.
- ``APOPrecond(model, lr=..., lambda_fsd=..., lambda_wsd=..., meta_lr=...)``: meta-learns a
  structured preconditioner A·(S²⊙(AᵀGB))·Bᵀ per layer.

Both use torch.optim's closure convention: ``opt.step(closure, fsd_inputs=(x,))`` returns the loss.
Both are torch.optim.Optimizer subclasses (param_groups, state, lr schedulers, step hooks).

The lower layer, for writing your own APO optimizer: ``snapshot`` (the lookahead θ + Δ in the
parameters; θ, buffers and gradients restored exactly, nothing copied), ``objective`` (the proximal meta-objective
and its gradient at the lookahead), ``preconditioners`` (structured and diagonal preconditioners,
many in one grouped op call) and ``discrepancy`` (the function-space discrepancies). How layers
become matrices is ``apo_kernels.layers``.
"""
from . import discrepancy, objective, preconditioners, snapshot
from .lr import APOLR, lr_directions
from .objective import proximal_objective_grad
from .precond import APOPrecond
from .preconditioners import DiagonalPreconditioner, StructuredPreconditioner
from .snapshot import lookahead

__all__ = [
    "APOLR",
    "APOPrecond",
    "StructuredPreconditioner",
    "DiagonalPreconditioner",
    "lookahead",
    "proximal_objective_grad",
    "lr_directions",
    "discrepancy",
    "objective",
    "preconditioners",
    "snapshot",
]

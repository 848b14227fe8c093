"""apo-kernels: fused kernels and optimizers for Amortized Proximal Optimization (APO).

    import apo_kernels
    Y = apo_kernels.precondition(G, A, S, B)        # A·(S⊙(AᵀGB))·Bᵀ, differentiable
    Y = apo_kernels.precondition(G, None, S, B)     # A = I: an identity factor, never formed
    apo_kernels.backends()                            # which backends run here, or why not

The backends are one registry (``apo_kernels.ops.backends``; docs/ARCHITECTURE.md).

Optimizers live in ``apo_kernels.optim`` (APOLR, APOPrecond), baselines in
``apo_kernels.baselines`` (KFAC, EKFAC), the benchmark in ``apo_kernels.bench`` (``apo-bench``).
"""
from .ops import (
    precondition,
    precondition_backward,
    precondition_grouped,
    precondition_grouped_backward,
    precondition_momentum_grouped,
)
from .ops.backends import backends

__version__ = "0.1.0"

__all__ = [
    "backends",
    "precondition",
    "precondition_backward",
    "precondition_grouped",
    "precondition_grouped_backward",
    "precondition_momentum_grouped",
    "__version__",
]

"""Curvature baselines for apo-bench, in the same ``step(closure)`` contract as the APO optimizers.

    from apo_kernels.baselines import KFAC, EKFAC
    opt = KFAC(model, lr=0.05, damping=1e-3)       # or EKFAC(model, ...)
    loss = opt.step(closure)

Both find the model's Linear / Conv2d layers, keep Kronecker factors from forward/backward hooks
(empirical Fisher) and invert / eigendecompose them in float32 every ``inverse_interval`` steps.
"""
from .ekfac import EKFAC, eigenbasis, ekfac_apply, projected_second_moment
from .kfac import KFAC, damped_inverse, factored_damping, kfac_apply, kronecker_factors

__all__ = [
    "KFAC",
    "EKFAC",
    "kronecker_factors",
    "factored_damping",
    "damped_inverse",
    "kfac_apply",
    "eigenbasis",
    "projected_second_moment",
    "ekfac_apply",
]

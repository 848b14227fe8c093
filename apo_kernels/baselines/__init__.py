"""Curvature baselines for apo-bench, in the same ``step(closure)`` contract as the APO optimizers.

    from apo_kernels.baselines import KFAC, EKFAC
    opt = KFAC(model, lr=0.05, damping=1e-3)       # empirical Fisher (the default)
    opt = KFAC(model, lr=0.05, damping=1e-3, fisher="mc", likelihood="categorical")  # Martens & Grosse
    loss = opt.step(closure)

Both take the model's layers with Kronecker factors from the layer registry (``apo_kernels.layers``:
Linear, Conv1d/2d/3d, and any registered type), keep the factors from forward/backward hooks
(empirical Fisher, or the sampled Fisher with ``fisher="mc"``) and invert / eigendecompose them in
float32 every ``inverse_interval`` steps, with a damping floor and a fallback that never raises.
"""
from .ekfac import EKFAC, eigenbasis, ekfac_apply, projected_second_moment
from .kfac import (
    FISHER_TYPES,
    KFAC,
    LIKELIHOODS,
    damped_inverse,
    damped_inverse_ex,
    factored_damping,
    kfac_apply,
    kronecker_factors,
    sampled_output_gradient,
)

__all__ = [
    "KFAC",
    "EKFAC",
    "FISHER_TYPES",
    "LIKELIHOODS",
    "kronecker_factors",
    "factored_damping",
    "damped_inverse",
    "damped_inverse_ex",
    "kfac_apply",
    "sampled_output_gradient",
    "eigenbasis",
    "projected_second_moment",
    "ekfac_apply",
]

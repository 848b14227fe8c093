"""The structured preconditioner op Y = A·(S⊙(AᵀGB))·Bᵀ: validation, reference, backends, dispatch.

``apo_kernels.ops.backends`` is the backend registry (a module; its status function ``backends()``
is ``apo_kernels.backends()``).
"""
from . import backends
from .backends import Backend, register, registered, unregister, usable
from .dispatch import (
    precondition,
    precondition_backward,
    precondition_grouped,
    precondition_grouped_backward,
    precondition_momentum_grouped,
    resolve_backend,
)
from .library import OpFamily, library_family

__all__ = [
    "Backend",
    "OpFamily",
    "library_family",
    "precondition",
    "precondition_backward",
    "precondition_grouped",
    "precondition_grouped_backward",
    "precondition_momentum_grouped",
    "register",
    "registered",
    "resolve_backend",
    "unregister",
    "usable",
]

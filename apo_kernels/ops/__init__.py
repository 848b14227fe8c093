"""The structured preconditioner op Y = A·(S⊙(AᵀGB))·Bᵀ: validation, reference, backends, dispatch.

The backend registry is ``apo_kernels.ops.backends`` (note: ``apo_kernels.ops.backends`` the
attribute is the status function ``backends()``; import the registry's names from the module path
``apo_kernels.ops.backends`` or from here).
"""
from .backends import Backend, register, registered, unregister, usable
from .dispatch import (
    backends,
    precondition,
    precondition_backward,
    precondition_grouped,
    precondition_grouped_backward,
    resolve_backend,
)
from .library import OpFamily, library_family

__all__ = [
    "Backend",
    "OpFamily",
    "backends",
    "library_family",
    "precondition",
    "precondition_backward",
    "precondition_grouped",
    "precondition_grouped_backward",
    "register",
    "registered",
    "resolve_backend",
    "unregister",
    "usable",
]

"""Plain-PyTorch reference of the structured preconditioner op: the fallback and the test oracle.

    Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ

Backward with upstream dY, H = AᵀGB, M = S⊙H:

    D  = Aᵀ dY B          E  = S ⊙ D
    dS = D ⊙ H            dG = A E Bᵀ
    dA = dY B Mᵀ + G B Eᵀ
    dB = dYᵀ A M + Gᵀ A E

A or B None is an identity factor: its GEMMs are skipped, and its gradient is None.

Every function takes 2-D (m, n) or batched 3-D (L, m, n) inputs (``torch.matmul`` broadcasts) and
computes in the inputs' dtype; pass float64 tensors to get the oracle, half-precision tensors to get
the plain torch chain in that dtype (every GEMM rounded). The ``reference`` backend runs them through
:func:`rounded_once`, the op's precision contract for float16/bfloat16.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .library import OpFamily


_HALF = (torch.float16, torch.bfloat16)


def _cast(x, dtype):
    """x (a tensor, or a list/tuple of them, or None) cast to ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _first_tensor(args) -> Optional[Tensor]:
    for a in args:
        for v in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(v, Tensor):
                return v
    return None


def rounded_once(fn, *args):
    """``fn(*args)`` in float32 when the tensors are float16/bfloat16, each result rounded once to
    their dtype (fp32 accumulation, rounded once); other dtypes run as they are.

    Differentiable: autograd goes through the casts, so gradients are rounded once as well.
    """
    first = _first_tensor(args)
    if first is None or first.dtype not in _HALF:
        return fn(*args)
    return _cast(fn(*(_cast(a, torch.float32) for a in args)), first.dtype)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


# An identity factor (None) skips its GEMM: these apply A, Aᵀ, B or Bᵀ, or nothing.
def _left(A: Optional[Tensor], x: Tensor) -> Tensor:
    return x if A is None else A @ x


def _left_t(A: Optional[Tensor], x: Tensor) -> Tensor:
    return x if A is None else _t(A) @ x


def _right(x: Tensor, B: Optional[Tensor]) -> Tensor:
    return x if B is None else x @ B


def _right_t(x: Tensor, B: Optional[Tensor]) -> Tensor:
    return x if B is None else x @ _t(B)


def precondition(grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> Tensor:
    """Y = A (S ⊙ (Aᵀ grad B)) Bᵀ; A or B None means identity. Differentiable by ordinary autograd."""
    return _right_t(_left(A, S * _right(_left_t(A, grad), B)), B)


def precondition_backward(
    grad_out: Tensor,
    grad: Tensor,
    A: Optional[Tensor],
    S: Tensor,
    B: Optional[Tensor],
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients (d_grad, dA, dS, dB) of ⟨grad_out, Y⟩; None where ``output_mask`` is False and
    for an identity factor (A or B None)."""
    need_g, need_a, need_s, need_b = output_mask
    need_a = need_a and A is not None
    need_b = need_b and B is not None
    GB = _right(grad, B)
    H = _left_t(A, GB)
    dYB = _right(grad_out, B)
    D = _left_t(A, dYB)
    E = S * D
    M = S * H
    d_grad = _right_t(_left(A, E), B) if need_g else None
    dA = dYB @ _t(M) + GB @ _t(E) if need_a else None
    dS = D * H if need_s else None
    dB = _t(grad_out) @ _left(A, M) + _t(grad) @ _left(A, E) if need_b else None
    return d_grad, dA, dS, dB


def precondition_grouped(grads, As, Ss, Bs) -> list[Tensor]:
    return [precondition(g, a, s, b) for g, a, s, b in zip(grads, As, Ss, Bs)]


def precondition_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask=(True,) * 4):
    """Per-layer backward; returns four lists (empty where ``output_mask`` is False; None in the
    slot of an identity factor)."""
    per_layer = [
        precondition_backward(dy, g, a, s, b, output_mask)
        for dy, g, a, s, b in zip(grad_outs, grads, As, Ss, Bs)
    ]
    return tuple(
        [layer[k] for layer in per_layer] if output_mask[k] else [] for k in range(4)
    )


def _backend_backward(grad_out, grad, A, S, B, output_mask):
    return rounded_once(precondition_backward, grad_out, grad, A, S, B, tuple(output_mask))


def _backend_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask):
    return rounded_once(precondition_grouped_backward, grad_outs, grads, As, Ss, Bs, tuple(output_mask))


# The ``reference`` backend: the functions above, half precision computed in fp32 and rounded once.
FAMILY = OpFamily(
    forward=functools.partial(rounded_once, precondition),
    backward=_backend_backward,
    grouped=functools.partial(rounded_once, precondition_grouped),
    grouped_backward=_backend_grouped_backward,
)


def preconditioner_matrix(A: Tensor, S: Tensor, B: Tensor) -> Tensor:
    """Explicit P = (A⊗B)·diag(vec S)·(A⊗B)ᵀ with row-major vec, so vec(Y) = P·vec(G).

    Only for tests and small examples: P is (mn)×(mn); A and B are explicit matrices here.
    """
    AB = torch.kron(A, B)
    return AB @ torch.diag(S.reshape(-1)) @ AB.T

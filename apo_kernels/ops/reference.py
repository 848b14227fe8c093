"""Plain-PyTorch reference of the structured preconditioner op: the fallback and the test oracle.

    Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ

Backward with upstream dY, H = AᵀGB, M = S⊙H:

    D  = Aᵀ dY B          E  = S ⊙ D
    dS = D ⊙ H            dG = A E Bᵀ
    dA = dY B Mᵀ + G B Eᵀ
    dB = dYᵀ A M + Gᵀ A E

Every function takes 2-D (m, n) or batched 3-D (L, m, n) inputs (``torch.matmul`` broadcasts) and
computes in the inputs' dtype; pass float64 tensors to get the oracle, half-precision tensors to get
the plain torch chain in that dtype (every GEMM rounded). The ``reference`` backend runs them through
:func:`rounded_once`, the op's precision contract for float16/bfloat16.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


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


def precondition(grad: Tensor, A: Tensor, S: Tensor, B: Tensor) -> Tensor:
    """Y = A (S ⊙ (Aᵀ grad B)) Bᵀ; differentiable through ordinary autograd."""
    return A @ (S * (_t(A) @ grad @ B)) @ _t(B)


def precondition_backward(
    grad_out: Tensor,
    grad: Tensor,
    A: Tensor,
    S: Tensor,
    B: Tensor,
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients (d_grad, dA, dS, dB) of ⟨grad_out, Y⟩; None where ``output_mask`` is False."""
    need_g, need_a, need_s, need_b = output_mask
    GB = grad @ B
    H = _t(A) @ GB
    dYB = grad_out @ B
    D = _t(A) @ dYB
    E = S * D
    M = S * H
    d_grad = A @ E @ _t(B) if need_g else None
    dA = dYB @ _t(M) + GB @ _t(E) if need_a else None
    dS = D * H if need_s else None
    dB = _t(grad_out) @ (A @ M) + _t(grad) @ (A @ E) if need_b else None
    return d_grad, dA, dS, dB


def precondition_grouped(grads, As, Ss, Bs) -> list[Tensor]:
    return [precondition(g, a, s, b) for g, a, s, b in zip(grads, As, Ss, Bs)]


def precondition_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask=(True,) * 4):
    """Per-layer backward; returns four lists (empty where ``output_mask`` is False)."""
    per_layer = [
        precondition_backward(dy, g, a, s, b, output_mask)
        for dy, g, a, s, b in zip(grad_outs, grads, As, Ss, Bs)
    ]
    return tuple(
        [layer[k] for layer in per_layer] if output_mask[k] else [] for k in range(4)
    )


def preconditioner_matrix(A: Tensor, S: Tensor, B: Tensor) -> Tensor:
    """Explicit P = (A⊗B)·diag(vec S)·(A⊗B)ᵀ with row-major vec, so vec(Y) = P·vec(G).

    Only for tests and small examples: P is (mn)×(mn).
    """
    AB = torch.kron(A, B)
    return AB @ torch.diag(S.reshape(-1)) @ AB.T

"""The Kronecker-factored preconditioner: APO-Precond with a rank-one S² = u vᵀ (u, v > 0).

With S² = u vᵀ the op's rule factorizes, since S²⊙X = diag(u)·X·diag(v):

    Y = A·(S²⊙(AᵀGB))·Bᵀ = (A diag(u) Aᵀ) · G · (B diag(v) Bᵀ) = L · G · R,

i.e. P = L ⊗ R, both factors PSD by construction (no inverse anywhere). A step is 2 GEMMs with
L and R cached; they are rebuilt (one GEMM per block) only when φ = (A, u, v, B) has changed,
which in the optimizer is after each meta-step. The meta-gradient is the op's fused backward at
S² = u vᵀ followed by the chain rule ∂u = ∂S²·v, ∂v = ∂S²ᵀ·u, so all layers still share one
grouped backward call (``preconditioners.meta_backward_many``).

Why 2 plain GEMMs and not the op: the op computes A·(S²⊙(AᵀGB))·Bᵀ, 4 GEMMs whatever S² is; L·G·R
is the same product with the two inner GEMMs folded into L and R once per meta-step.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._args import check_number
from .preconditioners import (
    StructuredPreconditioner,
    _add_grad,
    _ds,
    _init_s,
    _s2,
    _scale_s2,
)

__all__ = ["KronPreconditioner"]


class KronPreconditioner(StructuredPreconditioner):
    """Y = L·G·R with L = A diag(u) Aᵀ, R = B diag(v) Bᵀ for one (m, n) gradient matrix G.

    The same rule as ``StructuredPreconditioner`` with S² restricted to the rank-one u vᵀ: φ is
    (A blocks, su, sv, B blocks) with u = su², v = sv² ("linear") or u = exp(2·su), v = exp(2·sv)
    ("log", so S = su 1ᵀ + 1 svᵀ is S's log-parametrization restricted to a sum). Initially u = v =
    init_s, so S² = init_s² everywhere and Y = init_s²·G, as the full structure.

    Blocking (``max_dim``): as ``StructuredPreconditioner``, a side longer than ``max_dim`` has a
    block-diagonal factor; L (R) is then block-diagonal too, one dense block per row (column) block,
    and tile (i, j) of Y is L_i·G_ij·R_j. A fixed side (``learn_left=False``/``learn_right=False``)
    has no factor matrix at all: A = I, so L = diag(u), applied as a row scaling (the op receives
    A=None there).

    Attributes:
        A, B: lists of square blocks (empty for a fixed side); su (m,), sv (n,).
    """

    def __init__(
        self,
        m: int,
        n: int,
        *,
        init_s: float = 1.0,
        max_dim: Optional[int] = None,
        learn_left: bool = True,
        learn_right: bool = True,
        s_param: str = "log",
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
    ):
        self._init_factors(m, n, max_dim, learn_left, learn_right, s_param, dtype, device)
        # u·v = init_s² (the S² of the full structure): each side's "S" starts at √init_s
        root = math.sqrt(check_number("init_s", init_s, low=0.0, low_ok=False))
        self.su = _init_s((m,), root, s_param, dtype, device)
        self.sv = _init_s((n,), root, s_param, dtype, device)
        self._cache_key: Optional[tuple] = None
        self._L: list[Optional[Tensor]] = []
        self._R: list[Optional[Tensor]] = []

    # ---- φ ------------------------------------------------------------------------------
    def u(self) -> Tensor:
        """The row scales u (m,), positive in the "log" parametrization."""
        return _s2(self.su, self.s_param)

    def v(self) -> Tensor:
        """The column scales v (n,)."""
        return _s2(self.sv, self.s_param)

    def S2(self) -> Tensor:
        """S² = u vᵀ (m, n), materialized (the op's diagonal at a meta-step; statistics)."""
        return torch.outer(self.u(), self.v())

    def scale_s2(self, factor: float) -> None:
        """S² ← factor·S²: u takes the whole factor (L and R are rebuilt on the next apply)."""
        _scale_s2(self.su, factor, self.s_param)

    def parameters(self) -> list[Tensor]:
        """The meta-learned tensors: A blocks (if learnt), su, sv, B blocks (if learnt)."""
        return self.A + [self.su, self.sv] + self.B

    # ---- the cached factors ----------------------------------------------------------------
    def factors(self) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """(L blocks, R blocks) at the current φ; None for a fixed side (L = diag(u) there).

        Rebuilt only when a tensor of φ was written since the last call (its version counter
        moved: a meta-optimizer step, a recovery's scale_s2, load_state_dict, an in-place edit
        of ``parameters()``); otherwise the cached blocks are returned.
        """
        key = tuple(t._version for t in self.parameters())
        if key != self._cache_key:
            with torch.no_grad():
                u, v = self.u(), self.v()
                self._L = [(a * u[r0:r1]) @ a.T for a, (r0, r1) in zip(self.A, self.row_blocks)] or \
                    [None] * len(self.row_blocks)
                self._R = [(b * v[c0:c1]) @ b.T for b, (c0, c1) in zip(self.B, self.col_blocks)] or \
                    [None] * len(self.col_blocks)
            self._cache_key = key
        return self._L, self._R

    # ---- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, G: Tensor, *, backend: str = "auto", out: Optional[Tensor] = None,
              work: Optional[Tensor] = None) -> Tensor:
        """Y = L·G·R, shape (m, n): 2 GEMMs (per block) with the cached L and R; a fixed side is
        a row (column) scaling by u (v). ``backend`` is unused (no op call: plain GEMMs).

        ``out``, ``work``: (m, n) tensors in G's dtype for Y and for the intermediate L·G, instead
        of fresh ones (the same kernels, so the same values); Y is then ``out``. Used with one block
        per side; a blocked layout assembles fresh tensors whatever is passed."""
        Ls, Rs = self.factors()
        if len(Ls) > 1 or len(Rs) > 1:
            out = work = None
        if Ls[0] is None:
            left = torch.mul(G, self.u()[:, None], out=work)
        elif len(Ls) == 1:
            left = torch.mm(Ls[0], G, out=work)
        else:
            left = torch.cat([L @ G[r0:r1] for L, (r0, r1) in zip(Ls, self.row_blocks)], dim=0)
        if Rs[0] is None:
            return torch.mul(left, self.v(), out=out)
        if len(Rs) == 1:
            return torch.mm(left, Rs[0], out=out)
        return torch.cat([left[:, c0:c1] @ R for R, (c0, c1) in zip(Rs, self.col_blocks)], dim=1)

    def op_inputs(self, G: Tensor) -> tuple[list[Tensor], list[Optional[Tensor]], list[Tensor], list[Optional[Tensor]]]:
        """(grads, As, S²s, Bs) tile lists for the grouped op at S² = u vᵀ; None for a fixed side."""
        nr, nc = len(self.row_blocks), len(self.col_blocks)
        As = [self.A[k // nc] if self.learn_left else None for k in range(nr * nc)]
        Bs = [self.B[k % nc] if self.learn_right else None for k in range(nr * nc)]
        return self.tiles(G), As, self.tiles(self.S2()), Bs

    def accumulate_meta_grad(self, dAs: Sequence[Tensor], dS2s: Sequence[Tensor], dBs: Sequence[Tensor]) -> None:
        """Add the op's per-tile (dA, dS², dB) to ``.grad`` of A, su, sv, B: the chain rule through
        S² = u vᵀ (∂u = ∂S²·v, ∂v = ∂S²ᵀ·u) and then through the parametrization."""
        nc = len(self.col_blocks)
        if self.learn_left and dAs:
            for i, a in enumerate(self.A):
                _add_grad(a, sum(dAs[i * nc + j] for j in range(nc)))
        if self.learn_right and dBs:
            for j, b in enumerate(self.B):
                _add_grad(b, sum(dBs[i * nc + j] for i in range(len(self.row_blocks))))
        dS2 = self.assemble(dS2s)
        _add_grad(self.su, _ds(self.su, dS2 @ self.v(), self.s_param))
        _add_grad(self.sv, _ds(self.sv, dS2.T @ self.u(), self.s_param))

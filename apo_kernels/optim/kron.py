"""The Kronecker-factored preconditioner: APO-Precond with a rank-one S² = u vᵀ (u, v > 0).

With S² = u vᵀ the op's rule factorizes, since S²⊙X = diag(u)·X·diag(v):

    Y = A·(S²⊙(AᵀGB))·Bᵀ = (A diag(u) Aᵀ) · G · (B diag(v) Bᵀ) = L · G · R,

i.e. P = L ⊗ R, both factors PSD by construction (no inverse anywhere). A step is 2 GEMMs with
L and R cached (``apo::kron_precondition``: on CPU the op's GEMM engine); they are rebuilt (one
GEMM per block) only when φ = (A, u, v, B) has changed, which in the optimizer is after each
meta-step.

Why 2 plain GEMMs and not the op: the op computes A·(S²⊙(AᵀGB))·Bᵀ, 4 GEMMs whatever S² is; L·G·R
is the same product with the two inner GEMMs folded into L and R once per meta-step.

The meta-gradient is the same function's gradient taken through L and R instead of through the
op: for f = ⟨dY, L·G·R⟩, ∂L = dY·(G·R)ᵀ and ∂R = (L·G)ᵀ·dY (their diagonal blocks), and through
L = A diag(u) Aᵀ (with Σ = ∂L + ∂Lᵀ)

    ∂A = Σ·A·diag(u),      ∂u_k = ½·a_kᵀ·Σ·a_k  (a_k the k-th column of A),

the same for R, B, v. That is 6 GEMMs per layer (G·R, dY·(G·R)ᵀ, Σ·A and their mirror images)
where the op's fused backward at S² = u vᵀ takes 10 (its dS², then ∂u = ∂S²·v, ∂v = ∂S²ᵀ·u); the
two are the gradient of one function (tests/test_kron.py checks both against autograd through an
explicit L ⊗ R). A fixed side has L = diag(u): ∂u is then the row sums of dY ⊙ (G·R).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .._args import check_number
from ..ops import backends
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

    uses_op = False  # not the structured op: L·G·R (apo::kron_precondition) and a closed-form meta-gradient

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
        self._images: dict[torch.dtype, tuple[list, list]] = {}  # L and R rounded to a dtype, with them

    # ---- φ ------------------------------------------------------------------------------
    def u(self) -> Tensor:
        """The row scales u (m,), positive in the "log" parametrization."""
        return _s2(self.su, self.s_param)

    def v(self) -> Tensor:
        """The column scales v (n,)."""
        return _s2(self.sv, self.s_param)

    def S2(self) -> Tensor:
        """S² = u vᵀ (m, n), materialized (statistics; neither the step nor the meta-gradient forms it)."""
        return torch.outer(self.u(), self.v())

    def scale_s2(self, factor: float) -> None:
        """S² ← factor·S²: u takes the whole factor (L and R are rebuilt on the next apply)."""
        _scale_s2(self.su, factor, self.s_param)

    def parameters(self) -> list[Tensor]:
        """The meta-learned tensors: A blocks (if learnt), su, sv, B blocks (if learnt)."""
        return self.A + [self.su, self.sv] + self.B

    # ---- the cached factors ----------------------------------------------------------------
    def factors(self, dtype: Optional[torch.dtype] = None) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """(L blocks, R blocks) at the current φ; None for a fixed side (L = diag(u) there).

        Rebuilt only when a tensor of φ was written since the last call (its version counter
        moved: a meta-optimizer step, a recovery's scale_s2, load_state_dict, an in-place edit
        of ``parameters()``); otherwise the cached blocks are returned. ``dtype``: the blocks
        rounded to it, cast once per rebuild (the step of a half-precision model).
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
            self._images = {}
        if dtype is None or dtype == self.su.dtype:
            return self._L, self._R
        if dtype not in self._images:
            self._images[dtype] = tuple([None if f is None else f.to(dtype) for f in fs] for fs in (self._L, self._R))
        return self._images[dtype]

    # ---- the step ---------------------------------------------------------------------------
    def _left(self, X: Tensor, Ls: list[Optional[Tensor]], out: Optional[Tensor] = None) -> Tensor:
        """L·X (m, n): per row block, or a row scaling by u for a fixed left side."""
        if Ls[0] is None:
            return torch.mul(X, self.u()[:, None].to(X.dtype), out=out)
        if len(Ls) == 1:
            return torch.mm(Ls[0], X, out=out)
        return torch.cat([L @ X[r0:r1] for L, (r0, r1) in zip(Ls, self.row_blocks)], dim=0)

    def _right(self, X: Tensor, Rs: list[Optional[Tensor]], out: Optional[Tensor] = None) -> Tensor:
        """X·R (m, n): per column block, or a column scaling by v for a fixed right side."""
        if Rs[0] is None:
            return torch.mul(X, self.v().to(X.dtype), out=out)
        if len(Rs) == 1:
            return torch.mm(X, Rs[0], out=out)
        return torch.cat([X[:, c0:c1] @ R for R, (c0, c1) in zip(Rs, self.col_blocks)], dim=1)

    @property
    def native_step(self) -> bool:
        """Whether ``apply`` is one ``apo::kron_precondition`` call (then a fixed side's scaling): at
        most one block per side, at least one side learnt, and the native module built (the op keeps
        its intermediate itself: no ``work`` needed)."""
        return (len(self.A) <= 1 and len(self.B) <= 1 and len(self.A) + len(self.B) > 0
                and backends.native_kron_precondition is not None)

    @torch.no_grad()
    def apply(self, G: Tensor, *, backend: str = "auto", out: Optional[Tensor] = None,
              work: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Y = L·G·R, shape (m, n): 2 GEMMs (per block) with the cached L and R; a fixed side is
        a row (column) scaling by u (v). With at most one block per side (``native_step``), one call
        of ``apo::kron_precondition`` (on CPU the op's GEMM engine, blocks of rows over the threads;
        ATen's mm elsewhere), a fixed side's scaling after it; blocked layouts, torch's matmul.
        ``backend`` is unused (the structured op is not called).

        ``out``, ``work``: (m, n) tensors in G's dtype for Y and for the intermediate L·G, instead
        of fresh ones; Y is then ``out`` (``work`` serves the matmul route; the native op keeps a
        block of rows' intermediate of its own). A blocked layout assembles fresh tensors whatever
        is passed. ``dtype``: on G, L and R rounded to it (``factors``), Y in it; ``out`` and
        ``work`` must then be in it too."""
        if dtype is not None:
            G = G.to(dtype)
        Ls, Rs = self.factors(G.dtype)
        if self.native_step:
            out = torch.empty_like(G) if out is None else out
            backends.native_kron_precondition(G, Ls[0], Rs[0], out)  # None: an identity side
            if Ls[0] is None:  # a fixed side's scaling, applied to the op's result in place
                self._left(out, Ls, out=out)
            if Rs[0] is None:
                self._right(out, Rs, out=out)
            return out
        if len(Ls) > 1 or len(Rs) > 1:
            out = work = None
        return self._right(self._left(G, Ls, out=work), Rs, out=out)

    @torch.no_grad()
    def meta_backward(self, dY: Tensor, G: Tensor, *, backend: str = "auto") -> None:
        """Accumulate ∂⟨dY, L·G·R⟩/∂(A, su, sv, B) into their ``.grad`` in closed form (module
        docstring): 6 GEMMs per block pair, no op call (``backend`` is unused); dY, G (m, n)."""
        Ls, Rs = self.factors()
        du = self._side_grad(dY, self._right(G, Rs), self.A, self.u(), self.row_blocks, rows=True)
        dv = self._side_grad(dY, self._left(G, Ls), self.B, self.v(), self.col_blocks, rows=False)
        _add_grad(self.su, _ds(self.su, du, self.s_param), owned=True)
        _add_grad(self.sv, _ds(self.sv, dv, self.s_param), owned=True)

    @staticmethod
    def _side_grad(dY: Tensor, other: Tensor, factors: list[Tensor], scales: Tensor, blocks, *, rows: bool) -> Tensor:
        """One side's ∂scales (returned) and ∂factor blocks (added to their ``.grad``).

        rows=True: the left side, other = G·R, ∂L = dY·otherᵀ per row block; rows=False: the right
        side, other = L·G, ∂R = otherᵀ·dY per column block. Without factor matrices (a fixed side,
        L = diag(u)) ∂u = the diagonal of ∂L: the row (column) sums of dY ⊙ other."""
        if not factors:
            return (dY * other).sum(1 if rows else 0)
        d_scales = torch.empty_like(scales)
        for F, (k0, k1) in zip(factors, blocks):
            dF = dY[k0:k1] @ other[k0:k1].T if rows else other[:, k0:k1].T @ dY[:, k0:k1]
            sym_f = (dF + dF.T) @ F  # Σ·A
            d_scales[k0:k1] = 0.5 * (F * sym_f).sum(0)  # ½·a_kᵀ Σ a_k
            _add_grad(F, sym_f.mul_(scales[k0:k1]), owned=True)  # Σ·A·diag(u)
        return d_scales

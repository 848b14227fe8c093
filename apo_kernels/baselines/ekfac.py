"""EKFAC (George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis"): KFAC's factors are eigendecomposed every ``inverse_interval`` steps,

    A = Q_A diag(λ_A) Q_Aᵀ,   G = Q_G diag(λ_G) Q_Gᵀ     (torch.linalg.eigh, float32),

and the curvature in that eigenbasis is re-estimated at every factor step as the running second
moment of the per-example gradients projected on it:

    s ← decay·s + (1−decay)·E_n[(Q_Gᵀ ∇W_n Q_A)²]          (out, in+1)

(reset to λ_G λ_Aᵀ -- KFAC's own eigenvalues -- whenever the basis is recomputed). The update is

    ΔW = Q_G [(Q_Gᵀ ∇W Q_A) / (s + damping)] Q_Aᵀ            (4 GEMMs per step).

For a Linear layer the per-example projection costs two GEMMs with the batch
((N·g)Q_G and a Q_A, then (·)²ᵀ(·)²); for weight-sharing layers (convolutions) it needs a batched
product over locations. Same conventions, hooks, ``fisher`` / ``likelihood`` options (with
``fisher="mc"`` the scale s is the second moment of the sampled per-example gradients, as in
George et al.) and step(closure) contract as :class:`KFAC`. An eigendecomposition that fails even
in float64 keeps the previous basis and scale (counted in ``recoveries``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._numerics import all_finite
from .kfac import KFAC, _cov_dtype, _Layer

__all__ = ["EKFAC", "eigenbasis", "projected_second_moment", "ekfac_apply"]


def eigenbasis(M: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor, in float32.

    LAPACK's float32 eigh can fail to converge, or return NaN without raising, on exactly
    rank-deficient factors (dead ReLU units give zero rows and columns; both seen on the bench's
    CNN): then it is redone in float64. None when that fails too (the caller keeps its basis).
    """
    for dtype in (torch.float32, torch.float64):
        try:
            evals, evecs = torch.linalg.eigh(M.to(dtype))
        except (torch.linalg.LinAlgError, RuntimeError):
            continue
        if all_finite([evals, evecs]):
            return evals.float().clamp_min_(0.0), evecs.float()
    return None


def projected_second_moment(a: Tensor, g: Tensor, batch_size: int, QA: Tensor, QG: Tensor) -> Tensor:
    """E_n[(Q_Gᵀ ∇W_n Q_A)²] in float32 for rows a (N·L, d_in), g (N·L, d_out) of a mean loss over N."""
    dt = _cov_dtype(a.dtype)
    N = batch_size
    pa = a.to(dt) @ QA.to(dt)  # (R, d_in)
    pg = (g.to(dt) * N) @ QG.to(dt)  # (R, d_out): per-example output gradients
    R = a.shape[0]
    if R == N:  # no weight sharing: ∇W_n = g_n a_nᵀ is rank one
        return ((pg * pg).T @ (pa * pa)).float().div_(N)
    L = R // N
    per_example = torch.bmm(pg.view(N, L, -1).transpose(1, 2), pa.view(N, L, -1))  # (N, d_out, d_in)
    return per_example.float().square_().mean(0)


def ekfac_apply(grad_mat: Tensor, QA: Tensor, QG: Tensor, scale: Tensor, damping: float) -> Tensor:
    """Q_G [(Q_Gᵀ ∇W Q_A) / (s + damping)] Q_Aᵀ in the dtype of grad_mat (4 GEMMs)."""
    proj = QG.T @ grad_mat @ QA
    proj = proj / (scale + damping).to(proj.dtype)
    return QG @ proj @ QA.T


class EKFAC(KFAC):
    """Eigenvalue-corrected KFAC; same arguments as :class:`KFAC` (``damping`` is added to s)."""

    def _has_curvature(self, state: dict) -> bool:
        return "QA" in state

    def _update_curvature(self, layer: _Layer, state: dict, damping: float, dtype: torch.dtype) -> None:
        basis_A, basis_G = eigenbasis(state["A"]), eigenbasis(state["G"])
        if basis_A is None or basis_G is None:
            self.recoveries["kept_previous_curvature"] += 1
            return
        (state["eig_A"], state["QA"]), (state["eig_G"], state["QG"]) = basis_A, basis_G
        state["scale"] = torch.outer(state["eig_G"], state["eig_A"])
        state["QA_c"] = state["QA"].to(dtype)
        state["QG_c"] = state["QG"].to(dtype)

    def _after_factor_update(self, layer: _Layer, state: dict, decay: float, ranks: int = 1) -> None:
        if "QA" not in state:
            return
        if layer.captured():
            s = projected_second_moment(layer.a, layer.g, layer.batch_size, state["QA"], state["QG"])
        else:  # another rank's batch reached the layer, this one's did not: it adds zeros
            s = torch.zeros_like(state["scale"])
        # each rank's batch → the whole batch's
        self._replicas.mean_([s], "EKFAC's projected second moment", count=ranks)
        state["scale"].mul_(decay).add_(s, alpha=1 - decay)

    def _precondition(self, layer: _Layer, state: dict, grad_mat: Tensor, damping: float) -> Tensor:
        dt = grad_mat.dtype
        QA, QG = state["QA_c"], state["QG_c"]
        if QA.dtype != dt:
            QA, QG = QA.to(dt), QG.to(dt)
        return ekfac_apply(grad_mat, QA, QG, state["scale"], damping)

"""KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2d): the curvature baseline of apo-bench.

Per preconditioned layer with weight gradient ∇W of shape (out, in) -- a Conv2d weight is read as
(out, in·kh·kw) and a bias becomes one extra input column -- KFAC approximates the (empirical)
Fisher of vec(W) by A ⊗ G with

    A = E[a aᵀ]   (in+1, in+1)   layer inputs a (Conv2d: unfolded patches), ones column for bias
    G = E[g gᵀ]   (out, out)     per-example gradients w.r.t. the layer output

and updates with  ΔW = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹  (factored Tikhonov damping, λ_A·λ_G = damping,
split by π = sqrt((tr A / dim A) / (tr G / dim G))).  The factors are running averages (stat_decay),
refreshed every ``factor_interval`` steps from hooks on the real modules; the inverses are recomputed
every ``inverse_interval`` steps, in float32 whatever the model's dtype (as practitioners do:
torch.linalg.inv / cholesky have no bf16/fp16 kernels, see apo-bench's low-precision section).

Conventions (chosen to match curvlinops' ``KFACLinearOperator(fisher_type="empirical",
kfac_approx="expand", separate_weight_and_bias=False)``, which tests/test_baselines.py checks):
the loss is assumed to be a MEAN over the batch (dimension 0 of the layer input), so a per-example
output gradient is N·grad_output; for weight sharing (Conv2d locations, extra leading dims of a
Linear input) A averages over the N·L rows and G sums over the L locations of each example:

    A = aᵀa / (N·L),   G = (N·g)ᵀ(N·g) / N  with a: (N·L, in+1), g: (N·L, out).

This is the empirical Fisher (gradients of the loss the closure computes), not the MC/type-2 Fisher.

Every other parameter (norm scales, embeddings, grouped convs, shared weights) gets plain SGD with
momentum. ``step(closure=None)`` follows torch.optim's closure contract (as the APO optimizers do):
it returns the closure's loss, or uses the gradients already in ``.grad`` without a closure.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.meta import all_finite

__all__ = [
    "KFAC",
    "kronecker_factors",
    "factored_damping",
    "damped_inverse",
    "kfac_apply",
]


# --------------------------------------------------------------------------------------------
# Layer-level functions (plain tensors; also what apo-bench times)
# --------------------------------------------------------------------------------------------
def _cov_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 sums of N squared activations overflow (max 65504); bf16 has fp32's range.
    return torch.float32 if dtype == torch.float16 else dtype


def kronecker_factors(a: Tensor, g: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Batch Kronecker factors in float32.

    a: (R, d_in) layer-input rows (R = N·L), g: (R, d_out) output-gradient rows of a MEAN loss over
    ``batch_size`` = N examples. Returns A = aᵀa/R (d_in, d_in) and G = N·gᵀg (d_out, d_out).
    """
    ca, cg = _cov_dtype(a.dtype), _cov_dtype(g.dtype)
    a = a.to(ca)
    g = g.to(cg)
    A = (a.T @ a).float().div_(a.shape[0])
    G = (g.T @ g).float().mul_(batch_size)
    return A, G


def factored_damping(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    """π-split Tikhonov damping (Martens & Grosse 2015, §6.3): returns (λ_A, λ_G), λ_A·λ_G = damping."""
    ta = float(A.diagonal().mean())
    tg = float(G.diagonal().mean())
    if ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg):
        pi = math.sqrt(ta / tg)
    else:
        pi = 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_inverse(M: Tensor, lam: float) -> Tensor:
    """(M + lam·I)⁻¹ of a symmetric PSD matrix, in float32 (Cholesky; LU if Cholesky fails)."""
    M32 = M.float()
    Md = M32 + lam * torch.eye(M32.shape[0], dtype=M32.dtype, device=M32.device)
    L, info = torch.linalg.cholesky_ex(Md)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    return torch.linalg.inv(Md)


def kfac_apply(grad_mat: Tensor, A_inv: Tensor, G_inv: Tensor) -> Tensor:
    """KFAC direction G⁻¹ ∇W A⁻¹ (2 GEMMs), in the dtype of the given matrices."""
    return G_inv @ grad_mat @ A_inv


# --------------------------------------------------------------------------------------------
# Hooks: which layers, and how their inputs / output gradients become matrices
# --------------------------------------------------------------------------------------------
def _conv_supported(m: nn.Conv2d) -> bool:
    return (
        m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


class _Layer:
    """Book-keeping for one preconditioned module (weight + optional bias)."""

    __slots__ = ("module", "weight", "bias", "a", "g", "batch_size")

    def __init__(self, module: nn.Module):
        self.module = module
        self.weight: nn.Parameter = module.weight
        self.bias: Optional[nn.Parameter] = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.a: Optional[Tensor] = None
        self.g: Optional[Tensor] = None
        self.batch_size = 0

    def input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·L, in·kh·kw)
        else:
            rows = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.detach()

    def output_rows(self, gy: Tensor) -> Tensor:
        if isinstance(self.module, nn.Conv2d):
            if gy.dim() == 3:
                gy = gy.unsqueeze(0)
            gy = gy.movedim(1, -1)
        return gy.reshape(-1, gy.shape[-1]).detach()

    def grad_matrix(self) -> Optional[Tensor]:
        gw = self.weight.grad
        if gw is None:
            return None
        gw = gw.reshape(gw.shape[0], -1)
        if self.bias is not None:
            gb = self.bias.grad
            gb = torch.zeros_like(gw[:, :1]) if gb is None else gb.reshape(-1, 1)
            gw = torch.cat([gw, gb], dim=1)
        return gw

    def param_matrix(self) -> Tensor:
        w = self.weight.detach().reshape(self.weight.shape[0], -1)
        if self.bias is not None:
            w = torch.cat([w, self.bias.detach().reshape(-1, 1)], dim=1)
        return w

    def split(self, mat: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.bias is not None:
            return mat[:, :-1].reshape(self.weight.shape), mat[:, -1].reshape(self.bias.shape)
        return mat.reshape(self.weight.shape), None


def _check_nonneg(name: str, value, *, positive: bool = False, integer: bool = False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")


class KFAC(torch.optim.Optimizer):
    """K-FAC with empirical-Fisher factors from forward/backward hooks, SGD-momentum on the rest.

    Args:
        model: the nn.Module being trained (its Linear / Conv2d layers are found and hooked).
        lr: learning rate (> 0).
        damping: Tikhonov damping λ added to the Fisher (> 0), split between the factors by π.
        momentum: heavy-ball momentum on the preconditioned direction, in [0, 1).
        weight_decay: L2 penalty added to the gradient before preconditioning (>= 0).
        stat_decay: running-average decay of the factors, in [0, 1).
        factor_interval: refresh the factors from the hooks every this many steps (>= 1).
        inverse_interval: recompute inverses every this many steps (>= 1).
        kl_clip: optional KL-style clipping of the update (Ba et al. 2017), None = off.

    Usage (torch.optim's closure contract)::

        opt = KFAC(model, lr=0.01, damping=1e-3)
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        loss = opt.step(closure)        # or: loss.backward(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        damping: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_interval: int = 1,
        inverse_interval: int = 10,
        kl_clip: Optional[float] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_nonneg("lr", lr, positive=True)
        _check_nonneg("damping", damping, positive=True)
        _check_nonneg("momentum", momentum)
        if float(momentum) >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_nonneg("weight_decay", weight_decay)
        _check_nonneg("stat_decay", stat_decay)
        if float(stat_decay) >= 1.0:
            raise ValueError(f"stat_decay must be in [0, 1), got {stat_decay!r}")
        _check_nonneg("factor_interval", factor_interval, integer=True)
        _check_nonneg("inverse_interval", inverse_interval, integer=True)
        if kl_clip is not None:
            _check_nonneg("kl_clip", kl_clip, positive=True)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        defaults = dict(
            lr=float(lr),
            damping=float(damping),
            momentum=float(momentum),
            weight_decay=float(weight_decay),
            stat_decay=float(stat_decay),
            kl_clip=kl_clip,
        )
        super().__init__(params, defaults)
        self.model = model
        self.factor_interval = factor_interval
        self.inverse_interval = inverse_interval
        self.steps = 0
        self.skipped_steps = 0  # non-finite loss or gradient: nothing updated

        # Which modules are preconditioned; shared weights fall back to SGD (preconditioned never twice).
        seen: dict[int, int] = {}
        candidates = []
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
                if isinstance(m, nn.Conv2d) and not _conv_supported(m):
                    continue
                candidates.append(m)
                for p in (m.weight, m.bias):
                    if p is not None:
                        seen[id(p)] = seen.get(id(p), 0) + 1
        self.layers: list[_Layer] = [
            _Layer(m)
            for m in candidates
            if seen[id(m.weight)] == 1 and (m.bias is None or seen[id(m.bias)] == 1)
        ]
        layer_params = {id(p) for L in self.layers for p in (L.weight, L.bias) if p is not None}
        self.other_params = [p for p in params if id(p) not in layer_params]
        self._handles = []
        for L in self.layers:
            self._handles.append(L.module.register_forward_hook(self._make_forward_hook(L)))

    # ---------------------------------------------------------------------------------- hooks
    def _capturing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.steps % self.factor_interval == 0

    def _make_forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not self._capturing(module) or not isinstance(output, Tensor) or not output.requires_grad:
                return
            x = inputs[0]
            layer.batch_size = x.shape[0] if x.dim() > 1 else 1
            layer.a = layer.input_rows(x)

            def grad_hook(gy: Tensor):
                layer.g = layer.output_rows(gy)

            output.register_hook(grad_hook)

        return hook

    def remove_hooks(self) -> None:
        """Detach from the model (the optimizer keeps working as SGD-momentum with stale factors)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------- per-layer curvature
    def _update_factors(self, layer: _Layer, state: dict, decay: float) -> None:
        A, G = kronecker_factors(layer.a, layer.g, layer.batch_size)
        if "A" not in state:
            state["A"], state["G"] = A, G
        else:
            state["A"].mul_(decay).add_(A, alpha=1 - decay)
            state["G"].mul_(decay).add_(G, alpha=1 - decay)

    def _update_curvature(self, layer: _Layer, state: dict, damping: float, dtype: torch.dtype) -> None:
        lam_a, lam_g = factored_damping(state["A"], state["G"], damping)
        state["A_inv"] = damped_inverse(state["A"], lam_a)
        state["G_inv"] = damped_inverse(state["G"], lam_g)
        # Applied in the gradient's dtype: cast once per inversion, not every step.
        state["A_inv_c"] = state["A_inv"].to(dtype)
        state["G_inv_c"] = state["G_inv"].to(dtype)

    def _has_curvature(self, state: dict) -> bool:
        return "A_inv" in state

    def _precondition(self, layer: _Layer, state: dict, grad_mat: Tensor, damping: float) -> Tensor:
        dt = grad_mat.dtype
        A_inv, G_inv = state["A_inv_c"], state["G_inv_c"]
        if A_inv.dtype != dt:
            A_inv, G_inv = A_inv.to(dt), G_inv.to(dt)
        return kfac_apply(grad_mat, A_inv, G_inv)

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One update; returns the closure's loss (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        if not all_finite(grads + ([loss.detach()] if isinstance(loss, Tensor) else [])):
            # a non-finite loss or gradient must not reach the factors, the momentum or θ
            for layer in self.layers:
                layer.a = layer.g = None
            self.skipped_steps += 1
            return loss
        group = self.param_groups[0]
        lr, damping, mom = group["lr"], group["damping"], group["momentum"]
        wd, decay, kl_clip = group["weight_decay"], group["stat_decay"], group["kl_clip"]
        refresh = self.steps % self.inverse_interval == 0

        updates: list[tuple[Tensor, Tensor, bool]] = []  # (param, direction, KL-clipped?)
        vg_sum = 0.0
        for layer in self.layers:
            grad_mat = layer.grad_matrix()
            if grad_mat is None:
                layer.a = layer.g = None
                continue
            state = self.state[layer.weight]
            if layer.a is not None and layer.g is not None:
                self._update_factors(layer, state, decay)
                self._after_factor_update(layer, state, decay)
            layer.a = layer.g = None
            if wd:
                grad_mat = grad_mat.add(layer.param_matrix(), alpha=wd)
            if "A" in state and (refresh or not self._has_curvature(state)):
                self._update_curvature(layer, state, damping, grad_mat.dtype)
            if self._has_curvature(state):
                direction = self._precondition(layer, state, grad_mat, damping)
                if kl_clip is not None:
                    vg_sum += float((direction.float() * grad_mat.float()).sum()) * lr * lr
            else:
                direction = grad_mat  # no statistics yet (e.g. first step in eval mode)
            dw, db = layer.split(direction)
            updates.append((layer.weight, dw, True))
            if db is not None:
                updates.append((layer.bias, db, True))

        nu = 1.0
        if kl_clip is not None and vg_sum > 0:
            nu = min(1.0, math.sqrt(kl_clip / vg_sum))
        for p in self.other_params:
            if p.grad is None:
                continue
            d = p.grad
            if wd:
                d = d.add(p.detach(), alpha=wd)
            updates.append((p, d, False))  # clipping applies to the KFAC directions only

        for p, d, clipped in updates:
            if clipped and nu != 1.0:
                d = d * nu
            st = self.state[p]
            if mom:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    def _after_factor_update(self, layer: _Layer, state: dict, decay: float) -> None:
        """Hook for EKFAC (its per-step eigenbasis scaling)."""

    # ------------------------------------------------------------------------ state dict
    _FP32_KEYS = ("A", "G", "A_inv", "G_inv", "QA", "QG", "eig_A", "eig_G", "scale")

    def state_dict(self):
        sd = super().state_dict()
        sd["kfac_steps"] = self.steps
        sd["kfac_skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("kfac_steps", 0))
        self.skipped_steps = int(state_dict.pop("kfac_skipped_steps", 0))
        # torch.optim casts floating state to the param's dtype on load; the curvature is fp32 master
        # data, so restore those entries ourselves.
        saved = {
            k: {key: v for key, v in st.items() if key in self._FP32_KEYS}
            for k, st in state_dict["state"].items()
        }
        state_dict["state"] = {
            k: {key: v for key, v in st.items() if key not in self._FP32_KEYS}
            for k, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        id_to_param = {i: p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for k, entries in saved.items():
            p = id_to_param[int(k)]
            for key, v in entries.items():
                self.state[p][key] = v.to(device=p.device, dtype=torch.float32)

"""The lower layer of APO, for users who write their own optimizers.

APO (Amortized Proximal Optimization, Algorithm 1) meta-learns the parameters φ of an update rule
θ' = θ + Δ(φ) by descending the proximal meta-objective on the batch B that produced the gradient:

    Q(φ) = J_B(θ') + λ_FSD · mean_{x̃∈B'} D_F(f(x̃; θ'), f(x̃; θ)) + (λ_WSD/2) · ‖θ' − θ‖²

g = ∇J_B(θ) does not depend on φ, so ∇φQ = (∂Δ/∂φ)ᵀ ∇θ'Q: one extra forward/backward of the real
model at θ' gives ∇θ'Q (``proximal_objective_grad``), and the update rule maps it back to φ (for
the structured preconditioner that map is the op's registered backward,
``apo_kernels.precondition_grouped_backward``). No second-order autograd, no graph kept.

What is here:

- ``proximal_objective_grad``: writes θ + Δ into the model in place, calls the closure (same
  batch), adds the FSD and WSD terms, restores θ, buffers, ``.grad`` and the RNG exactly, and
  returns Q and ∇θ'Q.
- ``lookahead``: the context manager that does the write/restore part on its own.
- ``StructuredPreconditioner``: Y = A·(S²⊙(AᵀGB))·Bᵀ for one (m, n) matrix, with block-diagonal
  A/B for sides above ``max_dim``; ``DiagonalPreconditioner``: Y = S²⊙G for any shape.
- ``precondition_many`` / ``meta_backward_many``: many preconditioners in ONE grouped op call.

See ``python/custom_optimizer.py`` for a complete optimizer written on these pieces.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

import apo_kernels

from . import discrepancy

__all__ = [
    "RNGState",
    "ModelSnapshot",
    "lookahead",
    "MetaObjective",
    "proximal_objective_grad",
    "StructuredPreconditioner",
    "DiagonalPreconditioner",
    "precondition_many",
    "meta_backward_many",
    "all_finite",
    "no_autocast",
]


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------
def all_finite(tensors: Iterable[Optional[Tensor]]) -> bool:
    """True when every given tensor (None entries ignored) holds only finite values (one sync per device).

    A tensor is finite iff its min and max are: NaN propagates through both and ±inf shows up in
    one. ``aminmax`` is a single vectorized read, several times cheaper than ``isfinite(t).all()``,
    which materializes a full boolean tensor on every step.
    """
    extremes: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            extremes.setdefault(t.device, []).extend(torch.aminmax(t.detach()))
    return all(bool(torch.isfinite(torch.stack(v)).all()) for v in extremes.values())


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Optimizer arithmetic must not be downcast by an autocast region the user opened around step()."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class RNGState:
    """CPU (+ given CUDA devices) RNG state, so the lookahead replays the step's dropout masks."""

    def __init__(self, cuda_devices: Sequence[int] = ()):
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(s, d)


def cuda_devices_of(params: Iterable[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


class ModelSnapshot:
    """Copies of the given parameters' values, of ``.grad`` of every parameter of ``model`` (and of
    the given ones), and of every buffer of ``model``.

    ``restore()`` writes them back in place, bit for bit: θ, BatchNorm running statistics,
    ``num_batches_tracked`` and the gradients are exactly as when the snapshot was taken — also the
    gradients of parameters the lookahead does not move (the closure's backward rewrites them too).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]
        self.grad_params = list({id(p): p for p in (*self.params, *model.parameters())}.values())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.grad_params]
        # (module, name) rather than the tensor: a forward may rebind a buffer instead of writing it
        self.buffers = [
            (mod, name, buf.detach().clone())
            for mod in model.modules()
            for name, buf in mod._buffers.items()
            if buf is not None
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in zip(self.params, self.values):
            p.copy_(v)
        for p, g in zip(self.grad_params, self.grads):
            if g is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == g.shape and p.grad.dtype == g.dtype:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        for mod, name, saved in self.buffers:
            cur = mod._buffers.get(name)
            if cur is not None and cur.shape == saved.shape and cur.dtype == saved.dtype:
                cur.copy_(saved)
            else:
                mod._buffers[name] = saved.clone()


@torch.no_grad()
def _write_lookahead(params: Sequence[Tensor], values: Sequence[Tensor], deltas: Sequence[Tensor]) -> None:
    """θ' = θ + Δ in place: formed in Δ's dtype, rounded once to the parameter's."""
    for p, v, d in zip(params, values, deltas):
        if d.dtype == p.dtype:
            p.add_(d)  # p still holds v: same rounding, no temporary
        else:
            p.copy_((v.to(d.dtype) + d).to(p.dtype))


@contextlib.contextmanager
def lookahead(model: nn.Module, params: Sequence[Tensor], deltas: Sequence[Tensor]) -> Iterator[ModelSnapshot]:
    """Within the block the model's ``params`` hold θ' = θ + Δ (in place); on exit θ, buffers,
    gradients are restored exactly. ``deltas[i]`` has ``params[i]``'s shape (any float dtype: the
    sum is formed in the delta's dtype and rounded once to the parameter's)."""
    snap = ModelSnapshot(model, params)
    try:
        _write_lookahead(params, snap.values, deltas)
        yield snap
    finally:
        snap.restore()


def _detach_tree(x):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


@dataclass
class MetaObjective:
    """Result of ``proximal_objective_grad``.

    value: Q(φ) as a float; loss / fsd / wsd: its three terms (fsd is D_F before λ_FSD, wsd is
    ½‖Δ‖² before λ_WSD); grads: ∇θ'Q per parameter, in the dtype of the deltas.
    """

    value: float
    loss: float
    fsd: float
    wsd: float
    grads: list = field(default_factory=list)


def proximal_objective_grad(
    model: nn.Module,
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    closure: Callable[[], Tensor],
    *,
    fsd_inputs: Optional[Sequence] = None,
    lambda_fsd: float = 0.0,
    lambda_wsd: float = 0.0,
    fsd: Union[str, Callable] = "kl",
    grad_scale: Optional[float] = None,
    rng: Optional[RNGState] = None,
) -> MetaObjective:
    """Q(φ) and ∇θ'Q at θ' = θ + Δ, using the real model; θ is restored exactly afterwards.

    Args:
        model: the module whose ``params`` are updated; called as ``model(*fsd_inputs)`` for FSD.
        params: the parameters Δ applies to (those with a gradient this step).
        deltas: Δ per parameter, same shapes; their dtype is the dtype of the returned gradients.
        closure: the step's closure (zero grads, forward on the SAME batch, backward, return loss).
        fsd_inputs: a tuple of positional inputs for the FSD forwards; needed when λ_FSD ≠ 0.
        grad_scale: the GradScaler's current scale if the closure scales its loss (grads are
            divided by it).
        rng: RNG state to replay before the closure (the step's dropout masks).

    The FSD forwards at θ and θ' run from the same RNG state (equal dropout masks) and under the
    caller's autocast state; FSD's backward goes through ``torch.autograd.grad`` so it does not
    touch ``.grad``. Global RNG state is restored on exit, so meta-steps do not shift the user's
    random stream.
    """
    fsd_fn = discrepancy.resolve(fsd)
    need_fsd = lambda_fsd != 0.0
    if need_fsd and fsd_inputs is None:
        raise ValueError("fsd_inputs is required when lambda_fsd != 0 (pass step(..., fsd_inputs=(x,)))")
    if need_fsd and not isinstance(fsd_inputs, (tuple, list)):
        fsd_inputs = (fsd_inputs,)
    params = list(params)
    rng_outer = RNGState(cuda_devices_of(params))
    # snapshot before the first forward: the FSD forward at θ moves BatchNorm statistics too
    snap = ModelSnapshot(model, params)
    fsd_value = 0.0
    try:
        old_out = None
        if need_fsd:
            rng_fsd = RNGState(rng_outer.cuda_devices)
            with torch.no_grad():
                old_out = _detach_tree(model(*fsd_inputs))
        _write_lookahead(params, snap.values, deltas)
        if rng is not None:
            rng.restore()
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("the closure must return the loss for a meta-step")
        grads = []
        for p, d in zip(params, deltas):
            # copy: restoring the snapshot writes the old gradient into p.grad in place
            g = torch.zeros_like(d) if p.grad is None else p.grad.detach().to(d.dtype, copy=True)
            if grad_scale is not None and grad_scale != 1.0:
                g = g * (1.0 / grad_scale)
            grads.append(g)
        if need_fsd:
            rng_fsd.restore()
            with torch.enable_grad():
                f = fsd_fn(model(*fsd_inputs), old_out)
                fsd_grads = torch.autograd.grad(f, params, allow_unused=True)
            fsd_value = float(f.detach())
            for g, fg in zip(grads, fsd_grads):  # g is our own copy: accumulate in place
                if fg is not None:
                    g.add_(fg.to(g.dtype), alpha=lambda_fsd)
            del f, fsd_grads
        loss_value = float(loss.detach())
        del loss, old_out
    finally:
        snap.restore()
        rng_outer.restore()
    wsd = 0.5 * sum(float(torch.linalg.vector_norm(d.detach())) ** 2 for d in deltas)
    if lambda_wsd != 0.0:
        for g, d in zip(grads, deltas):
            g.add_(d.detach(), alpha=lambda_wsd)
    value = loss_value + lambda_fsd * fsd_value + lambda_wsd * wsd
    return MetaObjective(value=value, loss=loss_value, fsd=fsd_value, wsd=wsd, grads=grads)


# --------------------------------------------------------------------------------------------
# Per-parameter preconditioners
# --------------------------------------------------------------------------------------------
def split_sizes(size: int, max_dim: Optional[int]) -> list[int]:
    """The blocking rule: a side longer than ``max_dim`` is cut into ⌈size/max_dim⌉ near-equal
    blocks (sizes differ by at most one), each with its own factor; ``None`` means never split."""
    if max_dim is None or size <= max_dim:
        return [size]
    k = math.ceil(size / max_dim)
    base, extra = divmod(size, k)
    return [base + 1] * extra + [base] * (k - extra)


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


S_PARAMS = ("log", "linear")


def _check_s_param(s_param) -> None:
    if s_param not in S_PARAMS:
        raise ValueError(f"s_param must be one of {S_PARAMS}, got {s_param!r}")


def _init_s(shape, init_s: float, s_param: str, dtype, device) -> Tensor:
    """The stored S for a given initial value of S (so that S² = init_s² either way)."""
    if not init_s > 0.0:
        raise ValueError(f"init_s must be > 0, got {init_s}")
    v = math.log(init_s) if s_param == "log" else float(init_s)
    return torch.full(tuple(shape), v, dtype=dtype, device=device)


def _s2(S: Tensor, s_param: str) -> Tensor:
    # "log": S² = exp(2S), so Adam's ≈meta_lr absolute steps are relative changes of the step size
    return torch.exp(2.0 * S) if s_param == "log" else S * S


def _ds(S: Tensor, dS2: Tensor, s_param: str) -> Tensor:
    return 2.0 * _s2(S, s_param) * dS2 if s_param == "log" else 2.0 * S * dS2


@torch.no_grad()
def _scale_s2(S: Tensor, factor: float, s_param: str) -> None:
    """S² ← factor·S² in place, in either parametrization."""
    if s_param == "log":
        S.add_(0.5 * math.log(factor))
    else:
        S.mul_(math.sqrt(factor))


def _add_grad(t: Tensor, g: Tensor) -> None:
    t.grad = g.clone() if t.grad is None else t.grad + g


class StructuredPreconditioner:
    """Y = A · (S²⊙(Aᵀ G B)) · Bᵀ for one (m, n) gradient matrix G — the APO-Precond rule.

    P = (A⊗B)·diag(vec S²)·(A⊗B)ᵀ is PSD by construction. A (m×m) and B (n×n) start at identity,
    S (m×n) at ``init_s`` everywhere, so initially Y = init_s²·G (a plain SGD step of size init_s²).

    Blocking (``max_dim``): a side longer than ``max_dim`` is split into near-equal blocks and the
    factor on that side is block-diagonal (one dense block per piece). Each (row block, column
    block) tile is one entry of the grouped op, with its row block's A and column block's B; their
    meta-gradients are summed over tiles. Memory per side of size d: d·⌈d/⌈d/max_dim⌉⌉ ≤ d·max_dim.

    ``learn_left=False`` (``learn_right=False``) fixes that side's factor to the identity (used on
    the vocabulary side of embeddings): it is not meta-learned and costs one shared identity block.

    Attributes:
        A, B: lists of square blocks (dtype ``dtype``); S: (m, n).
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
        _check_s_param(s_param)
        self.s_param = s_param
        self.shape = (int(m), int(n))
        self.learn_left, self.learn_right = bool(learn_left), bool(learn_right)
        self.row_blocks = _offsets(split_sizes(m, max_dim))
        self.col_blocks = _offsets(split_sizes(n, max_dim))
        eye_cache: dict[int, Tensor] = {}

        def factor(size: int, learn: bool) -> Tensor:
            if learn:
                return torch.eye(size, dtype=dtype, device=device)
            if size not in eye_cache:  # fixed identity blocks are shared, never written
                eye_cache[size] = torch.eye(size, dtype=dtype, device=device)
            return eye_cache[size]

        self.A = [factor(r1 - r0, learn_left) for r0, r1 in self.row_blocks]
        self.B = [factor(c1 - c0, learn_right) for c0, c1 in self.col_blocks]
        self.S = _init_s(self.shape, init_s, s_param, dtype, device)

    def S2(self) -> Tensor:
        """S² (m, n), the op's diagonal: S·S for s_param="linear", exp(2S) for "log"."""
        return _s2(self.S, self.s_param)

    def scale_s2(self, factor: float) -> None:
        """S² ← factor·S² (the whole step scales by ``factor``; A and B unchanged)."""
        _scale_s2(self.S, factor, self.s_param)

    # ---- φ ------------------------------------------------------------------------------
    def parameters(self) -> list[Tensor]:
        """The meta-learned tensors: A blocks (if learnt), S, B blocks (if learnt)."""
        return (self.A if self.learn_left else []) + [self.S] + (self.B if self.learn_right else [])

    def tiles(self, X: Tensor) -> list[Tensor]:
        """Views of the (m, n) matrix X per (row block, column block), row-major order."""
        if len(self.row_blocks) == 1 and len(self.col_blocks) == 1:
            return [X]
        return [X[r0:r1, c0:c1] for r0, r1 in self.row_blocks for c0, c1 in self.col_blocks]

    def op_inputs(self, G: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(grads, As, S²s, Bs) tile lists for the grouped op, for the (m, n) matrix G."""
        S2 = self.S2()
        nc = len(self.col_blocks)
        As = [self.A[k // nc] for k in range(len(self.row_blocks) * nc)]
        Bs = [self.B[k % nc] for k in range(len(self.row_blocks) * nc)]
        return self.tiles(G), As, self.tiles(S2), Bs

    def assemble(self, tiles: Sequence[Tensor]) -> Tensor:
        """Inverse of ``tiles``: the (m, n) matrix from its tiles."""
        if len(tiles) == 1:
            return tiles[0]
        nc = len(self.col_blocks)
        rows = [torch.cat(list(tiles[i * nc:(i + 1) * nc]), dim=1) for i in range(len(self.row_blocks))]
        return torch.cat(rows, dim=0)

    def accumulate_meta_grad(self, dAs: Sequence[Tensor], dS2s: Sequence[Tensor], dBs: Sequence[Tensor]) -> None:
        """Add the op's per-tile (dA, dS², dB) to ``.grad`` of A, S, B (chain rule through S²)."""
        nc = len(self.col_blocks)
        if self.learn_left and dAs:
            for i, a in enumerate(self.A):
                _add_grad(a, sum(dAs[i * nc + j] for j in range(nc)))
        if self.learn_right and dBs:
            for j, b in enumerate(self.B):
                _add_grad(b, sum(dBs[i * nc + j] for i in range(len(self.row_blocks))))
        _add_grad(self.S, _ds(self.S, self.assemble(dS2s), self.s_param))

    @torch.no_grad()
    def apply(self, G: Tensor, *, backend: str = "auto") -> Tensor:
        """Y = A·(S²⊙(AᵀGB))·Bᵀ, shape (m, n) (one grouped op call over the tiles)."""
        return precondition_many([self], [G], backend=backend)[0]

    @torch.no_grad()
    def meta_backward(self, dY: Tensor, G: Tensor, *, backend: str = "auto") -> None:
        """Accumulate ∂⟨dY, Y⟩/∂(A, S, B) into their ``.grad``; dY, G (m, n)."""
        meta_backward_many([self], [dY], [G], backend=backend)

    # ---- observability ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """s2_mean: mean of S² (the average step multiplier); a_dist/b_dist: ‖A−I‖_F, ‖B−I‖_F."""
        def dist(blocks, learn):
            if not learn:
                return 0.0
            return math.sqrt(sum(float((b - torch.eye(b.shape[0], dtype=b.dtype, device=b.device)).pow(2).sum())
                                 for b in blocks))
        return {
            "s2_mean": float(self.S2().mean()),
            "a_dist": dist(self.A, self.learn_left),
            "b_dist": dist(self.B, self.learn_right),
        }


class DiagonalPreconditioner:
    """Y = S²⊙G for a tensor of any shape (norm scales, biases without a layer, unsupported modules)."""

    def __init__(self, shape, *, init_s: float = 1.0, s_param: str = "log", dtype=torch.float32, device=None):
        _check_s_param(s_param)
        self.shape, self.s_param = tuple(shape), s_param
        self.S = _init_s(self.shape, init_s, s_param, dtype, device)

    def S2(self) -> Tensor:
        return _s2(self.S, self.s_param)

    def scale_s2(self, factor: float) -> None:
        """S² ← factor·S²."""
        _scale_s2(self.S, factor, self.s_param)

    def parameters(self) -> list[Tensor]:
        return [self.S]

    @torch.no_grad()
    def apply(self, G: Tensor) -> Tensor:
        return self.S2() * G

    @torch.no_grad()
    def meta_backward(self, dY: Tensor, G: Tensor) -> None:
        """∂⟨dY, S²⊙G⟩/∂S (chain rule through S²), added to ``S.grad``."""
        _add_grad(self.S, _ds(self.S, dY * G, self.s_param))

    def stats(self) -> dict[str, float]:
        return {"s2_mean": float(self.S2().mean()), "a_dist": 0.0, "b_dist": 0.0}


@torch.no_grad()
def precondition_many(
    preconds: Sequence[StructuredPreconditioner], Gs: Sequence[Tensor], *, backend: str = "auto"
) -> list[Tensor]:
    """Y_i = preconds[i] applied to Gs[i] (m_i, n_i), all tiles of all layers in ONE grouped call."""
    grads, As, Ss, Bs, counts = [], [], [], [], []
    for pc, G in zip(preconds, Gs):
        g, a, s, b = pc.op_inputs(G)
        grads += g
        As += a
        Ss += s
        Bs += b
        counts.append(len(g))
    if not grads:
        return []
    Ys = apo_kernels.precondition_grouped(grads, As, Ss, Bs, backend=backend)
    out, k = [], 0
    for pc, c in zip(preconds, counts):
        out.append(pc.assemble(Ys[k:k + c]))
        k += c
    return out


@torch.no_grad()
def meta_backward_many(
    preconds: Sequence[StructuredPreconditioner],
    dYs: Sequence[Tensor],
    Gs: Sequence[Tensor],
    *,
    backend: str = "auto",
) -> None:
    """For each layer add ∂⟨dY_i, Y_i⟩/∂(A_i, S_i, B_i) into their ``.grad``: ONE grouped backward
    call with output_mask (False, learn A?, True, learn B?) — the op's d_grad is never computed."""
    grad_outs, grads, As, Ss, Bs, counts = [], [], [], [], [], []
    for pc, dY, G in zip(preconds, dYs, Gs):
        g, a, s, b = pc.op_inputs(G)
        grad_outs += pc.tiles(dY)
        grads += g
        As += a
        Ss += s
        Bs += b
        counts.append(len(g))
    if not grads:
        return
    mask = (False, any(pc.learn_left for pc in preconds), True, any(pc.learn_right for pc in preconds))
    _, dAs, dS2s, dBs = apo_kernels.precondition_grouped_backward(
        grad_outs, grads, As, Ss, Bs, output_mask=mask, backend=backend
    )
    k = 0
    for pc, c in zip(preconds, counts):
        pc.accumulate_meta_grad(dAs[k:k + c] if dAs else [], dS2s[k:k + c], dBs[k:k + c] if dBs else [])
        k += c

"""Per-parameter preconditioners whose parameters φ APO meta-learns.

- ``StructuredPreconditioner``: Y = A·(S²⊙(AᵀGB))·Bᵀ for one (m, n) matrix, with block-diagonal
  A/B for sides above ``max_dim`` (``split_sizes``); ``DiagonalPreconditioner``: Y = S²⊙G for
  any shape.
- ``precondition_many`` / ``meta_backward_many``: many structured preconditioners in ONE grouped
  op call (forward, and the op's registered backward for ∂Q/∂φ); ``momentum_precondition_many``:
  the momentum step v = μ·m + g and Y(v) of many in one call of the fused op.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

import apo_kernels

from .._args import check_choice, check_int, check_number
from ..ops.backends import resolve

__all__ = [
    "S_PARAMS",
    "split_sizes",
    "StructuredPreconditioner",
    "DiagonalPreconditioner",
    "precondition_many",
    "momentum_precondition_many",
    "meta_backward_many",
]


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


def _init_s(shape, init_s: float, s_param: str, dtype, device) -> Tensor:
    """The stored S for a given initial value of S (so that S² = init_s² either way)."""
    init_s = check_number("init_s", init_s, low=0.0, low_ok=False)
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


def _add_grad(t: Tensor, g: Tensor, *, owned: bool = False) -> None:
    """t.grad += g; ``owned``: g is a fresh tensor no one else holds, so it can become t.grad."""
    if t.grad is None:
        t.grad = g if owned else g.clone()
    else:
        t.grad.add_(g)


class StructuredPreconditioner:
    """Y = A · (S²⊙(Aᵀ G B)) · Bᵀ for one (m, n) gradient matrix G — the APO-Precond rule.

    P = (A⊗B)·diag(vec S²)·(A⊗B)ᵀ is PSD by construction. A (m×m) and B (n×n) start at identity,
    S (m×n) at ``init_s`` everywhere, so initially Y = init_s²·G (a plain SGD step of size init_s²).

    Blocking (``max_dim``): a side longer than ``max_dim`` is split into near-equal blocks and the
    factor on that side is block-diagonal (one dense block per piece). Each (row block, column
    block) tile is one entry of the grouped op, with its row block's A and column block's B; their
    meta-gradients are summed over tiles. Memory per side of size d: d·⌈d/⌈d/max_dim⌉⌉ ≤ d·max_dim.

    ``learn_left=False`` (``learn_right=False``) fixes that side's factor to the identity (used on
    the vocabulary side of embeddings): it is not meta-learned, has no matrix (the op receives
    A=None / B=None and skips its GEMMs) and is never split into blocks.

    Attributes:
        A, B: lists of square blocks (dtype ``dtype``; empty for a fixed side); S: (m, n).
    """

    # apply and meta_backward are the op's calls, which precondition_many / meta_backward_many batch
    # over layers (a subclass with its own, KronPreconditioner, sets False)
    uses_op = True

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
        self.S = _init_s(self.shape, init_s, s_param, dtype, device)
        self._s2_cache: tuple[int, Optional[Tensor]] = (-1, None)
        self._image_cache: tuple = ((), None)

    def _init_factors(self, m, n, max_dim, learn_left, learn_right, s_param, dtype, device) -> None:
        """Shape, blocks and identity-initialized A/B blocks (shared with the kron structure)."""
        check_choice("s_param", s_param, S_PARAMS)
        if max_dim is not None:
            check_int("max_dim", max_dim, low=1)
        self.s_param = s_param
        self.shape = (check_int("m", m, low=1), check_int("n", n, low=1))
        self.learn_left, self.learn_right = bool(learn_left), bool(learn_right)
        # a fixed (identity) side has no matrix, so nothing to bound: one block, whatever max_dim
        self.row_blocks = _offsets(split_sizes(m, max_dim if learn_left else None))
        self.col_blocks = _offsets(split_sizes(n, max_dim if learn_right else None))
        self.A = [torch.eye(r1 - r0, dtype=dtype, device=device) for r0, r1 in self.row_blocks] if learn_left else []
        self.B = [torch.eye(c1 - c0, dtype=dtype, device=device) for c0, c1 in self.col_blocks] if learn_right else []

    def S2(self) -> Tensor:
        """S² (m, n), the op's diagonal: S·S for s_param="linear", exp(2S) for "log"."""
        return _s2(self.S, self.s_param)

    def _op_S2(self) -> Tensor:
        """S² for the op, recomputed only when S was written (its version counter moved: a
        meta-optimizer step, scale_s2, load_state_dict); the op never writes it."""
        version, S2 = self._s2_cache
        if S2 is None or version != self.S._version:
            S2 = self.S2()
            self._s2_cache = (self.S._version, S2)
        return S2

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

    def _image(self, dtype: torch.dtype) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(A blocks, S², B blocks) rounded to ``dtype``, cast again only when a tensor of φ was written
        (version counters, as ``_op_S2``): the operands of a step in half precision, which reads them
        every step while φ changes every meta_interval steps (one more copy of φ, in ``dtype``)."""
        key = (dtype, *((id(t), t._version) for t in self.parameters()))
        if key != self._image_cache[0]:
            with torch.no_grad():
                image = ([a.to(dtype) for a in self.A], self._op_S2().to(dtype), [b.to(dtype) for b in self.B])
            self._image_cache = (key, image)
        return self._image_cache[1]

    def op_inputs(self, G: Tensor, dtype: Optional[torch.dtype] = None
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(grads, As, S²s, Bs) tile lists for the grouped op, for the (m, n) matrix G; None for a
        fixed side (identity). ``dtype``: A, S² and B from their image in that dtype (``_image``),
        for a G of that dtype."""
        A, S2, B = (self.A, self._op_S2(), self.B) if dtype is None else self._image(dtype)
        nr, nc = len(self.row_blocks), len(self.col_blocks)
        As = [A[k // nc] if self.learn_left else None for k in range(nr * nc)]
        Bs = [B[k % nc] if self.learn_right else None for k in range(nr * nc)]
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
        if self.s_param == "log":  # ∂S = 2·S²⊙∂S², in place on the op's fresh result
            dS = self.assemble(dS2s).mul_(self._op_S2()).mul_(2.0)
        else:
            dS = _ds(self.S, self.assemble(dS2s), self.s_param)
        _add_grad(self.S, dS, owned=True)

    @torch.no_grad()
    def apply(self, G: Tensor, *, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> Tensor:
        """Y = A·(S²⊙(AᵀGB))·Bᵀ, shape (m, n) (one grouped op call over the tiles); ``dtype``: on G and
        φ rounded to it (``precondition_many``'s ``operand_dtype``)."""
        return precondition_many([self], [G], backend=backend, operand_dtype=dtype)[0]

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
        check_choice("s_param", s_param, S_PARAMS)
        self.shape, self.s_param = tuple(shape), s_param
        self.S = _init_s(self.shape, init_s, s_param, dtype, device)
        self._s2_cache: tuple[int, Optional[Tensor]] = (-1, None)

    def S2(self) -> Tensor:
        return _s2(self.S, self.s_param)

    _op_S2 = StructuredPreconditioner._op_S2

    def scale_s2(self, factor: float) -> None:
        """S² ← factor·S²."""
        _scale_s2(self.S, factor, self.s_param)

    def parameters(self) -> list[Tensor]:
        return [self.S]

    @torch.no_grad()
    def apply(self, G: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
        """Y = S²⊙G (into ``out`` when given, a tensor of G's shape and dtype)."""
        return torch.mul(self._op_S2(), G, out=out)

    @torch.no_grad()
    def meta_backward(self, dY: Tensor, G: Tensor) -> None:
        """∂⟨dY, S²⊙G⟩/∂S (chain rule through S²), added to ``S.grad``."""
        _add_grad(self.S, _ds(self.S, dY * G, self.s_param))

    def stats(self) -> dict[str, float]:
        return {"s2_mean": float(self.S2().mean()), "a_dist": 0.0, "b_dist": 0.0}


def _grouped(grads, As, Ss, Bs, backend: str, checked: bool) -> list[Tensor]:
    """The grouped op: the public function, or (``checked``: inputs known valid) the registered op
    of the backend's family, below the autograd layer (the kernels still check their inputs)."""
    if not checked:
        return apo_kernels.precondition_grouped(grads, As, Ss, Bs, backend=backend)
    with torch._C._AutoDispatchBelowAutograd():
        return resolve(backend, grads[0].device).family.grouped(grads, As, Ss, Bs)


def _grouped_backward(grad_outs, grads, As, Ss, Bs, mask, backend: str, checked: bool):
    """The grouped backward, as ``_grouped``; an identity factor's slot may hold an empty tensor
    (the registered op's form) instead of None: accumulate_meta_grad never reads it."""
    if not checked:
        return apo_kernels.precondition_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask=mask,
                                                         backend=backend)
    return resolve(backend, grads[0].device).family.grouped_backward(grad_outs, grads, As, Ss, Bs, list(mask))


@torch.no_grad()
def precondition_many(
    preconds: Sequence[StructuredPreconditioner], Gs: Sequence[Tensor], *, backend: str = "auto",
    checked: bool = False, operand_dtype: Optional[torch.dtype] = None,
) -> list[Tensor]:
    """Y_i = preconds[i] applied to Gs[i] (m_i, n_i), all tiles of all layers in ONE grouped call.

    A preconditioner that does not use the op (``uses_op`` False: kron) is applied on its own.
    ``checked=True``: the caller guarantees each G has its preconditioner's shape, φ's dtype and
    device (an optimizer building G itself): the registered op is called directly, without the
    public function's Python checks and autograd layer (the kernels still check their inputs).
    ``operand_dtype``: the op runs on G and φ rounded to it (φ's cached image) and Y is in it.
    """
    out: list[Optional[Tensor]] = [None] * len(preconds)
    if operand_dtype is not None:
        Gs = [G.to(operand_dtype) for G in Gs]
    by_op = []
    for i, (pc, G) in enumerate(zip(preconds, Gs)):
        if pc.uses_op:
            by_op.append(i)
        else:
            out[i] = pc.apply(G, backend=backend, dtype=operand_dtype)
    grads, As, Ss, Bs, counts = _op_inputs_many([preconds[i] for i in by_op], [Gs[i] for i in by_op], operand_dtype)
    if grads:
        Ys, k = _grouped(grads, As, Ss, Bs, backend, checked), 0
        for i, c in zip(by_op, counts):
            out[i] = preconds[i].assemble(Ys[k:k + c])
            k += c
    return out


@torch.no_grad()
def momentum_precondition_many(
    preconds: Sequence[StructuredPreconditioner], grads: Sequence[Tensor], momenta: Sequence[Tensor],
    momentum: float, vs: Sequence[Tensor], outs: Sequence[Tensor], *, carry: bool = False,
    bias_grads: Optional[Sequence[Optional[Tensor]]] = None, backend: str = "auto", checked: bool = False,
) -> Tensor:
    """For each layer v_i = momentum·momenta[i] + grads[i] into vs[i] and Y_i = preconds[i] applied to
    v_i into outs[i] (all (m_i, n_i), φ's dtype and device), every tile in ONE call of
    ``apo_kernels.precondition_momentum_grouped``; returns its flags, a bool tensor (every v finite,
    every Y finite). ``carry``: outs hold the directions of ``momenta`` at these φ, carried forward
    (``precondition_momentum_grouped``'s ``carry``). ``bias_grads[i]``, where given, is the last
    column of layer i's gradient (m_i,), grads[i] its other columns (m_i, n_i − 1). ``checked``
    (inputs known valid): the registered op of the backend's family where it has one, as
    ``precondition_many``'s (the kernel still checks its inputs)."""
    tiles = [[], [], [], [], [], [], [], []]  # grads, bias grads, momenta, As, S²s, Bs, vs, outs
    bias_grads = [None] * len(preconds) if bias_grads is None else bias_grads
    for pc, g, b, m, v, y in zip(preconds, grads, bias_grads, momenta, vs, outs):
        m_tiles, As, Ss, Bs = pc.op_inputs(m)  # (m has the layer's whole shape, as v and y)
        g_tiles, b_tiles = _column_split_tiles(pc, g, b)
        for k, ts in enumerate((g_tiles, b_tiles, m_tiles, As, Ss, Bs, pc.tiles(v), pc.tiles(y))):
            tiles[k] += ts
    if not tiles[0]:
        return torch.ones(2, dtype=torch.bool)
    g_tiles, b_tiles, m_tiles, As, Ss, Bs, v_tiles, y_tiles = tiles  # (b_tiles: None where a tile has no bias)
    fused = resolve(backend, g_tiles[0].device).family.momentum_grouped if checked else None
    if fused is not None:
        return fused(g_tiles, m_tiles, momentum, As, Ss, Bs, v_tiles, y_tiles, carry, b_tiles)
    return apo_kernels.precondition_momentum_grouped(g_tiles, m_tiles, momentum, As, Ss, Bs, vs=v_tiles, out=y_tiles,
                                                     carry=carry, bias_grads=b_tiles, backend=backend)


def _column_split_tiles(pc: "StructuredPreconditioner", g: Tensor, b: Optional[Tensor]):
    """The tiles of the matrix [g | b] (b None: of g) as the fused op takes them: per tile its part of
    g and, for the tiles of the last column block, its part of b (else None); ``pc.tiles``' order."""
    if b is None:
        tiles = pc.tiles(g)
        return tiles, [None] * len(tiles)
    if len(pc.row_blocks) == 1 and len(pc.col_blocks) == 1:  # one tile: no views to make
        return [g], [b]
    last = g.shape[1]  # the bias column's index
    g_tiles, b_tiles = [], []
    for r0, r1 in pc.row_blocks:
        for c0, c1 in pc.col_blocks:
            g_tiles.append(g[r0:r1, c0:min(c1, last)])
            b_tiles.append(b[r0:r1] if c1 > last else None)
    return g_tiles, b_tiles


def _op_inputs_many(preconds, Gs, dtype: Optional[torch.dtype] = None) -> tuple[list, list, list, list, list[int]]:
    """The op's tiles of every layer, concatenated for one grouped call, and each layer's tile count
    (φ's image in ``dtype`` where given)."""
    grads, As, Ss, Bs, counts = [], [], [], [], []
    for pc, G in zip(preconds, Gs):
        g, a, s, b = pc.op_inputs(G, dtype)
        grads += g
        As += a
        Ss += s
        Bs += b
        counts.append(len(g))
    return grads, As, Ss, Bs, counts


@torch.no_grad()
def meta_backward_many(
    preconds: Sequence[StructuredPreconditioner],
    dYs: Sequence[Tensor],
    Gs: Sequence[Tensor],
    *,
    backend: str = "auto",
    checked: bool = False,
    operand_dtype: Optional[torch.dtype] = None,
) -> None:
    """For each layer add ∂⟨dY_i, Y_i⟩/∂(A_i, S_i, B_i) into their ``.grad``: ONE grouped backward
    call with output_mask (False, learn A?, True, learn B?) — the op's d_grad is never computed.
    A preconditioner that does not use the op (``uses_op`` False: kron) takes its own meta_backward.
    ``checked``: as in ``precondition_many`` (dY too has its preconditioner's shape, dtype, device).
    ``operand_dtype``: the op's backward runs on dY, G and φ rounded to it (φ's cached image, as
    ``precondition_many``); its gradients are added to φ's in φ's dtype."""
    by_op = []
    for pc, dY, G in zip(preconds, dYs, Gs):
        if pc.uses_op:
            by_op.append((pc, dY, G))
        else:
            pc.meta_backward(dY, G, backend=backend)
    if not by_op:
        return
    preconds, dYs, Gs = zip(*by_op)
    if operand_dtype is not None:
        dYs, Gs = [t.to(operand_dtype) for t in dYs], [t.to(operand_dtype) for t in Gs]
    grads, As, Ss, Bs, counts = _op_inputs_many(preconds, Gs, operand_dtype)
    grad_outs = [t for pc, dY in zip(preconds, dYs) for t in pc.tiles(dY)]
    if not grads:
        return
    mask = (False, any(pc.learn_left for pc in preconds), True, any(pc.learn_right for pc in preconds))
    _, dAs, dS2s, dBs = _grouped_backward(grad_outs, grads, As, Ss, Bs, mask, backend, checked)
    k = 0
    for pc, c in zip(preconds, counts):
        parts = [ts[k:k + c] if ts else [] for ts in (dAs, dS2s, dBs)]
        if operand_dtype is not None:
            parts = [[t.to(pc.S.dtype) for t in ts] for ts in parts]
        pc.accumulate_meta_grad(*parts)
        k += c

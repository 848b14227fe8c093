"""Triton kernels of the structured-preconditioner op, and plain launchers on tensors.

    Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ          G (m×n), A (m×m), S (m×n), B (n×n)

Backward with upstream dY, H = AᵀGB, M = S⊙H:

    D = Aᵀ dY B,  E = S⊙D,  dS = D⊙H,  dG = A E Bᵀ,
    dA = dY B Mᵀ + G B Eᵀ,   dB = dYᵀ A M + Gᵀ A E

Two paths, chosen per layer:

* small layers (m, n ≤ ``FUSED_MAX_DIM`` = 64): ONE program per layer computes every product as a
  K-loop of ``tl.dot`` chunks (padded power-of-two blocks, masked), passing intermediates through a
  small per-layer fp32 scratch buffer (L2-resident) between block-wide barriers, and stores only the
  outputs (:func:`_fused_fwd_kernel`, :func:`_fused_bwd_kernel`). The grouped op walks a table of
  layers (addresses, m, n) so that every layer of one padded block shape is a single launch
  (:func:`_grouped_fwd_kernel`, :func:`_grouped_bwd_kernel`).
* larger layers: a batched tiled GEMM with fused epilogues (:func:`_gemm_kernel`) — ``M = S⊙(AᵀGB)``
  in the epilogue of the GEMM producing H, ``E = S⊙D`` and ``dS = D⊙H`` in the epilogue of the GEMM
  producing D, and the two-product sums of dA and dB as one "dual" GEMM. Autotuned on GPU over a
  small config set pruned by problem size (:func:`_prune_gemm_configs`).

Identity factors: A = None or B = None (either or both, per layer in the grouped op) is the
identity, and no product with it is formed: the fused programs are compiled per identity pattern
(constexprs ``A_ID``, ``B_ID``), the tiled path skips those GEMMs (with both factors the identity
only the elementwise products S ⊙ G, S ⊙ dY, dY ⊙ G remain), and the grouped op launches per
block shape and pattern. An identity factor has no gradient: its slot holds an empty (0,) tensor.

Precision: every load is cast to fp32 at once (the interpreter holds bf16 as raw 16-bit integers,
so arithmetic on un-cast bf16 is silently wrong), elementwise maths is fp32, ``tl.dot`` accumulates
in fp32, intermediates between GEMMs are fp32 buffers, and each output is rounded once on store.
An fp32 intermediate is never rounded to half on its way into a product, so fp16/bf16 layers are
rounded once, on store. On a GPU only the tiled GEMMs whose two operands are the layer's own
fp16/bf16 inputs (G B, dY B, Aᵀ G, ...) feed tensor cores in that dtype (constexpr ``DOT_DT``);
every other dot is fp32: ``input_precision="tf32"`` for fp32 layers when
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch does, else "tf32x3" in the tiled GEMMs
(three tf32 MMAs: fp32-level accuracy on tensor cores) and "ieee" (fp32 FMAs) in the fused
programs (:func:`_dot_config`). Under the interpreter every dot is computed in fp32, whatever the
dtype: fp16/bf16 dot operands have never been executed there.

Registers: every variant the launchers can launch is compiled for sm_80 and sm_90 by
``apo_kernels.ops.triton_aot``, which fails on any register spill (CI runs it).

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (:func:`is_interpreter`). Inputs may be non-contiguous (strides are passed to the
kernels; the grouped table path copies strided small layers first); outputs are contiguous and have
the input dtype. Every launcher first applies the op's input rules (``_validate.py``, the same as
the public API's), then the Triton backend's own (no float64; CUDA tensors, or CPU tensors under
the interpreter), before anything is launched. Kernels run on the inputs' device and torch's
current stream; layer tables reach the device by a non-blocking copy from pinned memory, safe
under CUDA-graph capture (:func:`_table`).

Language: the subset common to Triton 3.6–3.9 (pointer arithmetic, no ``tl.make_block_ptr``).
``apo_kernels.ops.triton_aot`` compiles every kernel variant these launchers launch for sm_80 and
sm_90 without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _validate

__all__ = [
    "FUSED_MAX_DIM",
    "is_interpreter",
    "triton_precondition",
    "triton_precondition_backward",
    "triton_precondition_grouped",
    "triton_precondition_grouped_backward",
]

# Layers with m and n at most FUSED_MAX_DIM go to the fused single-program kernels, the rest to the
# tiled GEMMs. 64 is the largest power of two at which every fused program (forward, backward,
# batched, grouped; fp32, fp16, bf16) compiles without register spills for sm_80 and sm_90
# (``python -m apo_kernels.ops.triton_aot`` checks it; at 128 the grouped backward spilled 2.4 KB
# per thread). Tests lower it to force the tiled path.
FUSED_MAX_DIM = 64

# Register cap per thread given to ptxas for the fused programs (≤ 8 warps: 255 still fits 256
# threads in one SM's 64K registers). Without it ptxas stopped at 128 and spilled programs that
# fit in 150-230.
MAXNREG = 255

# dtype codes passed to kernels as constexprs (DT: the pointee type of table pointers;
# DOT_DT: the operand type fed to tl.dot).
_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def is_interpreter() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _as_ptr(v, DT: tl.constexpr):
    """An int64 address from a layer table, as a pointer to the layer's dtype."""
    if DT == 1:
        return v.to(tl.pointer_type(tl.float16))
    elif DT == 2:
        return v.to(tl.pointer_type(tl.bfloat16))
    else:
        return v.to(tl.pointer_type(tl.float32))


@triton.jit
def _load_f32(ptr, rows, cols, s_r, s_c, n_r, n_c):
    """Masked tile ptr[rows, cols] (zero outside n_r × n_c), cast to fp32 right after the load.

    A transposed tile is the same call with the strides swapped.
    """
    mask = (rows[:, None] < n_r) & (cols[None, :] < n_c)
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, val, rows, cols, s_r, s_c, n_r, n_c):
    """Masked store, rounding fp32 ``val`` once to the pointee dtype."""
    mask = (rows[:, None] < n_r) & (cols[None, :] < n_c)
    tl.store(ptr + rows[:, None] * s_r + cols[None, :] * s_c, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cvt(x, DOT_DT: tl.constexpr):
    """Cast a dot operand to the dot input type (fp32, or fp16/bf16 for tensor cores on GPU)."""
    if DOT_DT == 1:
        return x.to(tl.float16)
    elif DOT_DT == 2:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot_acc(a, b, acc, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with operands already in the dot input type."""
    if DOT_DT == 0:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------------------------
# Fused single-program bodies (one layer, m ≤ BM, n ≤ BN)
#
# Every product is a K-loop of BK-wide chunks into one BM×BN fp32 accumulator, so at most one
# accumulator and two operand chunks are live: whole-layer tiles held in registers spilled to local
# memory (up to 23 KB per thread at 64×128). Intermediates (GB, M, E, ...) go through a per-layer
# fp32 scratch buffer in global memory (L2-resident at these sizes); a block-wide barrier between
# the stages makes one stage's stores visible to the next stage's loads.
# --------------------------------------------------------------------------------------------

FUSED_BK = 16  # K chunk of the fused products (≥ 16 for tl.dot; 32 spilled with tf32x3 on sm_80)
FWD_SCRATCH = tl.constexpr(2)  # BM×BN fp32 scratch slots per layer, forward
BWD_SCRATCH = tl.constexpr(5)  # and backward


@triton.jit
def _tile(ptr, rows, cols, s_r, s_c, n_r, n_c, PADDED: tl.constexpr):
    """fp32 tile ptr[rows, cols]: masked to n_r × n_c, or unmasked from a zero-padded scratch slot.

    Scratch slots are whole BM×BN tiles, stored unmasked: every intermediate is zero outside m×n
    (each is a product or ⊙ of masked, zero-filled loads), so reading the padding reads zeros. That
    saves the masks and the runtime strides, which cost the unaligned programs ~80 registers."""
    if PADDED:
        return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c)
    else:
        return _load_f32(ptr, rows, cols, s_r, s_c, n_r, n_c)


@triton.jit
def _put(slot, val, BM: tl.constexpr, BN: tl.constexpr):
    """Store a whole BM×BN fp32 tile into a scratch slot (row-major, leading dimension BN)."""
    tl.store(slot + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], val)


@triton.jit
def _mm(x, sxm, sxk, y, syk, syn, M, N, K, XP: tl.constexpr, YP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """fp32 BM×BN tile of X @ Y (X: M×K, Y: K×N, strided; zero outside M×N), K in BK chunks.
    XP / YP: the operand is a padded scratch slot (see :func:`_tile`)."""
    return _mm_acc(tl.zeros((BM, BN), dtype=tl.float32), x, sxm, sxk, y, syk, syn, M, N, K, XP, YP,
                   BM, BN, BK, DOT_DT, PREC)


@triton.jit
def _mm_acc(acc, x, sxm, sxk, y, syk, syn, M, N, K, XP: tl.constexpr, YP: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """acc + X @ Y (as :func:`_mm`): a sum of two products keeps one accumulator live, not two."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        xa = _cvt(_tile(x, rm, k0 + rk, sxm, sxk, M, K, XP), DOT_DT)
        yb = _cvt(_tile(y, k0 + rk, rn, syk, syn, K, N, YP), DOT_DT)
        acc = _dot_acc(xa, yb, acc, DOT_DT, PREC)
    return acc


@triton.jit
def _left(a, sar, sac, x, sxr, sxc, m, n, XP: tl.constexpr, IDENTITY: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """fp32 BM×BN tile of F X: F the m×m factor ``a`` with strides (sar, sac) (A or Aᵀ), X m×n;
    X's own tile when the factor is the identity (no product)."""
    if IDENTITY:
        return _tile(x, tl.arange(0, BM), tl.arange(0, BN), sxr, sxc, m, n, XP)
    else:
        return _mm(a, sar, sac, x, sxr, sxc, m, n, m, False, XP, BM, BN, BK, DOT_DT, PREC)


@triton.jit
def _right(x, sxr, sxc, b, sbr, sbc, m, n, XP: tl.constexpr, IDENTITY: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """fp32 BM×BN tile of X F: X m×n, F the n×n factor ``b`` with strides (sbr, sbc) (B or Bᵀ);
    X's own tile when the factor is the identity (no product)."""
    if IDENTITY:
        return _tile(x, tl.arange(0, BM), tl.arange(0, BN), sxr, sxc, m, n, XP)
    else:
        return _mm(x, sxr, sxc, b, sbr, sbc, m, n, n, XP, False, BM, BN, BK, DOT_DT, PREC)


@triton.jit
def _fused_fwd_body(
    g, a, s, b, y, t, m, n,
    sgm, sgn, sam, sak, ssm, ssn, sbk, sbn, sym, syn,
    A_ID: tl.constexpr, B_ID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    # t: FWD_SCRATCH padded BM×BN slots: t1 = G B, then M Bᵀ; t2 = M.
    # A_ID / B_ID: that factor is the identity; its products are skipped (never multiplied by I).
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    t1 = t
    t2 = t + BM * BN
    if B_ID:
        H = _left(a, sak, sam, g, sgm, sgn, m, n, False, A_ID, BM, BN, BK, DOT_DT, PREC)    # Aᵀ G
    else:
        _put(t1, _mm(g, sgm, sgn, b, sbk, sbn, m, n, n, False, False, BM, BN, BK, DOT_DT, PREC), BM, BN)
        tl.debug_barrier()
        H = _left(a, sak, sam, t1, BN, 1, m, n, True, A_ID, BM, BN, BK, DOT_DT, PREC)       # Aᵀ (G B)
    M = _load_f32(s, rm, rn, ssm, ssn, m, n) * H                                            # M = S ⊙ H
    if A_ID and B_ID:
        Y = M
    else:
        _put(t2, M, BM, BN)
        tl.debug_barrier()
        if B_ID:
            Y = _mm(a, sam, sak, t2, BN, 1, m, n, m, False, True, BM, BN, BK, DOT_DT, PREC)     # A M
        elif A_ID:
            Y = _mm(t2, BN, 1, b, sbn, sbk, m, n, n, True, False, BM, BN, BK, DOT_DT, PREC)     # M Bᵀ
        else:
            _put(t1, _mm(t2, BN, 1, b, sbn, sbk, m, n, n, True, False, BM, BN, BK, DOT_DT, PREC), BM, BN)
            tl.debug_barrier()
            Y = _mm(a, sam, sak, t1, BN, 1, m, n, m, False, True, BM, BN, BK, DOT_DT, PREC)     # A (M Bᵀ)
    _store(y, Y, rm, rn, sym, syn, m, n)


@triton.jit
def _fused_bwd_body(
    dy, g, a, s, b, dg, da, ds, db, t, m, n,
    sdym, sdyn, sgm, sgn, sam, sak, ssm, ssn, sbk, sbn,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    A_ID: tl.constexpr, B_ID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    # Outputs are contiguous: dG, dS (m, n), dA (m, m), dB (n, n).
    # t: BWD_SCRATCH padded BM×BN slots: p1 = dY B, then A M; p2 = G B; p3 = E; p4 = M; p5 = D, then A E.
    # A_ID / B_ID: that factor is the identity: its products are skipped (dY B and G B are dY and G,
    # read in place; A E and A M are E and M) and its gradient is not asked for (NEED_A / NEED_B
    # False: the launchers never request it).
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    p1 = t
    p2 = t + BM * BN
    p3 = t + 2 * BM * BN
    p4 = t + 3 * BM * BN
    p5 = t + 4 * BM * BN
    if not B_ID:
        _put(p1, _mm(dy, sdym, sdyn, b, sbk, sbn, m, n, n, False, False, BM, BN, BK, DOT_DT, PREC), BM, BN)
        if NEED_A or NEED_S or NEED_B:  # H is needed
            _put(p2, _mm(g, sgm, sgn, b, sbk, sbn, m, n, n, False, False, BM, BN, BK, DOT_DT, PREC), BM, BN)
        tl.debug_barrier()
    # S is loaded after each K-loop (twice, from L1/L2) rather than held live across both.
    if B_ID:
        D = _left(a, sak, sam, dy, sdym, sdyn, m, n, False, A_ID, BM, BN, BK, DOT_DT, PREC)  # Aᵀ dY
    else:
        D = _left(a, sak, sam, p1, BN, 1, m, n, True, A_ID, BM, BN, BK, DOT_DT, PREC)      # Aᵀ dY B
    if NEED_G or NEED_A or NEED_B:
        _put(p3, _load_f32(s, rm, rn, ssm, ssn, m, n) * D, BM, BN)                          # E = S ⊙ D
    if NEED_S:
        _put(p5, D, BM, BN)
        tl.debug_barrier()
    if NEED_A or NEED_S or NEED_B:
        if B_ID:
            H = _left(a, sak, sam, g, sgm, sgn, m, n, False, A_ID, BM, BN, BK, DOT_DT, PREC)  # Aᵀ G
        else:
            H = _left(a, sak, sam, p2, BN, 1, m, n, True, A_ID, BM, BN, BK, DOT_DT, PREC)   # Aᵀ G B
        if NEED_A or NEED_B:
            _put(p4, _load_f32(s, rm, rn, ssm, ssn, m, n) * H, BM, BN)                      # M = S ⊙ H
        if NEED_S:
            _store(ds, _tile(p5, rm, rn, BN, 1, m, n, True) * H, rm, rn, n, 1, m, n)      # dS = D ⊙ H
    tl.debug_barrier()
    if NEED_A:  # dA = (dY B) Mᵀ + (G B) Eᵀ
        if B_ID:
            dA = _mm(dy, sdym, sdyn, p4, 1, BN, m, m, n, False, True, BM, BM, BK, DOT_DT, PREC)
            dA = _mm_acc(dA, g, sgm, sgn, p3, 1, BN, m, m, n, False, True, BM, BM, BK, DOT_DT, PREC)
        else:
            dA = _mm(p1, BN, 1, p4, 1, BN, m, m, n, True, True, BM, BM, BK, DOT_DT, PREC)
            dA = _mm_acc(dA, p2, BN, 1, p3, 1, BN, m, m, n, True, True, BM, BM, BK, DOT_DT, PREC)
        _store(da, dA, rm, rm, m, 1, m, m)
        if NEED_B:
            tl.debug_barrier()  # p1 is overwritten below
    if A_ID:
        ae = p3  # A E = E
        am = p4  # A M = M
    else:
        ae = p5
        am = p1
        if NEED_G or NEED_B:
            _put(p5, _mm(a, sam, sak, p3, BN, 1, m, n, m, False, True, BM, BN, BK, DOT_DT, PREC), BM, BN)  # A E
            if NEED_B:
                _put(p1, _mm(a, sam, sak, p4, BN, 1, m, n, m, False, True, BM, BN, BK, DOT_DT, PREC), BM, BN)  # A M
            tl.debug_barrier()
    if NEED_G:  # dG = (A E) Bᵀ
        dG = _right(ae, BN, 1, b, sbn, sbk, m, n, True, B_ID, BM, BN, BK, DOT_DT, PREC)
        _store(dg, dG, rm, rn, n, 1, m, n)
    if NEED_B:  # dB = dYᵀ (A M) + Gᵀ (A E)
        dB = _mm(dy, sdyn, sdym, am, BN, 1, n, n, m, False, True, BN, BN, BK, DOT_DT, PREC)
        dB = _mm_acc(dB, g, sgn, sgm, ae, BN, 1, n, n, m, False, True, BN, BN, BK, DOT_DT, PREC)
        _store(db, dB, rn, rn, n, 1, n, n)


# --------------------------------------------------------------------------------------------
# Fused kernels: batched (program_id = layer of a 3-D batch) and grouped (program_id = table row)
# --------------------------------------------------------------------------------------------


# Batch strides vary with the layer shape and only enter one int64 base offset: not specialized.
@triton.jit(do_not_specialize=["sgb", "sab", "ssb", "sbb"])
def _fused_fwd_kernel(
    g, a, s, b, y, t, m, n,
    sgb, sgm, sgn, sab, sam, sak, ssb, ssm, ssn, sbb, sbk, sbn,
    A_ID: tl.constexpr, B_ID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    _fused_fwd_body(
        g + l * sgb, a + l * sab, s + l * ssb, b + l * sbb, y + l * m * n,
        t + l * (FWD_SCRATCH * BM * BN), m, n,
        sgm, sgn, sam, sak, ssm, ssn, sbk, sbn, n, 1,
        A_ID, B_ID, BM, BN, BK, DOT_DT, PREC,
    )


@triton.jit(do_not_specialize=["sdyb", "sgb", "sab", "ssb", "sbb"])
def _fused_bwd_kernel(
    dy, g, a, s, b, dg, da, ds, db, t, m, n,
    sdyb, sdym, sdyn, sgb, sgm, sgn, sab, sam, sak, ssb, ssm, ssn, sbb, sbk, sbn,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    A_ID: tl.constexpr, B_ID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    _fused_bwd_body(
        dy + l * sdyb, g + l * sgb, a + l * sab, s + l * ssb, b + l * sbb,
        dg + l * m * n, da + l * m * m, ds + l * m * n, db + l * n * n,
        t + l * (BWD_SCRATCH * BM * BN), m, n,
        sdym, sdyn, sgm, sgn, sam, sak, ssm, ssn, sbk, sbn,
        NEED_G, NEED_A, NEED_S, NEED_B, A_ID, B_ID, BM, BN, BK, DOT_DT, PREC,
    )


# Layer-table layouts (int64 rows, one per layer, padded to 8 or 16 entries: 64-byte aligned rows).
# Layers in a table are contiguous (the launchers copy any other first), so rows hold only
# addresses and dimensions: no runtime strides in the kernel's index arithmetic, which keeps the
# grouped programs as lean in registers as the batched ones. Addresses of masked-off outputs and
# of identity factors (never read: A_ID / B_ID) are 0; "t" is the layer's scratch.
_FWD_FIELDS = ("g", "a", "s", "b", "y", "t", "m", "n")
_BWD_FIELDS = ("dy", "g", "a", "s", "b", "dg", "da", "ds", "db", "t", "m", "n")
FWD_ROW = tl.constexpr(8)
BWD_ROW = tl.constexpr(16)


@triton.jit
def _ptr_at(row, k, DT: tl.constexpr):
    """Entry k of a table row (an int64 address) as a pointer to dtype code DT."""
    return _as_ptr(tl.load(row + k), DT)


@triton.jit
def _grouped_fwd_kernel(
    table, DT: tl.constexpr, A_ID: tl.constexpr, B_ID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    row = table + tl.program_id(0).to(tl.int64) * FWD_ROW
    m = tl.load(row + 6).to(tl.int32)
    n = tl.load(row + 7).to(tl.int32)
    _fused_fwd_body(
        _ptr_at(row, 0, DT), _ptr_at(row, 1, DT), _ptr_at(row, 2, DT), _ptr_at(row, 3, DT),
        _ptr_at(row, 4, DT), _ptr_at(row, 5, 0), m, n,
        n, 1, m, 1, n, 1, n, 1, n, 1,
        A_ID, B_ID, BM, BN, BK, DOT_DT, PREC,
    )


@triton.jit
def _grouped_bwd_kernel(
    table, DT: tl.constexpr, A_ID: tl.constexpr, B_ID: tl.constexpr,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    row = table + tl.program_id(0).to(tl.int64) * BWD_ROW
    m = tl.load(row + 10).to(tl.int32)
    n = tl.load(row + 11).to(tl.int32)
    _fused_bwd_body(
        _ptr_at(row, 0, DT), _ptr_at(row, 1, DT), _ptr_at(row, 2, DT), _ptr_at(row, 3, DT),
        _ptr_at(row, 4, DT), _ptr_at(row, 5, DT), _ptr_at(row, 6, DT), _ptr_at(row, 7, DT),
        _ptr_at(row, 8, DT), _ptr_at(row, 9, 0), m, n,
        n, 1, n, 1, m, 1, n, 1, n, 1,
        NEED_G, NEED_A, NEED_S, NEED_B, A_ID, B_ID, BM, BN, BK, DOT_DT, PREC,
    )


# --------------------------------------------------------------------------------------------
# Tiled batched GEMM with fused epilogues (large layers)
# --------------------------------------------------------------------------------------------


# Batch strides vary with every layer shape and only enter one int64 base offset: not specialized.
@triton.jit(do_not_specialize=["sxb", "syb", "sx2b", "sy2b", "scb", "ssb", "shb"])
def _gemm_kernel(
    x, y, x2, y2, c, c2, s, h,
    M, N, K,
    sxb, sxm, sxk, syb, syk, syn,
    sx2b, sx2m, sx2k, sy2b, sy2k, sy2n,
    scb, scm, scn, ssb, ssm, ssn, shb, shm, shn,
    EPI: tl.constexpr, DUAL: tl.constexpr, STORE_C: tl.constexpr, STORE_C2: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc = X @ Y (+ X2 @ Y2 when DUAL) per batch element; transposes are swapped strides.

    One grid axis: program_id(0) = batch · tiles + tile (axis 1 is limited to 65535, too few for a
    long batch). IDX64: element offsets within one matrix reach 2³¹, so index arithmetic is int64.

    Epilogues (c and c2 share the strides sc*):
      EPI 0: c = acc
      EPI 1: c = S ⊙ acc (M),  c2 = acc (H)                 -- forward, GEMM producing H
      EPI 2: c = S ⊙ acc (E),  c2 = acc ⊙ H (dS)            -- backward, GEMM producing D
    STORE_C / STORE_C2 switch each store off (nothing is written that is not needed).
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    bid = (pid // (num_m * num_n)).to(tl.int64)
    pid = pid % (num_m * num_n)
    # Grouped tile order: GROUP_M row-tiles share their Y column tiles in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if IDX64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        rk = rk.to(tl.int64)
        kstep = tl.full([], BLOCK_K, tl.int64)
    else:
        kstep = BLOCK_K
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    xp = (x + bid * sxb) + (rm[:, None] * sxm + rk[None, :] * sxk)
    yp = (y + bid * syb) + (rk[:, None] * syk + rn[None, :] * syn)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        xa = _cvt(tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
        yb = _cvt(tl.load(yp, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
        acc = _dot_acc(xa, yb, acc, DOT_DT, PREC)
        xp += kstep * sxk
        yp += kstep * syk
    if DUAL:
        xp2 = (x2 + bid * sx2b) + (rm[:, None] * sx2m + rk[None, :] * sx2k)
        yp2 = (y2 + bid * sy2b) + (rk[:, None] * sy2k + rn[None, :] * sy2n)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            xa = _cvt(tl.load(xp2, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
            yb = _cvt(tl.load(yp2, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
            acc = _dot_acc(xa, yb, acc, DOT_DT, PREC)
            xp2 += kstep * sx2k
            yp2 += kstep * sy2k

    # The batch offset goes into the (scalar) base pointers, so the per-element offsets stay int32
    # unless IDX64: an int64 offset tile costs two registers per element and spilled.
    c_off = rm[:, None] * scm + rn[None, :] * scn
    mask = m_ok[:, None] & n_ok[None, :]
    if EPI == 0:
        tl.store(c + bid * scb + c_off, acc.to(c.dtype.element_ty), mask=mask)
    else:
        sv = tl.load((s + bid * ssb) + rm[:, None] * ssm + rn[None, :] * ssn, mask=mask, other=0.0).to(tl.float32)
        if STORE_C:
            tl.store((c + bid * scb) + c_off, (sv * acc).to(c.dtype.element_ty), mask=mask)
        if STORE_C2:
            if EPI == 1:
                tl.store((c2 + bid * scb) + c_off, acc.to(c2.dtype.element_ty), mask=mask)
            else:
                hv = tl.load((h + bid * shb) + rm[:, None] * shm + rn[None, :] * shn, mask=mask,
                             other=0.0).to(tl.float32)
                tl.store((c2 + bid * scb) + c_off, (acc * hv).to(c2.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Each config is free of register
# spills for sm_80 and sm_90 on every epilogue and operand type it is used for (triton_aot checks).
# The usual Triton set spilled up to 1.9 KB per thread with fp32 operands (tf32x3 splits each
# operand in two) and up to 0.8 KB with bf16: 128×128 tiles spill with either, 64×64×16 with 4 warps
# spilled the bf16 epilogue. (Unlike the fused programs, the GEMMs spill more with maxnreg=255, not
# less.)
GEMM_CONFIGS = (
    (128, 64, 16, 8, 8, 3),
    (64, 128, 16, 8, 8, 3),
    (32, 64, 32, 8, 4, 4),
)
# GEMMs of a half input and an fp32 intermediate under tf32x3 spilled 8-16 B with the last config
# (bf16 dual on sm_90, an fp16 product on sm_80; 32×64×16 with 4 warps and 32×64×32 with 8 left
# 8 B stack frames in other variants): they take the other two.
_MIXED_EXCLUDED = GEMM_CONFIGS[2]


def gemm_configs(args: dict, constexprs: dict) -> tuple:
    """The configs one GEMM launch may take (autotuned on a GPU, every one compiled by triton_aot)."""
    operands = ("x", "y", "x2", "y2") if constexprs["DUAL"] else ("x", "y")
    if len({args[k].dtype for k in operands}) > 1:
        return tuple(c for c in GEMM_CONFIGS if c != _MIXED_EXCLUDED)
    return GEMM_CONFIGS


# Under the interpreter: one config, large enough to keep the Python loop short and small
# enough that odd shapes still take several K steps and masked tails.
INTERPRETER_GEMM_CONFIG = (64, 64, 32, 8, 4, 1)


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Autotune candidates for one GEMM: those of :func:`gemm_configs`, and no tiles far larger than
    the problem (a 40×40 product gains nothing from trying 128×64 tiles). Always one left."""
    a = {**named_args, **kwargs}
    allowed = gemm_configs(a, a)
    configs = [c for c in configs if _config_tuple(c) in allowed]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(a["M"]))
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(a["N"]))]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _config_tuple(c) -> tuple:
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["GROUP_M"], c.num_warps, c.num_stages)


def _quick_bench(fn, quantiles=None, **_):
    """The autotuner's timer with short warm-up and repetition (Triton's default: 25 + 100 ms a config)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_gemm_autotuned = None


def _gemm_tuned():
    """``_gemm_kernel`` under @triton.autotune, built on first GPU use (its benchmarker needs a GPU).

    Three configs, pruned by problem size (was seven). The key leaves out the epilogue flags: GEMMs
    of one shape share their tuning, so a layer tunes ~4 (M, N, K, DUAL) keys instead of ~10."""
    global _gemm_autotuned
    if _gemm_autotuned is None:
        configs = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_warps=w, num_stages=st)
            for bm, bn, bk, gm, w, st in GEMM_CONFIGS
        ]
        _gemm_autotuned = triton.autotune(
            configs, key=["M", "N", "K", "DUAL", "DOT_DT", "PREC"],
            prune_configs_by={"early_config_prune": _prune_gemm_configs}, do_bench=_quick_bench,
        )(_gemm_kernel)
    return _gemm_autotuned


# --------------------------------------------------------------------------------------------
# Launch plumbing
# --------------------------------------------------------------------------------------------


class Launcher:
    """Where the launchers' kernels go: this one checks the inputs' device and runs them.

    ``apo_kernels.ops.triton_aot`` installs a recording subclass as :data:`LAUNCHER` to collect
    every kernel variant from meta tensors without a GPU; the launchers call the hook at the
    launch point only, so running carries no recording test.
    """

    def check_device(self, t: Tensor, what: str) -> None:
        """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
        if t.device.type == "cpu":
            if not is_interpreter():
                raise ValueError(
                    f"triton backend: {what} is a CPU tensor; Triton runs on CUDA tensors, or on CPU tensors "
                    "only in its interpreter (set TRITON_INTERPRET=1 before triton is first imported)"
                )
        elif t.device.type != "cuda":
            raise ValueError(f"triton backend: {what} is on {t.device}; expected a CUDA (or interpreted CPU) tensor")

    def run(self, kernel, grid, args: dict, constexprs: dict, options: dict):
        """Launch one kernel; returns Triton's compiled kernel."""
        return kernel[grid](**args, **constexprs, **options)

    def run_gemm(self, grid, args: dict, constexprs: dict) -> None:
        """Launch :func:`_gemm_kernel`: autotuned on a GPU, one fixed config under the interpreter."""
        if is_interpreter():
            bm, bn, bk, gm, w, st = INTERPRETER_GEMM_CONFIG
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm)
            _gemm_kernel[grid(meta)](**args, **constexprs, **meta, num_warps=w, num_stages=st)
        else:
            _gemm_tuned()[grid](**args, **constexprs)


LAUNCHER = Launcher()


def _launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1,
            maxnreg: Optional[int] = None):
    """Launch one kernel through :data:`LAUNCHER`. maxnreg: register cap per thread for ptxas
    (see MAXNREG)."""
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None and not is_interpreter():
        options["maxnreg"] = maxnreg
    return LAUNCHER.run(kernel, grid, args, constexprs, options)


def _next_pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))  # tl.dot needs every block dim ≥ 16


def _fused_warps(bm: int, bn: int) -> int:
    # The backward's dA and dB accumulators are max(bm, bn)²: at 64, 8 warps keep each at 16
    # registers per thread.
    return 4 if max(bm, bn) <= 32 else 8


def _dot_config(dtype: torch.dtype, fused: bool = False, half_operands: bool = False) -> tuple[int, str]:
    """(DOT_DT, PREC): dot operand type and fp32 input precision for one product of a ``dtype`` layer.

    Half operands (fp16/bf16 tensor-core MMAs) only where ``half_operands``: both operands are the
    layer's own fp16/bf16 inputs, which a half operand holds exactly. An fp32 intermediate is never
    rounded to half on its way into a product: those dots are fp32, so a half layer is rounded once,
    on store. fp32 dots: "tf32" for fp32 layers when torch allows TF32 matmuls, as torch does;
    otherwise "tf32x3" in the tiled GEMMs (three tf32 MMAs, fp32-level accuracy) and "ieee" in the
    fused programs, whose BK-wide chunks keep the FMA code small: there tf32x3's split operands cost
    ~250 registers per thread and spilled. Half operands ignore PREC (one fixed value, so no
    duplicate compiles)."""
    if is_interpreter():
        return 0, "ieee"  # the interpreter computes dots in fp32 (and cannot do bf16 arithmetic)
    if dtype != torch.float32 and half_operands:
        return _DT_CODE[dtype], "ieee"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 0, "tf32"
    return 0, "ieee" if fused else "tf32x3"


def _s3(t: Tensor) -> tuple[int, int, int]:
    """(batch, row, col) strides of a 2-D or 3-D tensor; batch stride 0 for 2-D."""
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


class _Op:
    """A GEMM operand: tensor + (batch, row, col) strides; ``.T`` swaps row and col strides."""

    __slots__ = ("t", "sb", "sr", "sc")

    def __init__(self, t: Tensor, strides=None):
        self.t = t
        self.sb, self.sr, self.sc = strides if strides is not None else _s3(t)

    @property
    def T(self) -> "_Op":
        return _Op(self.t, (self.sb, self.sc, self.sr))


def _gemm(L: int, M: int, N: int, K: int, x: _Op, y: _Op, c: Tensor, *, x2: Optional[_Op] = None,
          y2: Optional[_Op] = None, c2: Optional[Tensor] = None, s: Optional[_Op] = None,
          h: Optional[_Op] = None, epi: int = 0, store_c: bool = True, dtype: torch.dtype) -> None:
    """c (and c2) = epilogue(x @ y [+ x2 @ y2]) for L batched (M×K)·(K×N) products.

    c and c2 are contiguous (L, M, N) or (M, N); unused pointers get ``c`` as a placeholder.
    """
    operands = (x, y) if x2 is None else (x, y, x2, y2)
    dot_dt, prec = _dot_config(dtype, half_operands=all(o.t.dtype == dtype for o in operands))
    scb, scm, scn = _s3(c)
    dummy = _Op(c, (0, 0, 0))
    x2 = x2 or dummy
    y2 = y2 or dummy
    s = s or dummy
    h = h or dummy
    args = dict(
        x=x.t, y=y.t, x2=x2.t, y2=y2.t, c=c, c2=c if c2 is None else c2, s=s.t, h=h.t,
        M=M, N=N, K=K,
        sxb=x.sb, sxm=x.sr, sxk=x.sc, syb=y.sb, syk=y.sr, syn=y.sc,
        sx2b=x2.sb, sx2m=x2.sr, sx2k=x2.sc, sy2b=y2.sb, sy2k=y2.sr, sy2n=y2.sc,
        scb=scb, scm=scm, scn=scn, ssb=s.sb, ssm=s.sr, ssn=s.sc, shb=h.sb, shm=h.sr, shn=h.sc,
    )
    spans = (_span2(M, K, x.sr, x.sc), _span2(K, N, y.sr, y.sc), _span2(M, N, scm, scn),
             _span2(M, K, x2.sr, x2.sc), _span2(K, N, y2.sr, y2.sc), _span2(M, N, s.sr, s.sc),
             _span2(M, N, h.sr, h.sc))
    consts = dict(EPI=epi, DUAL=x2 is not dummy, STORE_C=store_c, STORE_C2=c2 is not None,
                  DOT_DT=dot_dt, PREC=prec, IDX64=max(spans) >= INT32_OFFSETS)
    def grid(meta):  # batch folded into axis 0 (see _gemm_kernel)
        programs = L * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        if programs >= 2**31:
            raise ValueError(f"triton backend: {programs} GEMM tiles exceed one launch's grid (2^31 - 1)")
        return (programs,)

    LAUNCHER.run_gemm(grid, args, consts)


def _span2(rows: int, cols: int, s_r: int, s_c: int) -> int:
    """Largest element offset within a rows×cols matrix with strides (s_r, s_c)."""
    return max(rows - 1, 0) * s_r + max(cols - 1, 0) * s_c


# Element offsets within one matrix from here on need int64 index arithmetic in the GEMM kernel.
INT32_OFFSETS = 2**31


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check(tensors: Sequence[Tensor], what: str) -> None:
    """Device and dtype support of the Triton backend, on inputs that passed ``_validate``."""
    if not tensors:
        return
    t0 = tensors[0]
    if t0.dtype not in _DT_CODE:
        raise TypeError(f"triton backend: {what} has dtype {t0.dtype}; supported: float32, float16, bfloat16")
    LAUNCHER.check_device(t0, what)


# --------------------------------------------------------------------------------------------
# Single (optionally batched) layer
# --------------------------------------------------------------------------------------------


def _dims(grad: Tensor) -> tuple[int, int, int]:
    return (grad.shape[0], grad.shape[1], grad.shape[2]) if grad.dim() == 3 else (1, grad.shape[0], grad.shape[1])


def _fused_ok(m: int, n: int) -> bool:
    return m <= FUSED_MAX_DIM and n <= FUSED_MAX_DIM


def _factor(t: Optional[Tensor], placeholder: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(pointer argument, (batch, row, col) strides) of a factor; an identity factor (None) passes
    ``placeholder``, which the kernels never read (A_ID / B_ID)."""
    return (placeholder, (0, 0, 0)) if t is None else (t, _s3(t))


def _forward_into(out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> None:
    L, m, n = _dims(grad)
    if not _fused_ok(m, n):
        _forward_tiled(out, grad, A, S, B)
        return
    dot_dt, prec = _dot_config(grad.dtype, fused=True)
    bm, bn = _next_pow2(m), _next_pow2(n)
    (a, sa), (b, sb) = _factor(A, grad), _factor(B, grad)
    sg, ss = _s3(grad), _s3(S)
    scratch = torch.empty((L, FWD_SCRATCH.value, bm, bn), dtype=torch.float32, device=grad.device)
    args = dict(g=grad, a=a, s=S, b=b, y=out, t=scratch, m=m, n=n,
                sgb=sg[0], sgm=sg[1], sgn=sg[2], sab=sa[0], sam=sa[1], sak=sa[2],
                ssb=ss[0], ssm=ss[1], ssn=ss[2], sbb=sb[0], sbk=sb[1], sbn=sb[2])
    consts = dict(A_ID=A is None, B_ID=B is None, BM=bm, BN=bn, BK=FUSED_BK, DOT_DT=dot_dt, PREC=prec)
    _launch(_fused_fwd_kernel, (L,), args, consts, num_warps=_fused_warps(bm, bn), maxnreg=MAXNREG)


def _optional_op(t: Optional[Tensor]) -> Optional[_Op]:
    return None if t is None else _Op(t)


def _fp32_like(grad: Tensor) -> Tensor:
    """An fp32 (L, m, n) buffer for an intermediate between GEMMs."""
    return torch.empty(_dims(grad), dtype=torch.float32, device=grad.device)


def _at_x_b(grad: Tensor, A_: Optional[_Op], x: _Op, B_: Optional[_Op], c: Tensor, **epilogue) -> Optional[_Op]:
    """c (and c2) = epilogue(Aᵀ X B), X m×n like ``grad``, skipping identity factors (None; at least
    one factor is given): the last GEMM carries the epilogue. Returns X B (X itself when B = I),
    which dA reuses, when A is given; None otherwise (then no GEMM forms X B on its own)."""
    L, m, n = _dims(grad)
    if A_ is None:
        _gemm(L, m, n, n, x, B_, c, dtype=grad.dtype, **epilogue)
        return None
    xb = x
    if B_ is not None:
        xb = _Op(_fp32_like(grad))
        _gemm(L, m, n, n, x, B_, xb.t, dtype=grad.dtype)
    _gemm(L, m, n, m, A_.T, xb, c, dtype=grad.dtype, **epilogue)
    return xb


def _a_x_bt(grad: Tensor, A_: Optional[_Op], x: _Op, B_: Optional[_Op], c: Tensor) -> None:
    """c = A X Bᵀ, X m×n like ``grad``, skipping identity factors (None; at least one is given)."""
    L, m, n = _dims(grad)
    if B_ is not None:
        if A_ is None:
            _gemm(L, m, n, n, x, B_.T, c, dtype=grad.dtype)
            return
        xbt = _fp32_like(grad)
        _gemm(L, m, n, n, x, B_.T, xbt, dtype=grad.dtype)
        x = _Op(xbt)
    _gemm(L, m, n, m, A_, x, c, dtype=grad.dtype)


def _forward_tiled(out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> None:
    if A is None and B is None:  # no GEMM left: Y = S ⊙ G, computed in fp32 and rounded once
        torch.mul(S, grad, out=out)
        return
    A_, B_ = _optional_op(A), _optional_op(B)
    M = _fp32_like(grad)
    _at_x_b(grad, A_, _Op(grad), B_, M, s=_Op(S), epi=1)                   # M = S ⊙ (Aᵀ G B)
    _a_x_bt(grad, A_, _Op(M), B_, out)                                       # Y = A M Bᵀ


def _needed(mask: Sequence[bool], a_identity: bool, b_identity: bool) -> tuple[bool, bool, bool, bool]:
    """The backward's outputs to compute: the mask, less the gradient of an identity factor (it has
    none: the op returns an empty (0,) tensor in its place)."""
    return (mask[0], mask[1] and not a_identity, mask[2], mask[3] and not b_identity)


def _backward_into(outs: tuple, grad_out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor,
                   B: Optional[Tensor]) -> None:
    """outs = (dG, dA, dS, dB) preallocated contiguous tensors, None where not computed (always None
    for an identity factor's gradient)."""
    dG, dA, dS, dB = outs
    L, m, n = _dims(grad)
    if not _fused_ok(m, n):
        _backward_tiled(outs, grad_out, grad, A, S, B)
        return
    dot_dt, prec = _dot_config(grad.dtype, fused=True)
    bm, bn = _next_pow2(m), _next_pow2(n)
    (a, sa), (b, sb) = _factor(A, grad), _factor(B, grad)
    sdy, sg, ss = _s3(grad_out), _s3(grad), _s3(S)
    args = dict(dy=grad_out, g=grad, a=a, s=S, b=b,
                dg=grad_out if dG is None else dG, da=grad_out if dA is None else dA,
                ds=grad_out if dS is None else dS, db=grad_out if dB is None else dB,
                t=torch.empty((L, BWD_SCRATCH.value, bm, bn), dtype=torch.float32, device=grad.device), m=m, n=n,
                sdyb=sdy[0], sdym=sdy[1], sdyn=sdy[2], sgb=sg[0], sgm=sg[1], sgn=sg[2],
                sab=sa[0], sam=sa[1], sak=sa[2], ssb=ss[0], ssm=ss[1], ssn=ss[2],
                sbb=sb[0], sbk=sb[1], sbn=sb[2])
    consts = dict(NEED_G=dG is not None, NEED_A=dA is not None, NEED_S=dS is not None, NEED_B=dB is not None,
                  A_ID=A is None, B_ID=B is None, BM=bm, BN=bn, BK=FUSED_BK, DOT_DT=dot_dt, PREC=prec)
    _launch(_fused_bwd_kernel, (L,), args, consts, num_warps=_fused_warps(bm, bn), maxnreg=MAXNREG)


def _backward_tiled(outs: tuple, grad_out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor,
                    B: Optional[Tensor]) -> None:
    dG, dA, dS, dB = outs
    need_g, need_a, need_s, need_b = (o is not None for o in outs)
    if A is None and B is None:  # no GEMM left: D = dY and H = G, so dG = E = S ⊙ dY, dS = dY ⊙ G
        if need_g:
            torch.mul(S, grad_out, out=dG)
        if need_s:
            torch.mul(grad_out, grad, out=dS)
        return
    need_e = need_g or need_a or need_b
    need_mh = need_a or need_b  # M = S⊙H
    L, m, n = _dims(grad)
    kw = dict(dtype=grad.dtype)
    dY_, G_, S_ = _Op(grad_out), _Op(grad), _Op(S)
    A_, B_ = _optional_op(A), _optional_op(B)

    GB = H = Mb = None
    if need_s or need_mh:
        Mb = _fp32_like(grad) if need_mh else None
        H = _fp32_like(grad) if need_s else None
        # H = Aᵀ G B with epilogue: M = S⊙H (c) for dA/dB, H itself (c2) only for dS
        GB = _at_x_b(grad, A_, G_, B_, Mb if Mb is not None else H, c2=H, s=S_, epi=1, store_c=Mb is not None)
    E = _fp32_like(grad) if need_e else None
    # D = Aᵀ dY B with epilogue: E = S⊙D (c), dS = D⊙H (c2); D itself is never stored
    dYB = _at_x_b(grad, A_, dY_, B_, E if E is not None else dS, c2=dS, s=S_,
                  h=_Op(H) if H is not None else None, epi=2, store_c=E is not None)
    if need_g:
        _a_x_bt(grad, A_, _Op(E), B_, dG)                                   # dG = A E Bᵀ
    if need_a:
        # dA = dYB Mᵀ + GB Eᵀ in one dual GEMM (A is given here: an identity has no gradient)
        _gemm(L, m, m, n, dYB, _Op(Mb).T, dA, x2=GB, y2=_Op(E).T, **kw)
    if need_b:
        AM, AE = _Op(Mb), _Op(E)                                            # A M, A E: M, E when A = I
        if A_ is not None:
            AM, AE = _Op(_fp32_like(grad)), _Op(_fp32_like(grad))
            _gemm(L, m, n, m, A_, _Op(Mb), AM.t, **kw)
            _gemm(L, m, n, m, A_, _Op(E), AE.t, **kw)
        # dB = dYᵀ (A M) + Gᵀ (A E) in one dual GEMM
        _gemm(L, n, n, m, dY_.T, AM, dB, x2=G_.T, y2=AE, **kw)


def _empty_like_layer(grad: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=grad.dtype, device=grad.device)


def _bwd_shapes(grad: Tensor):
    *batch, m, n = grad.shape
    return ((*batch, m, n), (*batch, m, m), (*batch, m, n), (*batch, n, n))


def _on_inputs_device(launcher):
    """Run ``launcher`` with its inputs' CUDA device as the current device: Triton launches on the
    current device, which need not be the tensors' one."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        seq = first if isinstance(first, (list, tuple)) else ()
        t = first if isinstance(first, Tensor) else next((x for x in seq if isinstance(x, Tensor)), None)
        if t is None or t.device.type != "cuda":
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(first, *args, **kwargs)

    return wrapper


def _backward_outputs(grad: Tensor, A: Optional[Tensor], B: Optional[Tensor], mask: Sequence[bool]):
    """(outputs to compute, None where not; the op's result: None where masked off, and an empty
    (0,) tensor for a requested gradient of an identity factor)."""
    computed = tuple(_empty_like_layer(grad, sh) if need else None
                     for need, sh in zip(_needed(mask, A is None, B is None), _bwd_shapes(grad)))
    result = tuple(_empty_like_layer(grad, (0,)) if want and o is None else o for want, o in zip(mask, computed))
    return computed, result


@_on_inputs_device
def triton_precondition(grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> Tensor:
    """Y = A (S ⊙ (Aᵀ grad B)) Bᵀ; A = None or B = None is the identity (its products are skipped).

    grad, S: (m, n) or (L, m, n); A: (…, m, m); B: (…, n, n); float32/float16/bfloat16, same dtype
    and device (CUDA, or CPU under the interpreter). Returns a contiguous tensor like grad.
    """
    _validate.check_layer(grad, A, S, B)
    _validate.check_result_fits([grad])
    _check((grad, A, S, B), "grad")
    out = _empty_like_layer(grad, grad.shape)
    if out.numel() == 0:
        return out
    _forward_into(out, grad, A, S, B)
    return out


@_on_inputs_device
def triton_precondition_backward(
    grad_out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor],
    output_mask: Sequence[bool] = (True,) * 4,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d_grad, dA, dS, dB) of ⟨grad_out, Y⟩, None where ``output_mask`` is False.

    Only the requested outputs are computed (mask (False, True, True, True) never forms dG). An
    identity factor (None) has no gradient: an empty (0,) tensor stands in its place when asked for.
    Shapes as :func:`triton_precondition`; outputs contiguous, dtype of the inputs.
    """
    _validate.check_layer(grad, A, S, B)
    _validate.check_grad_out(grad_out, grad)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits([grad], mask)
    _check((grad_out, grad, A, S, B), "grad")
    computed, result = _backward_outputs(grad, A, B, mask)
    if grad.numel() == 0:
        # a zero m or n (or L) still leaves e.g. dA (m×m) = a sum over nothing = 0
        for o in computed:
            if o is not None:
                o.zero_()
    elif any(o is not None for o in computed):
        _backward_into(computed, grad_out, grad, A, S, B)
    return result


# --------------------------------------------------------------------------------------------
# Grouped: many layers of different shapes
# --------------------------------------------------------------------------------------------


def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.device.type == "meta" else t.data_ptr()


def _table_path_ok(t: Tensor) -> bool:
    # The interpreter copies tensor *arguments* to the host, but raw addresses in a table must be
    # host addresses: under the interpreter only CPU tensors go through the table.
    return not (is_interpreter() and t.device.type == "cuda")


def _scratch(layers: Sequence[int], grads: Sequence[Tensor], slots: int) -> tuple[Tensor, dict]:
    """One fp32 scratch buffer for the fused programs of ``layers``; {layer: address of its part}.

    Each layer gets ``slots`` slots of its padded block (BM×BN: the kernels store whole tiles)."""
    sizes = {i: slots * _next_pow2(grads[i].shape[0]) * _next_pow2(grads[i].shape[1]) for i in layers}
    scratch = torch.empty(sum(sizes.values()), dtype=torch.float32, device=grads[layers[0]].device)
    addr, offset = {}, _addr(scratch)
    for i in layers:
        addr[i] = offset
        offset += 4 * sizes[i]
    return scratch, addr


class _CapturedTableArena:
    """Pinned host memory for the layer tables copied while a CUDA graph is being captured.

    A captured host-to-device copy is replayed from the same host address, so that memory must
    stay put and unchanged for as long as the graph may be replayed: parts of this arena are handed
    out once and never reused. The arena itself is pinned outside capture, on the first grouped
    call on a CUDA device (that is the warm-up call that capture requires anyway).
    """

    SIZE = 1 << 19  # int64 entries (4 MiB): ~30 captures of a 1000-layer backward

    def __init__(self):
        self.buf: Optional[Tensor] = None
        self.used = 0

    def reserve(self) -> None:
        if self.buf is None:
            self.buf = torch.empty(self.SIZE, dtype=torch.int64).pin_memory()

    def take(self, values: Tensor) -> Tensor:
        n = values.numel()
        if self.buf is None or self.used + n > self.SIZE:
            raise RuntimeError(
                "triton backend: no pinned memory left for layer tables captured into CUDA graphs "
                f"({self.SIZE * 8 >> 20} MiB per process; call the op once outside capture first)")
        part = self.buf[self.used:self.used + n].view_as(values)
        self.used += n
        part.copy_(values)
        return part


_CAPTURED_TABLES = _CapturedTableArena()


def _table(rows: list, row_len: int, like: Tensor) -> Tensor:
    """The int64 layer table (rows zero-padded to ``row_len``) on ``like``'s device.

    Never a pageable or synchronizing copy: the rows go to the device from pinned memory with a
    non-blocking copy on the current stream. Under CUDA-graph capture the pinned source is a part
    of ``_CAPTURED_TABLES`` that is never reused, so every replay reads the rows of its capture.
    """
    host = torch.tensor([r + [0] * (row_len - len(r)) for r in rows], dtype=torch.int64)
    if like.device.type != "cuda":
        return host.to(like.device)
    _CAPTURED_TABLES.reserve()
    if torch.cuda.is_current_stream_capturing():
        host = _CAPTURED_TABLES.take(host)
    else:
        host = host.pin_memory()
    return host.to(like.device, non_blocking=True)


def _buckets(layers: Sequence[int], ins: list) -> dict:
    """Small layers by launch: {(BM, BN, A is identity, B is identity): [layer indices]}."""
    out: dict = {}
    for i in layers:
        g, a, b = ins[i][-4], ins[i][-3], ins[i][-1]
        m, n = g.shape
        out.setdefault((_next_pow2(m), _next_pow2(n), a is None, b is None), []).append(i)
    return out


def _grouped(kernel, row_len: int, slots: int, ins: list, outs: list, run_layer,
             mask: Optional[Sequence[bool]] = None) -> None:
    """The grouped forward and backward: small layers through ``kernel``, the rest one by one.

    ``ins[i]``: layer i's input tensors (the grad, A, S, B last; A or B None = identity) and
    ``outs[i]`` its outputs (None where not computed), in the order of the kernel's table row
    (inputs, outputs, scratch, m, n). Small 2-D layers (m, n ≤ FUSED_MAX_DIM) are one launch per
    padded block shape and identity pattern (constexprs A_ID, B_ID; an identity factor's address
    in the table is 0); the rest go through ``run_layer(outs[i], *ins[i])`` (the per-layer tiled /
    batched path). ``mask``: the backward's output mask (its NEED_* constexprs).
    """
    grads = [x[-4] for x in ins]
    small = []
    for i, g in enumerate(grads):
        if g.numel() == 0:
            for o in outs[i]:
                if o is not None:
                    o.zero_()  # e.g. dA (m×m) of an m×0 layer: a sum over nothing
        elif g.dim() == 2 and _fused_ok(*g.shape) and _table_path_ok(g):
            small.append(i)
        else:
            run_layer(outs[i], *ins[i])
    if not small:
        return
    dtype = grads[0].dtype
    dot_dt, prec = _dot_config(dtype, fused=True)
    scratch, scratch_addr = _scratch(small, grads, slots)
    buckets = _buckets(small, ins)
    rows = []
    keep = []  # contiguous copies of strided inputs, alive until the launches are queued
    for idx in buckets.values():
        for i in idx:
            xs = [None if t is None else t.contiguous() for t in ins[i]]
            keep += xs
            rows.append([*map(_addr, xs), *map(_addr, outs[i]), scratch_addr[i], *grads[i].shape])
    table = _table(rows, row_len, scratch)  # one copy for the whole call; each launch reads its rows
    start = 0
    for (bm, bn, a_id, b_id), idx in buckets.items():
        consts = dict(DT=_DT_CODE[dtype], A_ID=a_id, B_ID=b_id, BM=bm, BN=bn, BK=FUSED_BK, DOT_DT=dot_dt, PREC=prec)
        if mask is not None:
            consts.update(zip(("NEED_G", "NEED_A", "NEED_S", "NEED_B"), _needed(mask, a_id, b_id)))
        _launch(kernel, (len(idx),), dict(table=table[start:start + len(idx)]), consts,
                num_warps=_fused_warps(bm, bn), maxnreg=MAXNREG)
        start += len(idx)


@_on_inputs_device
def triton_precondition_grouped(grads: Sequence[Tensor], As: Sequence[Optional[Tensor]], Ss: Sequence[Tensor],
                                Bs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """Per-layer Y_i = A_i (S_i ⊙ (A_iᵀ G_i B_i)) B_iᵀ for layers of different shapes; a None in
    As or Bs is that layer's identity factor.

    Small 2-D layers (m, n ≤ FUSED_MAX_DIM) are one launch per padded block shape; the rest go
    through the per-layer (tiled / batched) path. Returns contiguous tensors.
    """
    _validate.check_group(grads, As, Ss, Bs)
    _validate.check_result_fits(grads)
    _check(grads, "grads[0]")
    outs = [_empty_like_layer(g, g.shape) for g in grads]
    _grouped(_grouped_fwd_kernel, FWD_ROW.value, FWD_SCRATCH.value, list(zip(grads, As, Ss, Bs)),
             [(y,) for y in outs], lambda o, *x: _forward_into(o[0], *x))
    return outs


@_on_inputs_device
def triton_precondition_grouped_backward(
    grad_outs: Sequence[Tensor], grads: Sequence[Tensor], As: Sequence[Optional[Tensor]], Ss: Sequence[Tensor],
    Bs: Sequence[Optional[Tensor]], output_mask: Sequence[bool] = (True,) * 4,
) -> tuple[list, list, list, list]:
    """Per-layer (d_grad, dA, dS, dB) for layers of different shapes; [] where masked off, and an
    empty (0,) tensor in the slot of an identity factor's gradient."""
    _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits(grads, mask)
    _check(grads, "grads[0]")
    if not any(mask):
        return ([], [], [], [])
    per_layer = [_backward_outputs(g, a, b, mask) for g, a, b in zip(grads, As, Bs)]
    _grouped(_grouped_bwd_kernel, BWD_ROW.value, BWD_SCRATCH.value, list(zip(grad_outs, grads, As, Ss, Bs)),
             [computed for computed, _ in per_layer], _backward_into, mask)
    return tuple([result[k] for _, result in per_layer] if mask[k] else [] for k in range(4))

"""Triton kernels of the structured-preconditioner op, and plain launchers on tensors.

    Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ          G (m×n), A (m×m), S (m×n), B (n×n)

Backward with upstream dY, H = AᵀGB, M = S⊙H:

    D = Aᵀ dY B,  E = S⊙D,  dS = D⊙H,  dG = A E Bᵀ,
    dA = dY B Mᵀ + G B Eᵀ,   dB = dYᵀ A M + Gᵀ A E

Two paths, chosen per layer:

* small layers (m, n ≤ ``FUSED_MAX_DIM`` = 128): ONE program per layer loads the whole layer into
  registers (padded to power-of-two blocks, masked), does all products with ``tl.dot`` and stores
  only the outputs (:func:`_fused_fwd_kernel`, :func:`_fused_bwd_kernel`). The grouped op walks a
  table of layers (pointers, strides, m, n) so that every layer of one padded block shape is a
  single launch (:func:`_grouped_fwd_kernel`, :func:`_grouped_bwd_kernel`).
* larger layers: a batched tiled GEMM with fused epilogues (:func:`_gemm_kernel`) — ``M = S⊙(AᵀGB)``
  in the epilogue of the GEMM producing H, ``E = S⊙D`` and ``dS = D⊙H`` in the epilogue of the GEMM
  producing D, and the two-product sums of dA and dB as one "dual" GEMM. Autotuned on GPU.

Precision: every load is cast to fp32 at once (the interpreter holds bf16 as raw 16-bit integers,
so arithmetic on un-cast bf16 is silently wrong), elementwise maths is fp32, ``tl.dot`` accumulates
in fp32, intermediates between GEMMs are fp32 buffers, and each output is rounded once on store.
On a GPU, fp16/bf16 layers feed their dot operands to ``tl.dot`` in that dtype (tensor cores;
constexpr ``DOT_DT``); fp32 dots use ``input_precision="tf32"`` when
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch does, else "tf32x3" (three tf32 MMAs:
fp32-level accuracy on tensor cores; "ieee" would compile every dot to unrolled FMAs, which took
ptxas minutes for one 64×64 fused program).

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (:func:`is_interpreter`). Inputs may be non-contiguous (strides are passed to the
kernels); outputs are contiguous and have the input dtype. Every launcher first applies the op's
input rules (``_validate.py``, the same as the public API's), then the Triton backend's own (no
float64; CUDA tensors, or CPU tensors under the interpreter), before anything is launched.

Language: the subset common to Triton 3.6–3.9 (pointer arithmetic, no ``tl.make_block_ptr``).
``apo_kernels.ops.triton_aot`` compiles every kernel variant these launchers launch for sm_80 and
sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
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

# Layers with m and n at most FUSED_MAX_DIM, whose padded block (BM·BN) is also at most the budget
# below, go to the single fused program; the rest to the tiled GEMMs. The budgets keep the fused
# programs within sm_80's 163 KiB of shared memory (measured with triton_aot: fp32 forward 128×64
# 128 KiB, 128×128 192 KiB; fp32 backward 64×64 80 KiB, 128×64 192 KiB; bf16 backward 128×64
# 96 KiB, 128×128 160 KiB) and their compile time reasonable. Tests lower them to force a path.
FUSED_MAX_DIM = 128
FUSED_MAX_ELEMS = {  # (backward?, 4-byte dtype?) -> max BM·BN
    (False, True): 64 * 128,
    (False, False): 128 * 128,
    (True, True): 64 * 64,
    (True, False): 64 * 128,
}

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
def _dot(a, b, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """fp32 a @ b of fp32 tiles (operands rounded to DOT_DT first when DOT_DT != 0)."""
    if DOT_DT == 0:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(_cvt(a, DOT_DT), _cvt(b, DOT_DT))


@triton.jit
def _dot_acc(a, b, acc, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with operands already in the dot input type."""
    if DOT_DT == 0:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------------------------
# Fused single-program bodies (one layer, m ≤ BM, n ≤ BN, everything in registers)
# --------------------------------------------------------------------------------------------


@triton.jit
def _fused_fwd_body(
    g, a, s, b, y, m, n,
    sgm, sgn, sam, sak, ssm, ssn, sbk, sbn, sym, syn,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    G = _load_f32(g, rm, rn, sgm, sgn, m, n)
    B = _load_f32(b, rn, rn, sbk, sbn, n, n)
    At = _load_f32(a, rm, rm, sak, sam, m, m)
    H = _dot(At, _dot(G, B, DOT_DT, PREC), DOT_DT, PREC)
    M = _load_f32(s, rm, rn, ssm, ssn, m, n) * H
    Bt = _load_f32(b, rn, rn, sbn, sbk, n, n)
    A = _load_f32(a, rm, rm, sam, sak, m, m)
    Y = _dot(A, _dot(M, Bt, DOT_DT, PREC), DOT_DT, PREC)
    _store(y, Y, rm, rn, sym, syn, m, n)


@triton.jit
def _fused_bwd_body(
    dy, g, a, s, b, dg, da, ds, db, m, n,
    sdym, sdyn, sgm, sgn, sam, sak, ssm, ssn, sbk, sbn,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    # Outputs are contiguous: dG, dS (m, n), dA (m, m), dB (n, n).
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    B = _load_f32(b, rn, rn, sbk, sbn, n, n)
    At = _load_f32(a, rm, rm, sak, sam, m, m)
    S = _load_f32(s, rm, rn, ssm, ssn, m, n)
    dYB = _dot(_load_f32(dy, rm, rn, sdym, sdyn, m, n), B, DOT_DT, PREC)
    D = _dot(At, dYB, DOT_DT, PREC)
    E = S * D
    if NEED_G:
        Bt = _load_f32(b, rn, rn, sbn, sbk, n, n)
        A = _load_f32(a, rm, rm, sam, sak, m, m)
        dG = _dot(A, _dot(E, Bt, DOT_DT, PREC), DOT_DT, PREC)
        _store(dg, dG, rm, rn, n, 1, m, n)
    if NEED_A or NEED_S or NEED_B:
        GB = _dot(_load_f32(g, rm, rn, sgm, sgn, m, n), B, DOT_DT, PREC)
        H = _dot(At, GB, DOT_DT, PREC)
        if NEED_S:
            _store(ds, D * H, rm, rn, n, 1, m, n)
        if NEED_A or NEED_B:
            M = S * H
            if NEED_A:
                dA = _dot(dYB, tl.trans(M), DOT_DT, PREC) + _dot(GB, tl.trans(E), DOT_DT, PREC)
                _store(da, dA, rm, rm, m, 1, m, m)
            if NEED_B:
                A2 = _load_f32(a, rm, rm, sam, sak, m, m)
                dYt = _load_f32(dy, rn, rm, sdyn, sdym, n, m)
                Gt = _load_f32(g, rn, rm, sgn, sgm, n, m)
                AM = _dot(A2, M, DOT_DT, PREC)
                AE = _dot(A2, E, DOT_DT, PREC)
                dB = _dot(dYt, AM, DOT_DT, PREC) + _dot(Gt, AE, DOT_DT, PREC)
                _store(db, dB, rn, rn, n, 1, n, n)


# --------------------------------------------------------------------------------------------
# Fused kernels: batched (program_id = layer of a 3-D batch) and grouped (program_id = table row)
# --------------------------------------------------------------------------------------------


@triton.jit
def _fused_fwd_kernel(
    g, a, s, b, y, m, n,
    sgb, sgm, sgn, sab, sam, sak, ssb, ssm, ssn, sbb, sbk, sbn,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    _fused_fwd_body(
        g + l * sgb, a + l * sab, s + l * ssb, b + l * sbb, y + l * m * n, m, n,
        sgm, sgn, sam, sak, ssm, ssn, sbk, sbn, n, 1,
        BM, BN, DOT_DT, PREC,
    )


@triton.jit
def _fused_bwd_kernel(
    dy, g, a, s, b, dg, da, ds, db, m, n,
    sdyb, sdym, sdyn, sgb, sgm, sgn, sab, sam, sak, ssb, ssm, ssn, sbb, sbk, sbn,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    _fused_bwd_body(
        dy + l * sdyb, g + l * sgb, a + l * sab, s + l * ssb, b + l * sbb,
        dg + l * m * n, da + l * m * m, ds + l * m * n, db + l * n * n, m, n,
        sdym, sdyn, sgm, sgn, sam, sak, ssm, ssn, sbk, sbn,
        NEED_G, NEED_A, NEED_S, NEED_B, BM, BN, DOT_DT, PREC,
    )


# Layer-table layouts (int64 rows, one per layer). Addresses of masked-off outputs are 0.
_FWD_FIELDS = ("g", "a", "s", "b", "y", "m", "n", "sgm", "sgn", "sam", "sak", "ssm", "ssn", "sbk", "sbn")
_BWD_FIELDS = ("dy", "g", "a", "s", "b", "dg", "da", "ds", "db", "m", "n",
               "sdym", "sdyn", "sgm", "sgn", "sam", "sak", "ssm", "ssn", "sbk", "sbn")


@triton.jit
def _grouped_fwd_kernel(
    table, DT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    row = table + tl.program_id(0).to(tl.int64) * 15
    m = tl.load(row + 5).to(tl.int32)
    n = tl.load(row + 6).to(tl.int32)
    _fused_fwd_body(
        _as_ptr(tl.load(row + 0), DT), _as_ptr(tl.load(row + 1), DT), _as_ptr(tl.load(row + 2), DT),
        _as_ptr(tl.load(row + 3), DT), _as_ptr(tl.load(row + 4), DT), m, n,
        tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), tl.load(row + 10),
        tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14), n, 1,
        BM, BN, DOT_DT, PREC,
    )


@triton.jit
def _grouped_bwd_kernel(
    table, DT: tl.constexpr,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    row = table + tl.program_id(0).to(tl.int64) * 21
    m = tl.load(row + 9).to(tl.int32)
    n = tl.load(row + 10).to(tl.int32)
    _fused_bwd_body(
        _as_ptr(tl.load(row + 0), DT), _as_ptr(tl.load(row + 1), DT), _as_ptr(tl.load(row + 2), DT),
        _as_ptr(tl.load(row + 3), DT), _as_ptr(tl.load(row + 4), DT),
        _as_ptr(tl.load(row + 5), DT), _as_ptr(tl.load(row + 6), DT), _as_ptr(tl.load(row + 7), DT),
        _as_ptr(tl.load(row + 8), DT), m, n,
        tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
        tl.load(row + 15), tl.load(row + 16), tl.load(row + 17), tl.load(row + 18),
        tl.load(row + 19), tl.load(row + 20),
        NEED_G, NEED_A, NEED_S, NEED_B, BM, BN, DOT_DT, PREC,
    )


# --------------------------------------------------------------------------------------------
# Tiled batched GEMM with fused epilogues (large layers)
# --------------------------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(
    x, y, x2, y2, c, c2, s, h,
    M, N, K,
    sxb, sxm, sxk, syb, syk, syn,
    sx2b, sx2m, sx2k, sy2b, sy2k, sy2n,
    scb, scm, scn, ssb, ssm, ssn, shb, shm, shn,
    EPI: tl.constexpr, DUAL: tl.constexpr, STORE_C: tl.constexpr, STORE_C2: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc = X @ Y (+ X2 @ Y2 when DUAL), batch = program_id(1); transposes are swapped strides.

    Epilogues (c and c2 share the strides sc*):
      EPI 0: c = acc
      EPI 1: c = S ⊙ acc (M),  c2 = acc (H)                 -- forward, GEMM producing H
      EPI 2: c = S ⊙ acc (E),  c2 = acc ⊙ H (dS)            -- backward, GEMM producing D
    STORE_C / STORE_C2 switch each store off (nothing is written that is not needed).
    """
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row-tiles share their Y column tiles in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    xp = x + bid * sxb + rm[:, None] * sxm + rk[None, :] * sxk
    yp = y + bid * syb + rk[:, None] * syk + rn[None, :] * syn
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        xa = _cvt(tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
        yb = _cvt(tl.load(yp, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
        acc = _dot_acc(xa, yb, acc, DOT_DT, PREC)
        xp += BLOCK_K * sxk
        yp += BLOCK_K * syk
    if DUAL:
        xp2 = x2 + bid * sx2b + rm[:, None] * sx2m + rk[None, :] * sx2k
        yp2 = y2 + bid * sy2b + rk[:, None] * sy2k + rn[None, :] * sy2n
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            xa = _cvt(tl.load(xp2, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
            yb = _cvt(tl.load(yp2, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32), DOT_DT)
            acc = _dot_acc(xa, yb, acc, DOT_DT, PREC)
            xp2 += BLOCK_K * sx2k
            yp2 += BLOCK_K * sy2k

    c_off = bid * scb + rm[:, None] * scm + rn[None, :] * scn
    mask = m_ok[:, None] & n_ok[None, :]
    if EPI == 0:
        tl.store(c + c_off, acc.to(c.dtype.element_ty), mask=mask)
    else:
        sv = tl.load(s + bid * ssb + rm[:, None] * ssm + rn[None, :] * ssn, mask=mask, other=0.0).to(tl.float32)
        if STORE_C:
            tl.store(c + c_off, (sv * acc).to(c.dtype.element_ty), mask=mask)
        if STORE_C2:
            if EPI == 1:
                tl.store(c2 + c_off, acc.to(c2.dtype.element_ty), mask=mask)
            else:
                hv = tl.load(h + bid * shb + rm[:, None] * shm + rn[None, :] * shn, mask=mask, other=0.0).to(tl.float32)
                tl.store(c2 + c_off, (acc * hv).to(c2.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the usual Triton GEMM set, sized
# to fit sm_80's shared memory with fp32 operands.
GEMM_CONFIGS = (
    (128, 128, 32, 8, 8, 3),
    (128, 64, 32, 8, 4, 4),
    (64, 128, 32, 8, 4, 4),
    (64, 64, 32, 8, 4, 4),
    (64, 64, 64, 8, 4, 3),
    (32, 64, 32, 8, 4, 4),
    (64, 32, 32, 8, 2, 5),
)
# Under the interpreter: one config, large enough to keep the Python loop short and small
# enough that odd shapes still take several K steps and masked tails.
INTERPRETER_GEMM_CONFIG = (64, 64, 32, 8, 4, 1)

_gemm_autotuned = None


def _gemm_tuned():
    """``_gemm_kernel`` under @triton.autotune, built on first GPU use (its benchmarker needs a GPU)."""
    global _gemm_autotuned
    if _gemm_autotuned is None:
        configs = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_warps=w, num_stages=st)
            for bm, bn, bk, gm, w, st in GEMM_CONFIGS
        ]
        _gemm_autotuned = triton.autotune(
            configs, key=["M", "N", "K", "EPI", "DUAL", "STORE_C", "STORE_C2", "DOT_DT", "PREC"]
        )(_gemm_kernel)
    return _gemm_autotuned


# --------------------------------------------------------------------------------------------
# Launch plumbing (and a recording mode used by the AOT compile check)
# --------------------------------------------------------------------------------------------

_RECORD: Optional[list] = None


@contextlib.contextmanager
def recording():
    """Record kernel launches instead of running them (tensors may be on the ``meta`` device).

    Yields a list that fills with ``(kernel, signature, constexprs, options)`` tuples, one per
    launch and, for the autotuned GEMM, one per config: exactly what ``triton.compile`` needs.
    Used by ``apo_kernels.ops.triton_aot`` to compile every variant the launchers launch.
    """
    global _RECORD
    prev, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = prev


_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


def _record(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> None:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            v = args[name]
            sig[name] = "*" + _TL_NAME[v.dtype] if isinstance(v, Tensor) else "i32"
    _RECORD.append((kernel, sig, dict(constexprs), dict(num_warps=num_warps, num_stages=num_stages)))


def _launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1) -> None:
    if _RECORD is not None:
        _record(kernel, args, constexprs, num_warps, num_stages)
        return
    kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _next_pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))  # tl.dot needs every block dim ≥ 16


def _fused_warps(bm: int, bn: int) -> int:
    return 8 if max(bm, bn) >= 128 else 4


def _dot_config(dtype: torch.dtype) -> tuple[int, str]:
    """(DOT_DT, PREC): dot operand type and fp32 input precision for this dtype here."""
    if is_interpreter() and _RECORD is None:
        return 0, "ieee"  # the interpreter computes dots in fp32 (and cannot do bf16 arithmetic)
    prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return _DT_CODE[dtype], prec


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
    dot_dt, prec = _dot_config(dtype)
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
    consts = dict(EPI=epi, DUAL=x2 is not dummy, STORE_C=store_c, STORE_C2=c2 is not None,
                  DOT_DT=dot_dt, PREC=prec)
    if _RECORD is not None:
        for bm, bn, bk, gm, w, st in GEMM_CONFIGS:
            _record(_gemm_kernel, args, dict(consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), w, st)
        return
    if is_interpreter():
        bm, bn, bk, gm, w, st = INTERPRETER_GEMM_CONFIG
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), L)
        _gemm_kernel[grid](**args, **consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                           num_warps=w, num_stages=st)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), L)  # noqa: E731
        _gemm_tuned()[grid](**args, **consts)


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
    if _RECORD is not None:
        return
    if t0.device.type == "cpu":
        if not is_interpreter():
            raise ValueError(
                f"triton backend: {what} is a CPU tensor; Triton runs on CUDA tensors, or on CPU tensors "
                "only in its interpreter (set TRITON_INTERPRET=1 before triton is first imported)"
            )
    elif t0.device.type != "cuda":
        raise ValueError(f"triton backend: {what} is on {t0.device}; expected a CUDA (or interpreted CPU) tensor")


# --------------------------------------------------------------------------------------------
# Single (optionally batched) layer
# --------------------------------------------------------------------------------------------


def _dims(grad: Tensor) -> tuple[int, int, int]:
    return (grad.shape[0], grad.shape[1], grad.shape[2]) if grad.dim() == 3 else (1, grad.shape[0], grad.shape[1])


def _fused_ok(m: int, n: int, dtype: torch.dtype, backward: bool) -> bool:
    if m > FUSED_MAX_DIM or n > FUSED_MAX_DIM:
        return False
    return _next_pow2(m) * _next_pow2(n) <= FUSED_MAX_ELEMS[(backward, dtype == torch.float32)]


def _forward_into(out: Tensor, grad: Tensor, A: Tensor, S: Tensor, B: Tensor) -> None:
    L, m, n = _dims(grad)
    dot_dt, prec = _dot_config(grad.dtype)
    if _fused_ok(m, n, grad.dtype, False):
        bm, bn = _next_pow2(m), _next_pow2(n)
        sg, sa, ss, sb = _s3(grad), _s3(A), _s3(S), _s3(B)
        args = dict(g=grad, a=A, s=S, b=B, y=out, m=m, n=n,
                    sgb=sg[0], sgm=sg[1], sgn=sg[2], sab=sa[0], sam=sa[1], sak=sa[2],
                    ssb=ss[0], ssm=ss[1], ssn=ss[2], sbb=sb[0], sbk=sb[1], sbn=sb[2])
        _launch(_fused_fwd_kernel, (L,), args, dict(BM=bm, BN=bn, DOT_DT=dot_dt, PREC=prec),
                num_warps=_fused_warps(bm, bn))
        return
    f32 = dict(dtype=torch.float32, device=grad.device)
    bshape = (L, m, n)
    buf1 = torch.empty(bshape, **f32)
    buf2 = torch.empty(bshape, **f32)
    G_, A_, S_, B_ = _Op(grad), _Op(A), _Op(S), _Op(B)
    kw = dict(dtype=grad.dtype)
    _gemm(L, m, n, n, G_, B_, buf1, **kw)                                   # GB
    _gemm(L, m, n, m, A_.T, _Op(buf1), buf2, s=S_, epi=1, **kw)             # M = S ⊙ (Aᵀ GB)
    _gemm(L, m, n, n, _Op(buf2), B_.T, buf1, **kw)                          # M Bᵀ
    _gemm(L, m, n, m, A_, _Op(buf1), out, **kw)                             # Y = A (M Bᵀ)


def _backward_into(outs: tuple, grad_out: Tensor, grad: Tensor, A: Tensor, S: Tensor, B: Tensor) -> None:
    """outs = (dG, dA, dS, dB) preallocated contiguous tensors, None where not requested."""
    dG, dA, dS, dB = outs
    need_g, need_a, need_s, need_b = (o is not None for o in outs)
    L, m, n = _dims(grad)
    dot_dt, prec = _dot_config(grad.dtype)
    if _fused_ok(m, n, grad.dtype, True):
        bm, bn = _next_pow2(m), _next_pow2(n)
        sdy, sg, sa, ss, sb = _s3(grad_out), _s3(grad), _s3(A), _s3(S), _s3(B)
        args = dict(dy=grad_out, g=grad, a=A, s=S, b=B,
                    dg=grad_out if dG is None else dG, da=grad_out if dA is None else dA,
                    ds=grad_out if dS is None else dS, db=grad_out if dB is None else dB, m=m, n=n,
                    sdyb=sdy[0], sdym=sdy[1], sdyn=sdy[2], sgb=sg[0], sgm=sg[1], sgn=sg[2],
                    sab=sa[0], sam=sa[1], sak=sa[2], ssb=ss[0], ssm=ss[1], ssn=ss[2],
                    sbb=sb[0], sbk=sb[1], sbn=sb[2])
        consts = dict(NEED_G=need_g, NEED_A=need_a, NEED_S=need_s, NEED_B=need_b,
                      BM=bm, BN=bn, DOT_DT=dot_dt, PREC=prec)
        _launch(_fused_bwd_kernel, (L,), args, consts, num_warps=_fused_warps(bm, bn))
        return

    need_e = need_g or need_a or need_b
    need_mh = need_a or need_b  # M = S⊙H
    f32 = dict(dtype=torch.float32, device=grad.device)
    bshape = (L, m, n)
    kw = dict(dtype=grad.dtype)
    dY_, G_, A_, S_, B_ = _Op(grad_out), _Op(grad), _Op(A), _Op(S), _Op(B)

    dYB = torch.empty(bshape, **f32)
    _gemm(L, m, n, n, dY_, B_, dYB, **kw)                                   # dY B
    GB = H = Mb = None
    if need_s or need_mh:
        GB = torch.empty(bshape, **f32)
        _gemm(L, m, n, n, G_, B_, GB, **kw)                                 # G B
        Mb = torch.empty(bshape, **f32) if need_mh else None
        H = torch.empty(bshape, **f32) if need_s else None
        # H = Aᵀ G B with epilogue: M = S⊙H (c) for dA/dB, H itself (c2) only for dS
        _gemm(L, m, n, m, A_.T, _Op(GB), Mb if Mb is not None else H, c2=H, s=S_, epi=1,
              store_c=Mb is not None, **kw)
    E = torch.empty(bshape, **f32) if need_e else None
    # D = Aᵀ dY B with epilogue: E = S⊙D (c), dS = D⊙H (c2); D itself is never stored
    _gemm(L, m, n, m, A_.T, _Op(dYB), E if E is not None else dS, c2=dS, s=S_,
          h=_Op(H) if H is not None else None, epi=2, store_c=E is not None, **kw)
    if need_g:
        EBt = torch.empty(bshape, **f32)
        _gemm(L, m, n, n, _Op(E), B_.T, EBt, **kw)                           # E Bᵀ
        _gemm(L, m, n, m, A_, _Op(EBt), dG, **kw)                           # dG = A E Bᵀ
    if need_a:
        # dA = dYB Mᵀ + GB Eᵀ in one dual GEMM
        _gemm(L, m, m, n, _Op(dYB), _Op(Mb).T, dA, x2=_Op(GB), y2=_Op(E).T, **kw)
    if need_b:
        AM = torch.empty(bshape, **f32)
        AE = torch.empty(bshape, **f32)
        _gemm(L, m, n, m, A_, _Op(Mb), AM, **kw)                             # A M
        _gemm(L, m, n, m, A_, _Op(E), AE, **kw)                              # A E
        # dB = dYᵀ (A M) + Gᵀ (A E) in one dual GEMM
        _gemm(L, n, n, m, dY_.T, _Op(AM), dB, x2=G_.T, y2=_Op(AE), **kw)


def _empty_like_layer(grad: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=grad.dtype, device=grad.device)


def _bwd_shapes(grad: Tensor):
    *batch, m, n = grad.shape
    return ((*batch, m, n), (*batch, m, m), (*batch, m, n), (*batch, n, n))


def triton_precondition(grad: Tensor, A: Tensor, S: Tensor, B: Tensor) -> Tensor:
    """Y = A (S ⊙ (Aᵀ grad B)) Bᵀ.

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


def triton_precondition_backward(
    grad_out: Tensor, grad: Tensor, A: Tensor, S: Tensor, B: Tensor, output_mask: Sequence[bool] = (True,) * 4,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d_grad, dA, dS, dB) of ⟨grad_out, Y⟩, None where ``output_mask`` is False.

    Only the requested outputs are computed (mask (False, True, True, True) never forms dG).
    Shapes as :func:`triton_precondition`; outputs contiguous, dtype of the inputs.
    """
    _validate.check_layer(grad, A, S, B)
    _validate.check_grad_out(grad_out, grad)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits([grad], mask)
    _check((grad_out, grad, A, S, B), "grad")
    shapes = _bwd_shapes(grad)
    outs = tuple(_empty_like_layer(grad, sh) if need else None for need, sh in zip(mask, shapes))
    if not any(mask):
        return outs
    if grad.numel() == 0:
        # a zero m or n (or L) still leaves e.g. dA (m×m) = a sum over nothing = 0
        return tuple(o.zero_() if o is not None else None for o in outs)
    _backward_into(outs, grad_out, grad, A, S, B)
    return outs


# --------------------------------------------------------------------------------------------
# Grouped: many layers of different shapes
# --------------------------------------------------------------------------------------------


def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.device.type == "meta" else t.data_ptr()


def _table_path_ok(t: Tensor) -> bool:
    # The interpreter copies tensor *arguments* to the host, but raw addresses in a table must be
    # host addresses: under the interpreter only CPU tensors go through the table.
    return not (is_interpreter() and t.device.type == "cuda")


def _buckets(layers: Sequence[int], grads: Sequence[Tensor]) -> dict:
    out: dict = {}
    for i in layers:
        m, n = grads[i].shape
        out.setdefault((_next_pow2(m), _next_pow2(n)), []).append(i)
    return out


def triton_precondition_grouped(grads: Sequence[Tensor], As: Sequence[Tensor], Ss: Sequence[Tensor],
                                Bs: Sequence[Tensor]) -> list[Tensor]:
    """Per-layer Y_i = A_i (S_i ⊙ (A_iᵀ G_i B_i)) B_iᵀ for layers of different shapes.

    Small 2-D layers (m, n ≤ FUSED_MAX_DIM) are one launch per padded block shape; the rest go
    through the per-layer (tiled / batched) path. Returns contiguous tensors.
    """
    _validate.check_group(grads, As, Ss, Bs)
    _validate.check_result_fits(grads)
    grads, As, Ss, Bs = list(grads), list(As), list(Ss), list(Bs)
    _check(grads, "grads[0]")
    outs = [_empty_like_layer(g, g.shape) for g in grads]
    small = []
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        if g.dim() == 2 and _fused_ok(*g.shape, g.dtype, False) and _table_path_ok(g):
            small.append(i)
        else:
            _forward_into(outs[i], g, As[i], Ss[i], Bs[i])
    if small:
        dtype, device = grads[0].dtype, grads[0].device
        dot_dt, prec = _dot_config(dtype)
        for (bm, bn), idx in _buckets(small, grads).items():
            rows = []
            for i in idx:
                g, a, s, b, y = grads[i], As[i], Ss[i], Bs[i], outs[i]
                rows.append([_addr(g), _addr(a), _addr(s), _addr(b), _addr(y), g.shape[0], g.shape[1],
                             *g.stride(), *a.stride(), *s.stride(), *b.stride()])
            table = torch.tensor(rows, dtype=torch.int64).to(device)
            _launch(_grouped_fwd_kernel, (len(idx),), dict(table=table),
                    dict(DT=_DT_CODE[dtype], BM=bm, BN=bn, DOT_DT=dot_dt, PREC=prec),
                    num_warps=_fused_warps(bm, bn))
    return outs


def triton_precondition_grouped_backward(
    grad_outs: Sequence[Tensor], grads: Sequence[Tensor], As: Sequence[Tensor], Ss: Sequence[Tensor],
    Bs: Sequence[Tensor], output_mask: Sequence[bool] = (True,) * 4,
) -> tuple[list, list, list, list]:
    """Per-layer (d_grad, dA, dS, dB) for layers of different shapes; [] where masked off."""
    _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits(grads, mask)
    grad_outs, grads, As, Ss, Bs = list(grad_outs), list(grads), list(As), list(Ss), list(Bs)
    _check(grads, "grads[0]")
    result = tuple([] for _ in range(4))
    if not any(mask):
        return result
    per_layer = []
    for g in grads:
        outs = tuple(_empty_like_layer(g, sh) if need else None for need, sh in zip(mask, _bwd_shapes(g)))
        per_layer.append(outs)
        for k in range(4):
            if mask[k]:
                result[k].append(outs[k])
    small = []
    for i, g in enumerate(grads):
        if g.numel() == 0:
            for o in per_layer[i]:
                if o is not None:
                    o.zero_()
        elif g.dim() == 2 and _fused_ok(*g.shape, g.dtype, True) and _table_path_ok(g):
            small.append(i)
        else:
            _backward_into(per_layer[i], grad_outs[i], g, As[i], Ss[i], Bs[i])
    if small:
        dtype, device = grads[0].dtype, grads[0].device
        dot_dt, prec = _dot_config(dtype)
        for (bm, bn), idx in _buckets(small, grads).items():
            rows = []
            for i in idx:
                dy, g, a, s, b = grad_outs[i], grads[i], As[i], Ss[i], Bs[i]
                rows.append([_addr(dy), _addr(g), _addr(a), _addr(s), _addr(b),
                             *(_addr(o) for o in per_layer[i]), g.shape[0], g.shape[1],
                             *dy.stride(), *g.stride(), *a.stride(), *s.stride(), *b.stride()])
            table = torch.tensor(rows, dtype=torch.int64).to(device)
            consts = dict(DT=_DT_CODE[dtype], NEED_G=mask[0], NEED_A=mask[1], NEED_S=mask[2], NEED_B=mask[3],
                          BM=bm, BN=bn, DOT_DT=dot_dt, PREC=prec)
            _launch(_grouped_bwd_kernel, (len(idx),), dict(table=table), consts, num_warps=_fused_warps(bm, bn))
    return result

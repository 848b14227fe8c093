"""The op's accuracy contract, as the tests check it (one place for every backend's tests).

Every result is compared with the float64 oracle evaluated on the same, already-rounded inputs, by
relative Frobenius error ``err = ‖out − oracle‖ / ‖oracle‖``.

float32 / float64: ``err ≤ tol`` with the per-backend tolerance of each test file.

float16 / bfloat16: "fp32 accumulation, rounded once". Rounding an exact result once to a dtype
of unit roundoff u (fp16 2⁻¹¹, bf16 2⁻⁸) moves every element by at most u relative, and by ≈ 0.4u
in Frobenius norm once an output has a few hundred elements (uniform rounding errors). The plain
torch chain in that dtype (every GEMM's output rounded) lands at ≈ 0.65–0.95u on the same outputs.
So, with ``chain_err`` the error of that torch chain:

  (1) oracle bound, every output:                 err ≤ u + FP32_SLACK
  (2) torch-chain bound, outputs ≥ 256 elements:  err ≤ 0.8 · chain_err + FP32_SLACK

(2) is flash-attention's rule (kernel error ≤ k × the error of torch in that dtype) with k < 1: an
implementation that rounds every intermediate GEMM to half has k ≈ 1 and fails it
(test_op.py::test_half_contract_rejects_rounding_every_gemm). FP32_SLACK covers the fp32
accumulation error itself (≲ 1e-6 relative at the tested sizes).

Two exceptions, each named by the test that uses it:

- :data:`TRUNCATED_ONCE`: Triton's interpreter casts fp32 to bfloat16 by truncation (round toward
  zero; on a GPU the same cast rounds to nearest). Rounded once that way, every element is within
  2u and the Frobenius error is twice as large (≈ 0.84u), so both bounds are doubled; a chain that
  truncated every GEMM would be ≈ 2x the torch chain and still fail (2).
- :data:`HALF_OPERANDS`: paths that deliberately feed half-precision operands to tensor cores or to
  a CPU's AMX tiles (documented in their kernel files; :func:`policy` says where the `cpu`
  backend does) do not round once; they are held to flash-attention's own rule instead,
  ``err ≤ 2 · chain_err + FP32_SLACK``.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_DTYPES = tuple(UNIT_ROUNDOFF)
FP32_SLACK = 1e-5
CHAIN_FACTOR = 0.8
MIN_NUMEL_FOR_CHAIN_BOUND = 256
ROUNDED_ONCE = "rounded once"  # to nearest
TRUNCATED_ONCE = "rounded once toward zero"  # bfloat16 stores in Triton's interpreter
HALF_OPERANDS = "half operands"  # tensor-core paths: flash-attention's rule, k = 2
HALF_OPERANDS_FACTOR = 2.0
_ROUNDING_FACTOR = {ROUNDED_ONCE: 1.0, TRUNCATED_ONCE: 2.0}  # error of one rounding, in units of u


def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against the float64 ``oracle`` (absolute if it is 0)."""
    out, oracle = out.double().cpu(), oracle.double().cpu()
    den = oracle.norm().item()
    diff = (out - oracle).norm().item()
    return diff / den if den > 0 else diff


def check_half(out, oracle, chain, dtype, what: str = "", policy: str = ROUNDED_ONCE) -> float:
    """Assert the half-precision contract for one output; returns its error.

    ``chain``: the same output computed by the plain torch formulas in ``dtype``.
    """
    u = UNIT_ROUNDOFF[dtype]
    err, chain_err = rel_err(out, oracle), rel_err(chain, oracle)
    stats = f"{what} ({dtype}, {out.numel()} elements): error {err / u:.3f}u, torch chain {chain_err / u:.3f}u"
    if policy == HALF_OPERANDS:
        assert err <= HALF_OPERANDS_FACTOR * chain_err + FP32_SLACK, f"{stats} > {HALF_OPERANDS_FACTOR}x the chain"
        return err
    r = _ROUNDING_FACTOR[policy]
    assert err <= r * u + FP32_SLACK, f"{stats} > {r:g}u: not within one rounding ({policy}) of the exact result"
    if out.numel() >= MIN_NUMEL_FOR_CHAIN_BOUND:
        assert err <= r * CHAIN_FACTOR * chain_err + FP32_SLACK, (
            f"{stats} > {r * CHAIN_FACTOR:g}x the chain: intermediates are rounded, not only the result"
        )
    return err


def policy(backend: str, dtype) -> str:
    """The policy ``backend``'s forward and backward are held to in ``dtype``: HALF_OPERANDS for the
    `cpu` backend's bfloat16 where this process feeds bf16 GEMM operands to big enough bf16 layers
    (``torch.ops.apo.cpu_bf16_gemm() == "bf16"``, csrc/cpu_gemm.h; a smaller layer, still rounded once,
    meets that bound too), ROUNDED_ONCE otherwise. Interpreted Triton's truncation is the caller's."""
    import apo_kernels  # noqa: F401  (registers torch.ops.apo)

    if backend == "cpu" and dtype == torch.bfloat16 and torch.ops.apo.cpu_bf16_gemm() == "bf16":
        return HALF_OPERANDS
    return ROUNDED_ONCE


def check(out, oracle, dtype, tol: float, chain=None, what: str = "", policy: str = ROUNDED_ONCE) -> float:
    """``out`` against the float64 ``oracle``: the half contract for float16/bfloat16 (``chain``
    required), else ``err ≤ tol``."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(oracle.shape), f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    if dtype in HALF_DTYPES:
        assert chain is not None, f"{what}: the half-precision contract needs the torch chain in {dtype}"
        return check_half(out, oracle, chain, dtype, what, policy)
    err = rel_err(out, oracle)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.0e} ({dtype})"
    return err

"""The one dispatch point of the preconditioner op.

Backends
- ``cpu`` / ``cuda``: the compiled kernels of ``apo_kernels._C`` (csrc/), registered in C++ as
  ``torch.ops.apo.precondition*``; the dispatcher picks the CPU or CUDA kernel by device.
- ``triton``: ``apo_kernels.ops.triton_kernels``, wrapped here as ``torch.ops.apo.triton_*`` custom
  ops; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``.
- ``reference``: plain torch (``reference.py``), the fallback; half precision computed in fp32
  and rounded once, like the kernels.

Both op families follow one contract (docs/CONTRACT.md), so fake kernels and autograd are
registered once for each by the same two functions below.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _validate, reference

BACKEND_ENV = "APO_KERNELS_BACKEND"
REINSTALL_HINT = "pip install --no-build-isolation -e ."
META_GRADIENT_MASK = (False, True, True, True)

# --------------------------------------------------------------------------------------------
# Loading the backends (each may be missing; the reason is kept for ``backends()``)
# --------------------------------------------------------------------------------------------
try:
    importlib.import_module("apo_kernels._C")  # importing registers torch.ops.apo.*

    _native_error: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _native_error = f"native extension apo_kernels._C not built ({exc}); reinstall with: {REINSTALL_HINT}"

try:
    _triton_kernels = importlib.import_module("apo_kernels.ops.triton_kernels")

    _triton_error: Optional[str] = None
except Exception as exc:  # triton missing, or a kernel module that fails to import
    _triton_kernels = None
    _triton_error = f"triton kernels unavailable ({type(exc).__name__}: {exc})"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_has_kernel(device_key: str) -> bool:
    return _native_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "apo::precondition", device_key
    )


# Asked once at import: the dispatcher query is not traceable, and backends() runs inside
# torch.compile'd code through resolve_backend.
_NATIVE_HAS_CUDA = _native_has_kernel("CUDA")


def backends() -> dict[str, str]:
    """Each backend and whether it is usable here ("available…") or why not ("unavailable: …")."""
    out = {}
    if torch.version.cuda is None:
        out["cuda"] = "unavailable: torch has no CUDA (CPU build)"
    elif _native_error is not None:
        out["cuda"] = f"unavailable: {_native_error}"
    elif not _NATIVE_HAS_CUDA:
        out["cuda"] = f"unavailable: apo_kernels._C was built without CUDA kernels; reinstall with nvcc on PATH: {REINSTALL_HINT}"
    elif not torch.cuda.is_available():
        out["cuda"] = "unavailable: no CUDA device"
    else:
        out["cuda"] = "available"
    if _triton_error is not None:
        out["triton"] = f"unavailable: {_triton_error}"
    elif _interpreting():
        out["triton"] = "available (TRITON_INTERPRET=1: runs on CPU tensors in Triton's interpreter)"
    elif not torch.cuda.is_available():
        out["triton"] = "unavailable: no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    else:
        out["triton"] = "available"
    out["cpu"] = "available" if _native_error is None else f"unavailable: {_native_error}"
    out["reference"] = "available"
    return out


# --------------------------------------------------------------------------------------------
# Op families: the same four ops per family, looked up by name
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _OpFamily:
    forward: Callable
    backward: Callable
    grouped: Callable
    grouped_backward: Callable


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


def _register_fake_and_autograd(prefix: str) -> _OpFamily:
    """Fake kernels and autograd for ``apo::{prefix}precondition*`` (defined in C++ or below)."""
    name = f"apo::{prefix}precondition"
    ops = torch.ops.apo
    fam = _OpFamily(
        forward=getattr(ops, f"{prefix}precondition").default,
        backward=getattr(ops, f"{prefix}precondition_backward").default,
        grouped=getattr(ops, f"{prefix}precondition_grouped").default,
        grouped_backward=getattr(ops, f"{prefix}precondition_grouped_backward").default,
    )

    # The fake kernels check the inputs like every real kernel does: they also serve as the Meta
    # kernels, which win dispatch whenever one input is a meta tensor (a meta tensor mixed with CPU
    # ones must be refused, not answered with an uninitialized CPU tensor), and under
    # torch.compile the symbolic shape rules (torch._check) fail at trace time.
    def fake_forward(grad, A, S, B):
        _validate.check_layer(grad, A, S, B)
        _validate.check_result_fits([grad])
        return grad.new_empty(grad.shape)

    def fake_backward(grad_out, grad, A, S, B, output_mask):
        _validate.check_layer(grad, A, S, B)
        _validate.check_grad_out(grad_out, grad)
        mask = _validate.check_output_mask(output_mask)
        _validate.check_result_fits([grad], mask)
        shapes = (grad.shape, A.shape, S.shape, B.shape)
        return tuple(grad.new_empty(s if m else (0,)) for s, m in zip(shapes, mask))

    def fake_grouped(grads, As, Ss, Bs):
        _validate.check_group(grads, As, Ss, Bs, fast=False)
        _validate.check_result_fits(grads)
        return [g.new_empty(g.shape) for g in grads]

    def fake_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask):
        _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs, fast=False)
        mask = _validate.check_output_mask(output_mask)
        _validate.check_result_fits(grads, mask)
        lists = (grads, As, Ss, Bs)
        return tuple([t.new_empty(t.shape) for t in ts] if m else [] for ts, m in zip(lists, mask))

    torch.library.register_fake(name)(fake_forward)
    torch.library.register_fake(f"{name}_backward")(fake_backward)
    torch.library.register_fake(f"{name}_grouped")(fake_grouped)
    torch.library.register_fake(f"{name}_grouped_backward")(fake_grouped_backward)

    def setup_forward(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_forward(ctx, grad_out):
        mask = [bool(b) for b in ctx.needs_input_grad]
        outs = fam.backward(grad_out.contiguous(), *ctx.saved_tensors, mask)
        return tuple(o if m else None for o, m in zip(outs, mask))

    def setup_grouped(ctx, inputs, output):
        grads, As, Ss, Bs = inputs
        ctx.num_layers = len(grads)
        ctx.save_for_backward(*grads, *As, *Ss, *Bs)

    def backward_grouped(ctx, grad_outs):
        n = ctx.num_layers
        saved = ctx.saved_tensors
        lists = [list(saved[k * n : (k + 1) * n]) for k in range(4)]
        mask = [bool(b) for b in ctx.needs_input_grad]
        grad_outs = [
            torch.zeros_like(g) if dy is None else dy.contiguous() for dy, g in zip(grad_outs, lists[0])
        ]
        outs = fam.grouped_backward(grad_outs, *lists, mask)
        return tuple(list(o) if m else None for o, m in zip(outs, mask))

    torch.library.register_autograd(name, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(f"{name}_grouped", backward_grouped, setup_context=setup_grouped)
    return fam


def _define_triton_ops() -> None:
    """Wrap the Triton launchers as torch.library custom ops ``apo::triton_*``.

    ``custom_op`` (not ``triton_op``) because ``wrap_triton`` cannot take interpreted kernels, and
    the interpreter is how these kernels are tested on CPU.
    """
    tk = _triton_kernels

    @torch.library.custom_op("apo::triton_precondition", mutates_args=())
    def triton_precondition(grad: Tensor, A: Tensor, S: Tensor, B: Tensor) -> Tensor:
        return tk.triton_precondition(grad, A, S, B)

    @torch.library.custom_op("apo::triton_precondition_backward", mutates_args=())
    def triton_precondition_backward(
        grad_out: Tensor, grad: Tensor, A: Tensor, S: Tensor, B: Tensor, output_mask: Sequence[bool]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outs = tk.triton_precondition_backward(grad_out, grad, A, S, B, tuple(output_mask))
        return tuple(_empty_if_none(o, grad) for o in outs)

    @torch.library.custom_op("apo::triton_precondition_grouped", mutates_args=())
    def triton_precondition_grouped(
        grads: list[Tensor], As: list[Tensor], Ss: list[Tensor], Bs: list[Tensor]
    ) -> list[Tensor]:
        return list(tk.triton_precondition_grouped(grads, As, Ss, Bs))

    @torch.library.custom_op("apo::triton_precondition_grouped_backward", mutates_args=())
    def triton_precondition_grouped_backward(
        grad_outs: list[Tensor],
        grads: list[Tensor],
        As: list[Tensor],
        Ss: list[Tensor],
        Bs: list[Tensor],
        output_mask: Sequence[bool],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        outs = tk.triton_precondition_grouped_backward(grad_outs, grads, As, Ss, Bs, tuple(output_mask))
        return tuple(list(o) for o in outs)


_FAMILIES: dict[str, _OpFamily] = {}
if _native_error is None:
    _FAMILIES["cpu"] = _FAMILIES["cuda"] = _register_fake_and_autograd("")
if _triton_kernels is not None:
    _define_triton_ops()
    _FAMILIES["triton"] = _register_fake_and_autograd("triton_")


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; raises ValueError if it cannot run there."""
    _validate.check_backend(backend)
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced != "auto":
            if forced not in _validate.BACKENDS:
                raise ValueError(f"{BACKEND_ENV} must be one of {_validate.BACKENDS}, got {forced!r}")
            backend = forced
    status = backends()
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(b for b in order if status[b].startswith("available"))
    if not status[backend].startswith("available"):
        raise ValueError(f"backend={backend!r} is {status[backend]}")
    wanted = {"cpu": "cpu", "cuda": "cuda"}.get(backend)
    if backend == "triton":
        wanted = "cpu" if _interpreting() else "cuda"
    if wanted is not None and device.type != wanted:
        raise ValueError(f"backend={backend!r} runs on {wanted} tensors here, but the inputs are on {device}")
    return backend


# --------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------
def precondition(grad: Tensor, A: Tensor, S: Tensor, B: Tensor, *, backend: str = "auto") -> Tensor:
    """Y = A · (S ⊙ (Aᵀ · grad · B)) · Bᵀ, differentiable in all four inputs.

    Shapes: grad (m, n), A (m, m), S (m, n), B (n, n), or all with a leading batch L.
    dtypes float32/float64/float16/bfloat16 (one for all); half precision accumulates in fp32.
    """
    _validate.check_backend(backend)
    _validate.check_layer(grad, A, S, B)
    _validate.check_result_fits([grad])
    if grad.numel() == 0:
        return reference.rounded_once(reference.precondition, grad, A, S, B)
    chosen = resolve_backend(backend, grad.device)
    if chosen == "reference":
        return reference.rounded_once(reference.precondition, grad, A, S, B)
    return _FAMILIES[chosen].forward(grad, A, S, B)


def precondition_backward(
    grad_out: Tensor,
    grad: Tensor,
    A: Tensor,
    S: Tensor,
    B: Tensor,
    *,
    output_mask: Sequence[bool] = META_GRADIENT_MASK,
    backend: str = "auto",
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d_grad, dA, dS, dB) of ⟨grad_out, precondition(grad, A, S, B)⟩; None where masked off.

    The default mask is the meta-gradient's: dA, dS, dB, never d_grad.
    """
    _validate.check_backend(backend)
    _validate.check_layer(grad, A, S, B)
    _validate.check_grad_out(grad_out, grad)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits([grad], mask)
    chosen = "reference" if grad.numel() == 0 else resolve_backend(backend, grad.device)
    if chosen == "reference":
        return reference.rounded_once(reference.precondition_backward, grad_out, grad, A, S, B, mask)
    outs = _FAMILIES[chosen].backward(grad_out, grad, A, S, B, list(mask))
    return tuple(o if m else None for o, m in zip(outs, mask))


def precondition_grouped(
    grads: Sequence[Tensor], As: Sequence[Tensor], Ss: Sequence[Tensor], Bs: Sequence[Tensor], *,
    backend: str = "auto",
) -> list[Tensor]:
    """``precondition`` over layers of different shapes in one call; differentiable.

    Each layer is 2-D: grads[i] (m_i, n_i), As[i] (m_i, m_i), Ss[i] (m_i, n_i), Bs[i] (n_i, n_i).
    """
    _validate.check_backend(backend)
    _validate.check_group(grads, As, Ss, Bs)
    _validate.check_result_fits(grads)
    if len(grads) == 0:
        return []
    chosen = resolve_backend(backend, grads[0].device)
    if chosen == "reference":
        return reference.rounded_once(reference.precondition_grouped, grads, As, Ss, Bs)
    return list(_FAMILIES[chosen].grouped(list(grads), list(As), list(Ss), list(Bs)))


def precondition_grouped_backward(
    grad_outs: Sequence[Tensor],
    grads: Sequence[Tensor],
    As: Sequence[Tensor],
    Ss: Sequence[Tensor],
    Bs: Sequence[Tensor],
    *,
    output_mask: Sequence[bool] = META_GRADIENT_MASK,
    backend: str = "auto",
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Per-layer (d_grads, dAs, dSs, dBs) of the grouped op; an empty list where masked off."""
    _validate.check_backend(backend)
    _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs)
    mask = _validate.check_output_mask(output_mask)
    _validate.check_result_fits(grads, mask)
    if len(grads) == 0:
        return ([], [], [], [])
    chosen = resolve_backend(backend, grads[0].device)
    if chosen == "reference":
        return reference.rounded_once(reference.precondition_grouped_backward, grad_outs, grads, As, Ss, Bs, mask)
    outs = _FAMILIES[chosen].grouped_backward(
        list(grad_outs), list(grads), list(As), list(Ss), list(Bs), list(mask)
    )
    return tuple(list(o) for o in outs)

"""Every input rule of the preconditioner op, in one place.

Rules are checked before any kernel runs and raise ``TypeError`` (wrong kind of object or dtype)
or ``ValueError`` (shape, device or consistency), always naming the argument.
"""
from __future__ import annotations

from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, float64, float16, bfloat16"
        )


def check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_layer(grad, A, S, B, *, prefix: str = "", grad_name: str = "grad") -> None:
    """Check one (possibly batched) layer: grad (…, m, n), A (…, m, m), S (…, m, n), B (…, n, n).

    ``prefix`` is prepended to argument names (e.g. ``"layer 3: "`` for the grouped op).
    """
    names = (grad_name, "A", "S", "B")
    tensors = (grad, A, S, B)
    for name, t in zip(names, tensors):
        _check_tensor(prefix + name, t)
    if grad.ndim not in (2, 3):
        raise ValueError(
            f"{prefix}{grad_name} must be 2-D (m, n) or 3-D (L, m, n), got shape {tuple(grad.shape)}"
        )
    for name, t in zip(names[1:], tensors[1:]):
        if t.ndim != grad.ndim:
            raise ValueError(
                f"{prefix}{name} must have {grad.ndim} dims like {grad_name}, got shape {tuple(t.shape)}"
            )
        if t.dtype != grad.dtype:
            raise TypeError(f"{prefix}{name} has dtype {t.dtype} but {grad_name} has {grad.dtype}")
        if t.device != grad.device:
            raise ValueError(f"{prefix}{name} is on {t.device} but {grad_name} is on {grad.device}")
    *batch, m, n = grad.shape
    expected = {"A": (*batch, m, m), "S": (*batch, m, n), "B": (*batch, n, n)}
    for name, t in zip(names[1:], tensors[1:]):
        if tuple(t.shape) != expected[name]:
            what = "batch size" if batch and t.shape[0] != batch[0] else "shape"
            raise ValueError(
                f"{prefix}{name} must have shape {expected[name]} for {grad_name} of shape "
                f"{tuple(grad.shape)} (mismatched {what}), got {tuple(t.shape)}"
            )


def check_grad_out(grad_out, grad, *, prefix: str = "") -> None:
    _check_tensor(prefix + "grad_out", grad_out)
    if grad_out.shape != grad.shape:
        raise ValueError(
            f"{prefix}grad_out must have the shape of grad {tuple(grad.shape)}, got {tuple(grad_out.shape)}"
        )
    if grad_out.dtype != grad.dtype:
        raise TypeError(f"{prefix}grad_out has dtype {grad_out.dtype} but grad has {grad.dtype}")
    if grad_out.device != grad.device:
        raise ValueError(f"{prefix}grad_out is on {grad_out.device} but grad is on {grad.device}")


def check_output_mask(output_mask) -> tuple[bool, bool, bool, bool]:
    if not isinstance(output_mask, (tuple, list)) or len(output_mask) != 4:
        raise ValueError(
            "output_mask must be a sequence of 4 bools (grad, A, S, B), got " f"{output_mask!r}"
        )
    if not all(isinstance(b, bool) for b in output_mask):
        raise TypeError(f"output_mask must hold bools, got {output_mask!r}")
    return tuple(output_mask)


def check_group(grads, As, Ss, Bs, *, grad_outs=None) -> None:
    """Check the grouped op's lists: equal lengths, 2-D layers, one dtype and device for all."""
    lists = {"grads": grads, "As": As, "Ss": Ss, "Bs": Bs}
    if grad_outs is not None:
        lists["grad_outs"] = grad_outs
    for name, seq in lists.items():
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"grads, As, Ss, Bs must have the same length, got {lengths}")
    if grad_outs is None and _group_ok(grads, As, Ss, Bs):
        return
    for i, (g, a, s, b) in enumerate(zip(grads, As, Ss, Bs)):
        prefix = f"layer {i}: "
        check_layer(g, a, s, b, prefix=prefix)
        if g.ndim != 2:
            raise ValueError(f"{prefix}grouped layers must be 2-D (m, n), got shape {tuple(g.shape)}")
        if g.dtype != grads[0].dtype:
            raise TypeError(f"{prefix}dtype {g.dtype} differs from layer 0's {grads[0].dtype}")
        if g.device != grads[0].device:
            raise ValueError(f"{prefix}device {g.device} differs from layer 0's {grads[0].device}")
        if grad_outs is not None:
            check_grad_out(grad_outs[i], g, prefix=prefix)


def _group_ok(grads, As, Ss, Bs) -> bool:
    """Fast path of ``check_group`` (the op's hot path: one call per optimizer step over every
    layer): True when every layer is plainly valid. Any doubt returns False and the detailed
    checks run, so errors still name the argument."""
    if not grads or not isinstance(grads[0], torch.Tensor):
        return False
    dtype, device = grads[0].dtype, grads[0].device
    if dtype not in SUPPORTED_DTYPES:
        return False
    tensor = torch.Tensor
    for g, a, s, b in zip(grads, As, Ss, Bs):
        if not (isinstance(g, tensor) and isinstance(a, tensor) and isinstance(s, tensor) and isinstance(b, tensor)):
            return False
        if g.ndim != 2:
            return False
        m, n = g.shape
        if a.shape != (m, m) or s.shape != (m, n) or b.shape != (n, n):
            return False
        if not (g.dtype is dtype and a.dtype is dtype and s.dtype is dtype and b.dtype is dtype):
            return False
        if not (g.device == device and a.device == device and s.device == device and b.device == device):
            return False
    return True

"""Numerical guards shared by the optimizers and baselines."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from .ops import backends

__all__ = ["all_finite", "all_finite_scratch", "checked_loss", "loss_finite", "loss_scalar", "no_autocast"]


def _every_device_finite(by_device: dict[torch.device, list[Tensor]],
                         fallback: Callable[[torch.device, list[Tensor]], bool]) -> bool:
    """Whether each device's (non-empty) tensors are finite, stopping at the first that is not: one
    call of the native ``apo::all_finite`` where it is the check used (CPU with the native module),
    ``fallback(device, tensors)`` elsewhere."""
    for device, ts in by_device.items():
        if device.type == "cpu" and backends.native_all_finite is not None:
            finite = bool(backends.native_all_finite(ts))
        else:
            finite = fallback(device, ts)
        if not finite:
            return False
    return True


def all_finite(tensors: Iterable[Optional[Tensor]]) -> bool:
    """True when every given tensor (None entries ignored) holds only finite values (one sync per
    device when they are).

    CPU tensors: one call of the native ``apo::all_finite`` (an integer test on each value's
    exponent, read-only). On a small model a step's guard is then one op instead of a reduction per
    tensor plus their combination, and in a training loop each of those small ops costs several µs.

    Other devices (and CPU without the native module): a sum is finite only if every value summed is
    (NaN propagates, ±inf + finite = ±inf, inf − inf = NaN), so finite per-tensor sums prove the
    tensors finite in one vectorized read, about twice as fast as ``aminmax`` on a cold
    parameter-sized gradient. A sum that is not finite may have overflowed from finite values: only
    then the exact check runs, min and max per tensor (a tensor is finite iff both are). Both beat
    ``isfinite(t).all()``, which materializes a full boolean tensor.
    """
    ts = [t for t in tensors if t is not None]
    if ts and ts[0].is_cpu and backends.native_all_finite is not None:
        # the common case, straight to the op (it takes empty and requires-grad tensors): right after a
        # backward every Python operation costs several times its usual time, and sorting the tensors
        # by device cost as much as the check
        try:
            return bool(backends.native_all_finite(ts))
        except ValueError:  # not all on the CPU: per device below
            pass
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in ts:
        if t.numel() > 0:
            by_device.setdefault(t.device, []).append(t.detach() if t.requires_grad else t)
    return _every_device_finite(by_device, _sums_then_extremes)


def _sums_then_extremes(device: torch.device, ts: list[Tensor]) -> bool:
    """``all_finite``'s check off the native path (its docstring)."""
    if bool(torch.isfinite(torch.stack([t.sum() for t in ts]).sum())):
        return True
    return bool(torch.isfinite(torch.stack([m for t in ts for m in torch.aminmax(t)])).all())


def checked_loss(loss) -> Optional[Tensor]:
    """The closure's loss as a tensor to check in the same ``all_finite`` call as other tensors:
    the loss when it is a Tensor, else None (None, a Python number: not checked, as in ``loss_finite``)."""
    return loss if isinstance(loss, Tensor) else None


def loss_finite(loss) -> bool:
    """Whether a closure's loss is finite: a tensor's values (one read of a scalar), anything else
    (None, a Python number the caller computed) is not checked."""
    if not isinstance(loss, Tensor):
        return True
    return math.isfinite(loss.item()) if loss.numel() == 1 else all_finite([loss])


def loss_scalar(loss) -> float:
    """A meta-step's closure loss as a Python float: a one-element tensor or a real number (a
    meta-step adds it into Q and compares it with Q at θ'). Anything else is refused, naming the
    closure; None is the caller's to refuse."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"closure must return the loss as a scalar on a meta-step (a one-element tensor "
                             f"or a number), got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"closure must return the loss as a scalar on a meta-step (a one-element tensor or a "
                    f"number), got {type(loss).__name__}")


FUSED_CHECK_MAX = 1 << 20


def all_finite_scratch(tensors: Iterable[Optional[Tensor]]) -> bool:
    """``all_finite`` for tensors the caller owns and may write (its own results). Where
    ``all_finite`` is one native call (CPU) it is that. Elsewhere one fused op per device, torch's AMP
    non-finite check with an unscale factor of 1, which leaves every value as it is (x·1 = x, inf and
    NaN stay): several times cheaper than a reduction per tensor on a list of small tensors, where
    the per-tensor calls dominate. Above ``FUSED_CHECK_MAX`` elements in all the read-only
    ``all_finite`` is used: there the fused op's write pass would cost more than the calls."""
    groups: dict[torch.device, list[Tensor]] = {}
    total = 0
    for t in tensors:
        if t is not None and t.numel() > 0:
            groups.setdefault(t.device, []).append(t)
            total += t.numel()
    if total > FUSED_CHECK_MAX:
        return all_finite(t for ts in groups.values() for t in ts)
    return _every_device_finite(groups, _amp_check)


def _amp_check(device: torch.device, ts: list[Tensor]) -> bool:
    """``all_finite_scratch``'s check off the native path: AMP's fused check, unscale factor 1."""
    found = torch.zeros(1, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones(1, device=device))
    return not bool(found)


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Optimizer arithmetic must not be downcast by an autocast region the user opened around step()."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield

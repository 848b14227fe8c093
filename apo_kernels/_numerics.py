"""Numerical guards shared by the optimizers and baselines."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["all_finite", "all_finite_scratch", "no_autocast"]


def all_finite(tensors: Iterable[Optional[Tensor]]) -> bool:
    """True when every given tensor (None entries ignored) holds only finite values (one sync per device).

    A tensor is finite iff its min and max are: NaN propagates through both and ±inf shows up in
    one. ``aminmax`` is a single vectorized read, several times cheaper than ``isfinite(t).all()``,
    which materializes a full boolean tensor on every step.
    """
    extremes: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            extremes.setdefault(t.device, []).extend(torch.aminmax(t.detach() if t.requires_grad else t))
    return all(bool(torch.isfinite(torch.stack(v)).all()) for v in extremes.values())


FUSED_CHECK_MAX = 1 << 20


def all_finite_scratch(tensors: Iterable[Optional[Tensor]]) -> bool:
    """``all_finite`` for tensors the caller owns and may write (its own results): one fused op per
    device, torch's AMP non-finite check with an unscale factor of 1, which leaves every value as it
    is (x·1 = x, inf and NaN stay). Several times cheaper than ``all_finite`` on a list of small
    tensors, where the per-tensor calls dominate. Above ``FUSED_CHECK_MAX`` elements in all the
    read-only ``all_finite`` is used: there the fused op's write pass would cost more than the calls."""
    groups: dict[torch.device, list[Tensor]] = {}
    total = 0
    for t in tensors:
        if t is not None and t.numel() > 0:
            groups.setdefault(t.device, []).append(t)
            total += t.numel()
    if total > FUSED_CHECK_MAX:
        return all_finite(t for ts in groups.values() for t in ts)
    for device, ts in groups.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones(1, device=device))
        if bool(found):
            return False
    return True


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Optimizer arithmetic must not be downcast by an autocast region the user opened around step()."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield

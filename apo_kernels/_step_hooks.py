"""torch.optim's step wrapper, opened only when something listens.

Every ``torch.optim.Optimizer`` subclass gets its ``step`` wrapped by torch (``profile_hook_step``): the
global and per-optimizer step hooks run around it, inside a profiler range named
``Optimizer.step#<Class>.step``. The range is opened on every call, profiler or not: two op calls
through ``torch.ops.profiler``, 9 µs in a tight loop but about 60 µs right after a backward, a few
percent of a small model's step. ``step_with_hooks`` gives a step the same behaviour with that cost only when it buys something:
with a hook registered or a profiler running, the call goes through torch's own wrapper; otherwise
``step`` runs directly, followed by ``_optimizer_step_code`` (the profiler's Python-tracer entry).
The wrapper is marked ``hooked``, so torch does not wrap it again.

``warn_at_caller``: a warning raised inside a step, attributed to the user's ``step`` call however
many wrappers (this one, ``torch.no_grad``) stand between.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Callable

import torch
from torch.optim import optimizer as _torch_optimizer

__all__ = ["step_with_hooks", "step_quietly", "warn_at_caller"]


def _anyone_listening(opt: torch.optim.Optimizer) -> bool:
    return bool(torch.autograd.profiler._is_profiler_enabled
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def step_with_hooks(step: Callable) -> Callable:
    """Decorate an Optimizer subclass's ``step`` (see the module docstring)."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if _anyone_listening(self):
            return hooked(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # torch.optim.Optimizer._patch_step_function: already wrapped
    return wrapper


def step_quietly(opt: torch.optim.Optimizer):
    """``opt.step()`` for a stock torch optimizer that an APO optimizer drives itself (its
    meta-optimizer), with the same rule: torch's wrapper only when someone listens, or when the
    instance's step was replaced (a scheduler wraps it to count calls)."""
    step = type(opt).step
    inner = getattr(step, "__wrapped__", None)
    if inner is None or not getattr(step, "hooked", False) or "step" in vars(opt) or _anyone_listening(opt):
        return opt.step()
    out = inner(opt)
    opt._optimizer_step_code()
    return out


# with the separator: a user's folder named apo_kernels_examples/ or torchvision/ is not ours
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first frame outside apo_kernels and torch: the user's
    ``step`` call, however many decorators (no_grad, step hooks) wrap it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)

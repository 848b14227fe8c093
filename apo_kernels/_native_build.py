"""Which torch the native module apo_kernels._C was built against, and whether it may be loaded.

A compiled torch extension works only with the torch it was compiled against: under another torch
its import fails with an undefined symbol, or it loads and misbehaves. Every build of _C (setup.py)
writes ``apo_kernels/_build_info.py`` next to it with ``TORCH_VERSION``; the op layer calls
:func:`check_torch_version` before importing _C and, on a mismatch, leaves the cpu and cuda backends
off with this reason (``backends()`` shows it) instead of falling back to the reference silently.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch


def built_against_torch() -> Optional[str]:
    """The torch version _C was built against, or None when no build recorded one."""
    try:
        info = importlib.import_module("apo_kernels._build_info")
    except ImportError:
        return None
    return getattr(info, "TORCH_VERSION", None)


def torch_mismatch(reinstall_hint: str) -> Optional[str]:
    """Why _C must not be loaded under the running torch, or None when the versions match (or
    nothing was recorded: then the import of _C decides)."""
    built, running = built_against_torch(), str(torch.__version__)
    if built is None or built == running:
        return None
    return (f"apo_kernels._C was built against torch {built}, but torch {running} is running; "
            f"rebuild it against this torch: {reinstall_hint}")


def check_torch_version(reinstall_hint: str) -> Optional[str]:
    """:func:`torch_mismatch`, and a RuntimeWarning saying so when there is one."""
    reason = torch_mismatch(reinstall_hint)
    if reason is not None:
        warnings.warn(f"{reason} (until then the cpu and cuda backends are off and backend='auto' "
                      "uses the other backends, down to the slow reference)", RuntimeWarning, stacklevel=2)
    return reason

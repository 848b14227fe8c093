"""Helpers of the pytest-benchmark suites (a uniquely named module, not conftest: tests/ has one too)."""
import os

import pytest
import torch

import apo_kernels

DEVICE = torch.device(os.environ.get("APO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def timed_backends():
    status = apo_kernels.backends()
    names = ["cuda", "triton"] if DEVICE.type == "cuda" else ["cpu"]
    out = []
    for b in names:
        reason = None if status[b].startswith("available") else status[b]
        if b == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            reason = "TRITON_INTERPRET=1: interpreted kernels are not timed"
        out.append(pytest.param(b, marks=[pytest.mark.skip(reason=f"{b}: {reason}")] if reason else [], id=b))
    return out


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)

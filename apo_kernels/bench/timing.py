"""Timers and the run's environment record.

GPU: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2 flushed), or plain
CUDA events when Triton is missing. CPU: ``time.perf_counter`` around single calls after warm-up,
repeated until a time budget is spent; median and 20/80 % quantiles of the repeats.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timer", "env_info", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles
    return statistics.median(xs), q[1], q[7]


@dataclass
class Timer:
    """Measure a zero-argument callable; returns dict(median_ms, p20_ms, p80_ms, reps, method)."""

    device: torch.device
    quick: bool = False

    def __post_init__(self):
        self.device = torch.device(self.device)
        # CPU: (warm-up calls, min repeats, target seconds, max repeats, hard cap seconds)
        self.cpu_cfg = (1, 3, 0.05, 10, 0.4) if self.quick else (1, 5, 0.4, 30, 4.0)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            try:
                import triton.testing  # noqa: F401

                return "triton.testing.do_bench(quantiles=[0.5,0.2,0.8])"
            except Exception:
                return "cuda events"
        return "time.perf_counter, median of repeats after warm-up"

    def __call__(self, fn: Callable[[], object]) -> dict:
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._cpu(fn)

    def _cpu(self, fn) -> dict:
        warm, min_reps, target, max_reps, cap = self.cpu_cfg
        t_first = time.perf_counter()
        for _ in range(warm):
            fn()
        first = time.perf_counter() - t_first
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            spent = time.perf_counter() - start
            if len(times) >= max_reps or spent + first > cap and len(times) >= 2:
                break
            if len(times) >= min_reps and spent >= target:
                break
        med, p20, p80 = _quantiles(times)
        # min_ms too: on a shared machine the median can hold scheduler stalls, the min rarely does
        return dict(median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, min_ms=min(times) * 1e3, reps=len(times))

    def _cuda(self, fn) -> dict:
        warmup, rep = (5, 20) if self.quick else (25, 100)
        try:
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), reps=None)
        except ImportError:
            pass
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20 if self.quick else 100):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        med, p20, p80 = _quantiles(times)
        return dict(median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, reps=len(times))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device) -> dict:
    """Device name, versions and date: recorded in every JSON the bench writes."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed (CPU-only laptop) or broken
        triton_version = f"unavailable ({type(exc).__name__})"
    try:
        import apo_kernels

        apo_version = apo_kernels.__version__
        backends = apo_kernels.backends()
    except Exception as exc:
        apo_version, backends = "unknown", {"error": repr(exc)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = dict(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
    else:
        name = _cpu_name()
        extra = dict(cpu_count=os.cpu_count())
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return dict(
        device=str(device),
        load_avg_at_start=load,  # 1/5/15-min load: a busy machine makes CPU timings noisy
        device_name=name,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=triton_version,
        apo_kernels=apo_version,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        backends=backends,
        **extra,
    )

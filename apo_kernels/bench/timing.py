"""The bench's one timing call, its one summary of repeated times, and the run's environment record.

``Timer(device, quick)(fn)`` times a zero-argument callable and returns
``dict(median_ms, p20_ms, p80_ms, min_ms, reps)``:

- every call is warmed up first (``warmup`` untimed calls, then torch's / Triton's own warm-up), so
  no row pays for the first use of a kernel, an allocator pool or a code path;
- GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs), all runs kept;
- CPU (and a GPU without Triton): ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of
  calls, sized so the timer's own cost is negligible, repeated for a time budget), with torch's
  current thread count;
- at least ``min_reps`` timed repeats whatever the budget; the median, the 20/80 % quantiles and
  the minimum of the repeats (``summarize``).

``Timer.interleaved({name: fn, ...})`` times callables that are compared with each other (the
optimizers of one training problem) round-robin: fn 1, fn 2, …, then again, ``rounds`` times, each
call timed alone with torch.utils.benchmark's clock (which synchronizes the accelerator), right after
an untimed warm call of its own (``before``) where the caller gives one. A burst of load from other
processes then hits every callable alike instead of one row, and the ratio of their medians stays
meaningful on a busy machine. The calls are long (a block of training steps), so a
fixed count replaces blocked_autorange's block-size estimate, which would run each block many times.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["Timer", "TimerSettings", "summarize", "env_info", "thread_handoff_ns", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def summarize(times_s: Sequence[float]) -> dict:
    """Median, 20/80 % quantiles (inclusive deciles) and minimum of repeated times, in ms."""
    if not times_s:
        raise ValueError("summarize: times_s is empty")
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) == 1:
        p20 = p80 = ms[0]
    else:
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        p20, p80 = deciles[1], deciles[7]
    return dict(median_ms=statistics.median(ms), p20_ms=p20, p80_ms=p80, min_ms=ms[0], reps=len(ms))


@dataclass(frozen=True)
class TimerSettings:
    """How long to measure one row: ``warmup`` untimed calls, at least ``min_reps`` timed repeats
    for at least ``min_time_s`` (CPU: ``blocked_autorange``'s ``min_run_time``), or ``do_bench``'s
    ``gpu_warmup_ms`` and at least ``gpu_rep_ms`` on the GPU; ``rounds`` timed rounds of an
    interleaved comparison."""

    warmup: int
    min_reps: int
    min_time_s: float
    gpu_warmup_ms: float
    gpu_rep_ms: float
    rounds: int


QUICK = TimerSettings(warmup=1, min_reps=3, min_time_s=0.2, gpu_warmup_ms=5, gpu_rep_ms=20, rounds=5)
FULL = TimerSettings(warmup=1, min_reps=5, min_time_s=1.0, gpu_warmup_ms=25, gpu_rep_ms=100, rounds=7)


def _triton_testing():
    try:
        import triton.testing

        return triton.testing
    except Exception:  # not installed, or no driver for this machine
        return None


@dataclass
class Timer:
    """The one timing call of the bench: ``Timer(device, quick)(fn) -> dict``."""

    device: torch.device
    quick: bool = False

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.settings = QUICK if self.quick else FULL

    @property
    def _do_bench(self):
        return _triton_testing() if self.device.type == "cuda" else None

    @property
    def method(self) -> str:
        s = self.settings
        if self._do_bench is not None:
            how = f"triton.testing.do_bench(warmup={s.gpu_warmup_ms:g} ms, rep≥{s.gpu_rep_ms:g} ms)"
        else:
            how = (f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time≥{s.min_time_s:g} s), "
                   f"{torch.get_num_threads()} threads")
        return (f"{how}; every row warmed up, ≥ {s.min_reps} repeats, median [p20–p80]; training steps: "
                f"the optimizers of a problem timed round-robin, {s.rounds} rounds of one block each, "
                f"each block right after an untimed step of its own")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> dict:
        """Warm ``fn`` up, then time it."""
        s = self.settings
        call_s = 0.0
        for _ in range(s.warmup):
            t0 = time.perf_counter()
            fn()
            self.sync()
            call_s = time.perf_counter() - t0  # the last warm-up call sizes the budget below
        # the time budget always leaves room for min_reps repeats of one call
        budget_s = s.min_reps * call_s
        do_bench = self._do_bench
        if do_bench is not None:
            rep_ms = max(s.gpu_rep_ms, 1e3 * budget_s)
            times = [t / 1e3 for t in do_bench.do_bench(fn, warmup=s.gpu_warmup_ms, rep=rep_ms, return_mode="all")]
        else:
            times = self._autorange(fn, max(s.min_time_s, budget_s))
        return summarize(times)

    def interleaved(self, fns: Mapping[str, Callable[[], object]], rounds: int | None = None,
                    on_round: Callable[[str], None] = lambda desc: None,
                    before: Mapping[str, Callable[[], object]] | None = None) -> dict[str, dict]:
        """Time ``fns`` round-robin: ``warmup`` untimed rounds, then ``rounds`` (default the settings')
        timed rounds of one call of each, in turn; ``on_round(description)`` before each round.
        ``before[name]``, where given, runs untimed right before each call of ``fns[name]``: a short
        piece of the same work (one training step), so the timed call starts from the caches its own
        work leaves, as in a loop of it, not from those the previous callable left (after a heavy
        optimizer's block a small model's first steps run cold, and the row timed right after it pays
        for that). Returns name -> ``summarize`` of its calls, or ``dict(error=...)`` for a callable
        that raised (it is dropped from the later rounds)."""
        from torch.utils.benchmark.utils.timer import timer as clock  # syncs the accelerator

        from .._args import check_int

        rounds = self.settings.rounds if rounds is None else check_int("rounds", rounds, low=1)
        times: dict[str, list[float]] = {name: [] for name in fns}
        errors: dict[str, str] = {}
        total = self.settings.warmup + rounds
        for r in range(total):
            on_round("warm-up round" if r < self.settings.warmup else f"round {r - self.settings.warmup + 1}/{rounds}")
            for name, fn in fns.items():
                if name in errors:
                    continue
                try:
                    if before is not None and name in before:
                        before[name]()
                        self.sync()
                    t0 = clock()
                    fn()
                    elapsed = clock() - t0
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                if r >= self.settings.warmup:
                    times[name].append(elapsed)
        return {name: dict(error=errors[name]) if name in errors else summarize(times[name]) for name in fns}

    def _autorange(self, fn, min_run_time: float) -> list[float]:
        import torch.utils.benchmark as tb

        timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
        times = list(m.times)
        while len(times) < self.settings.min_reps:  # a call ran slower than its warm-up
            times += timer.timeit(m.number_per_run).times
        return times


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_op_report(name: str) -> str:
    """A choice the CPU op made for this process, as ``torch.ops.apo.<name>()`` reports it: the GEMM
    engine of its fp32 direct path (``cpu_gemm_engine``), what its forward does with big bf16 layers
    (``cpu_bf16_gemm``)."""
    try:
        return getattr(torch.ops.apo, name)()
    except Exception as exc:  # no native module, or a bad APO_KERNELS_CPU_* value
        return f"unavailable ({type(exc).__name__})"


HANDOFF_ROUNDS = 100_000  # ≈ 10–40 ms a probe


def thread_handoff_ns() -> float | None:
    """Two of torch's intra-op threads' cache-line round trip in ns (``apo::cpu_thread_handoff_ns``;
    why it moves CPU timings, and what it read: csrc/cpu_handoff.h), rounded; None on one thread or
    without the native module."""
    try:
        ns = float(torch.ops.apo.cpu_thread_handoff_ns(HANDOFF_ROUNDS))
    except Exception:  # no native module
        return None
    return round(ns, 1) if math.isfinite(ns) else None


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
        extra = dict(cpu_count=os.cpu_count(), cpu_gemm=_cpu_op_report("cpu_gemm_engine"),
                     cpu_bf16_gemm=_cpu_op_report("cpu_bf16_gemm"))
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

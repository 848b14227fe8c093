"""The benchmark's run configuration and result rows (shared by every section)."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .timing import DTYPES, Timer

__all__ = ["Config", "make_row", "add_ratios", "divide_times", "num_threads", "timed_backends", "CPU_HALF_CAP"]

# A CPU without bf16/fp16 GEMM units (AVX512-BF16, AMX) runs those GEMMs at ~0.7 GFLOP/s against
# ~60-300 for fp32: there half precision is capped at this size so the run stays minutes, not hours.
# Whether a CPU is such a one is measured (``cpu_gemm_rates``), not assumed.
CPU_HALF_CAP = {"quick": 128, "full": 256}
SLOW_HALF = 10.0  # a half dtype whose GEMM rate is this many times below fp32's is capped
_PROBE = 128      # the probe GEMM's size: 4 MFLOP, a few ms even at 0.7 GFLOP/s


@functools.lru_cache(maxsize=None)
def cpu_gemm_rates() -> dict[str, float]:
    """GFLOP/s of a 128² matmul on this CPU per dtype name (fp32, bf16, fp16): the best of a few
    calls after one warm-up, measured once per process."""
    import time

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(_PROBE, _PROBE, generator=gen), torch.randn(_PROBE, _PROBE, generator=gen)
    rates = {}
    for name, dtype in DTYPES.items():
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * _PROBE ** 3 / max(best, 1e-9) / 1e9
    return rates


def timed_backends(device_type: str, wanted: Optional[list[str]] = None) -> tuple[list[str], dict[str, str]]:
    """The backends the bench times on ``device_type``, in priority order, and why it does not time
    the others that were asked for or that run there.

    ``wanted`` None: from the registry, the usable backends ranked above the ``reference`` fallback
    (a backend below it runs for tests, as Triton's interpreter does, and is not timed), or the
    ``reference`` itself when nothing else is usable. Otherwise: the ``wanted`` names usable here
    (ValueError for a name that is not registered)."""
    from ..ops.backends import backends, registered, usable

    status, names = backends(), usable(device_type)
    if wanted is not None:
        unknown = [b for b in wanted if b not in status]
        if unknown:
            raise ValueError(f"unknown backend {unknown}; registered: {sorted(status)}")
        not_here = f"does not run on {device_type} tensors"
        return [b for b in wanted if b in names], {
            b: status[b] if not status[b].startswith("available") else not_here for b in wanted if b not in names}
    fallback = names.index("reference") if "reference" in names else len(names)
    timed = names[:fallback] or names[fallback:fallback + 1]
    skipped = {b: f"ranked below the reference fallback on {device_type} ({status[b]})" for b in names[fallback + 1:]}
    skipped.update({b.name: status[b.name] for b in registered() if device_type in b.devices and b.name not in names})
    return timed, skipped


@dataclass
class Config:
    device: torch.device
    quick: bool
    sizes: list[int]
    dtypes: list[str]
    backends: list[str]
    skipped_backends: dict[str, str]
    widths: list[int]
    layer_sets: list[str]
    train_widths: list[int]
    sections: list[str]
    threads: Optional[int] = None  # --threads: torch's CPU threads, None = torch's choice
    tick: Callable[[str], None] = lambda desc: None
    # probe(where): apo-bench records the CPU threads' round trip at that point of the run
    # (timing.thread_handoff_ns); the train section calls it before each problem
    probe: Callable[[str], None] = lambda where: None
    timer: Optional[Timer] = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.timer is None:
            self.timer = Timer(self.device, quick=self.quick)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def scale(self) -> str:
        return "gpu" if self.is_cuda else ("quick" if self.quick else "cpu")

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[name]

    def half_cap(self, dtype_name: str) -> Optional[int]:
        """The largest size timed in ``dtype_name`` (None: no cap): capped only on a CPU whose GEMMs
        in that dtype measured SLOW_HALF times slower than in fp32."""
        if self.is_cuda or dtype_name == "fp32":
            return None
        rates = cpu_gemm_rates()
        if rates[dtype_name] * SLOW_HALF >= rates["fp32"]:
            return None
        return CPU_HALF_CAP["quick" if self.quick else "full"]

    def size_ok(self, size: int, dtype_name: str) -> bool:
        cap = self.half_cap(dtype_name)
        return cap is None or size <= cap


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """torch's CPU threads set to ``n`` (None: unchanged) for the block, restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def divide_times(timing: dict, by: float) -> dict:
    """A timing with its times (the ``*_ms`` fields) divided by ``by``, the other fields as they are:
    per call from a block of calls, per step from a block of steps."""
    return {k: v / by if k.endswith("_ms") else v for k, v in timing.items()}


def make_row(section: str, case: str, impl: str, dtype: str, size, timing: dict, **extra) -> dict:
    r = dict(section=section, case=case, impl=impl, dtype=dtype, size=size)
    r.update(timing)
    r.update(extra)
    return r


def add_ratios(rows: list[dict], baseline_impl: str, key=("section", "case", "dtype", "size")) -> None:
    """ratio = median / median of ``baseline_impl`` in the same (section, case, dtype, size) cell."""
    base = {tuple(r[k] for k in key): r for r in rows if r["impl"] == baseline_impl and "median_ms" in r}
    for r in rows:
        b = base.get(tuple(r[k] for k in key))
        if b is not None and "median_ms" in r:
            r["baseline"] = baseline_impl
            r["ratio"] = r["median_ms"] / b["median_ms"] if b["median_ms"] > 0 else float("nan")

"""Every backend of the op, in one registry.

Each entry gives a name, the tensor device types it runs on, a priority (``auto`` picks, for the
inputs' device type, the available backend with the highest one), its op family (the four ops) and
the reason it cannot run here, if any. The public functions (dispatch.py), ``backends()``, the
tests and the benchmarks all read this registry; adding a backend is its own file plus one
:func:`register` call (docs/ARCHITECTURE.md, "Add a backend").

Built-in backends, by priority:
- ``cuda`` (30) / ``cpu`` (10): the compiled kernels of ``apo_kernels._C`` (csrc/), registered in
  C++ as ``torch.ops.apo.precondition*``; the dispatcher picks the CPU or CUDA kernel by device.
- ``triton`` (20): ``triton_kernels.py``, wrapped here as ``torch.ops.apo.triton_*`` custom ops;
  CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (then below ``reference``: the
  interpreter is for tests, ``auto`` never picks it).
- ``reference`` (0): plain torch (``reference.py``), the fallback on CPU and CUDA, and the backend for
  meta tensors (shapes only).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import _native_build
from . import _validate, reference
from .library import OpFamily, library_family

__all__ = [
    "Backend", "OpFamily", "register", "unregister", "registered", "get", "names", "backends",
    "usable", "check_name", "resolve", "half_operands_pay", "BACKEND_ENV",
]

BACKEND_ENV = "APO_KERNELS_BACKEND"
REINSTALL_HINT = "pip install --no-build-isolation -e ."


@dataclass(frozen=True)
class Backend:
    """One backend. ``family`` is None only for a backend whose code did not load (then
    ``why_unavailable()`` says why); ``note`` is shown after "available" by ``backends()``."""

    name: str
    devices: tuple[str, ...]
    priority: int
    family: Optional[OpFamily]
    why_unavailable: Callable[[], Optional[str]]
    note: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == "auto":
            raise ValueError(f"Backend.name must be a non-empty str other than 'auto', got {self.name!r}")
        if not isinstance(self.devices, tuple) or not all(isinstance(d, str) for d in self.devices):
            raise TypeError(f"Backend.devices must be a tuple of device type names, got {self.devices!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"Backend.priority must be an int, got {self.priority!r}")
        if self.family is not None and not isinstance(self.family, OpFamily):
            raise TypeError(f"Backend.family must be an OpFamily or None, got {type(self.family).__name__}")
        if not callable(self.why_unavailable):
            raise TypeError("Backend.why_unavailable must be callable (returning None or a reason)")

    def status(self) -> str:
        """"available…" or "unavailable: <why>", as ``backends()`` reports it."""
        why = self.why_unavailable()
        if why is None and self.family is None:
            why = "its op family did not load"
        if why is not None:
            return f"unavailable: {why}"
        return f"available ({self.note})" if self.note else "available"

    def is_available(self) -> bool:
        return self.family is not None and self.why_unavailable() is None


_REGISTRY: dict[str, Backend] = {}
_ORDER: tuple[Backend, ...] = ()  # the registry by priority, kept sorted (read on every op call)


def _reorder() -> None:
    global _ORDER
    _ORDER = tuple(sorted(_REGISTRY.values(), key=lambda b: -b.priority))


def register(backend: Backend) -> Backend:
    """Add ``backend``; its name must be new (``unregister`` the old entry to replace one)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend, got {type(backend).__name__}")
    if backend.name in _REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    _reorder()
    return backend


def unregister(name: str) -> Backend:
    """Remove and return the backend called ``name``."""
    backend = _REGISTRY.pop(check_name(name, allow_auto=False))
    _reorder()
    return backend


def registered() -> tuple[Backend, ...]:
    """Every backend, highest priority first (ties in registration order)."""
    return _ORDER


def get(name: str) -> Backend:
    return _REGISTRY[check_name(name, allow_auto=False)]


def names() -> tuple[str, ...]:
    return tuple(b.name for b in registered())


def backends() -> dict[str, str]:
    """Each backend and whether it is usable here ("available…") or why not ("unavailable: …")."""
    return {b.name: b.status() for b in registered()}


def usable(device_type: str) -> list[str]:
    """Names of the backends usable here on tensors of ``device_type``, highest priority first."""
    return [b.name for b in registered() if device_type in b.devices and b.is_available()]


def check_name(backend, *, allow_auto: bool = True) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in _REGISTRY and not (allow_auto and backend == "auto"):
        choices = (("auto",) if allow_auto else ()) + names()
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs tensors on ``device`` for ``backend`` ("auto" or a name; the
    environment variable APO_KERNELS_BACKEND overrides "auto"); ValueError if it cannot run there."""
    check_name(backend)
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced != "auto":
            if forced not in names():
                raise ValueError(f"{BACKEND_ENV} must be one of {('auto',) + names()}, got {forced!r}")
            backend = forced
    if backend == "auto":
        for b in _ORDER:
            if device.type in b.devices and b.is_available():
                return b
        raise ValueError(f"no backend runs on {device.type} tensors here: {backends()}")
    chosen = _REGISTRY[backend]
    if not chosen.is_available():
        raise ValueError(f"backend={backend!r} is {chosen.status()}")
    if device.type not in chosen.devices:
        raise ValueError(
            f"backend={backend!r} runs on {'/'.join(chosen.devices)} tensors here, but the inputs are on {device}"
        )
    return chosen


_cpu_bf16_gemms: Optional[bool] = None  # the native module's choice, made once per process (csrc/cpu_gemm.h)


def half_operands_pay(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the op, called through ``backend`` on ``dtype`` tensors of ``device``, multiplies a big
    layer's operands in ``dtype`` (each product rounded to it, sums in float32) and so runs faster
    than on float32 tensors: the cpu backend on bf16 where it takes bf16 GEMMs, forward and backward
    (``torch.ops.apo.cpu_bf16_gemm() == "bf16"``, a CPU with AMX-BF16 unless forced). An optimizer that
    keeps φ in float32 for a bf16 model then runs its step on a bf16 image of φ. False elsewhere, the
    CUDA kernels included: their half-precision speed is not measured."""
    global _cpu_bf16_gemms
    if dtype != torch.bfloat16 or device.type != "cpu" or resolve(backend, device).name != "cpu":
        return False
    if _cpu_bf16_gemms is None:
        _cpu_bf16_gemms = torch.ops.apo.cpu_bf16_gemm() == "bf16"
    return _cpu_bf16_gemms


# --------------------------------------------------------------------------------------------
# Built-in backends
# --------------------------------------------------------------------------------------------

# cpu, cuda: the native module (importing it registers torch.ops.apo.*); not loaded, with a warning
# and the reason, when it was built against another torch
_native_error: Optional[str] = _native_build.check_torch_version(REINSTALL_HINT)
if _native_error is None:
    try:
        importlib.import_module("apo_kernels._C")
    except ImportError as exc:  # pragma: no cover - depends on the build
        _native_error = f"native extension apo_kernels._C not built ({exc}); reinstall with: {REINSTALL_HINT}"

_native_family = library_family("apo::") if _native_error is None else None
# apo::all_finite(tensors) -> 0-d bool tensor: the optimizers' one-call finiteness guard
# (apo_kernels._numerics.all_finite); None without the native module
native_all_finite: Optional[Callable] = None
if _native_error is None:
    native_all_finite = torch.ops.apo.all_finite.default

    def _on_one_device(what: str, tensors) -> None:
        """The fake kernels' device rule: a ValueError naming ``what`` when the tensors span devices."""
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"{what}: every tensor must be on one device, got {sorted(map(str, devices))}")

    @torch.library.register_fake("apo::all_finite")
    def _fake_all_finite(tensors):
        _on_one_device("tensors", tensors)
        return (tensors[0].new_empty((), dtype=torch.bool) if tensors else torch.empty((), dtype=torch.bool))
# apo::lookahead_write(params, deltas, out) -> 0-d float64 tensor: θ' = θ + Δ into out and Σ‖Δ‖² in
# one pass (apo_kernels.optim.snapshot); None without the native module
native_lookahead_write: Optional[Callable] = None
if _native_error is None:
    native_lookahead_write = torch.ops.apo.lookahead_write.default

    @torch.library.register_fake("apo::lookahead_write")
    def _fake_lookahead_write(params, deltas, out):
        _on_one_device("params, deltas, out", (*params, *deltas, *out))
        return (params[0].new_empty((), dtype=torch.float64) if params else torch.empty((), dtype=torch.float64))
# apo::sgd_lookahead(params, grads, momenta, grad_coef, momentum_coef, decay_coef, deltas, out) -> 0-d
# float64 tensor: APO-LR's Δ for torch.optim.SGD into deltas, θ' = θ + Δ into out and Σ‖Δ‖² in one pass
# (apo_kernels.optim.lr); None without the native module
native_sgd_lookahead: Optional[Callable] = None
if _native_error is None:
    native_sgd_lookahead = torch.ops.apo.sgd_lookahead.default

    @torch.library.register_fake("apo::sgd_lookahead")
    def _fake_sgd_lookahead(params, grads, momenta, grad_coef, momentum_coef, decay_coef, deltas, out):
        _on_one_device("params, grads, momenta, deltas, out", (*params, *grads, *momenta, *deltas, *out))
        return (params[0].new_empty((), dtype=torch.float64) if params else torch.empty((), dtype=torch.float64))
# apo::sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov, maximize) -> 0-d
# bool tensor: torch.optim.SGD's per-tensor step, taken only when every gradient is finite (APO-LR's
# plain step, apo_kernels._step_hooks.checked_sgd_step); None without the native module
native_sgd_step: Optional[Callable] = None
if _native_error is None:
    native_sgd_step = torch.ops.apo.sgd_step.default

    @torch.library.register_fake("apo::sgd_step")
    def _fake_sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov, maximize):
        _on_one_device("params, grads, momenta", (*params, *grads, *momenta))
        return (params[0].new_empty((), dtype=torch.bool) if params else torch.empty((), dtype=torch.bool))
# apo::dot_sum(a, b) -> 0-d float64 tensor: Σ_i ⟨a_i, b_i⟩ in float64 (APO-LR's meta-gradient,
# apo_kernels.optim.lr); None without the native module
native_dot_sum: Optional[Callable] = None
if _native_error is None:
    native_dot_sum = torch.ops.apo.dot_sum.default

    @torch.library.register_fake("apo::dot_sum")
    def _fake_dot_sum(a, b):
        _on_one_device("a, b", (*a, *b))
        return (a[0].new_empty((), dtype=torch.float64) if a else torch.empty((), dtype=torch.float64))
# apo::dot_adam_step(a, b, segments, param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps) -> gradient:
# torch.optim.Adam's fused step on a 1-D param whose gradient is a float64 sum of dot products per
# segment (APO-LR's meta-step, apo_kernels._step_hooks.dot_adam_step); None without the native module
native_dot_adam_step: Optional[Callable] = None
if _native_error is None:
    native_dot_adam_step = torch.ops.apo.dot_adam_step.default

    @torch.library.register_fake("apo::dot_adam_step")
    def _fake_dot_adam_step(a, b, segments, param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
        _on_one_device("a, b, param, exp_avg, exp_avg_sq, step", (*a, *b, param, exp_avg, exp_avg_sq, step))
        return param.new_empty((len(segments),), dtype=torch.float64)
# apo::kron_precondition(grad, L, R, out) -> None: out = L·G·R, the kron structure's step
# (apo_kernels.optim.kron); None without the native module
native_kron_precondition: Optional[Callable] = None
if _native_error is None:
    native_kron_precondition = torch.ops.apo.kron_precondition.default

    @torch.library.register_fake("apo::kron_precondition")
    def _fake_kron_precondition(grad, L, R, out):
        _validate.check_kron(grad, L, R, out, fake=True)
# apo::kl_value_and_grad(new_out, old_out, scale) -> (value, grad): the FSD term's KL and its gradient
# in one call (apo_kernels.optim.discrepancy); None without the native module
native_kl_value_and_grad: Optional[Callable] = None
if _native_error is None:
    native_kl_value_and_grad = torch.ops.apo.kl_value_and_grad.default

    @torch.library.register_fake("apo::kl_value_and_grad")
    def _fake_kl_value_and_grad(new_out, old_out, scale):
        _validate.check_kl(new_out, old_out, scale)
        dtype = torch.float64 if new_out.dtype == torch.float64 else torch.float32
        return new_out.new_empty((), dtype=dtype), new_out.new_empty(new_out.shape, dtype=dtype)
# Asked once at import: the dispatcher query is not traceable, and the status is read inside
# torch.compile'd code (the public functions resolve their backend).
_NATIVE_HAS_CUDA = _native_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "apo::precondition", "CUDA"
)


def _cuda_unavailable() -> Optional[str]:
    if torch.version.cuda is None:
        return "torch has no CUDA (CPU build)"
    if _native_error is not None:
        return _native_error
    if not _NATIVE_HAS_CUDA:
        return f"apo_kernels._C was built without CUDA kernels; reinstall with nvcc on PATH: {REINSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


# triton: the kernels, and the custom ops wrapping them
try:
    _triton_kernels = importlib.import_module("apo_kernels.ops.triton_kernels")

    _triton_error: Optional[str] = None
except Exception as exc:  # triton missing, or a kernel module that fails to import
    _triton_kernels = None
    _triton_error = f"triton kernels unavailable ({type(exc).__name__}: {exc})"

# Triton's interpreter is switched on before triton is first imported and stays as it was.
_TRITON_INTERPRETED = _triton_kernels is not None and _triton_kernels.is_interpreter()


def _define_triton_ops(tk) -> OpFamily:
    """Wrap the Triton launchers as torch.library custom ops ``apo::triton_*``.

    ``custom_op`` (not ``triton_op``) because ``wrap_triton`` cannot take interpreted kernels, and
    the interpreter is how these kernels are tested on CPU.
    """

    def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
        return like.new_empty((0,)) if t is None else t

    @torch.library.custom_op("apo::triton_precondition", mutates_args=())
    def triton_precondition(grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> Tensor:
        return tk.triton_precondition(grad, A, S, B)

    @torch.library.custom_op("apo::triton_precondition_backward", mutates_args=())
    def triton_precondition_backward(
        grad_out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor],
        output_mask: Sequence[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outs = tk.triton_precondition_backward(grad_out, grad, A, S, B, tuple(output_mask))
        return tuple(empty_if_none(o, grad) for o in outs)

    @torch.library.custom_op("apo::triton_precondition_grouped", mutates_args=())
    def triton_precondition_grouped(
        grads: list[Tensor], As: list[Optional[Tensor]], Ss: list[Tensor], Bs: list[Optional[Tensor]]
    ) -> list[Tensor]:
        return list(tk.triton_precondition_grouped(grads, As, Ss, Bs))

    @torch.library.custom_op("apo::triton_precondition_grouped_backward", mutates_args=())
    def triton_precondition_grouped_backward(
        grad_outs: list[Tensor],
        grads: list[Tensor],
        As: list[Optional[Tensor]],
        Ss: list[Tensor],
        Bs: list[Optional[Tensor]],
        output_mask: Sequence[bool],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        outs = tk.triton_precondition_grouped_backward(grad_outs, grads, As, Ss, Bs, tuple(output_mask))
        return tuple([empty_if_none(o, g) for o, g in zip(out, grads)] for out in outs)

    return library_family("apo::triton_")


_triton_family = _define_triton_ops(_triton_kernels) if _triton_kernels is not None else None


def _triton_unavailable() -> Optional[str]:
    if _triton_error is not None:
        return _triton_error
    if not _TRITON_INTERPRETED and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return None


register(Backend(
    name="cuda", devices=("cuda",), priority=30, family=_native_family, why_unavailable=_cuda_unavailable,
))
register(Backend(
    name="triton",
    devices=("cpu",) if _TRITON_INTERPRETED else ("cuda",),
    priority=-10 if _TRITON_INTERPRETED else 20,
    family=_triton_family,
    why_unavailable=_triton_unavailable,
    note="TRITON_INTERPRET=1: runs on CPU tensors in Triton's interpreter" if _TRITON_INTERPRETED else "",
))
register(Backend(
    name="cpu", devices=("cpu",), priority=10, family=_native_family, why_unavailable=lambda: _native_error,
))
# meta tensors too: plain torch ops give the results' shapes there (deferred initialization, shape inference)
register(Backend(
    name="reference", devices=("cpu", "cuda", "meta"), priority=0, family=reference.FAMILY,
    why_unavailable=lambda: None,
))

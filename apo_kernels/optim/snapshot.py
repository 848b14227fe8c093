"""Snapshots of a model's state: the lookahead θ' = θ + Δ written in place, and the exact restore.

- ``lookahead``: a context manager; inside it the model's parameters hold θ + Δ, on exit θ,
  buffers (BatchNorm statistics), ``.grad`` are as before, bit for bit.
- ``ModelSnapshot``: the copies that make the restore exact; ``RNGState``: the RNG state that
  lets the lookahead replay the step's dropout masks.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["RNGState", "cuda_devices_of", "ModelSnapshot", "write_lookahead", "lookahead"]


class RNGState:
    """CPU (+ given CUDA devices) RNG state, so the lookahead replays the step's dropout masks."""

    def __init__(self, cuda_devices: Sequence[int] = ()):
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(s, d)


def cuda_devices_of(params: Iterable[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


class ModelSnapshot:
    """Copies of the given parameters' values, of ``.grad`` of every parameter of ``model`` (and of
    the given ones), and of every buffer of ``model``.

    ``restore()`` writes them back in place, bit for bit: θ, BatchNorm running statistics,
    ``num_batches_tracked`` and the gradients are exactly as when the snapshot was taken — also the
    gradients of parameters the lookahead does not move (the closure's backward rewrites them too).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]
        self.grad_params = list({id(p): p for p in (*self.params, *model.parameters())}.values())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.grad_params]
        # (module, name) rather than the tensor: a forward may rebind a buffer instead of writing it
        self.buffers = [
            (mod, name, buf.detach().clone())
            for mod in model.modules()
            for name, buf in mod._buffers.items()
            if buf is not None
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in zip(self.params, self.values):
            p.copy_(v)
        for p, g in zip(self.grad_params, self.grads):
            if g is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == g.shape and p.grad.dtype == g.dtype:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        for mod, name, saved in self.buffers:
            cur = mod._buffers.get(name)
            if cur is not None and cur.shape == saved.shape and cur.dtype == saved.dtype:
                cur.copy_(saved)
            else:
                mod._buffers[name] = saved.clone()


@torch.no_grad()
def write_lookahead(params: Sequence[Tensor], values: Sequence[Tensor], deltas: Sequence[Tensor]) -> None:
    """θ' = θ + Δ in place: formed in Δ's dtype, rounded once to the parameter's."""
    for p, v, d in zip(params, values, deltas):
        if d.dtype == p.dtype:
            p.add_(d)  # p still holds v: same rounding, no temporary
        else:
            p.copy_((v.to(d.dtype) + d).to(p.dtype))


@contextlib.contextmanager
def lookahead(model: nn.Module, params: Sequence[Tensor], deltas: Sequence[Tensor]) -> Iterator[ModelSnapshot]:
    """Within the block the model's ``params`` hold θ' = θ + Δ (in place); on exit θ, buffers,
    gradients are restored exactly. ``deltas[i]`` has ``params[i]``'s shape (any float dtype: the
    sum is formed in the delta's dtype and rounded once to the parameter's)."""
    snap = ModelSnapshot(model, params)
    try:
        write_lookahead(params, snap.values, deltas)
        yield snap
    finally:
        snap.restore()


"""The public functions of the preconditioner op: validate, pick a backend, run its family.

The backends, their op families, fake kernels and autograd are in ``backends.py`` and
``library.py``; the op contract is in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._args import check_bool
from . import _validate, reference
from .backends import check_name, resolve
from .library import OpFamily, grouped_backward_lists, public_slots, saved_mask

META_GRADIENT_MASK = (False, True, True, True)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; raises ValueError if it cannot run there."""
    return resolve(backend, device).name


def _needs_graph(tensors) -> bool:
    """Whether autograd must record the call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _below_autograd(fn, *args):
    """fn(*args) below the autograd layer, for a call with no graph to record: the registered
    autograd's wrapper costs as much as a small layer's GEMMs. Under torch.compile: as it is."""
    if torch.compiler.is_compiling():
        return fn(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return fn(*args)


def _under_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, …) is active. torch.library's autograd
    of the registered ops does not support those transforms; the reference formulas, plain torch
    ops, do, so the public functions run them there."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _differentiable_if_recorded(family: OpFamily, tensors) -> OpFamily:
    """``family``, or the reference formulas for a backward call autograd must record (an input
    requires grad) or a torch.func transform differentiates: the fused backward ops have no
    derivative of their own."""
    return reference.FAMILY if _under_transform() or _needs_graph(tensors) else family


def _checked_call(family: OpFamily, check, call):
    """``call()`` under the input rules. A family whose registered op applies them itself (with
    ``check``'s messages) is not checked twice; ``check`` still runs when the dispatcher refuses a
    call (an argument of the wrong type for the schema, a sparse tensor), to name the argument."""
    if not family.checks_inputs:
        check()
    try:
        return call()
    except (RuntimeError, NotImplementedError):
        check()
        raise


def _single_family(backend: str, grad: Tensor) -> OpFamily:
    """The family for a single-op call; an empty input runs on the reference (nothing to launch)."""
    return reference.FAMILY if grad.numel() == 0 else resolve(backend, grad.device).family


def precondition(
    grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor], *, backend: str = "auto"
) -> Tensor:
    """Y = A · (S ⊙ (Aᵀ · grad · B)) · Bᵀ, differentiable in all four inputs.

    Shapes: grad (m, n), A (m, m), S (m, n), B (n, n), or all with a leading batch L. A or B None
    is an identity factor: its GEMMs are skipped, no matrix is formed.
    dtypes float32/float64/float16/bfloat16 (one for all); half precision accumulates in fp32.
    """
    check_name(backend)

    def check():
        _validate.check_layer(grad, A, S, B)
        _validate.check_result_fits([grad])

    if not isinstance(grad, Tensor):
        check()  # names the argument
    transformed = _under_transform()
    family = reference.FAMILY if transformed else _single_family(backend, grad)

    def call():
        if transformed or _needs_graph((grad, A, S, B)):
            return family.forward(grad, A, S, B)
        return _below_autograd(family.forward, grad, A, S, B)

    return _checked_call(family, check, call)


def precondition_backward(
    grad_out: Tensor,
    grad: Tensor,
    A: Optional[Tensor],
    S: Tensor,
    B: Optional[Tensor],
    *,
    output_mask: Sequence[bool] = META_GRADIENT_MASK,
    backend: str = "auto",
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d_grad, dA, dS, dB) of ⟨grad_out, precondition(grad, A, S, B)⟩; None where masked off and
    for an identity factor (A or B None).

    The default mask is the meta-gradient's: dA, dS, dB, never d_grad.
    """
    check_name(backend)

    def check():  # the input rules in their order
        _validate.check_layer(grad, A, S, B)
        _validate.check_grad_out(grad_out, grad)
        checked = _validate.check_output_mask(output_mask)
        _validate.check_result_fits([grad], checked, As=[A], Bs=[B])
        return checked

    try:
        mask = _validate.check_output_mask(output_mask)
    except (TypeError, ValueError):
        check()  # a bad layer is named before the mask
        raise
    if not isinstance(grad, Tensor):
        check()  # names the argument
    family = _differentiable_if_recorded(_single_family(backend, grad), (grad_out, grad, A, S, B))
    outs = _checked_call(family, check, lambda: family.backward(grad_out, grad, A, S, B, list(mask)))
    present = (True, A is not None, True, B is not None)
    return tuple(o if m and p else None for o, m, p in zip(outs, mask, present))


class GroupedAutograd(torch.autograd.Function):
    """Autograd of the grouped op for calls whose factor lists hold None (identity).

    torch.library's autograd treats a tensor list holding a None as one opaque argument, so the
    tensors in it would get no gradient; here every tensor is a separate input. Same backward as
    the registered autograd (library.py): it saves only what the needed gradients read.
    """

    @staticmethod
    def forward(family, layout, *tensors):
        return tuple(family.grouped(*_unflatten(layout, tensors)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, layout, *tensors = inputs
        lists = _unflatten(layout, tensors)
        needs = tuple(any(t is not None and t.requires_grad for t in ts) for ts in lists)
        keep = saved_mask(needs)
        ctx.family, ctx.layout = family, layout
        ctx.needs, ctx.kept, ctx.num_layers = needs, keep, len(lists[0])
        ctx.save_for_backward(*[t for ts, k in zip(lists, keep) if k for t in ts])

    @staticmethod
    def backward(ctx, *grad_outs):
        n = ctx.num_layers
        saved = iter(ctx.saved_tensors)
        lists = [[next(saved) for _ in range(n)] if k else None for k in ctx.kept]
        outs = grouped_backward_lists(ctx.family, grad_outs, lists, ctx.needs)
        flat = [g for out in outs for g in (out if out is not None else [None] * n)]
        # one gradient per input tensor: drop the slots of the None entries (not inputs)
        return (None, None, *[g for g, present in zip(flat, ctx.layout) if present])


def _flatten(lists) -> tuple[tuple[bool, ...], list[Tensor]]:
    """The tensors of the four lists in order, and which slots hold one (None: identity)."""
    layout = tuple(t is not None for ts in lists for t in ts)
    return layout, [t for ts in lists for t in ts if t is not None]


def _unflatten(layout, tensors) -> list[list[Optional[Tensor]]]:
    n = len(layout) // 4
    it = iter(tensors)
    slots = [next(it) if present else None for present in layout]
    return [slots[k * n : (k + 1) * n] for k in range(4)]


def precondition_grouped(
    grads: Sequence[Tensor], As: Sequence[Optional[Tensor]], Ss: Sequence[Tensor],
    Bs: Sequence[Optional[Tensor]], *, backend: str = "auto",
) -> list[Tensor]:
    """``precondition`` over layers of different shapes in one call; differentiable.

    Each layer is 2-D: grads[i] (m_i, n_i), As[i] (m_i, m_i) or None, Ss[i] (m_i, n_i),
    Bs[i] (n_i, n_i) or None (None: identity factor, per layer).
    """
    check_name(backend)

    def check():
        _validate.check_group(grads, As, Ss, Bs)
        _validate.check_result_fits(grads)

    _validate.check_group(grads, As, Ss, Bs, layers=False)
    if len(grads) == 0:
        return []
    if not isinstance(grads[0], Tensor):
        check()  # names the argument
    transformed = _under_transform()
    family = reference.FAMILY if transformed else resolve(backend, grads[0].device).family
    lists = (list(grads), list(As), list(Ss), list(Bs))

    def call():
        if transformed:  # plain torch ops, None factors included
            return list(family.grouped(*lists))
        if not _needs_graph([t for ts in lists for t in ts]):
            return list(_below_autograd(family.grouped, *lists))
        if any(a is None for a in lists[1]) or any(b is None for b in lists[3]):
            layout, tensors = _flatten(lists)
            return list(GroupedAutograd.apply(family, layout, *tensors))
        return list(family.grouped(*lists))

    return _checked_call(family, check, call)


def precondition_grouped_backward(
    grad_outs: Sequence[Tensor],
    grads: Sequence[Tensor],
    As: Sequence[Optional[Tensor]],
    Ss: Sequence[Tensor],
    Bs: Sequence[Optional[Tensor]],
    *,
    output_mask: Sequence[bool] = META_GRADIENT_MASK,
    backend: str = "auto",
) -> tuple[list, list, list, list]:
    """Per-layer (d_grads, dAs, dSs, dBs) of the grouped op; an empty list where masked off, None
    in the slot of an identity factor."""
    check_name(backend)

    def check():  # the input rules in their order
        _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs)
        checked = _validate.check_output_mask(output_mask)
        _validate.check_result_fits(grads, checked, As=As, Bs=Bs)
        return checked

    _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs, layers=False)
    try:
        mask = _validate.check_output_mask(output_mask)
    except (TypeError, ValueError):
        check()  # a bad layer is named before the mask
        raise
    if len(grads) == 0:
        return ([], [], [], [])
    if not isinstance(grads[0], Tensor):
        check()  # names the argument
    family = _differentiable_if_recorded(resolve(backend, grads[0].device).family,
                                         (*grad_outs, *grads, *As, *Ss, *Bs))
    outs = _checked_call(family, check, lambda: family.grouped_backward(
        list(grad_outs), list(grads), list(As), list(Ss), list(Bs), list(mask)))
    return tuple(public_slots(out, k, As, Bs) if need else [] for k, (out, need) in enumerate(zip(outs, mask)))


def precondition_momentum_grouped(
    grads: Sequence[Tensor], momenta: Sequence[Tensor], momentum: float, As: Sequence[Optional[Tensor]],
    Ss: Sequence[Tensor], Bs: Sequence[Optional[Tensor]], *, vs: Sequence[Tensor], out: Sequence[Tensor],
    carry: bool = False, bias_grads: Optional[Sequence[Optional[Tensor]]] = None, backend: str = "auto",
) -> Tensor:
    """A momentum optimizer's preconditioned step direction, per layer, in one call (no autograd):

        vs[i] = momentum · momenta[i] + grads[i]       (torch.optim.SGD's buf.mul_(μ).add_(g), bit for bit)
        out[i] = precondition(vs[i], As[i], Ss[i], Bs[i])

    ``carry=True``: out[i] holds on entry the direction of momenta[i] at these factors (the previous
    call's out), and becomes

        out[i] = momentum · out[i] + precondition(grads[i], As[i], Ss[i], Bs[i])

    the same direction in exact arithmetic (the op is linear in its first argument), rounded
    differently. The CPU kernel then forms Y(grads[i]) only on the nonzero rows of a layer whose A is
    None: an embedding's step costs elementwise passes plus GEMMs on the rows the batch touched.

    ``bias_grads``: per layer None or a bias gradient (m,), the last column of the layer's gradient
    matrix, whose other columns are grads[i] (m, n − 1): the layer's G is [grads[i] | bias_grads[i]]
    (a linear or conv layer's weight and bias gradients as they are, no concatenation). The CPU
    kernel reads both where it forms v.

    Layers as in ``precondition_grouped``; momenta, vs and out have the shape of the layer's matrix
    G and grads[i]'s dtype and device, and vs and out share no memory with any argument. Returns a bool tensor of shape (2,) on
    the inputs' device: (every v finite, every out finite); on a GPU nothing waits until it is read.
    The CPU kernel forms each block of rows' v and Y while they are in cache; other backends compose
    the elementwise ops and their grouped op.
    """
    check_name(backend)
    args = (grads, momenta, momentum, As, Ss, Bs, vs, out)
    check_bool("carry", carry)
    _validate.check_group(grads, As, Ss, Bs, layers=False)
    _validate.check_momentum(momentum)  # the schema's float would take a bool
    if bias_grads is not None and (isinstance(bias_grads, Tensor) or not isinstance(bias_grads, Sequence)):
        raise TypeError(f"bias_grads must be a list or tuple of tensors or None, got {type(bias_grads).__name__}")
    bias_grads = None if bias_grads is None or all(b is None for b in bias_grads) else list(bias_grads)
    if len(grads) == 0 or not isinstance(grads[0], Tensor):
        _validate.check_momentum_group(*args, bias_grads=bias_grads)
        if len(grads) == 0:
            return torch.ones(2, dtype=torch.bool)
    family = resolve(backend, grads[0].device).family
    if family.momentum_grouped is None:  # composed here: the rules are checked here
        _validate.check_momentum_group(*args, bias_grads=bias_grads)
        lists = (list(grads), list(momenta), float(momentum), list(As), list(Ss), list(Bs), list(vs), list(out))
        return _momentum_grouped_composite(family, *lists, carry=carry, bias_grads=bias_grads)
    try:  # the registered op checks every argument itself, with the same messages
        return family.momentum_grouped(list(grads), list(momenta), momentum, list(As), list(Ss), list(Bs),
                                       list(vs), list(out), carry, bias_grads)
    except (RuntimeError, NotImplementedError):
        # refused by the dispatcher: the Python rules name the argument
        _validate.check_momentum_group(*args, bias_grads=bias_grads)
        raise


def _momentum_grouped_composite(family: OpFamily, grads, momenta, momentum, As, Ss, Bs, vs, out, *, carry: bool,
                                bias_grads=None):
    """The momentum step from a family's grouped op (a family without a fused one)."""
    with torch.no_grad():
        if bias_grads is not None:  # each layer's whole matrix G (torch.cat: a copy)
            grads = [g if b is None else torch.cat([g, b.unsqueeze(1)], dim=1) for g, b in zip(grads, bias_grads)]
        for v, m, g in zip(vs, momenta, grads):
            torch.mul(m, momentum, out=v)
            v.add_(g)
        Ys = family.grouped(grads if carry else vs, As, Ss, Bs)
        if carry:
            for o, y in zip(out, Ys):
                o.mul_(momentum).add_(y)
        else:
            torch._foreach_copy_(out, Ys)
        return torch.stack([torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts in (vs, out)])

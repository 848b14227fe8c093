"""An op family and the torch.library registrations every family of registered ops shares.

A family is the op's four functions (forward, backward, grouped, grouped_backward) with the
signatures of the registered ``apo::precondition*`` ops. :func:`library_family` gives a family
defined as torch.library ops its fake kernels and its autograd, from the op contract
(docs/ARCHITECTURE.md), so that every family has the same ones.

Autograd saves only what its backward reads for the inputs that need a gradient:

    needs  d_grad → A, S, B      dA, dB → grad, A, S, B      dS → grad, A, B

An input the backward does not read is passed to the backward op as a placeholder of the same
shape (``grad_out``): the op computes only the outputs its mask asks for, which never read it.
A double backward (``create_graph=True``) runs the reference formulas instead (``for_backward``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _validate


@dataclass(frozen=True)
class OpFamily:
    """The four ops of a backend, with the signatures of the registered ops:

    forward(grad, A, S, B) -> Tensor
    backward(grad_out, grad, A, S, B, output_mask) -> (d_grad, dA, dS, dB)
    grouped(grads, As, Ss, Bs) -> list[Tensor]
    grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask) -> four lists

    ``A``/``B`` (entries of ``As``/``Bs``) may be None: an identity factor. ``output_mask`` is a
    list of 4 bools. A masked-off output, and the gradient of an identity factor, is an empty (0,)
    tensor (a masked-off list: an empty list); plain Python families may return None there.

    Optional, a fused momentum step (None: the public function composes it from ``grouped``):
    momentum_grouped(grads, momenta, momentum, As, Ss, Bs, vs, out, carry, bias_grads) -> bool Tensor (2,)

    ``checks_inputs``: the grouped op applies the input rules itself, with _validate.py's messages
    (the C++ checks of apo_checks.h, the Triton launchers), so the public grouped call does not
    apply them a second time.
    """

    forward: Callable
    backward: Callable
    grouped: Callable
    grouped_backward: Callable
    momentum_grouped: Optional[Callable] = None
    checks_inputs: bool = False


def saved_mask(needs: Sequence[bool]) -> tuple[bool, bool, bool, bool]:
    """Which of (grad, A, S, B) the backward reads, given which gradients are needed."""
    need_g, need_a, need_s, need_b = needs
    return (need_a or need_s or need_b, True, need_g or need_a or need_b, True)


def _requires_grad(t) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def for_backward(fam: OpFamily) -> OpFamily:
    """The family a backward runs: ``fam``'s fused ops, or, when autograd records the backward
    itself (``create_graph=True``: a double backward), the reference formulas, plain torch ops that
    autograd differentiates. The fused backward ops have no derivative of their own, so their
    result would be a constant to the second backward, and its derivatives silently zero."""
    if not torch.is_grad_enabled():
        return fam
    from . import reference  # (reference.py builds its family from this module)
    return reference.FAMILY


def grouped_backward_lists(fam: OpFamily, grad_outs, lists, needs) -> list:
    """Run ``fam.grouped_backward`` on saved ``lists`` (unsaved ones None) for the ``needs`` mask;
    returns four lists (identity slots None) or None where not needed."""
    grads, As, Ss, Bs = lists
    likes = grads if grads is not None else Ss  # saved_mask keeps one of the two (m, n) lists
    grad_outs = [torch.zeros_like(like) if dy is None else dy.contiguous() for dy, like in zip(grad_outs, likes)]
    grads = grad_outs if grads is None else grads
    Ss = grad_outs if Ss is None else Ss
    mask = [bool(n) for n in needs]
    outs = for_backward(fam).grouped_backward(grad_outs, grads, As, Ss, Bs, mask)
    return [public_slots(out, k, As, Bs) if need else None for k, (out, need) in enumerate(zip(outs, mask))]


def public_slots(out: Sequence, k: int, As: Sequence, Bs: Sequence) -> list:
    """Output ``k`` (0 d_grads, 1 dAs, 2 dSs, 3 dBs) of a grouped backward as a list with None in
    the slot of each identity factor (the registered ops put an empty tensor there)."""
    factors = As if k == 1 else Bs if k == 3 else None
    if factors is None:
        return list(out)
    return [None if f is None else o for f, o in zip(factors, out)]


def library_family(prefix: str) -> OpFamily:
    """Fake kernels and autograd for the ops ``{prefix}precondition``, ``…_backward``, ``…_grouped``
    and ``…_grouped_backward`` (``prefix`` e.g. ``"apo::"`` or ``"apo::triton_"``); returns their family.
    """
    namespace, _, stem = prefix.partition("::")
    packet = getattr(torch.ops, namespace)
    name = f"{prefix}precondition"
    fam = OpFamily(
        forward=getattr(packet, f"{stem}precondition").default,
        backward=getattr(packet, f"{stem}precondition_backward").default,
        grouped=getattr(packet, f"{stem}precondition_grouped").default,
        grouped_backward=getattr(packet, f"{stem}precondition_grouped_backward").default,
        momentum_grouped=(getattr(packet, f"{stem}precondition_momentum_grouped").default
                          if hasattr(packet, f"{stem}precondition_momentum_grouped") else None),
        checks_inputs=True,  # every registered op checks its inputs (C++ kernels, launchers, fakes)
    )

    # The fake kernels check the inputs like every real kernel does: they also serve as the Meta
    # kernels, which win dispatch whenever one input is a meta tensor (a meta tensor mixed with CPU
    # ones must be refused, not answered with an uninitialized CPU tensor), and under
    # torch.compile the symbolic shape rules (torch._check) fail at trace time.
    def fake_forward(grad, A, S, B):
        _validate.check_layer(grad, A, S, B)
        _validate.check_result_fits([grad])
        return grad.new_empty(grad.shape)

    def fake_backward(grad_out, grad, A, S, B, output_mask):
        _validate.check_layer(grad, A, S, B)
        _validate.check_grad_out(grad_out, grad)
        mask = _validate.check_output_mask(output_mask)
        _validate.check_result_fits([grad], mask, As=[A], Bs=[B])
        inputs = (grad, A, S, B)
        return tuple(grad.new_empty(t.shape if m and t is not None else (0,)) for t, m in zip(inputs, mask))

    def fake_grouped(grads, As, Ss, Bs):
        _validate.check_group(grads, As, Ss, Bs, fast=False)
        _validate.check_result_fits(grads)
        return [g.new_empty(g.shape) for g in grads]

    def fake_grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask):
        _validate.check_group(grads, As, Ss, Bs, grad_outs=grad_outs, fast=False)
        mask = _validate.check_output_mask(output_mask)
        _validate.check_result_fits(grads, mask, As=As, Bs=Bs)
        lists = (grads, As, Ss, Bs)
        return tuple(
            [g.new_empty((0,) if t is None else t.shape) for g, t in zip(grads, ts)] if m else []
            for ts, m in zip(lists, mask)
        )

    def fake_momentum_grouped(grads, momenta, momentum, As, Ss, Bs, vs, out, carry=False, bias_grads=None):
        _validate.check_momentum_group(grads, momenta, momentum, As, Ss, Bs, vs, out, bias_grads=bias_grads,
                                       fake=True)
        return grads[0].new_empty((2,), dtype=torch.bool) if grads else torch.empty(2, dtype=torch.bool)

    if fam.momentum_grouped is not None:
        torch.library.register_fake(f"{name}_momentum_grouped")(fake_momentum_grouped)
    torch.library.register_fake(name)(fake_forward)
    torch.library.register_fake(f"{name}_backward")(fake_backward)
    torch.library.register_fake(f"{name}_grouped")(fake_grouped)
    torch.library.register_fake(f"{name}_grouped_backward")(fake_grouped_backward)

    def setup_forward(ctx, inputs, output):
        ctx.needs = tuple(_requires_grad(t) for t in inputs)
        keep = saved_mask(ctx.needs)
        ctx.save_for_backward(*(t if k else None for t, k in zip(inputs, keep)))

    def backward_forward(ctx, grad_out):
        grad, A, S, B = ctx.saved_tensors
        dy = grad_out.contiguous()
        mask = list(ctx.needs)
        outs = for_backward(fam).backward(dy, dy if grad is None else grad, A, dy if S is None else S, B, mask)
        return tuple(o if m else None for o, m in zip(outs, mask))

    # torch.library treats a tensor list that holds a None (an identity factor) as one opaque
    # argument: autograd does not see the tensors in it. Those lists get no gradient here; the
    # public precondition_grouped routes such calls through GroupedAutograd (dispatch.py).
    def setup_grouped(ctx, inputs, output):
        n = len(inputs[0])
        ctx.num_layers = n
        ctx.needs = tuple(
            all(t is not None for t in ts) and any(_requires_grad(t) for t in ts) for ts in inputs
        )
        ctx.opaque = tuple(any(t is None for t in ts) for ts in inputs)
        ctx.kept = saved_mask(ctx.needs)
        ctx.save_for_backward(*[t for ts, k in zip(inputs, ctx.kept) if k for t in ts])

    def backward_grouped(ctx, grad_outs):
        n = ctx.num_layers
        saved = iter(ctx.saved_tensors)
        lists = [[next(saved) for _ in range(n)] if k else None for k in ctx.kept]
        outs = grouped_backward_lists(fam, grad_outs, lists, ctx.needs)
        return tuple(
            None if opaque else [None] * n if out is None else out for out, opaque in zip(outs, ctx.opaque)
        )

    torch.library.register_autograd(name, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(f"{name}_grouped", backward_grouped, setup_context=setup_grouped)
    return fam

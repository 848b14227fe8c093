"""The backend registry: a toy backend added through one registry entry reaches every part of the op.

The toy backends here wrap the reference (a "double-check" backend that counts its calls, and one
defined as torch.library ops that gets fake kernels and autograd from ``library_family``). Each is
registered by a fixture that restores the registry afterwards, and nothing else is edited: the
public functions, ``backends()``, ``usable()``, ``auto`` and the test parametrization see it.
"""
import collections
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor

import apo_kernels
from apo_kernels.ops import Backend, OpFamily, library_family, reference, register, registered, unregister, usable
from apo_kernels.ops.backends import get
from conftest import device_backends
from test_op import check_close, make_layer

OPS = ("forward", "backward", "grouped", "grouped_backward")


def counting_family(calls: collections.Counter) -> OpFamily:
    """The reference family, counting each call: a backend that shows where the op went."""
    def counted(op):
        def run(*args):
            calls[op] += 1
            return getattr(reference.FAMILY, op)(*args)
        return run

    return OpFamily(**{op: counted(op) for op in OPS})


@pytest.fixture
def add_backend():
    """Register backends for one test; afterwards the registry is exactly as before."""
    before = backends_snapshot()
    added = []

    def add(**fields) -> Backend:
        added.append(register(Backend(**fields)).name)
        return get(added[-1])

    yield add
    for name in added:
        unregister(name)
    assert backends_snapshot() == before


def backends_snapshot():
    return [(b.name, b.devices, b.priority, b.family, b.status()) for b in registered()]


def toy(add_backend, calls, *, priority=100, why=None, name="toy"):
    return add_backend(name=name, devices=("cpu",), priority=priority, family=counting_family(calls),
                       why_unavailable=lambda: why, note="double-checks the reference")


def test_registered_backend_is_listed_and_reported(add_backend):
    toy(add_backend, collections.Counter())
    assert apo_kernels.backends()["toy"] == "available (double-checks the reference)"
    assert registered()[0].name == "toy"  # highest priority first
    assert usable("cpu")[0] == "toy" and "toy" not in usable("cuda")
    assert "toy" in [p.id for p in device_backends("cpu")]


def test_named_and_auto_route_to_it(add_backend, monkeypatch):
    calls = collections.Counter()
    toy(add_backend, calls, priority=100)  # above cpu (10): auto picks it for CPU tensors
    G, A, S, B = make_layer(6, 4, torch.float32)
    dY = torch.randn(6, 4)
    f64 = [t.double() for t in (dY, G, A, S, B)]
    for backend in ("toy", "auto"):
        check_close(apo_kernels.precondition(G, A, S, B, backend=backend), reference.precondition(*f64[1:]), torch.float32)
        outs = apo_kernels.precondition_backward(dY, G, A, S, B, backend=backend)
        assert outs[0] is None
        for out, ref in zip(outs[1:], reference.precondition_backward(*f64)[1:]):
            check_close(out, ref, torch.float32)
        assert apo_kernels.precondition_grouped([G], [None], [S], [B], backend=backend)[0].shape == G.shape
        assert apo_kernels.precondition_grouped_backward([dY], [G], [A], [S], [None], backend=backend)[3] == [None]
    assert calls == {op: 2 for op in OPS}
    assert apo_kernels.ops.resolve_backend("auto", G.device) == "toy"
    monkeypatch.setenv("APO_KERNELS_BACKEND", "toy")
    assert apo_kernels.ops.resolve_backend("auto", G.device) == "toy"


def test_auto_reads_priorities(add_backend):
    low, high = collections.Counter(), collections.Counter()
    toy(add_backend, low, priority=5, name="toy-low")  # below cpu: auto keeps cpu
    G, A, S, B = make_layer(3, 4, torch.float32)
    assert apo_kernels.ops.resolve_backend("auto", G.device) == ("cpu" if get("cpu").is_available() else "toy-low")
    toy(add_backend, high, priority=50, name="toy-high")
    apo_kernels.precondition(G, A, S, B)
    assert high["forward"] == 1 and low["forward"] == 0


def test_unavailable_backend_is_skipped_by_auto_and_says_why(add_backend):
    calls = collections.Counter()
    toy(add_backend, calls, priority=100, why="the toy is switched off")
    assert apo_kernels.backends()["toy"] == "unavailable: the toy is switched off"
    assert "toy" not in usable("cpu")
    G, A, S, B = make_layer(3, 4, torch.float32)
    apo_kernels.precondition(G, A, S, B)
    with pytest.raises(ValueError, match="backend='toy' is unavailable: the toy is switched off"):
        apo_kernels.precondition(G, A, S, B, backend="toy")
    assert not calls
    skipped = [p for p in device_backends("cpu") if p.id == "toy"]
    assert skipped and "the toy is switched off" in skipped[0].marks[0].kwargs["reason"]


def test_input_rules_apply_before_the_family_runs(add_backend):
    calls = collections.Counter()
    toy(add_backend, calls)
    G, A, S, B = make_layer(3, 4, torch.float32)
    with pytest.raises(ValueError, match="A must have shape"):
        apo_kernels.precondition(G, A[:2], S, B, backend="toy")
    with pytest.raises(TypeError, match="B has dtype"):
        apo_kernels.precondition(G, A, S, B.double(), backend="toy")
    with pytest.raises(ValueError, match="layer 1: S must have shape"):
        apo_kernels.precondition_grouped([G, G], [A, None], [S, S[:, :2]], [B, B], backend="toy")
    with pytest.raises(ValueError, match="runs on cpu tensors here, but the inputs are on meta"):
        apo_kernels.precondition(*(t.to("meta") for t in (G, A, S, B)), backend="toy")
    assert not calls


def test_registry_refuses_bad_entries(add_backend):
    toy(add_backend, collections.Counter())
    with pytest.raises(ValueError, match="already registered"):
        toy(add_backend, collections.Counter())
    fields = dict(name="x", devices=("cpu",), priority=1, family=reference.FAMILY, why_unavailable=lambda: None)
    for bad, error, match in (
        (dict(name="auto"), ValueError, "Backend.name"),
        (dict(devices="cpu"), TypeError, "Backend.devices"),
        (dict(priority=1.5), TypeError, "Backend.priority"),
        (dict(family=reference.precondition), TypeError, "Backend.family"),
        (dict(why_unavailable="no"), TypeError, "Backend.why_unavailable"),
    ):
        with pytest.raises(error, match=match):
            Backend(**{**fields, **bad})
    with pytest.raises(TypeError, match="must be a Backend"):
        register("toy")
    with pytest.raises(ValueError, match="backend must be one of"):
        unregister("no such backend")


# ---------------------------------------------------------------------------------------------
# A toy backend defined as torch.library ops: library_family gives it the contract's fake kernels
# and autograd (the ops are defined once per process; the registry entry is per test)
# ---------------------------------------------------------------------------------------------
def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("apo_toy::precondition", mutates_args=())
def _toy_precondition(grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor]) -> Tensor:
    return reference.FAMILY.forward(grad, A, S, B).contiguous()


@torch.library.custom_op("apo_toy::precondition_backward", mutates_args=())
def _toy_precondition_backward(
    grad_out: Tensor, grad: Tensor, A: Optional[Tensor], S: Tensor, B: Optional[Tensor], output_mask: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outs = reference.FAMILY.backward(grad_out, grad, A, S, B, output_mask)
    return tuple(_empty_if_none(o, grad).contiguous() for o in outs)


@torch.library.custom_op("apo_toy::precondition_grouped", mutates_args=())
def _toy_precondition_grouped(
    grads: list[Tensor], As: list[Optional[Tensor]], Ss: list[Tensor], Bs: list[Optional[Tensor]]
) -> list[Tensor]:
    return [y.contiguous() for y in reference.FAMILY.grouped(grads, As, Ss, Bs)]


@torch.library.custom_op("apo_toy::precondition_grouped_backward", mutates_args=())
def _toy_precondition_grouped_backward(
    grad_outs: list[Tensor], grads: list[Tensor], As: list[Optional[Tensor]], Ss: list[Tensor],
    Bs: list[Optional[Tensor]], output_mask: Sequence[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    outs = reference.FAMILY.grouped_backward(grad_outs, grads, As, Ss, Bs, output_mask)
    return tuple([_empty_if_none(o, g).contiguous() for o, g in zip(out, grads)] for out in outs)


TOY_LIBRARY_FAMILY = library_family("apo_toy::")


def test_library_toy_gets_fake_kernels_and_autograd(add_backend):
    add_backend(name="toy-lib", devices=("cpu",), priority=-1, family=TOY_LIBRARY_FAMILY, why_unavailable=lambda: None)
    G, A, S, B = make_layer(5, 3, torch.float32, requires_grad=True)
    # autograd from the contract, through the public function
    apo_kernels.precondition(G, None, S, B, backend="toy-lib").sum().backward()
    refs = reference.precondition_backward(torch.ones(5, 3, dtype=torch.float64), G.detach().double(), None,
                                           S.detach().double(), B.detach().double())
    for t, ref in zip((G, S, B), (refs[0], refs[2], refs[3])):
        check_close(t.grad, ref, torch.float32)
    # the fake kernels: shape propagation on meta tensors, and the input rules
    meta = [t.detach().to("meta") for t in (G, A, S, B)]
    assert torch.ops.apo_toy.precondition(*meta).shape == (5, 3)
    with pytest.raises(ValueError, match="A must have shape"):
        torch.ops.apo_toy.precondition(meta[0], meta[1][:2], meta[2], meta[3])
    detached = [t.detach() for t in (G, A, S, B)]
    torch.library.opcheck(torch.ops.apo_toy.precondition, tuple(detached))
    torch.library.opcheck(torch.ops.apo_toy.precondition_backward, (torch.randn(5, 3), *detached, [True] * 4))
    # torch.compile traces the public function on it
    compiled = torch.compile(lambda *t: apo_kernels.precondition(*t, backend="toy-lib"), fullgraph=True, backend="eager")
    check_close(compiled(*detached), reference.precondition(*(t.double() for t in detached)), torch.float32)


def test_meta_tensors_run_on_the_reference_and_give_the_shapes():
    # deferred initialization and shape inference: every public function answers meta tensors with
    # meta tensors of the right shapes, identity factors included; mixed with CPU tensors, refused
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    assert apo_kernels.ops.resolve_backend("auto", torch.device("meta")) == "reference"
    y = apo_kernels.precondition(meta(7, 5), meta(7, 7), meta(7, 5), None)
    assert y.device.type == "meta" and y.shape == (7, 5)
    ys = apo_kernels.precondition_grouped([meta(7, 5), meta(2, 3)], [None, meta(2, 2)], [meta(7, 5), meta(2, 3)],
                                          [meta(5, 5), None])
    assert [t.shape for t in ys] == [(7, 5), (2, 3)]
    d = apo_kernels.precondition_backward(meta(7, 5), meta(7, 5), meta(7, 7), meta(7, 5), meta(5, 5))
    assert d[0] is None and [t.shape for t in d[1:]] == [(7, 7), (7, 5), (5, 5)]
    with pytest.raises(ValueError, match="A is on cpu but grad is on meta"):
        apo_kernels.precondition(meta(7, 5), torch.randn(7, 7), meta(7, 5), None)
    with pytest.raises(ValueError, match="backend='cpu' runs on cpu tensors here, but the inputs are on meta"):
        apo_kernels.precondition(meta(7, 5), None, meta(7, 5), None, backend="cpu")

"""Every input rule of the preconditioner op, in one place.

Rules are checked before any kernel runs and raise ``TypeError`` (wrong kind of object or dtype)
or ``ValueError`` (shape, device, size or consistency), always naming the argument. The same
functions guard the public API, the Triton ops and the fake (meta) kernels of every registered
op; the C++ kernels apply the same rules with the same messages (csrc/apo_checks.h).

Shape rules go through :func:`_require`, which takes a plain bool or, while ``torch.compile``
traces with symbolic shapes, a SymBool (``torch._check_with``): a shape error is then reported at
trace time, and a shape that is only known at run time becomes a runtime assert.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NOT_GIVEN = object()


def _require(cond, error: type, message) -> None:
    """Raise ``error(message())`` unless ``cond``.

    A SymBool (a fake kernel running on symbolic shapes) goes to ``torch._check_with``; while
    Dynamo traces this code itself (the public API inside a compiled function), a plain ``if``
    becomes a shape guard, as Dynamo cannot trace the message closure of ``torch._check_with``.
    """
    if type(cond) is bool or torch.compiler.is_compiling():
        if not cond:
            raise error(message())
        return
    torch._check_with(error, cond, message)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, float64, float16, bfloat16"
        )


def check_layer(grad, A, S, B, *, prefix: str = "", grad_name: str = "grad") -> None:
    """Check one (possibly batched) layer: grad (…, m, n), A (…, m, m), S (…, m, n), B (…, n, n).

    A or B None is an identity factor. ``prefix`` is prepended to argument names (e.g.
    ``"layer 3: "`` for the grouped op).
    """
    given = [(name, t) for name, t in zip((grad_name, "A", "S", "B"), (grad, A, S, B))
             if t is not None or name not in ("A", "B")]
    for name, t in given:
        _check_tensor(prefix + name, t)
    if grad.ndim not in (2, 3):
        raise ValueError(
            f"{prefix}{grad_name} must be 2-D (m, n) or 3-D (L, m, n), got shape {_shape(grad)}"
        )
    factors = given[1:]
    for name, t in factors:
        if t.ndim != grad.ndim:
            raise ValueError(
                f"{prefix}{name} must have {grad.ndim} dims like {grad_name}, got shape {_shape(t)}"
            )
        if t.dtype != grad.dtype:
            raise TypeError(f"{prefix}{name} has dtype {t.dtype} but {grad_name} has {grad.dtype}")
        if t.device != grad.device:
            raise ValueError(f"{prefix}{name} is on {t.device} but {grad_name} is on {grad.device}")
    *batch, m, n = grad.shape
    expected = {"A": (*batch, m, m), "S": (*batch, m, n), "B": (*batch, n, n)}
    for name, t in factors:
        want = expected[name]
        for dim, (got_d, want_d) in enumerate(zip(t.shape, want)):
            what = "batch size" if batch and dim == 0 else "shape"
            _require(
                got_d == want_d, ValueError,
                lambda name=name, t=t, want=want, what=what: (
                    f"{prefix}{name} must have shape {want} for {grad_name} of shape "
                    f"{_shape(grad)} (mismatched {what}), got {_shape(t)}"
                ),
            )


def check_like_grad(t, grad, name: str, *, prefix: str = "") -> None:
    """``t`` must be like grad: its shape, dtype and device (grad_out; the momentum step's momenta,
    vs and out)."""
    _check_tensor(prefix + name, t)
    message = lambda: f"{prefix}{name} must have the shape of grad {_shape(grad)}, got {_shape(t)}"  # noqa: E731
    _require(t.ndim == grad.ndim, ValueError, message)
    for got_d, want_d in zip(t.shape, grad.shape):
        _require(got_d == want_d, ValueError, message)
    if t.dtype != grad.dtype:
        raise TypeError(f"{prefix}{name} has dtype {t.dtype} but grad has {grad.dtype}")
    if t.device != grad.device:
        raise ValueError(f"{prefix}{name} is on {t.device} but grad is on {grad.device}")


def check_grad_out(grad_out, grad, *, prefix: str = "") -> None:
    check_like_grad(grad_out, grad, "grad_out", prefix=prefix)


def check_output_mask(output_mask) -> tuple[bool, bool, bool, bool]:
    if not isinstance(output_mask, (tuple, list)) or len(output_mask) != 4:
        raise ValueError(
            "output_mask must be a sequence of 4 bools (grad, A, S, B), got " f"{output_mask!r}"
        )
    if not all(isinstance(b, bool) for b in output_mask):
        raise TypeError(f"output_mask must hold bools, got {output_mask!r}")
    return tuple(output_mask)


def check_group(grads, As, Ss, Bs, *, grad_outs=_NOT_GIVEN, fast: bool = True, layers: bool = True) -> None:
    """Check the grouped op's lists: equal lengths, 2-D layers, one dtype and device for all;
    an entry of ``As`` or ``Bs`` may be None (identity factor).

    ``fast=False`` skips the fast path (fake kernels: it would specialize symbolic shapes).
    ``layers=False`` checks the lists only (a caller whose op checks every layer itself).
    """
    lists = {"grads": grads, "As": As, "Ss": Ss, "Bs": Bs}
    if grad_outs is not _NOT_GIVEN:
        lists["grad_outs"] = grad_outs
    for name, seq in lists.items():
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"grads, As, Ss, Bs must have the same length, got {lengths}")
    if not layers or (fast and grad_outs is _NOT_GIVEN and _group_ok(grads, As, Ss, Bs)):
        return
    for i, (g, a, s, b) in enumerate(zip(grads, As, Ss, Bs)):
        prefix = f"layer {i}: "
        check_layer(g, a, s, b, prefix=prefix)
        if g.ndim != 2:
            raise ValueError(f"{prefix}grouped layers must be 2-D (m, n), got shape {_shape(g)}")
        if g.dtype != grads[0].dtype:
            raise TypeError(f"{prefix}dtype {g.dtype} differs from layer 0's {grads[0].dtype}")
        if g.device != grads[0].device:
            raise ValueError(f"{prefix}device {g.device} differs from layer 0's {grads[0].device}")
        if grad_outs is not _NOT_GIVEN:
            check_grad_out(grad_outs[i], g, prefix=prefix)


def _layer_grads(grads, bias_grads, momenta) -> list:
    """Each layer's gradient matrix as the rules below read it (apo_checks.h's layer_grads, same
    messages): grads[i], or, for a layer with a bias gradient, its momenta, once checked against
    grads[i] (m, n − 1) and bias_grads[i] (m,) as the matrix [grad | bias_grad] (m, n)."""
    if bias_grads is None:
        return grads
    for name, seq in (("bias_grads", bias_grads), ("momenta", momenta)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
        if len(seq) != len(grads):
            raise ValueError(f"{name} must have one {'entry' if name == 'bias_grads' else 'tensor'} per layer "
                             f"({len(grads)}), got {len(seq)}")
    layers = list(grads)
    for i, (g, gb, m) in enumerate(zip(grads, bias_grads, momenta)):
        if gb is None:
            continue
        prefix = f"layer {i}: "
        _check_tensor(prefix + "grad", g)
        _check_tensor(prefix + "bias_grad", gb)
        if g.ndim != 2:
            raise ValueError(f"{prefix}grad with a bias_grad must be 2-D (m, n - 1), got shape {_shape(g)}")
        rows, cols = g.shape[0], g.shape[1] + 1
        _require(gb.ndim == 1 and gb.shape[0] == rows, ValueError, lambda: (
            f"{prefix}bias_grad must have shape (m,), one value per row of grad ({rows}), got shape {_shape(gb)}"))
        if gb.dtype != g.dtype:
            raise TypeError(f"{prefix}bias_grad has dtype {gb.dtype} but grad has {g.dtype}")
        if gb.device != g.device:
            raise ValueError(f"{prefix}bias_grad is on {gb.device} but grad is on {g.device}")
        _check_tensor(prefix + "momenta", m)
        _require(m.ndim == 2 and m.shape[0] == rows and m.shape[1] == cols, ValueError, lambda: (
            f"{prefix}momenta must have the shape of the matrix [grad | bias_grad] ({rows}, {cols}), "
            f"got shape {_shape(m)}"))
        if m.dtype != g.dtype:
            raise TypeError(f"{prefix}momenta has dtype {m.dtype} but grad has {g.dtype}")
        if m.device != g.device:
            raise ValueError(f"{prefix}momenta is on {m.device} but grad is on {g.device}")
        layers[i] = m
    return layers


def check_momentum_group(grads, momenta, momentum, As, Ss, Bs, vs, out, *, bias_grads=None,
                         fake: bool = False) -> None:
    """The momentum step's arguments (apo_checks.h's check_momentum_group, same messages): the
    grouped op's lists; momenta, vs, out one per layer, like grads[i] (like the matrix [grads[i] |
    bias_grads[i]] where a layer has a bias gradient); a finite momentum; vs and out written, so
    sharing no element with any argument or each other. ``fake``: the fake kernel's check (no fast
    path; fake tensors have no addresses to compare)."""
    given_grads = grads
    if isinstance(grads, Sequence) and not isinstance(grads, torch.Tensor):
        grads = _layer_grads(grads, bias_grads, momenta)
    check_group(grads, As, Ss, Bs, fast=not fake)
    likes = {"momenta": momenta, "vs": vs, "out": out}
    for name, seq in likes.items():
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
        if len(seq) != len(grads):
            raise ValueError(f"{name} must have one tensor per layer ({len(grads)}), got {len(seq)}")
    check_momentum(momentum)
    for i, g in enumerate(grads):
        for name, seq in likes.items():
            check_like_grad(seq[i], g, name, prefix=f"layer {i}: ")
        for name in ("vs", "out"):
            if torch._debug_has_internal_overlap(likes[name][i]) == 1:
                raise ValueError(f"layer {i}: {name} has elements that share memory (an expanded tensor); "
                                 "it is written")
    if not fake:
        _check_written_apart([("grads", given_grads), ("bias_grads", list(bias_grads or [])), ("momenta", momenta),
                              ("As", As), ("Ss", Ss), ("Bs", Bs), ("vs", vs), ("out", out)], first_written=6)


def check_momentum(momentum) -> None:
    """The momentum step's μ: a finite Python number (not a bool)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number, got {type(momentum).__name__}")
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be a finite number, got {momentum}")


def check_kron(grad, L, R, out, *, fake: bool = False) -> None:
    """apo::kron_precondition's arguments (apo_checks.h's check_kron, same messages): grad 2-D (m, n);
    L (m, m) or None, R (n, n) or None (an identity side) and out like grad, of its dtype and device;
    out written, so sharing no element with grad, L or R. ``fake``: the fake kernel's check (fake
    tensors have no addresses)."""
    _check_tensor("grad", grad)
    if grad.ndim != 2:
        raise ValueError(f"grad must be 2-D (m, n), got shape {_shape(grad)}")
    m, n = grad.shape
    for name, t, rows in (("L", L, m), ("R", R, n)):
        if t is None:
            continue
        _check_tensor(name, t)
        if t.dtype != grad.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but grad has {grad.dtype}")
        if t.device != grad.device:
            raise ValueError(f"{name} is on {t.device} but grad is on {grad.device}")
        _require(t.ndim == 2 and t.shape[0] == rows and t.shape[1] == rows, ValueError,
                 lambda name=name, t=t, rows=rows: (f"{name} must have shape {(rows, rows)} for grad of shape "
                                                    f"{_shape(grad)}, got {_shape(t)}"))
    check_like_grad(out, grad, "out")
    if fake:
        return
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError("out has elements that share memory (an expanded tensor); it is written")
    for name, t in (("grad", grad), ("L", L), ("R", R)):
        if t is not None and _may_share(out, t):
            raise ValueError(f"out shares memory with {name}; the output must not overlap the inputs")


def check_kl(new_out, old_out, scale) -> None:
    """apo::kl_value_and_grad's arguments (csrc/discrepancy.cpp's check_kl, same messages): two dense
    tensors of one shape, dtype and device, at least 1-D and not empty (rows × classes), and a
    finite scale."""
    _check_tensor("new_out", new_out)
    _check_tensor("old_out", old_out)
    if old_out.shape != new_out.shape:
        raise ValueError(f"old_out must have the shape of new_out {tuple(new_out.shape)}, got {tuple(old_out.shape)}")
    if old_out.dtype != new_out.dtype:
        raise TypeError(f"old_out has dtype {old_out.dtype} but new_out has {new_out.dtype}")
    if old_out.device != new_out.device:
        raise ValueError(f"old_out is on {old_out.device} but new_out is on {new_out.device}")
    if new_out.ndim < 1 or new_out.numel() == 0:
        raise ValueError("new_out must have at least one dimension and one element (rows × classes), "
                         f"got shape {tuple(new_out.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")


def _check_written_apart(lists, first_written: int) -> None:
    """Refuse any element shared by a written tensor (the lists from ``first_written`` on) and another
    argument, naming the first such pair in argument order (apo_checks.h's check_written_apart: only
    tensors whose byte spans intersect are compared, in a sweep over the spans sorted by start)."""
    items = sorted((*_span(t), k, j) for k, (_, seq) in enumerate(lists) for j, t in enumerate(seq)
                   if t is not None and t.numel() > 0)
    first, open_ = None, []
    for lo, hi, k, j in items:
        open_ = [p for p in open_ if p[1] > lo]
        for _, _, pk, pj in open_:
            if (pk < first_written and k < first_written) or not _may_share(lists[pk][1][pj], lists[k][1][j]):
                continue
            keys = [(pk, pj, k, j), (k, j, pk, pj)]
            first = min([key for key in keys if key[0] >= first_written] + ([first] if first else []))
        open_.append((lo, hi, k, j))
    if first:
        w, i, k, j = first
        raise ValueError(f"{lists[w][0]}[{i}] shares memory with {lists[k][0]}[{j}]; the outputs must not "
                         "overlap the inputs or each other")


def _span(t) -> tuple[int, int]:
    lo = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape) if st < 0)
    hi = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape) if st > 0)
    base, size = t.data_ptr(), t.element_size()
    return base + lo * size, base + (hi + 1) * size


def _rows(t):
    """(row stride, storage offset, rows, columns) of a 2-D view whose rows are unit-stride runs no
    longer than the row stride, or None."""
    if t.ndim != 2 or (t.stride(1) != 1 and t.shape[1] > 1) or t.stride(0) < t.shape[1]:
        return None
    return max(t.stride(0), 1), t.storage_offset(), t.shape[0], t.shape[1]


def _may_share(a, b) -> bool:
    """Whether two tensors may share an element (apo_checks.h's overlap::may_share)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    ra, rb = _rows(a), _rows(b)
    if ra is None or rb is None or ra[0] != rb[0] or a.element_size() != b.element_size():
        return True
    # Same row stride ld: a's row r + k and b's row r meet where k·ld − d (d = b's offset − a's) is
    # a column difference, −columns_a < k·ld − d < columns_b, for a row shift k both row ranges allow
    # (exact wherever the views start, e.g. blocks of a matrix that does not start at a multiple of ld)
    ld, d = ra[0], rb[1] - ra[1]
    k_lo = max((d - ra[3]) // ld + 1, 1 - rb[2])
    k_hi = min(-(-(d + rb[3]) // ld) - 1, ra[2] - 1)
    return k_lo <= k_hi


def _group_ok(grads, As, Ss, Bs) -> bool:
    """Fast path of ``check_group`` (the op's hot path: one call per optimizer step over every
    layer): True when every layer is plainly valid. Any doubt returns False and the detailed
    checks run, so errors still name the argument."""
    if not grads or not isinstance(grads[0], torch.Tensor):
        return False
    dtype, device = grads[0].dtype, grads[0].device
    if dtype not in SUPPORTED_DTYPES:
        return False
    tensor, strided = torch.Tensor, torch.strided
    for g, a, s, b in zip(grads, As, Ss, Bs):
        if not (isinstance(g, tensor) and isinstance(s, tensor)) or g.ndim != 2:
            return False
        m, n = g.shape
        if s.shape != (m, n) or not (g.dtype is dtype and s.dtype is dtype):
            return False
        if not (g.device == device and s.device == device and g.layout is strided and s.layout is strided):
            return False
        if a is not None and not (
            isinstance(a, tensor) and a.shape == (m, m) and a.dtype is dtype and a.device == device
            and a.layout is strided
        ):
            return False
        if b is not None and not (
            isinstance(b, tensor) and b.shape == (n, n) and b.dtype is dtype and b.device == device
            and b.layout is strided
        ):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Size: a result that cannot fit in the device's memory is refused before anything is allocated
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of ``device`` (physical RAM for cpu), or None where unknown (meta, …)."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (AttributeError, ValueError, OSError, RuntimeError, AssertionError):
        pass
    return None


def _result_elems(grad, output_mask: Optional[Sequence[bool]], has_a: bool, has_b: bool) -> Optional[int]:
    """Elements of the op's result for one layer (the backward's per the mask; an identity factor
    has no gradient); None if symbolic."""
    if output_mask is None:
        elems = grad.numel()
        return elems if type(elems) is int else None
    shape = tuple(grad.shape)
    if not all(type(d) is int for d in shape):
        return None
    *batch, m, n = shape
    lead = batch[0] if batch else 1
    per_output = (m * n, m * m if has_a else 0, m * n, n * n if has_b else 0)
    return lead * sum(e for e, need in zip(per_output, output_mask) if need)


def check_result_fits(
    grads: Sequence[torch.Tensor], output_mask: Optional[Sequence[bool]] = None, *,
    As: Optional[Sequence] = None, Bs: Optional[Sequence] = None,
) -> None:
    """The result of the op on these (already checked) layers must fit in their device's memory.

    ``output_mask`` None: the forward (one grad-shaped output per layer); else the backward's
    requested outputs (d_grad, dA, dS, dB). ``As``/``Bs``: the layers' factors, where a None entry
    (identity) has no gradient; omitted, every factor is counted. Python ints: no overflow.
    """
    if not grads or torch.compiler.is_compiling():
        return  # under Dynamo, the op's fake kernel (run outside the traced frame) checks this
    limit = _memory_bytes(grads[0].device)
    if limit is None:
        return
    total = 0
    for i, g in enumerate(grads):
        has_a = As is None or As[i] is not None
        has_b = Bs is None or Bs[i] is not None
        elems = _result_elems(g, output_mask, has_a, has_b)
        if elems is None:
            return
        total += elems * g.element_size()
    if total > limit:
        who = f"grad of shape {_shape(grads[0])}" if len(grads) == 1 else f"grads ({len(grads)} layers)"
        what = "result" if output_mask is None else f"result for output_mask={list(output_mask)}"
        raise ValueError(
            f"{who}: the {what} needs {total} bytes, more than the {limit} bytes of memory of "
            f"{grads[0].device}"
        )

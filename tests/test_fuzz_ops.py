"""Fuzz of the registered ops (torch.ops.apo.*, torch.ops.apo.triton_*) with malformed calls.

Every call here is invalid (wrong ndim, shape, dtype, device, layout, a non-tensor, a result too big
for memory, a bad mask, mismatched layers of a grouped call; for the momentum step also a
non-finite momentum and outputs that overlap the inputs; for the lookahead write and APO-LR's SGD
lookahead lists of unequal length and outputs that overlap an input). Each must be refused with an error:
never return a result, never crash or hang the process. Each call runs in its own forked child of a
"fork server": a fresh interpreter that imports torch and apo_kernels once (with
TRITON_INTERPRET=1, so the Triton ops run on CPU tensors) and never calls an op itself, so a crash,
an abort or a hang of one call is that call's outcome and cannot leak into the next.

Outcomes, per call:
  named        ValueError/TypeError whose message names the bad argument
  dispatcher   refused by the dispatcher before any kernel (no kernel for a sparse tensor,
               or an argument of the wrong type for the schema)
  other error  any other exception (or one that does not name the argument)
  returned     the call returned a result
  crashed      the child died (signal, abort, non-zero exit) or ran past the deadline

Run as a script to print the counts for a source tree (for example an older checkout):

    python tests/test_fuzz_ops.py [--root DIR] [--verbose]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CALL_TIMEOUT_S = 30.0  # per call; every call here should be refused in milliseconds
OUTCOMES = ("named", "dispatcher", "other error", "returned", "crashed")
M, N, L = 4, 3, 2  # base layer: non-square, so that transposed shapes are wrong shapes
GROUP_SHAPES = [(4, 3), (2, 5), (3, 3)]
HUGE = 1 << 22  # a (HUGE, HUGE) float32 result is 64 TiB


# --------------------------------------------------------------------------------------------
# The cases (built lazily: torch is imported only in the fork server and its children)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # regex the error message must match to count as naming the argument
    build: Callable  # () -> (op, args)


def _names(name: str) -> str:
    return rf"(?<![\w.]){re.escape(name)}(?!\w)"


def _mutations(torch, base_ndim: int, square: bool):
    """(label, fn) pairs turning a valid tensor argument into an invalid one."""
    z = lambda x, dim: torch.zeros_like(x.narrow(dim, 0, 1))  # noqa: E731
    muts = [
        ("1-D", lambda x: x.reshape(-1)),
        ("0-D", lambda x: x.sum()),
        ("extra leading dim", lambda x: x[None]),
        ("rows-1", lambda x: x[..., :-1, :]),
        ("cols-1", lambda x: x[..., :, :-1]),
        ("rows+1", lambda x: torch.cat([x, z(x, -2)], dim=-2)),
        ("cols+1", lambda x: torch.cat([x, z(x, -1)], dim=-1)),
        ("broadcastable row", lambda x: x[..., :1, :]),
        ("broadcastable col", lambda x: x[..., :, :1]),
        ("meta device", lambda x: x.to("meta")),
    ]
    if base_ndim == 2:
        muts += [("4-D", lambda x: x[None, None])]
    else:
        muts += [
            ("batch+1", lambda x: torch.cat([x, x[:1]], dim=0)),
            ("batch 1 (broadcastable)", lambda x: x[:1]),
            ("2-D in a batched call", lambda x: x[0]),
        ]
    if not square:
        muts.append(("transposed", lambda x: x.mT))
    return muts


# None for A or B is an identity factor, a valid call (tests/test_identity_factors.py), not a mistake.
IDENTITY_ARGS = ("A", "B")


def _value_mutations(torch, arg: str = ""):
    """dtype, layout and non-tensor mutations (2-D calls only: they do not depend on ndim)."""
    muts = [
        (f"dtype {dt}".replace("torch.", ""), lambda x, dt=dt: x.to(dt))
        for dt in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.complex64,
                   torch.float64, torch.float16, torch.bfloat16)
    ]
    if hasattr(torch, "float8_e4m3fn"):
        muts.append(("dtype float8_e4m3fn", lambda x: x.to(torch.float8_e4m3fn)))
    muts += [
        ("sparse", lambda x: x.to_sparse()),
        *([] if arg in IDENTITY_ARGS else [("None", lambda x: None)]),
        ("nested list", lambda x: x.tolist()),
        ("python float", lambda x: 1.0),
    ]
    return muts


def _layer(torch, m, n, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    r = lambda *s: torch.randn(*lead, *s, generator=g)  # noqa: E731
    return {"grad_out": r(m, n), "grad": r(m, n), "A": r(m, m), "S": r(m, n), "B": r(n, n)}


def _huge_layer(torch, m, n, batch=None):
    """A valid-shaped layer of expanded (stride-0) tensors: no memory, a huge result."""
    lead = () if batch is None else (batch,)
    e = lambda r, c: torch.ones(1).expand(*lead, r, c)  # noqa: E731
    return {"grad_out": e(m, n), "grad": e(m, n), "A": e(m, m), "S": e(m, n), "B": e(n, n)}


FORWARD = ("grad", "A", "S", "B")
BACKWARD = ("grad_out", "grad", "A", "S", "B")
ALL = [True] * 4


def build_cases() -> list[Case]:
    import torch

    ops = torch.ops.apo
    cases: list[Case] = []

    def add(name, expect, fn):
        cases.append(Case(name, expect, fn))

    for fam, prefix in (("native", ""), ("triton", "triton_")):
        fwd = lambda p=prefix: getattr(ops, f"{p}precondition")  # noqa: E731
        bwd = lambda p=prefix: getattr(ops, f"{p}precondition_backward")  # noqa: E731
        grp = lambda p=prefix: getattr(ops, f"{p}precondition_grouped")  # noqa: E731
        grp_bwd = lambda p=prefix: getattr(ops, f"{p}precondition_grouped_backward")  # noqa: E731

        # single layer, forward and backward, 2-D and batched
        for kind, names, op, batch in (
            ("forward", FORWARD, fwd, None),
            ("forward-batched", FORWARD, fwd, L),
            ("backward", BACKWARD, bwd, None),
            ("backward-batched", BACKWARD, bwd, L),
        ):
            base_ndim = 2 if batch is None else 3
            for arg in names:
                square = arg in ("A", "B")
                muts = _mutations(torch, base_ndim, square)
                if batch is None:
                    muts = muts + _value_mutations(torch, arg)
                for label, mut in muts:
                    def build(arg=arg, mut=mut, names=names, op=op, batch=batch):
                        layer = _layer(torch, M, N, batch)
                        layer[arg] = mut(layer[arg])
                        args = [layer[k] for k in names]
                        return op(), args + ([ALL] if len(names) == 5 else [])

                    add(f"{fam}/{kind}/{arg}/{label}", _names(arg), build)

        # results that cannot fit in memory (all inputs expanded from one element)
        add(f"{fam}/forward/huge m, n", "bytes",
            lambda op=fwd: (op(), [_huge_layer(torch, HUGE, HUGE)[k] for k in FORWARD]))
        add(f"{fam}/forward-batched/huge batch", "bytes",
            lambda op=fwd: (op(), [_huge_layer(torch, M, N, batch=1 << 40)[k] for k in FORWARD]))
        add(f"{fam}/backward/huge dB", "bytes",
            lambda op=bwd: (op(), [_huge_layer(torch, 1, HUGE)[k] for k in BACKWARD] + [[False, False, False, True]]))
        add(f"{fam}/backward/huge dA", "bytes",
            lambda op=bwd: (op(), [_huge_layer(torch, HUGE, 1)[k] for k in BACKWARD] + [[False, True, False, False]]))
        # bad output masks
        for label, mask in (("3 entries", [True] * 3), ("5 entries", [True] * 5), ("empty", [])):
            add(f"{fam}/backward/output_mask {label}", _names("output_mask"),
                lambda op=bwd, mask=mask: (op(), [_layer(torch, M, N)[k] for k in BACKWARD] + [mask]))

        # grouped: a bad argument in layer 0 or layer 2 of three
        for kind, names, op in (("grouped", FORWARD, grp), ("grouped-backward", BACKWARD, grp_bwd)):
            list_name = {"grad_out": "grad_outs", "grad": "grads", "A": "As", "S": "Ss", "B": "Bs"}
            for layer_idx in (0, 2):
                m_i, n_i = GROUP_SHAPES[layer_idx]
                for arg in names:
                    square = arg in ("A", "B") or m_i == n_i  # a square layer's transpose is valid
                    muts = [mu for mu in _mutations(torch, 2, square)
                            if mu[0] in ("1-D", "extra leading dim", "rows-1", "cols+1", "broadcastable row",
                                         "meta device", "transposed")]
                    muts += [mu for mu in _value_mutations(torch, arg)
                             if mu[0] in ("dtype int64", "dtype float64", "dtype bfloat16", "sparse", "None")]
                    for label, mut in muts:
                        def build(arg=arg, mut=mut, names=names, op=op, layer_idx=layer_idx):
                            layers = [_layer(torch, m, n, seed=i) for i, (m, n) in enumerate(GROUP_SHAPES)]
                            layers[layer_idx][arg] = mut(layers[layer_idx][arg])
                            lists = [[ly[k] for ly in layers] for k in names]
                            return op(), lists + ([ALL] if len(names) == 5 else [])

                        expect = rf"layer {layer_idx}\b.*{_names(arg)}|{_names(list_name[arg])}"
                        add(f"{fam}/{kind}/layer {layer_idx} {arg}/{label}", expect, build)

            # whole-call mistakes of a grouped call
            def whole(fn, names=names, op=op):
                def build():
                    layers = [_layer(torch, m, n, seed=i) for i, (m, n) in enumerate(GROUP_SHAPES)]
                    lists = {k: [ly[k] for ly in layers] for k in names}
                    fn(lists, layers)
                    return op(), [lists[k] for k in names] + ([ALL] if len(names) == 5 else [])

                return build

            def set_layer(lists, i, f):
                for k in lists:
                    lists[k][i] = f(lists[k][i])

            add(f"{fam}/{kind}/As shorter", _names("As"), whole(lambda ls, _: ls["A"].pop()))
            add(f"{fam}/{kind}/grads not a list", _names("grads"),
                whole(lambda ls, _: ls.__setitem__("grad", ls["grad"][0])))
            add(f"{fam}/{kind}/layer 1 float64 (mixed dtypes)", r"layer 1\b",
                whole(lambda ls, _: set_layer(ls, 1, lambda t: t.double())))
            add(f"{fam}/{kind}/layer 1 bfloat16 (mixed dtypes)", r"layer 1\b",
                whole(lambda ls, _: set_layer(ls, 1, lambda t: t.bfloat16())))
            add(f"{fam}/{kind}/layer 2 float16 (mixed dtypes)", r"layer 2\b",
                whole(lambda ls, _: set_layer(ls, 2, lambda t: t.half())))
            add(f"{fam}/{kind}/layer 1 on meta (mixed devices)", r"layer 1\b",
                whole(lambda ls, _: set_layer(ls, 1, lambda t: t.to("meta"))))
            add(f"{fam}/{kind}/layer 0 on meta (mixed devices)", r"layer [12]\b",
                whole(lambda ls, _: set_layer(ls, 0, lambda t: t.to("meta"))))
            add(f"{fam}/{kind}/layer 1 batched (3-D)", r"layer 1\b",
                whole(lambda ls, _: set_layer(ls, 1, lambda t: t.expand(2, *t.shape))))
            add(f"{fam}/{kind}/layer 1 huge", "bytes",
                whole(lambda ls, _: [ls[k].__setitem__(1, _huge_layer(torch, HUGE, HUGE)[k]) for k in ls]))
        add(f"{fam}/grouped-backward/grad_outs None", _names("grad_outs"),
            lambda op=grp_bwd: (op(), [None] + [[_layer(torch, M, N)[k]] for k in FORWARD] + [ALL]))
    _momentum_cases(torch, add)
    _lookahead_cases(torch, add)
    _sgd_lookahead_cases(torch, add)
    _sgd_step_cases(torch, add)
    _dot_sum_cases(torch, add)
    _dot_adam_step_cases(torch, add)
    _kron_cases(torch, add)
    return cases


# The momentum step (native family only): per layer grad, momentum buffer, A, S, B and the two
# outputs v and Y, with the momentum μ between the buffers and the factors.
MOMENTUM_ARGS = ("grad", "momenta", "A", "S", "B", "vs", "out")
MOMENTUM_LISTS = {"grad": "grads", "momenta": "momenta", "A": "As", "S": "Ss", "B": "Bs", "vs": "vs", "out": "out"}


def _momentum_layers(torch):
    layers = [_layer(torch, m, n, seed=i) for i, (m, n) in enumerate(GROUP_SHAPES)]
    for ly in layers:
        ly["momenta"], ly["vs"], ly["out"] = (torch.randn_like(ly["grad"]) for _ in range(3))
    return layers


def _momentum_call(torch, layers, mu=0.9):
    lists = [[ly[k] for ly in layers] for k in MOMENTUM_ARGS]
    return torch.ops.apo.precondition_momentum_grouped, lists[:2] + [mu] + lists[2:]


def _momentum_cases(torch, add) -> None:
    for layer_idx in (0, 2):
        m_i, n_i = GROUP_SHAPES[layer_idx]
        for arg in MOMENTUM_ARGS:
            square = arg in ("A", "B") or m_i == n_i
            muts = [mu for mu in _mutations(torch, 2, square)
                    if mu[0] in ("1-D", "extra leading dim", "rows-1", "cols+1", "broadcastable row", "meta device",
                                 "transposed")]
            muts += [mu for mu in _value_mutations(torch, arg)
                     if mu[0] in ("dtype int64", "dtype float64", "dtype bfloat16", "sparse", "None")]
            for label, mut in muts:
                def build(arg=arg, mut=mut, layer_idx=layer_idx):
                    layers = _momentum_layers(torch)
                    layers[layer_idx][arg] = mut(layers[layer_idx][arg])
                    return _momentum_call(torch, layers)

                expect = rf"layer {layer_idx}\b.*{_names(arg)}|{_names(MOMENTUM_LISTS[arg])}"
                add(f"native/momentum/layer {layer_idx} {arg}/{label}", expect, build)

    def whole(fn):
        def build():
            layers = _momentum_layers(torch)
            mu = fn(layers)
            return _momentum_call(torch, layers, 0.9 if mu is None else mu)
        return build

    def vs_shorter():
        op, args = _momentum_call(torch, _momentum_layers(torch))
        args[MOMENTUM_ARGS.index("vs") + 1].pop()
        return op, args

    for mu in (float("nan"), float("inf")):
        add(f"native/momentum/momentum {mu}", _names("momentum"), whole(lambda ls, mu=mu: mu))
    add("native/momentum/vs is momenta", _names("vs"), whole(lambda ls: ls[1].__setitem__("vs", ls[1]["momenta"])))
    add("native/momentum/out is vs", _names("vs"), whole(lambda ls: ls[0].__setitem__("out", ls[0]["vs"])))
    add("native/momentum/out overlaps a grad", _names("out"),
        whole(lambda ls: ls[2].__setitem__("out", ls[0]["grad"][:GROUP_SHAPES[2][0], :GROUP_SHAPES[2][1]])))
    add("native/momentum/out expanded", _names("out"),
        whole(lambda ls: ls[1].__setitem__("out", torch.zeros(1).expand(*GROUP_SHAPES[1]))))
    add("native/momentum/vs shorter", _names("vs"), vs_shorter)


# --------------------------------------------------------------------------------------------
# Running a case in a forked child (in the fork server)
# --------------------------------------------------------------------------------------------
def _describe(out) -> str:
    import torch

    if isinstance(out, torch.Tensor):
        return f"Tensor{tuple(out.shape)} {out.dtype} on {out.device}"
    if isinstance(out, (list, tuple)):
        return "[" + ", ".join(_describe(o) for o in out) + "]"
    return type(out).__name__


def _classify(case: Case, exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, (ValueError, TypeError)) and re.search(case.expect, msg, re.S):
        return "named"
    if isinstance(exc, NotImplementedError) and "Could not run" in msg:
        return "dispatcher"  # no kernel for this layout (e.g. SparseCPU)
    if isinstance(exc, (RuntimeError, TypeError)) and re.search(
        r"Expected a value of type|Tried to convert a List with \d+ elements to a fixed-size array", msg
    ):
        return "dispatcher"  # an argument the op's schema does not accept (type, bool[4] length)
    return "other error"


def _run_in_child(case: Case) -> dict:
    try:
        op, args = case.build()
    except Exception as exc:  # the case itself is broken: report it, it is not the op's fault
        return {"outcome": "other error", "type": "case build " + type(exc).__name__, "msg": str(exc)[:400]}
    try:
        out = op(*args)
    except Exception as exc:
        return {"outcome": _classify(case, exc), "type": type(exc).__name__, "msg": str(exc)[:400]}
    return {"outcome": "returned", "type": "", "msg": _describe(out)[:400]}


def _fork_one(case: Case, timeout: float) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run the call, report, exit without any cleanup
        os.close(r)
        try:
            os.write(w, json.dumps(_run_in_child(case)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data, deadline, hung = b"", time.monotonic() + timeout, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if hung:
        return {"outcome": "crashed", "type": "hang", "msg": f"no answer within {timeout:.0f} s"}
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return {"outcome": "crashed", "type": sig, "msg": f"killed by {sig}"}
    if os.WEXITSTATUS(status) != 0 or not data:
        return {"outcome": "crashed", "type": "exit", "msg": f"exit status {os.WEXITSTATUS(status)}, no report"}
    return json.loads(data)


def serve(indices: list[int], timeout: float) -> None:
    """Fork server: import everything once, then one forked child per case; JSON lines out."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first call of a custom op imports it: ~1 s, once here)
    import apo_kernels  # noqa: F401  (registers torch.ops.apo.*, native and triton)

    cases = build_cases()
    for i in indices:
        result = _fork_one(cases[i], timeout)
        result.update(i=i, name=cases[i].name)
        print(json.dumps(result), flush=True)


def _edited(call, fn):
    """A case's build: a valid call (``call() -> (op, args)``) whose argument list ``fn`` edits in place."""
    def build():
        op, args = call()
        fn(args)
        return op, args
    return build


# The lookahead write: per parameter θ, Δ and out (θ' = θ + Δ), parameters of the group's shapes.
LOOKAHEAD_LISTS = ("params", "deltas", "out")


def _lookahead_call(torch, lists=None):
    if lists is None:
        params = [torch.randn(m, n, generator=torch.Generator().manual_seed(i)) for i, (m, n) in enumerate(GROUP_SHAPES)]
        lists = [params, [torch.randn_like(p) for p in params], [torch.empty_like(p) for p in params]]
    return torch.ops.apo.lookahead_write, lists


def _per_parameter_cases(torch, add, prefix: str, call, lists: dict, any_list: str) -> None:
    """Malformed tensors in a list of one per parameter (``lists``: name -> the call's argument
    index): shapes, devices, non-float dtypes, sparse, None and non-tensors, and for ``out`` a dtype
    other than the parameter's (any float dtype is valid elsewhere)."""
    for idx in (0, 2):
        for name, k in lists.items():
            square = GROUP_SHAPES[idx][0] == GROUP_SHAPES[idx][1]  # a transposed square tensor is valid
            muts = [mu for mu in _mutations(torch, 2, square)
                    if mu[0] in ("1-D", "extra leading dim", "rows-1", "cols+1", "transposed", "meta device")]
            dtypes = ("dtype int64", "dtype bool", "dtype complex64", "sparse", "None", "python float")
            muts += [mu for mu in _value_mutations(torch, name)
                     if mu[0] in dtypes or (name == "out" and mu[0] in ("dtype float64", "dtype bfloat16"))]
            for label, mut in muts:
                def build(k=k, mut=mut, idx=idx):
                    op, args = call()
                    args[k][idx] = mut(args[k][idx])
                    return op, args

                expect = rf"{_names(name)}\[{idx}\]|{_names(name)}|{any_list}"
                add(f"native/{prefix}/{name}[{idx}]/{label}", expect, build)


def _lookahead_cases(torch, add) -> None:
    # params and Δ may differ in dtype (a half-precision parameter, a float32 Δ)
    _per_parameter_cases(torch, add, "lookahead", lambda: _lookahead_call(torch),
                         {name: k for k, name in enumerate(LOOKAHEAD_LISTS)}, "params, deltas, out")

    def whole(fn):
        return _edited(lambda: _lookahead_call(torch), fn)

    add("native/lookahead/deltas shorter", _names("deltas"), whole(lambda ls: ls[1].pop()))
    add("native/lookahead/out is params", _names("out"), whole(lambda ls: ls[2].__setitem__(0, ls[0][0])))
    add("native/lookahead/out overlaps a delta", _names("out"),
        whole(lambda ls: ls[2].__setitem__(2, ls[1][0][:GROUP_SHAPES[2][0], :GROUP_SHAPES[2][1]])))
    add("native/lookahead/out expanded", _names("out"),
        whole(lambda ls: ls[2].__setitem__(1, torch.zeros(1).expand(*GROUP_SHAPES[1]))))


# APO-LR's SGD lookahead: per parameter θ, g, the momentum buffer, Δ and out, the coefficients between
# the inputs and the outputs (args: params, grads, momenta, a, b, c, deltas, out).
SGD_LOOKAHEAD_LISTS = {"params": 0, "grads": 1, "momenta": 2, "deltas": 6, "out": 7}


def _sgd_lookahead_call(torch):
    params = [torch.randn(m, n, generator=torch.Generator().manual_seed(i)) for i, (m, n) in enumerate(GROUP_SHAPES)]
    like = lambda: [torch.randn_like(p) for p in params]  # noqa: E731
    return torch.ops.apo.sgd_lookahead, [params, like(), like(), -0.1, -0.09, -0.001, like(), like()]


def _sgd_lookahead_cases(torch, add) -> None:
    _per_parameter_cases(torch, add, "sgd-lookahead", lambda: _sgd_lookahead_call(torch), SGD_LOOKAHEAD_LISTS,
                         "params, grads, deltas, out")

    def whole(fn):
        return _edited(lambda: _sgd_lookahead_call(torch), fn)

    add("native/sgd-lookahead/grads shorter", "params, grads, deltas, out", whole(lambda a: a[1].pop()))
    add("native/sgd-lookahead/momenta shorter", "params, grads, deltas, out", whole(lambda a: a[2].pop()))
    add("native/sgd-lookahead/deltas are the grads", _names("deltas"), whole(lambda a: a.__setitem__(6, a[1])))
    add("native/sgd-lookahead/out is params", _names("out"), whole(lambda a: a[7].__setitem__(0, a[0][0])))
    add("native/sgd-lookahead/out is a momentum buffer", _names("out"), whole(lambda a: a[7].__setitem__(1, a[2][1])))
    add("native/sgd-lookahead/out overlaps a delta", _names("out"),
        whole(lambda a: a[7].__setitem__(2, a[6][0][:GROUP_SHAPES[2][0], :GROUP_SHAPES[2][1]])))
    add("native/sgd-lookahead/deltas expanded", _names("deltas"),
        whole(lambda a: a[6].__setitem__(1, torch.zeros(1).expand(*GROUP_SHAPES[1]))))


# torch.optim.SGD's checked step: per parameter θ and g, and a momentum buffer (args: params, grads,
# momenta, lr, momentum, dampening, weight_decay, nesterov, maximize); params and momenta written.
SGD_STEP_LISTS = {"params": 0, "grads": 1, "momenta": 2}


def _sgd_step_call(torch):
    params = [torch.randn(m, n, generator=torch.Generator().manual_seed(i)) for i, (m, n) in enumerate(GROUP_SHAPES)]
    like = lambda: [torch.randn_like(p) for p in params]  # noqa: E731
    return torch.ops.apo.sgd_step, [params, like(), like(), 0.01, 0.9, 0.0, 1e-4, False, False]


def _sgd_step_cases(torch, add) -> None:
    _per_parameter_cases(torch, add, "sgd-step", lambda: _sgd_step_call(torch), SGD_STEP_LISTS,
                         "params, grads, momenta")

    def whole(fn):
        return _edited(lambda: _sgd_step_call(torch), fn)

    lengths = "params and grads must have the same length"
    add("native/sgd-step/grads shorter", lengths, whole(lambda a: a[1].pop()))
    add("native/sgd-step/momenta shorter", lengths, whole(lambda a: a[2].pop()))
    add("native/sgd-step/momenta without momentum", lengths, whole(lambda a: a.__setitem__(4, 0.0)))
    add("native/sgd-step/momenta are the grads", _names("momenta"), whole(lambda a: a.__setitem__(2, a[1])))
    add("native/sgd-step/params are the momenta", _names("params"), whole(lambda a: a.__setitem__(0, a[2])))
    add("native/sgd-step/a parameter in another's memory", _names("params"),
        whole(lambda a: a[0].__setitem__(2, a[0][0][:GROUP_SHAPES[2][0], :GROUP_SHAPES[2][1]])))
    add("native/sgd-step/params expanded", _names("params"),
        whole(lambda a: a[0].__setitem__(1, torch.zeros(1).expand(*GROUP_SHAPES[1]))))
    for k, name, bad in ((3, "lr", float("nan")), (3, "lr", -1.0), (4, "momentum", float("inf")),
                         (5, "dampening", float("nan")), (6, "weight_decay", -0.1)):
        add(f"native/sgd-step/{name}={bad}", _names(name), whole(lambda a, k=k, bad=bad: a.__setitem__(k, bad)))
    add("native/sgd-step/nesterov with dampening", "nesterov requires",
        whole(lambda a: (a.__setitem__(5, 0.1), a.__setitem__(7, True))))


# The sum of dot products: lists a and b, one shape per pair.
DOT_SUM_LISTS = {"a": 0, "b": 1}


def _dot_sum_call(torch):
    a = [torch.randn(m, n, generator=torch.Generator().manual_seed(i)) for i, (m, n) in enumerate(GROUP_SHAPES)]
    return torch.ops.apo.dot_sum, [a, [torch.randn_like(t) for t in a]]


def _dot_sum_cases(torch, add) -> None:
    _per_parameter_cases(torch, add, "dot-sum", lambda: _dot_sum_call(torch), DOT_SUM_LISTS, "a, b")
    add("native/dot-sum/b shorter", "a and b must have the same length",
        _edited(lambda: _dot_sum_call(torch), lambda a: a[1].pop()))


# φ's Adam step on a sum of dot products: lists a and b as dot_sum's, the segments, then φ, its two
# moments and its step counter (written), lr, beta1, beta2, eps.
DOT_ADAM_STATE = {"param": 3, "exp_avg": 4, "exp_avg_sq": 5}


def _dot_adam_step_call(torch):
    a, b = _dot_sum_call(torch)[1]
    phi = torch.zeros(2, dtype=torch.float64)
    return torch.ops.apo.dot_adam_step, [a, b, [2, 1], phi, torch.zeros_like(phi), torch.zeros_like(phi),
                                         torch.zeros(()), 0.01, 0.0, 0.9, 1e-8]


def _dot_adam_step_cases(torch, add) -> None:
    _per_parameter_cases(torch, add, "dot-adam-step", lambda: _dot_adam_step_call(torch), DOT_SUM_LISTS,
                         "a, b, param, exp_avg, exp_avg_sq, step")

    def whole(fn):
        return _edited(lambda: _dot_adam_step_call(torch), fn)

    add("native/dot-adam-step/b shorter", "a and b must have the same length", whole(lambda a: a[1].pop()))
    add("native/dot-adam-step/segments too few", _names("segments"), whole(lambda a: a.__setitem__(2, [3])))
    add("native/dot-adam-step/segments sum short", _names("segments"), whole(lambda a: a.__setitem__(2, [1, 1])))
    add("native/dot-adam-step/a negative segment", _names("segments"), whole(lambda a: a.__setitem__(2, [4, -1])))
    for name, k in DOT_ADAM_STATE.items():
        add(f"native/dot-adam-step/{name} 2-D", _names(name),
            whole(lambda a, k=k: a.__setitem__(k, a[k].reshape(1, 2))))
        add(f"native/dot-adam-step/{name} int64", _names(name), whole(lambda a, k=k: a.__setitem__(k, a[k].long())))
        add(f"native/dot-adam-step/{name} strided", _names(name),
            whole(lambda a, k=k: a.__setitem__(k, torch.zeros(4, dtype=torch.float64)[::2])))
        add(f"native/dot-adam-step/{name} on meta", f"{_names(name)}|a, b, param, exp_avg, exp_avg_sq, step",
            whole(lambda a, k=k: a.__setitem__(k, a[k].to("meta"))))
    add("native/dot-adam-step/exp_avg float32", _names("exp_avg"), whole(lambda a: a.__setitem__(4, a[4].float())))
    add("native/dot-adam-step/exp_avg is param", _names("exp_avg"), whole(lambda a: a.__setitem__(4, a[3])))
    add("native/dot-adam-step/step in param's memory", f"{_names('step')}|{_names('param')}",
        whole(lambda a: a.__setitem__(6, a[3][0])))
    add("native/dot-adam-step/step 1-D", _names("step"), whole(lambda a: a.__setitem__(6, torch.zeros(1))))
    add("native/dot-adam-step/step None", _names("step"), whole(lambda a: a.__setitem__(6, None)))
    for k, name, bad in ((7, "lr", float("nan")), (7, "lr", -0.1), (8, "beta1", 1.0), (9, "beta2", -0.5),
                         (10, "eps", float("inf"))):
        add(f"native/dot-adam-step/{name}={bad}", _names(name), whole(lambda a, k=k, bad=bad: a.__setitem__(k, bad)))


# The kron step: out = L·G·R for one layer (grad (m, n), L (m, m), R (n, n), out written).
KRON_ARGS = ("grad", "L", "R", "out")


def _kron_call(torch, m=4, n=3):
    g = torch.Generator().manual_seed(5)
    return torch.ops.apo.kron_precondition, [torch.randn(m, n, generator=g), torch.randn(m, m, generator=g),
                                              torch.randn(n, n, generator=g), torch.empty(m, n)]


def _kron_cases(torch, add) -> None:
    for k, name in enumerate(KRON_ARGS):
        square = name in ("L", "R")
        muts = [mu for mu in _mutations(torch, 2, square)
                if mu[0] in ("1-D", "0-D", "extra leading dim", "rows-1", "cols+1", "broadcastable row", "meta device",
                             "transposed", "4-D")]
        # (None is an identity side for L and R: a valid call)
        muts += [mu for mu in _value_mutations(torch, name)
                 if mu[0] in ("dtype int64", "dtype bool", "dtype complex64", "dtype float64", "dtype bfloat16",
                              "sparse", "python float") or (mu[0] == "None" and name in ("grad", "out"))]
        for label, mut in muts:
            def build(k=k, mut=mut):
                op, args = _kron_call(torch)
                args[k] = mut(args[k])
                return op, args

            # a wrong dtype of grad is reported on the first argument compared with it
            expect = _names(name) if name != "grad" else rf"{_names('grad')}|{_names('L')}"
            add(f"native/kron/{name}/{label}", expect, build)

    def whole(fn):
        return _edited(lambda: _kron_call(torch), fn)

    add("native/kron/out is grad", _names("out"), whole(lambda a: a.__setitem__(3, a[0])))
    add("native/kron/out overlaps L", _names("out"), whole(lambda a: a.__setitem__(3, a[1][:, :3])))
    add("native/kron/out expanded", _names("out"), whole(lambda a: a.__setitem__(3, torch.zeros(1).expand(4, 3))))


# --------------------------------------------------------------------------------------------
# The driver: split the cases over fork servers, collect per-call outcomes
# --------------------------------------------------------------------------------------------
def _server_env(root: Path) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"  # the triton ops run on the CPU tensors of the cases
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def case_count(root: Path) -> int:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_fuzz_ops as f, apo_kernels; print(len(f.build_cases()))"
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=_server_env(root),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def run_fuzz(root: Path = ROOT, servers: int = 2, timeout: float = CALL_TIMEOUT_S) -> list[dict]:
    n = case_count(root)
    procs = []
    for k in range(servers):
        indices = ",".join(str(i) for i in range(k, n, servers))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--serve", indices, "--timeout", str(timeout)],
            env=_server_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results, errors = [], []
    for p in procs:
        out, err = p.communicate()
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0:
            errors.append(err[-3000:])
    if errors or len(results) != n:
        raise RuntimeError(f"fork server failed ({len(results)}/{n} results):\n" + "\n".join(errors))
    return sorted(results, key=lambda r: r["i"])


def counts(results: list[dict]) -> dict[str, int]:
    c = collections.Counter(r["outcome"] for r in results)
    return {o: c.get(o, 0) for o in OUTCOMES}


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------
def test_fuzz_registered_ops_refuse_every_malformed_call():
    import pytest

    if not hasattr(os, "fork"):
        pytest.skip("the fork server needs os.fork (POSIX)")
    import apo_kernels

    status = apo_kernels.backends()
    if status["cpu"] != "available":
        pytest.skip(f"native ops not built: {status['cpu']}")
    results = run_fuzz()
    c = counts(results)
    assert len(results) >= 300
    bad = [r for r in results if r["outcome"] in ("returned", "crashed", "other error")]
    summary = "\n".join(f"{r['name']}: {r['outcome']} {r['type']}: {r['msg'][:200]}" for r in bad[:40])
    assert not bad, f"{c} over {len(results)} malformed calls:\n{summary}"
    # the triton family was fuzzed too (not skipped): its calls ran under the interpreter
    assert any(r["name"].startswith("triton/") for r in results)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree whose apo_kernels is fuzzed")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=CALL_TIMEOUT_S)
    ap.add_argument("--verbose", action="store_true", help="print every call that was not refused by name")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve is not None:
        serve([int(i) for i in a.serve.split(",") if i], a.timeout)
        sys.exit(0)
    t0 = time.monotonic()
    res = run_fuzz(a.root.resolve(), a.servers, a.timeout)
    for fam in ("native", "triton"):
        print(fam, counts([r for r in res if r["name"].startswith(fam + "/")]))
    print("total", counts(res), f"{len(res)} calls, {time.monotonic() - t0:.1f} s")
    if a.verbose:
        for r in res:
            if r["outcome"] != "named":
                print(f"  {r['name']}: {r['outcome']} {r['type']}: {r['msg'][:300]}")

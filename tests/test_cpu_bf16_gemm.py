"""What the CPU op does with a bf16 layer (csrc/cpu_gemm.h): bf16 GEMM operands or fp32, rounded once.

`auto` feeds bf16 operands to torch's GEMMs on CPUs with AMX-BF16 tiles, for a layer's forward and
backward from a cost of 128·128·256 up (the torch chain's accuracy, held to tests/_contract.py's
HALF_OPERANDS rule); smaller layers, and every layer elsewhere, are computed in fp32 and rounded once.
APO_KERNELS_CPU_BF16_GEMM=bf16|fp32 forces either route on any CPU. Each route runs here in a
subprocess, whatever this machine picks, against the float64 reference.
"""
import os

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from conftest import cpuinfo_fields, env_with, run_python

ROUTES = ("bf16", "fp32")


def _python(code, route, timeout=120):
    return run_python(code, env_with("APO_KERNELS_CPU_BF16_GEMM", route), timeout)


def test_auto_takes_bf16_operands_exactly_where_the_cpu_has_amx_bf16():
    fields = cpuinfo_fields()
    if fields is None or "flags" not in fields:
        pytest.skip("no readable /proc/cpuinfo flags: nothing to compare cpuid's answer with")
    amx = "amx_bf16" in fields["flags"].split()
    done = _python("import torch, apo_kernels; print(torch.ops.apo.cpu_bf16_gemm())", "auto")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == ("bf16" if amx else "fp32")
    assert torch.ops.apo.cpu_bf16_gemm() == ("bf16" if amx else "fp32") or "APO_KERNELS_CPU_BF16_GEMM" in os.environ


def test_a_bad_route_is_a_value_error_naming_the_variable():
    code = """
import torch, apo_kernels
G = torch.randn(256, 257).bfloat16()
try:
    torch.ops.apo.precondition(G, torch.eye(256).bfloat16(), torch.ones(256, 257).bfloat16(), torch.eye(257).bfloat16())
except ValueError as e:
    print("ValueError:", e)
"""
    done = _python(code, "fast")
    assert done.returncode == 0, done.stderr
    assert "ValueError:" in done.stdout and "APO_KERNELS_CPU_BF16_GEMM" in done.stdout and "'fast'" in done.stdout


# Each layer's forward error and its torch chain's (in units of bf16's roundoff), for the single op
# (2-D, batched, identity factors) and the grouped op, and the backward's worst ratio to its chain.
_ERRORS = """
import torch, apo_kernels
from apo_kernels.ops import reference
u = 2.0 ** -8
gen = torch.Generator().manual_seed(3)
def layer(m, n, batch=()):
    G, S = torch.randn(*batch, m, n, generator=gen), torch.rand(*batch, m, n, generator=gen) + 0.5
    A = torch.eye(m) + torch.randn(*batch, m, m, generator=gen) / m ** 0.5
    B = torch.eye(n) + torch.randn(*batch, n, n, generator=gen) / n ** 0.5
    return [t.bfloat16() for t in (G, A, S, B)]
def err(out, want):
    return ((out.double() - want).norm() / want.norm()).item() / u
d = lambda t: None if t is None else t.double()
cases = {"small 64x64": layer(64, 64), "big 256x257": layer(256, 257), "big 129x300 batched": layer(129, 300, (2,))}
G, A, S, B = layer(300, 160)
cases["big 300x160, A identity"] = [G, None, S, B]
cases["big 160x300, B identity"] = [G.t().contiguous(), B, S.t().contiguous(), None]
for name, (G, A, S, B) in cases.items():
    y = torch.ops.apo.precondition(G, A, S, B)
    want, chain = reference.precondition(d(G), d(A), d(S), d(B)), reference.precondition(G, A, S, B)
    print("forward", name.replace(" ", "_"), err(y, want), err(chain, want))
grouped = {"small_64x64": layer(64, 64), "big_256x257": layer(256, 257), "small_33x20": layer(33, 20),
           "big_200x150": layer(200, 150)}
ys = torch.ops.apo.precondition_grouped(*[list(x) for x in zip(*grouped.values())])
for (name, (G, A, S, B)), y in zip(grouped.items(), ys):
    want, chain = reference.precondition(d(G), d(A), d(S), d(B)), reference.precondition(G, A, S, B)
    print("grouped", name, err(y, want), err(chain, want))
for name, (m, n) in (("big_256x257", (256, 257)), ("small_64x64", (64, 64))):
    G, A, S, B = layer(m, n)
    dY = torch.randn(m, n, generator=gen).bfloat16()
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, [True] * 4)
    wants = reference.precondition_backward(d(dY), d(G), d(A), d(S), d(B), [True] * 4)
    chains = reference.precondition_backward(dY, G, A, S, B, [True] * 4)
    ratios = [err(o, w) / err(c, w) for o, w, c in zip(outs, wants, chains)]
    print("backward", name, min(ratios), max(ratios))
"""


def _errors(route):
    done = _python(_ERRORS, route, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["forward"], ["grouped"])]
    forward = {f"{kind} {name}": (float(e), float(c)) for kind, name, e, c in rows}
    backward = {name: (float(lo), float(hi)) for kind, name, lo, hi in
                (line.split() for line in done.stdout.splitlines() if line.startswith("backward"))}
    return forward, backward


def test_bf16_operands_give_the_chains_accuracy_on_big_layers_and_rounded_once_below():
    """Forced bf16: a big layer's forward and backward have the torch chain's error (bf16 operands, each
    product rounded: k ≈ 1, within HALF_OPERANDS' 2×; the backward's dS² is an elementwise product of
    two rounded GEMM results, as the chain's, so its ratio is ≈ 1 too), so they are not the
    rounded-once results (≤ 0.8× the chain, 0.4–0.6× here); a small layer's are."""
    forward, backward = _errors("bf16")
    for name, (e, chain) in forward.items():
        if "big" in name:
            assert 0.9 * chain <= e <= 2.0 * chain, f"{name}: {e:.3f}u against the chain's {chain:.3f}u"
        else:
            assert e <= min(1.0, 0.8 * chain), f"{name}: {e:.3f}u, not rounded once (chain {chain:.3f}u)"
    lo, hi = backward["big_256x257"]
    assert 0.85 <= lo and hi <= 2.0, f"big layer's backward at {lo:.2f}–{hi:.2f}× its chain's error"
    assert backward["small_64x64"][1] <= 0.8, f"small layer's backward at {backward['small_64x64']}× its chain"


def test_the_fp32_route_rounds_every_layer_once():
    forward, backward = _errors("fp32")
    for name, (e, chain) in forward.items():
        assert e <= min(1.0, 0.8 * chain), f"{name}: {e:.3f}u, not rounded once (chain {chain:.3f}u)"
    for name, (_, hi) in backward.items():
        assert hi <= 0.8, f"{name}'s backward at {hi:.2f}× its chain: not rounded once"


@pytest.mark.parametrize("route", ROUTES)
def test_apo_precond_trains_a_bf16_model_on_either_route(route):
    """Both routes through the optimizer's plain step (the fused momentum op) and its meta-steps: the
    loss falls, and every parameter stays finite."""
    code = """
import torch, apo_kernels
from torch import nn
from apo_kernels.optim import APOPrecond
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(200, 256), nn.Tanh(), nn.Linear(256, 10)).bfloat16()
x, y = torch.randn(128, 200).bfloat16(), torch.randint(0, 10, (128,))
opt = APOPrecond(model, lr=0.05, meta_interval=5, meta_lr=0.01, lambda_fsd=0.0, lambda_wsd=0.0)
def closure():
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss
first = closure().item()
for _ in range(30):
    last = opt.step(closure).item()
print(torch.ops.apo.cpu_bf16_gemm(), first, last, all(p.isfinite().all().item() for p in model.parameters()))
"""
    done = _python(code, route, timeout=300)
    assert done.returncode == 0, done.stderr
    used, first, last, finite = done.stdout.split()[-4:]
    assert used == route and finite == "True"
    assert float(last) < 0.7 * float(first), done.stdout


# APOPrecond on a bf16 model: which operands each call of the op takes. The update's calls are recorded
# (the grouped op for the full structure, apo::kron_precondition for kron) with their dtypes, and on
# bf16 operands whether they are φ of that moment rounded to bf16 (a stale image after a meta-step
# would not be). The lookahead's calls, on a meta-step, come before the update's in the same step;
# the meta-gradient's (the full structure's grouped backward; kron's is its own float32 formula) are
# recorded by dtype.
_UPDATE_OPERANDS = """
import torch, apo_kernels
from torch import nn
from apo_kernels.optim import APOPrecond, preconditioners
from apo_kernels.ops import backends
torch.manual_seed(0)
structure = "STRUCTURE"
model = nn.Sequential(nn.Linear(200, 256), nn.Tanh(), nn.Linear(256, 10)).bfloat16()
x, y = torch.randn(128, 200).bfloat16(), torch.randint(0, 10, (128,))
opt = APOPrecond(model, lr=0.05, meta_interval=3, meta_lr=0.05, lambda_fsd=0.0, lambda_wsd=0.0, structure=structure)
calls, backward = [], set()
if structure == "full":
    grouped, grouped_backward = preconditioners._grouped, preconditioners._grouped_backward
    def spy_backward(dYs, grads, As, Ss, Bs, mask, backend, checked):
        backward.update(str(t.dtype) for t in (*dYs, *grads, *As, *Ss, *Bs) if t is not None and t.numel())
        return grouped_backward(dYs, grads, As, Ss, Bs, mask, backend, checked)
    preconditioners._grouped_backward = spy_backward
    def spy(grads, As, Ss, Bs, backend, checked):
        calls.append((grads[0].dtype, [t.clone() for t in As], [t.clone() for t in Ss], [t.clone() for t in Bs]))
        return grouped(grads, As, Ss, Bs, backend, checked)
    preconditioners._grouped = spy
else:
    kron = backends.native_kron_precondition
    def spy(G, L, R, out):
        calls.append((G.dtype, [L.clone()], [], [R.clone()]))
        return kron(G, L, R, out)
    backends.native_kron_precondition = spy
def closure():
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss
def phi_now():  # per layer: (left factors, S², right factors) of this moment, float32
    out = []
    for layer in opt.layers:
        pc = layer.precond
        if structure == "full":
            out.append((pc.A, [pc.S2()], pc.B))
        else:
            L, R = pc.factors()
            out.append((L, [], R))
    return out
for step in range(7):
    before = len(calls)
    opt.step(closure)
    update = calls[before:][-len(opt.layers):] if structure == "kron" else calls[-1:]
    lookahead = calls[before:len(calls) - len(update)]
    meta = step % 3 == 0
    phi = phi_now()
    want = [sum((list(p[k]) for p in phi), []) for k in range(3)]
    # full: one grouped call, the layers' tiles in order; kron: one call per layer
    got = [sum((c[k + 1] for c in update), []) for k in range(3)]
    dtypes = {c[0] for c in update}
    image = all(torch.equal(g, w.to(g.dtype)) for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    print("step", step, meta, *sorted(str(d) for d in dtypes), image, *sorted({str(c[0]) for c in lookahead}))
print("backward", *sorted(backward))
print("meta_steps", opt.meta_steps, torch.ops.apo.cpu_bf16_gemm())
"""


@pytest.mark.parametrize("structure", ("full", "kron"))
@pytest.mark.parametrize("route", ROUTES)
def test_apo_precond_steps_a_bf16_model_on_phis_bf16_image_where_the_op_takes_bf16_operands(route, structure):
    """On the bf16 route the step of a bf16 layer takes bf16 G and φ rounded to bf16, φ of that very
    step (the image follows every meta-step), in the update and in a meta-step's lookahead alike, and
    the full structure's meta-gradient is the op's backward on the same operands. On the fp32 route
    every call is float32."""
    done = _python(_UPDATE_OPERANDS.replace("STRUCTURE", structure), route, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("step")]
    *_, meta_steps, used = done.stdout.split()
    assert used == route and int(meta_steps) == 3 and len(rows) == 7
    want = "torch.bfloat16" if route == "bf16" else "torch.float32"
    for _, step, meta, dtype, image, *lookahead in rows:
        assert dtype == want, (step, dtype)
        assert image == "True", f"step {step}: the update's operands are not φ of this step"
        assert lookahead == ([want] if meta == "True" else []), (step, lookahead)
    backward = next(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("backward"))
    assert backward == ([want] if structure == "full" else []), backward


def test_half_operands_pay_only_for_bf16_on_the_cpu_backend_where_it_takes_bf16_gemms():
    from apo_kernels.ops import backends

    cpu = torch.device("cpu")
    route = torch.ops.apo.cpu_bf16_gemm() == "bf16"
    assert backends.half_operands_pay("auto", cpu, torch.bfloat16) is route
    assert backends.half_operands_pay("cpu", cpu, torch.bfloat16) is route
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert backends.half_operands_pay("cpu", cpu, dtype) is False
    assert backends.half_operands_pay("reference", cpu, torch.bfloat16) is False
    assert backends.half_operands_pay("reference", torch.device("meta"), torch.bfloat16) is False

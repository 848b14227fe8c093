"""The GEMM engine of the CPU direct path's fp32 layers (csrc/cpu_gemm.h): torch's BLAS or oneDNN.

`auto` takes oneDNN's brgemm micro-kernel on AMD CPUs with AVX-512, where MKL runs its AVX2 code,
and BLAS everywhere else; big layers join oneDNN only on AMD family ≥ 0x1A (full-width AVX-512) and
stay on torch's matmul on Zen 4. APO_KERNELS_CPU_GEMM forces either engine, big layers included. The
op's tests run under what this machine picks; here the direct-path suites run again, in a
subprocess, under each forced engine that differs from it, so that every route is checked against
the float64 reference wherever the tests run.
"""
import os
import subprocess
import sys

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from conftest import ROOT, cpuinfo_fields, env_with, run_python

ENGINES = ("blas", "onednn")
# The suites that run every direct-path route (small, row-blocked, grouped, the momentum step, the
# kron step) on odd shapes, strided and transposed inputs and identity factors, at 1 and 2 threads.
DIRECT_PATH_SUITES = ["tests/test_cpu_schedule.py", "tests/test_momentum_op.py", "tests/test_identity_factors.py",
                      "tests/test_kron_op.py"]


def _env(engine):
    return env_with("APO_KERNELS_CPU_GEMM", engine)


def _python(code, engine, timeout=120):
    return run_python(code, _env(engine), timeout)


def _auto_here():
    """What csrc/cpu_gemm.h's rule picks, as cpu_gemm_engine() reports it, read from /proc/cpuinfo:
    AuthenticAMD with avx512f takes oneDNN, with big layers on it from family 0x1A."""
    fields = cpuinfo_fields()
    if fields is None or not {"vendor_id", "cpu family", "flags"} <= fields.keys():
        return None
    if fields["vendor_id"] != "AuthenticAMD" or "avx512f" not in fields["flags"].split():
        return "blas"
    return "onednn" if int(fields["cpu family"]) >= 0x1A else "onednn (big layers: torch matmul)"


def _last_line(done):
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_asked_for_is_the_one_used(engine):
    code = ("import torch, apo_kernels; G = torch.randn(9, 7); "
            "torch.ops.apo.precondition(G, torch.randn(9, 9), torch.rand(9, 7), torch.randn(7, 7)); "
            "print(torch.ops.apo.cpu_gemm_engine())")
    done = _python(code, engine)
    assert done.returncode == 0, done.stderr
    assert _last_line(done) == engine


def test_an_empty_value_is_auto():
    code = "import torch, apo_kernels; print(torch.ops.apo.cpu_gemm_engine())"
    empty, auto = _python(code, ""), _python(code, "auto")
    assert empty.returncode == 0 and auto.returncode == 0, empty.stderr + auto.stderr
    assert _last_line(empty) == _last_line(auto)


def test_auto_follows_the_cpu():
    if (os.environ.get("APO_KERNELS_CPU_GEMM") or "auto") != "auto":
        pytest.skip("APO_KERNELS_CPU_GEMM is set for this run: auto is not what it uses")
    wants = _auto_here()
    if wants is None:
        pytest.skip("no /proc/cpuinfo with vendor, family and flags to read the rule from")
    assert torch.ops.apo.cpu_gemm_engine() == wants


def test_a_bad_value_is_a_value_error_naming_the_variable():
    code = ("import torch, apo_kernels\n"
            "try:\n"
            "    torch.ops.apo.precondition(torch.randn(5, 3), torch.randn(5, 5), torch.rand(5, 3), None)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    done = _python(code, "fast")
    assert done.returncode == 0, done.stderr
    assert "ValueError:" in done.stdout and "APO_KERNELS_CPU_GEMM" in done.stdout and "'fast'" in done.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_give_the_same_fp32_results_within_rounding(engine):
    """Each engine against float64 on layers that take every GEMM shape of the direct path (and, on
    oneDNN, the blocked GEMMs of big layers)."""
    code = """
import torch, apo_kernels
from apo_kernels.ops import reference
gen = torch.Generator().manual_seed(1)
worst = 0.0
# small layers, a row-blocked one (5003×37) and big ones (600×700, 300×1100, 67×1029: blocked GEMMs on
# oneDNN); widths of 16·w + 1 to 5 (257, 53, 99, 37, 67, 1029 in its last panel) end in oneDNN's tail columns
for m, n in [(1, 1), (10, 257), (256, 41), (37, 53), (64, 64), (130, 7), (17, 100), (37, 99), (5003, 37), (600, 700),
             (300, 1100), (67, 1029)]:
    G, S = torch.randn(m, n, generator=gen), torch.rand(m, n, generator=gen) + 0.5
    A = torch.eye(m) + torch.randn(m, m, generator=gen) / m ** 0.5
    B = torch.eye(n) + torch.randn(n, n, generator=gen) / n ** 0.5
    dY = torch.randn(m, n, generator=gen)
    for a, b in [(A, B), (A.t().contiguous().t(), B.t().contiguous().t()), (None, B), (A, None)]:
        if m > 2000 and a is not None:
            continue
        d = lambda t: None if t is None else t.double()
        want = reference.precondition(G.double(), d(a), S.double(), d(b))
        got = torch.ops.apo.precondition(G, a, S, b)
        worst = max(worst, ((got.double() - want).norm() / want.norm()).item())
        grads = torch.ops.apo.precondition_backward(dY, G, a, S, b, [True, True, True, True])
        wants = reference.precondition_backward(dY.double(), G.double(), d(a), S.double(), d(b), [True] * 4)
        for g, w in zip(grads, wants):
            if w is not None:
                worst = max(worst, ((g.double() - w).norm() / w.norm()).item())
print(torch.ops.apo.cpu_gemm_engine(), worst)
"""
    done = _python(code, engine)
    assert done.returncode == 0, done.stderr
    used, worst = done.stdout.split()[-2:]
    assert used == engine and float(worst) <= 1e-5, done.stdout


@pytest.mark.slow
def test_direct_path_suites_under_the_other_engines():
    """The direct-path suites, run by pytest in a subprocess under each forced engine that is not what
    this process runs (on Zen 4 both: its auto keeps big layers off oneDNN)."""
    others = [e for e in ENGINES if e != torch.ops.apo.cpu_gemm_engine()]
    for other in others:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DIRECT_PATH_SUITES],
                              env=_env(other), cwd=ROOT, capture_output=True, text=True, timeout=900)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
        assert done.returncode == 0 and " passed" in summary, f"under {other}: {summary}\n{done.stdout[-3000:]}"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_layer_alone_gives_the_same_bits_on_any_thread_count(engine):
    """A layer with a learnt A that runs alone: on oneDNN one parallel region, each thread a share of
    the rows through the whole chain (uneven shares at 3 threads, a share of 11 rows at 33×300;
    widths of 16·w + 1 to 5, whose last columns oneDNN's route forms apart, also in the transposed
    products of a thread's rows, whose width is its share; Bᵀ one copy the threads share at 700×600,
    where the engine takes big layers, and each thread's own elsewhere); forward and the momentum
    step against float64, their finiteness flags with a NaN in the last thread's rows, and on oneDNN
    the same bits at 1, 2 and 3 threads."""
    code = """
import torch, apo_kernels
from apo_kernels.ops import reference
op = torch.ops.apo
gen = torch.Generator().manual_seed(2)
worst, same_bits = 0.0, True
for m, n in [(256, 257), (67, 70), (33, 300), (300, 33), (37, 99), (100, 34), (600, 700), (700, 600)]:
    G, M, S = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen), torch.rand(m, n, generator=gen) + 0.5
    A = torch.eye(m) + torch.randn(m, m, generator=gen) / m ** 0.5
    B = torch.eye(n) + torch.randn(n, n, generator=gen) / n ** 0.5
    for a, b in [(A, B), (A, B.t().contiguous().t()), (A.t().contiguous().t(), B), (A, None)]:
        d = lambda t: None if t is None else t.double()
        first = None
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            Y = op.precondition(G, a, S, b)
            V, out = torch.empty_like(G), torch.empty_like(G)
            flags = op.precondition_momentum_grouped([G], [M], 0.9, [a], [S], [b], [V], [out], False)
            assert flags.tolist() == [True, True] and torch.equal(V, M * 0.9 + G)
            for got, x in ((Y, G), (out, V)):
                want = reference.precondition(x.double(), d(a), S.double(), d(b))
                worst = max(worst, ((got.double() - want).norm() / want.norm()).item())
            first = first or (Y, out)
            same_bits &= torch.equal(first[0], Y) and torch.equal(first[1], out)
            M_bad = M.clone()
            M_bad[-1, n // 2] = float("nan")
            V_bad, out_bad = torch.empty_like(G), torch.empty_like(G)
            flags = op.precondition_momentum_grouped([G], [M_bad], 0.9, [a], [S], [b], [V_bad], [out_bad], False)
            assert flags.tolist() == [False, False], (m, n, threads)
print(torch.ops.apo.cpu_gemm_engine(), worst, same_bits)
"""
    done = _python(code, engine, timeout=300)
    assert done.returncode == 0, done.stderr
    used, worst, same_bits = done.stdout.split()[-3:]
    assert used == engine and float(worst) <= 1e-5, done.stdout
    if engine == "onednn":  # (BLAS may split a GEMM's sums over its threads)
        assert same_bits == "True", done.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_a_layer_alone_gives_the_same_backward_bits_on_any_thread_count(engine):
    """The backward of a layer with a learnt A that runs alone: on oneDNN one parallel region (rows
    per thread, then dB's rows per thread, uneven at 3 threads; widths of 16·w + 1 to 5 as above);
    every output mask a meta-step or a user asks for, and factors stored either way round, against
    float64, and on oneDNN the same bits at 1, 2 and 3 threads."""
    code = """
import torch, apo_kernels
from apo_kernels.ops import reference
op = torch.ops.apo
gen = torch.Generator().manual_seed(3)
worst, same_bits = 0.0, True
masks = [[True] * 4, [False, True, True, True], [True, False, False, False], [False, False, True, False],
         [False, False, False, True], [True, True, False, False]]
for m, n in [(256, 257), (67, 70), (33, 300), (300, 33), (37, 99), (100, 34), (600, 700)]:
    G, dY, S = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen), torch.rand(m, n, generator=gen) + 0.5
    A = torch.eye(m) + torch.randn(m, m, generator=gen) / m ** 0.5
    B = torch.eye(n) + torch.randn(n, n, generator=gen) / n ** 0.5
    for a, b in [(A, B), (A, B.t().contiguous().t()), (A.t().contiguous().t(), B), (A, None)]:
        d = lambda t: None if t is None else t.double()
        want = reference.precondition_backward(dY.double(), G.double(), d(a), S.double(), d(b))
        for mask in masks:
            first = None
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                got = op.precondition_backward(dY, G, a, S, b, mask)
                for k, (x, w) in enumerate(zip(got, want)):
                    if mask[k] and w is not None:
                        worst = max(worst, ((x.double() - w).norm() / w.norm()).item())
                first = first or got
                same_bits &= all(torch.equal(x, y) for x, y in zip(first, got))
print(torch.ops.apo.cpu_gemm_engine(), worst, same_bits)
"""
    done = _python(code, engine, timeout=300)
    assert done.returncode == 0, done.stderr
    used, worst, same_bits = done.stdout.split()[-3:]
    assert used == engine and float(worst) <= 1e-5, done.stdout
    if engine == "onednn":
        assert same_bits == "True", done.stdout

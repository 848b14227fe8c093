"""APO-Precond at model scale: identity sides without matrices, memory of a large embedding, and
the cached op inputs of the hot path (S², the direct op call) against the public op."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from apo_kernels.ops import reference
from apo_kernels.optim import APOPrecond
from apo_kernels.optim.preconditioners import StructuredPreconditioner, meta_backward_many, precondition_many


def _randomized(pc: StructuredPreconditioner, seed: int = 0) -> StructuredPreconditioner:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in pc.parameters():
            t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return pc


def _explicit(blocks, size, learn, dtype):
    return torch.block_diag(*blocks) if learn else torch.eye(size, dtype=dtype)


@pytest.mark.parametrize("learn_left,learn_right", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("checked", [False, True])
def test_fixed_side_is_identity_without_a_matrix(learn_left, learn_right, checked):
    """A fixed side has no factor (the op gets None), is never split, and the step and meta-gradient
    equal the op with an explicit identity there (float64, reference op)."""
    m, n, dt = 9, 7, torch.float64
    pc = _randomized(StructuredPreconditioner(m, n, max_dim=4, learn_left=learn_left, learn_right=learn_right,
                                              init_s=0.8, dtype=dt))
    assert (pc.A == []) != learn_left and (pc.B == []) != learn_right
    assert len(pc.row_blocks) == (3 if learn_left else 1) and len(pc.col_blocks) == (2 if learn_right else 1)
    _, As, _, Bs = pc.op_inputs(torch.zeros(m, n, dtype=dt))
    assert all((a is None) != learn_left for a in As) and all((b is None) != learn_right for b in Bs)

    gen = torch.Generator().manual_seed(1)
    G, dY = (torch.randn(m, n, generator=gen, dtype=dt) for _ in range(2))
    A = _explicit(pc.A, m, learn_left, dt).requires_grad_(learn_left)
    B = _explicit(pc.B, n, learn_right, dt).requires_grad_(learn_right)
    S2 = pc.S2().requires_grad_()
    Y_ref = reference.precondition(G, A, S2, B)
    (Y,) = precondition_many([pc], [G], backend="cpu", checked=checked)
    torch.testing.assert_close(Y, Y_ref.detach(), rtol=1e-12, atol=1e-12)

    meta_backward_many([pc], [dY], [G], backend="cpu", checked=checked)
    grads = torch.autograd.grad((Y_ref * dY).sum(), [S2] + [t for t, learn in ((A, learn_left), (B, learn_right)) if learn])
    torch.testing.assert_close(pc.S.grad, 2.0 * pc.S2() * grads[0], rtol=1e-10, atol=1e-12)  # log-parametrized
    rest = iter(grads[1:])
    for blocks, offsets, learn in ((pc.A, pc.row_blocks, learn_left), (pc.B, pc.col_blocks, learn_right)):
        if learn:
            full = next(rest)
            for block, (i0, i1) in zip(blocks, offsets):
                torch.testing.assert_close(block.grad, full[i0:i1, i0:i1], rtol=1e-10, atol=1e-12)


def test_embedding_with_a_huge_vocabulary_never_forms_a_vocabulary_square():
    """max_precond_dim=None on a 2**24-row embedding: the vocabulary side is the identity (no V×V)."""
    opt = APOPrecond(nn.Embedding(2**24, 4), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01,
                     max_precond_dim=None)
    pc = opt.layers[0].precond
    assert pc.A == [] and [tuple(b.shape) for b in pc.B] == [(4, 4)]
    assert pc.row_blocks == [(0, 2**24)]
    assert sum(t.numel() for t in opt.phi) == 2**24 * 4 + 16  # S and B only


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_large_embedding_three_steps_stay_under_one_gigabyte():
    """APOPrecond on nn.Embedding(262144, 64) (64 MiB of weights): construction and 3 steps, one of
    them a meta-step, raise the process's peak resident memory by less than 1 GB.

    Measured in a fresh process: the kernel's peak-RSS counter (VmHWM) is reset after the model is
    built and every library is loaded (a tiny warm-up run), so it counts every allocation of the
    optimizer, transient ones included (torch's CPU allocator keeps no peak statistics, and
    tracemalloc does not see tensor memory)."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from torch import nn
        from apo_kernels.optim import APOPrecond
        torch.manual_seed(0)

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        def run(vocab):
            net = nn.Sequential(nn.Embedding(vocab, 64), nn.Flatten(), nn.Linear(64 * 16, 10))
            tok, y = torch.randint(0, vocab, (32, 16)), torch.randint(0, 10, (32,))
            base = status("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")
            opt = APOPrecond(net, lr=0.1, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=2)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(net(tok), y)
                loss.backward()
                return loss

            for _ in range(3):
                opt.step(closure, fsd_inputs=(tok,))
            assert opt.meta_steps == 2 and opt.skipped_steps == 0
            return status("VmHWM") - base

        run(64)  # loads every library the run touches
        print(run(262144))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(out.stdout.split()[-1])
    assert peak < 1e9, f"peak memory increase {peak / 2**20:.0f} MiB"


def test_cached_s2_follows_every_write_to_s():
    """The hot path reuses S² between steps; any in-place write to S (meta-step, recovery,
    load_state_dict) must be seen by the next apply."""
    pc = StructuredPreconditioner(5, 4, init_s=0.5, dtype=torch.float64)
    G = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(pc.apply(G, backend="cpu"), 0.25 * G)
    pc.scale_s2(4.0)
    torch.testing.assert_close(pc.apply(G, backend="cpu"), 1.0 * G)
    with torch.no_grad():
        pc.S.copy_(torch.full_like(pc.S, 0.0))  # log-parametrized: S² = 1
        pc.S[0, 0] = torch.log(torch.tensor(3.0, dtype=torch.float64))
    Y = pc.apply(G, backend="cpu")
    torch.testing.assert_close(Y[1:], G[1:])
    torch.testing.assert_close(Y[0, 0], 9.0 * G[0, 0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_scratch_finiteness_check_sees_every_non_finite_and_keeps_values(bad):
    """The update's fused finiteness check: NaN and ±inf anywhere (any dtype, strided views) are
    found, and no value changes."""
    from apo_kernels._numerics import all_finite, all_finite_scratch

    Y = torch.randn(6, 5)
    ts = [Y[:, :-1], Y[:, -1], torch.randn(7, dtype=torch.float64), torch.randn(3).half(), torch.randn(2).bfloat16()]
    if bad is not None:
        ts[1][4] = bad
    before = [t.clone() for t in ts]
    assert all_finite_scratch(ts) is (bad is None) is all_finite(ts)
    big = torch.zeros(2**20 + 1)  # above FUSED_CHECK_MAX: the read-only check
    assert all_finite_scratch(ts + [big]) is (bad is None)
    for t, b in zip(ts, before):
        assert torch.equal(t.isnan(), b.isnan()) and torch.equal(t.nan_to_num(), b.nan_to_num())

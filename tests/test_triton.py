"""Triton backend: the kernels of apo_kernels.ops.triton_kernels against the float64 reference.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when triton is *imported* (jit decorators read TRITON_INTERPRET then), so it must be set
before that: tests/conftest.py sets it for the whole session; the lines below do the same when
this file is run on its own, and only if triton is not imported yet (setting it later would not
switch the already-decorated kernels and would only confuse ``is_interpreter()``).

Sizes are kept small: the interpreter runs each program in Python (a 512³ matmul takes ~1.7 s).
The ahead-of-time compile check (sm_80/sm_90, no GPU) runs in a subprocess without
TRITON_INTERPRET, since interpreted kernels cannot be compiled.
"""
import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

tk = pytest.importorskip("apo_kernels.ops.triton_kernels", reason="triton is not installed")
import _contract  # noqa: E402
from apo_kernels.ops import reference as ref  # noqa: E402

INTERPRETED = tk.is_interpreter()
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA device and TRITON_INTERPRET!=1 (set it before triton is imported)"
)

# Relative Frobenius error bounds vs the float64 reference (of the dtype-rounded inputs).
# On a GPU fp32 dots run as tf32x3 (or tf32 if torch allows it), hence the looser GPU bound.
TOL = {torch.float32: 1e-5 if INTERPRETED else 5e-5}
if not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
    TOL[torch.float32] = 5e-3


def half_policy(dtype):
    """float16/bfloat16 contract (tests/_contract.py). Interpreted, the kernels compute in fp32 and
    round once (bf16 toward zero: the interpreter's cast truncates); on a GPU they feed fp16/bf16
    dot operands to tensor cores (the kernel module's docstring), so they are held to
    flash-attention's rule against the torch chain instead."""
    if not INTERPRETED:
        return _contract.HALF_OPERANDS
    return _contract.TRUNCATED_ONCE if dtype == torch.bfloat16 else _contract.ROUNDED_ONCE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 1), (17, 129), (64, 64), (257, 63)]
ALL = (True, True, True, True)
META = (False, True, True, True)


def _ids(shape):
    return "x".join(map(str, shape))


def make(m, n, dtype=torch.float32, L=None, seed=0):
    """(dY, G, A, S, B) in ``dtype``; A, B scaled by 1/√dim so fp16 stays far from overflow."""
    gen = torch.Generator().manual_seed(seed + 1000 * m + n)
    b = () if L is None else (L,)

    def r(*shape, scale=1.0):
        return (torch.randn(*b, *shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return r(m, n), r(m, n), r(m, m, scale=m ** -0.5), r(m, n), r(n, n, scale=n ** -0.5)


def rel_err(x, ref64):
    assert x.dtype != torch.float64
    den = ref64.norm().clamp_min(1e-30)
    return ((x.double() - ref64).norm() / den).item()


def check(out, expected, dtype, what="", chain=None):
    """``chain``: the same output by the torch formulas in ``dtype`` (half precision needs it)."""
    assert out.is_contiguous(), what
    assert torch.isfinite(out).all(), what
    return _contract.check(out, expected, dtype, TOL.get(dtype), chain=chain, what=what, policy=half_policy(dtype))


def d64(*ts):
    return [t.double().cpu() for t in ts]


@pytest.fixture
def force_tiled(monkeypatch):
    """Send every layer to the tiled-GEMM path."""
    monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)


# --------------------------------------------------------------------------------------------
# forward / backward of one layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(shape, dtype):
    if dtype != torch.float32 and shape == (257, 63):
        pytest.skip("half precision covered on the tiled path by (17, 129); keeps the interpreter fast")
    _, G, A, S, B = make(*shape, dtype)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), dtype, "Y",
          chain=ref.precondition(G, A, S, B))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("mask", [ALL, META], ids=["all", "meta"])
def test_backward_fp32(shape, mask):
    dY, G, A, S, B = make(*shape)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, mask)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B), output_mask=mask)
    for name, need, o, r in zip(("dG", "dA", "dS", "dB"), mask, outs, refs):
        if need:
            check(o, r, torch.float32, name)
        else:
            assert o is None, name


@pytest.mark.parametrize("shape", [(7, 1), (64, 64), (17, 129)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_half(shape, dtype):
    dY, G, A, S, B = make(*shape, dtype)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B))
    chains = ref.precondition_backward(dY, G, A, S, B)
    for name, o, r, c in zip(("dG", "dA", "dS", "dB"), outs, refs, chains):
        check(o, r, dtype, name, chain=c)


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("mask", [m for m in __import__("itertools").product((False, True), repeat=4)],
                         ids=lambda m: "".join("TF"[not v] for v in m))
def test_backward_every_mask(mask, path, monkeypatch):
    if path == "tiled":
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    dY, G, A, S, B = make(9, 5)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, mask)
    refs = ref.precondition_backward(*d64(dY, G, A, S, B), output_mask=mask)
    for name, need, o, r in zip(("dG", "dA", "dS", "dB"), mask, outs, refs):
        if need:
            check(o, r, torch.float32, name)
        else:
            assert o is None, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiled_path_on_small_shapes(force_tiled, dtype):
    dY, G, A, S, B = make(20, 33, dtype)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), dtype, "Y",
          chain=ref.precondition(G, A, S, B))
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    refs, chains = ref.precondition_backward(*d64(dY, G, A, S, B)), ref.precondition_backward(dY, G, A, S, B)
    for name, o, r, c in zip(("dG", "dA", "dS", "dB"), outs, refs, chains):
        check(o, r, dtype, name, chain=c)


def test_fused_128_boundary():
    dY, G, A, S, B = make(128, 100, torch.bfloat16)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.bfloat16, "Y",
          chain=ref.precondition(G, A, S, B))


@pytest.mark.parametrize("shape", [(5, 3), (40, 130)], ids=_ids)
def test_batched(shape):
    dY, G, A, S, B = make(*shape, L=3)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, ref.precondition_backward(*d64(dY, G, A, S, B))):
        check(o, r, torch.float32, name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "tiled"])
def test_non_contiguous(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(tk, "FUSED_MAX_DIM", 0)
    m, n = 12, 7
    dY, G, A, S, B = make(n, m)  # transposed views below are (m, n)
    _, _, A2, _, B2 = make(m, n)
    dYt, Gt, St = dY.t(), G.t(), S.t()
    At = A2.t()
    Bs = torch.cat([B2, B2], dim=1)[:, ::2]  # column stride 2
    assert not (Gt.is_contiguous() or At.is_contiguous() or Bs.is_contiguous())
    check(tk.triton_precondition(Gt, At, St, Bs), ref.precondition(*d64(Gt, At, St, Bs)), torch.float32, "Y")
    outs = tk.triton_precondition_backward(dYt, Gt, At, St, Bs, ALL)
    refs = ref.precondition_backward(*d64(dYt, Gt, At, St, Bs))
    for name, o, r in zip(("dG", "dA", "dS", "dB"), outs, refs):
        check(o, r, torch.float32, name)
    # batched, with the batch dim not outermost in memory
    L = 2
    Gb = torch.randn(m, L, n, device=DEVICE).transpose(0, 1)
    Ab = torch.randn(L, m, m, device=DEVICE).transpose(1, 2) / m ** 0.5
    Sb = torch.randn(L, m, n, device=DEVICE)
    Bb = torch.randn(L, n, n, device=DEVICE) / n ** 0.5
    check(tk.triton_precondition(Gb, Ab, Sb, Bb), ref.precondition(*d64(Gb, Ab, Sb, Bb)), torch.float32, "Yb")


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=_ids)
def test_zero_size(shape):
    m, n = shape
    dY, G, A, S, B = (torch.randn(*sh, device=DEVICE) for sh in ((m, n), (m, n), (m, m), (m, n), (n, n)))
    y = tk.triton_precondition(G, A, S, B)
    assert y.shape == (m, n)
    outs = tk.triton_precondition_backward(dY, G, A, S, B, ALL)
    for o, r in zip(outs, ref.precondition_backward(dY, G, A, S, B)):
        assert o.shape == r.shape and torch.equal(o, r.to(o.dtype))


# --------------------------------------------------------------------------------------------
# grouped
# --------------------------------------------------------------------------------------------

GROUP = [(1, 1), (7, 1), (1, 7), (17, 129), (64, 64), (33, 20), (7, 1), (130, 9)]


def _group(dtype):
    return [make(m, n, dtype, seed=i) for i, (m, n) in enumerate(GROUP)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_forward(dtype):
    layers = _group(dtype)
    _, G, A, S, B = (list(c) for c in zip(*layers))
    outs = tk.triton_precondition_grouped(G, A, S, B)
    assert len(outs) == len(GROUP)
    chains = ref.precondition_grouped(G, A, S, B)
    for i, (y, r) in enumerate(zip(outs, ref.precondition_grouped(*(d64(*c) for c in (G, A, S, B))))):
        check(y, r, dtype, f"layer {i}", chain=chains[i])


@pytest.mark.parametrize("mask", [ALL, META, (False, False, True, False)], ids=["all", "meta", "dS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_backward(mask, dtype):
    layers = _group(dtype)
    cols = [list(c) for c in zip(*layers)]
    outs = tk.triton_precondition_grouped_backward(*cols, mask)
    refs = ref.precondition_grouped_backward(*(d64(*c) for c in cols), output_mask=mask)
    chains = ref.precondition_grouped_backward(*cols, output_mask=mask)
    for k, name in enumerate(("dG", "dA", "dS", "dB")):
        if not mask[k]:
            assert outs[k] == []
            continue
        assert len(outs[k]) == len(GROUP)
        for i, (o, r) in enumerate(zip(outs[k], refs[k])):
            check(o, r, dtype, f"{name}[{i}]", chain=chains[k][i])


def test_grouped_one_launch_per_block_shape(monkeypatch):
    """All small layers with one padded block shape go through a single grouped launch."""
    launches = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda k, grid, *a, **kw: (launches.append((k.__name__, grid)), real(k, grid, *a, **kw)))
    shapes = [(3, 5), (9, 2), (16, 16), (20, 3)]  # blocks 16×16, 16×16, 16×16, 32×16
    layers = [make(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    _, G, A, S, B = (list(c) for c in zip(*layers))
    tk.triton_precondition_grouped(G, A, S, B)
    assert sorted(launches) == [("_grouped_fwd_kernel", (1,)), ("_grouped_fwd_kernel", (3,))]


def test_grouped_empty_and_zero_layers():
    assert tk.triton_precondition_grouped([], [], [], []) == []
    assert tk.triton_precondition_grouped_backward([], [], [], [], [], ALL) == ([], [], [], [])
    dY, G, A, S, B = make(4, 3)
    z = [torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 0, device=DEVICE), torch.zeros(0, 3, device=DEVICE),
         torch.zeros(3, 3, device=DEVICE)]
    outs = tk.triton_precondition_grouped([G, z[0]], [A, z[1]], [S, z[2]], [B, z[3]])
    assert outs[1].shape == (0, 3)
    dG, dA, dS, dB = tk.triton_precondition_grouped_backward([dY, z[0]], [G, z[0]], [A, z[1]], [S, z[2]],
                                                             [B, z[3]], ALL)
    assert dB[1].shape == (3, 3) and torch.equal(dB[1], torch.zeros_like(dB[1]))


# --------------------------------------------------------------------------------------------
# devices, dtypes, AOT compile
# --------------------------------------------------------------------------------------------


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    G = torch.randn(3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.triton_precondition(G, torch.eye(3), G, torch.eye(4))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.triton_precondition_grouped([G], [torch.eye(3)], [G], [torch.eye(4)])


def test_float64_is_rejected():
    G = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.triton_precondition(G, G.new_ones(3, 3), G, G.new_ones(4, 4))


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU-only: compiled kernels and autotune need a CUDA device")
def test_gpu_large_layer_autotuned():
    dY, G, A, S, B = make(300, 200, torch.bfloat16)
    check(tk.triton_precondition(G, A, S, B), ref.precondition(*d64(G, A, S, B)), torch.bfloat16, "Y",
          chain=ref.precondition(G, A, S, B))


def test_aot_compile_sm80_sm90():
    """Every kernel (smoke set: fp32 + bf16, fused + tiled + grouped) compiles for sm_80 and sm_90."""
    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "apo_kernels.ops.triton_aot", "--level", "smoke", "--arch", "80", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout

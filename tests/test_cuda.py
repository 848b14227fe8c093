"""Tests of the CUDA kernels (csrc/cuda/precondition.cu) through torch.ops.apo.* on CUDA tensors,
plus two CPU tests: the nvcc compile check and the kernels emulated on the host.

Every result is compared with the float64 reference (apo_kernels.ops.reference) evaluated on the
same (dtype-rounded) inputs, by relative Frobenius error. Tolerances:
  float64 1e-10; float32 1e-4 with TF32 off (TF32 would allow ~1e-3: the op follows
  torch.backends.cuda.matmul like torch.matmul does); float16 / bfloat16: the contract of
  tests/_contract.py, "fp32 accumulation, rounded once", on every path and size (both paths keep
  fp32 intermediates; see precondition.cu's precision notes).

Shapes are chosen to cover both paths of the kernel file: m, n <= 64 take the fused small-layer
kernel (fp32 in shared memory); the rest the cuBLAS path ((17, 129), (257, 63), (130, 500)), which
also takes layers with an identity factor (A or B None) and, in a grouped call, batches layers of
one shape into one strided-batched GEMM per product.

GPU tests skip with "CUDA not available" without a device, and with "apo_kernels._C built without
CUDA kernels" when the extension has no CUDA implementation. test_cuda_sources_compile and
test_kernels_emulated_on_host run on CPU (both marked slow: they compile, 1-4 min on 2 cores).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _contract
from apo_kernels.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "CUDA not available"
    try:
        import apo_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        return f"apo_kernels._C is not built ({exc})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("apo::precondition", "CUDA"):
        return "apo_kernels._C built without CUDA kernels"
    return None


_SKIP = _cuda_skip_reason()
requires_cuda = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

SHAPES = [(1, 1), (1, 7), (7, 1), (17, 129), (64, 64), (257, 63), (130, 500)]
SHAPE_IDS = [f"{m}x{n}" for m, n in SHAPES]
SMALL_AND_LARGE = [(7, 5), (130, 70)]  # one shape per path, for the combinatorial tests
MASKS = [
    (True, True, True, True),
    (False, True, True, True),  # the meta-gradient's mask: no d_grad
    (True, False, False, False),
    (False, False, True, False),
    (False, True, False, True),
]
MASK_IDS = ["".join("1" if b else "0" for b in mk) for mk in MASKS]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # half precision: tests/_contract.py


def _dtype_params(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    params = []
    for dt in dtypes:
        marks = []
        if dt is torch.bfloat16 and _SKIP is None and not torch.cuda.is_bf16_supported():
            marks.append(pytest.mark.skip(reason="bfloat16 not supported on this GPU"))
        params.append(pytest.param(dt, marks=marks, id=str(dt).replace("torch.", "")))
    return params


DTYPES = _dtype_params()
HALF_DTYPES = _dtype_params((torch.float16, torch.bfloat16))


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 GEMMs, so that the fp32 tolerance means fp32."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_layer(m, n, dtype, batch=None, seed=0):
    """(dY, G, A, S, B) on CUDA in `dtype`; A, B scaled by 1/sqrt(size) so fp16 never overflows."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*lead, *shape, generator=gen, dtype=torch.float64) * scale).to(dtype).cuda()

    dY = rnd(m, n)
    G = rnd(m, n)
    A = rnd(m, m, scale=1 / math.sqrt(max(m, 1)))
    S = (torch.rand(*lead, m, n, generator=gen, dtype=torch.float64) + 0.5).to(dtype).cuda()
    B = rnd(n, n, scale=1 / math.sqrt(max(n, 1)))
    return dY, G, A, S, B


def f64(ts):
    return [t.double() for t in ts]


def rel_err(out, expected):
    out, expected = out.double(), expected.double()
    denom = expected.norm().item()
    diff = (out - expected).norm().item()
    return diff / denom if denom > 0 else diff


def poison_cache():
    """Leave NaN-filled blocks in the caching allocator: an output element the kernel forgets to
    write then likely shows up as NaN instead of a lucky zero."""
    for numel in (1 << 18, 1 << 22):  # 1 MiB: the small-block pool; 16 MiB: the large one
        junk = torch.full((numel,), float("nan"), device="cuda")
        del junk


def assert_close(out, expected, dtype, name, chain=None, oracle_only=False):
    """out (CUDA, `dtype`) vs the float64 `expected`; `chain`: the same math by torch in `dtype`.

    `oracle_only`: half precision held to the oracle bound alone (within one rounding of the exact
    result), for outputs that are one elementwise product, which the torch chain also rounds once."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.is_cuda, f"{name}: not on CUDA"
    assert out.is_contiguous(), f"{name}: output is not contiguous"
    assert tuple(out.shape) == tuple(expected.shape), f"{name}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if oracle_only and dtype in _contract.HALF_DTYPES:
        err = _contract.rel_err(out, expected)
        assert err <= _contract.UNIT_ROUNDOFF[dtype] + _contract.FP32_SLACK, f"{name} ({dtype}): error {err:.3g}"
        return
    _contract.check(out, expected, dtype, TOL.get(dtype), chain=chain, what=name)


def assert_empty(t, like, name):
    assert tuple(t.shape) == (0,), f"{name}: masked-off output must have shape (0,), got {tuple(t.shape)}"
    assert t.dtype == like.dtype and t.device == like.device, f"{name}: wrong dtype/device"


def check_backward(outs, dY, G, A, S, B, mask, dtype):
    expected = ref.precondition_backward(*f64((dY, G, A, S, B)), output_mask=mask)
    chain = ref.precondition_backward(dY, G, A, S, B, output_mask=mask)
    assert len(outs) == 4
    for k, name in enumerate(("d_grad", "dA", "dS", "dB")):
        if mask[k]:
            assert_close(outs[k], expected[k], dtype, name, chain[k])
        else:
            assert_empty(outs[k], G, name)


# ------------------------------------------------------------------------------------------------
# single op: forward and backward, 2-D and batched
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(shape, dtype):
    _, G, A, S, B = make_layer(*shape, dtype)
    poison_cache()
    Y = torch.ops.apo.precondition(G, A, S, B)
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), dtype, "Y", ref.precondition(G, A, S, B))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_batched(shape, dtype):
    _, G, A, S, B = make_layer(*shape, dtype, batch=3)
    poison_cache()
    Y = torch.ops.apo.precondition(G, A, S, B)
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), dtype, "Y", ref.precondition(G, A, S, B))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward(shape, dtype):
    dY, G, A, S, B = make_layer(*shape, dtype)
    mask = [True] * 4
    poison_cache()
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, mask)
    check_backward(outs, dY, G, A, S, B, mask, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_batched(shape, dtype):
    dY, G, A, S, B = make_layer(*shape, dtype, batch=3)
    mask = [True] * 4
    poison_cache()
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, mask)
    check_backward(outs, dY, G, A, S, B, mask, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", _dtype_params((torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("batch", [None, 3], ids=["2d", "L3"])
@pytest.mark.parametrize("shape", SMALL_AND_LARGE, ids=[f"{m}x{n}" for m, n in SMALL_AND_LARGE])
def test_backward_masks(shape, batch, mask, dtype):
    dY, G, A, S, B = make_layer(*shape, dtype, batch=batch)
    poison_cache()
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, list(mask))
    check_backward(outs, dY, G, A, S, B, mask, dtype)


@requires_cuda
def test_backward_nothing_requested():
    dY, G, A, S, B = make_layer(7, 5, torch.float32)
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, [False] * 4)
    for name, t in zip(("d_grad", "dA", "dS", "dB"), outs):
        assert_empty(t, G, name)


# ------------------------------------------------------------------------------------------------
# identity factors (A or B None) and the precision of the large path
# ------------------------------------------------------------------------------------------------

IDENTITY = {"A": (True, False), "B": (False, True), "AB": (True, True)}  # which factor is None


def with_identity(layer, which):
    """(dY, G, A, S, B) with the factors named by `which` replaced by None."""
    no_a, no_b = IDENTITY[which]
    dY, G, A, S, B = layer
    return dY, G, None if no_a else A, S, None if no_b else B


def eye_for(factor, like, side):
    """The explicit identity a None factor stands for (float64, on the CPU), for the oracle."""
    if factor is not None:
        return factor.double()
    size = like.shape[-2] if side == "A" else like.shape[-1]
    return torch.eye(size, dtype=torch.float64, device=like.device).expand(*like.shape[:-2], size, size)


def check_identity_backward(outs, dY, G, A, S, B, mask, dtype, explicit_eye=True):
    """Against the float64 oracle, with explicit eye factors (else with None: for identities too
    big to make); the identity's gradient slot is (0,)."""
    if explicit_eye:
        A64, B64 = eye_for(A, G, "A"), eye_for(B, G, "B")
    else:
        A64, B64 = (None if t is None else t.double() for t in (A, B))
    expected = ref.precondition_backward(dY.double(), G.double(), A64, S.double(), B64, output_mask=mask)
    chain = ref.precondition_backward(dY, G, A, S, B, output_mask=mask)
    for k, name in enumerate(("d_grad", "dA", "dS", "dB")):
        identity_slot = (k == 1 and A is None) or (k == 3 and B is None)
        if mask[k] and not identity_slot:
            assert_close(outs[k], expected[k], dtype, name, chain[k], oracle_only=A is None and B is None)
        else:
            assert_empty(outs[k], G, name)


@requires_cuda
@pytest.mark.parametrize("dtype", _dtype_params((torch.float32, torch.bfloat16, torch.float64)))
@pytest.mark.parametrize("batch", [None, 3], ids=["2d", "L3"])
@pytest.mark.parametrize("which", list(IDENTITY))
@pytest.mark.parametrize("shape", [(7, 5), (130, 70), (300, 257)], ids=["7x5", "130x70", "300x257"])
def test_identity_factors(shape, which, batch, dtype):
    """A=None / B=None / both: results equal explicit eye factors; the identity's gradient is (0,)."""
    dY, G, A, S, B = with_identity(make_layer(*shape, dtype, batch=batch), which)
    poison_cache()
    Y = torch.ops.apo.precondition(G, A, S, B)
    A64, B64 = eye_for(A, G, "A"), eye_for(B, G, "B")
    assert_close(Y, ref.precondition(G.double(), A64, S.double(), B64), dtype, "Y", ref.precondition(G, A, S, B),
                 oracle_only=which == "AB")
    for mask in MASKS:
        outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, list(mask))
        check_identity_backward(outs, dY, G, A, S, B, mask, dtype)


@requires_cuda
def test_tall_identity_side_is_never_materialized():
    """A 2^20-row layer with A=None: an explicit identity would need 4 TiB, and dA's slot as much."""
    m, n = 1 << 20, 4
    gen = torch.Generator().manual_seed(7)
    dY, G = (torch.randn(m, n, generator=gen).cuda() for _ in range(2))
    S = (torch.rand(m, n, generator=gen) + 0.5).cuda()
    B = (torch.randn(n, n, generator=gen) / 2).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    Y = torch.ops.apo.precondition(G, None, S, B)
    outs = torch.ops.apo.precondition_backward(dY, G, None, S, B, [True] * 4)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 32 * G.numel() * G.element_size(), f"{extra} bytes at peak: more than 32 m x n buffers"
    assert_close(Y, ref.precondition(G.double(), None, S.double(), B.double()), torch.float32, "Y")
    check_identity_backward(outs, dY, G, None, S, B, [True] * 4, torch.float32, explicit_eye=False)


@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(520, 300), (64, 64)], ids=["large-520x300", "small-64x64"])
def test_half_rounded_once_on_every_path(shape, dtype):
    """fp32 intermediates and ⊙S in fp32 on both paths: every output within one rounding of the
    exact result and below 0.8x the error of the torch chain in that dtype (which rounds each GEMM)."""
    dY, G, A, S, B = make_layer(*shape, dtype, seed=5)
    Y = torch.ops.apo.precondition(G, A, S, B)
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), dtype, "Y", ref.precondition(G, A, S, B))
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, [True] * 4)
    check_backward(outs, dY, G, A, S, B, [True] * 4, dtype)


@requires_cuda
@pytest.mark.parametrize("shape", [(300, 280), (48, 40)], ids=["large-300x280", "small-48x40"])
def test_fp16_intermediates_beyond_fp16_range(shape):
    """A = 16·Q, B = Q/16 (Q orthogonal): G B and H stay in fp16's range, but A·M is 16x larger than
    G and overflows fp16 (the torch chain in fp16 gives inf), while Y ~ G fits. An fp32 intermediate
    keeps Y finite and within one rounding of the exact result."""
    m, n = shape
    gen = torch.Generator().manual_seed(3)
    qa = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    qb = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    G = torch.randn(m, n, generator=gen, dtype=torch.float64) * 6000.0
    S = torch.rand(m, n, generator=gen, dtype=torch.float64) + 0.5
    G, A, S, B = (t.half().cuda() for t in (G, 16.0 * qa, S, qb / 16.0))
    chain = ref.precondition(G, A, S, B)
    assert not torch.isfinite(chain).all(), "the premise: the fp16 torch chain overflows"
    Y = torch.ops.apo.precondition(G, A, S, B)
    oracle = ref.precondition(*f64((G, A, S, B)))
    assert oracle.abs().max() < 65504, "the premise: the exact result fits fp16"
    assert torch.isfinite(Y).all()
    assert _contract.rel_err(Y, oracle) <= _contract.UNIT_ROUNDOFF[torch.float16] + _contract.FP32_SLACK


# ------------------------------------------------------------------------------------------------
# strided inputs, zero sizes, streams
# ------------------------------------------------------------------------------------------------


def _strided(t, kind):
    """A non-contiguous view with t's values: a transposed copy's transpose, or a strided slice."""
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    big[..., 1::2] = t
    return big[..., 1::2]


@requires_cuda
@pytest.mark.parametrize("dtype", _dtype_params((torch.float32, torch.float16)))
@pytest.mark.parametrize("kind", ["transposed", "sliced"])
@pytest.mark.parametrize("batch", [None, 3], ids=["2d", "L3"])
@pytest.mark.parametrize("shape", SMALL_AND_LARGE + [(257, 63)], ids=["7x5", "130x70", "257x63"])
def test_noncontiguous_inputs(shape, batch, kind, dtype):
    dY, G, A, S, B = make_layer(*shape, dtype, batch=batch)
    views = [_strided(t, kind) for t in (dY, G, A, S, B)]
    if shape[0] > 1 and shape[1] > 1:
        assert not any(v.is_contiguous() for v in views[1:])
    vdY, vG, vA, vS, vB = views
    Y = torch.ops.apo.precondition(vG, vA, vS, vB)
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), dtype, "Y", ref.precondition(G, A, S, B))
    mask = [True] * 4
    outs = torch.ops.apo.precondition_backward(vdY, vG, vA, vS, vB, mask)
    check_backward(outs, dY, G, A, S, B, mask, dtype)


@requires_cuda
@pytest.mark.parametrize(
    "shape,batch", [((0, 5), None), ((5, 0), None), ((0, 0), None), ((0, 70), None),
                    ((80, 0), None), ((4, 6), 0), ((4, 6), 2), ((0, 3), 2)],
)
def test_zero_size(shape, batch):
    dtype = torch.float32
    dY, G, A, S, B = make_layer(*shape, dtype, batch=batch)
    poison_cache()
    Y = torch.ops.apo.precondition(G, A, S, B)
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), dtype, "Y")
    mask = [True] * 4
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, mask)
    expected = ref.precondition_backward(*f64((dY, G, A, S, B)), output_mask=mask)
    for k, name in enumerate(("d_grad", "dA", "dS", "dB")):
        # With m = 0 (n = 0), dB (dA) is a non-empty matrix of exact zeros: assert_close's
        # absolute fallback (zero reference norm) checks that.
        assert_close(outs[k], expected[k], dtype, name)


@requires_cuda
@pytest.mark.parametrize("shape", SMALL_AND_LARGE, ids=[f"{m}x{n}" for m, n in SMALL_AND_LARGE])
def test_runs_on_current_stream(shape):
    """The inputs are written on a side stream after a long sleep, then the op is called there: a
    kernel or table copy on any other stream would read them before they exist (NaN) and fail."""
    layer = make_layer(*shape, torch.float32, batch=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dY, G, A, S, B = staged = [torch.full_like(t, float("nan")) for t in layer]
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist
        for d, t in zip(staged, layer):
            d.copy_(t)
        Y = torch.ops.apo.precondition(G, A, S, B)
        outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, [True] * 4)
        Ys = torch.ops.apo.precondition_grouped([G[0], G[1]], [A[0], A[1]], [S[0], S[1]], [B[0], B[1]])
    side.synchronize()
    dY, G, A, S, B = layer
    assert_close(Y, ref.precondition(*f64((G, A, S, B))), torch.float32, "Y")
    check_backward(outs, dY, G, A, S, B, [True] * 4, torch.float32)
    for i in range(2):
        assert_close(Ys[i], ref.precondition(*f64((G[i], A[i], S[i], B[i]))), torch.float32, f"grouped Y[{i}]")


@requires_cuda
def test_batch_beyond_grid_axis_limit():
    """L = 70000 > 65535 layers of one small shape in one batched call."""
    dY, G, A, S, B = make_layer(3, 2, torch.float32, batch=70000)
    assert_close(torch.ops.apo.precondition(G, A, S, B), ref.precondition(*f64((G, A, S, B))), torch.float32, "Y")
    outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, [True] * 4)
    check_backward(outs, dY, G, A, S, B, [True] * 4, torch.float32)


@requires_cuda
def test_d_grad_alone_skips_the_h_products():
    """Mask (1,0,0,0) on the large path: dY B, Aᵀ(dY B), A E and (A E) Bᵀ only, not G B and Aᵀ G B."""
    from torch.profiler import ProfilerActivity, profile

    dY, G, A, S, B = make_layer(130, 70, torch.float32)

    def gemms(mask):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = torch.ops.apo.precondition_backward(dY, G, A, S, B, list(mask))
            torch.cuda.synchronize()
        names = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_")
        return outs, sum(e.count for e in prof.key_averages() if e.key in names)

    outs, count = gemms((True, False, False, False))
    check_backward(outs, dY, G, A, S, B, (True, False, False, False), torch.float32)
    assert count == 4, f"{count} GEMMs for d_grad alone"
    assert gemms((True, True, True, True))[1] > count


@requires_cuda
def test_cuda_graph_capture_and_replay():
    """Grouped (small-layer table + large layers) and batched calls captured into a CUDA graph,
    replayed on new input values after pinned host memory was churned (the descriptor tables of a
    replay must not come from a reused host buffer)."""
    shapes = [(7, 5), (33, 64), (64, 64), (16, 3), (130, 70)]
    dYs, Gs, As, Ss, Bs = make_group(shapes, torch.float32)
    batch = make_layer(9, 12, torch.float32, batch=3, seed=99)

    def run():
        Ys = torch.ops.apo.precondition_grouped(Gs, As, Ss, Bs)
        grads = torch.ops.apo.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, [True] * 4)
        return Ys, grads, torch.ops.apo.precondition(*batch[1:])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        Ys, grads, Yb = run()

    for replay in range(2):
        gen = torch.Generator().manual_seed(100 + replay)
        for t in [*dYs, *Gs, *As, *Ss, *Bs, *batch]:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).div_(t.shape[-1] ** 0.5).float())
        churn = [torch.full((1 << 16,), 255, dtype=torch.uint8).pin_memory() for _ in range(32)]
        graph.replay()
        torch.cuda.synchronize()
        del churn
        expected = ref.precondition_grouped(f64(Gs), f64(As), f64(Ss), f64(Bs))
        expected_grads = ref.precondition_grouped_backward(f64(dYs), f64(Gs), f64(As), f64(Ss), f64(Bs))
        for i in range(len(shapes)):
            assert_close(Ys[i], expected[i], torch.float32, f"replay {replay} Y[{i}]")
            for k in range(4):
                assert_close(grads[k][i], expected_grads[k][i], torch.float32, f"replay {replay} output {k}[{i}]")
        assert_close(Yb, ref.precondition(*f64(batch[1:])), torch.float32, f"replay {replay} batched Y")


@requires_cuda
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_public_autograd_on_cuda(grouped):
    """apo_kernels.precondition(_grouped) with backend="cuda": autograd gradients vs float64 autograd."""
    import apo_kernels

    shapes = [(7, 5), (64, 64), (130, 70)] if grouped else [(64, 64)]
    layers = [make_layer(m, n, torch.float32, seed=i) for i, (m, n) in enumerate(shapes)]
    leaves = [[t.clone().requires_grad_(True) for t in layer[1:]] for layer in layers]
    leaves64 = [[t.detach().double().cpu().requires_grad_(True) for t in ls] for ls in leaves]
    if grouped:
        ys = apo_kernels.precondition_grouped(*(list(c) for c in zip(*leaves)), backend="cuda")
        ys64 = ref.precondition_grouped(*(list(c) for c in zip(*leaves64)))
    else:
        ys = [apo_kernels.precondition(*leaves[0], backend="cuda")]
        ys64 = [ref.precondition(*leaves64[0])]
    weights = [layer[0] for layer in layers]
    sum((y * w).sum() for y, w in zip(ys, weights)).backward()
    sum((y * w.double().cpu()).sum() for y, w in zip(ys64, weights)).backward()
    for i, (ls, ls64) in enumerate(zip(leaves, leaves64)):
        for name, t, t64 in zip(("G", "A", "S", "B"), ls, ls64):
            assert_close(t.grad.contiguous(), t64.grad, torch.float32, f"layer {i} d{name}")


@pytest.mark.skipif(_SKIP is not None or torch.cuda.device_count() < 2, reason=_SKIP or "needs 2 CUDA devices")
def test_launches_on_the_inputs_device():
    torch.cuda.set_device(0)
    dYs, Gs, As, Ss, Bs = ([t.to("cuda:1") for t in col] for col in make_group([(7, 5), (130, 70)], torch.float32))
    Ys = torch.ops.apo.precondition_grouped(Gs, As, Ss, Bs)
    for y, e in zip(Ys, ref.precondition_grouped(f64(Gs), f64(As), f64(Ss), f64(Bs))):
        assert y.device == Gs[0].device
        assert_close(y, e, torch.float32, "Y")
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------------------
# grouped op
# ------------------------------------------------------------------------------------------------

# Small (fused, one launch for all of them) and large (cuBLAS) layers mixed in one call.
GROUP_MIX = [(1, 1), (7, 1), (1, 7), (17, 33), (64, 64), (65, 10), (3, 200), (257, 63), (130, 500), (32, 48)]


def make_group(shapes, dtype, seed=0):
    layers = [make_layer(m, n, dtype, seed=seed + i) for i, (m, n) in enumerate(shapes)]
    return [list(col) for col in zip(*layers)]  # dYs, Gs, As, Ss, Bs


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [GROUP_MIX, [(16, 16)] * 40, [(300, 20)]], ids=["mix", "small40", "large1"])
def test_grouped_forward(shapes, dtype):
    _, Gs, As, Ss, Bs = make_group(shapes, dtype)
    poison_cache()
    Ys = torch.ops.apo.precondition_grouped(Gs, As, Ss, Bs)
    assert len(Ys) == len(shapes)
    expected = ref.precondition_grouped(f64(Gs), f64(As), f64(Ss), f64(Bs))
    chain = ref.precondition_grouped(Gs, As, Ss, Bs)
    for i, (y, e, c) in enumerate(zip(Ys, expected, chain)):
        assert_close(y, e, dtype, f"layer {i} {tuple(Gs[i].shape)}: Y", c)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_grouped_backward(mask, dtype):
    dYs, Gs, As, Ss, Bs = make_group(GROUP_MIX, dtype)
    poison_cache()
    outs = torch.ops.apo.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, list(mask))
    expected = ref.precondition_grouped_backward(f64(dYs), f64(Gs), f64(As), f64(Ss), f64(Bs), mask)
    chain = ref.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, mask)
    assert len(outs) == 4
    for k, name in enumerate(("d_grad", "dA", "dS", "dB")):
        if not mask[k]:
            assert list(outs[k]) == [], f"{name}: masked-off output of the grouped op must be []"
            continue
        assert len(outs[k]) == len(GROUP_MIX)
        for i, (o, e, c) in enumerate(zip(outs[k], expected[k], chain[k])):
            assert_close(o, e, dtype, f"layer {i} {tuple(Gs[i].shape)}: {name}", c)


def _gemm_calls(fn):
    """(result of fn(), number of ATen GEMM calls it made)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_")
    return out, sum(e.count for e in prof.key_averages() if e.key in names)


@requires_cuda
@pytest.mark.parametrize("dtype", _dtype_params((torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_grouped_mid_size_layers_share_batched_gemms(mask, dtype):
    """Eight (130, 70) layers (three with A=None) and one (300, 20): the large-path layers of one
    shape and identity pattern run as one batch, so the call makes as many GEMM calls as one layer
    of each bucket does alone, not one set per layer; results against the float64 oracle."""
    shapes = [(130, 70)] * 8 + [(300, 20)]
    dYs, Gs, As, Ss, Bs = make_group(shapes, dtype)
    for i in (1, 4, 6):
        As[i] = None
    poison_cache()
    Ys, fwd_calls = _gemm_calls(lambda: torch.ops.apo.precondition_grouped(Gs, As, Ss, Bs))
    outs, bwd_calls = _gemm_calls(
        lambda: torch.ops.apo.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, list(mask)))
    buckets = [0, 1, 8]  # one layer of each bucket: (130, 70) with A, with A=None, (300, 20)
    one_fwd = sum(_gemm_calls(lambda i=i: torch.ops.apo.precondition(Gs[i], As[i], Ss[i], Bs[i]))[1] for i in buckets)
    one_bwd = sum(_gemm_calls(lambda i=i: torch.ops.apo.precondition_backward(
        dYs[i], Gs[i], As[i], Ss[i], Bs[i], list(mask)))[1] for i in buckets)
    assert fwd_calls == one_fwd, f"{fwd_calls} GEMM calls for the grouped forward, {one_fwd} for one layer per bucket"
    assert bwd_calls == one_bwd, f"{bwd_calls} GEMM calls for the grouped backward, {one_bwd} for one layer per bucket"
    for i in range(len(shapes)):
        A64, B64 = eye_for(As[i], Gs[i], "A"), eye_for(Bs[i], Gs[i], "B")
        assert_close(Ys[i], ref.precondition(Gs[i].double(), A64, Ss[i].double(), B64), dtype, f"layer {i}: Y",
                     ref.precondition(Gs[i], As[i], Ss[i], Bs[i]))  # no layer has both factors None
        check_identity_backward([o[i] if o else torch.empty(0, dtype=dtype, device="cuda") for o in outs],
                                dYs[i], Gs[i], As[i], Ss[i], Bs[i], mask, dtype)


@requires_cuda
def test_grouped_identity_mix_every_path():
    """Grouped layers with None factors on both paths, mixed with full layers, every mask."""
    shapes = [(7, 5), (64, 64), (130, 70), (3, 200), (257, 63), (16, 16)]
    dYs, Gs, As, Ss, Bs = make_group(shapes, torch.float32)
    As[0] = Bs[1] = As[2] = Bs[2] = As[4] = None
    Ys = torch.ops.apo.precondition_grouped(Gs, As, Ss, Bs)
    for i in range(len(shapes)):
        A64, B64 = eye_for(As[i], Gs[i], "A"), eye_for(Bs[i], Gs[i], "B")
        assert_close(Ys[i], ref.precondition(Gs[i].double(), A64, Ss[i].double(), B64), torch.float32, f"Y[{i}]")
    for mask in MASKS:
        outs = torch.ops.apo.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, list(mask))
        for k in range(4):
            assert len(outs[k]) == (len(shapes) if mask[k] else 0)
        for i in range(len(shapes)):
            check_identity_backward([o[i] if o else torch.empty(0, device="cuda") for o in outs],
                                    dYs[i], Gs[i], As[i], Ss[i], Bs[i], mask, torch.float32)


@requires_cuda
def test_grouped_noncontiguous_and_empty():
    dYs, Gs, As, Ss, Bs = make_group([(5, 9), (130, 70), (0, 4), (3, 0)], torch.float32)
    views = [[_strided(t, "transposed") for t in col] for col in (dYs, Gs, As, Ss, Bs)]
    Ys = torch.ops.apo.precondition_grouped(*views[1:])
    for y, e in zip(Ys, ref.precondition_grouped(f64(Gs), f64(As), f64(Ss), f64(Bs))):
        assert_close(y, e, torch.float32, "Y")
    outs = torch.ops.apo.precondition_grouped_backward(*views, [True] * 4)
    expected = ref.precondition_grouped_backward(f64(dYs), f64(Gs), f64(As), f64(Ss), f64(Bs))
    for k in range(4):
        for o, e in zip(outs[k], expected[k]):
            assert_close(o, e, torch.float32, f"output {k}")


@requires_cuda
def test_momentum_step_composite_on_cuda():
    """The fused momentum op on CUDA tensors (its composite kernel: ATen's elementwise ops and the
    CUDA grouped op): v bit for bit torch.optim.SGD's buf.mul_(μ).add_(g), Y against the float64
    reference, and the finiteness flags."""
    shapes = [(7, 5), (130, 70), (3000, 64)]
    _, Gs, As, Ss, Bs = make_group(shapes, torch.float32)
    As[2] = None  # a tall identity-A layer, as an embedding's
    Ms = [torch.randn_like(g) for g in Gs]
    vs, outs = [torch.empty_like(g) for g in Gs], [torch.empty_like(g) for g in Gs]
    flags = torch.ops.apo.precondition_momentum_grouped(Gs, Ms, 0.9, As, Ss, Bs, vs, outs)
    assert flags.device == Gs[0].device and flags.dtype == torch.bool  # read without a sync until here
    assert flags.tolist() == [True, True]
    for i in range(len(shapes)):
        assert torch.equal(vs[i], Ms[i].mul(0.9).add_(Gs[i]))
        A64, B64 = eye_for(As[i], Gs[i], "A"), eye_for(Bs[i], Gs[i], "B")
        assert_close(outs[i], ref.precondition(vs[i].double(), A64, Ss[i].double(), B64), torch.float32, f"Y[{i}]")
    Gs[1][3, 4] = float("nan")
    assert torch.ops.apo.precondition_momentum_grouped(Gs, Ms, 0.9, As, Ss, Bs, vs, outs).tolist() == [False, False]


@requires_cuda
def test_momentum_carry_composite_on_cuda():
    """carry=True on CUDA tensors (the composite kernel): out, holding Y(momenta) + 0.5, becomes
    0.9·out + Y(grads), against Y(0.9·momenta + grads) + 0.45 in float64; v bit for bit SGD's."""
    shapes = [(7, 5), (130, 70), (3000, 64)]
    _, Gs, As, Ss, Bs = make_group(shapes, torch.float32)
    As[2] = None  # a tall identity-A layer, as an embedding's
    Gs[2][torch.rand(3000, device=Gs[2].device) < 0.9] = 0  # most rows untouched
    Ms = [torch.randn_like(g) for g in Gs]
    # out enters as Y(momenta) + 0.5: a kernel that formed Y(v) afresh would miss 0.9·0.5
    outs = [y + 0.5 for y in torch.ops.apo.precondition_grouped(Ms, As, Ss, Bs)]
    vs = [torch.empty_like(g) for g in Gs]
    flags = torch.ops.apo.precondition_momentum_grouped(Gs, Ms, 0.9, As, Ss, Bs, vs, outs, carry=True)
    assert flags.device == Gs[0].device and flags.tolist() == [True, True]
    for i in range(len(shapes)):
        assert torch.equal(vs[i], Ms[i].mul(0.9).add_(Gs[i]))
        A64, B64 = eye_for(As[i], Gs[i], "A"), eye_for(Bs[i], Gs[i], "B")
        exact = Ms[i].double() * 0.9 + Gs[i].double()
        expected = ref.precondition(exact, A64, Ss[i].double(), B64) + 0.9 * 0.5
        assert_close(outs[i], expected, torch.float32, f"carried Y[{i}]")


@requires_cuda
def test_all_finite_on_cuda():
    """apo::all_finite's composite kernel on CUDA tensors: a 0-d bool on the device (no sync needed
    to get it), against torch.isfinite, every dtype the optimizers hold; CPU and CUDA mixed: refused."""
    dev = torch.device("cuda")
    ts = [torch.randn(33, 17, device=dev), torch.randn(5, device=dev, dtype=torch.float64),
          torch.randn(40, device=dev).half(), torch.randn(3, 9, device=dev).bfloat16().t()]
    out = torch.ops.apo.all_finite(ts)
    assert out.device.type == "cuda" and out.dtype == torch.bool and out.dim() == 0 and bool(out)
    for k, bad in enumerate((float("nan"), float("inf"), -float("inf"), float("nan"))):
        us = [t.clone() for t in ts]
        us[k][(-1,) * us[k].dim()] = bad  # the last element (a transposed view included)
        assert bool(torch.ops.apo.all_finite(us)) is False
    with pytest.raises(ValueError, match="tensors: every tensor must be on one device"):
        torch.ops.apo.all_finite([torch.ones(2), torch.ones(2, device=dev)])


@requires_cuda
def test_lookahead_write_on_cuda():
    """apo::lookahead_write's composite kernel on CUDA tensors: θ' bit for bit torch.add's (the
    half-precision parameter: its float32 sum rounded once), Σ‖Δ‖² a 0-d float64 on the device against
    the float64 sum, a NaN anywhere in Δ not finite; CPU and CUDA mixed: refused."""
    dev = torch.device("cuda")
    thetas = [torch.randn(33, 17, device=dev), torch.randn(5, device=dev, dtype=torch.float64),
              torch.randn(40, device=dev).bfloat16(), torch.randn(9, 3, device=dev).t()]
    deltas = [torch.randn(t.shape, device=dev, dtype=torch.float32 if t.dtype == torch.bfloat16 else t.dtype)
              for t in thetas]
    outs = [torch.empty_like(t) for t in thetas]
    got = torch.ops.apo.lookahead_write(thetas, deltas, outs)
    assert got.device.type == "cuda" and got.dtype == torch.float64 and got.dim() == 0
    assert math.isclose(float(got), sum(float((d.double() ** 2).sum()) for d in deltas), rel_tol=1e-12)
    for o, t, d in zip(outs, thetas, deltas):
        assert torch.equal(o, torch.add(t, d) if t.dtype == d.dtype else (t.float() + d).to(t.dtype))
    deltas[3][-1, -1] = float("nan")
    assert not math.isfinite(float(torch.ops.apo.lookahead_write(thetas, deltas, outs)))
    with pytest.raises(ValueError, match=r"deltas\[0\] is on cuda:0 but params\[0\] is on cpu"):
        torch.ops.apo.lookahead_write([torch.ones(2)], [torch.ones(2, device=dev)], [torch.empty(2)])


@requires_cuda
def test_dot_adam_step_on_cuda():
    """apo::dot_adam_step on CUDA tensors (the one kernel: ATen's sums, read back, then torch's fused Adam
    on the device): the gradient against the float64 sums, φ, its moments and counter bit for bit
    torch.optim.Adam(fused=True)'s on the device; a NaN writes nothing; CPU and CUDA mixed: refused."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(33, 17, generator=gen), torch.randn(5, generator=gen, dtype=torch.float64),
         torch.randn(40, generator=gen)]
    b = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in a]
    param = torch.randn(2, generator=gen, dtype=torch.float64).to(dev)
    twin = param.clone()
    adam = torch.optim.Adam([twin], lr=0.05, betas=(0.0, 0.9), fused=True)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    step = torch.zeros((), device=dev)
    got = torch.ops.apo.dot_adam_step([t.to(dev) for t in a], [t.to(dev) for t in b], [2, 1], param, exp_avg,
                                      exp_avg_sq, step, 0.05, 0.0, 0.9, 1e-8)
    want = [sum(float((x.double() * y.double()).sum()) for x, y in zip(a[:2], b[:2])),
            float((a[2].double() * b[2].double()).sum())]
    assert got.device.type == "cuda" and got.dtype == torch.float64
    assert all(math.isclose(g, w, rel_tol=1e-12, abs_tol=1e-12) for g, w in zip(got.tolist(), want))
    twin.grad = got.clone()
    adam.step()
    st = adam.state[twin]
    assert torch.equal(param, twin) and torch.equal(exp_avg, st["exp_avg"]) and torch.equal(exp_avg_sq, st["exp_avg_sq"])
    assert float(step) == float(st["step"]) == 1.0
    b[2][-1] = float("nan")
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq, step)]
    got = torch.ops.apo.dot_adam_step([t.to(dev) for t in a], [t.to(dev) for t in b], [2, 1], param, exp_avg,
                                      exp_avg_sq, step, 0.05, 0.0, 0.9, 1e-8)
    assert math.isnan(got.tolist()[1])
    assert all(torch.equal(x, y) for x, y in zip((param, exp_avg, exp_avg_sq, step), before))
    with pytest.raises(ValueError, match="a\\[0\\] is on cpu but param is on cuda:0"):
        torch.ops.apo.dot_adam_step([torch.ones(2)], [torch.ones(2)], [1], torch.zeros(1, device=dev,
                                    dtype=torch.float64), torch.zeros(1, device=dev, dtype=torch.float64),
                                    torch.zeros(1, device=dev, dtype=torch.float64), torch.zeros((), device=dev),
                                    0.1, 0.0, 0.9, 1e-8)


@requires_cuda
def test_kron_precondition_on_cuda():
    """apo::kron_precondition's composite kernel on CUDA tensors: out = L·G·R against float64 (1e-5 in
    float32, 1e-12 in float64, 1e-2 in bfloat16; cuBLAS's TF32 off), into a strided out too; CPU and
    CUDA mixed: refused."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for (m, n), dtype, tol in [((257, 33), torch.float32, 1e-5), ((64, 130), torch.float64, 1e-12),
                                   ((96, 96), torch.bfloat16, 1e-2)]:
            G, L, R = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((m, n), (m, m), (n, n)))
            want = L @ G @ R
            out = torch.empty(n, m, device=dev, dtype=dtype).t()
            torch.ops.apo.kron_precondition(G.to(dev, dtype), L.to(dev, dtype), R.to(dev, dtype), out)
            assert ((out.double().cpu() - want).norm() / want.norm()).item() <= tol
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(ValueError, match="L is on cuda:0 but grad is on cpu"):
        torch.ops.apo.kron_precondition(torch.ones(2, 3), torch.ones(2, 2, device=dev), torch.ones(3, 3),
                                        torch.empty(2, 3))


@requires_cuda
def test_kl_value_and_grad_on_cuda():
    """apo::kl_value_and_grad's composite kernel on CUDA tensors: value and gradient on the device in
    the compute dtype, against the CPU kernel on the same logits (the value to 1e-5 in float32, 1e-12
    in float64; each grad entry to 2e-6 or 1e-12 times scale/rows); CPU and CUDA mixed: refused."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    for shape, dtype, tol in [((100, 10), torch.float32, 1e-5), ((3, 5, 257), torch.float64, 1e-12),
                              ((64, 1000), torch.bfloat16, 1e-5)]:
        new = (torch.randn(shape, generator=gen) * 3).to(dtype)
        old = (torch.randn(shape, generator=gen) * 3).to(dtype)
        value, grad = torch.ops.apo.kl_value_and_grad(new.to(dev), old.to(dev), 0.3)
        cpu_value, cpu_grad = torch.ops.apo.kl_value_and_grad(new, old, 0.3)
        assert value.device.type == "cuda" and value.dtype == cpu_value.dtype and grad.dtype == cpu_grad.dtype
        rows = new.numel() // shape[-1]
        assert math.isclose(float(value), float(cpu_value), rel_tol=tol, abs_tol=tol)
        grad_tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert (grad.cpu().double() - cpu_grad.double()).abs().max() <= grad_tol * 0.3 / rows
    with pytest.raises(ValueError, match="old_out is on cuda:0 but new_out is on cpu"):
        torch.ops.apo.kl_value_and_grad(torch.ones(2, 3), torch.ones(2, 3, device=dev), 1.0)


# ------------------------------------------------------------------------------------------------
# compile check (runs on CPU)
# ------------------------------------------------------------------------------------------------


def _nvcc():
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build (CUDA headers incomplete)")
def test_cuda_sources_compile():
    """csrc/cuda/*.cu compile for sm_80 and sm_90 without errors or warnings (~1-2 min on 2 cores)."""
    script = ROOT / "scripts" / "check_cuda_compile.sh"
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc compile check failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------
# the CUDA kernels' source, emulated on the CPU (runs here)
# ------------------------------------------------------------------------------------------------


def _host_toolchain_missing():
    """Why a C++ extension cannot be built here (no compiler or no ninja), else None."""
    from torch.utils import cpp_extension

    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def build_host_extension(name, source, build_dir):
    """Compiles `source` as a torch C++ extension (TORCH_LIBRARY registration, no Python module).

    Skips only when the toolchain is missing; a compile error raises, so it fails the test."""
    from torch.utils import cpp_extension

    missing = _host_toolchain_missing()
    if missing is not None:
        pytest.skip(f"cannot build {name}: {missing}")
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_include_paths=[str(ROOT / "csrc" / "cuda")],
        extra_cflags=["-O1", "-g0"],
        build_directory=str(build_dir),
        is_python_module=False,
    )


@pytest.fixture(scope="module")
def emulated_kernels():
    """Builds csrc/cuda/host_emulation.cpp: the kernels of precondition_kernels.cuh compiled as C++,
    every thread of a block a fiber, in lockstep between barriers (see that file). Registers
    torch.ops.apo_cuda_emu.*."""
    build_host_extension("apo_cuda_emu", ROOT / "csrc" / "cuda" / "host_emulation.cpp", ROOT / "build" / "cuda_emu")
    return torch.ops.apo_cuda_emu


def test_host_build_error_fails_not_skips(tmp_path):
    """A compile error in the emulation source must fail the emulation test, never skip it."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#include <ATen/ATen.h>\nthis is not C++;\n")
    with pytest.raises(RuntimeError, match="(?i)error building extension"):
        build_host_extension("apo_broken_emu", broken, tmp_path / "build")


@pytest.mark.parametrize("require", [False, True], ids=["fallback", "required"])
def test_setup_require_cuda_flag(require):
    """APO_KERNELS_REQUIRE_CUDA=1 turns setup.py's CPU-only fallback into an error."""
    env = dict(os.environ, APO_KERNELS_SKIP_CUDA="1")
    env.pop("APO_KERNELS_REQUIRE_CUDA", None)
    if require:
        env["APO_KERNELS_REQUIRE_CUDA"] = "1"
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if require:
        assert proc.returncode != 0, proc.stdout
        assert "APO_KERNELS_REQUIRE_CUDA=1" in proc.stderr and "APO_KERNELS_SKIP_CUDA=1" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "building the CPU kernels only" in proc.stderr


EMU_SHAPES = [(1, 1), (1, 7), (7, 1), (5, 9), (16, 16), (17, 3), (32, 31), (33, 17), (64, 64), (0, 5), (4, 0)]
EMU_IDENTITY_SHAPES = [(5, 9), (33, 17), (64, 64)]  # also run with A, B or both None (identity)


def _eye_for(factor, size, lead, dtype):
    """The explicit identity standing for a None factor (for the reference)."""
    return factor if factor is not None else torch.eye(size, dtype=dtype).expand(*lead, size, size)


def _check_emulated(out, expected, chain, dtype, tol, what, elementwise_only):
    """_contract.check, except where both factors are the identity in half precision: every output
    is then one elementwise product, which the torch chain also rounds only once, so only the oracle
    bound (one rounding of the exact result) applies."""
    if elementwise_only and dtype in _contract.HALF_DTYPES:
        err = _contract.rel_err(out, expected)
        assert out.dtype == dtype and err <= _contract.UNIT_ROUNDOFF[dtype] + _contract.FP32_SLACK, f"{what}: {err:.3g}"
    else:
        _contract.check(out, expected, dtype, tol, chain=chain, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_kernels_emulated_on_host(emulated_kernels, dtype):
    """The small-layer kernels and the elementwise kernel, from their CUDA source, vs float64: each
    block with the threads of its size class in lockstep (odd blocks in reverse thread order, so a
    batch of 2 covers both), identity factors as None; outputs and shared memory start as NaN,
    inputs are strided views. ~1 min to build."""
    emu = emulated_kernels
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype)  # half precision: tests/_contract.py
    # Launch shapes: size class, threads per block, shared-memory bytes. The fp32 (and half) backward
    # at 64x64 fits two blocks per SM on an A100 (164 KB, 1 KB reserved per block).
    assert tuple(emu.launch_shape(5, 9, True, dtype)[:2]) == (16, 32)
    assert tuple(emu.launch_shape(32, 31, True, dtype)[:2]) == (32, 64)
    assert tuple(emu.launch_shape(64, 17, True, dtype)[:2]) == (64, 256)
    if dtype != torch.float64:
        assert emu.launch_shape(64, 64, True, dtype)[2] <= 81 * 1024
    for (m, n) in EMU_SHAPES:
        for batch in (None, 2):
            identities = [(False, False)]
            if (m, n) in EMU_IDENTITY_SHAPES and batch == 2:
                identities += [(True, False), (False, True), (True, True)]
            gen = torch.Generator().manual_seed(m * 100 + n)
            lead = () if batch is None else (batch,)
            G = torch.randn(*lead, m, n, generator=gen, dtype=torch.float64)
            dY = torch.randn(*lead, m, n, generator=gen, dtype=torch.float64)
            S = torch.rand(*lead, m, n, generator=gen, dtype=torch.float64) + 0.5
            A = torch.randn(*lead, m, m, generator=gen, dtype=torch.float64) / math.sqrt(max(m, 1))
            B = torch.randn(*lead, n, n, generator=gen, dtype=torch.float64) / math.sqrt(max(n, 1))
            ins = [_strided(t.to(dtype), "transposed") for t in (dY, G, A, S, B)]
            for no_a, no_b in identities:
                run = list(ins)
                if no_a:
                    run[2] = None
                if no_b:
                    run[4] = None
                eyes = list(run)
                eyes[2] = _eye_for(run[2], m, lead, dtype)
                eyes[4] = _eye_for(run[4], n, lead, dtype)
                exact = f64(eyes)
                where = f"{dtype} {(m, n)} batch={batch} A={'I' if no_a else 'A'} B={'I' if no_b else 'B'}"
                Y = emu.small_forward(*run[1:])
                expected = ref.precondition(*exact[1:])
                _check_emulated(Y, expected, ref.precondition(*eyes[1:]), dtype, tol, f"Y {where}", no_a and no_b)
                for mask in MASKS:
                    outs = emu.small_backward(*run, list(mask))
                    expected = ref.precondition_backward(*exact, output_mask=mask)
                    chains = ref.precondition_backward(*eyes, output_mask=mask)
                    for k, name in enumerate(("d_grad", "dA", "dS", "dB")):
                        identity_grad = (k == 1 and no_a) or (k == 3 and no_b)
                        if not mask[k] or identity_grad:
                            assert tuple(outs[k].shape) == (0,), f"{name} {where}"
                            continue
                        _check_emulated(outs[k], expected[k], chains[k], dtype, tol, f"{name} {where} mask={mask}",
                                        no_a and no_b)
    # The large path's elementwise pass, with M over H and E over D in place as the op uses it.
    S, H, D = (torch.randn(3, 50, 7, dtype=torch.float64).to(dtype) for _ in range(3))
    M, E, dS = emu.elementwise(S, H, D)
    bound = tol if tol is not None else _contract.UNIT_ROUNDOFF[dtype] + _contract.FP32_SLACK  # one product, rounded once
    for got, want in ((M, S.double() * H.double()), (E, S.double() * D.double()), (dS, D.double() * H.double())):
        assert rel_err(got, want) <= bound

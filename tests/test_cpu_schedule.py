"""The CPU op's schedule and its direct paths, against the float64 reference.

The grouped CPU op runs some layers alone on all threads and the rest in one shared parallel loop
(which layers: csrc/cpu_schedule.h, whose decisions the C++ test checks); 2-D float32/float64 layers
that are small, or have an identity A and at most 512 columns (processed in blocks of rows, the
dB of each thread's blocks summed afterwards), call BLAS directly. These tests run the op on sets
that take each of those routes, mixed, at 1 and 2 threads, with identity factors and strided
inputs. Tolerances (relative Frobenius error against float64 on the same inputs): float64 1e-10,
float32 1e-5.
"""
import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import reference

op = torch.ops.apo
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MASKS = [(True, True, True, True), (False, True, True, True), (True, False, False, False)]


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def make(m, n, dtype, a=True, b=True, transposed=False, sliced=False, seed=0):
    """(dY, G, A or None, S, B or None); `transposed`: every matrix a transposed view; `sliced`: a
    column slice of a wider matrix (rows further apart than their length)."""
    gen = torch.Generator().manual_seed(seed)

    def r(rows, cols):
        if sliced:
            return torch.randn(rows, cols + 5, generator=gen).to(dtype)[:, 2 : 2 + cols]
        x = torch.randn(cols, rows, generator=gen).t() if transposed else torch.randn(rows, cols, generator=gen)
        return x.to(dtype)

    dY, G = r(m, n), r(m, n)
    A = (torch.eye(m, dtype=dtype) + r(m, m) / m**0.5) if a else None
    S = r(m, n).abs_().add_(0.5)  # in place: a sliced S stays a strided view
    B = (torch.eye(n, dtype=dtype) + r(n, n) / n**0.5) if b else None
    return dY, G, A, S, B


def f64(t):
    return None if t is None else t.double()


def check(got, want, dtype, what):
    if want is None:  # an identity factor's gradient: an empty (0,) tensor
        assert got.shape == (0,), what
        return
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous(), what
    err = ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def check_layer(layer, y, grads, mask, dtype, what):
    dY, G, A, S, B = (f64(t) for t in layer)
    check(y, reference.precondition(G, A, S, B), dtype, f"{what} Y")
    want = reference.precondition_backward(dY, G, A, S, B, mask)
    for k, name in enumerate(("dG", "dA", "dS", "dB")):
        if mask[k]:
            check(grads[k], want[k], dtype, f"{what} {name}")


# Tall layers with an identity side take the row-blocked path (5003×37: 6 blocks of 885 rows);
# 700×513 is one column too wide for it; 1×1 and 33×9 are small layers.
IDENTITY_SHAPES = [(5003, 37), (4099, 64), (700, 513), (1, 1), (33, 9)]
FACTORS = {"A=None": (False, True), "A=B=None": (False, False), "B=None": (True, False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", IDENTITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("factors", FACTORS, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("GASB"[i] if b else "-" for i, b in enumerate(m)))
def test_identity_side_single(threads, dtype, shape, factors, mask):
    if factors == "B=None" and shape[0] > 1000:
        pytest.skip("a tall layer with a learnt A (m×m) is not what the identity-side path is for")
    layer = make(*shape, dtype, *FACTORS[factors])
    dY, G, A, S, B = layer
    y = op.precondition(G, A, S, B)
    grads = op.precondition_backward(dY, G, A, S, B, list(mask))
    check_layer(layer, y, grads, mask, dtype, f"{shape} {factors}")


@pytest.mark.parametrize("shape,a", [((5003, 37), False), ((33, 9), True)], ids=["5003x37-A=None", "33x9"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("GASB"[i] if b else "-" for i, b in enumerate(m)))
def test_sliced_inputs(threads, shape, a, mask):
    layer = make(*shape, torch.float64, a=a, sliced=True)
    assert not layer[1].is_contiguous() and layer[1].stride(1) == 1
    dY, G, A, S, B = layer
    y = op.precondition(G, A, S, B)
    grads = op.precondition_backward(dY, G, A, S, B, list(mask))
    check_layer(layer, y, grads, mask, torch.float64, f"sliced {shape}")


# A size-1 dimension's stride is arbitrary: a transposed (7, 1) view has strides (1, 7) and torch
# calls it contiguous, so it reaches the direct path as it is and must be read as a column.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (1, 7), (1, 1), (300, 1), (1, 300)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("factors", FACTORS, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("GASB"[i] if b else "-" for i, b in enumerate(m)))
def test_size_one_dimensions_with_any_stride(threads, dtype, shape, factors, mask):
    layer = make(*shape, dtype, *FACTORS[factors], transposed=True)
    dY, G, A, S, B = layer
    y = op.precondition(G, A, S, B)
    grads = op.precondition_backward(dY, G, A, S, B, list(mask))
    check_layer(layer, y, grads, mask, dtype, f"transposed {shape} {factors}")
    (y_grouped,) = op.precondition_grouped([G], [A], [S], [B])
    check_layer(layer, y_grouped, grads, mask, dtype, f"grouped transposed {shape} {factors}")


def test_row_blocked_db_is_deterministic(threads):
    """dB sums over row blocks in a fixed order: two runs give the same bits."""
    dY, G, _, S, B = make(5003, 37, torch.float32)
    first = op.precondition_backward(dY, G, None, S, B, [False, False, True, True])
    second = op.precondition_backward(dY, G, None, S, B, [False, False, True, True])
    assert torch.equal(first[3], second[3]) and torch.equal(first[2], second[2])


def mixed_set(dtype):
    """Layers that take every route of the grouped op: the 40-256-256-10 MLP's (its 256×257 runs
    alone), small ones of odd sizes with every identity combination and strided (transposed,
    sliced) inputs, a tall identity-A layer (row-blocked), a big layer (ATen path)."""
    layers = [make(256, 41, dtype, seed=1), make(256, 257, dtype, seed=2), make(10, 257, dtype, seed=3)]
    for i in range(12):
        m, n = 3 + 11 * i, 130 - 9 * i
        layers.append(
            make(m, n, dtype, a=i % 4 != 1, b=i % 4 != 2, transposed=i % 3 == 0, sliced=i % 3 == 1, seed=10 + i)
        )
    layers.append(make(3001, 29, dtype, a=False, seed=30))
    layers.append(make(600, 300, dtype, seed=31))
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("GASB"[i] if b else "-" for i, b in enumerate(m)))
def test_grouped_mixed_set(threads, dtype, mask):
    layers = mixed_set(dtype)
    dYs, Gs, As, Ss, Bs = (list(x) for x in zip(*layers))
    ys = op.precondition_grouped(Gs, As, Ss, Bs)
    grads = op.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, list(mask))
    for k in range(4):
        assert len(grads[k]) == (len(layers) if mask[k] else 0)
    for i, layer in enumerate(layers):
        per_layer = [grads[k][i] if mask[k] else None for k in range(4)]
        check_layer(layer, ys[i], per_layer, mask, dtype, f"layer {i} {tuple(layer[1].shape)}")



def _mkl_max_threads():
    """MKL's thread count for the calling thread (its C interface in libtorch_cpu), or None without MKL."""
    import ctypes
    import os

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    return lib.MKL_Get_Max_Threads() if hasattr(lib, "MKL_Get_Max_Threads") else None


def test_parallel_regions_leave_blas_threads_as_they_were():
    """Inside its parallel regions the op makes each thread's BLAS calls single-threaded; afterwards
    the calling thread's BLAS uses all intra-op threads again (else every later GEMM runs on one)."""
    if _mkl_max_threads() is None:
        pytest.skip("torch's BLAS is not MKL: the op leaves BLAS threading alone")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _mkl_max_threads() == 2
        layers = mixed_set(torch.float32)
        dYs, Gs, As, Ss, Bs = (list(x) for x in zip(*layers))
        op.precondition_grouped(Gs, As, Ss, Bs)
        op.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, [True, True, True, True])
        dY, G, _, S, B = make(5003, 37, torch.float32)  # row blocks in parallel, alone
        op.precondition(G, None, S, B)
        op.precondition_backward(dY, G, None, S, B, [True, False, True, True])
        assert _mkl_max_threads() == 2
    finally:
        torch.set_num_threads(before)

"""``apo::dot_sum(a, b) -> Tensor``: Σ_i ⟨a_i, b_i⟩ as a 0-d float64 tensor, every product and sum in
float64 (APO-LR's meta-gradient, ``apo_kernels.optim.lr._sum_of_dots``).

Oracle: the float64 sum of the float64 products, to 1e-12 of Σ|a·b| (the kernel sums in SIMD lanes and
threads in no fixed order; a float input's products are exact in float64). The inputs cover what the
CPU kernel treats differently: float32 / float64 pairs laid out densely and alike (its own loop, split
over threads above 2^14 elements), and everything else (ATen's ops): pairs laid out unlike, of two
dtypes, half precision. A NaN or inf anywhere makes the sum not finite.
"""
import math

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends
from test_lookahead_op import BAD, fresh  # the lookahead_write tests' inputs: values and non-finite ones

pytestmark = pytest.mark.skipif(backends.native_dot_sum is None,
                                reason="the native module apo_kernels._C is not built")

SHAPES = [(1,), (7,), (33, 5), (3, 129), (2, 3, 31), (1 << 14) * 3 + 5, 200003]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def op(a, b):
    return torch.ops.apo.dot_sum(a, b)


def column_major(t):
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t


def check(a, b, got):
    products = [x.double() * y.double() for x, y in zip(a, b)]
    ref = sum(float(p.sum()) for p in products)
    size = sum(float(p.abs().sum()) for p in products)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) - ref) <= 1e-12 * size + 1e-300, (float(got), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_float64_sum(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    a, b = fresh(shape, dtype, gen), fresh(shape, dtype, gen)
    for layout in (lambda t: t, column_major):  # one layout for both: the dense loop, or ATen's ops
        check([layout(a)], [layout(b)], op([layout(a)], [layout(b)]))


def test_many_pairs_of_every_kind_in_one_call_and_inputs_unwritten():
    gen = torch.Generator().manual_seed(0)
    a = [fresh((5, 3), torch.float32, gen), fresh(200000, torch.float32, gen), fresh(4, torch.float64, gen),
         fresh((9, 2), torch.float32, gen), fresh(6, torch.bfloat16, gen)]
    b = [fresh(t.shape, t.dtype, gen) for t in a]
    b[0] = column_major(fresh((5, 3), torch.float32, gen))  # laid out unlike its pair: ATen's ops
    b[3] = b[3].double()  # another dtype than its pair
    before = [t.clone() for t in a + b]
    check(a, b, op(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a + b, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_non_finite_value_anywhere_makes_the_sum_not_finite(dtype):
    gen = torch.Generator().manual_seed(1)
    n = (1 << 14) * 5 + 3  # several chunks of the threaded loop, and a tail
    for bad in BAD:
        for which, k, pos in (("a", 0, 2), ("b", 1, 0), ("a", 1, (1 << 14) - 1), ("b", 1, n - 1)):
            pairs = {name: [fresh(7, dtype, gen), fresh(n, dtype, gen)] for name in ("a", "b")}
            pairs[which][k][pos] = bad
            assert not math.isfinite(float(op(pairs["a"], pairs["b"]))), (bad, which, k, pos)


def test_empty_lists_and_tensors():
    assert float(op([], [])) == 0.0
    assert float(op([torch.zeros(0)], [torch.zeros(0)])) == 0.0


def test_bad_inputs_are_refused_by_name():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    cases = [
        (([x, x], [y]), ValueError, "a and b must have the same length"),
        (([x], [torch.randn(4, 3)]), ValueError, r"b\[0\] must have the shape of a\[0\] \(3, 4\)"),
        (([torch.ones(3, 4, dtype=torch.int64)], [y]), TypeError, r"a\[0\] has dtype torch.int64"),
        (([x], [y.to_sparse()]), ValueError, r"b\[0\] must be a dense \(strided\) tensor"),
        # a meta tensor sends the call to the fake kernel, which names the lists
        (([x], [torch.empty(3, 4, device="meta")]), ValueError, "a, b: every tensor must be on one device"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    a = [fresh((4, 3), torch.float32, gen), fresh(7, torch.float64, gen)]
    b = [fresh(t.shape, t.dtype, gen) for t in a]
    torch.library.opcheck(torch.ops.apo.dot_sum.default, (a, b))


def test_composite_kernel_agrees_with_the_float64_sum():
    """The composite kernel (CompositeExplicitAutograd: what CUDA and every other device run), reached
    on CPU tensors by redispatching to its key."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    redispatch = torch.ops.apo.dot_sum.default.redispatch
    gen = torch.Generator().manual_seed(4)
    a = [fresh((33, 5), torch.float32, gen), fresh(200003, torch.float32, gen), fresh(7, torch.float64, gen),
         fresh(9, torch.bfloat16, gen)]
    b = [fresh(t.shape, t.dtype, gen) for t in a]
    check(a, b, redispatch(composite, a, b))
    b[1][-1] = float("nan")
    assert math.isnan(float(redispatch(composite, a, b)))
    assert float(redispatch(composite, [], [])) == 0.0
    with pytest.raises(ValueError, match=r"b\[0\] must have the shape of a\[0\]"):
        redispatch(composite, a[:1], [torch.randn(5, 33)])

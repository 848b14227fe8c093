"""``apo::kl_value_and_grad(new_out, old_out, scale) -> (value, grad)``: the FSD term's KL divergence
(mean over rows of KL(softmax(old) ‖ softmax(new)), softmax over the last dim) and scale times its
gradient with respect to ``new_out``, in one call (``apo_kernels.optim.discrepancy``).

Oracle: the same formulas in float64 with torch's log_softmax, on the op's inputs (float16 and
bfloat16 inputs are computed in float32, exactly as read), a class with p_old = 0 adding nothing. Tolerances per compute dtype: the value to
1e-12 (float64) or 1e-6 (float32) relative and absolute, each grad entry (at most |scale|/rows in
size) to 1e-12 or 1e-6 times |scale|/rows (the kernel's float32 errors measured ≤ 1.5e-7 of those
units over 40 seeds per shape and dtype).
The shapes cover one row and one class, odd class counts (tails past a SIMD vector), more leading
dims, many short rows and few long ones above the threads' grain (32 Ki elements), and strided views.
"""
import math

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends
from apo_kernels.optim import discrepancy

pytestmark = pytest.mark.skipif(backends.native_kl_value_and_grad is None,
                                reason="the native module apo_kernels._C is not built")

SHAPES = [(1,), (7,), (5, 1), (5, 3), (3, 5, 11), (100, 10), (2, 3, 257), (4001, 17), (3, 40003)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (value relative, grad absolute in units of scale / rows) per compute dtype
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}


def op(new, old, scale=1.0):
    return torch.ops.apo.kl_value_and_grad(new, old, scale)


def reference(new, old, scale):
    """float64 value and grad of the inputs as the op reads them (rounded to its compute dtype)."""
    x, y = new.double(), old.double()
    log_new, log_old = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    rows = new.numel() // new.shape[-1]
    p_old = log_old.exp()
    value = torch.where(p_old == 0, 0.0, p_old * (log_old - log_new)).sum() / rows  # 0·log 0 = 0
    return value, (log_new.exp() - p_old) * scale / rows


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(shape, dtype, gen, spread=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(dtype)


def check_close(new, old, scale, value, grad):
    ct = compute_dtype(new.dtype)
    assert value.dtype == ct and value.dim() == 0
    assert grad.dtype == ct and grad.shape == new.shape
    ref_value, ref_grad = reference(new, old, scale)
    value_tol, grad_tol = TOLERANCE[ct]
    rows = new.numel() // new.shape[-1]
    assert math.isclose(float(value), float(ref_value), rel_tol=value_tol, abs_tol=value_tol), (float(value), float(ref_value))
    err = (grad.double() - ref_grad).abs().max().item()
    assert err <= grad_tol * abs(scale) / rows, (err, grad_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_float64_reference(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    new, old = logits(shape, dtype, gen), logits(shape, dtype, gen)
    for scale in (1.0, 0.37, -2.5):
        value, grad = op(new, old, scale)
        check_close(new, old, scale, value, grad)


def test_strided_views_read_like_their_contiguous_copies():
    gen = torch.Generator().manual_seed(1)
    base_new, base_old = logits((13, 9), torch.float32, gen), logits((13, 9), torch.float32, gen)
    for view in (lambda t: t.t(), lambda t: t[::2], lambda t: t[:, 1:8]):
        new, old = view(base_new), view(base_old)
        value, grad = op(new, old, 0.5)
        v2, g2 = op(new.contiguous(), old.contiguous(), 0.5)
        assert torch.equal(value, v2) and torch.equal(grad, g2)
        check_close(new, old, 0.5, value, grad)


def test_equal_distributions_give_zero_and_inputs_are_left_unwritten():
    gen = torch.Generator().manual_seed(2)
    new = logits((20, 7), torch.float32, gen)
    old = new + 4.0  # the same softmax
    before = (new.clone(), old.clone(), new._version, old._version)
    value, grad = op(new, old, 1.0)
    assert abs(float(value)) < 1e-6 and grad.abs().max() < 1e-7
    assert torch.equal(new, before[0]) and torch.equal(old, before[1])
    assert (new._version, old._version) == before[2:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_logits_give_what_the_reference_gives(dtype):
    """A NaN or ±inf in a row makes exactly the entries NaN, and the value finite or not, as the
    float64 log_softmax reference does (a −inf in old alone is a masked class: finite); the other
    rows' gradients are as without it."""
    gen = torch.Generator().manual_seed(3)
    grad_tol = TOLERANCE[dtype][1] / 6
    keep = torch.tensor([r != 2 for r in range(6)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for which in ("new", "old"):
            for col in (0, 4, 16):  # first, inside and past the first SIMD vector
                new, old = logits((6, 17), dtype, gen), logits((6, 17), dtype, gen)
                (new if which == "new" else old)[2, col] = bad
                value, grad = op(new, old, 1.0)
                ref_value, ref_grad = reference(new, old, 1.0)
                assert math.isfinite(float(value)) == math.isfinite(float(ref_value)), (bad, which, col)
                assert torch.equal(torch.isnan(grad), torch.isnan(ref_grad)), (bad, which, col)
                assert (grad[keep].double() - ref_grad[keep]).abs().max() <= grad_tol, (bad, which, col)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_classes_add_nothing(dtype):
    """A class masked with a −inf logit (a language model's padding token, an invalid action) has
    p = 0 and adds nothing to KL (0·log 0 = 0): masked in both outputs, the value is the KL over the
    other classes, and its gradient there is 0; masked in old alone, the value stays finite; masked in
    new alone (p_old > 0, p_new = 0) it is +inf. The composite kernel and the torch fallback agree."""
    gen = torch.Generator().manual_seed(7)
    new, old = logits((6, 17), dtype, gen), logits((6, 17), dtype, gen)
    masked = torch.zeros(6, 17, dtype=torch.bool)
    masked[:, [0, 9, 16]] = True  # first, inside and last of a SIMD vector
    masked[3] = False
    both_new, both_old = new.masked_fill(masked, float("-inf")), old.masked_fill(masked, float("-inf"))
    value, grad = op(both_new, both_old, 1.0)
    check_close(both_new, both_old, 1.0, value, grad)
    kept = ~masked[0]
    rows_value = [discrepancy.kl(new[r:r + 1, ~masked[r]].double(), old[r:r + 1, ~masked[r]].double()) for r in range(6)]
    assert math.isclose(float(value), float(sum(rows_value) / 6), rel_tol=TOLERANCE[compute_dtype(dtype)][0] * 10)
    assert torch.isfinite(grad).all() and grad[masked].eq(0).all() and kept.any()
    value_old_only, _ = op(new, both_old, 1.0)
    assert math.isfinite(float(value_old_only))
    value_new_only, _ = op(both_new, old, 1.0)
    assert float(value_new_only) == math.inf
    for fallback in (discrepancy.kl_value_and_grad_torch(both_new, both_old, 1.0),
                     torch.ops.apo.kl_value_and_grad.default.redispatch(
                         torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), both_new, both_old,
                         1.0)):
        assert math.isclose(float(fallback[0]), float(value), rel_tol=1e-5) and torch.isfinite(fallback[1]).all()
    assert math.isclose(float(discrepancy.kl(both_new, both_old)), float(value), rel_tol=1e-5)


def test_bad_inputs_are_refused_by_name():
    t = torch.randn(4, 5)
    cases = [
        ((t, torch.randn(5, 4), 1.0), ValueError, r"old_out must have the shape of new_out \(4, 5\), got \(5, 4\)"),
        ((t, t.double(), 1.0), TypeError, "old_out has dtype torch.float64 but new_out has torch.float32"),
        ((t.long(), t.long(), 1.0), TypeError, "new_out has dtype torch.int64"),
        ((t.to_sparse(), t, 1.0), ValueError, r"new_out must be a dense \(strided\) tensor"),
        ((torch.tensor(1.0), torch.tensor(2.0), 1.0), ValueError, "new_out must have at least one dimension"),
        ((torch.zeros(0, 3), torch.zeros(0, 3), 1.0), ValueError, "new_out must have at least one dimension and one element"),
        ((t, t, float("nan")), ValueError, "scale must be a finite number"),
        ((t, t, float("inf")), ValueError, "scale must be a finite number"),
        # a meta tensor sends the call to the fake kernel, which applies the same rules
        ((t, torch.empty(4, 5, device="meta"), 1.0), ValueError, "old_out is on meta but new_out is on cpu"),
        ((torch.empty(4, 5, device="meta"), torch.empty(4, 6, device="meta"), 1.0), ValueError, "old_out must have the shape"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args)


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        torch.library.opcheck(torch.ops.apo.kl_value_and_grad.default,
                              (logits((6, 5), dtype, gen), logits((6, 5), dtype, gen), 0.3))


def test_composite_kernel_agrees_with_the_cpu_kernel():
    """The composite kernel (what CUDA and every other device run), reached on CPU tensors by
    redispatching to its key, against the same reference."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    gen = torch.Generator().manual_seed(5)
    for shape, dtype in [((100, 10), torch.float32), ((3, 5, 11), torch.float64), ((9, 4), torch.bfloat16)]:
        new, old = logits(shape, dtype, gen), logits(shape, dtype, gen)
        value, grad = torch.ops.apo.kl_value_and_grad.default.redispatch(composite, new, old, 0.7)
        check_close(new, old, 0.7, value, grad)
    with pytest.raises(ValueError, match="old_out must have the shape"):
        torch.ops.apo.kl_value_and_grad.default.redispatch(composite, torch.randn(2, 3), torch.randn(3, 2), 1.0)


def test_value_and_grad_calls_it_once_and_the_python_fallback_agrees(monkeypatch):
    """``discrepancy.value_and_grad(kl, ...)`` (the FSD term of every meta-step) is one call of the op;
    without the native module its torch expression gives the same value and gradient, in the output's
    dtype."""
    calls = []
    real = backends.native_kl_value_and_grad

    def counting(new, old, scale):
        calls.append(tuple(new.shape))
        return real(new, old, scale)

    gen = torch.Generator().manual_seed(6)
    cases = [(logits((32, 10), torch.float32, gen), logits((32, 10), torch.float32, gen)),
             (logits((4, 3, 6), torch.float64, gen), logits((4, 3, 6), torch.float64, gen)),
             (logits((8, 5), torch.float16, gen), logits((8, 5), torch.float16, gen))]
    monkeypatch.setattr(backends, "native_kl_value_and_grad", counting)
    native = [discrepancy.value_and_grad(discrepancy.kl, new, old, 0.1) for new, old in cases]
    assert calls == [(32, 10), (4, 3, 6), (8, 5)]
    monkeypatch.setattr(backends, "native_kl_value_and_grad", None)
    fallback = [discrepancy.value_and_grad(discrepancy.kl, new, old, 0.1) for new, old in cases]
    # the gradient comes back in the output's dtype: float16 rounds entries of ≤ 0.1/8 to ≈ 6e-6
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-5}
    for (new, old), (v1, g1), (v2, g2) in zip(cases, native, fallback):
        assert g1.dtype == g2.dtype == new.dtype
        value_tol = 1e-12 if new.dtype == torch.float64 else 1e-6
        assert math.isclose(float(v1), float(v2), rel_tol=value_tol, abs_tol=value_tol)
        assert torch.allclose(g1.double(), g2.double(), rtol=0, atol=grad_tol[new.dtype])
        # and both are the autograd gradient of the discrepancy itself
        leaf = new.double().requires_grad_(True)
        (auto,) = torch.autograd.grad(discrepancy.kl(leaf, old.double()), leaf)
        assert torch.allclose(g1.double(), 0.1 * auto, rtol=0, atol=grad_tol[new.dtype])

"""``apo::dot_adam_step(a, b, segments, param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)``: one
step of torch.optim.Adam (fused) on a 1-D param whose gradient entry e is Σ ⟨a_i, b_i⟩ over the e-th run
of ``segments[e]`` consecutive pairs (APO-LR's meta-step: ∂Q/∂log lr per group and φ's step).

Oracles: the gradient, the float64 sum of the float64 products to 1e-12 of Σ|a·b| (as dot_sum's); the
step, torch.optim.Adam(fused=True) itself, given that gradient as ``.grad``: the same bits in param, its
moments and its step counter, step after step (the op calls torch's kernel with the same arguments).
A NaN or inf in any pair makes the gradient not finite and leaves everything as it was.
"""
import math

import pytest
import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import backends
from test_lookahead_op import BAD, fresh  # the lookahead_write tests' inputs: values and non-finite ones

pytestmark = pytest.mark.skipif(backends.native_dot_adam_step is None,
                                reason="the native module apo_kernels._C is not built")


def pairs(segments, gen, dtypes=(torch.float32, torch.float64)):
    """Pairs of odd shapes and mixed dtypes (float32 pairs over 2^14 elements: the threaded loop)."""
    shapes = [(33, 5), (1 << 14) * 3 + 5, (7,), (3, 129), (2, 3, 31), (1,)]
    a = [fresh(shapes[i % len(shapes)], dtypes[i % len(dtypes)], gen) for i in range(sum(segments))]
    return a, [fresh(t.shape, t.dtype, gen) for t in a]


def reference_gradient(a, b, segments):
    out, k = [], 0
    for n in segments:
        products = [x.double() * y.double() for x, y in zip(a[k:k + n], b[k:k + n])]
        out.append((sum(float(p.sum()) for p in products), sum(float(p.abs().sum()) for p in products)))
        k += n
    return out


def adam_state(param):
    return torch.zeros_like(param), torch.zeros_like(param), torch.zeros((), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("segments", [[3], [2, 0, 3], [1, 1, 1, 1, 1]], ids=str)
@pytest.mark.parametrize("betas", [(0.0, 0.9), (0.9, 0.999)], ids=str)
def test_the_gradient_is_the_float64_sum_and_the_step_is_torchs(segments, dtype, betas):
    gen = torch.Generator().manual_seed(len(segments) + 7 * int(betas[0] * 10))
    param = torch.randn(len(segments), dtype=dtype, generator=gen)
    twin = param.clone()
    torch_adam = torch.optim.Adam([twin], lr=0.03, betas=betas, eps=1e-8, fused=True)
    exp_avg, exp_avg_sq, step = adam_state(param)
    for _ in range(4):
        a, b = pairs(segments, gen)
        before = [t.clone() for t in a + b]
        got = torch.ops.apo.dot_adam_step(a, b, segments, param, exp_avg, exp_avg_sq, step, 0.03, *betas, 1e-8)
        assert got.dtype == torch.float64 and got.shape == (len(segments),)
        for value, (ref, size) in zip(got.tolist(), reference_gradient(a, b, segments)):
            assert abs(value - ref) <= 1e-12 * size + 1e-300, (value, ref)
        twin.grad = got.to(dtype)
        torch_adam.step()
        st = torch_adam.state[twin]
        assert torch.equal(param, twin) and torch.equal(exp_avg, st["exp_avg"])
        assert torch.equal(exp_avg_sq, st["exp_avg_sq"]) and torch.equal(step, st["step"])
        assert all(torch.equal(x, y) for x, y in zip(a + b, before))  # the pairs are only read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_non_finite_value_anywhere_writes_nothing(dtype):
    gen = torch.Generator().manual_seed(1)
    n = (1 << 14) * 5 + 3  # several chunks of the threaded loop, and a tail
    for bad in BAD:
        for which, k, pos in (("a", 0, 2), ("b", 1, 0), ("a", 1, (1 << 14) - 1), ("b", 2, n - 1)):
            lists = {name: [fresh(7, dtype, gen), fresh(n, dtype, gen), fresh(n, dtype, gen)] for name in ("a", "b")}
            lists[which][k][pos] = bad
            param = torch.randn(2, dtype=torch.float64, generator=gen)
            state = [torch.rand(2, dtype=torch.float64, generator=gen) for _ in range(2)] + [torch.tensor(3.0)]
            before = [param.clone()] + [t.clone() for t in state]
            got = torch.ops.apo.dot_adam_step(lists["a"], lists["b"], [1, 2], param, *state, 0.1, 0.0, 0.9, 1e-8)
            assert not all(map(math.isfinite, got.tolist())), (bad, which, k, pos)
            assert all(torch.equal(x, y) for x, y in zip([param] + state, before)), (bad, which, k, pos)


def test_empty_segments_have_a_zero_gradient():
    param = torch.zeros(2, dtype=torch.float64)
    got = torch.ops.apo.dot_adam_step([], [], [0, 0], param, *adam_state(param), 0.1, 0.0, 0.9, 1e-8)
    assert got.tolist() == [0.0, 0.0] and torch.equal(param, torch.zeros(2, dtype=torch.float64))


def test_bad_inputs_are_refused_by_name():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    phi = torch.zeros(2, dtype=torch.float64)

    def call(**edit):
        args = dict(a=[x, x], b=[y, y], segments=[1, 1], param=phi.clone(), exp_avg=torch.zeros(2, dtype=torch.float64),
                    exp_avg_sq=torch.zeros(2, dtype=torch.float64), step=torch.zeros(()), lr=0.1, beta1=0.0,
                    beta2=0.9, eps=1e-8)
        args.update(edit)
        return torch.ops.apo.dot_adam_step(*args.values())

    shared = torch.zeros(2, dtype=torch.float64)
    cases = [
        (dict(segments=[2]), ValueError, r"segments must have one length per entry of param \(2\), got 1"),
        (dict(segments=[1, 2]), ValueError, r"segments must sum to the number of pairs \(2\), got 3"),
        (dict(segments=[3, -1]), ValueError, r"segments\[1\] must be >= 0, got -1"),
        (dict(param=torch.zeros(1, 2, dtype=torch.float64), exp_avg=torch.zeros(1, 2, dtype=torch.float64),
              exp_avg_sq=torch.zeros(1, 2, dtype=torch.float64)), ValueError, r"param must be 1-D, got shape \(1, 2\)"),
        (dict(exp_avg=torch.zeros(3, dtype=torch.float64)), ValueError, r"exp_avg must have param's shape \(2,\)"),
        (dict(exp_avg_sq=torch.zeros(2)), TypeError, "exp_avg_sq has dtype torch.float32 but param has torch.float64"),
        (dict(param=torch.zeros(2, dtype=torch.int64)), TypeError, r"param has dtype torch.int64"),
        (dict(exp_avg=torch.zeros(4, dtype=torch.float64)[::2]), ValueError, "exp_avg must be contiguous"),
        (dict(step=torch.zeros(1)), ValueError, r"step must be 0-D, got shape \(1,\)"),
        (dict(lr=-0.1), ValueError, "lr must be a finite number >= 0, got -0.1"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
        (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\), got 1"),
        (dict(b=[y]), ValueError, "a and b must have the same length"),
        (dict(param=shared, exp_avg=shared), ValueError, "exp_avg"),
        # a meta tensor sends the call to the fake kernel, which names the lists
        (dict(step=torch.zeros((), device="meta")), ValueError,
         "a, b, param, exp_avg, exp_avg_sq, step: every tensor must be on one device"),
    ]
    for edit, error, message in cases:
        with pytest.raises(error, match=message):
            call(**edit)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    a, b = pairs([2, 1], gen)
    param = torch.randn(2, dtype=torch.float64, generator=gen)
    torch.library.opcheck(torch.ops.apo.dot_adam_step.default,
                          (a, b, [2, 1], param, *adam_state(param), 0.01, 0.0, 0.9, 1e-8))

"""Shared pieces of the optimizer tests: one intra-op thread, a tiny MLP and its data."""
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: intra-op threads only add contention on a shared 2-core box (measured 20x)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def closure_for(opt, model, x, y):
    """The usual training closure: zero the gradients, cross-entropy of model(x) against y, backward."""
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def trained_state(model, opt):
    """θ, φ and the last meta-step's record after a run, to compare two runs (``assert_trained_alike``)."""
    return [p.detach().clone() for p in model.parameters()], [t.detach().clone() for t in opt.phi], opt.last_meta


def assert_trained_alike(a, b):
    """Two runs' ``trained_state``: θ, φ and Q's terms equal to float64 rounding, with an FSD term."""
    (theta_a, phi_a, meta_a), (theta_b, phi_b, meta_b) = a, b
    for x, y in zip(theta_a + phi_a, theta_b + phi_b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert meta_a.keys() == meta_b.keys() and meta_a["fsd"] > 0.0
    for k in meta_a:
        assert meta_a[k] == pytest.approx(meta_b[k], rel=1e-12, abs=1e-15)


def assert_same_objective(a, b):
    """Two ``MetaObjective``s with an FSD term: Q, D_F and ∇θ'Q equal to float64 rounding."""
    assert a.value == pytest.approx(b.value, rel=1e-12) and a.fsd == pytest.approx(b.fsd, rel=1e-12)
    assert a.fsd > 0.0
    for ga, gb in zip(a.grads, b.grads):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)

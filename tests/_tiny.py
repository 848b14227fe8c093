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

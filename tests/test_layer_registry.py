"""The layer registry (apo_kernels.layers): one entry makes a module type a layer for APOPrecond,
KFAC, EKFAC and the bench; the registered views' matrices and Kronecker rows are consistent."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

from apo_kernels.baselines import EKFAC, KFAC
from apo_kernels.layers import (
    ConvView,
    LayerView,
    LinearView,
    find_layers,
    matrix_shape,
    register_layer,
    registered_layers,
    view_of,
)
from apo_kernels.optim import APOPrecond
from _tiny import one_thread, closure_for  # noqa: F401  (one_thread: autouse fixture)


# --------------------------------------------------------------------------------------------
# A toy layer type: a dense layer storing its weight as (in, out), y = x W + b (GPT-2's "Conv1D")
# --------------------------------------------------------------------------------------------
class InOutLinear(nn.Module):
    def __init__(self, n_in, n_out, dtype=torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=dtype) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype))

    def forward(self, x):
        return x @ self.weight + self.bias


class InOutView(LayerView):
    """Rows = output units: the stored (in, out) weight transposed, the bias as the last column."""

    name = "inout"

    def matrix(self, weight, bias=None):
        return weight.T if bias is None else torch.cat([weight.T, bias.reshape(-1, 1)], dim=1)

    def split(self, Y, weight_shape, bias_shape=None):
        if bias_shape is None:
            return Y.T.reshape(weight_shape), None
        return Y[:, :-1].T.reshape(weight_shape), Y[:, -1].reshape(bias_shape)

    def has_kronecker_factors(self, module):
        return True

    def input_rows(self, module, x):
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module, gy):
        return gy.reshape(-1, gy.shape[-1])


register_layer(InOutLinear, InOutView())  # the whole of adding a layer type


def toy_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(InOutLinear(4, 6), nn.Tanh(), InOutLinear(6, 3))


def toy_data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


# --------------------------------------------------------------------------------------------
# Registered once, used by every optimizer
# --------------------------------------------------------------------------------------------
def test_every_optimizer_sees_the_toy_layer_type():
    net = toy_net()
    apo = APOPrecond(net, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    assert [(l.kind, l.m, l.n) for l in apo.layers] == [("inout", 6, 5), ("inout", 3, 7)]
    assert apo.diagonals == []
    for cls in (KFAC, EKFAC):
        opt = cls(net, lr=0.1, damping=1e-3)
        assert [L.weight for L in opt.layers] == [net[0].weight, net[2].weight] and opt.other_params == []


@pytest.mark.parametrize("make", [
    lambda m: APOPrecond(m, lr=0.3, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=5),
    lambda m: KFAC(m, lr=0.3, damping=1e-2),
    lambda m: EKFAC(m, lr=0.3, damping=1e-2),
], ids=["APOPrecond", "KFAC", "EKFAC"])
def test_every_optimizer_trains_the_toy_layer_type(make):
    net = toy_net()
    x, y = toy_data()
    opt = make(net)
    closure = closure_for(opt, net, x, y)
    kwargs = dict(fsd_inputs=(x,)) if isinstance(opt, APOPrecond) else {}
    losses = [opt.step(closure, **kwargs).item() for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    if isinstance(opt, KFAC):  # the curvature was built from the toy layer's rows
        assert all("A" in opt.state[L.weight] for L in opt.layers)


def test_apo_meta_gradient_of_the_toy_layer_matches_autograd():
    """∇φQ from APOPrecond (the op's registered backward through the toy view) against Q(φ) written
    out with autograd on the (in, out) weights: W' = W − Yᵀ[:, :in], b' = b − Y[:, in]."""
    net = toy_net()
    x, y = toy_data()
    lam_fsd, lam_wsd = 0.3, 0.2
    opt = APOPrecond(net, lr=0.1, lambda_fsd=lam_fsd, lambda_wsd=lam_wsd, meta_lr=0.01, momentum=0.0,
                     fsd="mse", meta_interval=1)
    closure = closure_for(opt, net, x, y)
    opt.step(closure, fsd_inputs=(x,))
    with torch.no_grad():
        for t in opt.phi:
            t.add_(0.05 * torch.randn_like(t))
    _, grads = opt.meta_gradient(closure, fsd_inputs=(x,))

    phi = [t.detach().clone().requires_grad_(True) for t in opt.phi]  # per layer: A, S, B
    loss = F.cross_entropy(net(x), y)
    layers = [net[0], net[2]]
    g = torch.autograd.grad(loss, [p for L in layers for p in (L.weight, L.bias)])
    new, deltas = {}, []
    for k, L in enumerate(layers):
        A, S, B = phi[3 * k:3 * k + 3]
        G = torch.cat([g[2 * k].T, g[2 * k + 1].reshape(-1, 1)], dim=1)
        Y = A @ (torch.exp(2 * S) * (A.T @ G @ B)) @ B.T
        dW, db = -Y[:, :-1].T, -Y[:, -1]
        name = "0" if k == 0 else "2"
        new[f"{name}.weight"], new[f"{name}.bias"] = L.weight.detach() + dW, L.bias.detach() + db
        deltas += [dW, db]
    out_new = torch.func.functional_call(net, new, (x,))
    out_old = net(x).detach()
    fsd = 0.5 * (out_new - out_old).pow(2).sum(1).mean()
    Q = F.cross_entropy(out_new, y) + lam_fsd * fsd + 0.5 * lam_wsd * sum(d.pow(2).sum() for d in deltas)
    expected = torch.autograd.grad(Q, phi)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)  # float64 throughout


# --------------------------------------------------------------------------------------------
# Every Kronecker-factored view: grad(matrix) = Σ_rows g_rᵀ [a_r, 1], float64
# --------------------------------------------------------------------------------------------
KRONECKER_CASES = {
    "linear, 3-D input": (lambda: nn.Linear(5, 4), (3, 2, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    "conv1d unbatched": (lambda: nn.Conv1d(3, 4, 2, bias=False), (3, 7)),
    "conv2d": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1), (2, 2, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
               (2, 2, 5, 7, 4)),
    "conv3d unbatched": (lambda: nn.Conv3d(2, 3, 2), (2, 4, 3, 3)),
    "toy in-out linear": (lambda: InOutLinear(5, 4), (6, 5)),
}


@pytest.mark.parametrize("case", list(KRONECKER_CASES))
def test_kronecker_rows_reproduce_the_gradient_matrix(case):
    make, x_shape = KRONECKER_CASES[case]
    torch.manual_seed(0)
    mod = make().double()
    (layer,) = find_layers(mod, shared="exclude", kronecker=True)
    x = torch.randn(x_shape, dtype=torch.float64)
    out = mod(x)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, layer.params, gy)
    a = layer.view.input_rows(mod, x)
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    g = layer.view.output_rows(mod, gy)
    expected = layer.matrix(*grads)
    assert expected.shape == layer.shape
    torch.testing.assert_close(g.T @ a, expected, rtol=1e-12, atol=1e-12)
    # split inverts matrix
    for got, want in zip(layer.split(expected), grads):
        assert torch.equal(got, want)


def test_kfac_and_ekfac_train_conv1d_and_conv3d():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 3, 2), nn.ReLU(), nn.Flatten(1), nn.Unflatten(1, (3, 27)),
                        nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(1), nn.Linear(4 * 25, 2))
    x = torch.randn(16, 1, 4, 4, 4)
    y = (x.mean((1, 2, 3, 4)) > 0).long()
    for cls in (KFAC, EKFAC):
        model = copy.deepcopy(net)
        opt = cls(model, lr=0.1, damping=1e-2)
        assert [type(L.module) for L in opt.layers] == [nn.Conv3d, nn.Conv1d, nn.Linear]
        closure = closure_for(opt, model, x, y)
        losses = [opt.step(closure).item() for _ in range(25)]
        assert losses[-1] < 0.7 * losses[0], cls.__name__


# --------------------------------------------------------------------------------------------
# Tied weights: one rule per policy, in one place
# --------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tok):
        return self.head(torch.tanh(self.mix(self.emb(tok))))


def test_tied_weights_first_owner_for_apo_excluded_for_kfac():
    net = TiedLM()
    apo = find_layers(net, shared="first_owner")
    assert [(L.name, L.bias is not None) for L in apo] == [("emb", False), ("mix", True)]
    # KFAC: the embedding has no Kronecker factors, and the head's weight is the embedding's:
    # factors from the head's activations alone would not describe a gradient summed over both uses
    kfac = KFAC(net, lr=0.1, damping=1e-3)
    assert [L.module for L in kfac.layers] == [net.mix]
    assert {id(p) for p in kfac.other_params} == {id(net.emb.weight), id(net.head.bias)}


# --------------------------------------------------------------------------------------------
# The registry itself
# --------------------------------------------------------------------------------------------
def test_lookup_follows_the_class_hierarchy_and_an_entry_of_its_own_wins():
    class MyLinear(nn.Linear):
        pass

    class MyConv(nn.Conv2d):
        pass

    assert isinstance(view_of(MyLinear(2, 2)), LinearView)
    assert view_of(nn.ReLU()) is None and view_of(nn.LayerNorm(3)) is None
    special = ConvView()
    register_layer(MyConv, special)
    assert view_of(MyConv(1, 1, 1)) is special and view_of(nn.Conv2d(1, 1, 1)) is not special
    assert registered_layers()[MyConv] is special and nn.Linear in registered_layers()


def test_register_layer_refuses_what_is_not_a_module_type_or_a_view():
    with pytest.raises(TypeError, match="module_type"):
        register_layer("Linear", LinearView())
    with pytest.raises(TypeError, match="module_type"):
        register_layer(int, LinearView())
    with pytest.raises(TypeError, match="view"):
        register_layer(nn.Linear, lambda w: w)
    with pytest.raises(ValueError, match="shared"):
        find_layers(nn.Linear(2, 2), shared="all")
    with pytest.raises(TypeError, match="module"):
        matrix_shape(nn.ReLU())


def test_matrix_shape_reads_modules_on_the_meta_device():
    assert matrix_shape(nn.Conv2d(64, 128, 3, bias=False, device="meta")) == (128, 64 * 9)
    assert matrix_shape(nn.Linear(512, 1000, device="meta")) == (1000, 513)
    assert matrix_shape(nn.Embedding(50, 8, device="meta")) == (50, 8)
    assert matrix_shape(nn.Conv3d(4, 6, (1, 2, 3), groups=2, device="meta")) == (6, 2 * 6 + 1)
    assert matrix_shape(InOutLinear(5, 4).to("meta")) == (4, 6)


# --------------------------------------------------------------------------------------------
# A weight computed from other tensors is no layer: its parameters are trained one by one
# --------------------------------------------------------------------------------------------
# the optimizers that must train a model around a module that is no layer (APOPrecond: 3 meta-steps in 6)
AROUND_A_NON_LAYER = {
    "APOPrecond": lambda m: APOPrecond(m, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.1, meta_lr=0.01, meta_interval=2),
    "KFAC": lambda m: KFAC(m, lr=0.1, damping=1e-2),
    "EKFAC": lambda m: EKFAC(m, lr=0.1, damping=1e-2),
}

COMPUTED_WEIGHTS = {
    "weight_norm": lambda mod: parametrizations.weight_norm(mod),
    "spectral_norm": lambda mod: parametrizations.spectral_norm(mod),
    "pruned": lambda mod: prune.l1_unstructured(mod, "weight", amount=0.5),
}


@pytest.mark.parametrize("how", list(COMPUTED_WEIGHTS))
def test_a_computed_weight_is_no_layer_and_its_parameters_train_one_by_one(how):
    # torch.nn.utils.parametrize and pruning make module.weight a function of other tensors (not a
    # parameter any optimizer could hold): the module is left out of the layers, and its own
    # parameters (original0/1, original, weight_orig) take the per-parameter path
    def build():  # (a pruned module cannot be deep-copied)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        COMPUTED_WEIGHTS[how](net[0])
        return net

    model = build()
    for shared in ("first_owner", "exclude"):
        assert [layer.name for layer in find_layers(model, shared=shared)] == ["2"]
    own = sorted(n for n, _ in model.named_parameters() if n.startswith("0."))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for name, make in AROUND_A_NON_LAYER.items():
        net = build()
        opt = make(net)
        if name == "APOPrecond":
            assert sorted(n for n, *_ in opt.diagonals) == own
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no read of a non-leaf tensor's .grad
            for _ in range(6):
                opt.step(closure_for(opt, net, x, y))
        moved = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
        assert sorted(moved) == sorted(before), (name, sorted(set(before) - set(moved)))
        if name == "APOPrecond":
            assert opt.meta_steps == 3 and opt.skipped_steps == 0


def test_an_empty_weight_is_no_layer_and_every_optimizer_trains_around_it():
    # nn.Linear(4, 0) and nn.Linear(0, 3): no matrix to precondition; the non-empty bias of the
    # second goes per parameter, and the rest of the model trains
    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.empty_out, self.empty_in, self.fc = nn.Linear(4, 0), nn.Linear(0, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) + self.empty_out(x).sum() + self.empty_in(x[:, :0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initializing zero-element tensors is a no-op
        torch.manual_seed(0)
        model = WithEmpty()
    assert [layer.name for layer in find_layers(model, shared="first_owner")] == ["fc"]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for name, make in AROUND_A_NON_LAYER.items():
        net = copy.deepcopy(model)
        opt = make(net)
        if name == "APOPrecond":
            assert [n for n, *_ in opt.diagonals] == ["empty_in.bias"]
        before = {n: p.detach().clone() for n, p in net.named_parameters() if p.numel() > 0}
        for _ in range(6):
            opt.step(closure_for(opt, net, x, y))
        assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters() if p.numel() > 0), name


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: the packed q/k/v projection is one layer
# --------------------------------------------------------------------------------------------
class AttentionNet(nn.Module):
    def __init__(self, embed=6, heads=2, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True, **kw)
        self.head = nn.Linear(embed, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_packs_its_projection_into_one_layer():
    apo = APOPrecond(AttentionNet(), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    assert [(l.name, l.kind, l.m, l.n) for l in apo.layers] == [
        ("attn", "attention_in_proj", 18, 7), ("attn.out_proj", "linear", 6, 7), ("head", "linear", 3, 7)]
    assert apo.diagonals == [] and matrix_shape(nn.MultiheadAttention(8, 2, device="meta")) == (24, 9)
    no_bias = APOPrecond(AttentionNet(bias=False), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    assert [(l.m, l.n) for l in no_bias.layers][:2] == [(18, 6), (6, 6)]
    # separate q/k/v weights (kdim, vdim ≠ embed): no packed weight, so no layer; they go per parameter
    separate = APOPrecond(AttentionNet(kdim=4, vdim=5), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01)
    assert [l.name for l in separate.layers] == ["attn.out_proj", "head"] and len(separate.diagonals) == 4
    net = AttentionNet()
    for cls in (KFAC, EKFAC):  # no Kronecker factors (the projection is not called as a module): SGD
        opt = cls(net, lr=0.1, damping=1e-3)
        assert [L.weight for L in opt.layers] == [net.attn.out_proj.weight, net.head.weight]
        assert any(p is net.attn.in_proj_weight for p in opt.other_params)


def test_apo_meta_gradient_through_the_attention_projection_matches_autograd():
    """∇φQ from APOPrecond against Q(φ) written out with autograd, float64: every layer's matrix
    [W, b] moves by −Y, Y = A(S²⊙(AᵀGB))Bᵀ, S² = exp(2S)."""
    net = AttentionNet().double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    lam_fsd, lam_wsd = 0.3, 0.2
    opt = APOPrecond(net, lr=0.1, lambda_fsd=lam_fsd, lambda_wsd=lam_wsd, meta_lr=0.01, momentum=0.0,
                     fsd="mse", meta_interval=1)
    closure = closure_for(opt, net, x, y)
    opt.step(closure, fsd_inputs=(x,))
    with torch.no_grad():
        for t in opt.phi:
            t.add_(0.05 * torch.randn_like(t))
    _, grads = opt.meta_gradient(closure, fsd_inputs=(x,))

    phi = [t.detach().clone().requires_grad_(True) for t in opt.phi]  # per layer: A, S, B
    names = [("attn.in_proj_weight", "attn.in_proj_bias"), ("attn.out_proj.weight", "attn.out_proj.bias"),
             ("head.weight", "head.bias")]
    params = dict(net.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(net(x), y), [params[n] for pair in names for n in pair])
    new, deltas = {}, []
    for k, (w_name, b_name) in enumerate(names):
        A, S, B = phi[3 * k:3 * k + 3]
        G = torch.cat([g[2 * k], g[2 * k + 1].reshape(-1, 1)], dim=1)
        Y = A @ (torch.exp(2 * S) * (A.T @ G @ B)) @ B.T
        new[w_name], new[b_name] = params[w_name].detach() - Y[:, :-1], params[b_name].detach() - Y[:, -1]
        deltas.append(Y)
    out_new = torch.func.functional_call(net, new, (x,))
    out_old = net(x).detach()
    fsd = 0.5 * (out_new - out_old).pow(2).sum(1).mean()
    Q = F.cross_entropy(out_new, y) + lam_fsd * fsd + 0.5 * lam_wsd * sum(d.pow(2).sum() for d in deltas)
    expected = torch.autograd.grad(Q, phi)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)

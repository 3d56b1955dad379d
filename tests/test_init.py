"""odelora.init against an independent dense gradient: a plain torch model with the adapted
weights written out (W0 + s B A), differentiated by autograd on the full weights."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from odelora.init import adapted_layers, dense_gradients, gaussian_, spectral_  # noqa: E402


class Net(nn.Module):
    """Three linear layers; the middle one is applied twice (its gradient sums two uses)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(7, 9)
        self.mid = nn.Linear(9, 9)
        self.out = nn.Linear(9, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


def _setup(adapter="custom", r=3):
    torch.manual_seed(0)
    base = Net().double()
    cfg = peft.LoraConfig(r=r, lora_alpha=6, target_modules=["inp", "mid", "out"], rank_pattern={"out": 2},
                          alpha_pattern={"mid": 2.0}, use_rslora=True, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=adapter)
    layers = adapted_layers(model)
    with torch.no_grad():  # non-zero factors, so the effective weight is not the base weight
        for x in layers:
            x.B.normal_(0, 0.3)
            x.A.normal_(0, 0.3)
    X = torch.randn(11, 7, dtype=torch.float64)
    Y = torch.randn(11, 5, dtype=torch.float64)

    def closure():
        model.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss

    return base, model, layers, X, Y, closure


def _reference(base, layers, X, Y):
    """Autograd on the full weights of a plain copy carrying W0 + s B A."""
    plain = copy.deepcopy(base)
    short = {x.path.split(".")[-1]: x for x in layers}
    for name in ("inp", "mid", "out"):
        x = short[name]
        lin = getattr(plain, name)
        with torch.no_grad():
            lin.weight.copy_(lin.weight + x.scale * x.B.detach() @ x.A.detach())
    loss = ((plain(X) - Y) ** 2).mean()
    ws = [getattr(plain, n).weight for n in ("inp", "mid", "out")]
    return dict(zip(("inp", "mid", "out"), torch.autograd.grad(loss, ws)))


def test_scalings_differ_per_layer():
    _, _, layers, *_ = _setup()
    assert len({round(x.scale, 6) for x in layers}) == 3 and {x.adapter for x in layers} == {"custom"}


def test_dense_gradients_match_autograd_on_the_full_weights():
    base, model, layers, X, Y, closure = _setup()
    ref = _reference(base, layers, X, Y)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sentinel = {x.name: torch.full_like(x.A, 7.0) for x in layers}
    for x in layers:
        x.A.grad = sentinel[x.name]
    G = dense_gradients(model, closure)
    for x in layers:
        g = G[x.path]
        assert g.shape == (x.B.shape[0], x.A.shape[1])
        torch.testing.assert_close(g, ref[x.path.split(".")[-1]], rtol=1e-10, atol=1e-12)
        assert x.A.grad is sentinel[x.name] and x.B.grad is None  # gradients restored
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n  # nothing moved
        if "lora_" not in n:
            assert not p.requires_grad and p.grad is None


def test_dense_gradients_include_derivatives_of_the_network_in_the_loss():
    """A PINN-style loss holds du/dx, so W enters through the derivative graph too (the backward of
    each linear layer multiplies by W): dL/dW there is autograd's on the full weights, not the
    sum of g^T x over the layer's calls, which sees the layer's output alone."""
    base, model, layers, X, Y, _ = _setup()

    def loss_of(net):
        x = X.clone().requires_grad_()
        u = net(x)
        (du,) = torch.autograd.grad(u.square().sum(), x, create_graph=True)
        return du.square().mean() + (u - Y).square().mean()

    def closure():
        model.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    plain = copy.deepcopy(base)
    for x in layers:
        lin = getattr(plain, x.path.split(".")[-1])
        with torch.no_grad():
            lin.weight += x.scale * x.B.detach() @ x.A.detach()
    names = ("inp", "mid", "out")
    ref = dict(zip(names, torch.autograd.grad(loss_of(plain), [getattr(plain, n).weight for n in names])))
    G = dense_gradients(model, closure)
    for x in layers:
        torch.testing.assert_close(G[x.path], ref[x.path.split(".")[-1]], rtol=1e-10, atol=1e-12)


def test_spectral_start_spans_the_top_singular_subspaces_and_points_downhill():
    alpha = 1e-2
    base, model, layers, X, Y, closure = _setup()
    ref = _reference(base, layers, X, Y)
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    sing = spectral_(model, closure, alpha)
    for x in layers:
        r = x.A.shape[0]
        G = ref[x.path.split(".")[-1]].numpy()
        U, S, Vt = np.linalg.svd(-G)
        X_ = (x.scale * x.B @ x.A).detach().numpy()
        np.testing.assert_allclose(X_, alpha**2 * U[:, :r] @ Vt[:r], atol=1e-12)  # s B A = alpha^2 U_r V_r^T
        assert float(np.sum(X_ * -G)) == pytest.approx(alpha**2 * S[:r].sum(), rel=1e-9)  # downhill
        eye = alpha**2 / x.scale * np.eye(r)
        np.testing.assert_allclose((x.B.T @ x.B).detach().numpy(), eye, atol=1e-14)  # balanced
        np.testing.assert_allclose((x.A @ x.A.T).detach().numpy(), eye, atol=1e-14)
        np.testing.assert_allclose(sing[x.name].numpy(), S[:r], rtol=1e-5)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_w[n]), n


def test_spectral_start_from_a_rank_deficient_or_zero_gradient_fills_only_what_it_determines():
    """A batch of one gives a rank-1 gradient: the start is alpha^2 u1 v1^T (numpy's SVD of the
    dense gradient) and the other directions start as PEFT's (B = 0 there), with a warning; rounding
    picked them before, with full weight (float32 and float64 starts 0.016 apart against 0.01 for
    the real part). A zero gradient starts at B = 0, its singular values +0."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5)).double()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0"]))
    (x,) = adapted_layers(model)
    X, Y = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    G = torch.autograd.grad(((base(X) - Y) ** 2).sum(), base[0].weight)[0].numpy()  # independent: the plain layer
    U, _, Vt = np.linalg.svd(-G)
    alpha = 0.1

    def closure():
        model.zero_grad()
        ((model(X) - Y) ** 2).sum().backward()

    with pytest.warns(RuntimeWarning, match=r"fewer than r directions of .*\(1 of 3\).*B = 0 there"):
        S = spectral_(model, closure, alpha)
    product = (x.scale * x.B @ x.A).detach().numpy()
    np.testing.assert_allclose(product, alpha**2 * np.outer(U[:, 0], Vt[0]), atol=1e-12)
    assert torch.equal(x.B[:, 1:], torch.zeros(5, 2, dtype=x.B.dtype))
    np.testing.assert_allclose((x.A @ x.A.T).detach().numpy(), alpha**2 / x.scale * np.eye(3), atol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"\(0 of 3\)"):
        S = spectral_(model, lambda: (0.0 * model(X).sum()).backward(), alpha)
    (s,) = S.values()
    assert not bool(x.B.any()) and not bool(torch.signbit(s).any())
    zero = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=0, target_modules=["0"]))
    for start in (lambda: spectral_(zero, closure, alpha), lambda: gaussian_(zero, alpha)):  # a ZeroDivisionError before
        with pytest.raises(ValueError, match=r"scaling .* must be positive.*\(0\): give lora_alpha > 0"):
            start()
    assert dense_gradients(zero, lambda: (zero(X) ** 2).sum().backward()).keys() == {"base_model.model.0"}  # needs no scaling

    def autocast_closure():  # bf16 autocast: the gradient's rounding (4e-4 of its largest) passed for directions before
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ((model(X.float()).float() - Y.float()) ** 2).sum()
        loss.backward()

    model.float()
    with pytest.warns(RuntimeWarning, match=r"\(1 of 3\)"):
        spectral_(model, autocast_closure, alpha)


def test_spectral_start_of_one_adapter_leaves_the_other_alone():
    base, model, layers, X, Y, closure = _setup(adapter="first")
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["inp", "out"]))
    second = {x.name: (x.B.detach().clone(), x.A.detach().clone()) for x in adapted_layers(model, "second")}
    spectral_(model, closure, 1e-3, adapter="first")
    for x in adapted_layers(model, "second"):
        assert torch.equal(x.B, second[x.name][0]) and torch.equal(x.A, second[x.name][1])
    with pytest.raises(ValueError, match="no LoRA layers with adapter"):
        gaussian_(model, 0.1, adapter="third")


def test_gaussian_start_scale_and_seed():
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(400, 300)), peft.LoraConfig(r=8, lora_alpha=32, target_modules=["0"]))
    (x,) = adapted_layers(model)
    names = gaussian_(model, 1e-3, generator=torch.Generator().manual_seed(1))
    assert names == [x.name] and x.scale == 4.0
    assert torch.count_nonzero(x.B) == 0
    assert float((x.scale**0.5 * x.A).detach().std()) == pytest.approx(1e-3, rel=0.03)
    a1 = x.A.detach().clone()
    gaussian_(model, 1e-3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, x.A)


def test_closure_without_backward_is_an_error():
    _, model, _, X, _, _ = _setup()
    with pytest.raises(RuntimeError, match="no backward pass"):
        dense_gradients(model, lambda: model(X).sum())


def test_a_rank_above_the_layer_s_size_says_what_to_do():
    model = peft.get_peft_model(nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)),
                                peft.LoraConfig(r=4, target_modules=["0", "2"]))  # a PINN's input layer: in = 1
    X = torch.randn(8, 1)
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(out, in\) = 1.*leave it out of the adapter.*gaussian_"):
        spectral_(model, lambda: model(X).square().sum().backward(), 0.1)


def test_init_is_a_core_module():
    src = Path(__file__).resolve().parents[1] / "src" / "odelora" / "init.py"
    mods = {n.module or "" for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.Import) for a in n.names}
    assert not any("integrations" in m or "lab" in m or m.startswith("peft") for m in mods), mods

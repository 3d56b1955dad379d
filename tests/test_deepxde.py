"""ODELoRA-RK4 inside DeepXDE's own compile/train loop on a PEFT-LoRA-wrapped PINN."""

import os

os.environ["DDE_BACKEND"] = "pytorch"

import numpy as np
import pytest
import torch

dde = pytest.importorskip("deepxde")

from odelora import ODELoRA  # noqa: E402
from odelora.integrations.peft import lora_pairs  # noqa: E402
from odelora.integrations.deepxde import add_lora  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: processes, trainings, reports


def poisson(a):
    """-u'' = a pi^2 sin(pi x) on [-1, 1], u(+-1) = 0; exact u = a sin(pi x)."""
    geom = dde.geometry.Interval(-1, 1)

    def pde(x, u):
        return -dde.grad.hessian(u, x) - a * np.pi**2 * torch.sin(np.pi * x)

    bc = dde.icbc.DirichletBC(geom, lambda x: 0 * x, lambda x, on: on)
    return dde.data.PDE(geom, pde, bc, num_domain=40, num_boundary=2, solution=lambda x: a * np.sin(np.pi * x), num_test=100)


def l2_error(model, a):
    x = np.linspace(-1, 1, 201)[:, None]
    return float(np.linalg.norm(model.predict(x) - a * np.sin(np.pi * x)) / np.linalg.norm(a * np.sin(np.pi * x)))


WIDTH = 48


@pytest.fixture(scope="module")
def pretrained():
    """A Poisson PINN pretrained with DeepXDE's Adam (once for every method below)."""
    dde.config.set_random_seed(0)
    net = dde.nn.FNN([1, WIDTH, WIDTH, 1], "tanh", "Glorot normal")
    pre = dde.Model(poisson(1.0), net)
    pre.compile("adam", lr=1e-2)
    pre.train(iterations=1500, display_every=10**6, verbose=0)
    assert l2_error(pre, 1.0) < 0.05
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("method,iterations", [("rk4", 150), ("bs32", 100)])
def test_odelora_finetunes_a_pinn_through_deepxde(pretrained, method, iterations):
    """LoRA from B = 0 inside DeepXDE's own compile/train loop; bs32 once raised from its linear
    algebra here ("Gram matrix not positive definite")."""
    dde.config.set_random_seed(0)
    net = dde.nn.FNN([1, WIDTH, WIDTH, 1], "tanh", "Glorot normal")
    net.load_state_dict(pretrained)
    add_lora(net, r=2)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    model = dde.Model(poisson(1.5), net)
    opt = ODELoRA(lora_pairs(net), lr=2e-3, method=method)  # lr: a full fine-tuning rate (the largest step for bs32)
    calls = {"n": 0}
    original = opt.step

    def counting_step(closure=None):
        def wrapped():
            calls["n"] += 1
            return closure()

        return original(wrapped)

    opt.step = counting_step
    model.compile(opt)
    err0 = l2_error(model, 1.5)  # LoRA starts at B = 0: the pretrained solution
    model.train(iterations=iterations, display_every=10**6, verbose=0)
    err1 = l2_error(model, 1.5)
    assert calls["n"] == opt.stats.nfe and (method != "rk4" or calls["n"] == 4 * iterations)  # DeepXDE's closure, once per stage
    assert err1 < 0.4 * err0 and opt.stats.nonfinite == 0 and opt.stats.skipped == 0, (err0, err1, opt.stats)
    for n, p in net.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == ("lora_B" in n or "lora_A" in n), n
        assert p.requires_grad == ("lora_" in n), n  # DeepXDE's evaluations called net.requires_grad_()


def test_an_inverse_problems_variable_trains_as_a_companion():
    """DeepXDE hands a given optimizer through as it is, so ``compile``'s
    ``external_trainable_variables`` never reach it (the variable stayed at its start): the
    documented way is ``companion=[C]``, which moves it with AdamW while the pairs follow the flow.
    Moving it lowers the training loss against holding it (companion_lr 0), on one start."""

    def train(companion_lr):
        C = dde.Variable(2.0)  # the true diffusion coefficient is 1
        geom = dde.geometry.Interval(-1, 1)

        def pde(x, u):
            return -C * dde.grad.hessian(u, x) - np.pi**2 * torch.sin(np.pi * x)

        xo = np.linspace(-1, 1, 20)[:, None]
        bcs = [dde.icbc.DirichletBC(geom, lambda x: 0 * x, lambda x, on: on), dde.icbc.PointSetBC(xo, np.sin(np.pi * xo))]
        data = dde.data.PDE(geom, pde, bcs, num_domain=40, num_boundary=2, anchors=xo)
        dde.config.set_random_seed(0)
        net = add_lora(dde.nn.FNN([1, 16, 16, 1], "tanh", "Glorot normal"), r=2)
        model = dde.Model(data, net)
        model.compile(ODELoRA(lora_pairs(net), lr=5e-3, method="rk4", companion=[C], companion_lr=companion_lr),
                      external_trainable_variables=[C])
        model.train(iterations=30, display_every=30, verbose=0)
        return float(C), float(np.sum(model.losshistory.loss_train[-1]))

    (c_moved, loss_moved), (c_held, loss_held) = train(1e-2), train(0.0)
    assert c_held == 2.0 and abs(c_moved - 2.0) > 0.1
    assert loss_moved < 0.95 * loss_held  # 2.34 against 2.63 here; 3.14 with C's gradient negated


def test_the_base_stays_frozen_through_deepxdes_training_and_the_net_pickles():
    """DeepXDE's pytorch Model calls ``net.requires_grad_()`` after every evaluation: that undid
    add_lora's freeze, and an optimizer built afterwards from ``requires_grad``
    (``create_odelora_optimizer``) handed every base weight to its AdamW companion."""
    import pickle

    from odelora.integrations.peft import create_odelora_optimizer

    dde.config.set_random_seed(0)
    net = add_lora(dde.nn.FNN([1, 8, 8, 1], "tanh", "Glorot normal"), r=2)
    model = dde.Model(poisson(1.0), net)
    model.compile(ODELoRA(lora_pairs(net), lr=1e-3))
    model.train(iterations=2, display_every=10**6, verbose=0)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), trainable
    opt = create_odelora_optimizer(net, lr=1e-3)
    assert len(opt.pairs) == 3 and opt._companion is None
    copy = pickle.loads(pickle.dumps(net))
    copy.requires_grad_()
    assert {n for n, p in copy.named_parameters() if p.requires_grad} == trainable
    del net.requires_grad_  # torch's own method back
    assert all(p.requires_grad for p in net.requires_grad_().parameters())

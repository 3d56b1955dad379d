"""DeepXDE (pytorch backend): LoRA on a PINN's network, trained by DeepXDE's own loop.

    net = odelora.integrations.deepxde.add_lora(model.net, r=4)     # base weights frozen, also through DeepXDE's train
    opt = ODELoRA(odelora.integrations.peft.lora_pairs(net), lr=1e-2, method="rk4")
    model = dde.Model(data, net); model.compile(opt); model.train(iterations=500)

DeepXDE's pytorch ``train_step`` already calls ``optimizer.step(closure)``, so every RK stage
re-evaluates the PDE residual on the same collocation points. DeepXDE uses a given optimizer as
it is: ``compile``'s ``lr``, the network's L2 regularization and ``external_trainable_variables``
do not reach it. An inverse problem's ``dde.Variable``s train as ODELoRA's companions:
``ODELoRA(lora_pairs(net), lr=..., companion=[C], companion_lr=1e-2)`` (AdamW on them).
``compile``'s ``decay`` works (a torch scheduler on the optimizer). Set ``DDE_BACKEND=pytorch``
before importing deepxde (this module does it when it is imported first).
"""

from __future__ import annotations

import os

os.environ.setdefault("DDE_BACKEND", "pytorch")

import torch

__all__ = ["add_lora"]


def add_lora(net: torch.nn.Module, r: int = 4, alpha: float | None = None, target: str = r"linears\.\d+") -> torch.nn.Module:
    """Inject PEFT LoRA adapters (rank ``r``, ``lora_alpha = alpha or r``) into the Linear layers
    of a DeepXDE network in place (its class and ``forward`` are kept, as DeepXDE needs) and
    freeze everything else.

    The default ``target`` takes every Linear layer of an FNN, the input and output layers
    included, whose products have rank at most ``min(in, out)`` (often 1 < r there: ODELoRA
    handles such rank-deficient factors, and the extra rank stays unused). For the hidden layers
    only, as the lab does, pass ``target=r"linears\\.(1|2|...)"`` with the indices of the
    hidden-to-hidden layers."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=alpha or r, target_modules=target, lora_dropout=0.0)
    inject_adapter_in_model(cfg, net)
    net.requires_grad_ = _KeepBaseFrozen(net)
    return net.requires_grad_()


class _KeepBaseFrozen:
    """``net.requires_grad_`` of a network given LoRA by :func:`add_lora`: the base weights stay
    frozen. DeepXDE's pytorch ``Model`` calls ``net.requires_grad_()`` after every evaluation,
    which had unfrozen them: optimizers built from ``requires_grad`` afterwards (PEFT's
    helpers, ``create_odelora_optimizer``, L-BFGS) trained them too. ``del net.requires_grad_``
    gives the network torch's method back. (A class, not a closure: the network still pickles.)"""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def __call__(self, requires_grad: bool = True) -> torch.nn.Module:
        for name, p in self.net.named_parameters():
            p.requires_grad_(requires_grad and "lora_" in name)
        return self.net

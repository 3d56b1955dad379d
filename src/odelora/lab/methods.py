"""Methods compared in the lab, built on plain (B, A) tensors, and a shared training loop."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..optim import NonFiniteError, ODELoRA

__all__ = ["METHODS", "make_optimizer", "train"]

# name -> (description, factory(B, A, lr) -> optimizer)
METHODS: dict[str, tuple[str, Callable]] = {
    "odelora-euler": ("ODELoRA, Euler", lambda B, A, lr: ODELoRA([(B, A)], lr=lr, method="euler", on_nonfinite="raise")),
    "odelora-heun": ("ODELoRA, Heun", lambda B, A, lr: ODELoRA([(B, A)], lr=lr, method="heun", on_nonfinite="raise")),
    "odelora-rk4": ("ODELoRA, RK4", lambda B, A, lr: ODELoRA([(B, A)], lr=lr, method="rk4", on_nonfinite="raise")),
    "odelora-adaptive": ("ODELoRA, Bogacki-Shampine 3(2), lr = largest step",
                         lambda B, A, lr: ODELoRA([(B, A)], lr=lr, method="bs32", rtol=1e-3, atol=1e-12, on_nonfinite="raise")),
    "lora-gd": ("LoRA gradient descent", lambda B, A, lr: torch.optim.SGD([B, A], lr=lr)),
    "scaled-gd": ("scaled GD (Riemannian preconditioned)",
                  lambda B, A, lr: ODELoRA([(B, A)], lr=lr, method="euler", flow="scaled", on_nonfinite="raise")),
    "adam": ("Adam on the factors", lambda B, A, lr: torch.optim.Adam([B, A], lr=lr)),
    "lora-plus": ("LoRA+ (Adam, B's rate x16)",
                  lambda B, A, lr: torch.optim.Adam([{"params": [B], "lr": 16 * lr}, {"params": [A], "lr": lr}])),
}


def make_optimizer(method: str, B: Tensor, A: Tensor, lr: float):
    try:
        return METHODS[method][1](B, A, lr)
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}") from None


def train(
    opt,
    closure: Callable[[], Tensor],
    metric: Callable[[], float],
    *,
    iters: int,
    target: float | None = None,
    log_every: int = 1,
    blowup: float = 1e8,
) -> tuple[list[dict], dict]:
    """Step ``opt`` until ``metric() <= target`` or ``iters`` steps; one row per logged step.

    Returns the rows and a summary (converged, diverged, iterations, gradient evaluations)."""
    rows = []
    nfe = 0
    m0 = metric()
    rows.append(dict(iter=0, nfe=0, metric=m0, loss=float(closure().detach())))
    summary = dict(converged=False, diverged=False, iters=None, nfe=None)
    for it in range(1, iters + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                loss = opt.step(closure)
        except NonFiniteError:
            summary["diverged"] = True
            break
        nfe += opt.last_step.nfe if isinstance(opt, ODELoRA) else 1
        m = metric()
        if not math.isfinite(m) or m > blowup * max(m0, 1e-300):
            summary["diverged"] = True
            rows.append(dict(iter=it, nfe=nfe, metric=m, loss=float("nan")))
            break
        done = target is not None and m <= target
        if it % log_every == 0 or done or it == iters:
            rows.append(dict(iter=it, nfe=nfe, metric=m, loss=float(loss.detach())))
        if done:
            summary.update(converged=True, iters=it, nfe=nfe)
            break
    return rows, summary

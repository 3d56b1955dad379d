"""Methods compared in the lab (one table, ``METHODS``) and the matrix training loop.

Every method has a name, a description and up to two builders: ``build`` for the matrix problems
(a batch of runs ``(B, A, lr)``) and ``for_model`` for a PEFT model (real networks: the
``finetune``, ``init-scale``, ``step-rules`` and ``sensitivity`` experiments). ``MethodName`` lists
the methods with a matrix builder, ``ModelMethodName`` those with a model builder.

A *run* is one trajectory: a start ``(B0, A0)`` and a learning rate. ``train`` moves a batch of
runs of one method together (one optimizer over all of them, one gradient evaluation for the
batch per stage) and stops each run on its own when it converges, diverges or stalls. Runs in a
batch never interact: every method here updates each pair from that pair's gradient alone. The
adaptive ODELoRA method is the exception (one step-size controller for all pairs), so its runs
go one at a time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from ..optim import NonFiniteError, ODELoRA

__all__ = ["METHODS", "MethodName", "ModelMethodName", "Run", "Outcome", "train", "model_optimizer", "nfe_of", "PlainStep"]

MethodName = Literal[
    "odelora-euler", "odelora-heun", "odelora-rk4", "odelora-adaptive", "lora-gd", "scaled-gd", "adam", "lora-plus"
]
ModelMethodName = Literal[
    "odelora-euler", "odelora-heun", "odelora-rk4", "odelora-adaptive", "odelora-adam", "lora-gd", "adamw", "lora-plus",
    "scaled-adamw", "balora",
]


def _by_lr(runs):
    groups: dict[float, list] = {}
    for B, A, lr in runs:
        groups.setdefault(float(lr), []).append((B, A))
    return groups


def _odelora(**kw):
    def build(runs):
        groups = [{"pairs": pairs, "lr": lr} for lr, pairs in _by_lr(runs).items()]
        return ODELoRA(groups, lr=groups[0]["lr"], on_nonfinite="raise", **kw)

    return build


def _torch(cls, ratio: float | None = None):
    def build(runs):
        groups = []
        for lr, pairs in _by_lr(runs).items():
            if ratio is None:
                groups.append({"params": [t for p in pairs for t in p], "lr": lr})
            else:  # LoRA+: B's rate is `ratio` times A's
                groups += [{"params": [B for B, _ in pairs], "lr": ratio * lr}, {"params": [A for _, A in pairs], "lr": lr}]
        return cls(groups)

    return build


class PlainStep:
    """A torch optimizer driven like ODELoRA: ``step(closure)`` evaluates the closure once, steps,
    then runs ``after()`` (BaLoRA's balancing); ``last_nfe`` is 1."""

    def __init__(self, opt: torch.optim.Optimizer, after: Callable[[], None] | None = None):
        self.opt, self.after, self.last_nfe = opt, after, 1

    @property
    def param_groups(self):
        return self.opt.param_groups

    def step(self, closure):
        loss = closure()
        self.opt.step()
        if self.after is not None:
            self.after()
        return loss


def _model_odelora(**kw):
    def build(model, lr, companion_lr):
        from ..integrations.peft import create_odelora_optimizer

        return create_odelora_optimizer(model, lr=lr, companion_lr=companion_lr, **kw)

    return build


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _model_sgd(model, lr, companion_lr):
    return PlainStep(torch.optim.SGD(_trainable(model), lr=lr))


def _model_adamw(model, lr, companion_lr):
    return PlainStep(torch.optim.AdamW(_trainable(model), lr=lr, foreach=True))


def _model_loraplus(model, lr, companion_lr):
    from peft.optimizers import create_loraplus_optimizer

    return PlainStep(create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0))


def _model_riemannian(model, lr, companion_lr):
    from peft.optimizers import create_riemannian_optimizer

    return PlainStep(create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr))


def rebalancer(model):
    """BaLoRA's step after the optimizer's: every LoRA pair of ``model`` refactored in place into
    balanced factors of the same product."""
    from ..geometry import balance
    from ..integrations.peft import lora_pairs

    pairs = lora_pairs(model)

    @torch.no_grad()
    def rebalance():
        for p in pairs:
            B, A = balance(p.B, p.A)
            p.B.copy_(B)
            p.A.copy_(A)

    return rebalance


def _model_balora(model, lr, companion_lr):
    return PlainStep(torch.optim.AdamW(_trainable(model), lr=lr, foreach=True), after=rebalancer(model))


@dataclass(frozen=True)
class Method:
    description: str
    build: Callable[[list[tuple[Tensor, Tensor, float]]], torch.optim.Optimizer] | None = None
    batchable: bool = True
    # Steps that follow the gradient field (no momentum): a run that oscillates without progress
    # or falls far behind stays so. Adam's runs often make long excursions and then converge, so
    # they are stopped only when they converge, diverge, stop moving or reach the cap.
    steady: bool = True
    # (peft_model, lr, companion_lr) -> ODELoRA or PlainStep. Trainable tensors that are not LoRA
    # pairs (a head) go to ODELoRA's AdamW companion at companion_lr, and to the method's own
    # optimizer at lr for the torch methods (what handing model.parameters() to them does).
    for_model: Callable | None = None


METHODS: dict[str, Method] = {
    "odelora-euler": Method("ODELoRA, Euler", _odelora(method="euler"), for_model=_model_odelora(method="euler")),
    "odelora-heun": Method("ODELoRA, Heun", _odelora(method="heun"), for_model=_model_odelora(method="heun")),
    "odelora-rk4": Method("ODELoRA, RK4", _odelora(method="rk4"), for_model=_model_odelora(method="rk4")),
    "odelora-adaptive": Method("ODELoRA, Bogacki-Shampine 3(2), lr = largest step",
                               _odelora(method="bs32", rtol=1e-3, atol=1e-12), batchable=False,
                               for_model=_model_odelora(method="bs32", rtol=1e-3, atol=1e-6)),
    "odelora-adam": Method("ODELoRA, Euler with Adam moments of the velocity (preconditioner='adam')",
                           for_model=_model_odelora(method="euler", preconditioner="adam")),
    "lora-gd": Method("LoRA gradient descent", _torch(torch.optim.SGD), for_model=_model_sgd),
    "scaled-gd": Method("scaled GD (Riemannian preconditioned)", _odelora(method="euler", flow="scaled")),
    "adam": Method("Adam on the factors", _torch(torch.optim.Adam), steady=False),
    "adamw": Method("AdamW on the factors (torch, weight decay 0.01)", for_model=_model_adamw),
    "lora-plus": Method("LoRA+ (Adam, B's rate x16; on models PEFT's create_loraplus_optimizer with AdamW)",
                        _torch(torch.optim.Adam, ratio=16.0), steady=False, for_model=_model_loraplus),
    "scaled-adamw": Method("scaled AdamW: PEFT's create_riemannian_optimizer (r x r preconditioned gradients, AdamW)",
                           for_model=_model_riemannian),
    "balora": Method("BaLoRA: AdamW, then each pair rebalanced (odelora.geometry.balance)", for_model=_model_balora),
}


def model_optimizer(name: str, model, lr: float, companion_lr: float = 2e-3):
    """The optimizer of method ``name`` for a PEFT model: an ODELoRA or a :class:`PlainStep`,
    both stepped with ``step(closure)``; gradient evaluations of the last step: :func:`nfe_of`."""
    spec = METHODS.get(name)
    if spec is None or spec.for_model is None:
        usable = [k for k, v in METHODS.items() if v.for_model is not None]
        raise ValueError(f"method {name!r} has no model builder; choose from {', '.join(usable)}")
    return spec.for_model(model, lr, companion_lr)


def nfe_of(opt) -> int:
    """Gradient evaluations of the last step (ODELoRA's step record; 1 for other optimizers)."""
    return opt.last_step.nfe if isinstance(opt, ODELoRA) else getattr(opt, "last_nfe", 1)


@dataclass
class Run:
    B: Tensor
    A: Tensor
    lr: float


@dataclass
class Outcome:
    """How a run ended: ``converged`` (metric <= target), ``diverged`` (non-finite or blew up),
    ``stalled`` (stopped early, see ``train``; ``reason`` says which test), or ``cap``."""

    status: str = "cap"
    iters: int = 0
    nfe: int = 0
    projected: float = math.nan  # stalled runs: iterations to the target at the recent rate
    reason: str = ""  # why a stalled run was stopped
    rows: list[dict] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.status == "converged"


GradFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
MetricFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def train(
    method: str,
    runs: list[Run],
    grad_fn: GradFn,
    metric_fn: MetricFn,
    *,
    iters: int,
    target: float | None = None,
    log_every: int = 1,
    blowup: float = 1e4,
    stall_after: int | None = None,
    stall_window: int | None = None,
    flat_window: int = 200,
) -> list[Outcome]:
    """Step every run with ``method`` until it reaches ``metric <= target``, diverges, stalls or
    has taken ``iters`` steps; one row per logged step.

    ``grad_fn(Bs, As, idx)`` gets the stacked factors of the active runs (their indices in
    ``idx``) and returns per-run losses and the gradients ``dL/dB``, ``dL/dA``;
    ``metric_fn(Bs, As, idx)`` returns one metric per active run. A run diverges when its metric
    is not finite or exceeds ``blowup`` times its start. With a target, a run stalls when, after
    ``stall_after`` steps, its best metric over the last ``stall_window`` steps improved too slowly
    to reach the target within twice ``iters`` (default: after iters/4, windows of iters/20). It
    also stalls at any time when, over a window of ``flat_window`` steps, the metric stopped moving
    (total variation below 1e-6 of the best metric: a floor) or oscillated without a new best
    (total variation above the best metric). A saddle plateau, where the error drifts slowly and
    smoothly before the next escape, meets neither test. Methods that are not ``steady`` (Adam)
    are only stopped by the floor test.
    """
    _nfe = nfe_of
    spec = METHODS[method]
    if not spec.batchable and len(runs) > 1:
        return [o for r in runs for o in train(method, [r], grad_fn, metric_fn, iters=iters, target=target,
                                                log_every=log_every, blowup=blowup, stall_after=stall_after,
                                                stall_window=stall_window, flat_window=flat_window)]
    stall_after = max(1, iters // 4) if stall_after is None else stall_after
    stall_window = max(5, iters // 20) if stall_window is None else stall_window
    K = len(runs)
    P = [(r.B.detach().clone().requires_grad_(), r.A.detach().clone().requires_grad_(), float(r.lr)) for r in runs]
    out = [Outcome() for _ in range(K)]
    active = list(range(K))
    first_loss: list[Tensor | None] = [None]

    def stacked(ks):
        return torch.stack([P[k][0].detach() for k in ks]), torch.stack([P[k][1].detach() for k in ks])

    def make_closure(ks):
        idx = torch.tensor(ks)

        def closure():
            Bs, As = stacked(ks)
            loss, gB, gA = grad_fn(Bs, As, idx)
            for j, k in enumerate(ks):
                P[k][0].grad, P[k][1].grad = gB[j], gA[j]
            if first_loss[0] is None:
                first_loss[0] = loss.detach()
            return loss.sum()

        return closure

    def build(ks, old=None):
        opt = spec.build([P[k] for k in ks])
        if old is not None:  # carry per-parameter state (Adam moments) of the runs that remain
            for k in ks:
                for t in P[k][:2]:
                    if t in old.state:
                        opt.state[t] = old.state[t]
        return opt

    idx0 = torch.arange(K)
    with torch.no_grad():
        m = metric_fn(*stacked(active), idx0)
        loss0 = grad_fn(*stacked(active), idx0)[0]
    m0 = m.clone()
    best = m.clone()
    best_prev = m.clone()
    improved = [0] * K  # last iteration with a new best metric
    tv = [0.0] * K  # total variation of the metric in the current flat window
    last = [float(x) for x in m]
    for k in range(K):
        out[k].rows.append(dict(iter=0, nfe=0, metric=float(m[k]), loss=float(loss0[k])))
    opt = build(active)
    closure = make_closure(active)

    def step_alone(k):
        """One step of run k by itself; False if it produced a non-finite value."""
        single = build([k], opt)
        first_loss[0] = None
        try:
            single.step(make_closure([k]))
        except NonFiniteError:
            return False, 0
        return True, _nfe(single)

    for it in range(1, iters + 1):
        first_loss[0] = None
        lost: list[int] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                opt.step(closure)
                step_nfe = {k: _nfe(opt) for k in active}
                losses = {k: float(first_loss[0][j]) for j, k in enumerate(active)}
            except NonFiniteError:  # some run blew up inside the step: find it, step the others alone
                step_nfe, losses = {}, {}
                for k in active:
                    ok, n = step_alone(k)
                    if ok:
                        step_nfe[k], losses[k] = n, float(first_loss[0][0])
                    else:
                        lost.append(k)
        for k in lost:
            out[k].status, out[k].iters = "diverged", it
            out[k].rows.append(dict(iter=it, nfe=out[k].nfe, metric=math.nan, loss=math.nan))
        live = [k for k in active if k not in lost]
        if live:
            with torch.no_grad():
                m = metric_fn(*stacked(live), torch.tensor(live))
        done = set(lost)
        for j, k in enumerate(live):
            o = out[k]
            o.nfe += step_nfe[k]
            mk = float(m[j])
            if math.isfinite(mk):
                tv[k] += abs(mk - last[k])
                last[k] = mk
                if mk < float(best[k]):
                    best[k], improved[k] = mk, it
            status = None
            if not math.isfinite(mk) or mk > blowup * max(float(m0[k]), 1e-300):
                status = "diverged"
            elif target is not None and mk <= target:
                status = "converged"
            elif it == iters:
                status = "cap"
            elif spec.steady and target is not None and it % flat_window == 0 and it - improved[k] >= flat_window and tv[k] >= float(best[k]):
                status, o.projected, o.reason = "stalled", math.inf, "oscillating: no new best and an error moving by more than its own size"
            elif target is not None and it % flat_window == 0 and tv[k] < 1e-6 * float(best[k]):
                status, o.projected, o.reason = "stalled", math.inf, "stopped moving: the error changed by less than 1e-6 of itself"
            elif spec.steady and target is not None and it >= stall_after and it % stall_window == 0:
                b, bp = float(best[k]), float(best_prev[k])
                rate = math.log(b / bp) / stall_window if 0 < b < bp else 0.0
                o.projected = it + math.log(target / b) / rate if rate < 0 else math.inf
                if o.projected > 2 * iters:
                    status, o.reason = "stalled", "too slow: the recent rate projects past twice the cap"
            if target is not None and it % stall_window == 0:
                best_prev[k] = best[k]
            if it % flat_window == 0:
                tv[k] = 0.0
            if status is not None or it % log_every == 0:
                o.rows.append(dict(iter=it, nfe=o.nfe, metric=mk, loss=losses[k]))
            if status is not None:
                o.status, o.iters = status, it
                done.add(k)
        if done:
            active = [k for k in active if k not in done]
            if not active:
                break
            opt = build(active, opt)
            closure = make_closure(active)
    return out

"""Pretraining (cached) and one fine-tuning run of a PINN, through DeepXDE's own training loop.

Every method is a torch optimizer handed to ``dde.Model.compile``. Its ``step`` is wrapped so
that each gradient evaluation (one call of DeepXDE's closure) is counted the same way for every
method: ODELoRA calls the closure once per Runge-Kutta stage (rejected attempts included), the
other optimizers once per step. The loss the step returns is recorded at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("DDE_BACKEND", "pytorch")

import numpy as np
import torch

from ..._io import atomic_write, load_cached
from ...optim import NonFiniteError, ODELoRA, StepFailure
from .problems import Family, _dde

__all__ = ["METHODS", "Method", "Net", "Run", "pretrain", "load_or_pretrain", "finetune", "relative_error", "lora_target"]


@dataclass(frozen=True)
class Net:
    width: int
    depth: int  # hidden layers

    def layers(self, inputs: int) -> list[int]:
        return [inputs] + [self.width] * self.depth + [1]


def lora_target(depth: int) -> str:
    """PEFT's target regex for the hidden-to-hidden Linear layers of a DeepXDE FNN."""
    return r"linears\.(" + "|".join(str(i) for i in range(1, depth)) + ")"


def build_net(family: Family, net: Net):
    """A tanh FNN with the family's input features and its output transform (the hard constraints)."""
    model = _dde().nn.FNN(net.layers(family.feature_dim or family.input_dim), "tanh", "Glorot normal")
    if family.features is not None:
        model.apply_feature_transform(family.features)
    model.apply_output_transform(family.transform)
    return model


def relative_error(model_net, X: np.ndarray, u: np.ndarray) -> float:
    """``||u_net - u|| / ||u||`` on the points X."""
    was = model_net.training
    model_net.eval()
    with torch.no_grad():
        pred = model_net(torch.as_tensor(X)).double().numpy().ravel()
    model_net.train(was)
    return float(np.linalg.norm(pred - u) / np.linalg.norm(u))


# ---------------------------------------------------------------------------- pretraining
def _quiet():
    """DeepXDE prints while compiling and training; keep the lab's output clean."""
    return contextlib.redirect_stdout(io.StringIO())


def _quiet_train(model, **kw):
    with _quiet():
        return model.train(display_every=10**9, verbose=0, **kw)


def pretrain(family: Family, net: Net, points: int, *, adam_steps: int, adam_lr: float, lbfgs_steps: int, seed: int = 0):
    """A network trained from scratch at ``family.mu0``: Adam, then L-BFGS. Returns the state dict
    and the errors at mu0 and mu1 on the reference grid."""
    dde = _dde()
    dde.config.set_random_seed(seed)
    data = family.build(family.mu0, points)
    model = dde.Model(data, build_net(family, net))
    t0 = time.perf_counter()
    with _quiet():
        model.compile("adam", lr=adam_lr, verbose=0)
    _quiet_train(model, iterations=adam_steps)
    if lbfgs_steps:
        dde.optimizers.set_LBFGS_options(maxiter=lbfgs_steps)
        with _quiet():
            model.compile("L-BFGS", verbose=0)
        _quiet_train(model)
    X = family.grid()
    info = dict(
        error_mu0=relative_error(model.net, X, family.exact(X, family.mu0)),
        error_mu1=relative_error(model.net, X, family.exact(X, family.mu1)),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}, info


def load_or_pretrain(folder: Path, family: Family, net: Net, points: int, **kw) -> tuple[dict, dict]:
    """The pretrained state for these settings from ``folder``, made and saved there if missing
    (the file name is a hash of the settings, so all methods and seeds share one checkpoint)."""
    key = dict(family=family.name, equation=family.equation, mu0=family.mu0, mu1=family.mu1, net=asdict(net),
               points=points, constraint=family.constraint, deepxde=_dde().__version__, torch=torch.__version__.split("+")[0], **kw)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(folder) / f"{family.name}-{digest}.pt"
    if path.exists():
        saved = load_cached(path)
        return saved["state"], json.loads(saved["info"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these networks are small: more threads only contend
    try:
        state, info = pretrain(family, net, points, **kw)
    finally:
        torch.set_num_threads(threads)
    info["settings"] = key
    buf = io.BytesIO()
    torch.save({"state": state, "info": json.dumps(info)}, buf)
    atomic_write(path, buf.getvalue())
    return state, info


# ---------------------------------------------------------------------------- methods
def _lora_params(net) -> list[torch.Tensor]:
    return [p for n, p in net.named_parameters() if p.requires_grad and "lora_" in n]


def _odelora(adaptive: bool = False, **kw):
    def build(net, lr, rtol=1e-3):
        from ...integrations.peft import lora_pairs

        extra = dict(rtol=rtol) if adaptive else {}
        return ODELoRA(lora_pairs(net), lr=lr, on_nonfinite="raise", **kw, **extra), None

    return build


def _adam(net, lr, **_):
    return torch.optim.Adam(_lora_params(net), lr=lr), None


def _sgd(net, lr, **_):
    return torch.optim.SGD(_lora_params(net), lr=lr), None


def _lora_plus(net, lr, **_):
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(net, torch.optim.Adam, lr=lr, loraplus_lr_ratio=16.0), None


def _riemannian(net, lr, **_):
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(net, torch.optim.AdamW, lr=lr, weight_decay=0.0), None


def _balora(net, lr, **_):
    from ...integrations.peft import lora_pairs
    from ..methods import rebalancer

    pairs = lora_pairs(net)
    return torch.optim.Adam([t for p in pairs for t in (p.B, p.A)], lr=lr), rebalancer(net)


def _full_adam(net, lr, **_):
    return torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr), None


@dataclass(frozen=True)
class Method:
    description: str
    build: Callable
    lora: bool = True
    odelora: bool = False


METHODS: dict[str, Method] = {
    "odelora-euler": Method("ODELoRA, Euler", _odelora(method="euler"), odelora=True),
    "odelora-rk4": Method("ODELoRA, RK4 (4 evaluations per step)", _odelora(method="rk4"), odelora=True),
    "odelora-bs32": Method("ODELoRA, Bogacki-Shampine 3(2), error-controlled; lr is the largest step",
                           _odelora(method="bs32", adaptive=True), odelora=True),
    "odelora-dopri5": Method("ODELoRA, Dormand-Prince 5(4), error-controlled; lr is the largest step",
                             _odelora(method="dopri5", adaptive=True), odelora=True),
    "odelora-adam": Method('ODELoRA, Euler with preconditioner="adam"', _odelora(method="euler", preconditioner="adam"),
                           odelora=True),
    "lora-adam": Method("LoRA, Adam", _adam),
    "lora-sgd": Method("LoRA, SGD", _sgd),
    "lora-plus": Method("LoRA+ (PEFT create_loraplus_optimizer, Adam, ratio 16)", _lora_plus),
    "lora-riemannian": Method("scaled AdamW (PEFT create_riemannian_optimizer, reg 1e-2, no weight decay)", _riemannian),
    "balora": Method("Adam, then balancing (odelora.geometry.balance) after each step", _balora),
    "full-adam": Method("full fine-tuning, Adam on every weight (reference, not LoRA)", _full_adam, lora=False),
}


# ---------------------------------------------------------------------------- one run
@dataclass
class Run:
    """What a fine-tuning run measured. ``rows``: (nfe, error, loss) every ``eval_every``
    gradient evaluations and at the end. ``finite``: every loss finite and no step failure."""

    finite: bool = True
    reason: str = ""
    nfe: int = 0
    steps: int = 0
    spikes: int = 0
    rejected: int = 0
    t: float = math.nan  # ODELoRA: the flow time reached (sum of accepted steps)
    final_error: float = math.nan
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


class _Meter:
    """Counts gradient evaluations and records the loss of every step, with loss spikes: steps
    whose loss exceeds ``spike_factor`` times the best loss so far (a run of such steps counts once)."""

    def __init__(self, spike_factor: float):
        self.nfe = 0
        self.steps = 0
        self.loss = math.nan
        self.first = math.nan
        self.best = math.inf
        self.spikes = 0
        self.in_spike = False
        self.spike_factor = spike_factor

    def record(self, loss) -> None:
        value = math.nan if loss is None else float(torch.as_tensor(loss).detach().sum())
        self.steps += 1
        self.loss = value
        if self.steps == 1:
            self.first = value
        if not math.isfinite(value):
            return
        spiking = value > self.spike_factor * self.best
        if spiking and not self.in_spike:
            self.spikes += 1
        self.in_spike = spiking
        self.best = min(self.best, value)


class _OverBudget(Exception):
    """A step asked for a gradient evaluation past the budget."""


def _instrument(opt, meter: _Meter, after: Callable | None, budget: int) -> None:
    """Replace ``opt.step`` by one that counts closure calls and records the step's loss. An
    ODELoRA step that would evaluate past ``budget`` raises ``_OverBudget`` instead (the
    optimizer puts the factors back as the step found them)."""
    original = opt.step
    if isinstance(opt, ODELoRA):
        def step(closure):
            def counted():
                if meter.nfe >= budget:
                    raise _OverBudget
                meter.nfe += 1
                return closure()

            meter.record(original(counted))
    else:  # evaluate the closure first: PEFT's Riemannian optimizer takes no closure
        def step(closure):
            with torch.enable_grad():
                loss = closure()
            meter.nfe += 1
            original()
            if after is not None:
                after()
            meter.record(loss)
    opt.step = step


def finetune(family: Family, state: dict, net: Net, points: int, *, method: str, lr: float, rank: int, seed: int,
             budget: int, eval_every: int, rtol: float = 1e-3, spike_factor: float = 10.0, blowup: float = 1e6) -> Run:
    """Fine-tune the pretrained network to ``family.mu1`` with ``method`` at ``lr`` for ``budget``
    gradient evaluations. The seed sets the collocation points and the LoRA start (A random,
    B = 0, so every LoRA run starts from the pretrained function). A run ends early when a loss is
    not finite, exceeds ``blowup`` times the first loss, or the optimizer gives up (StepFailure).
    No run evaluates past the budget: an ODELoRA step (several evaluations, adaptive ones with
    rejected tries) that would is cut short and undone, so the results are those of the last
    whole step; its evaluations within the budget count as spent."""
    dde = _dde()
    from ...integrations.deepxde import add_lora

    spec = METHODS[method]
    dde.config.set_random_seed(seed)
    data = family.build(family.mu1, points)
    model_net = build_net(family, net)
    model_net.load_state_dict(state)
    if spec.lora:
        add_lora(model_net, r=rank, target=lora_target(net.depth))
    opt, after = spec.build(model_net, lr, rtol=rtol)
    meter = _Meter(spike_factor)
    _instrument(opt, meter, after, budget)
    model = dde.Model(data, model_net)
    with _quiet():
        model.compile(opt, verbose=0)
    X = family.grid()
    u = family.exact(X, family.mu1)
    run = Run()
    run.rows.append(dict(nfe=0, error=relative_error(model_net, X, u), loss=math.nan))
    marks = {"next": eval_every}

    class Monitor(dde.callbacks.Callback):
        def on_batch_end(self):
            loss = meter.loss
            if not math.isfinite(loss):
                run.finite, run.reason = False, "non-finite loss"
            elif math.isfinite(meter.first) and loss > blowup * meter.first:
                run.finite, run.reason = False, f"loss above {blowup:g} x its start"
            if not run.finite or meter.nfe >= budget:
                self.model.stop_training = True
                return
            if meter.nfe >= marks["next"]:
                run.rows.append(dict(nfe=meter.nfe, error=relative_error(model_net, X, u), loss=loss))
                while marks["next"] <= meter.nfe:
                    marks["next"] += eval_every

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            _quiet_train(model, iterations=budget, callbacks=[Monitor()])
        except _OverBudget:  # the budget ran out within a step: the run ends after its last whole step
            pass
        except (StepFailure, NonFiniteError) as exc:
            run.finite, run.reason = False, f"{type(exc).__name__}: {str(exc)[:120]}"
        except torch.linalg.LinAlgError as exc:  # a factorization of non-finite factors
            run.finite, run.reason = False, f"LinAlgError: {str(exc)[:120]}"
    run.seconds = time.perf_counter() - t0
    run.nfe, run.steps, run.spikes = meter.nfe, meter.steps, meter.spikes
    if isinstance(opt, ODELoRA):
        run.rejected = int(opt.stats.rejected)
        run.t = float(opt.param_groups[0]["t"])
    if run.finite:
        err = relative_error(model_net, X, u)
        run.final_error = err if math.isfinite(err) else math.nan
        run.finite = math.isfinite(err)
        if not run.finite:
            run.reason = "non-finite prediction"
    run.rows.append(dict(nfe=meter.nfe, error=run.final_error, loss=meter.loss))
    return run

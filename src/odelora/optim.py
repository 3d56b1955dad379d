"""The ODELoRA optimizer: a ``torch.optim.Optimizer`` that integrates a LoRA factor flow with an
explicit Runge-Kutta method, one closure call (forward + backward) per stage."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .flows import Flow, get_flow
from .flows import balanced as balanced_flow
from .geometry import balance_with_qr, imbalance, work_dtype
from .integrators import StepController, get_tableau, rk_step
from .pairs import LoRAPair, as_pairs

__all__ = ["ODELoRA", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or velocity was NaN or infinite; the step was rejected."""


@dataclass
class _Bucket:
    """Pairs of one param group with equal shapes, dtype and device, moved in one batched call."""

    group: int
    Bs: list[Tensor]
    As: list[Tensor]
    scales: Tensor  # (k,) in the working dtype
    wd: torch.dtype


def _param_groups(params: Any) -> list[dict]:
    items = list(params) if not isinstance(params, (LoRAPair, dict)) else [params]
    if not items:
        raise ValueError("ODELoRA got no LoRA pairs to optimize")
    if all(isinstance(x, dict) and "pairs" in x for x in items):
        groups = items
    elif any(isinstance(x, dict) and "pairs" in x for x in items):
        raise ValueError("mix of param groups ({'pairs': ...}) and bare pairs; use one form")
    else:
        groups = [{"pairs": items}]
    out = []
    for g in groups:
        pairs = as_pairs(g["pairs"])
        if not pairs:
            raise ValueError("a param group has no pairs")
        rest = {k: v for k, v in g.items() if k != "pairs"}
        if "params" in rest:
            raise ValueError("ODELoRA param groups take 'pairs', not 'params'")
        out.append(
            dict(
                params=[t for p in pairs for t in (p.B, p.A)],
                scales=[float(p.scale) for p in pairs],
                names=[p.name for p in pairs],
                **rest,
            )
        )
    return out


class ODELoRA(torch.optim.Optimizer):
    """Train LoRA pairs by integrating a factor flow (default: ODELoRA's balanced projected flow).

    Args:
        params: LoRA pairs (:class:`~odelora.LoRAPair`, ``(B, A[, scale])`` tuples or dicts with
            ``B``, ``A``, ``scale``), or param groups ``{"pairs": [...], "lr": ...}``.
        lr: the time step h. With the scaled and balanced flows it is a full fine-tuning learning
            rate: one Euler step moves ``scale * B @ A`` by ``-lr * P(G)``. For adaptive methods
            (``bs32``, ``dopri5``) it is the largest step; the controller shrinks it as needed.
        method: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"bs32"`` or ``"dopri5"``.
            A method with s stages calls the closure s times per step (on the same batch).
        flow: ``"balanced"`` (ODELoRA), ``"scaled"``, ``"gradient"`` (plain LoRA), or a callable
            with the flow signature.
        rebalance: rebalance each pair after every accepted step (default: on for ``balanced``).
            Pairs whose product is rank-deficient (``B = 0`` start) are left as they are.
        rtol, atol, max_rejects: error control of adaptive methods; a step is retried with a
            smaller h at most ``max_rejects`` times (reusing the first stage), then skipped.
        on_nonfinite: ``"warn"`` (default) or ``"raise"``. A NaN/inf loss, gradient or velocity
            rejects the step either way: parameters and optimizer state stay as they were, and
            ``stats["nonfinite"]`` counts it.
        preconditioner: ``None`` (plain ODE steps, SGD-like) or ``"adam"``: Adam moment estimates
            of the velocity (not of the raw gradient), with ``betas``, ``eps`` and decoupled
            ``weight_decay``. Fixed-step methods only.
        flow_options: extra keyword arguments for the flow (e.g. ``damping``).
        track_imbalance: log ``max ||B.T B - A A.T|| / ||B.T B||`` over pairs after each step:
            with rebalancing, of the step's result before the retraction (the drift of the
            discrete step, O(h^2), which the retraction then removes); without, of the factors.
        companion: other trainable parameters (heads, biases, DoRA magnitudes, ...), moved by
            an AdamW with ``companion_lr`` and ``companion_kwargs`` once per accepted step, from
            the gradients at the start of the step. Its groups appear in ``param_groups`` (with
            ``companion=True``), so LR schedulers scale them too.

    After each ``step``, ``last_step`` holds that step's statistics (function evaluations,
    accepted, rejected, h, t, imbalance, loss) and ``stats`` the running totals.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        method: str = "euler",
        flow: str | Flow = "balanced",
        *,
        rebalance: bool | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        max_rejects: int = 10,
        on_nonfinite: str = "warn",
        preconditioner: str | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        flow_options: dict | None = None,
        track_imbalance: bool = True,
        companion: Iterable[Tensor] | None = None,
        companion_lr: float = 1e-3,
        companion_kwargs: dict | None = None,
    ):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        self.tableau = get_tableau(method)
        self.flow = get_flow(flow)
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if preconditioner not in (None, "adam"):
            raise ValueError(f"preconditioner must be None or 'adam', got {preconditioner!r}")
        if preconditioner and self.tableau.adaptive:
            raise ValueError("preconditioner='adam' needs a fixed-step method (euler, heun, midpoint, rk4)")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.controller = StepController(rtol=rtol, atol=atol, h_max=1.0)
        self.max_rejects = int(max_rejects)
        self.on_nonfinite = on_nonfinite
        self.preconditioner = preconditioner
        self.rebalance = (flow == "balanced") if rebalance is None else bool(rebalance)
        self.flow_options = dict(flow_options or {})
        self.track_imbalance = track_imbalance
        defaults = dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay, t=0.0, h=float(lr))
        super().__init__(_param_groups(params), defaults)
        self._companion = None
        companion = [p for p in (companion or []) if p.requires_grad]
        if companion:
            self._companion = torch.optim.AdamW(companion, lr=companion_lr, **(companion_kwargs or {}))
            for g in self._companion.param_groups:  # shared dicts: LR schedulers reach them too
                g["companion"] = True
                self.param_groups.append(g)
        self._stage_closure: Callable | None = None
        self._qr_cache: tuple | None = None  # QR factors left by the last retraction, keyed by param versions
        self._rho = 1.0  # adaptive step as a fraction of each group's lr (1 for fixed steps)
        self.stats = dict(steps=0, nfe=0, accepted=0, rejected=0, nonfinite=0)
        self.last_step: dict[str, Any] = {}
        self._bucket_cache: tuple[tuple, list[_Bucket]] | None = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model: torch.nn.Module, lr: float = 1e-3, *, adapter: str | list[str] | None = None, **kw) -> "ODELoRA":
        """An optimizer for every trainable parameter of a PEFT model: LoRA pairs (found by module,
        each with its own scaling) follow the flow, everything else goes to the AdamW companion
        (see :func:`odelora.integrations.peft.partition`)."""
        from .integrations.peft import partition

        part = partition(model, adapter)
        if not part.pairs:
            raise ValueError("the model has no trainable LoRA pairs; wrap it with peft.get_peft_model first")
        opt = cls(part.pairs, lr=lr, companion=[p for _, p, _ in part.others], **kw)
        opt.partition = part
        return opt

    def _pair_groups(self) -> list[dict]:
        return [g for g in self.param_groups if not g.get("companion")]

    @property
    def pairs(self) -> list[LoRAPair]:
        return [
            LoRAPair(g["params"][2 * i], g["params"][2 * i + 1], g["scales"][i], g["names"][i])
            for g in self._pair_groups()
            for i in range(len(g["scales"]))
        ]

    def set_stage_closure(self, closure: Callable[[], Any] | None) -> None:
        """For loops that backpropagate before calling ``step()`` (transformers' Trainer): the next
        ``step()`` without a closure takes its first stage from ``.grad`` and calls ``closure``
        for the remaining stages on the same batch."""
        self._stage_closure = closure

    def add_param_group(self, param_group: dict) -> None:
        if "pairs" in param_group:
            (param_group,) = _param_groups([param_group])
        if "scales" not in param_group or 2 * len(param_group["scales"]) != len(param_group["params"]):
            raise ValueError("ODELoRA param groups are built from pairs: pass {'pairs': [...], ...}")
        super().add_param_group(param_group)
        self._bucket_cache = None

    def _buckets(self) -> list[_Bucket]:
        groups = self._pair_groups()
        key = tuple(id(p) for g in groups for p in g["params"]) + tuple(s for g in groups for s in g["scales"])
        if self._bucket_cache is not None and self._bucket_cache[0] == key:
            return self._bucket_cache[1]
        buckets = []
        for gi, g in enumerate(self.param_groups):
            if g.get("companion"):
                continue
            by_shape: dict[tuple, list[int]] = {}
            ps = g["params"]
            for i in range(len(g["scales"])):
                B, A = ps[2 * i], ps[2 * i + 1]
                by_shape.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, B.device), []).append(i)
            for (_, _, dtype, device), idx in by_shape.items():
                wd = work_dtype(ps[2 * idx[0]])
                scales = torch.tensor([g["scales"][i] for i in idx], dtype=wd, device=device)
                buckets.append(_Bucket(gi, [ps[2 * i] for i in idx], [ps[2 * i + 1] for i in idx], scales, wd))
        self._bucket_cache = (key, buckets)
        return buckets

    # ------------------------------------------------------------------ stepping
    def _gather(self, buckets: list[_Bucket]) -> list[Tensor]:
        y = []
        for b in buckets:
            y.append(torch.stack(b.Bs).to(b.wd))
            y.append(torch.stack(b.As).to(b.wd))
        return y

    def _write(self, buckets: list[_Bucket], y: list[Tensor]) -> None:
        params, values = [], []
        for i, b in enumerate(buckets):
            params += b.Bs + b.As
            values += list(y[2 * i].unbind(0)) + list(y[2 * i + 1].unbind(0))
        torch._foreach_copy_(params, values)

    @staticmethod
    def _qr_matches(qrs, y) -> bool:
        for i, qr in enumerate(qrs):
            if qr is None:
                continue
            QB, RB, QA, RA = qr
            B, A = y[2 * i], y[2 * i + 1]
            tol = 100 * torch.finfo(B.dtype).eps
            if QB.shape[:-1] != B.shape[:-1] or not (
                torch.allclose(QB @ RB, B, rtol=tol, atol=tol * float(B.abs().max()))
                and torch.allclose(QA @ RA, A.mT, rtol=tol, atol=tol * float(A.abs().max()))
            ):
                return False
        return True

    @staticmethod
    def _versions(buckets: list[_Bucket]) -> tuple[int, ...]:
        return tuple(p._version for b in buckets for p in b.Bs + b.As)

    def _grads(self, buckets: list[_Bucket]) -> list[Tensor]:
        out = []
        for b in buckets:
            for ts in (b.Bs, b.As):
                out.append(torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in ts]).to(b.wd))
        return out

    def _velocity(self, buckets, y, closure, at_params: bool, record: dict) -> list[Tensor]:
        """Lr-weighted flow velocities at state ``y`` (written to the parameters first)."""
        if not at_params:
            self._write(buckets, y)
        if closure is not None:
            for b in buckets:
                for p in b.Bs + b.As:
                    p.grad = None
            with torch.enable_grad():
                loss = closure()
            record["nfe"] += 1
            if record.get("loss") is None:
                record["loss"] = loss
            if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                raise NonFiniteError(f"loss is {float(torch.as_tensor(loss).detach())}")
        else:  # the gradient already in .grad counts as this stage's evaluation
            record["nfe"] += 1
        g = self._grads(buckets)
        cached = None
        if at_params and self._qr_cache is not None and self.flow is balanced_flow:
            versions, qrs, trusted = self._qr_cache
            if trusted and versions == self._versions(buckets):  # still what the retraction wrote
                cached = qrs
            elif not trusted and self._qr_matches(qrs, y):  # restored from a checkpoint: check once
                cached = qrs
            self._qr_cache = (self._versions(buckets), qrs, True) if cached is not None else None
        v = []
        for i, b in enumerate(buckets):
            extra = {"qr": cached[i]} if cached is not None and cached[i] is not None else {}
            dB, dA = self.flow(y[2 * i], y[2 * i + 1], g[2 * i], g[2 * i + 1], scale=b.scales, **extra, **self.flow_options)
            lr = self.param_groups[b.group]["lr"]
            v += [dB.mul_(lr), dA.mul_(lr)]
        if not bool(torch.isfinite(sum(t.sum() for t in v))):  # NaN/inf anywhere makes the sum so; one sync
            raise NonFiniteError("gradient or velocity is not finite")
        return v

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Advance every pair by one (accepted) step; returns the loss of the first closure call.

        With ``closure=None`` only Euler can run, from the gradients already in ``.grad``.
        """
        tab = self.tableau
        stage_closure, self._stage_closure = self._stage_closure, None
        first_from_grad = closure is None and stage_closure is not None
        if first_from_grad:
            closure = stage_closure
        if closure is None and tab.stages > 1:
            raise ValueError(
                f"method {tab.name!r} evaluates the gradient {tab.stages} times per step: pass a "
                "closure that zeroes gradients, computes the loss on the current batch, calls "
                "backward() and returns the loss (optimizer.step(closure))"
            )
        buckets = self._buckets()
        if (closure is None or first_from_grad) and all(p.grad is None for b in buckets for p in b.Bs + b.As):
            raise RuntimeError("no gradients on the LoRA pairs: call loss.backward() first or pass a closure")
        y0 = self._gather(buckets)
        record: dict[str, Any] = dict(nfe=0, rejected=0, loss=None, accepted=False)
        first = [True]

        def f(y):
            at_params = first[0]
            first[0] = False
            v = self._velocity(buckets, y, None if (at_params and first_from_grad) else closure, at_params, record)
            if at_params and self._companion is not None:  # companion steps from the start point's gradients
                record["companion_grads"] = [
                    None if p.grad is None else p.grad.clone() for g in self._companion.param_groups for p in g["params"]
                ]
            return v

        rho = self._rho if tab.adaptive else 1.0
        k1 = None
        try:
            for _ in range(self.max_rejects + 1):
                y_new, err, ks = rk_step(f, y0, rho, tab, k1)
                if err is None:
                    record["accepted"] = True
                    break
                en = self.controller.error_norm(y0, y_new, err)
                rho_next = self.controller.next_step(rho, en, tab.order_low)
                if en <= 1.0:
                    record["accepted"] = True
                    self._rho = rho_next
                    break
                record["rejected"] += 1
                k1, rho = ks[0], rho_next
            else:
                self._rho = rho
        except NonFiniteError as exc:
            self._write(buckets, y0)
            self.stats["nonfinite"] += 1
            record["rejected"] += 1
            msg = f"ODELoRA rejected a step: {exc}; parameters and state are unchanged"
            if self.on_nonfinite == "raise":
                self._finish(record, rho, None, buckets)
                raise NonFiniteError(msg) from None
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._finish(record, rho, None, buckets)
            return record["loss"]
        if not record["accepted"]:
            self._write(buckets, y0)
            warnings.warn(
                f"ODELoRA: no step met rtol={self.controller.rtol} after {self.max_rejects} retries; "
                "parameters unchanged (loosen the tolerances or lower lr)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._finish(record, rho, None, buckets)
            return record["loss"]
        if self.preconditioner == "adam":
            y_new = self._adam(buckets, y0, y_new)
        qr_cache, drift = [], []
        if self.rebalance:
            for i, b in enumerate(buckets):
                y_new[2 * i], y_new[2 * i + 1], qr, d = balance_with_qr(y_new[2 * i], y_new[2 * i + 1], skip_deficient=True)
                qr_cache.append(qr if b.Bs[0].dtype == b.wd else None)  # rounding to half precision voids it
                drift.append(d)
        elif self.track_imbalance:
            drift = [imbalance(y_new[2 * i], y_new[2 * i + 1]) for i in range(len(buckets))]
        record["imbalance"] = drift
        self._write(buckets, y_new)
        self._qr_cache = (self._versions(buckets), qr_cache, True) if any(q is not None for q in qr_cache) else None
        if self._companion is not None:
            cps = [p for g in self._companion.param_groups for p in g["params"]]
            for p, g in zip(cps, record["companion_grads"]):
                p.grad = g
            self._companion.step()
        self._finish(record, rho, y_new, buckets)
        return record["loss"]

    def _adam(self, buckets, y0, y_new):
        """Replace the RK increment by an Adam step on the mean velocity ``(y_new - y0) / lr``."""
        out = []
        for i, b in enumerate(buckets):
            g = self.param_groups[b.group]
            lr, (b1, b2), eps, wdecay = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for j, ps in enumerate((b.Bs, b.As)):
                st = [self.state[p] for p in ps]
                if "exp_avg" not in st[0]:
                    for s, p in zip(st, ps):
                        s["step"] = 0
                        s["exp_avg"] = torch.zeros_like(p, dtype=b.wd)
                        s["exp_avg_sq"] = torch.zeros_like(p, dtype=b.wd)
                v = (y_new[2 * i + j] - y0[2 * i + j]) / lr
                m = torch.stack([s["exp_avg"] for s in st]).mul_(b1).add_(v, alpha=1 - b1)
                q = torch.stack([s["exp_avg_sq"] for s in st]).mul_(b2).addcmul_(v, v, value=1 - b2)
                step = st[0]["step"] + 1
                for k, s in enumerate(st):
                    s["exp_avg"], s["exp_avg_sq"], s["step"] = m[k].clone(), q[k].clone(), step
                mhat = m / (1 - b1**step)
                denom = (q / (1 - b2**step)).sqrt_().add_(eps)
                y = y0[2 * i + j] * (1 - lr * wdecay) if wdecay else y0[2 * i + j]
                out.append(y + lr * mhat / denom)
        return out

    def _finish(self, record, rho, y_new, buckets) -> None:
        accepted = y_new is not None
        for g in self._pair_groups():
            if accepted:
                g["t"] += rho * g["lr"]
            g["h"] = (self._rho if self.tableau.adaptive else 1.0) * g["lr"]  # the next step
        imb = None
        if accepted and self.track_imbalance and record.get("imbalance"):
            imb = float(torch.stack([d.max() for d in record["imbalance"]]).max())
        loss = record["loss"]
        self.stats["steps"] += 1
        self.stats["nfe"] += record["nfe"]
        self.stats["accepted"] += int(accepted)
        self.stats["rejected"] += record["rejected"]
        self.last_step = dict(
            nfe=record["nfe"],
            accepted=accepted,
            rejected=record["rejected"],
            h=rho * self._pair_groups()[0]["lr"],
            t=self._pair_groups()[0]["t"],
            imbalance=imb,
            loss=None if loss is None else float(torch.as_tensor(loss).detach()),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["odelora"] = dict(rho=self._rho, stats=dict(self.stats))
        if self._qr_cache is not None:  # derived, but resuming must reproduce the same arithmetic
            sd["odelora"]["qr_cache"] = [None if q is None else [t.clone() for t in q] for q in self._qr_cache[1]]
        if self._companion is not None:
            sd["odelora"]["companion"] = self._companion.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("odelora", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._rho = float(extra["rho"])
            self.stats.update(extra["stats"])
            qrs = extra.get("qr_cache")
            self._qr_cache = None if qrs is None else ((), [None if q is None else tuple(q) for q in qrs], False)
            if self._companion is not None and "companion" in extra:
                self._companion.load_state_dict(extra["companion"])
        if self._companion is not None:  # re-share the companion's group dicts after the reload
            groups = iter(self._companion.param_groups)
            for i, g in enumerate(self.param_groups):
                if g.get("companion"):
                    mine = next(groups)
                    mine.update({k: v for k, v in g.items() if k != "params"})
                    self.param_groups[i] = mine
        self._bucket_cache = None

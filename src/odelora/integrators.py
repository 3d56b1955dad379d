"""How time advances: Butcher tableaus, one generic explicit Runge-Kutta step, a step-size
controller for embedded pairs, and ``integrate`` for autonomous flows on lists of tensors.

A state is a list of tensors (for LoRA: the factors, possibly stacked over pairs); a vector field
``f(y) -> list of tensors`` returns one velocity per state tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Tableau",
    "TABLEAUS",
    "get_tableau",
    "rk_step",
    "StepController",
    "SolverStats",
    "IntegrationResult",
    "integrate",
]

State = list[Tensor]
VectorField = Callable[[State], State]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: ``c``, strictly lower-triangular ``a``, weights ``b``.

    Embedded pairs also carry ``b_low`` (the weights of the lower-order solution, order
    ``order_low``); ``fsal`` marks tableaus whose last stage is evaluated at the new state.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_low: tuple[float, ...] | None = None
    order_low: int | None = None
    fsal: bool = False

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        return self.b_low is not None

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: a must be strictly lower triangular, s={s}")
        if self.b_low is not None and len(self.b_low) != s:
            raise ValueError(f"tableau {self.name!r}: b_low must have {s} weights")


_EULER = Tableau("euler", 1, (0.0,), ((),), (1.0,))
_HEUN = Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5))
_MIDPOINT = Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0))
_RK4 = Tableau(
    "rk4", 4, (0.0, 0.5, 0.5, 1.0),
    ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    (1 / 6, 1 / 3, 1 / 3, 1 / 6),
)
# Bogacki & Shampine (1989), Appl. Math. Lett. 2(4).
_BS32 = Tableau(
    "bs32", 3, (0.0, 0.5, 0.75, 1.0),
    ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
    (2 / 9, 1 / 3, 4 / 9, 0.0),
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8), order_low=2, fsal=True,
)
# Dormand & Prince (1980), J. Comput. Appl. Math. 6(1).
_DOPRI5 = Tableau(
    "dopri5", 5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    (
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    order_low=4, fsal=True,
)

TABLEAUS: dict[str, Tableau] = {t.name: t for t in (_EULER, _HEUN, _MIDPOINT, _RK4, _BS32, _DOPRI5)}


def get_tableau(method: str | Tableau) -> Tableau:
    if isinstance(method, Tableau):
        return method
    try:
        return TABLEAUS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {list(TABLEAUS)}") from None


def _combine(y: State, h: float, coeffs: Sequence[float], ks: Sequence[State]) -> State:
    """``y + h * sum_j coeffs[j] * ks[j]`` (zero coefficients skipped)."""
    out = None
    for cj, kj in zip(coeffs, ks):
        if cj != 0.0:
            if out is None:
                out = torch._foreach_add(y, kj, alpha=h * cj)
            else:
                torch._foreach_add_(out, kj, alpha=h * cj)
    return [t.clone() for t in y] if out is None else list(out)


def rk_step(
    f: VectorField, y: State, h: float, tableau: Tableau, k1: State | None = None
) -> tuple[State, State | None, list[State]]:
    """One explicit RK step of size ``h`` from ``y``.

    Returns ``(y_new, err, ks)``: ``err = y_high - y_low`` for embedded pairs (else None) and the
    stage velocities. ``k1`` (the velocity at ``y``) is reused when given, saving one evaluation.
    """
    ks: list[State] = []
    for i in range(tableau.stages):
        if i == 0 and k1 is not None:
            ks.append(k1)
            continue
        yi = y if i == 0 else _combine(y, h, tableau.a[i], ks)
        ks.append(f(yi))
    y_new = _combine(y, h, tableau.b, ks)
    err = None
    if tableau.b_low is not None:
        diff = [bh - bl for bh, bl in zip(tableau.b, tableau.b_low)]
        err = _combine([torch.zeros_like(t) for t in y], h, diff, ks)
    return y_new, err, ks


@dataclass
class StepController:
    """Accept/reject rule and next step size for embedded pairs (MATH.md section 3).

    ``err = rms(y_high - y_low) / (atol + rtol * max(|y|, |y_new|))`` over all tensors; a step is
    accepted when ``err <= 1``; the next step is ``h * clip(safety * err^(-1/(q+1)), shrink,
    grow)`` with q the lower order, clipped to ``[h_min, h_max]``.
    """

    rtol: float = 1e-6
    atol: float = 1e-9
    safety: float = 0.9
    shrink: float = 0.2
    grow: float = 5.0
    h_min: float = 0.0
    h_max: float = math.inf

    def __post_init__(self):
        if self.rtol < 0 or self.atol < 0 or self.rtol + self.atol <= 0:
            raise ValueError("rtol and atol must be non-negative and not both zero")
        if not 0 < self.shrink <= 1 <= self.grow:
            raise ValueError("need 0 < shrink <= 1 <= grow")

    def error_norm(self, y: State, y_new: State, err: State) -> float:
        total, count = 0.0, 0
        for a, b, e in zip(y, y_new, err):
            tol = self.atol + self.rtol * torch.maximum(a.abs(), b.abs())
            total += float(((e / tol) ** 2).sum())
            count += e.numel()
        return math.sqrt(total / max(count, 1))

    def next_step(self, h: float, err_norm: float, order_low: int) -> float:
        if not math.isfinite(err_norm):
            factor = self.shrink
        elif err_norm == 0.0:
            factor = self.grow
        else:
            factor = min(self.grow, max(self.shrink, self.safety * err_norm ** (-1.0 / (order_low + 1))))
        return min(self.h_max, max(self.h_min, h * factor))


@dataclass
class SolverStats:
    nfe: int = 0
    steps: int = 0
    accepted: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(nfe=self.nfe, steps=self.steps, accepted=self.accepted, rejected=self.rejected)


@dataclass
class IntegrationResult:
    """``ys[i]`` is the state at ``ts[i]``; ``y`` is the final state."""

    ts: list[float]
    ys: list[State]
    stats: SolverStats = field(default_factory=SolverStats)

    @property
    def y(self) -> State:
        return self.ys[-1]


def integrate(
    f: VectorField,
    y0: Sequence[Tensor],
    t_span: tuple[float, float],
    *,
    method: str | Tableau = "dopri5",
    h: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    t_eval: Sequence[float] | None = None,
    max_steps: int = 1_000_000,
    controller: StepController | None = None,
    callback: Callable[[float, State], None] | None = None,
) -> IntegrationResult:
    """Integrate the autonomous flow ``dy/dt = f(y)`` from ``t_span[0]`` to ``t_span[1]``.

    Fixed-step tableaus need ``h`` (the last step is shortened to land on each output time);
    embedded pairs adapt ``h`` (initial guess ``h`` or ``(t1 - t0) / 100``). States are saved at
    ``t_eval`` (default: only the end), which the solver steps onto exactly.
    """
    tab = get_tableau(method)
    t0, t1 = map(float, t_span)
    if not t1 > t0:
        raise ValueError(f"t_span must be increasing, got {t_span}")
    if not tab.adaptive and (h is None or h <= 0):
        raise ValueError(f"fixed-step method {tab.name!r} needs a positive step h")
    outs = sorted(float(t) for t in (t_eval if t_eval is not None else [t1]))
    if outs and (outs[0] < t0 or outs[-1] > t1):
        raise ValueError("t_eval must lie inside t_span")
    ctrl = controller or StepController(rtol=rtol, atol=atol)
    stats = SolverStats()
    y = [t.clone() for t in y0]
    t = t0
    step = float(h) if h else (t1 - t0) / 100
    result = IntegrationResult([], [], stats)
    k1 = None
    eps = 1e-12 * max(1.0, abs(t1))
    for target in outs:
        while target - t > eps:
            if stats.steps >= max_steps:
                raise RuntimeError(f"integrate: max_steps={max_steps} reached at t={t:.6g}")
            hh = min(step, target - t)
            y_new, err, ks = rk_step(f, y, hh, tab, k1)
            stats.nfe += tab.stages - (k1 is not None)
            stats.steps += 1
            if err is None:
                accept = True
            else:
                en = ctrl.error_norm(y, y_new, err)
                accept = en <= 1.0
                step = ctrl.next_step(hh, en, tab.order_low)
                if not accept and hh <= ctrl.h_min:
                    raise RuntimeError(f"integrate: step {hh:.3g} at h_min still fails the tolerance")
            if accept:
                stats.accepted += 1
                y, t = y_new, t + hh
                k1 = ks[-1] if tab.fsal else None
                if callback is not None:
                    callback(t, y)
            else:
                stats.rejected += 1
                k1 = ks[0]
        result.ts.append(target)
        result.ys.append([x.clone() for x in y])
    return result

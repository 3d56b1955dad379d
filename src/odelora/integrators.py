"""How time advances: Butcher tableaus, one generic explicit Runge-Kutta step, a step-size
controller, ``attempt`` (the one accept/reject loop) and ``integrate`` for autonomous flows.

A *space* says how a state moves along a combination of stage velocities: :class:`VectorSpace`
adds them (lists of tensors, ``y + h sum_j a_j k_j``); the LoRA retractions in
``odelora.retractions`` step the factors on the rank-r manifold instead. Every method, fixed or
adaptive, in every space, goes through :func:`rk_step` and :func:`attempt`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "Tableau",
    "TABLEAUS",
    "get_tableau",
    "Stage",
    "Space",
    "VectorSpace",
    "rk_step",
    "axpy",
    "StepController",
    "Attempt",
    "attempt",
    "NonFiniteError",
    "SolverStats",
    "IntegrationResult",
    "integrate",
]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or velocity was NaN or infinite, or a decomposition failed at a stage
    (``torch.linalg.LinAlgError``: LAPACK fails on NaN/inf or overflowing input; the message says
    so). ``stage`` is the RK stage it came from and ``stages`` the stages completed before it (set
    by :func:`rk_step`)."""

    stage: int | None = None
    stages: list | None = None


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: ``c``, strictly lower-triangular ``a``, weights ``b``;
    embedded pairs also carry ``b_low`` (weights of the order-``order_low`` solution).

    Checked on construction: shapes, ``c_i = sum_j a_ij``, ``sum b = 1`` (and ``sum b_low = 1``).
    ``fsal`` is derived: the last stage is evaluated at the new state (``a[-1] == b``,
    ``b[-1] == 0``), so an accepted step's last velocity is the next step's first.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_low: tuple[float, ...] | None = None
    order_low: int | None = None

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: a must be strictly lower triangular with {s} rows")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"tableau {self.name!r}: row {i} of a sums to {sum(row)}, not c[{i}] = {self.c[i]}")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"tableau {self.name!r}: weights b sum to {sum(self.b)}, not 1")
        if (self.b_low is None) != (self.order_low is None):
            raise ValueError(f"tableau {self.name!r}: give both b_low and order_low, or neither")
        if self.b_low is not None and (len(self.b_low) != s or abs(sum(self.b_low) - 1.0) > 1e-12):
            raise ValueError(f"tableau {self.name!r}: b_low must have {s} weights summing to 1")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        return self.b_low is not None

    @property
    def fsal(self) -> bool:
        s = self.stages
        return s > 1 and self.b[-1] == 0.0 and all(abs(x - y) < 1e-15 for x, y in zip(self.a[-1], self.b[:-1]))

    @property
    def b_err(self) -> tuple[float, ...]:
        """Weights of the error estimate ``y_high - y_low``."""
        if self.b_low is None:
            raise ValueError(f"tableau {self.name!r} has no embedded error estimate")
        return tuple(x - y for x, y in zip(self.b, self.b_low))


TABLEAUS: dict[str, Tableau] = {
    t.name: t
    for t in (
        Tableau("euler", 1, (0.0,), ((),), (1.0,)),
        Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
        Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
        Tableau(
            "rk4", 4, (0.0, 0.5, 0.5, 1.0),
            ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        ),
        # Bogacki & Shampine (1989), Appl. Math. Lett. 2(4).
        Tableau(
            "bs32", 3, (0.0, 0.5, 0.75, 1.0),
            ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
            (2 / 9, 1 / 3, 4 / 9, 0.0),
            b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8), order_low=2,
        ),
        # Dormand & Prince (1980), J. Comput. Appl. Math. 6(1).
        Tableau(
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
            order_low=4,
        ),
    )
}


def get_tableau(method: str | Tableau) -> Tableau:
    if isinstance(method, Tableau):
        return method
    try:
        return TABLEAUS[method]
    except (KeyError, TypeError):  # an unknown or unhashable name
        raise ValueError(f"unknown method {method!r}; choose one of {list(TABLEAUS)}") from None


class Stage(NamedTuple):
    """One RK stage: the state it was evaluated at and the velocity there."""

    y: Any
    k: Any


class Space(Protocol):
    """How states move. ``h`` holds one step per part of the state (for the optimizer: per bucket
    of pairs, each group's learning rate times the controller's step)."""

    def combine(self, y0: Any, h: Sequence[float], coeffs: Sequence[float], stages: Sequence[Stage]) -> Any:
        """The state reached from ``y0`` along ``sum_j coeffs[j] * stages[j].k`` over time h.
        A space may also define ``stage`` (same arguments) for the states inside a step, where
        those differ from the step's result (a retraction applied to the result only)."""

    def error_ratios(
        self, y0: Any, y1: Any, h: Sequence[float], coeffs: Sequence[float], stages: Sequence[Stage], atol: float, rtol: float
    ) -> Tensor:
        """Size of the error estimate ``h sum_j coeffs[j] k_j`` against ``atol + rtol |y|``, one
        ratio per unit the space measures (accept when their root mean square is <= 1)."""


def axpy(y0: Sequence[Tensor], h: Sequence[float], coeffs: Sequence[float], ks: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """``y0[p] + h[p] * sum_j coeffs[j] * ks[j][p]`` for every part p (zero coefficients skipped)."""
    acc = None
    for cj, kj in zip(coeffs, ks):
        if cj != 0.0:
            if acc is None:
                acc = torch._foreach_mul(list(kj), cj)
            else:
                torch._foreach_add_(acc, list(kj), alpha=cj)
    if acc is None:
        return [t.clone() for t in y0]
    torch._foreach_mul_(acc, list(h))
    torch._foreach_add_(acc, list(y0))
    return acc


def scaled_error(e: Tensor, tol: Tensor | float) -> Tensor:
    """``e / tol`` with an exact zero error counting as 0 wherever the tolerance is 0 (``atol = 0``
    at an entry or a product that stays zero): a component that did not move meets any tolerance."""
    return torch.where(e == 0, torch.zeros_like(e), e / tol)


class VectorSpace:
    """States are lists of tensors and move by vector addition; the error is the root mean square
    over all entries of ``e / (atol + rtol * max(|y0|, |y1|))`` (docs/math.md section 4)."""

    def combine(self, y0, h, coeffs, stages):
        return axpy(y0, h, coeffs, [st.k for st in stages])

    def error_ratios(self, y0, y1, h, coeffs, stages, atol, rtol):
        err = axpy([torch.zeros_like(t) for t in y0], h, coeffs, [st.k for st in stages])
        total = sum(float(scaled_error(e, atol + rtol * torch.maximum(a.abs(), b.abs())).square().sum()) for a, b, e in zip(y0, y1, err))
        count = sum(e.numel() for e in err)
        return torch.tensor([math.sqrt(total / max(count, 1))])


def reuses_last_stage(tableau: Tableau, space: Space) -> bool:
    """Whether a step's last stage is its result's velocity (FSAL), for the next step to reuse:
    not in a space whose stages differ from its results (``space.stage``: the balancing
    retraction rebalances only results, and the error estimate combines that stage with the
    others, which are velocities of the start's factorization)."""
    return tableau.fsal and not hasattr(space, "stage")


def rk_step(
    f: Callable[[Any], Any], y0: Any, h: Sequence[float], tableau: Tableau, space: Space, first: Stage | None = None,
    combine: bool = True,
) -> tuple[Any, list[Stage]]:
    """One explicit RK step from ``y0``: returns the new state and the stages.

    ``first`` (the stage at ``y0``) is reused when given, saving one evaluation. With
    ``combine=False`` the stages are all the caller needs: the new state is not formed (None). A
    :class:`NonFiniteError` raised by ``f`` comes out with the stage index and the completed
    stages attached.
    """
    stages = [first] if first is not None else []

    def failed(exc: Exception, i: int) -> NonFiniteError:
        err = exc if isinstance(exc, NonFiniteError) else NonFiniteError(f"linear algebra failed ({exc})")
        err.stage, err.stages = i, stages
        return err

    inside = getattr(space, "stage", space.combine)
    at_result = reuses_last_stage(tableau, space)
    for i in range(len(stages), tableau.stages):
        last = at_result and i == tableau.stages - 1  # evaluated at the step's result
        try:
            yi = y0 if i == 0 else (space.combine if last else inside)(y0, h, tableau.a[i], stages)
            k = f(yi)
        except (NonFiniteError, torch.linalg.LinAlgError) as exc:
            raise failed(exc, i) from None
        stages.append(Stage(yi, k))
    if at_result:  # the last stage was evaluated at the new state
        return stages[-1].y, stages
    if not combine:
        return None, stages
    try:
        return space.combine(y0, h, tableau.b, stages), stages
    except torch.linalg.LinAlgError as exc:  # e.g. the stages' combination overflowed
        raise failed(exc, tableau.stages) from None


@dataclass
class StepController:
    """Step-size rule for embedded pairs (docs/math.md section 4): accept when the error norm is <= 1;
    next step ``h * clip(safety * err^(-1/(q+1)), shrink, grow)`` (q the lower order), clipped to
    ``[h_min, h_max]``. A non-finite stage counts as a rejection with the factor ``shrink``.

    After two rejections of the same step the error's observed order in h replaces q + 1: where
    the velocity jumps (leaving ``B = 0``, a rank increase) the error falls only like h, and the
    textbook rule would need many retries to find the step (the factor is then floored at
    ``shrink**4`` instead of ``shrink``). Where the error falls slower than ``sqrt(h)``, not at
    all (the relative error of a step off a zero product does not depend on h until ``atol``
    dominates) or grows, there is no order to extrapolate and the step is cut by ``shrink**2``."""

    rtol: float = 1e-6
    atol: float = 1e-9
    safety: float = 0.9
    shrink: float = 0.2
    grow: float = 5.0
    h_min: float = 0.0
    h_max: float = math.inf

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
                value = float(value)  # as lr: a one-element tensor is a number
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number (a float or a one-element tensor), got {value!r}")
        if not (0 <= self.rtol < math.inf and 0 <= self.atol < math.inf) or self.rtol + self.atol <= 0:
            raise ValueError(f"rtol and atol must be finite, non-negative and not both zero, got rtol={self.rtol}, atol={self.atol}")
        if not 0 < self.shrink <= 1 <= self.grow:
            raise ValueError("need 0 < shrink <= 1 <= grow")

    def next_step(self, h: float, err_norm: float, order_low: int, previous: tuple[float, float] | None = None) -> float:
        """``previous = (h, err)`` of the last rejected try of the same step, if any."""
        if not math.isfinite(err_norm):
            factor = self.shrink
        elif err_norm == 0.0:
            factor = self.grow
        elif err_norm > 1.0 and previous is not None and previous[0] > h and math.isfinite(previous[1]):
            q = math.log(previous[1] / err_norm) / math.log(previous[0] / h)
            if q < 0.5:  # the error does not fall with h (a plateau), or grows: no order to extrapolate
                factor = self.shrink**2
            else:
                factor = max(self.shrink**4, self.safety * err_norm ** (-1.0 / min(q, order_low + 1.0)))
        else:
            factor = min(self.grow, max(self.shrink, self.safety * err_norm ** (-1.0 / (order_low + 1))))
        return min(self.h_max, max(self.h_min, h * factor))


@dataclass
class Attempt:
    """What :func:`attempt` did: whether a try was accepted, its state (None if every try failed,
    or if only the stages were asked for), its stages, the step taken, the proposed next step, and
    the counts. ``h`` and ``h_next`` are in the units of :func:`attempt`'s ``h`` (the optimizer
    passes a fraction of each bucket's lr and ``unit`` = the lrs)."""

    y: Any
    stages: list[Stage]
    h: float
    h_next: float
    nfe: int = 0
    rejected: int = 0
    nonfinite: int = 0
    ratios: Tensor | None = None  # error ratios of the last try (adaptive methods)
    accepted: bool = False
    nonfinite_what: str | None = None  # what the last non-finite try met
    rejected_at: tuple[float, float] | None = None  # (h, error norm) of the last finite rejected try, where none was accepted
    why: str | None = None  # why no try was accepted, where the caller knows better than the counts


def attempt(
    f: Callable[[Any], Any],
    y0: Any,
    h: float,
    tableau: Tableau,
    space: Space,
    controller: StepController,
    *,
    unit: float | Sequence[float] = 1.0,
    parts: int = 1,
    max_tries: int = 10,
    first: Stage | None = None,
    deciding: Callable[[Tensor], Tensor] | None = None,
    combine: bool = True,
    previous: tuple[float, float] | None = None,
) -> Attempt:
    """Take one step from ``y0``, retrying with a smaller step until one is accepted, at most
    ``max_tries`` times. The step of part p is ``h * unit[p]``.

    Embedded pairs are accepted when their error norm is <= 1. A :class:`NonFiniteError` at a
    later stage is a rejection (the step shrinks by ``controller.shrink``, for fixed-step methods
    too); one at the first stage is raised, since no smaller step can help. A retry reuses the
    first stage. ``y0`` itself is never modified. ``combine=False`` (fixed-step methods only):
    return the stages without forming the new state. ``deciding`` maps the error ratios to those
    the decision is made on (the optimizer's: the largest over data-parallel ranks, so that they
    decide alike, of the pairs that take part in the step); ``Attempt.ratios`` holds them.
    ``previous``: ``Attempt.rejected_at`` of an earlier call that tried the same step and gave up
    (an optimizer that skips a step after one try), so that the controller sees the error's
    order in h across calls as across tries.
    """
    units = list(unit) if isinstance(unit, (list, tuple)) else [float(unit)] * parts
    out = Attempt(None, [], h, h)
    calls = [0]

    def counted(y):
        calls[0] += 1
        return f(y)

    for _ in range(max_tries):
        hs = [h * u for u in units]
        out.h = h
        try:
            y1, stages = rk_step(counted, y0, hs, tableau, space, first, combine or tableau.adaptive)
        except NonFiniteError as exc:
            if exc.stage == 0:
                raise
            out.nonfinite += 1
            out.rejected += 1
            out.nonfinite_what = f"at the step's retraction: {exc}" if exc.stage >= tableau.stages else str(exc)
            first = exc.stages[0]
            h = max(controller.h_min, h * controller.shrink)
            out.h_next = h
            continue
        if not tableau.adaptive:
            out.y, out.stages, out.h_next, out.accepted = y1, stages, h, True
            break
        ratios = space.error_ratios(y0, y1, hs, tableau.b_err, stages, controller.atol, controller.rtol)
        if deciding is not None:
            ratios = deciding(ratios)
        err = float(ratios.double().square().mean().sqrt())
        out.ratios = ratios
        h_next = controller.next_step(h, err, tableau.order_low, previous)
        if err <= 1.0:
            out.y, out.stages, out.h_next, out.accepted = y1, stages, h_next, True
            break
        previous = (h, err) if math.isfinite(err) else None
        out.rejected += 1
        first, h, out.h_next = stages[0], h_next, h_next
        if h <= controller.h_min and out.h <= controller.h_min:
            break
    if not out.accepted:
        out.rejected_at = previous
    out.nfe = calls[0]
    return out


@dataclass
class SolverStats:
    nfe: int = 0
    steps: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass
class IntegrationResult:
    """``ys[i]`` is the state at ``ts[i]`` (the ``t_eval`` times); ``y`` is the state at the end
    of ``t_span``."""

    ts: list[float]
    ys: list[Any]
    stats: SolverStats = field(default_factory=SolverStats)
    y: Any = None


def _finite_flow(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``f`` with a :class:`NonFiniteError` where a velocity holds NaN or inf (for tensor states,
    which, unlike factors, no retraction checks): a rejected try, or an error at the start."""
    def checked(y):
        k = f(y)
        norms = torch._foreach_norm(list(k)) if len(k) else []  # one kernel for all parts; inf also where one overflows
        if norms and not bool(torch.stack(norms).isfinite().all()):
            raise NonFiniteError("the flow returned NaN or inf")
        return k
    return checked


def integrate(
    f: Callable[[Any], Any],
    y0: Sequence[Tensor],
    t_span: tuple[float, float],
    *,
    method: str | Tableau = "dopri5",
    h: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    t_eval: Sequence[float] | None = None,
    max_steps: int = 1_000_000,
    controller: StepController | None = None,
    space: Space | None = None,
    callback: Callable[[float, Any], None] | None = None,
) -> IntegrationResult:
    """Integrate the autonomous flow ``dy/dt = f(y)`` from ``t_span[0]`` to ``t_span[1]``.

    Fixed-step tableaus need ``h`` (the last step is shortened to land on each output time);
    embedded pairs adapt ``h`` (initial guess ``h`` or ``(t1 - t0) / 100``) to ``rtol`` and ``atol``
    (default 1e-6 and 1e-9), or as ``controller`` says. States are saved at
    ``t_eval`` (default: only the end), which the solver steps onto exactly; it always runs to
    ``t_span[1]``, the state ``y`` of the result, as ``scipy.integrate.solve_ivp`` does. ``space`` defaults to
    :class:`VectorSpace` (``y0`` a list of tensors); with another space ``y0`` is a list of its
    parts (for LoRA factors, of :class:`odelora.retractions.Factors`).
    """
    tab = get_tableau(method)
    try:
        t0, t1 = (float(t) for t in t_span)  # a pair, a numpy array or a tensor of two times
    except (TypeError, ValueError):
        raise ValueError(f"t_span must be (t0, t1), got {t_span!r}") from None
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise ValueError(f"t_span must be increasing and finite, got {t_span}")
    if not tab.adaptive and h is None:
        raise ValueError(f"fixed-step method {tab.name!r} needs a positive step h")
    if h is not None and not (isinstance(h, numbers.Real) and not isinstance(h, bool) and 0 < h < math.inf):
        raise ValueError(f"h must be a positive finite number (the {'first' if tab.adaptive else 'fixed'} step), got {h!r}")
    if t_eval is not None and not isinstance(t_eval, (Sequence, Tensor)) and not hasattr(t_eval, "__array__"):
        raise ValueError(f"t_eval must be a sequence of times, got {t_eval!r}")
    outs = [float(t) for t in (t_eval if t_eval is not None else [t1])]
    if any(b < a for a, b in zip(outs, outs[1:])):  # ys[i] answers t_eval[i]: reordering would swap them silently
        raise ValueError(f"t_eval must be sorted in increasing order (as scipy's solve_ivp requires), got {list(t_eval)}")
    if outs and (outs[0] < t0 or outs[-1] > t1):
        raise ValueError("t_eval must lie inside t_span")
    if controller is not None and (rtol is not None or atol is not None):
        raise ValueError("integrate: pass rtol and atol to the StepController, or leave controller out")
    ctrl = controller or StepController(rtol=1e-6 if rtol is None else rtol, atol=1e-9 if atol is None else atol)
    space = space or VectorSpace()
    vector = isinstance(space, VectorSpace)
    if isinstance(y0, Tensor) or not isinstance(y0, Sequence) or (vector and not all(isinstance(t, Tensor) for t in y0)):
        raise TypeError("y0 must be a list of tensors, the parts of the state (f takes and returns such a list): for one "
                        "tensor y pass [y], and read result.y[0]")
    y = [t.clone() for t in y0] if vector else list(y0)
    if vector:
        f = _finite_flow(f)
    parts = len(y)
    stats = SolverStats()
    result = IntegrationResult([], [], stats)
    # The flow is autonomous: time is counted from t0 (el), so that a t_span far from 0 keeps the
    # steps' own precision; el reaches an output time within eps of it.
    el, step, first = 0.0, float(h) if h else (t1 - t0) / 100, None
    eps = 1e-12 * (t1 - t0)
    for target in outs + ([t1] if not outs or outs[-1] < t1 - eps else []):
        while (target - t0) - el > eps:
            t = t0 + el
            if stats.steps >= max_steps:
                raise RuntimeError(f"integrate: max_steps={max_steps} reached at t={t:.6g}; raise max_steps, or "
                                   + ("loosen rtol and atol" if tab.adaptive else "take a larger h"))
            hh = min(step, (target - t0) - el)
            try:
                res = attempt(f, y, hh, tab, space, ctrl, parts=parts, max_tries=max_steps - stats.steps, first=first)
            except NonFiniteError as exc:  # at the state itself: no shorter step helps
                raise NonFiniteError(f"integrate: the flow at the state at t={t:.6g} is not finite ({exc})") from None
            stats.nfe += res.nfe
            stats.steps += res.rejected + res.accepted
            stats.rejected += res.rejected
            if not res.accepted:
                if res.nonfinite == res.rejected:
                    why = "the flow was NaN or infinite at every try; check the flow and the start state"
                else:
                    why = (f"no step met the tolerance down to h_min={ctrl.h_min:.3g}; loosen rtol and atol, or check "
                           "the flow for values that grow without bound")
                spent = f"max_steps={max_steps} reached with every try rejected: " if stats.steps >= max_steps else ""
                raise RuntimeError(f"integrate: {spent}no step from t={t:.6g} was accepted: {why}")
            stats.accepted += 1
            y, el = res.y, el + res.h
            step = res.h_next if tab.adaptive else step
            first = res.stages[-1] if reuses_last_stage(tab, space) else None
            if callback is not None:
                callback(t0 + el, y)
        if target in outs:
            result.ts.append(target)
            result.ys.append([x.clone() for x in y] if vector else y)
    result.y = y
    return result

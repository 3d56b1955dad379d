"""What moves: velocity fields ``d(B, A)/dt`` of the LoRA factors.

A flow is called as ``flow(B, A, gB, gA, *, scale=1.0, **options) -> (dB, dA)``: ``gB``, ``gA`` are
the autograd gradients of the loss with respect to the factors of ``W = W0 + scale * B @ A`` and
``(dB, dA)`` is a descent velocity. Inputs may carry leading batch dimensions (a stack of pairs of
equal shape); ``scale`` is a number or a tensor broadcasting over the batch. Velocities come back in
the compute precision (float32 for half inputs, float64 for float64 inputs).

The scaled and balanced flows divide the gradients by ``scale**2``, so that their time has the
meaning of a full fine-tuning learning rate: the product ``X = s B A`` moves with velocity
``-P(G)`` (balanced) or ``-(PU G + G PV)`` (scaled). The gradient flow is plain LoRA.

Both work from the factors' thin SVDs (a :class:`~odelora.geometry.Frame`, passed in or computed)
and divide by no singular value without damping (``odelora.geometry``): a direction whose squared
singular value is below ``damping * max^2`` fades out smoothly instead of being inverted, so the
flows are defined and bounded for every input, ``B = 0`` and ``A = 0`` included, with no rank
test and no threshold. Where both factors are well conditioned the damping changes the result by
a relative ``damping * cond^2`` (about 1e-12 for cond = 100 in float64). The default damping is
``eps`` for factor velocities and ``eps^2`` for the balanced flow's tangent vectors
(:func:`~odelora.geometry.default_damping`).

Each flow is a :class:`Flow`: the function plus what it supports (taking a precomputed frame,
skipping its gauge term) and the retraction the optimizer uses with it by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .geometry import Frame, Tangent, check_pair, compute_dtype, damped_inverse, default_damping, factor_frame, tall_mm

__all__ = ["Flow", "gradient", "scaled", "balanced", "FLOWS", "get_flow", "check_damping"]


@dataclass(frozen=True)
class Flow:
    """A velocity field with what the optimizer may assume of it.

    ``uses_frame``: the function accepts ``frame=`` (the factors' thin SVDs) and then skips
    computing it. ``has_gauge``: it accepts ``gauge=False``, dropping a term that moves only the
    factorization, not the product. ``tangent``: a function with the same arguments (``frame``
    required) returning the product velocity as a :class:`~odelora.geometry.Tangent`, which
    retractions that rebuild the factors from the product take directly. ``retraction``: the
    optimizer's default way of stepping with this flow; ``adaptive_retraction``: the default for
    error-controlled methods where it differs. The scaled flow's factor ODE is stiff just off
    ``B = 0`` (A's velocity grows like ``1 / |B|``), which no embedded error estimate on the
    factor entries accepts, while its product velocity ``-(PU G + G PV)`` depends on the product
    alone, so stepping the product (the truncation) integrates the same flow of ``s B A``.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Tensor]]
    uses_frame: bool = False
    has_gauge: bool = False
    tangent: Callable[..., Tangent] | None = None
    retraction: str = "none"
    adaptive_retraction: str | None = None

    def default_retraction(self, adaptive: bool) -> str:
        return (self.adaptive_retraction if adaptive else None) or self.retraction

    def __call__(self, B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, *, scale=1.0, **options):
        return self.fn(B, A, gB, gA, scale=scale, **options)


def _check_shapes(B, A, gB, gA):
    check_pair(B, A)
    if gB.shape != B.shape or gA.shape != A.shape:
        raise ValueError(
            f"gradient shapes {tuple(gB.shape)}, {tuple(gA.shape)} differ from the factors' "
            f"{tuple(B.shape)}, {tuple(A.shape)}"
        )


def check_damping(damping) -> None:
    """A flow's ``damping``: None (the default) or a finite number >= 0."""
    if damping is None:
        return
    try:
        ok = not isinstance(damping, (bool, str, bytes)) and float(damping) >= 0 and math.isfinite(float(damping))
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"damping must be a finite number >= 0 (relative to the largest squared singular value; "
                         f"default: the unit roundoff eps, eps^2 for the balanced flow's tangent vectors), got {damping!r}")


def _damping(dt: torch.dtype, damping: float | None, tangent: bool = False) -> float:
    check_damping(damping)
    return default_damping(dt, tangent) if damping is None else float(damping)


def _inverse_square(scale, dt: torch.dtype, device) -> Tensor:
    """``1 / scale^2``: a number, or one value per stacked pair (shape of the batch)."""
    s = torch.as_tensor(scale, dtype=dt, device=device)
    return 1.0 / (s * s)


def _prepare(B, A, gB, gA, scale, frame, damping):
    """Inputs in the compute precision, gradients divided by scale^2, the frame and damping."""
    _check_shapes(B, A, gB, gA)
    dt = compute_dtype(B, A, gB, gA)
    inv_s2 = _inverse_square(scale, dt, B.device)
    if inv_s2.ndim:  # one scale per stacked pair
        inv_s2 = inv_s2.reshape(*inv_s2.shape, 1, 1)
    B, A = B.to(dt), A.to(dt)
    fr = frame if frame is not None else factor_frame(B, A)
    return B, A, gB.to(dt) * inv_s2, gA.to(dt) * inv_s2, fr, _damping(dt, damping)


def _gradient(B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, *, scale=1.0) -> tuple[Tensor, Tensor]:
    """Plain LoRA gradient flow: ``dB = -gB``, ``dA = -gA`` (``scale`` is already in the gradients)."""
    _check_shapes(B, A, gB, gA)
    dt = compute_dtype(B, A, gB, gA)
    return -gB.to(dt), -gA.to(dt)


def _scaled(B, A, gB, gA, *, scale=1.0, frame: Frame | None = None, damping: float | None = None):
    """Scaled (Riemannian-preconditioned) flow: ``dB = -hB (MA + lam I)^-1``,
    ``dA = -(MB + lam I)^-1 hA`` with ``h = g / scale**2`` and the relative damping of
    :func:`odelora.geometry.damped_inverse` (``damping``, default the unit roundoff). At a zero
    factor (PEFT's ``B = 0`` start) the other factor's gradient is exactly zero and so is its
    velocity."""
    B, A, hB, hA, fr, d = _prepare(B, A, gB, gA, scale, frame, damping)
    invB, invA = damped_inverse(fr.sB, d), damped_inverse(fr.sA, d)
    dB = -tall_mm(tall_mm(hB, fr.PA) * invA.unsqueeze(-2), fr.PA.mT)  # -hB (MA + lam)^-1
    dA = -fr.PB @ (invB.unsqueeze(-1) * (fr.PB.mT @ hA))  # -(MB + lam)^-1 hA
    return dB, dA


def _gauge(C: Tensor, fr: Frame) -> Tensor:
    """``C/2 + D``: the shift ``dB -= B Gamma``, ``dA += Gamma A`` that keeps balanced factors
    balanced, ``d/dt (B.T B - A A.T) = 0`` where ``B.T B = A A.T`` (docs/math.md section 2; away
    from balance the difference is not conserved). D solves a Lyapunov equation in the eigenbasis of
    ``M = (A A.T + B.T B) / 2``, which a balanced frame already is; each entry of D is at most
    one entry of ``C - C.T`` in size."""
    if fr.balanced:
        Q, lam = fr.PB, fr.sB * fr.sB
    else:
        MB, MA = fr.grams()
        lam, Q = torch.linalg.eigh(0.5 * (MA + MB))
    Om = Q.mT @ (C - C.mT) @ Q
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    den = li + lj
    ratio = torch.where(den > 0, (lj - li) / (2.0 * den).clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return 0.5 * C + 0.5 * (Q @ (Om * ratio) @ Q.mT)


def _balanced_parts(B, A, gB, gA, scale, frame, damping, tangent=False):
    """The pieces both forms of the balanced flow share: the factors, gradients and frame in the
    compute precision, the damped inverses ``(x^2 + lam)^-1`` of both factors' singular values
    (one computation for a balanced frame, where they agree) and ``1/s^2`` per pair (shaped to
    broadcast over singular values). The forms fold these scalings into r x r matrices, so each
    gradient goes through a single tall product."""
    _check_shapes(B, A, gB, gA)
    dt = compute_dtype(B, A, gB, gA)
    B, A = B.to(dt), A.to(dt)
    fr = frame if frame is not None else factor_frame(B, A)
    d = _damping(dt, damping, tangent)
    invB = damped_inverse(fr.sB, d)
    invA = invB if fr.balanced else damped_inverse(fr.sA, d)
    inv_s2 = _inverse_square(scale, dt, B.device).unsqueeze(-1)
    return B, A, gB.to(dt), gA.to(dt), fr, invB, invA, inv_s2


def _balanced_tangent(B, A, gB, gA, *, scale=1.0, frame: Frame, damping: float | None = None) -> Tangent:
    """The balanced flow's product velocity ``-P(G)/s`` as a :class:`Tangent` at ``frame``, with
    ``h = g / s^2``, in the frame's bases: ``L = -hB (MA + lam)^-1 A.T UA``,
    ``R.T = -UB.T B (MB + lam)^-1 hA`` and ``C = -diag(phiB) UB.T L`` with the damped projector
    weights ``phiB = sB^2 / (sB^2 + lam)`` (the quantities of :func:`_balanced`)."""
    B, A, gB, gA, fr, invB, invA, inv_s2 = _balanced_parts(B, A, gB, gA, scale, frame, damping, tangent=True)
    wB = fr.sB * invB * -inv_s2  # (..., k), negated
    wA = wB if fr.balanced else fr.sA * invA * -inv_s2  # (..., k')
    L = tall_mm(gB, fr.PA * wA.unsqueeze(-2))  # -gB PA diag(wA)
    R = ((wB.unsqueeze(-1) * fr.PB.mT) @ gA).mT  # (-diag(wB) PB.T gA).T
    C = (fr.sB * fr.sB * invB).unsqueeze(-1) * (fr.UB.mT @ L).neg_()
    return Tangent(L, R, C)


def _balanced(B, A, gB, gA, *, scale=1.0, frame: Frame | None = None, damping: float | None = None, gauge: bool = True):
    """ODELoRA: the projected full fine-tuning flow ``d(sBA)/dt = -P(G)`` with balanced factors.

    The projectors on B's column space and A's row space are taken from the factors themselves,
    damped as above, so one formula covers every start: at full rank it is the exact projected
    flow (``s (dB A + B dA) = -P(G)``, and with ``gauge=True`` balanced factors stay balanced);
    at ``B = 0`` it reduces to ``dX = -G PV`` (LoRA-Pro's first step), at ``A = 0`` to ``-PU G``,
    and directions whose singular values vanish drop out continuously."""
    B, A, gB, gA, fr, invB, invA, inv_s2 = _balanced_parts(B, A, gB, gA, scale, frame, damping)
    # Orthogonal gauge: dA = -(MB + lam)^-1 hA, dB = -(I - PU) hB (MA + lam)^-1, so that
    # dB A + B dA = -(PU G + G PV - PU G PV) / s with the damped projectors PU, PV.
    dA = fr.PB @ ((-invB * inv_s2).unsqueeze(-1) * (fr.PB.mT @ gA))  # -PB diag(inv) PB.T hA
    hBi = tall_mm(gB, fr.PA * (invA * inv_s2).unsqueeze(-2))  # hB (MA + lam)^-1 in PA's coordinates, (m, k')
    core = fr.UB.mT @ hBi  # (k, k')
    phiB = fr.sB * fr.sB * invB  # damped projector weights on B's column space, in [0, 1)
    dB = -tall_mm(hBi - tall_mm(fr.UB, phiB.unsqueeze(-1) * core), fr.PA.mT)
    if gauge:
        C = fr.PB @ ((fr.sB * invB).unsqueeze(-1) * core) @ fr.PA.mT  # (MB+lam)^-1 B.T hB (MA+lam)^-1
        Gam = _gauge(C, fr)
        dB = dB - tall_mm(B, Gam)
        dA = dA + Gam @ A
    return dB, dA


gradient = Flow("gradient", _gradient)
scaled = Flow("scaled", _scaled, uses_frame=True, adaptive_retraction="truncate")
balanced = Flow("balanced", _balanced, uses_frame=True, has_gauge=True, tangent=_balanced_tangent, retraction="truncate")

FLOWS: dict[str, Flow] = {f.name: f for f in (gradient, scaled, balanced)}


def get_flow(flow: str | Flow | Callable) -> Flow:
    """A flow by name (``"gradient"``, ``"scaled"``, ``"balanced"``), a :class:`Flow`, or a plain
    callable with the flow signature (wrapped: no frame, no gauge option, no retraction)."""
    if isinstance(flow, Flow):
        return flow
    if callable(flow):
        return Flow(getattr(flow, "__name__", "custom"), flow)
    try:
        return FLOWS[flow]
    except (KeyError, TypeError):  # an unknown or unhashable name
        raise ValueError(f"unknown flow {flow!r}; choose one of {sorted(FLOWS)}") from None

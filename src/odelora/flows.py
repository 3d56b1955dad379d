"""What moves: velocity fields ``d(B, A)/dt`` of the LoRA factors.

Every flow has the signature ``flow(B, A, gB, gA, *, scale=1.0, **options) -> (dB, dA)``:
``gB``, ``gA`` are the autograd gradients of the loss with respect to the factors of
``W = W0 + scale * B @ A`` and ``(dB, dA)`` is a descent velocity. Inputs may carry leading batch
dimensions (a stack of pairs of equal shape); ``scale`` is a number or a tensor broadcasting over
the batch. Velocities come back in the working precision (float32 for half inputs, float64 for
float64 inputs).

The scaled and balanced flows divide the gradients by ``scale**2``, so that their time has the
meaning of a full fine-tuning learning rate: one Euler step of size h moves ``X = s B A`` by
``-h P(G)`` (balanced) or ``-h (PU G + G PV)`` (scaled). The gradient flow is plain LoRA.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .geometry import full_rank, work_dtype

__all__ = ["Flow", "gradient", "scaled", "balanced", "FLOWS", "get_flow"]


class Flow(Protocol):
    def __call__(
        self, B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, *, scale: float | Tensor = 1.0, **kw
    ) -> tuple[Tensor, Tensor]: ...


def _check_shapes(B, A, gB, gA):
    if B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ValueError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} are not a LoRA pair: expected B (..., m, r) "
            "and A (..., r, n) with the same r and batch dimensions"
        )
    if gB.shape != B.shape or gA.shape != A.shape:
        raise ValueError(
            f"gradient shapes {tuple(gB.shape)}, {tuple(gA.shape)} differ from the factors' "
            f"{tuple(B.shape)}, {tuple(A.shape)}"
        )


def _prepare(B, A, gB, gA, scale):
    _check_shapes(B, A, gB, gA)
    wd = work_dtype(B, A, gB, gA)
    s = torch.as_tensor(scale, dtype=wd, device=B.device)
    if s.ndim:  # one scale per stacked pair
        s = s.reshape(*s.shape, 1, 1)
    inv_s2 = 1.0 / (s * s)
    return B.to(wd), A.to(wd), gB.to(wd) * inv_s2, gA.to(wd) * inv_s2


def gradient(B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, *, scale=1.0) -> tuple[Tensor, Tensor]:
    """Plain LoRA gradient flow: ``dB = -gB``, ``dA = -gA`` (``scale`` is already inside the
    gradients)."""
    _check_shapes(B, A, gB, gA)
    wd = work_dtype(B, A, gB, gA)
    return -gB.to(wd), -gA.to(wd)


def _damped_solve_right(Y: Tensor, M: Tensor, damping: float) -> Tensor:
    """``Y @ (M + d I)^-1`` with ``d = damping * trace(M) / r`` (a positive damping is raised to
    10 eps of the working precision). Where M = 0 (a zero factor) the matching Y is exactly zero
    too, and d = 1 keeps the solve defined."""
    r = M.shape[-1]
    tr = M.diagonal(dim1=-2, dim2=-1).sum(-1)
    rel = max(damping, 10 * torch.finfo(M.dtype).eps) if damping > 0 else 0.0  # stay above rounding
    d = torch.where(tr > 0, rel * tr / r, torch.ones_like(tr))
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M + d[..., None, None] * eye)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(
            "Gram matrix not positive definite even after damping; raise `damping`"
        )
    return torch.cholesky_solve(Y.mT, L).mT


def scaled(
    B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, *, scale=1.0, damping: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Scaled (Riemannian-preconditioned) flow: ``dB = -hB (MA + dI)^-1``,
    ``dA = -(MB + dI)^-1 hA`` with ``h = g / scale**2`` and ``d = damping * trace(M) / r``.

    At a zero factor (PEFT's ``B = 0`` start) the other factor's gradient is exactly zero and so
    is its velocity; no singular matrix is inverted."""
    B, A, hB, hA = _prepare(B, A, gB, gA, scale)
    dB = -_damped_solve_right(hB, A @ A.mT, damping)
    dA = -_damped_solve_right(hA.mT, B.mT @ B, damping).mT
    return dB, dA


def _tri_inv(R: Tensor) -> Tensor:
    """Inverse of upper-triangular R (r x r); applying it by matmul costs one batched GEMM."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye.expand_as(R), upper=True)


def _balanced_full(B, A, hB, hA, QB, RB, QA, RA):
    """The balanced projected flow where both factors have full rank (MATH.md section 2.3),
    written with QR factors instead of Gram inverses so that it stays accurate for
    ill-conditioned factors: ``MB^-1 B.T = RB^-1 QB.T``, ``PU = QB QB.T``, ``MA^-1 = RA^-1 RA^-T``."""
    iB, iA = _tri_inv(RB), _tri_inv(RA)
    tB = QB.mT @ hB  # (r, r): B.T hB = RB.T tB
    tA = hA @ QA  # (r, r): hA A.T = tA RA
    perpB = hB - QB @ tB  # (I - PU) hB
    perpA = hA - tA @ QA.mT  # hA (I - PV)
    C = iB @ (tB @ iA) @ iA.mT  # MB^-1 B.T hB MA^-1
    # Gauge term D keeps B.T B - A A.T constant: Lyapunov equation in the eigenbasis of M.
    M = 0.5 * (RA.mT @ RA + RB.mT @ RB)
    lam, Q = torch.linalg.eigh(M)
    Om = Q.mT @ (C - C.mT) @ Q
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    E = Om * (lj - li) / (2.0 * (li + lj))
    D = 0.5 * (Q @ E @ Q.mT)
    Ch = 0.5 * C
    dB = -((perpB @ iA) @ iA.mT) - B @ (Ch + D)
    dA = -(iB @ (iB.mT @ perpA)) - (Ch - D) @ A
    return dB, dA


def _rank_flags(R: Tensor, rtol: float | None) -> tuple[Tensor, Tensor]:
    """(full rank, zero) per factor from its triangular QR factor (see ``full_rank``)."""
    big = R.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    return full_rank(R, rtol), big == 0


def balanced(
    B: Tensor,
    A: Tensor,
    gB: Tensor,
    gA: Tensor,
    *,
    scale=1.0,
    rtol: float | None = None,
    damping: float = 1e-8,
    qr: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """ODELoRA: the projected full fine-tuning flow ``d(sBA)/dt = -P(G)`` on the balanced set.

    Pairs whose factors both have full rank follow the exact flow (product velocity ``-P(G)``,
    ``B.T B - A A.T`` constant). Rank-deficient pairs follow the documented fallbacks:

    * ``B = 0`` (PEFT's start), ``A`` full rank: ``dB = -hB MA^-1``, ``dA = 0``, the projected
      flow restricted to A's known row space (``dX = -G PV``, LoRA-Pro's first step);
    * ``A = 0``, ``B`` full rank: the mirror image, ``dX = -PU G``;
    * any other deficiency (a factor of rank between 0 and r, or both zero): the damped scaled
      flow (``damping`` relative to ``trace(M)/r``), which moves both factors wherever the
      gradient reaches them and is zero when both factors are zero.

    ``rtol`` sets the rank test on the QR diagonals (see :func:`odelora.geometry.full_rank`);
    ``qr = (QB, RB, QA, RA)`` with ``B = QB RB`` and ``A.T = QA RA`` skips the factorization
    (the optimizer passes the factors its balancing retraction just produced).
    """
    B, A, hB, hA = _prepare(B, A, gB, gA, scale)
    batch = B.shape[:-2]
    Bf, Af = B.reshape(-1, *B.shape[-2:]), A.reshape(-1, *A.shape[-2:])
    hBf, hAf = hB.reshape(Bf.shape), hA.reshape(Af.shape)
    if qr is None:
        QB, RB = torch.linalg.qr(Bf)
        QA, RA = torch.linalg.qr(Af.mT)
    else:
        QB, RB, QA, RA = (t.reshape(-1, *t.shape[-2:]) for t in qr)
    okB, zeroB = _rank_flags(RB, rtol)
    okA, zeroA = _rank_flags(RA, rtol)
    both = okB & okA
    if bool(both.all()):
        dB, dA = _balanced_full(Bf, Af, hBf, hAf, QB, RB, QA, RA)
    else:
        dB, dA = torch.empty_like(Bf), torch.empty_like(Af)
        right = lambda Y, R: (Y @ _tri_inv(R)) @ _tri_inv(R).mT  # Y (R.T R)^-1
        cases: list[tuple[Tensor, Callable]] = [
            (both, lambda i: _balanced_full(Bf[i], Af[i], hBf[i], hAf[i], QB[i], RB[i], QA[i], RA[i])),
            (zeroB & okA, lambda i: (-right(hBf[i], RA[i]), torch.zeros_like(Af[i]))),
            (okB & zeroA, lambda i: (torch.zeros_like(Bf[i]), -right(hAf[i].mT, RB[i]).mT)),
            (~both & ~(zeroB & okA) & ~(okB & zeroA), lambda i: scaled(Bf[i], Af[i], hBf[i], hAf[i], damping=damping)),
        ]
        for mask, rule in cases:
            if bool(mask.any()):
                dB[mask], dA[mask] = rule(mask)
    return dB.reshape(*batch, *dB.shape[-2:]), dA.reshape(*batch, *dA.shape[-2:])


FLOWS: dict[str, Flow] = {"gradient": gradient, "scaled": scaled, "balanced": balanced}


def get_flow(flow: str | Flow) -> Flow:
    """A flow by name (``"gradient"``, ``"scaled"``, ``"balanced"``) or a callable as is."""
    if callable(flow):
        return flow
    try:
        return FLOWS[flow]
    except KeyError:
        raise ValueError(f"unknown flow {flow!r}; choose one of {sorted(FLOWS)}") from None

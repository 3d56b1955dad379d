"""Geometry of LoRA factor pairs: compute precision, factor frames, damped projections, balancing,
rank-r truncation of low-rank sums, imbalance.

Shapes follow PEFT: ``B`` is (..., m, r), ``A`` is (..., r, n), the adaptation is ``s * B @ A``.
Every function accepts leading batch dimensions (a stack of pairs of equal shape).

Near rank deficiency nothing here divides by a small singular value without damping: a factor's
singular value ``x`` enters through ``x / (x^2 + lam)`` and ``x^2 / (x^2 + lam)`` with
``lam = damping * max(x)^2`` (see :func:`damped_inverse`), which is ``1/x`` and ``1`` where
``x^2 >> lam`` and goes to 0 smoothly as ``x`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "default_damping",
    "Frame",
    "factor_frame",
    "damped_inverse",
    "truncate",
    "balanced_factors",
    "balance",
    "imbalance",
    "tangent_project",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Precision of Gram-free solves and retractions: float64 if any input is float64, else
    float32 (half-precision factors are processed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def default_damping(dtype: torch.dtype) -> float:
    """Relative damping used when none is given: the unit roundoff of ``dtype``. Directions of a
    factor with ``x^2 < eps * max(x)^2`` carry only rounding noise and are faded out."""
    return float(torch.finfo(dtype).eps)


class Frame(NamedTuple):
    """Thin SVDs of both factors: ``B = UB diag(sB) PB.T`` and ``A.T = UA diag(sA) PA.T``.

    ``UB`` (..., m, k) and ``UA`` (..., n, k') have orthonormal columns, ``PB`` (..., r, k) and
    ``PA`` (..., r, k') orthonormal columns, ``k = min(m, r)``, ``k' = min(n, r)``.
    ``balanced`` marks frames with ``sA == sB`` and ``PA == PB`` (``B.T B = A A.T``), which the
    truncation retraction produces; flows then skip an eigendecomposition.
    """

    UB: Tensor
    sB: Tensor
    PB: Tensor
    UA: Tensor
    sA: Tensor
    PA: Tensor
    balanced: bool = False


def _thin_svd(F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``F = U diag(s) P.T`` for a tall or wide (..., p, r) matrix: QR first when p > r (cheaper
    than an SVD of the tall matrix), then an SVD of the small triangular factor."""
    if F.shape[-2] > F.shape[-1]:
        Q, R = torch.linalg.qr(F)
        W, s, Vh = torch.linalg.svd(R)
        return Q @ W, s, Vh.mT
    U, s, Vh = torch.linalg.svd(F, full_matrices=False)
    return U, s, Vh.mT


def factor_frame(B: Tensor, A: Tensor) -> Frame:
    """The :class:`Frame` of a pair (in the precision of the inputs)."""
    UB, sB, PB = _thin_svd(B)
    UA, sA, PA = _thin_svd(A.mT)
    return Frame(UB, sB, PB, UA, sA, PA)


def damped_inverse(x: Tensor, damping: float) -> Tensor:
    """``1 / (x^2 + lam)`` per singular value, ``lam = damping * max(x)^2`` over the last axis; 0
    where the whole factor is zero (its gradients are then exactly zero too)."""
    top = x.amax(-1, keepdim=True)
    lam = damping * top * top
    out = 1.0 / (x * x + lam)
    return torch.where(top > 0, out, torch.zeros_like(out))


def _polar(N: Tensor) -> Tensor:
    """The orthogonal (semi-orthogonal) factor ``W Z.T`` of ``N = W diag(c) Z.T``."""
    W, _, Zh = torch.linalg.svd(N, full_matrices=False)
    return W @ Zh


def truncate(UL: Tensor, UR: Tensor, M: Tensor, L: Tensor, R: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``Y = [UL, L] @ M @ [UR, R].T`` (the metric projection
    on the rank-``rank`` matrices), without forming Y.

    ``UL`` (..., m, a) and ``UR`` (..., n, b) have orthonormal columns; ``L`` (..., m, p) and
    ``R`` (..., n, q) are arbitrary; ``M`` is (..., a + p, b + q). Returns ``(U, S, V)`` with
    ``Y_rank = U diag(S) V.T`` and orthonormal U, V.

    Householder QR of ``[UL, L]`` (not of L alone) keeps the new basis orthonormal and orthogonal
    to UL even when L is rank-deficient (a rank-1 gradient), and gives ``min(m, a + p)`` columns
    when m is small. Cost O((m + n)(a + p)^2 + (a + p)^3).
    """
    Ql, Tl = torch.linalg.qr(torch.cat([UL, L], -1))
    Qr, Tr = torch.linalg.qr(torch.cat([UR, R], -1))
    W, S, Zh = torch.linalg.svd(Tl @ M @ Tr.mT)
    return Ql @ W[..., :rank], S[..., :rank], Qr @ Zh[..., :rank, :].mT


def balanced_factors(U: Tensor, S: Tensor, V: Tensor, r: int, near: tuple[Tensor, Tensor] | None = None):
    """Balanced factors of ``U diag(S) V.T`` with r columns: ``B = U diag(S^1/2) Q``,
    ``A = Q.T diag(S^1/2) V.T`` with ``Q`` (k, r) of orthonormal rows, and their :class:`Frame`.

    Balanced factorizations differ by such Q; with ``near = (B0, A0)`` the one closest to
    ``(B0, A0)`` in Frobenius norm is returned (a Procrustes problem), so that the factors move
    continuously from step to step: no column sign flips or permutations, which would scramble any
    per-coordinate state such as Adam moments. Without it, ``Q = [I, 0]``.
    """
    root = S.clamp_min(0).sqrt()
    k = S.shape[-1]
    if near is None:
        Q = torch.eye(k, r, dtype=U.dtype, device=U.device).expand(*S.shape[:-1], k, r)
    else:
        B0, A0 = near
        Q = _polar(root.unsqueeze(-1) * (U.mT @ B0 + V.mT @ A0.mT))
    B = (U * root.unsqueeze(-2)) @ Q
    A = Q.mT @ (root.unsqueeze(-1) * V.mT)
    return B, A, Frame(U, root, Q.mT, V, root, Q.mT, balanced=True)


def balance(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Refactor ``B @ A`` so that ``B.T @ B == A @ A.T`` (both carry the singular values of BA),
    choosing among such factorizations the one closest to ``(B, A)``. The product is unchanged up
    to rounding; computed in the compute precision, returned in the input dtype. A rank-deficient
    product gives factors with matching zero directions (``B = 0`` balances to ``(0, 0)``)."""
    dtype, wd = B.dtype, compute_dtype(B, A)
    B0, A0 = B.to(wd), A.to(wd)
    fr = factor_frame(B0, A0)
    core = (fr.sB.unsqueeze(-1) * (fr.PB.mT @ fr.PA)) * fr.sA.unsqueeze(-2)
    W, S, Zh = torch.linalg.svd(core, full_matrices=False)
    Bn, An, _ = balanced_factors(fr.UB @ W, S, fr.UA @ Zh.mT, B.shape[-1], near=(B0, A0))
    return Bn.to(dtype), An.to(dtype)


def imbalance(B: Tensor, A: Tensor) -> Tensor:
    """``||B.T B - A A.T||_F / (||B.T B||_F + ||A A.T||_F)`` per pair, in [0, 1]: 0 for balanced
    factors, 1 when one factor is zero and the other is not (PEFT's start), 0 when both are."""
    wd = compute_dtype(B, A)
    B, A = B.to(wd), A.to(wd)
    MB, MA = B.mT @ B, A @ A.mT
    den = torch.linalg.matrix_norm(MB) + torch.linalg.matrix_norm(MA)
    num = torch.linalg.matrix_norm(MB - MA)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(wd).tiny), torch.zeros_like(num))


def tangent_project(G: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Orthogonal projection of ``G`` (..., m, n) on the tangent space of the rank-r matrices at
    ``X = B @ A``: ``PU G + G PV - PU G PV`` with PU, PV the projectors on the column space of B and
    the row space of A (full-rank factors). A dense reference for tests and diagnostics."""
    wd = compute_dtype(G, B, A)
    QB = torch.linalg.qr(B.to(wd))[0]
    QA = torch.linalg.qr(A.to(wd).mT)[0]
    G = G.to(wd)
    UG = QB @ (QB.mT @ G)
    return UG + (G - UG) @ QA @ QA.mT

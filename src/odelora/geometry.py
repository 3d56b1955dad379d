"""Geometry of LoRA factor pairs: working precision, QR bases, balancing, tangent projection.

Shapes follow PEFT: ``B`` is (..., m, r), ``A`` is (..., r, n), the adaptation is ``s * B @ A``.
Every function accepts leading batch dimensions (a stack of pairs of equal shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "work_dtype",
    "balance",
    "balance_with_qr",
    "imbalance",
    "tangent_project",
    "full_rank",
]


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """Precision for Gram matrices and solves: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def full_rank(R: Tensor, rtol: float | None = None) -> Tensor:
    """Whether the triangular QR factors ``R`` (..., r, r) are numerically nonsingular.

    A factor counts as rank-deficient when its smallest |R_ii| is at most ``rtol`` times its
    largest (default ``1e3 * eps`` of R's dtype), or when it is zero.
    """
    if rtol is None:
        rtol = 1e3 * torch.finfo(R.dtype).eps
    if R.shape[-2] < R.shape[-1]:  # a factor with fewer rows than r (e.g. A of a 1-input layer)
        return torch.zeros(R.shape[:-2], dtype=torch.bool, device=R.device)
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    big = d.amax(-1)
    return (d.amin(-1) > rtol * big) & (big > 0)


def _qr_pair(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``B = QB @ RB`` and ``A.T = QA @ RA`` (reduced QR), so ``A = RA.T @ QA.T``."""
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.mT)
    return QB, RB, QA, RA


def balance(B: Tensor, A: Tensor, *, skip_deficient: bool = False) -> tuple[Tensor, Tensor]:
    """Refactor ``B @ A`` so that ``B.T @ B == A @ A.T`` (both equal the singular values of BA).

    QR of both factors, an r-by-r SVD of ``RB @ RA.T``, then ``B = QB U S^1/2`` and
    ``A = S^1/2 V.T QA.T``. The product is unchanged up to rounding. Computed in the working
    precision and returned in the input dtype.

    For a rank-deficient product (PEFT's ``B = 0`` start) the balanced factors have zero columns
    where the product has zero singular values, which would erase the other factor's information;
    with ``skip_deficient=True`` such pairs are returned unchanged instead.
    """
    Bn, An, _, _ = balance_with_qr(B, A, skip_deficient=skip_deficient)
    return Bn, An


def balance_with_qr(B: Tensor, A: Tensor, *, skip_deficient: bool = False):
    """:func:`balance`, plus what the retraction learns on the way: the QR factors of the result
    (``(QB U, diag(S^1/2), QA V, diag(S^1/2))`` for balanced pairs, the input's own for skipped
    ones, in the working precision; None if r > min(m, n)), which a flow evaluated right after
    can reuse, and the imbalance of the input per pair (from its R factors, r x r work only)."""
    r = A.shape[-2]
    if r > min(B.shape[-2], A.shape[-1]):
        if skip_deficient:  # the product can never have rank r
            return B, A, None, imbalance(B, A)
        raise ValueError(f"cannot balance rank {r} factors of a {B.shape[-2]}x{A.shape[-1]} product: r > min(m, n)")
    dtype = B.dtype
    wd = work_dtype(B, A)
    QB, RB, QA, RA = _qr_pair(B.to(wd), A.to(wd))
    MB, MA = RB.mT @ RB, RA.mT @ RA  # B.T B and A A.T
    den = torch.linalg.matrix_norm(MB).clamp_min(torch.finfo(wd).tiny)
    drift = torch.linalg.matrix_norm(MB - MA) / den
    U, S, Vh = torch.linalg.svd(RB @ RA.mT)
    root = S.sqrt()
    QBn, QAn = QB @ U, QA @ Vh.mT
    Bn = (QBn * root.unsqueeze(-2)).to(dtype)
    An = (root.unsqueeze(-1) * QAn.mT).to(dtype)
    R = torch.diag_embed(root)
    qr = (QBn, R, QAn, R)
    if skip_deficient:
        tol = 10 * r * torch.finfo(wd).eps
        ok = (S[..., -1] > tol * S[..., 0]) & (S[..., 0] > 0)
        if not bool(ok.all()):  # unchanged pairs keep the QR of their input
            keep = ok[..., None, None]
            Bn, An = torch.where(keep, Bn, B), torch.where(keep, An, A)
            qr = tuple(torch.where(keep, new, old) for new, old in zip(qr, (QB, RB, QA, RA)))
    return Bn, An, qr, drift


def imbalance(B: Tensor, A: Tensor) -> Tensor:
    """``||B.T B - A A.T||_F / ||B.T B||_F`` per pair (0 when both factors are zero)."""
    wd = work_dtype(B, A)
    B, A = B.to(wd), A.to(wd)
    MB = B.mT @ B
    MA = A @ A.mT
    num = torch.linalg.matrix_norm(MB - MA)
    den = torch.maximum(torch.linalg.matrix_norm(MB), torch.linalg.matrix_norm(MA))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(wd).tiny), torch.zeros_like(num))


def tangent_project(G: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Orthogonal projection of ``G`` (..., m, n) on the tangent space of the rank-r manifold at
    ``X = B @ A``: ``PU G + G PV - PU G PV``, with orthonormal bases from QR (B, A full rank)."""
    wd = work_dtype(G, B, A)
    QB, _, QA, _ = _qr_pair(B.to(wd), A.to(wd))
    G = G.to(wd)
    UG = QB @ (QB.mT @ G)
    return UG + (G - UG) @ QA @ QA.mT

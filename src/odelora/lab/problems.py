"""Matrix problems of the lab, with their losses written for autograd."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Quadratic", "low_rank_target", "matrix_sensing", "strongly_convex", "spectral_start", "small_random_start",
           "quadratic_fns", "sensing_family"]


@dataclass
class Quadratic:
    """``f(X) = 1/2 vec(X - X*)^T Q vec(X - X*)`` with SPD (or PSD) ``Q``; gradient ``Q vec(X - X*)``.

    Matrix sensing is the case ``Q = Aop^T Aop`` (``y = Aop vec(X*)``)."""

    Q: Tensor  # (m n, m n)
    Xstar: Tensor  # (m, n)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.Xstar.shape)

    def loss(self, X: Tensor) -> Tensor:
        d = (X - self.Xstar).reshape(-1)
        return 0.5 * d @ (self.Q @ d)

    def grad(self, X: Tensor) -> Tensor:
        return (self.Q @ (X - self.Xstar).reshape(-1)).reshape(X.shape)

    def rel_error(self, X: Tensor) -> float:
        return float(torch.linalg.norm(X - self.Xstar) / torch.linalg.norm(self.Xstar))

    def smoothness(self) -> float:
        return float(torch.linalg.eigvalsh(self.Q)[-1])


def low_rank_target(m: int, n: int, r: int, kappa: float, gen: torch.Generator) -> Tensor:
    """``U diag(sigma) V^T`` with singular values log-spaced from 1 down to 1/kappa."""
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    sig = torch.from_numpy(np.logspace(0, -np.log10(kappa), r)) if r > 1 else torch.ones(1, dtype=torch.float64)
    return (U * sig) @ V.T


def matrix_sensing(m: int, n: int, r: int, kappa: float, oversample: float, seed: int) -> tuple[Quadratic, Tensor]:
    """N = oversample (m + n) r Gaussian measurements with iid N(0, 1/N) entries.
    Returns the quadratic and the measurement operator (N, m n)."""
    gen = torch.Generator().manual_seed(seed)
    Xs = low_rank_target(m, n, r, kappa, gen)
    N = int(round(oversample * (m + n) * r))
    Aop = torch.randn(N, m * n, generator=gen, dtype=torch.float64) / np.sqrt(N)
    return Quadratic(Aop.T @ Aop, Xs), Aop


def sensing_family(m: int, n: int, r: int, kappas: list[float], oversample: float, seed: int) -> tuple[Tensor, Tensor]:
    """One measurement operator and one pair of singular bases per seed, one target per kappa:
    ``Q = Aop^T Aop`` (shared) and the stacked targets ``U diag(sigma_kappa) V^T`` (len(kappas), m, n)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    N = int(round(oversample * (m + n) * r))
    Aop = torch.randn(N, m * n, generator=gen, dtype=torch.float64) / np.sqrt(N)
    sig = [torch.from_numpy(np.logspace(0, -np.log10(k), r)) if r > 1 else torch.ones(1, dtype=torch.float64) for k in kappas]
    return Aop.T @ Aop, torch.stack([(U * s) @ V.T for s in sig])


def strongly_convex(m: int, n: int, r: int, cond: float, seed: int) -> Quadratic:
    """SPD operator with eigenvalues log-spaced in [1, cond] in a random basis; rank-r minimizer."""
    gen = torch.Generator().manual_seed(seed)
    d = m * n
    Qb = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    ev = torch.from_numpy(np.logspace(0, np.log10(cond), d))
    return Quadratic((Qb * ev) @ Qb.T, low_rank_target(m, n, r, 10.0, gen))


def spectral_start(q: Quadratic, r: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced factors of the top-r SVD of ``-grad f(0)`` (``= Aop^T y`` in matrix sensing)."""
    M = -q.grad(torch.zeros_like(q.Xstar))
    U, S, Vh = torch.linalg.svd(M)
    root = (scale * S[:r]).sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def small_random_start(m: int, n: int, r: int, std: float, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return (torch.randn(m, r, generator=gen, dtype=torch.float64) * std,
            torch.randn(r, n, generator=gen, dtype=torch.float64) * std)


def quadratic_fns(Q: Tensor, Xstars: Tensor):
    """Batched loss/gradient and relative error for ``f_k(X) = 1/2 vec(X - X*_k)^T Q vec(X - X*_k)``
    (one symmetric ``Q`` shared by the batch, one minimizer per run): the ``grad_fn`` and
    ``metric_fn`` of :func:`odelora.lab.methods.train`. One matrix product with ``Q`` per
    evaluation serves every run of the batch."""
    norms = Xstars.flatten(1).norm(dim=1)

    def grad_fn(Bs: Tensor, As: Tensor, idx: Tensor):
        X = Bs @ As
        D = (X - Xstars[idx]).flatten(1)
        QD = D @ Q
        G = QD.reshape(X.shape)
        return 0.5 * (D * QD).sum(1), G @ As.mT, Bs.mT @ G

    def metric_fn(Bs: Tensor, As: Tensor, idx: Tensor):
        return (Bs @ As - Xstars[idx]).flatten(1).norm(dim=1) / norms[idx]

    return grad_fn, metric_fn

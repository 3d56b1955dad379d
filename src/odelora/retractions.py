"""How LoRA factors move along stage velocities: the spaces the optimizer's RK steps run in.

A state is a list of :class:`Factors`, one per bucket of stacked pairs of equal shape. Three
retractions, chosen by name (``RETRACTIONS``):

* ``"none"``: plain Runge-Kutta on the factors, ``(B, A) + h sum_j a_j (dB_j, dA_j)``. This is
  LoRA gradient descent for the gradient flow. The product then moves by
  ``h (dB A + B dA) + h^2 dB dA``; the second term grows like ``h^2 |G|^2 / sigma_min`` near rank
  deficiency, which makes factor-space steps of the balanced flow unstable there.
* ``"balance"``: the same factor-space combination, then the balancing retraction (same product,
  ``B.T B = A A.T``). It removes the imbalance drift but not that instability.
* ``"truncate"`` (ODELoRA's default): every stage and the step itself move the *product*,
  ``X = X0 + h sum_j a_j s (dB_j A_j + B_j dA_j)`` (rank <= (2s + 1) r, never formed), and are
  retracted to the rank-r matrices by truncation (the metric projection), then refactored into
  balanced factors. This is a projected Runge-Kutta method: its order is the tableau's where the
  factors are well conditioned, and since truncation is the nearest rank-r matrix, a step moves
  the product by at most ``2 h |sum_j b_j s (dB_j A_j + B_j dA_j)|`` however small the singular
  values are (Kieri & Vandereycken 2019 analyse such projected methods for dynamical low-rank
  approximation). Cost per stage O((m + n) r^2 + r^3) with two thin QRs and a 2r x 2r SVD.

Retracted factors are the balanced factorization closest to the previous factors (see
:func:`odelora.geometry.balanced_factors`), so factors evolve continuously and per-coordinate
optimizer state stays meaningful. Each retraction also returns the factors' thin SVDs (a
:class:`~odelora.geometry.Frame`), which the next flow evaluation reuses instead of recomputing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .geometry import Frame, balanced_factors, factor_frame, truncate
from .integrators import Stage, axpy

__all__ = ["Factors", "Retraction", "FactorSteps", "BalanceSteps", "TruncateSteps", "RETRACTIONS", "get_retraction"]


@dataclass
class Factors:
    """One bucket of stacked pairs in the compute precision: ``B`` (k, m, r), ``A`` (k, r, n),
    the LoRA scales (k,), and the factors' frame once known."""

    B: Tensor
    A: Tensor
    scale: Tensor
    frame: Frame | None = None

    def ensure_frame(self) -> Frame:
        if self.frame is None:
            self.frame = factor_frame(self.B, self.A)
        return self.frame

    @property
    def rank(self) -> int:
        return self.B.shape[-1]


def _factor_ratios(y0, y1, h, coeffs, stages, atol, rtol) -> Tensor:
    """Per pair: root mean square over the pair's factor entries of the error against
    ``atol + rtol * max(|y0|, |y1|)``."""
    out = []
    for b, (x0, x1) in enumerate(zip(y0, y1)):
        ks = [[st.k[b][0], st.k[b][1]] for st in stages]
        eB, eA = axpy([torch.zeros_like(x0.B), torch.zeros_like(x0.A)], [h[b], h[b]], coeffs, ks)
        tB = atol + rtol * torch.maximum(x0.B.abs(), x1.B.abs())
        tA = atol + rtol * torch.maximum(x0.A.abs(), x1.A.abs())
        sq = (eB / tB).square().sum((-2, -1)) + (eA / tA).square().sum((-2, -1))
        out.append((sq / (x0.B[0].numel() + x0.A[0].numel())).sqrt())
    return torch.cat(out)


class Retraction:
    """Base of the spaces in ``RETRACTIONS``. ``needs_gauge`` is False where only the product of a
    velocity matters (flows may then skip their gauge term)."""

    name = "base"
    needs_gauge = True

    def combine(self, y0: list[Factors], h: Sequence[float], coeffs: Sequence[float], stages: Sequence[Stage]) -> list[Factors]:
        raise NotImplementedError

    def retract(self, y: list[Factors]) -> list[Factors]:
        """Bring factors moved by something else (a preconditioned step) back to the space."""
        return y

    def error_ratios(self, y0, y1, h, coeffs, stages, atol, rtol) -> Tensor:
        return _factor_ratios(y0, y1, h, coeffs, stages, atol, rtol)


class FactorSteps(Retraction):
    """``"none"``: Runge-Kutta on the factor entries."""

    name = "none"

    def combine(self, y0, h, coeffs, stages):
        out = []
        for b, x0 in enumerate(y0):
            B, A = axpy([x0.B, x0.A], [h[b], h[b]], coeffs, [st.k[b] for st in stages])
            out.append(Factors(B, A, x0.scale))
        return out


def _balance(B: Tensor, A: Tensor, near: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Frame]:
    """Balanced factors of ``B @ A`` closest to ``near``, with their frame."""
    fr = factor_frame(B, A)
    core = (fr.sB.unsqueeze(-1) * (fr.PB.mT @ fr.PA)) * fr.sA.unsqueeze(-2)
    W, S, Zh = torch.linalg.svd(core, full_matrices=False)
    return balanced_factors(fr.UB @ W, S, fr.UA @ Zh.mT, B.shape[-1], near=near)


def _balanced_state(x: Factors) -> Factors:
    B, A, fr = _balance(x.B, x.A, near=(x.B, x.A))
    return Factors(B, A, x.scale, fr)


class BalanceSteps(FactorSteps):
    """``"balance"``: Runge-Kutta on the factor entries, then the balancing retraction."""

    name = "balance"

    def combine(self, y0, h, coeffs, stages):
        return self.retract(super().combine(y0, h, coeffs, stages))

    def retract(self, y):
        return [_balanced_state(x) for x in y]


def _product_norm(x: Factors) -> Tensor:
    """``|B A|_F`` per pair from the frame (r x r work)."""
    fr = x.ensure_frame()
    if fr.balanced:
        return torch.linalg.vector_norm(fr.sB * fr.sB, dim=-1)
    core = (fr.sB.unsqueeze(-1) * (fr.PB.mT @ fr.PA)) * fr.sA.unsqueeze(-2)
    return torch.linalg.matrix_norm(core)


class TruncateSteps(Retraction):
    """``"truncate"``: projected Runge-Kutta on the rank-r matrices (see the module docstring)."""

    name = "truncate"
    needs_gauge = False

    def combine(self, y0, h, coeffs, stages):
        return [self._combine_bucket(b, x0, h[b], coeffs, stages) for b, x0 in enumerate(y0)]

    def _combine_bucket(self, b: int, x0: Factors, h: float, coeffs, stages) -> Factors:
        fr = x0.ensure_frame()
        # X0 / s = UB core0 UA.T
        core0 = (fr.sB.unsqueeze(-1) * (fr.PB.mT @ fr.PA)) * fr.sA.unsqueeze(-2)
        dB0 = dA0 = None  # summed velocities of the stages evaluated at X0 itself
        Ls, Rs = [], []  # other stages: h c (dB A + B dA) = [h c dB, h c B] [A.T, dA.T].T
        for cj, st in zip(coeffs, stages):
            if cj == 0.0:
                continue
            dB, dA = st.k[b]
            if st.y[b] is x0:
                dB0 = dB * (h * cj) if dB0 is None else dB0.add_(dB, alpha=h * cj)
                dA0 = dA * (h * cj) if dA0 is None else dA0.add_(dA, alpha=h * cj)
            else:
                Ls += [dB * (h * cj), st.y[b].B * (h * cj)]
                Rs += [st.y[b].A.mT, dA.mT]
        # The moves at X0 in its own bases: UB (sB PB.T dA0) + (dB0 PA sA) UA.T
        kB, kA = fr.UB.shape[-1], fr.UA.shape[-1]
        blocks_L, blocks_R = [], []
        if dB0 is not None:
            blocks_L.append((dB0 @ fr.PA) * fr.sA.unsqueeze(-2))  # pairs with UA: M[kB + 0, 0] = I
            blocks_R.append(((fr.sB.unsqueeze(-1) * (fr.PB.mT @ dA0))).mT)  # pairs with UB
        L = torch.cat(blocks_L[:1] + Ls, -1) if (blocks_L or Ls) else None
        R = torch.cat(blocks_R[:1] + Rs, -1) if (blocks_R or Rs) else None
        if L is None:  # nothing moved
            return x0
        # Coupling of [UB, L] and [UA, R]: X/s = [UB, L] M [UA, R].T
        pL, pR = L.shape[-1], R.shape[-1]
        M = core0.new_zeros(*core0.shape[:-2], kB + pL, kA + pR)
        M[..., :kB, :kA] = core0
        off_l, off_r = kB, kA
        if dB0 is not None:
            eyeA = torch.eye(kA, dtype=M.dtype, device=M.device)
            eyeB = torch.eye(kB, dtype=M.dtype, device=M.device)
            M[..., kB : kB + kA, :kA] = eyeA  # (dB0 PA sA) UA.T
            M[..., :kB, kA : kA + kB] = eyeB  # UB (sB PB.T dA0)
            off_l, off_r = kB + kA, kA + kB
        n_extra = pL - (off_l - kB)
        if n_extra:
            M[..., off_l:, off_r:] = torch.eye(n_extra, dtype=M.dtype, device=M.device)
        k_out = min(x0.rank, x0.B.shape[-2], x0.A.shape[-1])
        U, S, V = truncate(fr.UB, fr.UA, M, L, R, k_out)
        B, A, frame = balanced_factors(U, S, V, x0.rank, near=(x0.B, x0.A))
        return Factors(B, A, x0.scale, frame)

    def retract(self, y):
        return [_balanced_state(x) for x in y]

    def error_ratios(self, y0, y1, h, coeffs, stages, atol, rtol):
        """Per pair: ``|E|_F / (atol sqrt(mn) + rtol max(|X0|_F, |X1|_F))`` with ``E`` the error
        estimate of the product, ``s h sum_j c_j (dB_j A_j + B_j dA_j)``, from Gram matrices of
        its factors (never formed)."""
        out = []
        for b, (x0, x1) in enumerate(zip(y0, y1)):
            Ls, Rs = [], []
            for cj, st in zip(coeffs, stages):
                if cj != 0.0:
                    dB, dA = st.k[b]
                    Ls += [dB * (h[b] * cj), st.y[b].B * (h[b] * cj)]
                    Rs += [st.y[b].A.mT, dA.mT]
            L, R = torch.cat(Ls, -1), torch.cat(Rs, -1)
            e2 = ((L.mT @ L) * (R.mT @ R)).sum((-2, -1)).clamp_min(0)
            n0, n1 = _product_norm(x0), _product_norm(x1)
            m, n = x0.B.shape[-2], x0.A.shape[-1]
            s = x0.scale
            out.append(s * e2.sqrt() / (atol * math.sqrt(m * n) + rtol * s * torch.maximum(n0, n1)))
        return torch.cat(out)


RETRACTIONS: dict[str, type[Retraction]] = {c.name: c for c in (FactorSteps, BalanceSteps, TruncateSteps)}


def get_retraction(name: str) -> Retraction:
    try:
        return RETRACTIONS[name]()
    except KeyError:
        raise ValueError(f"unknown retraction {name!r}; choose one of {sorted(RETRACTIONS)}") from None

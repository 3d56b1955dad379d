"""How LoRA factors move along stage velocities: the spaces the optimizer's RK steps run in.

A state is a list of :class:`Factors`, one per bucket of stacked pairs of equal shape. Four
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
  approximation). Cost O((m + n) k^2 + k^3) with two thin QRs of k columns and a k x k SVD,
  ``k = 2r`` for Euler and a stage taken at the start, ``2r`` more for each stage taken elsewhere.

* ``"split"``: the same projected Runge-Kutta method with the one-sided projector-splitting
  retraction ``P_U1 Y``, ``U1 = orth(Y V0)`` (Lubich & Oseledets 2014), ``V0`` the start's row
  basis: the same bound and orders, about half the decomposition cost at r = 8 and less at
  larger r (QRs of ``m x r`` blocks, an ``r x r`` SVD).

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

from .geometry import Frame, Tangent, balance_frame, balanced_factors, cat_columns, factor_frame, qr, reaches_rounding, rounding_rows, split_project, tangent_of, truncate
from .integrators import Stage, axpy, scaled_error

__all__ = ["Factors", "keep_where", "Retraction", "FactorSteps", "BalanceSteps", "TruncateSteps", "SplitSteps", "RETRACTIONS", "get_retraction"]


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

    def contiguous(self) -> "Factors":
        """The same factors laid out as they are read from the parameters (row-major stacks). A
        product's rounding depends on its operands' layout, and a resumed run reads its factors
        from the parameters: committing this layout makes it compute what the saved run would."""
        return Factors(self.B.contiguous(), self.A.contiguous(), self.scale, self.frame)


def _factor_ratios(y0, y1, h, coeffs, stages, atol, rtol) -> Tensor:
    """Per pair: root mean square over the pair's factor entries of the error against
    ``atol + rtol * max(|y0|, |y1|)``."""
    out = []
    for b, (x0, x1) in enumerate(zip(y0, y1)):
        ks = [[st.k[b][0], st.k[b][1]] for st in stages]
        eB, eA = axpy([torch.zeros_like(x0.B), torch.zeros_like(x0.A)], [h[b], h[b]], coeffs, ks)
        tB = atol + rtol * torch.maximum(x0.B.abs(), x1.B.abs())
        tA = atol + rtol * torch.maximum(x0.A.abs(), x1.A.abs())
        sq = scaled_error(eB, tB).square().sum((-2, -1)) + scaled_error(eA, tA).square().sum((-2, -1))
        out.append((sq / (x0.B[0].numel() + x0.A[0].numel())).sqrt())
    return torch.cat(out)


class Retraction:
    """Base of the spaces in ``RETRACTIONS``. ``velocity`` is the form stage velocities may take:
    ``"factors"`` (``(dB, dA)``) or ``"tangent"`` (also :class:`~odelora.geometry.Tangent`, where
    only the product of a velocity matters)."""

    name = "base"
    velocity = "factors"

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


def _zero_product(fr: Frame) -> Tensor:
    """Per pair: whether the frame's product ``B A`` is zero (one factor is)."""
    if fr.balanced:
        return fr.sB.amax(-1) == 0
    return (fr.sB.amax(-1) == 0) | (fr.sA.amax(-1) == 0)


def keep_where(keep: Tensor, x: Factors, y: Factors) -> Factors:
    """``y``, with the pairs flagged by ``keep`` taken from ``x`` (pairs that sit out a step, too). Used where a product stays zero:
    its only balanced factors are ``(0, 0)``, a state no flow leaves, while PEFT's ``(0, A)``
    carries A's directions, along which the first real gradient moves the product. A step of
    h = 0 (an LR warm-up) or a zero gradient at ``B = 0`` must leave them in place."""
    if not bool(keep.any()):
        return y
    if bool(keep.all()):
        return x
    k = keep.view(-1, 1, 1)
    return Factors(torch.where(k, x.B, y.B), torch.where(k, x.A, y.A), y.scale)


def _balanced_state(x: Factors) -> Factors:
    """The balanced factors of ``x``'s product closest to ``x``'s factors (``x`` itself where the
    product is zero)."""
    B, A, fr = balance_frame(x.B, x.A, x.ensure_frame())
    return keep_where(_zero_product(x.frame), x, Factors(B, A, x.scale, fr))


class BalanceSteps(FactorSteps):
    """``"balance"``: Runge-Kutta on the factor entries, then the balancing retraction of the
    step's result. The states inside a step are not rebalanced: the stage velocities are
    combined from the start's factors, and a velocity taken at other factors of the same product
    would be a velocity of another factorization (the step would lose its order, even its first)."""

    name = "balance"
    stage = FactorSteps.combine

    def combine(self, y0, h, coeffs, stages):
        return self.retract(super().combine(y0, h, coeffs, stages))

    @staticmethod
    def retract(y):
        return [_balanced_state(x) for x in y]


def _product_values(fr: Frame) -> Tensor:
    """Singular values of the frame's product ``B A`` (r x r work)."""
    return fr.sB * fr.sA if fr.balanced else torch.linalg.svdvals(fr.core())


def _product_norm(x: Factors) -> Tensor:
    """``|B A|_F`` per pair from the frame (r x r work)."""
    fr = x.ensure_frame()
    if fr.balanced:
        return torch.linalg.vector_norm(fr.sB * fr.sB, dim=-1)
    core = fr.core()
    return torch.linalg.matrix_norm(core)


def _carried(fr: Frame, UtUB: Tensor, VtUA: Tensor) -> Tensor:
    """Per new singular pair ``(u_j, v_j)``: how much it continues a direction the start's product
    ``X0`` carried above rounding, ``|P u_j|^2 |Q v_j|^2`` with P, Q the projectors on X0's
    singular vectors of value above ``eps`` times the largest (for :func:`drop_rounding`).
    ``UtUB = U.T UB``, ``VtUA = V.T UA``: the new bases against the start's frame."""
    if fr.balanced:  # X0 / s = UB diag(sB^2) UA.T
        S0, WL, WR = fr.sB * fr.sB, UtUB, VtUA
    else:  # X0 / s = UB core UA.T: its singular vectors in the frame's bases
        core = fr.core()
        W0, S0, Z0h = torch.linalg.svd(core, full_matrices=False)  # core is k x k' (k != k' where r > min(m, n))
        WL, WR = UtUB @ W0, VtUA @ Z0h.mT
    real = (S0 > torch.finfo(S0.dtype).eps * S0.amax(-1, keepdim=True)).to(S0.dtype).unsqueeze(-2)
    return (WL.square() * real).sum(-1) * (WR.square() * real).sum(-1)


class TruncateSteps(Retraction):
    """``"truncate"``: projected Runge-Kutta on the rank-r matrices (see the module docstring).
    Stage velocities may be factor velocities or :class:`~odelora.geometry.Tangent` vectors at
    the stage's frame (``velocity = "tangent"``: flows that can, return those)."""

    name = "truncate"
    velocity = "tangent"

    def combine(self, y0, h, coeffs, stages):
        return [self._combine_bucket(b, x0, h[b], coeffs, stages) for b, x0 in enumerate(y0)]

    @staticmethod
    def _tangent(x: Factors, k) -> Tangent:
        return k if isinstance(k, Tangent) else tangent_of(x.ensure_frame(), *k)

    def _blocks(self, b: int, x0: Factors, h: float, coeffs, stages, start: bool = True):
        """``[UB, *Ls] M [UA, *Rs].T``: ``X0/s`` (if ``start``) plus ``h sum_j c_j t_j``. The
        weights go into the small M, never into the tall blocks. A stage at X0 adds its ``L_j``
        (paired with UA) and ``R_j`` (paired with UB); a stage elsewhere adds its bases too,
        ``[UB_j, L_j] w [[C_j, I], [I, 0]] [UA_j, R_j].T``. None if nothing moves."""
        fr = x0.ensure_frame()
        kB, kA = fr.UB.shape[-1], fr.UA.shape[-1]
        Ls, Rs, fills = [], [], []  # (row, col, w C, 0) or (row, col, w, n): w I_n
        i, j = kB, kA
        for cj, st in zip(coeffs, stages):
            if cj == 0.0:
                continue
            w = h * cj
            t = self._tangent(st.y[b], st.k[b])
            if st.y[b] is x0:
                fills += [(0, 0, w * t.C, 0), (i, 0, w, t.L.shape[-1]), (0, j, w, t.R.shape[-1])]
                Ls.append(t.L)
                Rs.append(t.R)
                i, j = i + t.L.shape[-1], j + t.R.shape[-1]
            else:
                frj = st.y[b].ensure_frame()
                pB, pA = frj.UB.shape[-1], frj.UA.shape[-1]
                fills += [(i, j, w * t.C, 0), (i, j + pA, w, pB), (i + pB, j, w, pA)]
                Ls += [frj.UB, t.L]
                Rs += [frj.UA, t.R]
                i, j = i + pB + t.L.shape[-1], j + pA + t.R.shape[-1]
        if not Ls:
            return None
        M = fr.sB.new_zeros(*fr.sB.shape[:-1], i, j)
        if start and fr.balanced:  # PB.T PA = I: X0/s = UB diag(s^2) UA.T
            M[..., :kB, :kA].diagonal(dim1=-2, dim2=-1).copy_(fr.sB * fr.sA)
        elif start:
            M[..., :kB, :kA] = fr.core()
        for r0, c0, v, n in fills:
            if isinstance(v, Tensor):
                M[..., r0 : r0 + v.shape[-2], c0 : c0 + v.shape[-1]] += v
            else:
                M[..., r0 : r0 + n, c0 : c0 + n].diagonal(dim1=-2, dim2=-1).fill_(v)
        return fr, M, Ls, Rs

    def _combine_bucket(self, b: int, x0: Factors, h: float, coeffs, stages) -> Factors:
        blocks = self._blocks(b, x0, h, coeffs, stages)
        if blocks is None:  # nothing moved
            return x0
        fr, M, Ls, Rs = blocks
        k_out = min(x0.rank, x0.B.shape[-2], x0.A.shape[-1])
        U, S, V, UtUB, VtUA = self.reduce_at(fr)(fr.UB, fr.UA, M, Ls, Rs, k_out)
        # overlaps with the start's factors, for the closest balanced factorization
        over = (UtUB @ (fr.sB.unsqueeze(-1) * fr.PB.mT), VtUA @ (fr.sA.unsqueeze(-1) * fr.PA.mT))
        carried = _carried(fr, UtUB, VtUA) if reaches_rounding(S) else False
        B, A, frame = balanced_factors(U, S, V, x0.rank, near=(x0.B, x0.A), overlaps=over, carried=carried)
        y = Factors(B, A, x0.scale, frame)
        zero = _zero_product(fr)
        return keep_where(zero & (S.amax(-1) == 0), x0, y) if bool(zero.any()) else y

    @staticmethod
    def reduce_at(fr: Frame):
        """How a step from the state of frame ``fr`` is brought back to rank r."""
        return truncate  # rank <= (2s + 1) r in the bases -> rank r

    retract = staticmethod(BalanceSteps.retract)  # factors moved by a preconditioned step: balanced, same product

    def error_ratios(self, y0, y1, h, coeffs, stages, atol, rtol):
        """Per pair: ``|E|_F / (atol sqrt(mn) + rtol max(|X0|_F, |X1|_F))`` with ``E`` the error
        estimate of the product, ``s h sum_j c_j t_j``, from QRs of its blocks (:func:`_frob`)."""
        out = []
        for b, (x0, x1) in enumerate(zip(y0, y1)):
            fr, M, Ls, Rs = self._blocks(b, x0, h[b], coeffs, stages, start=False)
            e = _frob(cat_columns([fr.UB, *Ls]), M, cat_columns([fr.UA, *Rs]))
            n0, n1 = _product_norm(x0), _product_norm(x1)
            m, n = x0.B.shape[-2], x0.A.shape[-1]
            s = x0.scale
            out.append(scaled_error(s * e, atol * math.sqrt(m * n) + rtol * s * torch.maximum(n0, n1)))
        return torch.cat(out)


class SplitSteps(TruncateSteps):
    """``"split"``: as ``"truncate"``, with the one-sided projector-splitting retraction
    (:func:`~odelora.geometry.split_project`) in place of the truncation: the same ``2 h |F|``
    bound and orders, QRs of ``m x r`` instead of ``m x 2r`` blocks and an ``r x r`` SVD; the
    result is a projection of the stepped product, not its nearest rank-r matrix.

    From a product of rank below r the start's row basis holds directions that rounding chose (those
    of its zero singular values), and the splitting keeps what the stepped product does along them:
    such steps (PEFT's ``B = 0`` start, a gradient of rank below r after it) take the truncation,
    pair by pair (a pair's step does not depend on the pairs stacked with it)."""

    name = "split"

    @staticmethod
    def reduce_at(fr: Frame):
        low = rounding_rows(_product_values(fr))
        if not bool(low.any()):
            return split_project
        if bool(low.all()):
            return truncate

        def per_pair(*args):
            cut, split = truncate(*args), split_project(*args)
            if any(c.shape != s.shape for c, s in zip(cut, split)):  # fewer columns than r: truncate all
                return cut
            return tuple(torch.where(low.view(-1, *[1] * (c.ndim - 1)), c, s) for c, s in zip(cut, split))

        return per_pair


def _frob(L: Tensor, M: Tensor, R: Tensor) -> Tensor:
    """``|L M R.T|_F`` per pair, from the triangular factors of QRs of L and R, without forming
    the product. The trace of Gram products, ``trace(L.T L M R.T R M.T)``, costs less but loses
    to cancellation every digit below ``sqrt(eps)`` of its terms, and an error estimate is such a
    cancellation: in float32 it read 0.0, or 25 times the error, for errors of 1e-5 of the step."""
    return torch.linalg.matrix_norm(qr(L)[1] @ M @ qr(R)[1].mT)


RETRACTIONS: dict[str, type[Retraction]] = {c.name: c for c in (FactorSteps, BalanceSteps, TruncateSteps, SplitSteps)}


def get_retraction(name: str) -> Retraction:
    try:
        return RETRACTIONS[name]()
    except (KeyError, TypeError):  # an unknown or unhashable name
        raise ValueError(f"unknown retraction {name!r}; choose one of {sorted(RETRACTIONS)}") from None

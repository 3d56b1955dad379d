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
    "check_pair",
    "rounding_scale",
    "compute_dtype",
    "default_damping",
    "Frame",
    "factor_frame",
    "damped_inverse",
    "Tangent",
    "tangent_of",
    "truncate",
    "split_project",
    "balanced_factors",
    "balance_frame",
    "drop_rounding",
    "reaches_rounding",
    "rounding_rows",
    "balance",
    "imbalance",
    "tangent_project",
    "tall_mm",
    "cat_columns",
    "qr",
]


def tall_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a tall ``a`` (..., m, k) and a small ``b`` (..., k, j), computed as
    ``(b.T a.T).T``: BLAS fills a wide (j, m) output several times faster than a tall (m, j) one
    (3x for m = 384, j = 8 on CPU). The result is a column-major view, the layout
    :func:`cat_columns` and QR take without reordering."""
    return (b.mT @ a.mT).mT


def cat_columns(ts: list[Tensor]) -> Tensor:
    """``torch.cat(ts, -1)`` of tall matrices, as a column-major matrix: a plain copy when the
    inputs are column-major (``tall_mm`` results, ``.mT`` of row-major), where a row-major
    result would interleave them element by element."""
    return torch.cat([t.mT for t in ts], -2).mT


# Devices on which :func:`qr` tries Cholesky QR first. CUDA's batched Householder QR factors one
# matrix of the batch at a time (a dozen kernel launches each, most of ODELoRA's launches per
# step); on CPUs LAPACK's is faster than Cholesky QR at these shapes. Tests add "cpu" here.
CHOLESKY_QR_DEVICES = {"cuda"}


def qr(X: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of tall blocks (..., m, k), ``X = Q R``, Q with orthonormal columns.

    On :data:`CHOLESKY_QR_DEVICES`: Cholesky QR in float64 (a fixed handful of batched kernels).
    With ``E = Q.T Q - I`` and ``e`` its largest row sum of magnitudes (>= its 2-norm): one pass
    is kept where ``e <= eps(X.dtype)`` (``8 k eps`` in float64); a second where ``e <= 1/2``
    (then ``cond(Q)^2 <= 3`` and the second pass is orthonormal to float64 rounding; checked
    again for float64 blocks); otherwise (a failed Cholesky factorization, an ill-conditioned or
    rank-deficient block; also a wide block) Householder QR, which is orthonormal for any block.
    Kept results are QRs like Householder's: the same Q up to column signs."""
    if X.device.type not in CHOLESKY_QR_DEVICES or X.shape[-2] < X.shape[-1] or X.numel() == 0:
        return torch.linalg.qr(X)
    k, f64 = X.shape[-1], X.dtype == torch.float64
    tol = max(torch.finfo(X.dtype).eps, 8 * k * torch.finfo(torch.float64).eps)
    Xd = X.mT.to(torch.float64).contiguous().mT  # column-major: rounding independent of X's layout
    Q, R, e = _cholesky_qr(Xd)
    e = float(e)
    if not e <= tol:  # (NaN: a failed factorization)
        if not e <= 0.5:
            return torch.linalg.qr(X)
        Q, R2, e2 = _cholesky_qr(Q)
        R = R2 @ R
        if f64 and not float(e2) <= tol:
            return torch.linalg.qr(X)
    return Q.to(X.dtype), R.to(X.dtype)


def _cholesky_qr(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass of Cholesky QR, and the largest row sum of ``|Q.T Q - I|`` over the batch (NaN
    where a Cholesky factorization failed)."""
    R, info = torch.linalg.cholesky_ex(X.mT @ X, upper=True)
    Q = torch.linalg.solve_triangular(R, X, upper=True, left=False)
    Qd = Q.detach()
    E = Qd.mT @ Qd
    E.diagonal(dim1=-2, dim2=-1).sub_(1)
    e = E.abs().sum(-1).amax(-1).where(info == 0, torch.nan).amax()
    return Q, R, e


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Precision of Gram-free solves and retractions: float64 if any input is float64, else
    float32 (half-precision factors are processed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def default_damping(dtype: torch.dtype, tangent: bool = False) -> float:
    """Relative damping used when none is given. For factor velocities the unit roundoff ``eps``
    of ``dtype``: a factor direction of singular value ``x`` moves like ``1 / x^2``, and the
    damping bounds that where ``x^2 < eps * max(x)^2``. For tangent vectors (velocities of the
    product, bounded by ``|G|`` whatever the damping) ``eps^2``: there ``x`` enters only through
    the projector weight ``x^2 / (x^2 + lam)``, which ``lam = eps max^2`` would lower by 11% at
    ``x^2 = 1e-6 max^2`` (float32); with ``eps^2`` the weight is 1 down to where the rounding fade
    of :func:`damped_inverse` takes over."""
    eps = float(torch.finfo(dtype).eps)
    return eps * eps if tangent else eps


class Frame(NamedTuple):
    """Thin SVDs of both factors: ``B = UB diag(sB) PB.T`` and ``A.T = UA diag(sA) PA.T``.

    ``UB`` (..., m, k) and ``UA`` (..., n, k') have orthonormal columns, ``PB`` (..., r, k) and
    ``PA`` (..., r, k') orthonormal columns; ``k = min(m, r)``, ``k' = min(n, r)`` for a frame
    computed from factors, ``k = k' = min(m, n, r)`` for one the truncation produced.
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

    def core(self) -> Tensor:
        """``diag(sB) PB.T PA diag(sA)``: the product in the frame's bases, ``B A = UB core UA.T``."""
        return (self.sB.unsqueeze(-1) * (self.PB.mT @ self.PA)) * self.sA.unsqueeze(-2)

    def grams(self) -> tuple[Tensor, Tensor]:
        """``(B.T B, A A.T) = (PB diag(sB^2) PB.T, PA diag(sA^2) PA.T)``, both r x r."""
        return (self.PB * (self.sB * self.sB).unsqueeze(-2)) @ self.PB.mT, (self.PA * (self.sA * self.sA).unsqueeze(-2)) @ self.PA.mT


class Tangent(NamedTuple):
    """A tangent vector at a pair's frame, ``dX/s = UB C UA.T + UB R.T + L UA.T`` with ``L``
    (..., m, k'), ``R`` (..., n, k) and ``C`` (..., k, k'): the form the truncation retraction
    consumes without converting factor velocities."""

    L: Tensor
    R: Tensor
    C: Tensor


def tangent_of(fr: Frame, dB: Tensor, dA: Tensor) -> Tangent:
    """The :class:`Tangent` of factor velocities: ``dB A + B dA`` at ``B = UB sB PB.T``,
    ``A.T = UA sA PA.T``."""
    L = tall_mm(dB, fr.PA) * fr.sA.unsqueeze(-2)
    R = ((fr.sB.unsqueeze(-1) * (fr.PB.mT @ dA))).mT
    return Tangent(L, R, L.new_zeros(*L.shape[:-2], fr.sB.shape[-1], fr.sA.shape[-1]))


def _thin_svd(F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``F = U diag(s) P.T`` for a tall or wide (..., p, r) matrix: QR first when p > r (cheaper
    than an SVD of the tall matrix), then an SVD of the small triangular factor."""
    if F.shape[-2] > F.shape[-1]:
        Q, R = qr(F)
        W, s, Vh = torch.linalg.svd(R)
        return tall_mm(Q, W), s, Vh.mT
    U, s, Vh = torch.linalg.svd(F, full_matrices=False)
    return U, s, Vh.mT


def factor_frame(B: Tensor, A: Tensor) -> Frame:
    """The :class:`Frame` of a pair (in the precision of the inputs)."""
    UB, sB, PB = _thin_svd(B)
    UA, sA, PA = _thin_svd(A.mT)
    return Frame(UB, sB, PB, UA, sA, PA)


def damped_inverse(x: Tensor, damping: float) -> Tensor:
    """``1 / (x^2 + lam)`` per singular value, ``lam = damping * max(x)^2`` over the last axis,
    faded out at the rounding level of ``x``'s dtype: times ``1 / (1 + (tau / x)^6)``,
    ``tau = eps^(3/4) max(x)`` (the scale of :func:`drop_rounding`), so 0 where ``x`` is (a
    product of rank below r, a zero factor). Along a direction where a factor is zero, or zero but
    for rounding, the gradient's component is rounding noise (about ``eps |B| |G|``); divided by
    ``lam`` alone it would come out as large as a real factor velocity. The fade changes values
    with ``x > 10 tau`` by less than 1e-6 of themselves. With the factor velocities' damping
    ``tau`` lies far below ``sqrt(lam)`` (float32: 6.4e-6 against 3.5e-4 of the largest), where
    the damping already acts; with the tangent's (``sqrt(lam) = eps max(x)``) the fade alone
    separates rounding from real directions (see :func:`default_damping`)."""
    x2 = x * x
    top2 = x2.amax(-1, keepdim=True)
    fade = (1 + torch.finfo(x.dtype).eps ** 4.5 * (top2 / x2).pow(3)).reciprocal()  # (tau/x)^6 = eps^4.5 (top2/x2)^3
    return torch.where(x2 > 0, fade / (x2 + damping * top2), 0.0)


def _aligned_polar(N: Tensor, signs=None) -> Tensor:
    """The polar factor of ``N`` (k, r), k <= r, where N determines it; where it does not (singular
    values below ``eps^(1/2)`` of the largest: directions the previous factors do not reach), the
    orthogonal map between N's left and right null spaces closest to ``[I, 0]`` instead of one
    that rounding picks. Only the factorization depends on this choice, never the product.
    ``signs``: a function giving +-1 per row of N (the canonical signs of a basis N is written
    in), called only where N does not determine the result: ``[I, 0]`` is then taken in the
    signed basis, so that the choice does not depend on signs that rounding may flip."""
    k, r = N.shape[-2], N.shape[-1]
    W, c, Zh = torch.linalg.svd(N, full_matrices=True)
    Z = Zh.mT
    keep = c > torch.finfo(N.dtype).eps ** 0.5 * c.amax(-1, keepdim=True)  # (..., k)
    if bool(keep.all()):  # the usual case: N determines the whole polar factor
        return W @ Zh[..., :k, :]
    if signs is not None:  # polar(D N) = D polar(N) where determined; D [I, 0] elsewhere
        sign = signs()
        return sign * _aligned_polar(sign * N)
    Wk = W * keep.unsqueeze(-2)
    Zk = Z[..., :k] * keep.unsqueeze(-2)
    informed = Wk @ Zk.mT
    # projectors on the uninformed parts, and the closest orthogonal map between them to [I, 0]
    Pw = torch.eye(k, dtype=N.dtype, device=N.device) - Wk @ Wk.mT
    Pz = torch.eye(r, dtype=N.dtype, device=N.device) - Zk @ Zk.mT
    E = torch.eye(k, r, dtype=N.dtype, device=N.device)
    free = Pw @ E @ Pz
    Wf, cf, Zfh = torch.linalg.svd(free, full_matrices=False)
    nfree = (~keep).sum(-1, keepdim=True)  # (..., 1)
    take = (torch.arange(k, device=N.device) < nfree).to(N.dtype)  # its largest nfree singular pairs
    return informed + (Wf * take.unsqueeze(-2)) @ Zfh


def _as_list(X) -> list[Tensor]:
    """A block or a list of blocks, as a list."""
    return [X] if isinstance(X, Tensor) else list(X)


def truncate(UL: Tensor, UR: Tensor, M: Tensor, L, R, rank: int):
    """Best rank-``rank`` approximation of ``Y = [UL, L] @ M @ [UR, R].T`` (the metric projection
    on the rank-``rank`` matrices), without forming Y.

    ``UL`` (..., m, a) and ``UR`` (..., n, b) have orthonormal columns; ``L`` (..., m, p) and
    ``R`` (..., n, q) are arbitrary (or lists of blocks, concatenated); ``M`` is
    (..., a + p, b + q). Returns ``(U, S, V, U.T UL, V.T UR)`` with ``Y_rank = U diag(S) V.T``,
    orthonormal U and V, and their overlaps with the anchors (small matrices, free here, which
    spare the caller products with the tall bases).

    The QR of ``[UL, L]`` (not of L alone; :func:`qr`) keeps the new basis orthonormal and
    orthogonal to UL even when L is rank-deficient (a rank-1 gradient), and gives
    ``min(m, a + p)`` columns when m is small. Cost O((m + n)(a + p)^2 + (a + p)^3).
    """
    Ql, Tl = qr(cat_columns([UL, *_as_list(L)]))
    Qr, Tr = qr(cat_columns([UR, *_as_list(R)]))
    W, S, Zh = torch.linalg.svd(Tl @ M @ Tr.mT)
    W, Z = W[..., :rank], Zh[..., :rank, :].mT
    a, b = UL.shape[-1], UR.shape[-1]
    return tall_mm(Ql, W), S[..., :rank], tall_mm(Qr, Z), W.mT @ Tl[..., :a], Z.mT @ Tr[..., :b]


def split_project(UL: Tensor, UR: Tensor, M: Tensor, L, R, rank: int):
    """The one-sided projector-splitting retraction of ``Y = [UL, L] @ M @ [UR, R].T``:
    ``P_U1 Y`` with ``U1 = orth(Y @ UR)``, the anchor's row basis ``UR`` kept for the K-step
    (Lubich & Oseledets 2014), without forming Y. Same inputs and outputs as :func:`truncate`,
    with ``rank = UR.shape[-1]`` columns at most.

    ``|P_U1 Y - X0| <= 2 |Y - X0|`` for any ``X0`` with row space in ``UR``, and rank-``rank``
    matrices with ``Y UR`` of full rank are reproduced exactly, so projected Runge-Kutta methods
    keep their orders. Cost O((m + n)(a + p) b + b^3): QRs of ``m x b`` and ``n x b`` blocks
    (``b = UR.shape[-1]``) instead of :func:`truncate`'s ``m x (a + p)``.
    """
    b = UR.shape[-1]
    P, Q = cat_columns([UL, *_as_list(L)]), cat_columns([UR, *_as_list(R)])
    U1, _ = qr(tall_mm(P, M @ (Q.mT @ UR)))  # K = Y UR
    U1tP = U1.mT @ P
    V1, T = qr(tall_mm(Q, M.mT @ U1tP.mT))  # (U1.T Y).T = V1 T
    W, S, Zh = torch.linalg.svd(T.mT)
    k = min(rank, b)
    W, Z = W[..., :k], Zh[..., :k, :].mT
    a = UL.shape[-1]
    return tall_mm(U1, W), S[..., :k], tall_mm(V1, Z), W.mT @ U1tP[..., :a], Z.mT @ (V1.mT @ UR)


def rounding_scale(S: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``tau = eps^(3/4) max(S)`` of :func:`drop_rounding`, per row: singular values below it are
    rounding (``eps`` of ``dtype``, the precision ``S`` was computed from; default ``S``'s own)."""
    fi = torch.finfo(dtype or S.dtype)
    return (fi.eps**0.75 * S.amax(-1, keepdim=True)).clamp_min(fi.tiny)


def rounding_rows(S: Tensor) -> Tensor:
    """Per row of ``S``: whether :func:`drop_rounding` can change any of its values, whatever
    ``carried`` says: values above ``512 tau`` come out exactly as they went in (``1 + (tau / S)^6``
    rounds to 1 even in float64)."""
    return (S < 512 * rounding_scale(S)).any(-1)


def reaches_rounding(S: Tensor) -> bool:
    """Whether :func:`drop_rounding` can change any value of ``S`` (any row of
    :func:`rounding_rows`), so that callers may skip computing ``carried`` otherwise."""
    return bool(rounding_rows(S).any())


def drop_rounding(S: Tensor, carried: Tensor | None = None) -> Tensor:
    """Singular values of a product with those at rounding level sent smoothly to zero:
    ``S x^6 / (x^6 + 1)`` with ``x = S / tau``, ``tau = eps^(3/4) max(S)`` (float64: 1.8e-12,
    float32: 6.4e-6 of the largest). A product of rank below r (a gradient of rank below r from
    B = 0) comes out of a decomposition with its missing singular values at rounding level, in
    directions that rounding chooses. As factor singular values (square roots) they enter the next
    flow evaluation with the fade of :func:`damped_inverse` as weight: a value of ``eps max(S)``
    maps to ``eps^(5/2) max(S)``, a factor value ``x = eps^(5/4) max(x)``, weight about ``eps^3``,
    so a stage moves the product along such a direction by far less than rounding, and the next
    truncation drops it again. A gentler map lets the
    direction through: with ``S x^2 / (x^2 + 1)`` the weight is ``eps^(1/2)``, the next Runge-Kutta
    stage takes the direction as a real one, and steps depend on rounding (with a rank-3 gradient
    from B = 0 and r = 6, RK4 and Dormand-Prince products ended 1e-3 to 1e-1 apart, relative,
    within 4 to 8 steps, after a rounding-level change of the gradient). Values above
    ``3 tau`` change by less than 0.14%; the map is smooth.

    Only new directions can be rounding: ``carried`` (..., k) in [0, 1] says how much each value's
    direction continues one the previous state carried (above rounding), and such a value is
    mapped with ``tau (1 - carried)``. Applied every step to all values, the map would erase real
    small directions for good (a float32 value at 1e-6 of the largest in one step, one at 1e-5
    within some tens), and the projected flow never brings such a direction back."""
    fi = torch.finfo(S.dtype)
    S = S.clamp_min(0)
    tau = rounding_scale(S)
    if carried is not None:
        tau = tau * (1 - carried.clamp(0, 1))
    return S / (1 + (tau / S.clamp_min(fi.tiny)).pow(6))  # = S x^6 / (x^6 + 1), 0 at S = 0


def _canonical_signs(U: Tensor) -> Tensor:
    """+-1 per column of ``U`` that makes its entry of largest magnitude positive. Singular vectors
    are defined up to a sign that rounding may flip; a choice made in terms of them (the
    alignment of directions the previous factors do not reach) must not depend on it."""
    # the largest magnitude is negative iff -min > max (amax and amin: torch.aminmax is 10x slower here)
    return torch.where(U.amin(-2) + U.amax(-2) < 0, -1.0, 1.0).to(U.dtype)


def balanced_factors(U: Tensor, S: Tensor, V: Tensor, r: int, near: tuple[Tensor, Tensor] | None = None, overlaps=None, carried=None):
    """Balanced factors of ``U diag(S) V.T`` with r columns: ``B = U diag(S^1/2) Q``,
    ``A = Q.T diag(S^1/2) V.T`` with ``Q`` (k, r) of orthonormal rows, and their :class:`Frame`.

    Balanced factorizations differ by such Q; with ``near = (B0, A0)`` the one closest to
    ``(B0, A0)`` in Frobenius norm is returned (an orthogonal Procrustes problem), so that factors
    move continuously from step to step: no column sign flips or permutations, which would
    scramble per-coordinate state such as Adam moments. ``overlaps = (U.T B0, V.T A0.T)`` may be
    passed instead of computing them. Without ``near``, ``Q = [I, 0]`` (in the canonical signs of
    U's columns). All scalings act on the small side: U and V are read, never rescaled.
    ``carried``: see :func:`drop_rounding`; ``False`` where the caller found that no value
    :func:`reaches_rounding` (the map is then the identity and is skipped).
    """
    root = (S.clamp_min(0) if carried is False else drop_rounding(S, carried)).sqrt()
    k = S.shape[-1]
    signs = lambda: _canonical_signs(U).unsqueeze(-1)  # (..., k, 1): U diag(sign) has canonical signs
    if near is None:
        Q = signs() * torch.eye(k, r, dtype=U.dtype, device=U.device)
    else:
        UB0, VA0 = overlaps if overlaps is not None else (U.mT @ near[0], V.mT @ near[1].mT)
        Q = _aligned_polar(root.unsqueeze(-1) * (UB0 + VA0), signs)
    B = tall_mm(U, root.unsqueeze(-1) * Q)
    A = (Q.mT * root.unsqueeze(-2)) @ V.mT
    return B, A, Frame(U, root, Q.mT, V, root, Q.mT, balanced=True)


def balance_frame(B: Tensor, A: Tensor, fr: Frame | None = None) -> tuple[Tensor, Tensor, Frame]:
    """Balanced factors of ``B @ A`` closest to ``(B, A)``, with their frame (``fr``: the input's
    frame, if known)."""
    fr = fr if fr is not None else factor_frame(B, A)
    core = fr.core()
    W, S, Zh = torch.linalg.svd(core, full_matrices=False)
    Z = Zh.mT
    # overlaps with the input: U.T B = W.T diag(sB) PB.T, V.T A.T = Z.T diag(sA) PA.T
    over = (W.mT @ (fr.sB.unsqueeze(-1) * fr.PB.mT), Z.mT @ (fr.sA.unsqueeze(-1) * fr.PA.mT))
    return balanced_factors(tall_mm(fr.UB, W), S, tall_mm(fr.UA, Z), B.shape[-1], near=(B, A), overlaps=over)


def check_pair(B: Tensor, A: Tensor) -> None:
    """Refuse tensors that are not LoRA factors ``B`` (..., m, r) and ``A`` (..., r, n)."""
    if B.dim() < 2 or A.dim() < 2 or B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} are not a LoRA pair: expected B (..., m, r) and "
                         "A (..., r, n) with the same r and batch dimensions")


def balance(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Refactor ``B @ A`` so that ``B.T @ B == A @ A.T`` (both carry the singular values of BA),
    choosing among such factorizations the one closest to ``(B, A)``. The product is unchanged up
    to rounding; computed in the compute precision, returned in the input dtype. A rank-deficient
    product gives factors with matching zero directions (``B = 0`` balances to ``(0, 0)``)."""
    check_pair(B, A)
    dt = compute_dtype(B, A)
    Bn, An, _ = balance_frame(B.to(dt), A.to(dt))
    return Bn.to(B.dtype), An.to(A.dtype)


def imbalance(B: Tensor, A: Tensor, frame: Frame | None = None) -> Tensor:
    """``||B.T B - A A.T||_F / (||B.T B||_F + ||A A.T||_F)`` per pair, in [0, 1]: 0 for balanced
    factors, 1 when one factor is zero and the other is not (PEFT's start), 0 when both are.
    With the pair's ``frame`` the Gram matrices come from it."""
    check_pair(B, A)
    dt = compute_dtype(B, A)
    if frame is not None:
        MB, MA = frame.grams()
    else:
        B, A = B.to(dt), A.to(dt)
        MB, MA = B.mT @ B, A @ A.mT
    den = torch.linalg.matrix_norm(MB) + torch.linalg.matrix_norm(MA)
    num = torch.linalg.matrix_norm(MB - MA)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _column_basis(X: Tensor) -> Tensor:
    """Orthonormal columns spanning the column space of ``X`` (..., m, k), with zero columns for
    its directions at rounding level (:func:`drop_rounding`'s ``tau``): a rank-revealing basis."""
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U * (S > rounding_scale(S)).unsqueeze(-2)


def tangent_project(G: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Orthogonal projection of ``G`` (..., m, n) on the tangent space of the rank-r matrices at
    ``X = B @ A``: ``PU G + G PV - PU G PV`` with PU, PV the projectors on the column space of B and
    the row space of A, from their SVDs (directions at rounding level left out: at ``B = 0`` it
    is ``G PV``, the flows' velocity at PEFT's start). A dense reference for tests and diagnostics."""
    check_pair(B, A)
    if G.shape[-2:] != (B.shape[-2], A.shape[-1]):
        raise ValueError(f"G {tuple(G.shape)} is not a gradient of B @ A ({B.shape[-2]} x {A.shape[-1]})")
    dt = compute_dtype(G, B, A)
    QB = _column_basis(B.to(dt))
    QA = _column_basis(A.to(dt).mT)
    G = G.to(dt)
    UG = QB @ (QB.mT @ G)
    return UG + (G - UG) @ QA @ QA.mT

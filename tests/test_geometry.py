import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.linalg import orthogonal_procrustes

from odelora.geometry import balance, damped_inverse, factor_frame, imbalance, tangent_project, truncate

from conftest import projection_reference, random_factor


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(1, 6), seed=st.integers(0, 2**31), logc=st.floats(0, 4))
def test_balance_keeps_product_and_balances(m, n, r, seed, logc):
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    B = random_factor(rng, m, r, 10**logc) * rng.uniform(0.01, 100)
    A = random_factor(rng, n, r, 10**logc).T * rng.uniform(0.01, 100)
    Bb, Ab = (t.numpy() for t in balance(torch.from_numpy(B), torch.from_numpy(A)))
    X = B @ A
    assert np.linalg.norm(Bb @ Ab - X) <= 1e-12 * np.linalg.norm(X)
    MB, MA = Bb.T @ Bb, Ab @ Ab.T
    assert np.linalg.norm(MB - MA) <= 1e-12 * np.linalg.norm(MB)
    sv = np.linalg.svd(X, compute_uv=False)[:r]  # both Grams carry the singular values of X
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(MB))[::-1], sv, rtol=1e-10, atol=1e-12 * sv[0])


def balance_reference(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The balanced factorization ``U S^1/2 Q`` of ``BA`` closest to ``(B, A)`` (independent of
    odelora): numpy's SVD of the dense product, Q from scipy's orthogonal Procrustes."""
    r = B.shape[1]
    U, S, Vt = np.linalg.svd(B @ A, full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vt[:r].T
    left = np.vstack([U * np.sqrt(S), V * np.sqrt(S)])
    Q, _ = orthogonal_procrustes(left, np.vstack([B, A.T]))
    return (U * np.sqrt(S)) @ Q, ((V * np.sqrt(S)) @ Q).T


def test_balance_is_the_closest_balanced_factorization(rng):
    """Among the balanced factorizations U S^1/2 Q of BA, balance picks the Q closest to (B, A):
    an orthogonal Procrustes problem, solved here by scipy."""
    for _ in range(5):
        B, A = rng.standard_normal((9, 3)), rng.standard_normal((3, 7)) * 3
        Bb, Ab = (t.numpy() for t in balance(torch.from_numpy(B), torch.from_numpy(A)))
        Bref, Aref = balance_reference(B, A)
        np.testing.assert_allclose(Bb, Bref, atol=1e-10)
        np.testing.assert_allclose(Ab, Aref, atol=1e-10)


def test_balance_batched_dtype_and_zero_start(rng):
    """Each pair of a batch (B scaled from 0.1 to 10) is balanced as scipy's Procrustes reference
    says, factor by factor (1e-10) and with its own product kept (1e-12 relative): the batched
    SVDs and alignments must not mix pairs, and a rotation of the factors that keeps the product
    (which a comparison of products alone would miss) is caught; bfloat16 stays bfloat16."""
    B = torch.from_numpy(rng.standard_normal((5, 12, 3)) * np.logspace(-1, 1, 5)[:, None, None])
    A = torch.from_numpy(rng.standard_normal((5, 3, 9)))
    Bb, Ab = balance(B, A)
    for i in range(5):
        Bref, Aref = balance_reference(B[i].numpy(), A[i].numpy())
        X = (B[i] @ A[i]).numpy()
        np.testing.assert_allclose(Bb[i].numpy(), Bref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(Ab[i].numpy(), Aref, rtol=0, atol=1e-10)
        np.testing.assert_allclose((Bb[i] @ Ab[i]).numpy(), X, rtol=0, atol=1e-12 * np.linalg.norm(X))
    Bh, Ah = balance(B.bfloat16(), A.bfloat16())
    assert Bh.dtype == torch.bfloat16 and Ah.dtype == torch.bfloat16
    assert float(imbalance(Bh, Ah).max()) < 2e-2
    # B = 0: the product is 0 and so are both balanced factors (A's row space is not kept)
    Z, A1 = torch.zeros(8, 2, dtype=torch.float64), torch.from_numpy(rng.standard_normal((2, 6)))
    Bz, Az = balance(Z, A1)
    assert float(Bz.abs().max()) == 0.0 and float(Az.abs().max()) == 0.0


def test_balance_with_rank_above_a_dimension(rng):
    """A layer with one input and r = 3 (PINN first layers): the product has rank 1."""
    B, A = torch.from_numpy(rng.standard_normal((6, 3))), torch.from_numpy(rng.standard_normal((3, 1)))
    Bb, Ab = balance(B, A)
    assert Bb.shape == (6, 3) and Ab.shape == (3, 1)
    torch.testing.assert_close(Bb @ Ab, B @ A)
    assert float(imbalance(Bb, Ab)) < 1e-14


def test_imbalance_values(rng):
    B = torch.from_numpy(rng.standard_normal((7, 2)))
    A = torch.from_numpy(rng.standard_normal((2, 5)))
    MB, MA = (B.T @ B).numpy(), (A @ A.T).numpy()
    expected = np.linalg.norm(MB - MA) / (np.linalg.norm(MB) + np.linalg.norm(MA))
    assert abs(float(imbalance(B, A)) - expected) < 1e-14
    assert float(imbalance(*balance(B, A))) < 1e-14
    assert float(imbalance(torch.zeros(3, 2), torch.zeros(2, 4))) == 0.0
    assert float(imbalance(torch.zeros(7, 2, dtype=torch.float64), A)) == 1.0  # PEFT's start reads 1, not 1e12


def test_tangent_project_matches_reference(rng):
    B, A = rng.standard_normal((9, 3)), rng.standard_normal((3, 11))
    G = rng.standard_normal((9, 11))
    P = tangent_project(*(torch.from_numpy(x) for x in (G, B, A))).numpy()
    np.testing.assert_allclose(P, projection_reference(G, B, A), atol=1e-12)


def test_tangent_project_of_rank_deficient_factors_and_bad_shapes(rng):
    """At PEFT's B = 0 the projection is G PV and at a rank-1 B it projects on B's one column
    (numpy); QR's arbitrary basis for the missing directions made it basis-dependent (1.97 off
    under a permutation of rows). Factors that are no pair, or a G of another shape, are refused."""
    G, A = rng.standard_normal((7, 6)), rng.standard_normal((3, 6))
    V = np.linalg.svd(A.T, full_matrices=False)[0]
    P = tangent_project(*(torch.from_numpy(x) for x in (G, np.zeros((7, 3)), A))).numpy()
    np.testing.assert_allclose(P, G @ V @ V.T, atol=1e-12)
    b = rng.standard_normal((7, 1))
    B = b @ rng.standard_normal((1, 3))  # rank 1
    u = b / np.linalg.norm(b)
    P = tangent_project(*(torch.from_numpy(x) for x in (G, B, A))).numpy()
    np.testing.assert_allclose(P, u @ u.T @ G + G @ V @ V.T - u @ u.T @ G @ V @ V.T, atol=1e-12)
    with pytest.raises(ValueError, match=r"B \(7, 3\) and A \(4, 6\) are not a LoRA pair"):
        tangent_project(torch.zeros(7, 6), torch.zeros(7, 3), torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"G \(7, 5\) is not a gradient of B @ A"):
        tangent_project(torch.zeros(7, 5), torch.zeros(7, 3), torch.zeros(3, 6))
    for f in (balance, imbalance):
        with pytest.raises(ValueError, match="not a LoRA pair"):
            f(torch.zeros(5), torch.zeros(5, 3))


@pytest.mark.parametrize("m,n,a,p", [(30, 20, 4, 4), (30, 20, 4, 12), (5, 20, 4, 4), (30, 3, 2, 6)])
def test_truncate_is_the_best_rank_r_approximation(m, n, a, p, rng):
    """Against numpy's SVD of the dense sum, also with rank-deficient extra blocks (a rank-1
    gradient), with fewer rows than columns to orthogonalize, and with L given as blocks."""
    b = min(a, n)
    UL = np.linalg.qr(rng.standard_normal((m, min(a, m))))[0]
    UR = np.linalg.qr(rng.standard_normal((n, b)))[0]
    for rank_L in (p, 1):
        L = rng.standard_normal((m, rank_L)) @ rng.standard_normal((rank_L, p))
        R = rng.standard_normal((n, p))
        M = rng.standard_normal((UL.shape[1] + p, b + p))
        k = min(a, m, n)
        t = [torch.from_numpy(x) for x in (UL, UR, M, L, R)]
        if rank_L == 1:  # the extra columns as a list of blocks
            t[3] = [t[3][:, :1], t[3][:, 1:]]
        U, S, V, UtUL, VtUR = (x.numpy() for x in truncate(*t, k))
        np.testing.assert_allclose(UtUL, U.T @ UL, atol=1e-12)
        np.testing.assert_allclose(VtUR, V.T @ UR, atol=1e-12)
        Y = np.hstack([UL, L]) @ M @ np.hstack([UR, R]).T
        u, s, vt = np.linalg.svd(Y)
        np.testing.assert_allclose(S, s[:k], rtol=1e-10, atol=1e-12 * s[0])
        np.testing.assert_allclose((U * S) @ V.T, (u[:, :k] * s[:k]) @ vt[:k], atol=1e-10 * s[0])
        np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-12)  # orthonormal even for rank-deficient L
        np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-12)


def test_factor_frame_reconstructs_and_is_orthonormal(rng):
    for B, A in [
        (rng.standard_normal((10, 3)), rng.standard_normal((3, 7))),
        (np.zeros((10, 3)), rng.standard_normal((3, 7))),
        (rng.standard_normal((2, 3)), rng.standard_normal((3, 1))),
    ]:
        fr = factor_frame(torch.from_numpy(B), torch.from_numpy(A))
        np.testing.assert_allclose(((fr.UB * fr.sB) @ fr.PB.mT).numpy(), B, atol=1e-12)
        np.testing.assert_allclose(((fr.UA * fr.sA) @ fr.PA.mT).numpy(), A.T, atol=1e-12)
        for Q in (fr.UB, fr.UA, fr.PB, fr.PA):
            np.testing.assert_allclose((Q.mT @ Q).numpy(), np.eye(Q.shape[-1]), atol=1e-12)


def test_damped_inverse_is_smooth_and_zero_at_zero():
    x = torch.tensor([1.0, 1e-2, 1e-8, 1e-14, 1e-16, 0.0], dtype=torch.float64)
    d = 1e-6
    inv = damped_inverse(x, d).numpy()
    np.testing.assert_allclose(inv[:3], 1 / (x[:3].numpy() ** 2 + d), rtol=1e-15)
    # at the rounding level of the dtype (tau = eps^(3/4) max = 1.8e-12 here) faded to zero
    assert inv[3] < 1e-10 / d and inv[4] < 1e-20 / d and inv[5] == 0
    assert torch.equal(damped_inverse(torch.zeros(3), 1e-6), torch.zeros(3))
    assert torch.equal(damped_inverse(torch.zeros(3), 0.0), torch.zeros(3))
    # x / (x^2 + lam) rises to 1/(2 sqrt(lam)) and falls to 0 with x: bounded, no cliff
    xs = torch.logspace(-12, 0, 200, dtype=torch.float64)
    xs = torch.cat([xs, torch.ones(1, dtype=torch.float64)])
    f = xs * damped_inverse(xs, d)
    assert float(f.max()) <= 1 / (2 * d**0.5) * (1 + 1e-12)
    assert float((f[1:-1] - f[:-2]).abs().max()) < 0.2 * float(f.max())


def test_alignment_is_the_polar_factor_and_deterministic_where_uninformed(rng):
    """Full rank: scipy's polar factor. Rank-deficient (a product gaining rank): orthogonal, the
    polar factor on the informed part, and a choice that rounding-level noise does not move
    (the plain polar factor moves by O(1) there)."""
    from scipy.linalg import polar

    from odelora.geometry import _aligned_polar

    N = torch.from_numpy(rng.standard_normal((5, 5)))
    np.testing.assert_allclose(_aligned_polar(N).numpy(), polar(N.numpy())[0], atol=1e-12)
    W = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    Z = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    Nd = (W[:, :3] * [3.0, 2.0, 1.0]) @ Z[:, :3].T  # rank 3
    noise = lambda: 1e-13 * rng.standard_normal((6, 6))
    Q1, Q2 = (_aligned_polar(torch.from_numpy(Nd + noise())).numpy() for _ in range(2))
    np.testing.assert_allclose(Q1 @ Q1.T, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(Q1 @ Z[:, :3], W[:, :3], atol=1e-10)
    assert np.abs(Q1 - Q2).max() < 1e-8
    P1, P2 = (polar(Nd + noise())[0] for _ in range(2))  # scipy's plain polar factor
    assert np.abs(P1 - P2).max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_rounding_against_its_closed_form(dtype):
    """``S x^6 / (x^6 + 1)``, ``x = S / (eps^(3/4) max S)``, evaluated in numpy float64: values
    above 3 tau move by less than 0.14%, a rounding-level value becomes eps^(5/2) max S, and large
    float32 values (where ``S x^6`` overflows) stay finite."""
    from odelora.geometry import drop_rounding

    eps = torch.finfo(dtype).eps
    big = 1e30 if dtype == torch.float32 else 1e200
    for top in (1.0, big):
        tau = eps**0.75 * top
        S = np.array([top, 0.5 * top, 10 * tau, 3 * tau, tau, eps * top, 0.0])
        x6 = (S / tau) ** 6
        expect = S * x6 / (x6 + 1)
        got = drop_rounding(torch.tensor(S, dtype=dtype)).double().numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expect, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        assert abs(got[3] / S[3] - 1) < 1.4e-3 and got[5] <= 1.01 * eps**2.5 * top
        # values continuing carried directions: tau (1 - carried)
        carried = np.array([1.0, 0.0, 0.5, 1.0, 0.9, 1.0, 1.0])
        ratio = np.divide(tau * (1 - carried), S, out=np.full_like(S, np.inf), where=S > 0)  # 1 / x
        expect = S / (1 + ratio**6)
        got = drop_rounding(torch.tensor(S, dtype=dtype), torch.tensor(carried, dtype=dtype)).double().numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert torch.equal(drop_rounding(torch.zeros(3, dtype=dtype)), torch.zeros(3, dtype=dtype))
    assert torch.equal(drop_rounding(torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)), torch.zeros(3, dtype=dtype))
    # above 512 tau nothing moves, whatever is carried: callers skip computing it
    from odelora.geometry import reaches_rounding

    S = torch.logspace(0, math.log10(513 * eps**0.75), 50, dtype=dtype)
    assert not reaches_rounding(S) and reaches_rounding(torch.cat([S, S[-1:] / 2]))
    for carried in (None, torch.zeros_like(S), torch.rand(50, dtype=dtype)):
        assert torch.equal(drop_rounding(S, carried), S)


def test_tall_products_and_column_concatenation_are_the_plain_ones_in_column_major_layout():
    """``tall_mm`` and ``cat_columns`` return ``a @ b`` and ``torch.cat(.., -1)`` (numpy as the
    reference), laid out column-major, whatever the inputs' layouts."""
    from odelora.geometry import cat_columns, tall_mm

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    for x in (a, a.mT.contiguous().mT):
        out = tall_mm(x, b)
        np.testing.assert_allclose(out.numpy(), np.matmul(a.numpy(), b.numpy()), rtol=1e-12, atol=1e-12)
        assert out.mT.is_contiguous()
    parts = [a, tall_mm(a, b), torch.randn(3, 50, 2, generator=g, dtype=torch.float64)]
    out = cat_columns(parts)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([p.numpy() for p in parts], -1))
    assert out.mT.is_contiguous()


# a block whose lost direction is spread over several columns, exact in float32: x, three multiples
# of x, and a rank-2 part at 2^-26 where x is zero. Its first Cholesky QR pass is off from
# orthonormal by at most 0.47 entry by entry, yet nearly singular (largest row sum 1.14)
SPREAD_X = np.array([2, -7, 0, 4, -6, 6, 5, -5, -3, -8, -5, 1, -1, -5, -4, -5, -4, 7, -6, 1, -5, 2, -7, 2, 6, -8, -3, 3, -3, 1,
                     6, -5, 5, 7, 2, 0, 7, -4, -3, -1.0])
SPREAD_P = np.array([[-2, 23, 19], [-23, 26, -20], [-1, -17, -19], [-12, 15, -9], [13, -73, -47], [-19, 34, -4], [27, 9, 63],
                     [-9, -24, -42], [-20, -46, -86], [20, 67, 107], [21, -108, -66], [30, 12, 72.0]])  # rank 2
SPREAD = np.block([[SPREAD_X[:, None], np.outer(SPREAD_X, [-2, -4, 2])], [np.zeros((12, 1)), 2.0**-26 * SPREAD_P]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["plain", "scaled columns", "ill-conditioned", "rank-deficient", "spread defect", "zero column",
                                  "orthonormal plus small", "wide"])
def test_cholesky_qr_is_a_qr_and_falls_back_where_it_would_not_be(case, dtype, rng, monkeypatch):
    """``geometry.qr`` on the devices that use Cholesky QR (the CPU here): Q orthonormal to the
    dtype's rounding, Q R = X, and Q's span that of numpy's QR, in every case; well-conditioned
    blocks take one pass, ill-conditioned ones two, blocks it cannot factor fall back to Householder."""
    from odelora import geometry

    monkeypatch.setattr(geometry, "CHOLESKY_QR_DEVICES", {"cpu"})
    householder, passes = [], []
    plain_qr, one_pass = torch.linalg.qr, geometry._cholesky_qr
    monkeypatch.setattr(geometry.torch.linalg, "qr", lambda X: householder.append(1) or plain_qr(X))
    monkeypatch.setattr(geometry, "_cholesky_qr", lambda X: passes.append(1) or one_pass(X))
    k, m, c = 5, 60, 6
    X = rng.standard_normal((k, m, c))
    if case == "scaled columns":  # column norms from 1 to 1e-14 (a step's velocity next to an orthonormal basis)
        X *= np.logspace(0, -14, c)
    if case == "ill-conditioned":  # singular values 1 to 1e-6 (float64) or 1e-5 (float32), mixed over the columns
        U, V = np.linalg.qr(X)[0], np.linalg.qr(rng.standard_normal((k, c, c)))[0]
        X = (U * np.logspace(0, -6 if dtype == torch.float64 else -5, c)) @ np.swapaxes(V, -1, -2)
    if case == "rank-deficient":
        X[1, :, 5] = X[1, :, 0] - 2 * X[1, :, 3]
    if case == "spread defect":
        X = SPREAD[None]
    if case == "zero column":
        X[2, :, 4] = 0
    if case == "orthonormal plus small":  # [U, L] with L nearly inside span(U)
        U = np.linalg.qr(rng.standard_normal((k, m, 3)))[0]
        X = np.concatenate([U, U @ rng.standard_normal((k, 3, 3)) + 1e-9 * rng.standard_normal((k, m, 3))], -1)
    if case == "wide":
        X = X[:, :4]
    Xt = torch.tensor(X, dtype=dtype)
    Q, R = geometry.qr(Xt)
    Qn, Rn, Xn = Q.double().numpy(), R.double().numpy(), Xt.double().numpy()
    eps = torch.finfo(dtype).eps
    cols = Qn.shape[-1]
    assert np.abs(np.swapaxes(Qn, -1, -2) @ Qn - np.eye(cols)).max() <= 4 * cols * eps
    assert np.linalg.norm(Qn @ Rn - Xn) <= 4 * cols * eps * np.linalg.norm(Xn)
    if case in ("plain", "scaled columns", "ill-conditioned"):  # full rank: the same column space as numpy's QR
        Qref = np.linalg.qr(Xn)[0]
        for i in range(k):
            np.testing.assert_allclose(Qn[i] @ (Qn[i].T @ Qref[i]), Qref[i], atol=100 * eps)
        assert not householder and len(passes) == (2 if case == "ill-conditioned" else 1), (len(householder), len(passes))
    if case in ("zero column", "wide", "spread defect"):
        assert householder

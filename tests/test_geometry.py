import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from odelora.geometry import balance, imbalance, tangent_project

from conftest import projection_reference, random_factor


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(1, 6), seed=st.integers(0, 2**31), logc=st.floats(0, 4))
def test_balance_keeps_product_and_balances(m, n, r, seed, logc):
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    B = random_factor(rng, m, r, 10**logc) * rng.uniform(0.01, 100)
    A = random_factor(rng, n, r, 10**logc).T * rng.uniform(0.01, 100)
    Bb, Ab = balance(torch.from_numpy(B), torch.from_numpy(A))
    Bb, Ab = Bb.numpy(), Ab.numpy()
    X = B @ A
    assert np.linalg.norm(Bb @ Ab - X) <= 1e-12 * np.linalg.norm(X)
    MB, MA = Bb.T @ Bb, Ab @ Ab.T
    assert np.linalg.norm(MB - MA) <= 1e-12 * np.linalg.norm(MB)
    # both Gram matrices are diag(singular values of X) (scipy-independent check via numpy SVD)
    sv = np.linalg.svd(X, compute_uv=False)[:r]
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(MB))[::-1], sv, rtol=1e-10, atol=1e-12 * sv[0])


def test_balance_batched_and_dtype(rng):
    B = torch.from_numpy(rng.standard_normal((5, 12, 3)))
    A = torch.from_numpy(rng.standard_normal((5, 3, 9)))
    Bb, Ab = balance(B, A)
    for i in range(5):
        b1, a1 = balance(B[i], A[i])
        torch.testing.assert_close(Bb[i] @ Ab[i], b1 @ a1)
    Bh, Ah = balance(B.bfloat16(), A.bfloat16())
    assert Bh.dtype == torch.bfloat16 and Ah.dtype == torch.bfloat16
    assert float(imbalance(Bh, Ah).max()) < 2e-2


def test_balance_skip_deficient_keeps_zero_start(rng):
    B = torch.zeros(8, 2, dtype=torch.float64)
    A = torch.from_numpy(rng.standard_normal((2, 6)))
    Bb, Ab = balance(B, A)
    assert float(Ab.abs().max()) == 0.0  # the plain retraction erases A here
    Bs, As = balance(B, A, skip_deficient=True)
    assert torch.equal(Bs, B) and torch.equal(As, A)


def test_imbalance_values(rng):
    B = torch.from_numpy(rng.standard_normal((7, 2)))
    A = torch.from_numpy(rng.standard_normal((2, 5)))
    MB, MA = B.T @ B, A @ A.T
    expected = np.linalg.norm((MB - MA).numpy()) / max(np.linalg.norm(MB.numpy()), np.linalg.norm(MA.numpy()))
    assert abs(float(imbalance(B, A)) - expected) < 1e-14
    assert float(imbalance(*balance(B, A))) < 1e-14
    assert float(imbalance(torch.zeros(3, 2), torch.zeros(2, 4))) == 0.0


def test_tangent_project_matches_reference(rng):
    B, A = rng.standard_normal((9, 3)), rng.standard_normal((3, 11))
    G = rng.standard_normal((9, 11))
    P = tangent_project(*(torch.from_numpy(x) for x in (G, B, A))).numpy()
    np.testing.assert_allclose(P, projection_reference(G, B, A), atol=1e-12)

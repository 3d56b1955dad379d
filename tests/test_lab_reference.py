"""The lab's exact reference: an independent numpy balanced flow (from the formula in docs/math.md) checked
against closed-form properties, and scipy's solution of it."""

import numpy as np

from odelora.lab.reference import balanced_velocity, exact_balanced_flow
from conftest import projection_reference, random_factor


def balanced_factors(rng, m, n, r, cond):
    """B = U S^1/2, A = S^1/2 V^T for a rank-r product with singular values from 1 to 1/cond."""
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    root = np.sqrt(np.logspace(0, -np.log10(cond), r))
    return U * root, root[:, None] * V.T


def test_numpy_balanced_flow_moves_the_product_by_the_tangent_projection(rng):
    m, n, r, s = 9, 7, 3, 0.7
    for cond in (1.0, 1e3):
        B, A = random_factor(rng, m, r, cond), random_factor(rng, n, r, cond).T  # any full-rank factors
        G = rng.standard_normal((m, n))
        dB, dA = balanced_velocity(B, A, G, s)
        assert np.allclose(s * (dB @ A + B @ dA), -projection_reference(G, B, A), atol=1e-9 * cond)
        B, A = balanced_factors(rng, m, n, r, cond)  # balanced factors stay balanced
        dB, dA = balanced_velocity(B, A, G, s)
        assert np.abs(dB.T @ B + B.T @ dB - dA @ A.T - A @ dA.T).max() <= 1e-9 * cond


def test_exact_flow_descends_and_stays_balanced(rng):
    m, n, r = 6, 5, 2
    Y = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    B0, A0 = balanced_factors(rng, m, n, r, 10.0)
    B1, A1 = exact_balanced_flow(lambda W: W - Y, B0, A0, 3.0)
    loss = lambda B, A: 0.5 * np.sum((B @ A - Y) ** 2)
    assert loss(B1, A1) < 1e-2 * loss(B0, A0)
    assert np.allclose(B1.T @ B1, A1 @ A1.T, atol=1e-8)

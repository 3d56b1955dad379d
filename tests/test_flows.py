import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import odelora
from odelora import flows

from conftest import damped_projection_reference, projection_reference, random_factor


def grads(G, B, A, s):
    """LoRA gradients of L with dL/dW = G for W = W0 + s B A."""
    return s * G @ A.T, s * B.T @ G


def balanced_factors(rng, m, n, r, cond):
    """Balanced factors whose condition number is `cond` (product condition cond**2)."""
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    sv = np.logspace(0, -np.log10(cond), r) * rng.uniform(0.1, 10)
    return U * sv, (V * sv).T


def product_velocity(flow, B, A, G, s=1.0, **kw):
    dB, dA = flows.get_flow(flow)(*(torch.from_numpy(x) for x in (B, A, *grads(G, B, A, s))), scale=s, **kw)
    return s * (dB.numpy() @ A + B @ dA.numpy()), dB.numpy(), dA.numpy()


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8), logc=st.floats(0, 12),
    logs=st.floats(-2, 2), seed=st.integers(0, 2**31), balanced=st.booleans(),
)
def test_balanced_product_velocity_is_the_damped_projection(m, n, r, logc, logs, seed, balanced):
    """s (dB A + B dA) = -P(G) with the projectors taken from the factors' own SVDs and damped
    (a numpy reference), for any conditioning; in the regular regime that is the exact tangent
    projection; and the velocity never exceeds |G| (the damped projection is a contraction)."""
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    s = 10**logs
    if balanced:
        B, A = balanced_factors(rng, m, n, r, 10**logc)
    else:
        B, A = random_factor(rng, m, r, 10**logc), random_factor(rng, n, r, 10 ** (logc / 2)).T
    G = rng.standard_normal((m, n))
    # The gauge term moves only the factorization; for far-from-balanced, ill-conditioned factors
    # it is huge and the product would be read off through cancellation, so leave it out there.
    dX, _, _ = product_velocity("balanced", B, A, G, s, gauge=balanced)
    eps = np.finfo(np.float64).eps
    P = damped_projection_reference(G, B, A, eps)
    tol = 1e-10 if logc <= 4 else 1e-6  # past cond 1e4 the filter weights carry sqrt(eps) errors
    assert np.linalg.norm(dX + P) <= tol * np.linalg.norm(G)
    assert np.linalg.norm(dX) <= (1 + tol) * np.linalg.norm(G)
    if logc <= 3:
        assert np.linalg.norm(dX + projection_reference(G, B, A)) <= 1e-9 * np.linalg.norm(G)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8), logc=st.floats(0, 3), seed=st.integers(0, 2**31))
def test_balanced_gauge_keeps_balance(m, n, r, logc, seed):
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    B, A = balanced_factors(rng, m, n, r, 10**logc)
    G = rng.standard_normal((m, n))
    _, dB, dA = product_velocity("balanced", B, A, G)
    d_imb = dB.T @ B + B.T @ dB - dA @ A.T - A @ dA.T  # d/dt (B.T B - A A.T)
    assert np.linalg.norm(d_imb) <= 1e-10 * np.linalg.norm(dB) * np.linalg.norm(B) + 1e-300
    _, dB0, dA0 = product_velocity("balanced", B, A, G, gauge=False)  # the gauge moves only the factorization
    np.testing.assert_allclose(dB0 @ A + B @ dA0, dB @ A + B @ dA, atol=1e-10 * np.linalg.norm(G))


def test_velocity_is_continuous_as_a_singular_value_vanishes(rng):
    """One singular value of B slides from 0.3 to exactly 0: the product velocity moves smoothly
    to the rank-deficient rule, with no jump at any threshold and no blow-up on the way."""
    m, n, r = 12, 10, 3
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    A = rng.standard_normal((r, n))
    G = rng.standard_normal((m, n))
    ts = np.concatenate([np.logspace(np.log10(0.3), -20, 400), [0.0]])
    vs = [product_velocity("balanced", U * np.array([1.0, 0.5, t]), A, G)[0] for t in ts]
    steps = [np.linalg.norm(a - b) for a, b in zip(vs[:-1], vs[1:])]
    assert max(np.linalg.norm(v) for v in vs) <= (1 + 1e-10) * np.linalg.norm(G)
    assert max(steps) < 0.05 * np.linalg.norm(G)
    assert np.linalg.norm(vs[-2] - vs[-1]) < 1e-6 * np.linalg.norm(G)  # t = 1e-20 is already the limit


def test_scaled_and_gradient_closed_forms(rng):
    m, n, r, s, damp = 12, 7, 3, 0.5, 1e-3
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    G = rng.standard_normal((m, n))
    gB, gA = grads(G, B, A, s)
    tB, tA, tgB, tgA = (torch.from_numpy(x) for x in (B, A, gB, gA))
    dB, dA = flows.gradient(tB, tA, tgB, tgA, scale=s)
    np.testing.assert_array_equal(dB.numpy(), -gB)
    np.testing.assert_array_equal(dA.numpy(), -gA)
    MA, MB = A @ A.T, B.T @ B
    dB, dA = flows.scaled(tB, tA, tgB, tgA, scale=s, damping=damp)
    eye = np.eye(r)  # damping relative to the largest eigenvalue of each Gram matrix
    lamA, lamB = damp * np.linalg.eigvalsh(MA).max(), damp * np.linalg.eigvalsh(MB).max()
    np.testing.assert_allclose(dB.numpy(), -gB / s**2 @ np.linalg.inv(MA + lamA * eye), rtol=1e-10)
    np.testing.assert_allclose(dA.numpy(), -np.linalg.inv(MB + lamB * eye) @ gA / s**2, rtol=1e-10)
    # undamped: the product moves by -(PU G + G PV), which counts PU G PV twice
    dB, dA = flows.scaled(tB, tA, tgB, tgA, scale=s, damping=0.0)
    U = np.linalg.svd(B, full_matrices=False)[0]
    V = np.linalg.svd(A.T, full_matrices=False)[0]
    expected = -(U @ U.T @ G + G @ V @ V.T)
    np.testing.assert_allclose(s * (dB.numpy() @ A + B @ dA.numpy()), expected, atol=1e-10)


@pytest.mark.parametrize("flow", ["balanced", "scaled"])
def test_zero_B_start_follows_known_row_space(flow, rng):
    """At PEFT's start (B = 0, float64) A's velocity is zero and the product moves by
    ``s dB A = -G PV`` (LoRA-Pro's first step), PV the projector on A's row space from numpy's SVD:
    the balanced flow's ``-P(G)`` and the scaled flow's ``-(PU G + G PV)`` both reduce to it, since
    B's column space is empty (PU = 0). The scaled flow's damping ``eps * max(MA)`` changes this by
    a relative ``eps cond(A)^2``, far below 1e-12."""
    m, n, r, s = 10, 6, 2, 2.0
    B, A = np.zeros((m, r)), rng.standard_normal((r, n))
    G = rng.standard_normal((m, n))
    gB, gA = grads(G, B, A, s)
    dB, dA = flows.get_flow(flow)(*(torch.from_numpy(x) for x in (B, A, gB, gA)), scale=s)
    assert torch.isfinite(dB).all() and torch.isfinite(dA).all()
    np.testing.assert_array_equal(dA.numpy(), 0.0)
    V = np.linalg.svd(A.T, full_matrices=False)[0]
    np.testing.assert_allclose(s * dB.numpy() @ A, -G @ V @ V.T, atol=1e-12)


def test_zero_A_and_both_zero_are_finite(rng):
    m, n, r = 8, 5, 2
    B, A = rng.standard_normal((m, r)), np.zeros((r, n))
    G = rng.standard_normal((m, n))
    dB, dA = flows.balanced(*(torch.from_numpy(x) for x in (B, A, *grads(G, B, A, 1.0))))
    np.testing.assert_array_equal(dB.numpy(), 0.0)
    U = np.linalg.svd(B, full_matrices=False)[0]
    np.testing.assert_allclose(B @ dA.numpy(), -U @ U.T @ G, atol=1e-12)
    Z = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
    for name in flows.FLOWS:
        dB, dA = flows.get_flow(name)(*Z, *Z)
        assert torch.equal(dB, torch.zeros_like(dB)) and torch.equal(dA, torch.zeros_like(dA))


def test_batched_pairs_with_own_scales_match_single_calls(rng):
    k, m, n, r = 4, 9, 6, 2
    B = torch.from_numpy(rng.standard_normal((k, m, r)))
    A = torch.from_numpy(rng.standard_normal((k, r, n)))
    B[1].zero_()  # a deficient pair in the batch
    gB, gA = torch.from_numpy(rng.standard_normal((k, m, r))), torch.from_numpy(rng.standard_normal((k, r, n)))
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    for name in flows.FLOWS:
        dB, dA = flows.get_flow(name)(B, A, gB, gA, scale=scales)
        for i in range(k):
            eB, eA = flows.get_flow(name)(B[i], A[i], gB[i], gA[i], scale=float(scales[i]))
            torch.testing.assert_close(dB[i], eB, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dA[i], eA, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_inputs_work_in_float32(dtype, rng):
    B, A = (torch.from_numpy(x) for x in balanced_factors(rng, 16, 12, 3, 10))
    G = torch.from_numpy(rng.standard_normal((16, 12)))
    gB, gA = grads(G, B, A, 1.0)
    dB, dA = flows.balanced(B.to(dtype), A.to(dtype), gB.to(dtype), gA.to(dtype))
    assert dB.dtype == torch.float32 and dA.dtype == torch.float32
    P = projection_reference(G.numpy(), B.numpy(), A.numpy())
    got = (dB.double() @ A + B @ dA.double()).numpy()
    tol = {torch.bfloat16: 0.05, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    assert np.linalg.norm(got + P) <= tol * np.linalg.norm(P)


def test_public_signatures_and_errors():
    for f in (flows.gradient, flows.scaled, flows.balanced):
        params = inspect.signature(f.fn).parameters
        assert list(params)[:4] == ["B", "A", "gB", "gA"]
        assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY and params["scale"].default == 1.0
    assert callable(odelora.geometry.balance) and odelora.ODELoRA is odelora.optim.ODELoRA
    with pytest.raises(ValueError, match="not a LoRA pair"):
        flows.balanced(torch.zeros(4, 2), torch.zeros(3, 5), torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown flow"):
        flows.get_flow("nope")
    assert flows.balanced.uses_frame and flows.balanced.retraction == "truncate" and flows.gradient.retraction == "none"
    custom = flows.get_flow(lambda B, A, gB, gA, *, scale=1.0: (-gB, -gA))
    assert not custom.uses_frame and not custom.has_gauge


def test_rank_above_a_dimension_is_deficient_not_an_error(rng):
    """A layer with one input and r = 2 (PINN first layers): A is (2, 1) and can never have rank 2."""
    B, A = rng.standard_normal((6, 2)), rng.standard_normal((2, 1))
    G = rng.standard_normal((6, 1))
    dB, dA = flows.balanced(*(torch.from_numpy(x) for x in (B, A, *grads(G, B, A, 1.0))))
    assert torch.isfinite(dB).all() and torch.isfinite(dA).all()
    step = (dB.numpy() @ A + B @ dA.numpy())
    assert np.sum(step * G) < 0  # still a descent direction for the product
    np.testing.assert_allclose(step, -damped_projection_reference(G, B, A, np.finfo(float).eps), atol=1e-12)


def _closed_form_balanced(B, A, G, s):
    """The balanced flow's factor velocities (docs/math.md section 2) in numpy with pseudo-inverses
    on the nonzero singular directions: zero along directions where the factors are zero."""
    hB, hA = (s * G @ A.T) / s**2, (s * B.T @ G) / s**2
    MB, MA = B.T @ B, A @ A.T
    MBi, MAi = (np.linalg.pinv(M, rcond=1e-10, hermitian=True) for M in (MB, MA))
    C = MBi @ B.T @ hB @ MAi
    lam, Q = np.linalg.eigh(0.5 * (MA + MB))
    Om = Q.T @ (C - C.T) @ Q
    den = lam[:, None] + lam[None, :]
    E = np.where(den > 1e-10 * lam.max(), Om * (lam[None, :] - lam[:, None]) / (2 * np.where(den > 0, den, 1)), 0)
    Gam = C / 2 + Q @ E @ Q.T / 2
    return -(np.eye(B.shape[0]) - B @ MBi @ B.T) @ hB @ MAi - B @ Gam, -MBi @ hA + Gam @ A


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_factor_velocities_vanish_where_the_factors_do(dtype, tol, rng):
    """Balanced factors of a rank-2 product with r = 4 (what a rank-2 update leaves): the
    gradient's components along the factors' null directions are rounding noise, which the
    factor-form velocities (the Adam path, factor-space retractions) must not magnify."""
    m, n, r, s = 12, 10, 4, 1.5
    U, V = (np.linalg.qr(rng.standard_normal((k, r)))[0] for k in (m, n))
    Q = np.linalg.qr(rng.standard_normal((r, r)))[0]
    root = np.sqrt([1.0, 0.5, 0.0, 0.0])
    B, A = (U * root) @ Q, Q.T @ (root[:, None] * V.T)
    G = rng.standard_normal((m, n))
    dB_ref, dA_ref = _closed_form_balanced(B, A, G, s)
    t = lambda x: torch.tensor(x, dtype=dtype)
    dB, dA = flows.balanced(t(B), t(A), *(t(g) for g in grads(G, B, A, s)), scale=s)
    for got, ref in ((dB, dB_ref), (dA, dA_ref)):
        assert np.linalg.norm(got.double().numpy() - ref) <= tol * np.linalg.norm(ref)

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import odelora
from odelora import flows
from odelora.geometry import balance

from conftest import projection_reference, random_factor


def grads(G, B, A, s):
    """LoRA gradients of L with dL/dW = G for W = W0 + s B A."""
    return s * G @ A.T, s * B.T @ G


def balanced_factors(rng, m, n, r, cond):
    """Balanced factors whose condition number is `cond` (product condition cond**2)."""
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    sv = np.logspace(0, -np.log10(cond), r) * rng.uniform(0.1, 10)
    return U * sv, (V * sv).T


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8), logc=st.floats(0, 6),
    logs=st.floats(-2, 2), seed=st.integers(0, 2**31),
)
def test_balanced_product_velocity_is_tangent_projection(m, n, r, logc, logs, seed):
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    s = 10**logs
    B, A = balanced_factors(rng, m, n, r, 10**logc)
    G = rng.standard_normal((m, n))
    gB, gA = grads(G, B, A, s)
    dB, dA = (t.numpy() for t in flows.balanced(*(torch.from_numpy(x) for x in (B, A, gB, gA)), scale=s))
    P = projection_reference(G, B, A)
    assert np.linalg.norm(s * (dB @ A + B @ dA) + P) <= 1e-10 * np.linalg.norm(P)
    # the gauge keeps B.T B - A A.T constant: its time derivative vanishes
    d_imb = dB.T @ B + B.T @ dB - dA @ A.T - A @ dA.T
    assert np.linalg.norm(d_imb) <= 1e-10 * np.linalg.norm(dB) * np.linalg.norm(B) + 1e-300


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(1, 6), logc=st.floats(0, 3), seed=st.integers(0, 2**31))
def test_balanced_identity_holds_for_unbalanced_factors(m, n, r, logc, seed):
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    B, A = random_factor(rng, m, r, 10**logc), random_factor(rng, n, r, 10**logc).T
    G = rng.standard_normal((m, n))
    dB, dA = (t.numpy() for t in flows.balanced(*(torch.from_numpy(x) for x in (B, A, *grads(G, B, A, 1.0)))))
    P = projection_reference(G, B, A)
    assert np.linalg.norm(dB @ A + B @ dA + P) <= 1e-10 * np.linalg.norm(P)


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
    eye = np.eye(r)
    np.testing.assert_allclose(dB.numpy(), -gB / s**2 @ np.linalg.inv(MA + damp * np.trace(MA) / r * eye), rtol=1e-10)
    np.testing.assert_allclose(dA.numpy(), -np.linalg.inv(MB + damp * np.trace(MB) / r * eye) @ gA / s**2, rtol=1e-10)
    # undamped: the product moves by -(PU G + G PV), which counts PU G PV twice
    dB, dA = flows.scaled(tB, tA, tgB, tgA, scale=s, damping=0.0)
    U = np.linalg.svd(B, full_matrices=False)[0]
    V = np.linalg.svd(A.T, full_matrices=False)[0]
    expected = -(U @ U.T @ G + G @ V @ V.T)
    np.testing.assert_allclose(s * (dB.numpy() @ A + B @ dA.numpy()), expected, atol=1e-10)


@pytest.mark.parametrize("flow", ["balanced", "scaled"])
def test_zero_B_start_follows_known_row_space(flow, rng):
    m, n, r, s = 10, 6, 2, 2.0
    B, A = np.zeros((m, r)), rng.standard_normal((r, n))
    G = rng.standard_normal((m, n))
    gB, gA = grads(G, B, A, s)
    dB, dA = flows.get_flow(flow)(*(torch.from_numpy(x) for x in (B, A, gB, gA)), scale=s)
    assert torch.isfinite(dB).all() and torch.isfinite(dA).all()
    np.testing.assert_array_equal(dA.numpy(), 0.0)
    if flow == "balanced":  # dX = -G PV: LoRA-Pro's first step
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
    B[1].zero_()  # one deficient pair in the batch takes its own rule
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
        params = inspect.signature(f).parameters
        assert list(params)[:4] == ["B", "A", "gB", "gA"]
        assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY and params["scale"].default == 1.0
    assert callable(odelora.geometry.balance) and odelora.ODELoRA is odelora.optim.ODELoRA
    with pytest.raises(ValueError, match="not a LoRA pair"):
        flows.balanced(torch.zeros(4, 2), torch.zeros(3, 5), torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown flow"):
        flows.get_flow("nope")


def test_rank_above_a_dimension_is_deficient_not_an_error(rng):
    """A layer with one input and r = 2 (PINN first layers): A is (2, 1) and can never have rank 2."""
    B, A = rng.standard_normal((6, 2)), rng.standard_normal((2, 1))
    G = rng.standard_normal((6, 1))
    dB, dA = flows.balanced(*(torch.from_numpy(x) for x in (B, A, *grads(G, B, A, 1.0))))
    assert torch.isfinite(dB).all() and torch.isfinite(dA).all()
    step = (dB.numpy() @ A + B @ dA.numpy())
    assert np.sum(step * G) < 0  # still a descent direction for the product
    Bt, At = torch.from_numpy(B), torch.from_numpy(A)
    assert balance(Bt, At, skip_deficient=True)[0] is Bt
    with pytest.raises(ValueError, match="r > min"):
        balance(Bt, At)

"""Steps on the rank-r matrices (the "truncate" and "split" retractions) against dense references:
exact Euler steps, the orders of projected Runge-Kutta methods against scipy, and the bound on how
far a step moves the product, which holds however small the singular values are."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import orthogonal_procrustes

from odelora import flows
from odelora.geometry import balance
from odelora.integrators import Stage, get_tableau, integrate, rk_step
from odelora.retractions import Factors, get_retraction

from conftest import projection_reference


def state(B, A, s=1.0):
    return [Factors(torch.as_tensor(B)[None], torch.as_tensor(A)[None], torch.tensor([s], dtype=torch.as_tensor(B).dtype))]


def field_for(grad, flow="balanced"):
    """Velocities of `flow` for the loss whose gradient in W is grad(X), X = s B A."""

    def f(y):
        out = []
        for x in y:
            X = x.scale[:, None, None] * x.B @ x.A
            G = grad(X)
            gB, gA = x.scale[:, None, None] * G @ x.A.mT, x.scale[:, None, None] * x.B.mT @ G
            kw = {"frame": x.ensure_frame()} if flows.get_flow(flow).uses_frame else {}
            out.append(flows.get_flow(flow)(x.B, x.A, gB, gA, scale=x.scale, **kw))
        return out

    return f


def dense_truncation(Y, r):
    u, s, vt = np.linalg.svd(Y)
    return (u[:, :r] * s[:r]) @ vt[:r]


def dense_split(Y, A0):
    """P_U1 Y with U1 an orthonormal basis of Y V0, V0 the row space of A0 (numpy)."""
    V0 = np.linalg.qr(A0.T)[0]
    U1 = np.linalg.qr(Y @ V0)[0]
    return U1 @ (U1.T @ Y)


@pytest.mark.parametrize("balanced", [True, False])
def test_euler_step_is_the_truncated_projected_gradient_step(balanced, rng):
    m, n, r, s, h = 12, 9, 3, 2.0, 0.3
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    if balanced:
        B, A = (t.numpy() for t in balance(torch.from_numpy(B), torch.from_numpy(A)))
    G = rng.standard_normal((m, n))
    y0 = state(B, A, s)
    f = field_for(lambda X: torch.from_numpy(G))
    y1, _ = rk_step(f, y0, [h], get_tableau("euler"), get_retraction("truncate"))
    X1 = s * (y1[0].B[0] @ y1[0].A[0]).numpy()
    expected = dense_truncation(s * B @ A - h * projection_reference(G, B, A), r)
    np.testing.assert_allclose(X1, expected, atol=1e-12 * np.linalg.norm(expected))
    # balanced, and the balanced factorization closest to the factors it started from
    B1, A1 = y1[0].B[0].numpy(), y1[0].A[0].numpy()
    np.testing.assert_allclose(B1.T @ B1, A1 @ A1.T, atol=1e-12 * np.linalg.norm(B1) ** 2)
    U, S, Vt = np.linalg.svd(X1 / s, full_matrices=False)
    left = np.vstack([U[:, :r] * np.sqrt(S[:r]), Vt[:r].T * np.sqrt(S[:r])])
    Q, _ = orthogonal_procrustes(left, np.vstack([B, A.T]))
    np.testing.assert_allclose(B1, left[:m] @ Q, atol=1e-10)


@pytest.mark.parametrize("deficient", [False, True])
def test_split_euler_step_is_the_one_sided_projection(deficient, rng):
    """The "split" Euler step is P_U1 (X0 - h P(G)), U1 = orth((X0 - h P(G)) V0), also from B = 0
    with a rank-1 gradient (where Y V0 is rank-deficient): factors balanced, bound 2 h |P(G)|."""
    m, n, r, s, h = 12, 9, 3, 2.0, 0.3
    A = rng.standard_normal((r, n))
    if deficient:
        B = np.zeros((m, r))
        G = np.outer(rng.standard_normal(m), rng.standard_normal(n))
    else:
        B, A = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(A)))
        G = rng.standard_normal((m, n))
    y1, _ = rk_step(field_for(lambda X: torch.from_numpy(G)), state(B, A, s), [h], get_tableau("euler"), get_retraction("split"))
    X1 = s * (y1[0].B[0] @ y1[0].A[0]).numpy()
    PG = projection_reference(G, B, A) if not deficient else G @ np.linalg.pinv(A) @ A  # B = 0: -G PV
    Y = s * B @ A - h * PG
    expected = dense_split(Y, A)
    np.testing.assert_allclose(X1, expected, atol=1e-12 * max(1.0, np.linalg.norm(expected)))
    assert np.linalg.norm(X1 - s * B @ A) <= 2 * h * np.linalg.norm(PG) * (1 + 1e-12)
    B1, A1 = y1[0].B[0].numpy(), y1[0].A[0].numpy()
    np.testing.assert_allclose(B1.T @ B1, A1 @ A1.T, atol=1e-12 * max(1.0, np.linalg.norm(B1) ** 2))


def projected_flow_numpy(Y, r):
    """Independent dense implementation of dX/dt = -P_X(X - Y) on the rank-r matrices."""
    m, n = Y.shape

    def f(t, z):
        X = z.reshape(m, n)
        U, _, Vt = np.linalg.svd(X)
        U, V = U[:, :r], Vt[:r].T
        G = X - Y
        return -(U @ U.T @ G + G @ V @ V.T - U @ U.T @ G @ V @ V.T).ravel()

    return f


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "rk4"])
def test_projected_runge_kutta_orders_against_scipy(method, retraction, rng):
    m, n, r, T = 8, 6, 2, 1.0
    Y = rng.standard_normal((m, n))
    B0, A0 = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    X0 = B0 @ A0
    ref = solve_ivp(projected_flow_numpy(Y, r), (0, T), X0.ravel(), method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1].reshape(m, n)
    Yt = torch.from_numpy(Y)
    order = get_tableau(method).order
    hs = [T / k for k in ((4, 8, 16, 32) if order == 4 else (16, 32, 64, 128))]
    errs = []
    for h in hs:
        res = integrate(field_for(lambda X: X - Yt), state(B0, A0), (0, T), method=method, h=h, space=get_retraction(retraction))
        x = res.y[0]
        errs.append(np.linalg.norm((x.B[0] @ x.A[0]).numpy() - ref))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (method, slope, errs)


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("method", ["bs32", "dopri5"])
def test_projected_adaptive_pairs_meet_their_tolerance(method, retraction, rng):
    m, n, r, T = 8, 6, 2, 1.0
    Y = rng.standard_normal((m, n))
    B0, A0 = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    ref = solve_ivp(projected_flow_numpy(Y, r), (0, T), (B0 @ A0).ravel(), method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1].reshape(m, n)
    Yt = torch.from_numpy(Y)
    errs = []
    for rtol in (1e-4, 1e-7):
        res = integrate(field_for(lambda X: X - Yt), state(B0, A0), (0, T), method=method, rtol=rtol, atol=rtol * 1e-2, space=get_retraction(retraction))
        x = res.y[0]
        errs.append(np.linalg.norm((x.B[0] @ x.A[0]).numpy() - ref) / np.linalg.norm(ref))
        assert res.stats.accepted > 0
    assert errs[0] < 100 * 1e-4 and errs[1] < 100 * 1e-7 and errs[1] < errs[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_a_step_moves_the_product_by_at_most_2h_G_near_rank_deficiency(method, dtype, rng):
    """Factors with singular values down to 1e-14 and a rank-1 gradient (a batch of one): with the
    truncation retraction |X1 - X0| <= 2 h sum_j |b_j| |G_j| whatever the singular values; the
    factor-space step of the same flow overshoots by orders of magnitude (the h^2 dB dA term)."""
    m, n, r, h = 20, 16, 4, 0.5
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    sv = np.array([1.0, 1e-3, 1e-8, 1e-14])
    B, A = U * np.sqrt(sv), (V * np.sqrt(sv)).T
    g = rng.standard_normal(m)[:, None] * rng.standard_normal(n)[None, :]  # rank-1 gradient
    Gt = torch.from_numpy(g).to(dtype)
    y0 = state(torch.from_numpy(B).to(dtype), torch.from_numpy(A).to(dtype))
    tab = get_tableau(method)
    bound = 2 * h * sum(abs(b) for b in tab.b) * np.linalg.norm(g)
    moves = {}
    for name in ("truncate", "split", "none"):
        y1, _ = rk_step(field_for(lambda X: Gt), y0, [h], tab, get_retraction(name))
        X1 = (y1[0].B[0].double() @ y1[0].A[0].double()).numpy()
        moves[name] = np.linalg.norm(X1 - B @ A)
    assert moves["truncate"] <= bound * (1 + 1e-5)
    assert moves["split"] <= bound * (1 + 1e-5)
    assert not np.isfinite(moves["none"]) or moves["none"] > 100 * bound


def test_combination_of_stages_at_other_points(rng):
    """A stage state reached through the truncation feeds the next combination: checked against
    the dense projected RK formula for Heun's method."""
    m, n, r, h = 10, 8, 2, 0.2
    Y = rng.standard_normal((m, n))
    B0, A0 = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    Yt = torch.from_numpy(Y)
    y1, stages = rk_step(field_for(lambda X: X - Yt), state(B0, A0), [h], get_tableau("heun"), get_retraction("truncate"))
    X0 = B0 @ A0
    k1 = -projection_reference(X0 - Y, B0, A0)
    X_mid = dense_truncation(X0 + h * k1, r)
    U, _, Vt = np.linalg.svd(X_mid)
    k2 = -projection_reference(X_mid - Y, U[:, :r], Vt[:r])
    expected = dense_truncation(X0 + h * (k1 + k2) / 2, r)
    np.testing.assert_allclose((y1[0].B[0] @ y1[0].A[0]).numpy(), expected, atol=1e-11)
    assert len(stages) == 2 and stages[0].y[0].frame is not None


@pytest.mark.parametrize("retraction", ["truncate", "split", "balance"])
@pytest.mark.parametrize("method", ["euler", "rk4", "bs32", "dopri5"])
def test_steps_from_a_product_of_rank_below_r_do_not_depend_on_rounding(rng, method, retraction):
    """From B = 0 a rank-3 gradient gives a product of rank 3 < r: its other singular values come
    out at rounding level in directions rounding chooses, with signs rounding chooses. Nothing
    after that may depend on those choices. The same loss summed in two parts (what another batch
    split or process layout does: equal up to rounding) must leave products *and* factors where
    they were, to 1e-9, after three more steps in which the gradient gains full rank. Before the
    rounding-level values were dropped this steeply and the signs of singular vectors fixed,
    products ended 1e-2 to 0.5 apart (RK4, the adaptive pairs) and factors up to 0.9 apart
    (every method: the directions the gradient adds were aligned by the signs rounding gave them).
    The splitting retraction kept what the stepped product does along the start's rounding-chosen
    row directions (RK4: products 8e-2 apart) until such steps took the truncation."""
    from odelora import ODELoRA

    m, n, r, s = 32, 24, 6, 2.0
    A0 = torch.from_numpy(rng.standard_normal((r, n)) / n**0.5)
    Gs = [torch.from_numpy(rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) * 1e-2)]
    Gs += [torch.from_numpy(rng.standard_normal((m, n)) * 1e-3)] * 3

    def run(split):
        B = torch.zeros(m, r, dtype=torch.float64, requires_grad=True)
        A = A0.clone().requires_grad_()
        opt = ODELoRA([(B, A, s)], lr=0.1, method=method, retraction=retraction)
        for G in Gs:
            parts = [G * 0.3, G - G * 0.3] if split else [G]

            def closure():
                opt.zero_grad()
                X = s * B @ A
                loss = sum((P * X).sum() for P in parts) + 0.5 * X.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
        return B.detach().clone(), A.detach().clone()

    (B, A), (Bp, Ap) = run(False), run(True)
    X, Xp = B @ A, Bp @ Ap
    dX = float((X - Xp).norm() / X.norm())
    dF = max(float((B - Bp).norm() / B.norm()), float((A - Ap).norm() / A.norm()))
    assert dX < 1e-9 and dF < 1e-9, (dX, dF)


def test_balanced_factors_do_not_depend_on_the_signs_of_singular_vectors(rng):
    """A product of rank 5 < r = 6 whose previous factors reach only 3 of its directions: flipping
    the signs of some singular vector pairs (as another rounding may) changes nothing."""
    from odelora.geometry import balanced_factors

    m, n, r = 20, 16, 6
    U = torch.from_numpy(np.linalg.qr(rng.standard_normal((m, r)))[0])
    V = torch.from_numpy(np.linalg.qr(rng.standard_normal((n, r)))[0])
    S = torch.tensor([3.0, 2.0, 1.0, 1e-3, 1e-4, 0.0], dtype=torch.float64)
    B0 = U[:, :3] @ torch.from_numpy(rng.standard_normal((3, r)))  # reaches the first three only
    A0 = torch.from_numpy(rng.standard_normal((r, 3))) @ V[:, :3].T
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    B1, A1, _ = balanced_factors(U, S, V, r, near=(B0, A0))
    B2, A2, _ = balanced_factors(U * flip, S, V * flip, r, near=(B0, A0))
    torch.testing.assert_close(B1 @ A1, (U * S) @ V.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(B2, B1, atol=1e-12, rtol=0)
    torch.testing.assert_close(A2, A1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("start", [1e-6, 1e-5])
def test_small_real_directions_follow_the_flow_in_float32(retraction, start):
    """Target and start diagonal in the same bases: Euler on the balanced flow moves each singular
    value as ``s_k = t + (s_0 - t)(1 - h)^k``. A float32 direction at 1e-6 or 1e-5 of the largest
    is real: it must grow to the target's 1e-3, not be taken for rounding (the rounding filter
    used to erase it in the first steps, for good)."""
    from odelora import ODELoRA

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0][:, :2]
    V = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0][:, :2]
    t = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    root = torch.tensor([1.0, start], dtype=torch.float64).sqrt()
    B = (U * root).float().requires_grad_()
    A = (root[:, None] * V.T).float().requires_grad_()
    T = (U * t) @ V.T
    h = 1e-3
    opt = ODELoRA([(B, A)], lr=h, retraction=retraction)
    for k in range(1, 101):
        opt.zero_grad()
        (0.5 * ((B @ A - T.float()) ** 2).sum()).backward()
        opt.step()
        if k in (1, 10, 100):
            s2 = float(torch.linalg.svdvals((B @ A).detach().double())[1])
            assert s2 == pytest.approx(1e-3 + (start - 1e-3) * (1 - h) ** k, rel=2e-2), k

"""Steps on the rank-r matrices (the "truncate" and "split" retractions) against dense references:
exact Euler steps, the orders of projected Runge-Kutta methods against scipy, and the bound on how
far a step moves the product, which holds however small the singular values are."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import orthogonal_procrustes

from odelora import NonFiniteError, ODELoRA
from odelora.geometry import balance, balanced_factors
from odelora.integrators import get_tableau, integrate, rk_step
from odelora.retractions import Factors, get_retraction

from conftest import dense_split, dense_truncation, field_for, projection_reference


def state(B, A, s=1.0):
    return [Factors(torch.as_tensor(B)[None], torch.as_tensor(A)[None], torch.tensor([s], dtype=torch.as_tensor(B).dtype))]


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


def test_split_takes_the_truncation_pair_by_pair(rng):
    """A generic pair stacked with a B = 0 pair (one bucket) takes the one-sided projection, as it
    would alone; the B = 0 pair takes the truncation: a pair's step does not depend on its neighbours."""
    m, n, r, s, h = 10, 8, 2, 1.5, 0.2
    B, A = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    A0 = rng.standard_normal((r, n))
    G, G0 = rng.standard_normal((m, n)), np.outer(rng.standard_normal(m), rng.standard_normal(n))
    y0 = [Factors(torch.from_numpy(np.stack([B, np.zeros((m, r))])), torch.from_numpy(np.stack([A, A0])), torch.tensor([s, s], dtype=torch.float64))]
    grads = torch.from_numpy(np.stack([G, G0]))
    y1, _ = rk_step(field_for(lambda X: grads), y0, [h], get_tableau("euler"), get_retraction("split"))
    X1 = s * (y1[0].B @ y1[0].A).numpy()
    split = dense_split(s * B @ A - h * projection_reference(G, B, A), A)
    cut = dense_truncation(-h * G0 @ np.linalg.pinv(A0) @ A0, r)  # from B = 0: -h G PV
    np.testing.assert_allclose(X1[0], split, atol=1e-12 * np.linalg.norm(split))
    np.testing.assert_allclose(X1[1], cut, atol=1e-12 * np.linalg.norm(cut))
    assert np.linalg.norm(split - dense_truncation(s * B @ A - h * projection_reference(G, B, A), r)) > 1e-6  # the two differ here


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


@pytest.mark.parametrize("retraction", ["balance", "none"])
@pytest.mark.parametrize("method", ["heun", "rk4", "dopri5"])
def test_factor_space_runge_kutta_orders_from_unbalanced_factors_against_scipy(method, retraction, rng):
    """Factor-space steps keep the tableau's order for the product, balancing or not: the
    balanced flow's product velocity is -P(G) whatever the factorization. ``"balance"`` once
    rebalanced every stage state too, and combined velocities of other factorizations with the
    start's factors: RK4 errors of 0.6 of the step, at every h."""
    m, n, r, T = 8, 6, 2, 0.4
    Y = rng.standard_normal((m, n))
    Bb, Ab = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    B0, A0 = 3.0 * Bb, Ab / 3.0  # the same product, far from balanced
    ref = solve_ivp(projected_flow_numpy(Y, r), (0, T), (B0 @ A0).ravel(), method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1].reshape(m, n)
    Yt = torch.from_numpy(Y)
    order = get_tableau(method).order
    hs = [T / k for k in (4, 8, 16)] if order >= 4 else [T / k for k in (16, 32, 64)]
    errs = []
    for h in hs:
        y = state(B0, A0)
        for _ in range(round(T / h)):  # fixed steps of the tableau's main formula, adaptive pairs too
            y, _ = rk_step(field_for(lambda X: X - Yt), y, [h], get_tableau(method), get_retraction(retraction))
        (x,) = y
        errs.append(np.linalg.norm((x.B[0] @ x.A[0]).numpy() - ref))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert slope > order - 0.3, (method, slope, errs)


@pytest.mark.parametrize("method", ["bs32", "dopri5"])
def test_balancing_does_not_cut_the_first_adaptive_step_of_unbalanced_factors_short(method, rng):
    """The balancing retraction rebalances a step's result, not its stages. The last stage of
    these (FSAL) pairs was evaluated at the rebalanced result, and the error estimate then
    combined a velocity of another factorization with the start's: here the first step from
    unbalanced factors was rejected twice and accepted at 1/110 of lr (bs32) and 1/12 (dopri5).
    Now it is rejected once at most, longer than lr / 3 (lr itself, here), and lands on the
    projected flow (scipy) within the tolerance, balanced."""
    m, n, r, lr = 10, 8, 2, 0.05
    Y = rng.standard_normal((m, n))
    B = torch.tensor(rng.standard_normal((m, r)) * 0.1, requires_grad=True)
    A = torch.tensor(rng.standard_normal((r, n)) * 3.0, requires_grad=True)
    X0 = (B @ A).detach().numpy()
    opt = ODELoRA([(B, A)], lr=lr, method=method, retraction="balance", rtol=1e-3, atol=1e-6)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B @ A) - torch.from_numpy(Y)).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    h = opt.last_step.h
    assert opt.last_step.rejected <= 1 and h > lr / 3, (h, opt.last_step.rejected)
    ref = solve_ivp(projected_flow_numpy(Y, r), (0, h), X0.ravel(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1].reshape(m, n)
    X = (B @ A).detach().numpy()
    assert np.linalg.norm(X - ref) <= 1e-3 * np.linalg.norm(ref)
    Bd, Ad = B.detach().numpy(), A.detach().numpy()
    assert np.linalg.norm(Bd.T @ Bd - Ad @ Ad.T) <= 1e-10 * np.linalg.norm(Bd.T @ Bd)


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


@pytest.mark.parametrize("flow", ["balanced", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("method", ["euler", "rk4", "bs32", "dopri5"])
def test_a_step_moves_the_product_by_at_most_2h_G_near_rank_deficiency(method, dtype, flow, rng):
    """Factors with singular values down to 1e-14 and a rank-1 gradient (a batch of one): with the
    truncation retraction |X1 - X0| <= 2 h sum_j |b_j| |V_j| whatever the singular values, V_j the
    product velocity of stage j; the factor-space step of the same flow overshoots by orders of
    magnitude (the h^2 dB dA term), or overflows (float16, Dormand-Prince).

    The bound is the retraction's (the truncation is the nearest rank-r matrix; the splitting keeps
    X0's row space), so it holds for any flow, with the flow's own bound on V: |P(G)| <= |G| for the
    balanced flow, |PU G + G PV| <= 2 |G| for the scaled one (it counts PU G PV twice; damped
    projectors only shrink it). Half precision: factors rounded to float16/bfloat16 (in float16 the
    1e-14 direction underflows to zero), gradients taken at rounded factors and rounded, as the
    optimizer takes them (see ``field_for``); slack 1.3 as in the optimizer's rank-1 test, for the
    rounded gradients, whose rounding the damped inverses may magnify along small directions.
    Measured: at most 0.46 of the bound for every case."""
    m, n, r, h = 20, 16, 4, 0.5
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    sv = np.array([1.0, 1e-3, 1e-8, 1e-14])
    B, A = U * np.sqrt(sv), (V * np.sqrt(sv)).T
    g = rng.standard_normal(m)[:, None] * rng.standard_normal(n)[None, :]  # rank-1 gradient
    half = dtype in (torch.float16, torch.bfloat16)
    work = torch.float32 if half else dtype  # the optimizer's compute precision
    Bt, At, Gt = (torch.from_numpy(x).to(dtype).to(work) for x in (B, A, g))
    X0 = (Bt.double() @ At.double()).numpy()  # the start the step really leaves from (rounded in half precision)
    y0 = state(Bt, At)
    tab = get_tableau(method)
    vmax = {"balanced": 1.0, "scaled": 2.0}[flow]
    bound = 2 * h * sum(abs(b) for b in tab.b) * vmax * float(Gt.double().norm())
    slack = 1.3 if half else 1 + 1e-5
    moves = {}
    for name in ("truncate", "split", "none"):
        try:
            y1, _ = rk_step(field_for(lambda X: Gt, flow, dtype if half else None), y0, [h], tab, get_retraction(name))
        except NonFiniteError:  # a stage overflowed: only the factor-space step may
            assert name == "none"
            moves[name] = np.inf
            continue
        X1 = (y1[0].B[0].double() @ y1[0].A[0].double()).numpy()
        moves[name] = np.linalg.norm(X1 - X0)
    assert moves["truncate"] <= bound * slack, moves["truncate"] / bound
    assert moves["split"] <= bound * slack, moves["split"] / bound
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


@pytest.mark.parametrize("method, retraction", [(m, r) for r in ("truncate", "split") for m in ("euler", "rk4", "bs32", "dopri5")]
                         + [("euler", "balance"), ("rk4", "balance")])  # factor-space adaptive steps find no step from B = 0
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
    A0, Gs = _rank_3_then_full_rank(rng, 32, 24, 6)
    (B, A), (Bp, Ap) = (_steps_from_B_zero(A0, Gs, torch.float64, method, split=split, retraction=retraction) for split in (False, True))
    X, Xp = B @ A, Bp @ Ap
    dX = float((X - Xp).norm() / X.norm())
    dF = max(float((B - Bp).norm() / B.norm()), float((A - Ap).norm() / A.norm()))
    assert dX < 1e-9 and dF < 1e-9, (dX, dF)


def _rank_3_then_full_rank(rng, m, n, r):
    """The rounding test's start and gradients at other sizes, in float64: A0, then a rank-3
    gradient and three full-rank ones."""
    A0 = torch.from_numpy(rng.standard_normal((r, n)) / n**0.5)
    Gs = [torch.from_numpy(rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) * 1e-2)]
    Gs += [torch.from_numpy(rng.standard_normal((m, n)) * 1e-3)] * 3
    return A0, Gs


def _steps_from_B_zero(A0, Gs, dtype, method, split=False, retraction="truncate"):
    """The rounding test's run in ``dtype``: from (0, A0), one step per gradient of the loss
    ``<G, X> + |X|^2 / 2`` (X = s B A), summed in two parts if ``split``. The factors after it."""
    s, m, r = 2.0, Gs[0].shape[0], A0.shape[0]
    B = torch.zeros(m, r, dtype=dtype, requires_grad=True)
    A = A0.to(dtype, copy=True).requires_grad_()
    opt = ODELoRA([(B, A, s)], lr=0.1, method=method, retraction=retraction)
    for G in Gs:
        G = G.to(dtype)
        parts = [G * 0.3, G - G * 0.3] if split else [G]

        def closure():
            opt.zero_grad()
            X = s * B @ A
            loss = sum((P * X).sum() for P in parts) + 0.5 * X.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    return B.detach().double(), A.detach().double()


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_wide_float32_steps_from_a_product_of_rank_below_r_do_not_depend_on_rounding(method, rng):
    """The test above at a width users have: 1024 x 1024, r = 8, float32, truncation. A rank-3
    gradient from B = 0, then three full-rank ones; the loss whole or summed in two parts.

    What rounding justifies here is what the problem does to a rounding-level change, which the
    same runs in float64 measure: products 31 eps64 apart after four steps (Euler) and 438 eps64
    (RK4, whose stages take the new directions while their singular values are tiny and
    ill-separated), factors 72 eps64 (Euler). Float32 at the same amplification: 3.7e-6 and 5.2e-5
    for the products, 8.6e-6 for Euler's factors; measured 3.8e-6 and 1.6e-4, and 2.1e-5. Bounds:
    4e-5 and 5e-4 (products), 2e-4 (Euler's factors). RK4's factors are not bounded here: whether
    they agree depends on a sign that rounding chooses (a canonical sign that a near tie lets
    rounding flip, docs/robustness.md; measured 0.156 apart with two threads, 1.1e-3 with one). Dropping rounding-level values on float64's scale
    instead of float32's leaves RK4's products 3e-2 apart."""
    A0, Gs = _rank_3_then_full_rank(rng, 1024, 1024, 8)
    (B, A), (Bp, Ap) = (_steps_from_B_zero(A0, Gs, torch.float32, method, split=split) for split in (False, True))
    X, Xp = B @ A, Bp @ Ap
    dX = float((X - Xp).norm() / X.norm())
    dF = max(float((B - Bp).norm() / B.norm()), float((A - Ap).norm() / A.norm()))
    assert dX < {"euler": 4e-5, "rk4": 5e-4}[method], dX
    if method == "euler":
        assert dF < 2e-4, dF


def test_float32_rk4_from_a_product_of_rank_below_r_follows_float64_at_a_wide_layer(rng):
    """The wide rounding test's whole-loss run (1024 x 1024, r = 8: a rank-3 gradient from B = 0,
    then three full-rank ones) in float32 and in float64: the products must agree to what float32
    rounding explains, which the float64 run's own sensitivity to a rounding-level change puts at
    438 eps after four steps (5.2e-5 in float32); bound 1e-3, 20 times that. Measured: 1.7e-4
    (Euler: 2.3e-6). At RK4's second stage (``X0 + h/2 k1`` from the rank-3 product) three new
    singular values are real but small, about 4e-6 of the largest, and float32 maps them to
    2e-7 to 4e-7. With the factor velocities' damping ``eps * max^2`` in the tangent too, the
    projection weighed them 0.60 to 0.77 and the products ended 1.1e-2 apart; the tangent's
    damping ``eps^2 * max^2`` weighs them 1."""
    A0, Gs = _rank_3_then_full_rank(rng, 1024, 1024, 8)
    B32, A32 = _steps_from_B_zero(A0, Gs, torch.float32, "rk4")
    B64, A64 = _steps_from_B_zero(A0, Gs, torch.float64, "rk4")
    X32, X64 = B32 @ A32, B64 @ A64
    err = float((X32 - X64).norm() / X64.norm())
    assert err < 1e-3, err


@pytest.mark.parametrize("rank", [512, 1], ids=["full-rank", "rank-1"])
def test_a_wide_float32_euler_step_from_B_zero_is_the_dense_truncation(rank, rng):
    """One Euler step of the optimizer from PEFT's start at a layer of 2048 x 512, r = 8, float32,
    for a full-rank gradient and a rank-1 one (a batch of one): the product must be the rank-r
    truncation of ``X0 - h P(G)``, computed densely in float64 from the same float32 inputs. At
    B = 0 that is ``-h G PV`` (B's column space is empty; PV from numpy's SVD of A), of rank <= r,
    which the truncation keeps whole. Float32 forms
    ``G A.T`` with sums of n = 512 terms, whose rounding is about ``sqrt(n) u = 1.4e-6`` relative
    (measured 9.3e-7 and 6.8e-7); bound 1e-5. A damping of ``sqrt(eps)`` instead of ``eps`` moves
    the step by 4.7e-4."""
    m, n, r, s, h = 2048, 512, 8, 2.0, 0.1
    A0 = (rng.standard_normal((r, n)) / n**0.5).astype(np.float32)
    G = (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / rank**0.5).astype(np.float32)
    B = torch.zeros(m, r, requires_grad=True)
    A = torch.from_numpy(A0.copy()).requires_grad_()
    opt = ODELoRA([(B, A, s)], lr=h)
    Gt = torch.from_numpy(G)

    def closure():
        opt.zero_grad()
        loss = (Gt * (s * B @ A)).sum()  # dL/dW = G
        loss.backward()
        return loss

    opt.step(closure)
    X1 = s * (B.detach().double() @ A.detach().double()).numpy()
    V = np.linalg.svd(A0.astype(np.float64).T, full_matrices=False)[0]
    expected = -h * G.astype(np.float64) @ V @ V.T
    err = np.linalg.norm(X1 - expected) / np.linalg.norm(expected)
    assert err < 1e-5, err


@pytest.mark.parametrize("smallest", [1e-4, 1e-6, 1e-8])
def test_a_float32_euler_step_at_nearly_rank_deficient_factors_is_the_dense_truncation(smallest, rng):
    """Balanced float32 factors whose product has singular values from 1 down to ``smallest``
    (40 x 30, r = 6): one Euler step must be the rank-r truncation of ``X0 - h P(G)``, computed
    densely in float64 from the same inputs, to float32 rounding relative to the step (bound 1e-4;
    measured 2.6e-6, 2.0e-6, 3.1e-5). The factor velocities' damping ``eps * max^2`` in the
    tangent put the step 4.9e-4, 4.9e-2 and 0.46 away."""
    m, n, r, h = 40, 30, 6, 0.01
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    root = np.sqrt(np.logspace(0, np.log10(smallest), r))
    B = torch.tensor(U * root, dtype=torch.float32, requires_grad=True)
    A = torch.tensor((V * root).T, dtype=torch.float32, requires_grad=True)
    T = rng.standard_normal((m, n))
    X0 = (B.detach().double() @ A.detach().double()).numpy()
    opt = ODELoRA([(B, A, 1.0)], lr=h)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B @ A).double() - torch.from_numpy(T)).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    Ux, _, Vxh = np.linalg.svd(X0)
    PU, PV, G = Ux[:, :r] @ Ux[:, :r].T, Vxh[:r].T @ Vxh[:r], X0 - T
    W, S, Zh = np.linalg.svd(X0 - h * (PU @ G + G @ PV - PU @ G @ PV))
    expected = (W[:, :r] * S[:r]) @ Zh[:r]
    X1 = (B.detach().double() @ A.detach().double()).numpy()
    err = np.linalg.norm(X1 - expected) / np.linalg.norm(expected - X0)
    assert err < 1e-4, err


def test_balanced_factors_do_not_depend_on_the_signs_of_singular_vectors(rng):
    """A product of rank 5 < r = 6 whose previous factors reach only 3 of its directions: flipping
    the signs of some singular vector pairs (as another rounding may) changes nothing."""
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


def test_the_error_norm_resolves_errors_far_below_the_steps_size(rng):
    """An error estimate is a cancellation: ``[UB, L1, UB2, L2] M [...].T`` with blocks that nearly
    repeat one another and a small sum. In float32, with the sum 1e-5 of its terms (below
    ``sqrt(eps)``), the norm must match float64's dense product to 1e-2 relative; the trace of
    Gram products read 0.18 there for 0.0070."""
    from odelora.retractions import _frob

    m, n, k = 300, 200, 4
    L1, R1 = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    dL, dR = 1e-5 * rng.standard_normal((m, k)), 1e-5 * rng.standard_normal((n, k))
    L, R = np.hstack([L1, L1 + dL]), np.hstack([R1, R1 + dR])
    M = np.block([[np.eye(k), np.zeros((k, k))], [np.zeros((k, k)), -np.eye(k)]])
    expected = np.linalg.norm(L @ M @ R.T)  # L1 R1.T - (L1 + dL)(R1 + dR).T: 1e-5 of the terms
    assert expected < 1e-4 * np.linalg.norm(L1 @ R1.T)
    to32 = lambda a: torch.from_numpy(a).float().unsqueeze(0)
    got = float(_frob(to32(L), to32(M), to32(R))[0])
    # float32 inputs are rounded at 6e-8 of the terms, 6e-3 of the result: compare with float64 on them
    L32, M32, R32 = (to32(a)[0].double().numpy() for a in (L, M, R))
    assert abs(got / np.linalg.norm(L32 @ M32 @ R32.T) - 1) < 1e-2, (got, expected)

"""The PINN references against independent solvers (finite differences, Crank-Nicolson, a
method-of-lines Burgers solve, an FFT solve) and finite-difference residuals; and DeepXDE's
residuals and boundary data of each family against the exact solutions written here again."""

import os

os.environ.setdefault("DDE_BACKEND", "pytorch")

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.integrate import solve_ivp
from scipy.sparse.linalg import splu, spsolve

from odelora.lab.pinn import reference as ref

PI = np.pi


def second_difference(n: int, h: float):
    """-d^2/dx^2 on n interior points with zero Dirichlet values."""
    return sparse.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csc") / h**2


def test_poisson_closed_form_matches_a_five_point_solve_at_second_order():
    errors = []
    for n in (31, 63):
        h = 1 / (n + 1)
        x = np.arange(1, n + 1) * h
        T, eye = second_difference(n, h), sparse.identity(n)
        L = (sparse.kron(T, eye) + sparse.kron(eye, T)).tocsc()
        X = np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)
        f = 2 * PI**2 * np.sin(PI * X[:, 0]) * np.sin(PI * X[:, 1]) + 2.5 * PI**2 * np.sin(2 * PI * X[:, 0]) * np.sin(PI * X[:, 1])
        assert np.allclose(ref.poisson_source(X, 0.5).ravel(), f)
        errors.append(np.abs(spsolve(L, f) - ref.poisson_exact(X, 0.5)).max())
    assert errors[1] < 2e-3 and errors[0] / errors[1] > 3.5, errors


def test_heat_closed_form_matches_crank_nicolson():
    kappa, n, dt = 0.15, 199, 1e-3
    h = 1 / (n + 1)
    x = np.arange(1, n + 1) * h
    T, eye = second_difference(n, h), sparse.identity(n, format="csc")
    lhs, rhs = splu((eye + 0.5 * dt * kappa * T).tocsc()), (eye - 0.5 * dt * kappa * T)
    u = np.sin(PI * x) + 0.5 * np.sin(3 * PI * x)
    for k in range(1, 1001):
        u = lhs.solve(rhs @ u)
        if k in (100, 500, 1000):
            exact = ref.heat_exact(np.c_[x, np.full(n, k * dt)], kappa)
            assert np.abs(u - exact).max() < 1e-4, (k, np.abs(u - exact).max())


@pytest.mark.parametrize("nu", [0.1 / PI, 0.05 / PI])
def test_burgers_cole_hopf_matches_a_method_of_lines_solve(nu):
    """Conservative central differences on 1601 points, integrated by scipy's BDF."""
    n = 1599
    x = np.linspace(-1, 1, n + 2)[1:-1]
    dx = x[1] - x[0]

    def rhs(t, u):
        w = np.concatenate([[0.0], u, [0.0]])
        return -(w[2:] ** 2 - w[:-2] ** 2) / (4 * dx) + nu * (w[2:] - 2 * w[1:-1] + w[:-2]) / dx**2

    times = [0.25, 0.5, 1.0]
    sol = solve_ivp(rhs, (0, 1), -np.sin(PI * x), method="BDF", t_eval=times, rtol=1e-8, atol=1e-10,
                    jac_sparsity=sparse.diags([1.0, 1.0, 1.0], [-1, 0, 1], shape=(n, n)))
    assert sol.success
    for j, t in enumerate(times):
        ch = ref.burgers_cole_hopf(np.c_[x, np.full(n, t)], nu)
        assert np.abs(ch - sol.y[:, j]).max() < 2e-3, (t, np.abs(ch - sol.y[:, j]).max())
    x0 = np.linspace(-1, 1, 11)
    assert np.allclose(ref.burgers_cole_hopf(np.c_[x0, np.zeros(11)], nu), -np.sin(PI * x0))  # t = 0
    assert np.allclose(ref.burgers_cole_hopf(np.array([[-1.0, 0.7], [0.0, 0.7], [1.0, 0.7]]), nu), 0, atol=1e-12)


def test_convection_closed_form_matches_an_fft_solve():
    beta, n = 6.0, 128
    x = 2 * PI * np.arange(n) / n
    k = np.fft.fftfreq(n, 1 / n)
    u0 = np.fft.fft(np.sin(x))
    for t in (0.3, 1.0):
        spectral = np.fft.ifft(u0 * np.exp(-1j * k * beta * t)).real
        assert np.abs(spectral - ref.convection_exact(np.c_[x, np.full(n, t)], beta)).max() < 1e-12


@pytest.mark.parametrize("dim", [2, 3])
def test_allen_cahn_source_is_the_finite_difference_residual(dim):
    rng = np.random.default_rng(0)
    X = rng.uniform(0.05, 0.95, (64, dim))
    c, h = 1.0, 1e-3
    u = lambda Y: ref.allen_cahn_exact(Y, c)
    lap = sum((u(X + h * e) - 2 * u(X) + u(X - h * e)) / h**2 for e in np.eye(dim))
    fd = -lap + u(X) ** 3 - u(X)
    assert np.allclose(ref.allen_cahn_source(X, c)[:, 0], fd, rtol=1e-5, atol=1e-5)
    face = X.copy()
    face[:, 0] = 1.0
    assert np.allclose(u(face), ref.allen_cahn_exact(face, 0.0))  # same boundary data for every c


# ---------------------------------------------------------------------------- DeepXDE residuals
T = torch
EXACT = {  # written again from the equations, in torch, for the residual checks
    "poisson": lambda X, m: T.sin(PI * X[:, 0]) * T.sin(PI * X[:, 1]) + m * T.sin(2 * PI * X[:, 0]) * T.sin(PI * X[:, 1]),
    "heat": lambda X, k: T.exp(-k * PI**2 * X[:, 1]) * T.sin(PI * X[:, 0]) + 0.5 * T.exp(-9 * k * PI**2 * X[:, 1]) * T.sin(3 * PI * X[:, 0]),
    "convection": lambda X, b: T.sin(X[:, 0] - b * X[:, 1]),
    "allen-cahn": lambda X, c: T.sin(PI * X / 2).mean(1) + (1 + c) * T.sin(PI * X).prod(1),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_deepxde_residual_vanishes_on_the_exact_solution(name):
    from odelora.lab.pinn.problems import get_family

    fam = get_family(name)
    data = fam.build(fam.mu1, 64)
    X = torch.tensor(data.train_x_all, dtype=torch.float64, requires_grad=True)
    u = EXACT[name](X, fam.mu1)[:, None]
    res = torch.as_tensor(data.pde(X, u)).detach()
    assert float(res.abs().max()) < 1e-8, name
    assert np.allclose(EXACT[name](torch.tensor(fam.grid(), dtype=torch.float64), fam.mu1).numpy(), fam.exact(fam.grid().astype(float), fam.mu1),
                       atol=1e-6)


@pytest.mark.parametrize("name", ["poisson", "heat", "burgers", "convection", "allen-cahn"])
def test_network_output_carries_the_boundary_and_initial_data(name):
    """Whatever the network's weights, its transformed output equals the exact solution on the
    boundary (periodic for convection) and at t = 0."""
    import deepxde as dde

    from odelora.lab.pinn.problems import get_family
    from odelora.lab.pinn.train import Net, build_net

    fam = get_family(name)
    net = build_net(fam, Net(8, 2))
    geom, _ = fam._pde(fam.mu1)
    u = lambda X: net(torch.as_tensor(X, dtype=torch.float32)).detach().numpy().ravel()
    np.random.seed(0)
    if isinstance(geom, dde.geometry.GeometryXTime):
        X0 = geom.random_initial_points(32)
        assert np.allclose(u(X0), fam.exact(X0, fam.mu1), atol=1e-5)
    Xb = geom.random_boundary_points(32)
    if name == "convection":
        left, right = Xb.copy(), Xb.copy()
        left[:, 0], right[:, 0] = 0.0, 2 * PI
        assert np.allclose(u(left), u(right), atol=1e-5)
    else:
        for mu in (fam.mu0, fam.mu1):
            assert np.allclose(u(Xb), fam.exact(Xb, mu), atol=1e-5), mu

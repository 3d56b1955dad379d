"""Reference solutions of the PINN families, in numpy: closed forms, manufactured solutions and
Cole-Hopf quadrature. Nothing here comes from a network; ``tests/test_pinn_reference.py`` checks
each one against an independent solver or a finite-difference residual.

Points are arrays of shape (N, d); time, where there is one, is the last column.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "poisson_exact", "poisson_source", "heat_exact", "burgers_cole_hopf", "convection_exact",
    "allen_cahn_exact", "allen_cahn_source",
]

PI = np.pi


def poisson_exact(X: np.ndarray, mu: float) -> np.ndarray:
    """``-lap u = f_mu`` on [0, 1]^2, ``u = 0`` on the boundary:
    ``u = sin(pi x) sin(pi y) + mu sin(2 pi x) sin(pi y)``."""
    x, y = X[:, 0], X[:, 1]
    return np.sin(PI * x) * np.sin(PI * y) + mu * np.sin(2 * PI * x) * np.sin(PI * y)


def poisson_source(X, mu: float, lib=np):
    """``f_mu = 2 pi^2 sin(pi x) sin(pi y) + 5 pi^2 mu sin(2 pi x) sin(pi y)`` (numpy or torch)."""
    x, y = X[:, 0:1], X[:, 1:2]
    return 2 * PI**2 * lib.sin(PI * x) * lib.sin(PI * y) + 5 * PI**2 * mu * lib.sin(2 * PI * x) * lib.sin(PI * y)


HEAT_MODES = ((1, 1.0), (3, 0.5))  # (k, amplitude) of the initial condition sum a sin(k pi x)


def heat_exact(X: np.ndarray, kappa: float) -> np.ndarray:
    """``u_t = kappa u_xx`` on [0, 1] x [0, 1], ``u(0, t) = u(1, t) = 0``,
    ``u(x, 0) = sin(pi x) + 0.5 sin(3 pi x)``: each mode decays like ``exp(-kappa k^2 pi^2 t)``."""
    x, t = X[:, 0], X[:, -1]
    return sum(a * np.exp(-kappa * (k * PI) ** 2 * t) * np.sin(k * PI * x) for k, a in HEAT_MODES)


def burgers_cole_hopf(X: np.ndarray, nu: float, nodes: int = 200) -> np.ndarray:
    """``u_t + u u_x = nu u_xx`` on [-1, 1] x [0, 1], ``u(x, 0) = -sin(pi x)``, ``u(+-1, t) = 0``.

    Cole-Hopf: ``u = -int sin(pi (x - e)) f(x - e) G(e) de / int f(x - e) G(e) de`` with
    ``f(y) = exp(-cos(pi y) / (2 pi nu))`` and the heat kernel G of variance ``2 nu t``;
    Gauss-Hermite quadrature in ``e = sqrt(4 nu t) z``, with the exponent's maximum taken out
    per point so nothing overflows at small nu.
    """
    x, t = X[:, 0], X[:, -1]
    z, w = np.polynomial.hermite.hermgauss(nodes)
    y = x[:, None] - np.sqrt(4 * nu * np.maximum(t, 0))[:, None] * z[None, :]
    expo = -np.cos(PI * y) / (2 * PI * nu)
    weight = w[None, :] * np.exp(expo - expo.max(axis=1, keepdims=True))
    u = -(np.sin(PI * y) * weight).sum(1) / weight.sum(1)
    return np.where(t > 0, u, -np.sin(PI * x))


def convection_exact(X: np.ndarray, beta: float) -> np.ndarray:
    """``u_t + beta u_x = 0`` on [0, 2 pi] x [0, 1], periodic in x, ``u(x, 0) = sin x``:
    ``u = sin(x - beta t)``."""
    return np.sin(X[:, 0] - beta * X[:, -1])


def allen_cahn_exact(X, c: float, lib=np):
    """Manufactured solution on [0, 1]^d: ``u_c = mean_i sin(pi x_i / 2) + (1 + c) prod_i sin(pi x_i)``
    (the bump vanishes on the boundary, so every c has the same boundary data)."""
    return lib.sin(PI * X / 2).mean(1) + (1 + c) * lib.sin(PI * X).prod(1)


def allen_cahn_source(X, c: float, lib=np):
    """``f_c = -lap u_c + u_c^3 - u_c`` for :func:`allen_cahn_exact` (numpy or torch), column vector."""
    d = X.shape[1]
    u = allen_cahn_exact(X, c, lib)
    lap = -(PI / 2) ** 2 * lib.sin(PI * X / 2).mean(1) - d * PI**2 * (1 + c) * lib.sin(PI * X).prod(1)
    return (-lap + u**3 - u)[:, None]

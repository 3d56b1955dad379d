"""The PINN problem families: each a PDE with a parameter mu, written with DeepXDE's geometry,
sampling and residuals, plus a fixed reference grid and the reference solution.

Boundary and initial data are imposed exactly by the network's output transform (and, for the
periodic problem, by periodic input features), so the loss is the PDE residual alone: no
weighting between residual and boundary terms enters the comparison of optimizers. The factor
that vanishes on the boundary peaks at 1, so the network's own output stays O(1): LoRA leaves
the output layer frozen, and a network that must grow its output saturates its tanh units. A
family is pretrained at ``mu0`` and fine-tuned to ``mu1``.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("DDE_BACKEND", "pytorch")

import numpy as np

from . import reference as ref

__all__ = ["Family", "FAMILIES", "get_family"]

PI = np.pi


def _dde():
    with contextlib.redirect_stderr(io.StringIO()):  # imported lazily: slow, and it prints its backend
        import deepxde as dde

    return dde


def _torch():
    import torch

    return torch


def _mesh(*axes: np.ndarray) -> np.ndarray:
    return np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1).astype(np.float32)


@dataclass(frozen=True)
class Family:
    """A PDE family. ``exact(X, mu)``: the reference on points X; ``build(mu, points)``: the
    DeepXDE data; ``grid()``: the fixed points of the relative L2 error; ``transform(x, N)``:
    the network output with the boundary/initial data built in; ``features``: input features."""

    name: str
    equation: str
    param: str
    mu0: float
    mu1: float
    input_dim: int
    exact: Callable[[np.ndarray, float], np.ndarray]
    _pde: Callable  # mu -> (geometry, residual)
    _grid: Callable[[], np.ndarray]
    reference: str
    transform: Callable
    constraint: str
    features: Callable | None = None
    feature_dim: int | None = None

    def build(self, mu: float, points: int):
        """DeepXDE data for parameter ``mu``: ``points`` pseudo-random collocation points from
        numpy's global generator (seed it with ``dde.config.set_random_seed``)."""
        dde = _dde()
        geom, pde = self._pde(float(mu))
        cls = dde.data.TimePDE if isinstance(geom, dde.geometry.GeometryXTime) else dde.data.PDE
        return cls(geom, pde, [], num_domain=points, train_distribution="pseudo")

    def grid(self) -> np.ndarray:
        return self._grid()


# ---------------------------------------------------------------------------- residuals
def _poisson(mu):
    dde, torch = _dde(), _torch()

    def pde(x, u):
        lap = dde.grad.hessian(u, x, i=0, j=0) + dde.grad.hessian(u, x, i=1, j=1)
        return -lap - ref.poisson_source(x, mu, torch)

    return dde.geometry.Rectangle([0, 0], [1, 1]), pde


def _space_time(lo, hi):
    dde = _dde()
    return dde.geometry.GeometryXTime(dde.geometry.Interval(lo, hi), dde.geometry.TimeDomain(0, 1))


def _heat(kappa):
    dde = _dde()

    def pde(x, u):
        return dde.grad.jacobian(u, x, i=0, j=1) - kappa * dde.grad.hessian(u, x, i=0, j=0)

    return _space_time(0, 1), pde


def _burgers(nu):
    dde = _dde()

    def pde(x, u):
        u_x = dde.grad.jacobian(u, x, i=0, j=0)
        u_t = dde.grad.jacobian(u, x, i=0, j=1)
        return u_t + u * u_x - nu * dde.grad.hessian(u, x, i=0, j=0)

    return _space_time(-1, 1), pde


def _convection(beta):
    dde = _dde()

    def pde(x, u):
        return dde.grad.jacobian(u, x, i=0, j=1) + beta * dde.grad.jacobian(u, x, i=0, j=0)

    return _space_time(0, 2 * PI), pde


def _allen_cahn(dim):
    def make(c):
        dde, torch = _dde(), _torch()

        def pde(x, u):
            lap = sum(dde.grad.hessian(u, x, i=k, j=k) for k in range(dim))
            return -lap + u**3 - u - ref.allen_cahn_source(x, c, torch)

        return dde.geometry.Hypercube([0.0] * dim, [1.0] * dim), pde

    return make


# ---------------------------------------------------------------------------- hard constraints
def _t():
    return _torch()


def _poisson_out(x, y):
    return 16 * x[:, 0:1] * (1 - x[:, 0:1]) * x[:, 1:2] * (1 - x[:, 1:2]) * y


def _heat_out(x, y):
    s, t = x[:, 0:1], x[:, 1:2]
    u0 = sum(a * _t().sin(k * PI * s) for k, a in ref.HEAT_MODES)
    return u0 + 4 * t * s * (1 - s) * y


def _burgers_out(x, y):
    s, t = x[:, 0:1], x[:, 1:2]
    return -_t().sin(PI * s) + t * (1 - s**2) * y


def _convection_features(x):
    torch = _t()
    return torch.cat([torch.sin(x[:, 0:1]), torch.cos(x[:, 0:1]), x[:, 1:2]], dim=1)


def _convection_out(x, y):
    return _t().sin(x[:, 0:1]) + x[:, 1:2] * y


def _allen_cahn_out(x, y):
    torch = _t()
    lift = torch.sin(PI * x / 2).mean(1, keepdim=True)  # equals u_c on the boundary for every c
    return lift + (4 * x * (1 - x)).prod(1, keepdim=True) * y


def _cube_grid(dim: int, points: int = 5000) -> Callable[[], np.ndarray]:
    n = max(5, round(points ** (1 / dim)))
    return lambda: _mesh(*[np.linspace(0, 1, n)] * dim)


def _families(allen_cahn_dim: int = 3) -> dict[str, Family]:
    xt = lambda lo, hi: (lambda: _mesh(np.linspace(lo, hi, 101), np.linspace(0, 1, 51)))
    return {f.name: f for f in [
        Family("poisson", "-lap u = 2 pi^2 sin(pi x) sin(pi y) + 5 pi^2 mu sin(2 pi x) sin(pi y) on [0,1]^2, u = 0 on the boundary",
               "mu", 0.0, 0.5, 2, ref.poisson_exact, _poisson, lambda: _mesh(np.linspace(0, 1, 51), np.linspace(0, 1, 51)),
               "closed form u = sin(pi x) sin(pi y) + mu sin(2 pi x) sin(pi y)", _poisson_out, "u = 16 x(1-x)y(1-y) N"),
        Family("heat", "u_t = kappa u_xx on [0,1] x [0,1], u(0,t) = u(1,t) = 0, u(x,0) = sin(pi x) + 0.5 sin(3 pi x)",
               "kappa", 0.05, 0.15, 2, ref.heat_exact, _heat, xt(0, 1),
               "closed form: each sine mode decays like exp(-kappa k^2 pi^2 t)", _heat_out, "u = u(x,0) + 4 t x(1-x) N"),
        Family("burgers", "u_t + u u_x = nu u_xx on [-1,1] x [0,1], u(x,0) = -sin(pi x), u(+-1,t) = 0",
               "nu", 0.1 / PI, 0.05 / PI, 2, ref.burgers_cole_hopf, _burgers, xt(-1, 1),
               "Cole-Hopf transform, Gauss-Hermite quadrature (200 nodes)", _burgers_out, "u = -sin(pi x) + t (1-x^2) N"),
        Family("convection", "u_t + beta u_x = 0 on [0,2 pi] x [0,1], periodic in x, u(x,0) = sin x",
               "beta", 2.0, 6.0, 2, ref.convection_exact, _convection, xt(0, 2 * PI),
               "closed form u = sin(x - beta t)", _convection_out, "u = sin x + t N(sin x, cos x, t)",
               features=_convection_features, feature_dim=3),
        Family("allen-cahn", f"-lap u + u^3 - u = f_c on [0,1]^{allen_cahn_dim}, u = u_c on the boundary (manufactured)",
               "c", 0.0, 1.0, allen_cahn_dim, ref.allen_cahn_exact, _allen_cahn(allen_cahn_dim), _cube_grid(allen_cahn_dim),
               "manufactured u_c = mean_i sin(pi x_i / 2) + (1 + c) prod_i sin(pi x_i)", _allen_cahn_out,
               "u = mean_i sin(pi x_i / 2) + prod_i 4 x_i (1 - x_i) N"),
    ]}


FAMILIES = _families()


def get_family(name: str, dim: int | None = None) -> Family:
    """The family called ``name``; ``dim`` sets Allen-Cahn's dimension."""
    if name == "allen-cahn" and dim is not None:
        return _families(dim)[name]
    return FAMILIES[name]

"""An independent numpy implementation of ODELoRA's balanced flow, written from the formula in
docs/math.md (section 2, flow 3), and its exact solution by scipy's ``solve_ivp``.

It shares no code with ``odelora.flows`` or ``odelora.integrators``: the lab measures the
optimizer's iterates against it.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

__all__ = ["balanced_velocity", "exact_balanced_flow"]


def balanced_velocity(B: np.ndarray, A: np.ndarray, G: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(dB, dA)`` with ``scale (dB A + B dA) = -P(G)``, and ``d/dt (B^T B - A A^T) = 0`` where
    the factors are balanced, for full-rank ``B`` (m, r) and ``A`` (r, n); ``G = dL/dW`` (m, n)."""
    hB = G @ A.T / scale
    hA = B.T @ G / scale
    MB, MA = B.T @ B, A @ A.T
    MBi, MAi = np.linalg.inv(MB), np.linalg.inv(MA)
    C = MBi @ (B.T @ hB) @ MAi
    lam, Q = np.linalg.eigh((MA + MB) / 2)
    Om = Q.T @ (C - C.T) @ Q
    E = Om * (lam[None, :] - lam[:, None]) / (2 * (lam[:, None] + lam[None, :]))
    D = Q @ E @ Q.T / 2
    dB = -(hB - B @ MBi @ B.T @ hB) @ MAi - B @ (C / 2 + D)
    dA = -MBi @ (hA - hA @ A.T @ MAi @ A) - (C / 2 - D) @ A
    return dB, dA


def exact_balanced_flow(grad, B0: np.ndarray, A0: np.ndarray, T: float, *, scale: float = 1.0,
                        rtol: float = 1e-12, atol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """Factors at time T of the balanced flow for the loss whose gradient in ``W = scale B A`` is
    ``grad(W)``, by scipy's DOP853 at tight tolerances."""
    m, r = B0.shape
    n = A0.shape[1]

    def f(_, y):
        B, A = y[: m * r].reshape(m, r), y[m * r:].reshape(r, n)
        dB, dA = balanced_velocity(B, A, grad(scale * B @ A), scale)
        return np.concatenate([dB.ravel(), dA.ravel()])

    sol = solve_ivp(f, (0.0, T), np.concatenate([B0.ravel(), A0.ravel()]), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y = sol.y[:, -1]
    return y[: m * r].reshape(m, r), y[m * r:].reshape(r, n)

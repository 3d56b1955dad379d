import os

os.environ.setdefault("DDE_BACKEND", "pytorch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from odelora import flows

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``fashion_mnist`` (the vision task) skip where the dataset is not installed,
    except under CI, where its absence is a failure with the loader's instructions."""
    from odelora.lab.data import fashion_mnist_available

    if os.environ.get("CI") or fashion_mnist_available():
        return
    skip = pytest.mark.skip(reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (python3 dev.py "
                                   "setup does it as root), or set ODELORA_FASHION_MNIST")
    for item in items:
        if "fashion_mnist" in item.keywords:
            item.add_marker(skip)


def random_factor(rng: np.random.Generator, m: int, r: int, cond: float) -> np.ndarray:
    """An (m, r) matrix with singular values log-spaced from 1 to 1/cond."""
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((r, r)))[0]
    return (U * np.logspace(0, -np.log10(cond), r)) @ V.T


def projection_reference(G: np.ndarray, B: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Tangent projection at BA with orthonormal bases from numpy's SVD (independent of odelora)."""
    U = np.linalg.svd(B, full_matrices=False)[0]
    V = np.linalg.svd(A.T, full_matrices=False)[0]
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


def damped_projection_reference(G: np.ndarray, B: np.ndarray, A: np.ndarray, damping: float) -> np.ndarray:
    """``PU G + G PV - PU G PV`` with ``PU = U diag(x^2 / (x^2 + lam)) U.T`` from numpy's SVD of B
    (``lam = damping * max(x)^2``), PV likewise from A: the projection the balanced flow realizes."""

    def proj(F):
        U, x, _ = np.linalg.svd(F, full_matrices=False)
        if not x.size or x.max() == 0:
            return np.zeros((F.shape[0], F.shape[0]))
        w = x**2 / (x**2 + damping * x.max() ** 2)
        return (U * w) @ U.T

    PU, PV = proj(B), proj(A.T)
    return PU @ G + G @ PV - PU @ G @ PV


def field_for(grad, flow="balanced", param_dtype=None):
    """Velocities of `flow` for the loss whose gradient in W is grad(X), X = s B A. With
    ``param_dtype`` (half precision) the gradient is taken as the optimizer takes it for such
    parameters: at the factors rounded to that dtype, and rounded to it (``.grad`` has the
    parameters' dtype); the flow then works in the state's precision (float32)."""

    def rounded(t):
        return t if param_dtype is None else t.to(param_dtype).to(t.dtype)

    def f(y):
        out = []
        for x in y:
            Bp, Ap = rounded(x.B), rounded(x.A)
            X = x.scale[:, None, None] * Bp @ Ap
            G = grad(X)
            gB, gA = rounded(x.scale[:, None, None] * G @ Ap.mT), rounded(x.scale[:, None, None] * Bp.mT @ G)
            kw = {"frame": x.ensure_frame()} if flows.get_flow(flow).uses_frame else {}
            out.append(flows.get_flow(flow)(x.B, x.A, gB, gA, scale=x.scale, **kw))
        return out

    return f


def dense_truncation(Y, r):
    """The best rank-r approximation of Y (numpy's SVD)."""
    u, s, vt = np.linalg.svd(Y, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def dense_split(Y, A0):
    """P_U1 Y with U1 an orthonormal basis of Y V0, V0 the row space of A0 (numpy)."""
    V0 = np.linalg.qr(A0.T)[0]
    U1 = np.linalg.qr(Y @ V0)[0]
    return U1 @ (U1.T @ Y)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

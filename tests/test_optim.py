"""One suite for the optimizer, parametrized over flows x methods, plus the starts users have:
B = 0, rank-1 gradients, half precision, adaptive methods from the first step."""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from odelora import LoRAPair, NonFiniteError, ODELoRA, StepFailure, balance, imbalance
from odelora.integrators import TABLEAUS

from conftest import dense_truncation, projection_reference

FLOWS = ["balanced", "scaled", "gradient"]
METHODS = list(TABLEAUS)


def problem(seed=0, m=12, n=9, r=2, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * 0.3
    B, A = balance(B, A)
    return Y, B.to(dtype).requires_grad_(), A.to(dtype).requires_grad_()


def make_closure(opt, B, A, Y, scale=1.0, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = 0.5 * ((scale * B.double() @ A.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    return closure


def saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_common_suite(flow, method):
    Y, B, A = problem()
    opt = ODELoRA([LoRAPair(B, A, 1.0, "w")], lr=0.05, method=method, flow=flow, rtol=1e-4, atol=1e-7)
    calls = [0]
    closure = make_closure(opt, B, A, Y, counter=calls)
    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    tab = TABLEAUS[method]
    assert opt.stats.nfe == calls[0]
    if not tab.adaptive:
        assert calls[0] == 5 * tab.stages  # one closure call per stage
    assert losses[-1] < losses[0]
    assert opt.last_step.nfe >= 1 and opt.last_step.accepted
    # resume: a fresh optimizer loaded from a (weights_only) checkpoint continues bit-identically
    buf = saved({"opt": opt.state_dict(), "B": B.detach(), "A": A.detach()})
    for _ in range(3):
        opt.step(closure)
    expect_B, expect_A = B.detach().clone(), A.detach().clone()
    ck = torch.load(buf, weights_only=True)
    B2, A2 = ck["B"].clone().requires_grad_(), ck["A"].clone().requires_grad_()
    opt2 = ODELoRA([(B2, A2)], lr=0.05, method=method, flow=flow, rtol=1e-4, atol=1e-7)
    opt2.load_state_dict(ck["opt"])
    closure2 = make_closure(opt2, B2, A2, Y)
    for _ in range(3):
        opt2.step(closure2)
    assert torch.equal(B2.detach(), expect_B) and torch.equal(A2.detach(), expect_A)
    assert opt2.param_groups[0]["t"] == opt.param_groups[0]["t"]
    assert opt2.stats == opt.stats


# ---------------------------------------------------------------- where users start


def readme_problem(dtype, seed=0):
    torch.manual_seed(seed)
    Y = torch.randn(30, 3) @ torch.randn(3, 20)
    B = torch.zeros(30, 3, dtype=dtype, requires_grad=True)  # PEFT's start
    A = (0.1 * torch.randn(3, 20)).to(dtype).requires_grad_()
    return Y, B, A


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_method_converges_from_B_zero(method, dtype, retraction):
    Y, B, A = readme_problem(dtype)
    opt = ODELoRA([(B, A)], lr=0.5, method=method, retraction=retraction)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B.float() @ A.float() - Y) ** 2).sum()
        loss.backward()
        return loss

    l0 = float(closure().detach())
    for _ in range(60):
        opt.step(closure)
    final = float(closure().detach())
    assert final < (1e-8 if dtype == torch.float32 else 1e-3) * l0, (method, final / l0)
    assert opt.stats.skipped == 0 and opt.stats.nonfinite == 0


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_bfloat16_converges_from_B_zero_along_the_float64_path(method):
    """The README problem from B = 0 with bfloat16 factors (the sweep above covers float32 and
    float16), default retraction, full-batch gradients (rank 3 = r: no rank-deficient step after
    the first). The only limit on bfloat16 is that the factors are stored rounded to it (unit
    roundoff eps/2 = 3.9e-3; the steps compute in float32): the product then sits within about one
    eps of the float64 run's at every one of 20 steps (0.71 eps for Euler, 0.78 for RK4, measured,
    relative Frobenius) and the loss stops where that rounding puts it, |X - Y| / |Y| = 0.71 and
    0.78 eps (loss / l0 = 0.50 and 0.62 eps^2), while float64 goes on to 3e-12 and 2e-9. Bounds:
    1.5 eps for the distance at each step and (1.5 eps)^2 for the loss. Writing the factors by
    chopping (rounding toward zero) instead of rounding to nearest already doubles both (2.1 and
    2.4 eps)."""
    eps = torch.finfo(torch.bfloat16).eps

    def run(dtype):
        Y, B, A = readme_problem(dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        Y = Y.to(work)
        opt = ODELoRA([(B, A)], lr=0.5, method=method)

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((B.to(work) @ A.to(work) - Y) ** 2).sum()
            loss.backward()
            return loss

        l0 = float(closure().detach())
        products = []
        for _ in range(20):
            opt.step(closure)
            products.append(B.detach().double() @ A.detach().double())
        assert B.dtype == dtype and A.dtype == dtype and opt.stats.skipped == 0
        return float(closure().detach()) / l0, products

    ratio, got = run(torch.bfloat16)
    ratio64, ref = run(torch.float64)
    apart = max(float((X - R).norm() / R.norm()) for X, R in zip(got, ref)) / eps
    assert ratio64 < 1e-8, ratio64  # the reference itself converges
    assert ratio < (1.5 * eps) ** 2, ratio / eps**2
    assert apart < 1.5, apart


def linear_regression(dtype, m=48, n=32, r=8, seed=0):
    """W0 + s B A fitted to a rank-4 change, from PEFT's start (B = 0, A random)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    dW = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64) / n**0.5
    X = torch.randn(64, n, generator=g, dtype=torch.float64)
    Yt = X @ (W0 + dW).T
    B = torch.zeros(m, r, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5).to(dtype).requires_grad_()
    return W0, X, Yt, B, A


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["euler", "rk4", "bs32", "dopri5"])
def test_rank_one_gradients_from_peft_start_never_blow_up(method, dtype, retraction):
    check_rank_one_gradients_from_peft_start(method, dtype, retraction)


def check_rank_one_gradients_from_peft_start(method, dtype, retraction, device="cpu"):
    """A batch of one: every gradient has rank 1, the factors pass through near rank deficiency.
    Each accepted step moves the product by at most 2 h sum_j |b_j| |G_j| (G_j the full gradient
    at stage j, computed densely here), and the full-batch loss goes down."""
    W0, X, Yt, B, A = (t.detach().to(device) for t in linear_regression(dtype))
    B, A = B.requires_grad_(), A.requires_grad_()
    s, lr = 2.0, 0.01
    opt = ODELoRA([(B, A, s)], lr=lr, method=method, retraction=retraction)
    tab = TABLEAUS[method]

    def full_loss():
        return float(0.5 * ((X @ (W0 + s * B.detach().double() @ A.detach().double()).T - Yt) ** 2).mean(0).sum())

    l0 = full_loss()
    for i in range(120):
        x, y = X[i % 64 : i % 64 + 1], Yt[i % 64 : i % 64 + 1]
        gnorms = []

        def closure():
            opt.zero_grad()
            W = W0 + s * B.double() @ A.double()
            r_ = x @ W.T - y
            gnorms.append(float((r_.T @ x).detach().norm()))  # |dL/dW| at this stage
            loss = 0.5 * (r_**2).sum()
            loss.backward()
            return loss

        X0 = s * B.detach().double() @ A.detach().double()
        opt.step(closure)
        moved = float((s * B.detach().double() @ A.detach().double() - X0).norm())
        h = opt.last_step.h
        slack = 1.05 if dtype in (torch.float64, torch.float32) else 1.3  # rounding of half-precision factors
        assert moved <= slack * 2 * h * sum(abs(b) for b in tab.b) * max(gnorms) + 1e-6, (i, moved, h, gnorms)
        assert all(math.isfinite(float(p.detach().abs().max())) for p in (B, A))
    assert full_loss() < 0.5 * l0, (full_loss(), l0)


@pytest.mark.parametrize("retraction", ["truncate", "split"])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_float32_follows_float64_from_peft_start_with_rank_one_gradients(method, retraction):
    """PEFT's start (B = 0, A random) with batches of one row, so every gradient has rank 1 and
    the product passes through ranks below r at each of 10 steps (lr 0.05, s = 2): a model in
    float32 (parameters and data) must end where the same run in float64 ends, up to float32
    rounding carried through the steps: 1e-5 relative Frobenius (85 eps; measured 1.7e-6 for
    Euler, 1.5e-6 for RK4, both retractions). The rank-deficient starts are where precision
    enters the method (the rounding-level singular values are dropped on a float32 scale): taking
    that scale from float64's eps leaves float32 products 0.26 (Euler) and 0.08 (RK4) away.
    Error-controlled methods are left out: their accept/reject decisions differ across
    precisions, and so do their steps."""

    def run(dtype):
        W0, X, Yt, B, A = linear_regression(dtype)
        W0, X, Yt = W0.to(dtype), X.to(dtype), Yt.to(dtype)
        s = 2.0
        opt = ODELoRA([(B, A, s)], lr=0.05, method=method, retraction=retraction)
        for i in range(10):
            x, y = X[i : i + 1], Yt[i : i + 1]

            def closure():
                opt.zero_grad()
                loss = 0.5 * ((x @ (W0 + s * B @ A).T - y) ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        return s * B.detach().double() @ A.detach().double()

    X32, X64 = run(torch.float32), run(torch.float64)
    err = float((X32 - X64).norm() / X64.norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("method", ["bs32", "dopri5"])
@pytest.mark.parametrize("lr", [0.005, 0.02, 0.03, 0.05, 0.2])
def test_adaptive_methods_leave_peft_start_in_few_tries(method, lr):
    """From ``B = 0`` the relative error of a step does not shrink with h until ``atol``
    dominates (the velocity jumps as the product leaves zero). The controller must find that
    step in a few tries, then grow back: every step accepted, the gradient flow's loss never
    rises, and the integration time reaches most of ``lr`` per step."""
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    B = torch.zeros(30, 3, requires_grad=True)
    A = (0.1 * torch.randn(3, 20, generator=g)).requires_grad_()
    opt = ODELoRA([(B, A)], lr=lr, method=method)
    closure = make_closure(opt, B, A, Y)
    losses, tries = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            losses.append(float(opt.step(closure).detach()))
            tries.append(opt.last_step.rejected)
    assert opt.stats.skipped == 0 and tries[0] <= 4 and sum(tries[1:]) <= 2, tries
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert opt.last_step.t >= 0.6 * 40 * lr, (opt.last_step.t, lr)


def test_adaptive_steps_from_B_zero_approach_the_flow_as_tolerances_tighten():
    """The product's flow is singular at zero: how it leaves zero decides where it goes (flows
    started at ``X(d) = d Y PV`` differ by ``d^0.2-0.3``), and the embedded error estimate of a
    step from ``B = 0`` misses the jump of the velocity (``b_1`` and ``bhat_1`` nearly agree).
    Against scipy's solution from ``d = 1e-12``, the product at t = 1 is within 10% at the default
    tolerances (6.1% measured) and the error falls as the tolerances tighten (0.8% at rtol 1e-6)."""
    import scipy.integrate

    m, n, r = 12, 10, 2
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(m, n, generator=g, dtype=torch.float64)
    A0 = 0.3 * torch.randn(r, n, generator=g, dtype=torch.float64)
    Yn, An = Y.numpy(), A0.numpy()

    def flow(t, x):  # dX = -P_T(X) G, bases from numpy's SVD of X
        X = x.reshape(m, n)
        U, _, Vh = np.linalg.svd(X)
        PU, PV = U[:, :r] @ U[:, :r].T, Vh[:r].T @ Vh[:r]
        G = X - Yn
        return -(PU @ G + G @ PV - PU @ G @ PV).ravel()

    d = 1e-12
    start = d * Yn @ An.T @ np.linalg.pinv(An.T)  # d times the velocity at zero, -G PV
    ref = scipy.integrate.solve_ivp(flow, (d, 1.0), start.ravel(), method="DOP853", rtol=1e-11, atol=1e-14).y[:, -1].reshape(m, n)

    def error(**tol):
        B = torch.zeros(m, r, dtype=torch.float64, requires_grad=True)
        A = A0.clone().requires_grad_()
        opt = ODELoRA([(B, A)], lr=0.2, method="dopri5", **tol)
        closure = make_closure(opt, B, A, Y)
        while opt.last_step.t < 1 - 1e-12:
            opt.param_groups[0]["lr"] = min(0.2, 1 - opt.last_step.t)
            opt.step(closure)
        return np.linalg.norm((B @ A).detach().numpy() - ref) / np.linalg.norm(ref)

    loose, tight = error(), error(rtol=1e-6, atol=1e-10)
    assert loose < 0.1 and tight < 0.015 and tight < loose / 3, (loose, tight)


@pytest.mark.parametrize("method", ["bs32", "dopri5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_flow_with_adaptive_methods_trains_from_B_zero(method, dtype):
    """Scaled GD's factor ODE is stiff just off ``B = 0``; stepped in factor space, no step met the
    tolerance and training stalled at t = 1e-24. With an error-controlled method the scaled flow
    steps the product (the truncation) unless told otherwise."""
    g = torch.Generator().manual_seed(0)
    Y = (torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)).to(dtype)
    B = torch.zeros(30, 3, dtype=dtype, requires_grad=True)
    A = (0.1 * torch.randn(3, 20, generator=g)).to(dtype).requires_grad_()
    opt = ODELoRA([(B, A)], lr=0.2, method=method, flow="scaled")
    assert opt.retraction.name == "truncate"
    assert ODELoRA([(B, A)], lr=0.2, method="euler", flow="scaled").retraction.name == "none"  # scaled GD
    closure = make_closure(opt, B, A, Y)
    l0 = float(closure().detach())
    for _ in range(40):
        opt.step(closure)
    assert opt.stats.skipped == 0 and opt.last_step.t > 4, (opt.stats, opt.last_step)
    assert float(closure().detach()) < 1e-8 * l0


def test_a_collapsed_adaptive_step_fails_loudly():
    """Scaled GD's factor ODE stepped in factor space from ``B = 0`` (asked for explicitly): no
    step fits, and the step size must not shrink towards zero while steps are 'accepted' (float32
    once stood still at t = 1e-24 with one skipped step); it stops at 1e-12 x lr, every try there
    is rejected, and after ``max_skipped_steps`` a StepFailure says what to change."""
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    B = torch.zeros(30, 3, requires_grad=True)
    A = (0.1 * torch.randn(3, 20, generator=g)).requires_grad_()
    with pytest.warns(UserWarning, match=r"start at B = 0 \(pair0\), where this flow's adaptive factor-space steps"):
        opt = ODELoRA([(B, A)], lr=0.2, method="bs32", flow="scaled", retraction="none")
    closure = make_closure(opt, B, A, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StepFailure, match=r"floor, 1e-12 x lr.*retraction='truncate'"):
            for _ in range(100):
                opt.step(closure)
    assert float(B.detach().abs().max()) == 0.0 and opt.last_step.t == 0.0


def test_scaled_flow_adaptive_steps_follow_its_product_flow():
    """Against scipy's solution of ``dX = -(PU G + G PV)`` (bases from numpy's SVD of X)."""
    import scipy.integrate

    Y, B, A = problem()
    m, n, r = Y.shape[0], Y.shape[1], B.shape[1]
    Yn = Y.numpy()

    def flow(t, x):
        X = x.reshape(m, n)
        U, _, Vh = np.linalg.svd(X)
        G = X - Yn
        return -(U[:, :r] @ U[:, :r].T @ G + G @ Vh[:r].T @ Vh[:r]).ravel()

    X0 = (B @ A).detach().numpy()
    ref = scipy.integrate.solve_ivp(flow, (0, 1), X0.ravel(), method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1].reshape(m, n)
    opt = ODELoRA([(B, A)], lr=0.1, method="dopri5", flow="scaled", rtol=1e-8, atol=1e-10)
    closure = make_closure(opt, B, A, Y)
    while opt.last_step.t < 1 - 1e-12:
        opt.param_groups[0]["lr"] = min(0.1, 1 - opt.last_step.t)
        opt.step(closure)
    err = np.linalg.norm((B @ A).detach().numpy() - ref) / np.linalg.norm(ref - X0)
    assert err < 1e-6, err


def test_adaptive_method_recovers_from_a_non_finite_stage():
    """A stage that lands where the loss is NaN is a rejected attempt with a smaller h, not a
    skipped step: the loss here is NaN once |BA| exceeds a bound that large steps cross."""
    Y, B, A = problem(20)
    opt = ODELoRA([(B, A)], lr=50.0, method="dopri5")

    def closure():
        opt.zero_grad()
        X = B.double() @ A.double()
        loss = 0.5 * ((X - Y) ** 2).sum()
        if float(X.detach().norm()) > 1.5 * float(Y.norm()):
            loss = loss * float("nan")
        loss.backward()
        return loss

    l0 = float(closure().detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            opt.step(closure)
    assert opt.stats.nonfinite > 0 and opt.stats.skipped == 0
    assert float(closure().detach()) < 1e-6 * l0


# ---------------------------------------------------------------- failure policy


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_nonfinite_first_stage_skips_the_step_untouched(flow, method):
    """Parameters, time and (adaptive methods) the step size stay. For dopri5 lr = 0.5 makes the
    controller's step fraction ``_rho`` differ from 1 (at 0.05 it stays 1, where a reset would pass
    unseen); fixed-step methods keep no step size. Without a preconditioner there is no state per
    parameter: Adam's moments across a skip are checked below."""
    Y, B, A = problem(1)
    lr = 0.5 if TABLEAUS[method].adaptive else 0.05
    opt = ODELoRA([(B, A)], lr=lr, method=method, flow=flow)
    closure = make_closure(opt, B, A, Y)
    opt.step(closure)
    before = (B.detach().clone(), A.detach().clone(), opt.param_groups[0]["t"], opt._rho)
    if TABLEAUS[method].adaptive:
        assert before[3] != 1.0
    with pytest.warns(RuntimeWarning, match="skipped a step: the loss is nan"):
        opt.step(lambda: closure() * float("nan"))
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
    assert opt.param_groups[0]["t"] == before[2]
    if TABLEAUS[method].adaptive:
        assert opt._rho == before[3]
    assert opt.stats.skipped == 1 and not opt.last_step.accepted
    assert not opt.state
    strict = ODELoRA([(B, A)], lr=0.05, method=method, flow=flow, on_nonfinite="raise")
    with pytest.raises(NonFiniteError):
        strict.step(lambda: closure() * float("inf"))
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_skipped_step_keeps_adam_moments_also_after_a_resume(method):
    """With ``preconditioner="adam"`` a step skipped for a NaN loss leaves ``exp_avg``,
    ``exp_avg_sq`` and ``step`` exactly as they were (compared with copies taken before), also in
    a fresh optimizer resumed from a (weights_only) checkpoint, whose moments equal the saved ones
    bit for bit; the next good steps of both then agree bit for bit."""
    Y, B, A = problem(1)
    opt = ODELoRA([(B, A)], lr=0.05, method=method, preconditioner="adam")
    closure = make_closure(opt, B, A, Y)
    for _ in range(3):
        opt.step(closure)
    keys = ("exp_avg", "exp_avg_sq", "step")
    before = [{k: opt.state[p][k].clone() for k in keys} for p in (B, A)]
    assert all(int(st["step"]) == 3 for st in before)
    buf = saved({"opt": opt.state_dict(), "B": B.detach(), "A": A.detach()})

    def same_state(o, params):
        return all(torch.equal(o.state[p][k], st[k]) for p, st in zip(params, before) for k in keys)

    with pytest.warns(RuntimeWarning, match="skipped a step: the loss is nan"):
        opt.step(lambda: closure() * float("nan"))
    assert same_state(opt, (B, A)) and opt.stats.skipped == 1
    ck = torch.load(buf, weights_only=True)
    B2, A2 = ck["B"].clone().requires_grad_(), ck["A"].clone().requires_grad_()
    opt2 = ODELoRA([(B2, A2)], lr=0.05, method=method, preconditioner="adam")
    opt2.load_state_dict(ck["opt"])
    assert same_state(opt2, (B2, A2))
    closure2 = make_closure(opt2, B2, A2, Y)
    with pytest.warns(RuntimeWarning, match="skipped a step: the loss is nan"):
        opt2.step(lambda: closure2() * float("nan"))
    assert same_state(opt2, (B2, A2))
    for _ in range(2):
        opt.step(closure)
        opt2.step(closure2)
    assert torch.equal(B2.detach(), B.detach()) and torch.equal(A2.detach(), A.detach())
    assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for p, q in ((B, B2), (A, A2)) for k in keys)


@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_nonfinite_later_stage_retries_with_smaller_step(method):
    Y, B, A = problem(2)
    opt = ODELoRA([(B, A)], lr=0.1, method=method)
    closure = make_closure(opt, B, A, Y)
    calls = [0]

    def flaky():
        calls[0] += 1
        loss = closure()
        return loss * float("nan") if calls[0] == 2 else loss

    opt.step(flaky)
    rec = opt.last_step
    assert rec.accepted and rec.nonfinite == 1 and rec.rejected == 1
    assert rec.h == pytest.approx(0.1 * opt.controller.shrink)
    assert opt.param_groups[0]["t"] == pytest.approx(rec.h)
    opt.step(closure)
    assert opt.last_step.h == pytest.approx(0.1)  # fixed-step methods return to lr


def test_steps_non_finite_at_every_later_stage_are_skipped_saying_so():
    Y, B, A = problem(2)
    opt = ODELoRA([(B, A)], lr=0.1, method="rk4", max_rejects=3, on_nonfinite="raise")
    closure = make_closure(opt, B, A, Y)
    calls = [0]

    def overflowing():
        calls[0] += 1
        loss = closure()
        return loss * float("inf") if calls[0] > 1 else loss

    before = (B.detach().clone(), A.detach().clone())
    with pytest.raises(NonFiniteError, match="a later stage was non-finite .* in all 4 tries") as err:
        opt.step(overflowing)
    assert "rtol" not in str(err.value) and torch.equal(B, before[0]) and torch.equal(A, before[1])
    with pytest.raises(ValueError, match="take 'pairs', not 'params'"):
        ODELoRA([{"params": [B, A], "lr": 0.1}])


@pytest.mark.parametrize("max_rejects", [10, 0])
def test_a_step_non_finite_at_every_try_shortens_the_next_by_one_shrink(max_rejects):
    """Every try of a dopri5 step non-finite at a later stage (a bad batch, or a step too long):
    the step is skipped and the next starts ``shrink`` (0.2) times shorter, not at the last size
    tried (0.2^11 times shorter with the default 11 tries, a dozen steps to grow back); with one
    try per step, repeated skips still shorten it geometrically."""
    Y, B, A = problem(2)
    opt = ODELoRA([(B, A)], lr=0.5, method="dopri5", max_rejects=max_rejects)
    closure = make_closure(opt, B, A, Y)
    with warnings.catch_warnings():  # with one try per step, some of these miss the tolerance
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            opt.step(closure)
    rho, shrink = opt.state_dict()["odelora"]["rho"], opt.controller.shrink
    for k in (1, 2):
        calls = [0]

        def bad():
            calls[0] += 1
            loss = closure()
            return loss * float("nan") if calls[0] > 1 else loss

        tries = "the one try" if max_rejects == 0 else f"all {max_rejects + 1} tries"
        with pytest.warns(RuntimeWarning, match=f"a later stage was non-finite .* in {tries}"):
            opt.step(bad)
        assert not opt.last_step.accepted and opt.last_step.rejected == max_rejects + 1
        assert opt.state_dict()["odelora"]["rho"] == pytest.approx(rho * shrink**k, rel=1e-12)
    opt.step(closure)
    assert opt.last_step.accepted and opt.last_step.h == pytest.approx(0.5 * rho * shrink**2, rel=1e-12)


def test_raise_on_nonfinite_spares_a_step_skipped_at_its_tolerance_after_one_non_finite_try():
    """``on_nonfinite="raise"`` raises for steps skipped at a non-finite value (at the start, at a
    later stage of every try, an overflow). A step whose first try met a NaN at a later stage and
    whose retry missed the tolerance was skipped at its tolerance: a warning that counts the NaN
    try, not a NonFiniteError."""
    Y, B, A = problem(0, m=8, n=6)
    opt = ODELoRA([(B, A)], lr=2.0, method="dopri5", rtol=1e-10, atol=1e-12, max_rejects=1, on_nonfinite="raise")
    B0 = B.detach().clone()
    calls = [0]

    def closure():
        calls[0] += 1
        loss = make_closure(opt, B, A, Y)()
        if calls[0] == 2:  # the first try's second stage
            A.grad[0, 0] = float("nan")
        return loss

    with pytest.warns(RuntimeWarning, match="no step met .* in all 2 tries, 1 of them non-finite at a later stage"):
        opt.step(closure)
    assert opt.last_step.rejected == 2 and opt.last_step.nonfinite == 1 and torch.equal(B.detach(), B0)
    later = [0]

    def nan_after_the_first_stage():
        later[0] += 1
        loss = make_closure(opt, B, A, Y)()
        return loss if later[0] == 1 else loss * float("nan")

    with pytest.raises(NonFiniteError, match="a later stage was non-finite .* in all 2 tries"):  # every try: raised
        opt.step(nan_after_the_first_stage)
    assert torch.equal(B.detach(), B0)


def test_consecutive_failures_raise_naming_the_pair():
    Y, B, A = problem(3)
    B2, A2 = problem(4)[1:]
    opt = ODELoRA([LoRAPair(B, A, 1.0, "layer.q"), LoRAPair(B2, A2, 1.0, "layer.v")], lr=0.1, max_skipped_steps=3)

    def bad():
        opt.zero_grad()
        loss = 0.5 * ((B @ A - Y) ** 2).sum() + 0.5 * ((B2 @ A2 - Y) ** 2).sum()
        loss.backward()
        B2.grad[0, 0] = float("inf")
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite gradient in layer.v"):
        opt.step(bad)
        opt.step(bad)
    with pytest.raises(StepFailure, match="layer.v.*3 skipped steps in a row.*Lower lr"):
        opt.step(bad)


def test_a_good_step_resets_the_skip_count_and_a_resume_keeps_it():
    """``max_skipped_steps`` counts skips *in a row*: with 3, bad, bad, good, bad, bad (bad: a NaN
    loss) raises nothing, since the good step starts the count again. The count is part of the
    state: a fresh optimizer loaded after those two skips fails at the next bad step."""
    Y, B, A = problem(3)
    opt = ODELoRA([(B, A)], lr=0.1, max_skipped_steps=3)
    good = make_closure(opt, B, A, Y)
    bad = make_closure(opt, B, A, Y * float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        for closure in (bad, bad, good, bad, bad):
            opt.step(closure)
    assert opt.stats.skipped == 4 and opt.stats.accepted == 1
    sd = torch.load(saved(opt.state_dict()), weights_only=True)
    opt2 = ODELoRA([(B, A)], lr=0.1, max_skipped_steps=3)
    opt2.load_state_dict(sd)
    assert repr(opt2.last_step) == repr(opt.last_step) and not opt2.last_step.accepted and opt2.last_step.nfe == 1  # (loss NaN)
    older = {**sd, "odelora": {k: v for k, v in sd["odelora"].items() if k != "last_step"}}
    ODELoRA([(B, A)], lr=0.1).load_state_dict(older)  # checkpoints of earlier versions hold none
    with pytest.raises(StepFailure, match="3 skipped steps in a row"):
        opt2.step(make_closure(opt2, B, A, Y * float("nan")))


@pytest.mark.parametrize("method", ["bs32", "dopri5"])
def test_one_try_per_step_leaves_b_zero_in_a_few_skipped_steps_and_resumes_exactly(method):
    """With ``max_rejects=0`` a rejected try skips the step. Off ``B = 0`` the error of a step does
    not fall with h until atol dominates, so the textbook shrink (0.8 here) needed more skipped
    steps in a row than ``max_skipped_steps`` allows (StepFailure at the 10th). The controller now
    compares the skipped steps as it compares tries within a step and cuts h 25-fold; the last
    rejected try is part of the state, so a run resumed after a skip continues bit for bit."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g)
    B = torch.zeros(64, 4, requires_grad=True)
    A = (torch.randn(4, 48, generator=g) / 48**0.5).requires_grad_()
    opt = ODELoRA([(B, A)], lr=0.5, method=method, max_rejects=0)

    def closure_of(opt, B, A):
        def closure():
            opt.zero_grad()
            loss = 0.5 * ((B @ A - W) ** 2).sum()
            loss.backward()
            return loss
        return closure

    closure = closure_of(opt, B, A)
    first = float(closure().detach())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(closure)
        assert opt.stats.skipped == 1
        copy_B, copy_A = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
        resumed = ODELoRA([(copy_B, copy_A)], lr=0.5, method=method, max_rejects=0)
        resumed.load_state_dict(torch.load(saved(opt.state_dict()), weights_only=True))
        for _ in range(29):
            opt.step(closure)
        for _ in range(29):
            resumed.step(closure_of(resumed, copy_B, copy_A))
    assert opt.stats.skipped <= 5 and opt.stats.accepted >= 25, opt.stats
    assert float(closure()) < 0.9 * first
    assert torch.equal(copy_B, B.detach()) and torch.equal(copy_A, A.detach())


def test_nan_gradient_without_closure_is_skipped():
    Y, B, A = problem(2)
    opt = ODELoRA([(B, A)], lr=0.1)
    B0 = B.detach().clone()
    B.grad = torch.full_like(B, float("nan"))
    A.grad = torch.zeros_like(A)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(B.detach(), B0)


def test_grad_scaler_steps_euler_on_unscaled_gradients_and_refuses_multi_stage_methods():
    """fp16 loss scaling (torch.amp.GradScaler): scaler.step(opt) takes Euler's step of the
    unscaled gradients (power-of-two scales: the same bits as without a scaler), the companion's
    too, also after scaler.unscale_(opt) for clipping; an inf gradient skips the step without
    calling it (accelerate and the Trainer tell a skipped step so) and halves the scale.
    Multi-stage methods, whose closure's backward the scaler never unscales, are refused (RK4 took
    a step 75 times too long), and the refusal leaves nothing behind on the optimizer."""
    Y, B, A = problem(7, dtype=torch.float32)
    bias = torch.zeros(9, requires_grad=True)

    def loss_of(B, A, bias):
        return 0.5 * ((B.double() @ A.double() + bias.double() - Y) ** 2).sum()

    def build(B, A, bias, **kw):
        return ODELoRA([(B, A)], lr=0.05, companion=[bias], companion_lr=0.1, **kw)

    ref = [t.detach().clone().requires_grad_() for t in (B, A, bias)]
    ref_opt = build(*ref)
    opt = build(B, A, bias)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for i in range(3):
        ref_opt.zero_grad()
        loss_of(*ref).backward()
        ref_opt.step()
        opt.zero_grad()
        scaler.scale(loss_of(B, A, bias)).backward()
        if i == 2:
            scaler.unscale_(opt)  # as before clipping
        scaler.step(opt)
        scaler.update()
        assert all(torch.equal(t.detach(), r.detach()) for t, r in zip((B, A, bias), ref))
    assert opt.stats.steps == 3 and len(calls) == 3

    before = [t.detach().clone() for t in (B, A, bias)]
    opt.zero_grad()
    scaler.scale(loss_of(B, A, bias) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(t.detach(), b) for t, b in zip((B, A, bias), before))
    assert scaler.get_scale() == 2.0**15 and len(calls) == 3

    o = build(B, A, bias, method="rk4")
    o.zero_grad()
    scaler.scale(loss_of(B, A, bias)).backward()
    with pytest.raises(ValueError, match="GradScaler.*method 'rk4'.*bfloat16"):
        scaler.step(o, make_closure(o, B, A, Y))
    assert all(torch.equal(t.detach(), b) for t, b in zip((B, A, bias), before))
    # the refused optimizer steps without a scaler as a new one does
    copies = [t.detach().clone().requires_grad_() for t in (B, A, bias)]
    fresh = build(*copies, method="rk4")
    fresh.step(make_closure(fresh, *copies[:2], Y))
    o.step(make_closure(o, B, A, Y))
    assert all(torch.equal(t.detach(), c.detach()) for t, c in zip((B, A), copies[:2]))


def test_closure_returning_none_is_allowed():
    Y, B, A = problem(5)
    opt = ODELoRA([(B, A)], lr=0.2, method="rk4")

    def closure():
        opt.zero_grad()
        (0.5 * ((B @ A - Y) ** 2).sum()).backward()

    l0 = float(0.5 * ((B @ A - Y) ** 2).sum().detach())
    for _ in range(20):
        assert opt.step(closure) is None
    assert float(0.5 * ((B @ A - Y) ** 2).sum().detach()) < 1e-3 * l0 and opt.last_step.loss is None


def test_load_state_dict_validates_with_clear_errors():
    Y, B, A = problem(6)
    opt = ODELoRA([(B, A)], lr=0.1, method="euler", preconditioner="adam")
    opt.step(make_closure(opt, B, A, Y))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="expected the keys 'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})
    bad = {**sd, "param_groups": [{**sd["param_groups"][0], "lr": -1.0}]}
    with pytest.raises(ValueError, match="lr must be a non-negative finite"):
        opt.load_state_dict(bad)
    bad = {**sd, "param_groups": [{**sd["param_groups"][0], "lr": float("nan")}]}
    with pytest.raises(ValueError, match="lr must be a non-negative finite"):
        opt.load_state_dict(bad)
    Y2, B2, A2 = problem(7, m=10)
    other = ODELoRA([(B2, A2)], lr=0.1, preconditioner="adam")
    with pytest.raises(ValueError, match=r"saved for pairs 1 of 12 x 2 x 9 .*has 1 of 10 x 2 x 9"):
        other.load_state_dict(sd)
    older = {**sd, "odelora": {k: v for k, v in sd["odelora"].items() if k not in ("layout", "frames")}}
    with pytest.raises(ValueError, match="has shape"):  # a state without the layout: the moments' shapes are checked
        other.load_state_dict(older)
    head = torch.zeros(3, requires_grad=True)  # same pairs, and a companion group more
    with pytest.raises(ValueError, match="the state dict has 1 param groups, this optimizer 2"):
        ODELoRA([(B, A)], lr=0.1, preconditioner="adam", companion=[head]).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"LoRA scales differ \(\[1.0\] saved, \[2.0\] here\): .*same lora_alpha and r"):
        ODELoRA([(B, A, 2.0)], lr=0.1, preconditioner="adam").load_state_dict(sd)
    opt.load_state_dict(sd)  # the valid one still loads


# ---------------------------------------------------------------- semantics


def test_euler_without_closure_uses_grad_and_multistage_needs_closure():
    Y, B, A = problem(3)
    opt = ODELoRA([(B, A)], lr=0.1)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step()
    loss = 0.5 * ((B @ A - Y) ** 2).sum()
    loss.backward()
    G = (B @ A - Y).detach().numpy()
    X0 = (B @ A).detach().numpy()
    Bn, An = B.detach().numpy().copy(), A.detach().numpy().copy()
    opt.step()
    # one Euler step is the rank-2 truncation of X0 - h P(G) (numpy's SVDs for P and the truncation)
    X_ref = dense_truncation(X0 - 0.1 * projection_reference(G, Bn, An), 2)
    X1 = (B @ A).detach().numpy()
    assert np.linalg.norm(X1 - X_ref) <= 1e-12 * np.linalg.norm(X_ref - X0), np.linalg.norm(X1 - X_ref)
    with pytest.raises(ValueError, match="closure"):
        ODELoRA([(B, A)], lr=0.1, method="rk4").step()


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
def test_a_group_added_after_a_load_or_a_copy_takes_its_steps(how):
    """The loaded (or copied) state's frames describe the groups it was saved with; a group added
    afterwards is packed from its parameters and takes the Euler step (explicit projection)."""
    Y, B, A = problem(30)
    opt = ODELoRA([(B, A)], lr=0.1)
    opt.step(make_closure(opt, B, A, Y))
    if how == "deepcopy":
        B, A = (t.detach().clone().requires_grad_() for t in (B, A))
        state = copy.deepcopy({"opt": opt, "B": B, "A": A})
        opt2, B, A = state["opt"], state["opt"].param_groups[0]["params"][0], state["opt"].param_groups[0]["params"][1]
    else:
        opt2 = ODELoRA([(B, A)], lr=0.1)
        opt2.load_state_dict(opt.state_dict())
    Y2, B2, A2 = problem(31, m=7, n=5)
    opt2.add_param_group({"pairs": [(B2, A2)], "lr": 0.05})
    G = (B2 @ A2 - Y2).detach().numpy()
    X0 = (B2 @ A2).detach().numpy()
    ref = dense_truncation(X0 - 0.05 * projection_reference(G, B2.detach().numpy(), A2.detach().numpy()), 2)

    def closure():
        opt2.zero_grad()
        loss = 0.5 * ((B @ A - Y) ** 2).sum() + 0.5 * ((B2 @ A2 - Y2) ** 2).sum()
        loss.backward()
        return loss

    opt2.step(closure)
    X1 = (B2 @ A2).detach().numpy()
    assert np.linalg.norm(X1 - ref) <= 1e-10 * np.linalg.norm(ref - X0)


def test_euler_step_is_first_order_in_h():
    """||X1 - X0 + h P(G)|| = O(h^2) against an explicit projection."""
    res = []
    for h in (1e-2, 1e-3, 1e-4):
        Y, B, A = problem(4)
        G = (B @ A - Y).detach().numpy()
        P = projection_reference(G, B.detach().numpy(), A.detach().numpy())
        X0 = (B @ A).detach().numpy()
        opt = ODELoRA([(B, A)], lr=h)
        opt.step(make_closure(opt, B, A, Y))
        res.append(np.linalg.norm((B @ A).detach().numpy() - X0 + h * P))
    assert res[1] / res[0] < 0.02 and res[2] / res[1] < 0.02


def test_scheduler_changes_h_and_time():
    Y, B, A = problem(5)
    opt = ODELoRA([(B, A)], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    closure = make_closure(opt, B, A, Y)
    hs = []
    for _ in range(3):
        opt.step(closure)
        hs.append(opt.last_step.h)
        sched.step()
    assert hs == [0.2, 0.1, 0.05]
    assert opt.param_groups[0]["t"] == pytest.approx(0.35)
    assert "h" not in opt.param_groups[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    Y, B, A = problem(6, dtype=dtype)
    opt = ODELoRA([(B, A)], lr=0.3, method="heun")
    closure = make_closure(opt, B, A, Y)
    first = float(opt.step(closure).detach())
    for _ in range(30):
        last = float(opt.step(closure).detach())
    assert B.dtype == dtype and A.dtype == dtype
    assert last < 0.05 * first
    assert float(imbalance(B.detach(), A.detach())) < 0.05


def test_euler_h_half_reaches_machine_precision_and_is_factorization_invariant():
    Y, B, A = problem(7, m=15, n=11, r=3)
    traj = []
    for refactor in (False, True):
        B1, A1 = B.detach().clone(), A.detach().clone()
        if refactor:
            R = torch.tensor([[2.0, 0.3, -1.0], [0.0, 0.5, 0.7], [0.1, 0.0, 3.0]], dtype=torch.float64)
            B1, A1 = B1 @ R, torch.linalg.solve(R, A1)  # same product, unbalanced factors
        B1.requires_grad_(), A1.requires_grad_()
        opt = ODELoRA([(B1, A1)], lr=0.5)
        closure = make_closure(opt, B1, A1, Y)
        xs = []
        for _ in range(150):
            opt.step(closure)
            xs.append((B1 @ A1).detach().clone())
        traj.append(torch.stack(xs))
    assert float(closure().detach()) < 1e-12
    assert float((traj[0] - traj[1]).abs().max()) < 1e-10


def test_adaptive_rejects_and_shrinks_with_untouched_retries():
    Y, B, A = problem(8)
    opt = ODELoRA([(B, A)], lr=5.0, method="bs32", rtol=1e-8, atol=1e-10, max_rejects=30)
    opt.step(make_closure(opt, B, A, Y))
    rec = opt.last_step
    assert rec.rejected > 0 and rec.accepted
    assert rec.h < 5.0 and opt.param_groups[0]["t"] == pytest.approx(rec.h)
    assert rec.nfe == 4 + 3 * rec.rejected  # each retry reuses the first stage


def test_param_groups_and_input_forms():
    Y, B, A = problem(9)
    Y2, B2, A2 = problem(10)
    opt = ODELoRA([{"pairs": [(B, A)], "lr": 0.1}, {"pairs": [{"B": B2, "A": A2, "scale": 2.0}], "lr": 0.01}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [p.scale for p in opt.pairs] == [1.0, 2.0]
    _, B3, A3 = problem(13)
    opt.add_param_group({"pairs": [(B3, A3)], "lr": 0.05})
    assert [p.name for p in opt.pairs] == ["pair0", "pair1", "pair2"]  # names that tell pairs apart in messages
    with pytest.raises(ValueError, match="expected B"):
        ODELoRA([(A, B)])
    with pytest.raises(ValueError, match="lr"):
        ODELoRA([(B, A)], lr=-1)
    with pytest.raises(ValueError, match="lr"):
        ODELoRA([{"pairs": [(B, A)], "lr": float("inf")}])
    with pytest.raises(ValueError, match="unknown method"):
        ODELoRA([(B, A)], method="rk5")
    with pytest.raises(ValueError, match="unknown retraction"):
        ODELoRA([(B, A)], retraction="qr")
    for kw in (dict(retraction=["split"]), dict(preconditioner=["adam"]), dict(flow=["balanced"]), dict(method=["rk4"])):
        with pytest.raises(ValueError, match="unknown|must be None or one of"):  # not "unhashable type"
            ODELoRA([(B, A)], **kw)
    with pytest.raises(ValueError, match=r"no LoRA pairs to optimize: .*create_odelora_optimizer\(model, lr\)"):
        ODELoRA([])
    with pytest.raises(ValueError, match="must share dtype and device, got B torch.float32 on cpu and A torch.float64 on cpu"):
        ODELoRA([(B.detach().float().requires_grad_(), A)])
    with pytest.raises(ValueError, match="companion_lr must be a non-negative finite"):
        ODELoRA([(B, A)], companion=[torch.zeros(3, requires_grad=True)], companion_lr=-1.0)
    with pytest.raises(ValueError, match="track_imbalance must be True or False"):
        ODELoRA([(B, A)], track_imbalance="no")
    bias = torch.zeros(1, requires_grad=True)  # a lone tensor, whatever its values: not silently dropped
    for lone in (bias, torch.zeros(3, requires_grad=True), torch.tensor(0.0, requires_grad=True)):
        with pytest.raises(TypeError, match=r"got a single tensor: pass \[tensor\]"):
            ODELoRA([(B, A)], companion=lone)
    with pytest.raises(ValueError, match="more than one pair"):
        ODELoRA([(B, A), (B, A2)])
    with pytest.raises(ValueError, match="fixed-step"):
        ODELoRA([(B, A)], method="dopri5", preconditioner="adam")


def test_per_group_lr_sets_each_groups_time_step():
    Y, B, A = problem(11)
    _, B2, A2 = problem(12)
    opt = ODELoRA([{"pairs": [(B, A)], "lr": 1e-3}, {"pairs": [(B2, A2)], "lr": 1e-4}])
    before = [(Bn.detach().clone(), An.detach().clone()) for Bn, An in ((B, A), (B2, A2))]

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B @ A - Y) ** 2).sum() + 0.5 * ((B2 @ A2 - Y) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    for (B0, A0), (Bn, An), h in zip(before, ((B, A), (B2, A2)), (1e-3, 1e-4)):
        G = (B0 @ A0 - Y).numpy()
        hP = h * projection_reference(G, B0.numpy(), A0.numpy())
        step = ((Bn @ An).detach() - B0 @ A0).numpy()
        assert np.linalg.norm(step + hP) < 0.01 * np.linalg.norm(hP)
    assert opt.param_groups[0]["t"] == pytest.approx(1e-3) and opt.param_groups[1]["t"] == pytest.approx(1e-4)


def test_zero_B_start_escapes_and_is_balanced_after_the_first_step():
    g = torch.Generator().manual_seed(11)
    Y = torch.randn(10, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 7, generator=g, dtype=torch.float64)
    B = torch.zeros(10, 2, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(2, 7, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    opt = ODELoRA([(B, A, 2.0)], lr=0.3)
    closure = make_closure(opt, B, A, Y, scale=2.0)
    l0 = float(opt.step(closure))
    assert opt.last_step.imbalance == 1.0  # B = 0 at the start of the step
    assert float(B.abs().max()) > 0 and float(imbalance(B.detach(), A.detach())) < 1e-12
    for _ in range(100):
        loss = float(opt.step(closure))
    assert loss < 1e-10 * l0
    assert opt.last_step.imbalance < 1e-12


def test_frames_restored_from_a_checkpoint_are_checked_against_the_parameters():
    """The frames saved with the state are reused only if they describe the parameters."""
    Y, B, A = problem(13)
    opt = ODELoRA([(B, A)], lr=0.3)
    closure = make_closure(opt, B, A, Y)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    assert sd["odelora"]["frames"][0] is not None
    Y2, B2, A2 = problem(14)  # different weights, same shapes
    opt2 = ODELoRA([(B2, A2)], lr=0.3)
    opt2.load_state_dict(sd)
    ref = ODELoRA([(B2.detach().clone().requires_grad_(), A2.detach().clone().requires_grad_())], lr=0.3)
    Bf, Af = ref.pairs[0].B, ref.pairs[0].A
    opt2.step(make_closure(opt2, B2, A2, Y2))
    ref.step(make_closure(ref, Bf, Af, Y2))
    assert torch.equal(B2.detach(), Bf.detach()) and torch.equal(A2.detach(), Af.detach())


def test_checkpoints_name_the_frames_fields_and_older_positional_ones_still_resume_exactly():
    """Frames are saved by field name; a state dict with them as lists in field order (the older
    format) resumes to the same bits."""
    Y, B, A = problem(15)
    opt = ODELoRA([(B, A)], lr=0.3)
    closure = make_closure(opt, B, A, Y)
    for _ in range(3):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    (frame,), (layout,) = sd["odelora"]["frames"], sd["odelora"]["frame_layouts"]
    assert set(frame) == {"UB", "sB", "PB", "UA", "sA", "PA", "balanced"} and set(layout) == set(frame) - {"balanced"}
    fields = ["UB", "sB", "PB", "UA", "sA", "PA"]
    older = {**sd, "odelora": {**sd["odelora"], "frames": [[*(frame[k] for k in fields), frame["balanced"]]],
                               "frame_layouts": [[layout[k] for k in fields]]}}
    ends = []
    for state in (sd, older):
        B2, A2 = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
        opt2 = ODELoRA([(B2, A2)], lr=0.3)
        opt2.load_state_dict(state)
        opt2.step(make_closure(opt2, B2, A2, Y))
        ends.append((B2.detach(), A2.detach()))
    opt.step(closure)
    for B2, A2 in ends:
        assert torch.equal(B2, B.detach()) and torch.equal(A2, A.detach())


# ---------------------------------------------------------------- the Adam-type preconditioner


def numpy_balanced_near(B, A):
    """Balanced factors of BA closest to (B, A), from numpy's SVD and scipy's Procrustes."""
    from scipy.linalg import orthogonal_procrustes

    r = B.shape[1]
    U, S, Vt = np.linalg.svd(B @ A, full_matrices=False)
    left = np.vstack([U[:, :r] * np.sqrt(S[:r]), Vt[:r].T * np.sqrt(S[:r])])
    Q, _ = orthogonal_procrustes(left, np.vstack([B, A.T]))
    Bn = left[: B.shape[0]] @ Q
    An = (left[B.shape[0] :] @ Q).T
    return Bn, An


def test_adam_path_matches_torch_adamw_fed_the_negative_velocity():
    check_adam_path_against_torch_adamw()


def check_adam_path_against_torch_adamw(device="cpu"):
    """Reference: torch.optim.AdamW on the CPU on copies of the factors, each step fed minus the
    balanced flow's velocity as the gradient, then numpy's closest balanced factorization; the
    optimizer runs on ``device``."""
    Y, B, A = problem(15)
    Br, Ar = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    B, A = (t.detach().to(device).requires_grad_() for t in (B, A))
    lr, wd = 0.05, 1e-3
    opt = ODELoRA([(B, A)], lr=lr, preconditioner="adam", weight_decay=wd, betas=(0.8, 0.99), eps=1e-7)
    closure = make_closure(opt, B, A, Y.to(device))
    ref = torch.optim.AdamW([Br, Ar], lr=lr, weight_decay=wd, betas=(0.8, 0.99), eps=1e-7)
    from odelora import flows

    for _ in range(40):
        G = Br.detach() @ Ar.detach() - Y
        dB, dA = flows.balanced(Br.detach(), Ar.detach(), G @ Ar.detach().T, Br.detach().T @ G)
        Br.grad, Ar.grad = -dB, -dA
        ref.step()
        Bn, An = numpy_balanced_near(Br.detach().numpy(), Ar.detach().numpy())
        with torch.no_grad():
            Br.copy_(torch.from_numpy(Bn)), Ar.copy_(torch.from_numpy(An))
        opt.step(closure)
    assert opt.state[B]["exp_avg"].device.type == B.device.type == torch.device(device).type
    np.testing.assert_allclose(B.detach().cpu().numpy(), Br.detach().numpy(), atol=1e-9)
    np.testing.assert_allclose(A.detach().cpu().numpy(), Ar.detach().numpy(), atol=1e-9)
    torch.testing.assert_close(opt.state[B]["exp_avg"].cpu(), ref.state[Br]["exp_avg"], rtol=1e-7, atol=1e-12)


def test_adam_preconditioner_trains_resumes_and_keeps_its_coordinates():
    Y, B, A = problem(12)
    opt = ODELoRA([(B, A)], lr=0.05, method="heun", preconditioner="adam", weight_decay=1e-4)
    closure = make_closure(opt, B, A, Y)
    l0 = float(opt.step(closure))
    jumps = []
    for _ in range(150):
        Bp = B.detach().clone()
        l = float(opt.step(closure))
        jumps.append(float((B.detach() - Bp).norm() / Bp.norm()))
    assert l < 0.01 * l0
    assert max(jumps) < 0.2  # no column sign flips or swaps between steps
    st = opt.state[B]
    assert int(st["step"]) == 151 and st["exp_avg"].shape == B.shape
    sd = torch.load(saved(opt.state_dict()), weights_only=True)
    B2, A2 = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    opt2 = ODELoRA([(B2, A2)], lr=0.05, method="heun", preconditioner="adam", weight_decay=1e-4)
    opt2.load_state_dict(sd)
    for _ in range(5):
        opt.step(closure)
        opt2.step(make_closure(opt2, B2, A2, Y))
    assert torch.equal(B2.detach(), B.detach()) and torch.equal(A2.detach(), A.detach())


@pytest.mark.parametrize("method", ["heun", "rk4"])
@pytest.mark.parametrize("retraction,preconditioner", [(None, "adam"), ("split", "adam"), ("none", None), ("balance", None)])
def test_resume_is_exact_where_committed_factors_are_not_row_major(retraction, preconditioner, method):
    """These steps leave factors laid out column-major (products computed as ``(b.T a.T).T``),
    while a resumed run reads them from the parameters; products round by layout. From PEFT's
    start with a rank-1 gradient (a batch of one) at r = 16, the resumed run must still continue
    bit for bit."""
    def make():
        g = torch.Generator().manual_seed(0)
        B = torch.zeros(30, 16, dtype=torch.float64, requires_grad=True)
        A = (torch.randn(16, 20, generator=g, dtype=torch.float64) / 20**0.5).requires_grad_()
        x = torch.randn(30, generator=g, dtype=torch.float64)
        return B, A, x / x.norm(), torch.randn(20, generator=g, dtype=torch.float64)

    def run(B, A, x, y, sd=None, steps=3):
        opt = ODELoRA([(B, A)], lr=1e-2 if preconditioner else 0.1, method=method, retraction=retraction, preconditioner=preconditioner)
        if sd is not None:
            opt.load_state_dict(sd)

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((x @ (B @ A) - y) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)
        return opt, closure

    B, A, x, y = make()
    opt, closure = run(B, A, x, y)
    sd = torch.load(saved(opt.state_dict()), weights_only=True)
    mid = B.detach().clone(), A.detach().clone()
    for _ in range(3):
        opt.step(closure)
    B2, A2, _, _ = make()
    with torch.no_grad():
        B2.copy_(mid[0]), A2.copy_(mid[1])
    run(B2, A2, x, y, sd)
    assert torch.equal(B2.detach(), B.detach()) and torch.equal(A2.detach(), A.detach())


@pytest.mark.parametrize("m,n", [(20, 4), (4, 20)])
@pytest.mark.parametrize("method,ratio", [("euler", 0.5), ("rk4", 1 - 0.5 + 0.5**2 / 2 - 0.5**3 / 6 + 0.5**4 / 24)])
def test_rank_above_the_layer_from_B_zero_follows_the_closed_form(m, n, method, ratio):
    """r = 6 > min(m, n) from PEFT's start, the target a rank-3 change D with its rows in A's row
    space (the first step moves X = BA by ``-h G PV``). On ``0.5 |X - D|^2`` the projected flow
    then moves X along ``D - X`` (D's spaces hold every stage), so each step of size h = 0.5
    multiplies ``|X - D|`` by the method's stability function at -0.5: 1/2 for Euler,
    ``1 - z + z^2/2 - z^3/6 + z^4/24`` (z = 0.5) for RK4. The scaled flow with an adaptive
    method, on a target with rows anywhere, must run and converge too."""
    g = torch.Generator().manual_seed(0)
    for flow, meth in (("balanced", method), ("scaled", "dopri5")):
        B = torch.zeros(m, 6, dtype=torch.float64, requires_grad=True)
        A = (torch.randn(6, n, generator=g, dtype=torch.float64) / n**0.5).requires_grad_()
        rows = A.detach()[:3] if flow == "balanced" else torch.randn(3, n, generator=g, dtype=torch.float64)
        D = torch.randn(m, 3, generator=g, dtype=torch.float64) @ rows
        opt = ODELoRA([(B, A)], lr=0.5, method=meth, flow=flow)
        closure = make_closure(opt, B, A, D)
        errs = []
        for _ in range(5 if flow == "balanced" else 30):  # dopri5's first steps from B = 0 are short
            opt.step(closure)
            errs.append(float(torch.linalg.matrix_norm(B.detach() @ A.detach() - D) / torch.linalg.matrix_norm(D)))
        if flow == "balanced":
            np.testing.assert_allclose(errs, [ratio ** (k + 1) for k in range(5)], rtol=1e-9)
        else:
            assert errs[-1] < 1e-6


def peft_start(seed=0, m=10, n=8, r=2):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, n, generator=g)
    return Y, torch.zeros(m, r, requires_grad=True), (0.1 * torch.randn(r, n, generator=g)).requires_grad_()


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("retraction", [None, "split", "balance"])
def test_a_step_that_leaves_the_product_at_zero_keeps_PEFTs_start(method, retraction):
    """At B = 0 a zero gradient or h = 0 (an LR warm-up's first step) leaves the product at zero;
    the factors must stay (0, A): (0, 0) is a state no flow leaves. Reference: the same run
    without that step."""
    runs = []
    for zero_step in (False, True):
        Y, B, A = peft_start()
        opt = ODELoRA([(B, A)], lr=0.05, method=method, retraction=retraction)

        def closure(k=1.0):
            opt.zero_grad()
            loss = 0.5 * k * ((B @ A - Y) ** 2).sum()
            loss.backward()
            return loss

        A0 = A.detach().clone()
        if zero_step:
            opt.step(lambda: closure(0.0))
            assert torch.equal(A.detach(), A0) and not B.detach().any()
        for _ in range(10):
            opt.step(closure)
        runs.append((B.detach().clone(), A.detach().clone(), float(closure().detach())))
    (B1, A1, l1), (B2, A2, l2) = runs
    assert l1 < 0.8 * 0.5 * float((Y**2).sum())
    assert torch.allclose(B1 @ A1, B2 @ A2, rtol=0, atol=1e-6) and l2 == pytest.approx(l1, rel=1e-5)


@pytest.mark.parametrize("retraction", ["truncate", "split", "balance"])
def test_a_zero_product_pair_stays_while_its_bucket_mate_moves(retraction):
    """Two pairs of one shape share a bucket: (B0, A0) with a real loss and PEFT's start (0, A1)
    whose loss term has zero gradient. After an Euler step the second pair keeps its A1 bit for bit
    and B1 = 0 (its product stays zero, and (0, 0) is a state no flow leaves), while B0 A0 moves:
    the per-pair choice within one bucket, not the all-or-nothing one."""
    Y, B0, A0 = problem(35)
    g = torch.Generator().manual_seed(35)
    B1 = torch.zeros_like(B0, requires_grad=True)
    A1 = torch.randn(A0.shape, generator=g, dtype=torch.float64).requires_grad_()
    opt = ODELoRA([(B0, A0), (B1, A1)], lr=0.1, retraction=retraction)
    assert len(opt.store.buckets) == 1

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B0 @ A0 - Y) ** 2).sum() + 0 * (B1 @ A1).sum()
        loss.backward()
        return loss

    X0, A1_before = (B0 @ A0).detach().clone(), A1.detach().clone()
    opt.step(closure)
    assert opt.last_step.accepted
    assert torch.equal(A1.detach(), A1_before) and not B1.detach().any()
    assert float((B0 @ A0 - X0).detach().norm()) > 1e-2 * float(X0.norm())


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_lr_warm_up_from_zero_starts_training_at_B_zero(preconditioner):
    Y, B, A = peft_start(1)
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner=preconditioner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 5))
    closure = make_closure(opt, B, A, Y.double())
    A0 = A.detach().clone()
    opt.step(closure)  # lr = 0
    sched.step()
    assert torch.equal(A.detach(), A0) and not B.detach().any()
    start = float(closure().detach())
    for _ in range(30):
        opt.step(closure)
        sched.step()
    assert float(closure().detach()) < 0.8 * start and B.detach().abs().max() > 0


def test_lr_zero_is_accepted_where_torch_accepts_it():
    """As torch's optimizers: lr = 0 at construction and in a group (a schedule's base rate set
    later) holds the factors; a rate set afterwards trains."""
    Y, B, A = problem(32)
    _, B2, A2 = problem(33)
    opt = ODELoRA([{"pairs": [(B, A)]}, {"pairs": [(B2, A2)], "lr": 0.0}], lr=0)
    B0, A0 = B.detach().clone(), A.detach().clone()
    closure = make_closure(opt, B, A, Y)
    opt.step(closure)
    assert torch.equal(B.detach(), B0) and torch.equal(A.detach(), A0)
    opt.param_groups[0]["lr"] = 0.1
    start = float(closure())
    for _ in range(20):
        opt.step(closure)
    assert float(closure()) < 0.5 * start


def test_atol_zero_with_a_product_that_stays_zero_steps_the_other_pairs():
    """atol = 0: a pair at PEFT's B = 0 whose gradient is zero has error 0 against tolerance 0,
    which meets it (it read NaN and rejected every try); the pair stacked with it follows the
    flow."""
    Y, B, A = problem(34)
    for atol in (0.0, 1e-12):
        Bc, Ac = (t.detach().clone().requires_grad_() for t in (B, A))
        Bz, Az = torch.zeros_like(Bc, requires_grad=True), torch.randn(A.shape, dtype=A.dtype).requires_grad_()
        opt = ODELoRA([(Bc, Ac), (Bz, Az)], lr=0.1, method="dopri5", rtol=1e-6, atol=atol)

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((Bc @ Ac - Y) ** 2).sum() + 0.5 * (Bz @ Az).square().sum()  # zero gradient at B = 0
            loss.backward()
            return loss

        start = float(closure())
        for _ in range(10):
            opt.step(closure)
        assert opt.stats.accepted == 10 and opt.stats.rejected <= 2 and not Bz.detach().any()
        assert float(closure()) < start and opt.param_groups[0]["t"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_held_at_lr_zero_keeps_its_factors_bit_for_bit_while_another_trains(dtype):
    """torch's optimizers leave a parameter at lr 0 as it is; so does ODELoRA, for a group that
    a schedule holds at 0 while another trains: not truncated or refactored each step (in bf16
    refactoring moved the product by 2.6e-3 in 20 steps)."""
    Y, B, A = problem(22, dtype=dtype)
    _, B2, A2 = problem(23, dtype=dtype)
    B2.data[:, 0] *= 10  # unbalanced: any refactoring would change them
    opt = ODELoRA([{"pairs": [(B, A)]}, {"pairs": [(B2, A2)]}], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0])
    held = B2.detach().clone(), A2.detach().clone()

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B.double() @ A.double() - Y) ** 2).sum() + 0.5 * ((B2.double() @ A2.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    start = B.detach().clone()
    for _ in range(5):
        opt.step(closure)
        sched.step()
    assert torch.equal(B2.detach(), held[0]) and torch.equal(A2.detach(), held[1]) and opt.param_groups[1]["t"] == 0.0
    assert not torch.equal(B.detach(), start)


def test_adam_at_lr_zero_keeps_the_factors_and_updates_the_moments_as_torch_adamw_does():
    """AdamW at lr 0 leaves the parameters as they are and still updates its moments: the
    factors stay put, so both steps feed the same velocity, and the moments after the second are
    those of torch.optim.AdamW given that gradient twice (read off the first step's exp_avg)."""
    Y, B, A = problem(24, dtype=torch.float32)
    B.data[:, 0] *= 10  # unbalanced: a retraction would refactor them
    betas = (0.8, 0.9)
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner="adam", weight_decay=0.1, betas=betas)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = B.detach().clone(), A.detach().clone()
    opt.step(make_closure(opt, B, A, Y))
    grads = [opt.state[p]["exp_avg"] / (1 - betas[0]) for p in (B, A)]  # the negated velocity
    opt.step(make_closure(opt, B, A, Y))
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
    refs = [p.detach().clone().requires_grad_() for p in (B, A)]
    twin = torch.optim.AdamW(refs, lr=0.0, weight_decay=0.1, betas=betas, foreach=False)
    for _ in range(2):
        for r, g in zip(refs, grads):
            r.grad = g.clone()
        twin.step()
    for p, r in zip((B, A), refs):
        assert float(opt.state[p]["step"]) == 2 and bool(opt.state[p]["exp_avg"].any())
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], twin.state[r][k], rtol=1e-6, atol=1e-12)


def test_a_companion_tensor_frozen_at_construction_trains_once_unfrozen():
    """As with torch's AdamW: a head frozen for a warm-up is kept, and moves once it gets gradients."""
    Y, B, A = problem(25, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    W = torch.randn(3, 9, generator=g)
    ref = W.clone().requires_grad_()
    opt = ODELoRA([(B, A)], lr=0.1, companion=[W], companion_lr=0.01)
    twin = torch.optim.AdamW([ref], lr=0.01, foreach=False)
    for _ in range(2):  # the warm-up: the pairs train, the frozen head neither moves nor gets state
        opt.zero_grad()
        (0.5 * ((B @ A - Y.float()) ** 2).sum() + (W**2).sum()).backward()
        opt.step()
    assert torch.equal(W, ref.detach()) and not opt.state.get(W)
    W.requires_grad_()
    for _ in range(3):
        opt.zero_grad()
        twin.zero_grad()
        (0.5 * ((B @ A - Y.float()) ** 2).sum() + (W**2).sum()).backward()
        (ref**2).sum().backward()
        opt.step()
        twin.step()
    torch.testing.assert_close(W.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(W.detach(), torch.randn(3, 9, generator=torch.Generator().manual_seed(6)))


def test_bad_options_and_inputs_fail_at_construction_with_what_to_do():
    Y, B, A = problem(20, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not require grad.*requires_grad_"):
        ODELoRA([(B.detach(), A)])
    with pytest.raises(ValueError, match="B and A do not require grad"):
        ODELoRA([(B.detach(), A.detach())])
    assert repr(LoRAPair(B, A, 2.0, "fc1")) == "LoRAPair(fc1: 12 x 2 x 9, scale 2, float32)"  # shapes, not values
    with pytest.raises(TypeError, match="floating point"):
        LoRAPair(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="also a factor"):
        ODELoRA([(B, A)], companion=[B])
    with pytest.raises(ValueError, match="weight_decay acts only with preconditioner='adam'"):
        ODELoRA([(B, A)], weight_decay=0.1)
    with pytest.raises(ValueError, match="preconditioner='adam' needs a fixed-step method"):
        ODELoRA([(B, A)], preconditioner="adam", method="dopri5")
    with pytest.raises(ValueError, match="betas must be a pair"):
        ODELoRA([(B, A)], betas=(0.9,))
    with pytest.raises(ValueError, match="eps and weight_decay"):
        ODELoRA([(B, A)], preconditioner="adam", eps=-1.0)
    with pytest.raises(ValueError, match=r"\['dampnig'\] are not options.*'damping'"):
        ODELoRA([(B, A)], flow_options={"dampnig": 1e-3})
    with pytest.raises(ValueError, match="rtol and atol must be finite"):
        ODELoRA([(B, A)], method="bs32", rtol=float("nan"))
    with pytest.raises(ValueError, match="a float or a one-element tensor"):
        ODELoRA([(B, A)], lr="0.1")
    with pytest.raises(ValueError, match=r"atol must be a number \(a float or a one-element tensor\), got '1e-6'"):
        ODELoRA([(B, A)], method="bs32", atol="1e-6")
    tol = ODELoRA([(B, A)], method="bs32", rtol=torch.tensor(1e-4), atol=torch.tensor([1e-7]))  # as lr takes them
    assert (type(tol._rtol), type(tol.controller.atol)) == (float, float) and tol._rtol == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="max_rejects must be a whole number >= 0, got 1.5"):
        ODELoRA([(B, A)], max_rejects=1.5)
    with pytest.raises(ValueError, match="empty factor.*m, r, n >= 1"):
        ODELoRA([(torch.zeros(6, 0, requires_grad=True), torch.zeros(0, 5, requires_grad=True))])
    Bm, Am = torch.zeros(6, 2, device="meta", requires_grad=True), torch.zeros(2, 5, device="meta", requires_grad=True)
    meta = ODELoRA([(Bm, Am)])
    Bm.grad, Am.grad = torch.zeros_like(Bm), torch.zeros_like(Am)  # as a backward on the meta device leaves them
    with pytest.raises(RuntimeError, match="on the meta device.*to_empty"):
        meta.step()
    for lr in (np.float32(0.1), torch.tensor(0.1)):
        assert ODELoRA([(B, A)], lr=lr).param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_b_zero_start_under_adaptive_factor_space_steps_of_a_stiff_flow_is_warned_about_at_construction():
    """bs32/dopri5 with retraction 'none' or 'balance' find no step off B = 0 for the balanced and
    scaled flows (their factor ODE is stiff there): said when the optimizer is built, not after
    max_skipped_steps steps. Plain LoRA GD's flow is not stiff there, and balanced starts are fine."""
    import warnings

    Y, B, A = problem(23, dtype=torch.float32)
    with torch.no_grad():
        B.zero_()
    for flow, retraction in (("balanced", "none"), ("balanced", "balance"), ("scaled", "none")):
        with pytest.warns(UserWarning, match=r"1 LoRA pair\(s\) start at B = 0 \(pair0\).*use the default retraction"):
            ODELoRA([(B, A)], method="dopri5", flow=flow, retraction=retraction)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ODELoRA([(B, A)], method="bs32", flow="gradient", retraction="none")
        ODELoRA([(B, A)], method="bs32")  # the truncation
        ODELoRA([(B, A)], method="euler", retraction="none")
        with torch.no_grad():
            B.normal_()
        ODELoRA([(B, A)], method="bs32", retraction="none")


def test_group_keys_the_optimizer_keeps_tensor_betas_and_sync_ranks_are_checked():
    """Keys ODELoRA fills itself are refused in a group (they clashed inside the group's dict), and
    so are other optimizers' options set to act (maximize=True was accepted and ignored);
    a group may hold one LoRAPair; tensor betas, which torch's foreach AdamW refuses at the first
    step, are taken as floats; sync_ranks other than True/False/None (0 turned syncing on) is refused."""
    Y, B, A = problem(22, dtype=torch.float32)
    for key, value in (("scales", [2.0]), ("names", ["x"]), ("t", float("nan"))):
        with pytest.raises(ValueError, match=rf"a param group sets \['{key}'\], which ODELoRA keeps itself"):
            ODELoRA([{"pairs": [(B, A)], key: value}])
    assert ODELoRA([{"pairs": LoRAPair(B, A, 2.0, "fc")}]).pairs[0].name == "fc"
    for key, value in (("maximize", True), ("momentum", 0.9), ("amsgrad", True)):  # were passed through, and ignored
        with pytest.raises(ValueError, match=rf"sets \['{key}'\], options of other torch optimizers"):
            ODELoRA([{"pairs": [(B, A)], key: value}])
    ODELoRA([{"pairs": [(B, A)], "maximize": False, "momentum": 0}])  # their defaults say nothing
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner="adam", betas=torch.tensor([0.9, 0.99]), eps=torch.tensor(1e-8))
    assert opt.param_groups[0]["betas"] == (pytest.approx(0.9), pytest.approx(0.99))
    assert all(type(v) is float for v in (*opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]))
    opt.step(make_closure(opt, B, A, Y))
    assert opt.stats.steps == 1 and opt.stats.skipped == 0
    C, D = torch.zeros(12, 2, requires_grad=True), torch.randn(2, 9).requires_grad_()
    opt.add_param_group({"pairs": [(C, D)], "betas": torch.tensor([0.8, 0.9])})
    assert all(type(v) is float for v in opt.param_groups[-1]["betas"])
    for bad in (0, "no", 1):
        with pytest.raises(ValueError, match="sync_ranks must be True, False or None"):
            ODELoRA([(B, A)], sync_ranks=bad)


def test_a_state_dict_of_the_same_pairs_in_another_order_does_not_hand_them_each_others_frames():
    """Pairs listed in another order pass the load's layout check (the same shapes); the saved
    frames then describe other pairs. With both B = 0 (PEFT's start, then a step at lr 0) the
    frame's B matched and the next step broke on A's shape; now the frames are recomputed and the
    step equals that of an optimizer loaded with nothing."""
    def pairs():
        P, R = torch.zeros(8, 2, requires_grad=True), torch.zeros(8, 2, requires_grad=True)
        Q = torch.randn(2, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
        S = torch.randn(2, 5, generator=torch.Generator().manual_seed(2)).requires_grad_()
        return P, Q, R, S

    def loss(P, Q, R, S):
        return (P @ Q - 1).square().sum() + (R @ S - 1).square().sum()

    P, Q, R, S = pairs()
    opt = ODELoRA([(P, Q), (R, S)], lr=0.0)
    loss(P, Q, R, S).backward()
    opt.step()
    results = []
    for load in (True, False):
        P2, Q2, R2, S2 = pairs()
        opt2 = ODELoRA([(R2, S2), (P2, Q2)], lr=0.1)
        if load:
            opt2.load_state_dict(opt.state_dict())
            opt2.param_groups[0]["lr"] = 0.1  # (the saved group's lr was 0)
        loss(P2, Q2, R2, S2).backward()
        opt2.step()
        results.append([t.detach().clone() for t in (P2, Q2, R2, S2)])
    assert float(results[1][0].abs().max()) > 1e-3
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors_during_a_step_leave_the_parameters_untouched():
    Y, B, A = problem(21)
    B0, A0 = B.detach().clone(), A.detach().clone()
    opt = ODELoRA([(B, A)], lr=0.1, method="rk4")
    with pytest.raises(RuntimeError, match="no gradient on the LoRA pairs.*backward"):
        opt.step(lambda: 0.5 * ((B @ A - Y) ** 2).sum())  # forgot backward()
    calls = [0]

    def failing():  # user code failing at the third stage, after the parameters moved
        calls[0] += 1
        if calls[0] == 3:
            raise KeyError("batch")
        return make_closure(opt, B, A, Y)()

    with pytest.raises(KeyError):
        opt.step(failing)
    opt.param_groups[0]["lr"] = -0.1  # e.g. a scheduler gone wrong
    with pytest.raises(ValueError, match="param group 0: lr must be a non-negative"):
        opt.step(make_closure(opt, B, A, Y))
    assert torch.equal(B.detach(), B0) and torch.equal(A.detach(), A0)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_skipped_or_failed_step_changes_nothing_later_steps_see(method):
    """NaN at the start of a step, an error in the closure at a later stage (an out-of-memory
    error, a data loader failing), or an error after the stages, before the commit: the following
    steps match a run without that step, bit for bit (the restored parameters keep their cached
    frames)."""
    Y, B0, A0 = problem(22, dtype=torch.float32)

    class Failing:  # the optimizer's preconditioner, failing when called
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            raise RuntimeError("failed after the stages")

    runs = []
    for event in (None, "nan", "raise", "after stages"):
        B, A = B0.detach().clone().requires_grad_(), A0.detach().clone().requires_grad_()
        opt = ODELoRA([(B, A)], lr=0.05, method=method)
        closure = make_closure(opt, B, A, Y)
        calls = [0]

        def failing():
            calls[0] += 1
            if calls[0] == 3:
                raise MemoryError("out of memory")
            return closure()

        for i in range(6):
            if event == "nan" and i == 3:
                with pytest.warns(RuntimeWarning, match="skipped"):
                    opt.step(lambda: make_closure(opt, B, A, Y * float("nan"))())
            if event == "raise" and i == 3:
                with pytest.raises(MemoryError):
                    opt.step(failing)
            if event == "after stages" and i == 3:
                plain, opt.preconditioner = opt.preconditioner, Failing(opt.preconditioner)
                with pytest.raises(RuntimeError, match="after the stages"):
                    opt.step(closure)
                opt.preconditioner = plain
            opt.step(closure)
        runs.append(torch.cat([B.detach().flatten(), A.detach().flatten(), torch.tensor([opt.last_step.h])]))
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_overflow_skip_leaves_adam_moments_and_half_precision_resume_is_exact():
    g = torch.Generator().manual_seed(23)
    B = torch.randn(6, 2, generator=g).half().requires_grad_()
    A = torch.randn(2, 5, generator=g).half().requires_grad_()
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner="adam")

    def closure():
        opt.zero_grad()
        loss = ((B.float() @ A.float()) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in (B, A)]
    opt.param_groups[0]["lr"] = 1e6
    with pytest.warns(RuntimeWarning, match="overflows the float16"):
        opt.step(closure)
    for p, st in zip((B, A), before):
        assert all(torch.equal(st[k], opt.state[p][k]) for k in st)
    for dtype in (torch.bfloat16, torch.float16):  # moments are float32; a reload must not round them
        Y, Bd, Ad = problem(24, dtype=dtype)
        finals = []
        for reload in (False, True):
            Bx, Ax = Bd.detach().clone().requires_grad_(), Ad.detach().clone().requires_grad_()
            o = ODELoRA([(Bx, Ax)], lr=0.05, preconditioner="adam")
            step = make_closure(o, Bx, Ax, Y)
            for _ in range(4):
                o.step(step)
            if reload:
                o2 = ODELoRA([(Bx, Ax)], lr=0.05, preconditioner="adam")
                o2.load_state_dict(torch.load(saved(o.state_dict()), weights_only=True))
                o, step = o2, make_closure(o2, Bx, Ax, Y)
            for _ in range(4):
                o.step(step)
            finals.append(torch.cat([Bx.detach().flatten(), Ax.detach().flatten()]))
        assert torch.equal(finals[0], finals[1])


def test_an_overflowing_plain_half_precision_step_is_skipped_untouched():
    """An rk4 step without preconditioner whose result exceeds float16's range: the stages run in
    float32 and stay finite (the gradients here do not depend on the parameters, and the closure
    returns no loss, so the float16 copies of the stages may overflow unseen), the new factors
    (about sqrt(lr |G|) = 1e6 > 65504) do not. The step is skipped: B and A bit for bit as
    before, one rejected non-finite try recorded; with ``on_nonfinite="raise"`` a NonFiniteError."""
    g = torch.Generator().manual_seed(36)
    GB, GA = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    for on_nonfinite in ("warn", "raise"):
        B = torch.randn(6, 2, generator=torch.Generator().manual_seed(37)).half().requires_grad_()
        A = torch.randn(2, 5, generator=torch.Generator().manual_seed(38)).half().requires_grad_()
        opt = ODELoRA([(B, A)], lr=1e12, method="rk4", on_nonfinite=on_nonfinite)

        def closure():
            opt.zero_grad()
            ((GB * B.float()).sum() + (GA * A.float()).sum()).backward()

        before = (B.detach().clone(), A.detach().clone())
        if on_nonfinite == "warn":
            with pytest.warns(RuntimeWarning, match="the step overflows the float16 parameters"):
                opt.step(closure)
        else:
            with pytest.raises(NonFiniteError, match="overflows the float16"):
                opt.step(closure)
        assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
        rec = opt.last_step
        assert not rec.accepted and rec.nonfinite == 1 and rec.rejected == 1 and rec.nfe == 4
        assert opt.stats.skipped == 1 and opt.param_groups[0]["t"] == 0.0


def test_a_float32_step_that_would_overflow_is_skipped_untouched():
    """Factors in the compute dtype overflow too, at a step long enough: plain LoRA gradient descent
    (``flow="gradient"``, factor-space steps) with lr = 1e25 took the step and wrote inf into A.
    It is skipped now, B and A bit for bit as before, as a half-precision overflow is."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 2, generator=g).requires_grad_(), torch.randn(2, 5, generator=g).requires_grad_()
    Y = 1e18 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    opt = ODELoRA([(B, A)], lr=1e25, flow="gradient")

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B.double() @ A.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    before = (B.detach().clone(), A.detach().clone())
    with pytest.warns(RuntimeWarning, match="the step overflows the float32 parameters"):
        opt.step(closure)
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
    assert not opt.last_step.accepted and opt.last_step.nonfinite == 1
    # the truncation's decomposition of a non-finite product fails, and the message says where
    opt = ODELoRA([(B, A)], lr=1e38)
    with pytest.warns(RuntimeWarning, match=r"non-finite \(at the step's retraction: .*non-finite.*\) in all 11 tries"):
        opt.step(closure)
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])


def two_ranks(monkeypatch, opt, want, act) -> list:
    """Two ranks simulated in one process: ``opt._ranks`` says 2, and ``all_reduce`` (through the
    optimizer module's ``torch.distributed``) applies ``act`` to the tensor of each reduction
    with op ``want``, as another rank's values would. Returns the list of reductions asked for."""
    ops = []

    def all_reduce(t, op=None, **kwargs):
        ops.append(op)
        if op == want:
            act(t)

    monkeypatch.setattr(opt, "_ranks", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)  # the module odelora.optim calls
    opt._replicas_checked = True  # the first step's check that the ranks are replicas: tested on its own
    return ops


@pytest.mark.parametrize("other", ["the same", "another batch", "NaN at first, then another batch"])
def test_the_first_step_warns_when_the_ranks_are_not_replicas(monkeypatch, other):
    """Ranks that step together compare their factors and gradients once, by one MAX reduction of
    a fingerprint and its negative: another rank's values (simulated) that differ (a model not
    wrapped in DDP) warn; the same values do not. A step where some rank was non-finite does not
    count: the next one checks."""
    Y, B, A = problem(44)
    opt = ODELoRA([(B, A)], lr=0.1)
    sizes = []

    def act(t):
        sizes.append(t.numel())
        if other == "another batch" or (other.startswith("NaN") and len(sizes) > 1):
            t[:-1].add_(1e-3)
        elif other.startswith("NaN"):
            t[-1] = 1.0  # the flag another rank raises at a non-finite value

    two_ranks(monkeypatch, opt, dist.ReduceOp.MAX, act)
    opt._replicas_checked = False
    closure = make_closure(opt, B, A, Y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    said = [str(w.message) for w in seen if "differ between the 2 processes" in str(w.message)]
    assert len(said) == (0 if other == "the same" else 1) and len(sizes) == (2 if other.startswith("NaN") else 1), (said, sizes)
    # the fingerprint's size does not depend on the pairs (ranks may hold different ones)
    _, B2, A2 = problem(45, m=7, n=5, r=3)
    two = ODELoRA([(B, A), (B2, A2)], lr=0.1)
    sizes2 = []
    two_ranks(monkeypatch, two, dist.ReduceOp.MAX, lambda t: sizes2.append(t.numel()))
    two._replicas_checked = False

    def closure2():
        two.zero_grad()
        loss = 0.5 * ((B @ A - Y) ** 2).sum() + (B2 @ A2).square().sum()
        loss.backward()
        return loss

    two.step(closure2)
    assert sizes2 == sizes[:1]


def test_an_optimizer_pickled_by_an_earlier_version_steps_and_saves():
    """Its ``stats`` was a dict and it had no replica flag: unpickled, it steps and saves."""
    Y, B, A = problem(46)
    opt = ODELoRA([(B, A)], lr=0.1)
    opt.step(make_closure(opt, B, A, Y))
    state = opt.__getstate__()
    state["stats"] = dict(steps=1, nfe=1, accepted=1, rejected=0, nonfinite=0, skipped=0)
    del state["_replicas_checked"]
    old = ODELoRA.__new__(ODELoRA)
    old.__setstate__(state)
    old.step(make_closure(old, B, A, Y))
    assert old.stats.steps == 2 and old.state_dict()["odelora"]["stats"]["nfe"] == 2


def test_companion_param_groups_step_as_torch_adamw_with_those_groups():
    """A companion given as param groups (a bias without weight decay, and an empty group, which
    torch keeps) moves as torch's AdamW with the same groups, under per-group LR schedules."""
    Y, B, A = problem(47, dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    W, b = torch.randn(3, 9, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
    refs = [t.detach().clone().requires_grad_() for t in (W, b)]
    groups = lambda w, c: [{"params": [w]}, {"params": []}, {"params": [c], "weight_decay": 0.0}]
    opt = ODELoRA([(B, A)], lr=0.1, companion=groups(W, b), companion_lr=0.05, companion_kwargs=dict(weight_decay=0.5))
    twin = torch.optim.AdamW(groups(*refs), lr=0.05, weight_decay=0.5, foreach=False)
    assert len(opt.param_groups) == 1 + len(twin.param_groups) == 4
    decays = [lambda k: 1.0, lambda k: 0.5**k, lambda k: 1.0, lambda k: 0.8**k]
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, decays), torch.optim.lr_scheduler.LambdaLR(twin, decays[1:])]
    for _ in range(3):
        opt.zero_grad()
        twin.zero_grad()
        (0.5 * ((B @ A - Y.float()) ** 2).sum() + (W.sum(1) - b).square().sum()).backward()
        (refs[0].sum(1) - refs[1]).square().sum().backward()
        opt.step()
        twin.step()
        for s in scheds:
            s.step()
    for t, r in zip((W, b), refs):
        torch.testing.assert_close(t.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="param groups"):
        ODELoRA([(B, A)], companion=[{"weight_decay": 0.0}])


def test_a_non_finite_value_on_another_rank_skips_the_step_here(monkeypatch):
    """Two ranks simulated (``two_ranks``): the MIN reduction of the finite-flag answers 0, as
    when another rank saw NaN. The step is skipped, saying so, with the parameters bit for bit
    as before although every value here was finite."""
    Y, B, A = problem(39)
    opt = ODELoRA([(B, A)], lr=0.1, method="rk4")
    ops = two_ranks(monkeypatch, opt, dist.ReduceOp.MIN, torch.Tensor.zero_)
    before = (B.detach().clone(), A.detach().clone())
    with pytest.warns(RuntimeWarning, match="skipped a step: a non-finite loss or gradient on another rank"):
        opt.step(make_closure(opt, B, A, Y))
    assert ops == [dist.ReduceOp.MIN]
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
    assert opt.stats.skipped == 1 and opt.last_step.nonfinite == 1


def test_adaptive_steps_take_the_largest_error_of_all_ranks(monkeypatch):
    """A dopri5 step accepted at once alone (checked first) is rejected when the MAX reduction of
    the error ratios (another rank's errors 1e3 times larger, simulated as above) says so: every
    rank must take the same step-size decision. The MIN reduction of the finite-flag passes."""
    Y, B, A = problem(40)
    B1, A1 = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    alone = ODELoRA([(B1, A1)], lr=0.05, method="dopri5")
    alone.step(make_closure(alone, B1, A1, Y))
    assert alone.last_step.accepted and alone.last_step.rejected == 0
    opt = ODELoRA([(B, A)], lr=0.05, method="dopri5")
    ops = two_ranks(monkeypatch, opt, dist.ReduceOp.MAX, lambda t: t.mul_(1e3))
    opt.step(make_closure(opt, B, A, Y))
    assert opt.last_step.accepted and opt.last_step.rejected >= 1, opt.last_step
    assert opt.last_step.h < alone.last_step.h and dist.ReduceOp.MAX in ops


def test_a_state_dict_of_another_rank_is_refused():
    Y, B, A = problem(25)
    opt = ODELoRA([(B, A)], lr=0.05)
    opt.step(make_closure(opt, B, A, Y))
    adamw = torch.optim.AdamW([B, A])
    with pytest.raises(ValueError, match="not an ODELoRA state dict"):
        opt.load_state_dict(adamw.state_dict())
    _, B3, A3 = problem(25, r=3)
    with pytest.raises(ValueError, match=r"1 of 12 x 2 x 9 \(count of m x r x n\).*1 of 12 x 3 x 9.*same model, adapters and LoRA rank"):
        ODELoRA([(B3, A3)], lr=0.05).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="LoRA rank"):  # another rank changes PEFT's scale too: the rank is named
        ODELoRA([(B3, A3, 2 / 3)], lr=0.05).load_state_dict(opt.state_dict())
    fresh = ODELoRA([(B, A)], lr=0.05).state_dict()  # never stepped: no state per parameter, no frames
    with pytest.raises(ValueError, match="LoRA rank"):
        ODELoRA([(B3, A3)], lr=0.05).load_state_dict(fresh)


def test_a_state_dict_of_other_settings():
    """Another method, flow or retraction loads with a warning naming the change; another
    preconditioner is refused (its state would be dropped or unused). The saved learning rate
    replaces the constructor's, as in every torch optimizer."""
    Y, B, A = problem(27)
    opt = ODELoRA([(B, A)], lr=0.05, method="euler")
    opt.step(make_closure(opt, B, A, Y))
    sd = opt.state_dict()
    rk4 = ODELoRA([(B, A)], lr=0.2, method="rk4")
    with pytest.warns(UserWarning, match="method 'euler' -> 'rk4'"):
        rk4.load_state_dict(sd)
    assert rk4.param_groups[0]["lr"] == 0.05
    rk4.step(make_closure(rk4, B, A, Y))
    assert rk4.last_step.nfe == 4
    with pytest.raises(ValueError, match="preconditioner='none'.*'adam'.*saved preconditioner"):
        ODELoRA([(B, A)], lr=0.05, preconditioner="adam").load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ODELoRA([(B, A)], lr=0.05).load_state_dict(sd)  # the same settings: silent


def test_core_modules_never_import_integrations_or_the_lab():
    """Arrows run one way: a fresh interpreter importing the core (and stepping) loads neither."""
    import subprocess
    import sys

    code = (
        "import sys, torch, odelora, odelora.init\n"
        "B = torch.zeros(4, 2, requires_grad=True); A = torch.randn(2, 3, requires_grad=True)\n"
        "opt = odelora.ODELoRA([(B, A)], lr=0.1); (B @ A).sum().backward(); opt.step()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('odelora.integrations', 'odelora.lab'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_writes_to_the_factors_between_steps_are_seen_by_the_next_step():
    """A write under no_grad, a new tensor assigned to ``.data``, a state dict loaded into the
    model: the next step starts from the new values, as a fresh optimizer on them does."""
    writes = [
        lambda B: B.copy_(torch.full_like(B, 0.5)),
        lambda B: setattr(B, "data", torch.full_like(B, 0.5)),
        lambda B: torch.nn.init.constant_(B, 0.5),
    ]
    for write in writes:
        Y, B, A = problem(26)
        opt = ODELoRA([(B, A)], lr=0.05)
        opt.step(make_closure(opt, B, A, Y))
        with torch.no_grad():
            write(B)
        B2, A2 = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
        fresh = ODELoRA([(B2, A2)], lr=0.05)
        opt.step(make_closure(opt, B, A, Y))
        fresh.step(make_closure(fresh, B2, A2, Y))
        assert torch.allclose(B.detach() @ A.detach(), B2.detach() @ A2.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [None, {"foreach": True}])
def test_companion_steps_like_torch_adamw_with_the_options_given(kwargs):
    """The companion moves a head as torch's single-tensor AdamW does, from the step's start
    gradients; by default through the fused kernel, unless the caller picks an implementation."""
    Y, B, A = problem(21, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 9, generator=g).requires_grad_()
    ref = W.detach().clone().requires_grad_()
    opt = ODELoRA([(B, A)], lr=0.1, companion=[W], companion_lr=0.01, companion_kwargs=kwargs)
    twin = torch.optim.AdamW([ref], lr=0.01, foreach=False)
    group = next(gr for gr in opt.param_groups if gr.get("companion"))
    assert group["fused"] is (None if kwargs else True) and group["foreach"] is (True if kwargs else None)
    for _ in range(3):
        opt.zero_grad()
        twin.zero_grad()
        loss = 0.5 * ((B @ A - Y.float()) ** 2).sum() + (W**2).sum()
        loss.backward()
        (ref**2).sum().backward()
        opt.step()
        twin.step()
    torch.testing.assert_close(W.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def companion_problem(seed=41):
    """A head W next to a LoRA pair, both feeding one output: loss = 0.5 |W X + s B A X - Yt|^2,
    so W's gradient ``(W X + s B A X - Yt) X.T`` depends on the pair (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(9, 16, generator=g, dtype=torch.float64)
    Yt = torch.randn(12, 16, generator=g, dtype=torch.float64)
    W = (0.1 * torch.randn(12, 9, generator=g, dtype=torch.float64)).requires_grad_()
    _, B, A = problem(seed)
    return X, Yt, W, B, A


def companion_closure(opt, X, Yt, W, B, A, s, k=1.0):
    def closure():
        opt.zero_grad()
        loss = 0.5 * k * ((W @ X + s * B @ A @ X - Yt) ** 2).sum()
        loss.backward()
        return loss

    return closure


def test_companion_gradients_come_from_the_first_stage():
    """With rk4 the closure runs at four points per step; the companion must step from the
    gradient at the step's start. Reference: torch's single-tensor AdamW (same options, float64)
    stepped on ``(W X + s B A X - Yt) X.T`` computed by hand from the parameters before each step."""
    X, Yt, W, B, A = companion_problem()
    s, lr = 1.5, 0.05
    opt = ODELoRA([(B, A, s)], lr=lr, method="rk4", companion=[W], companion_lr=0.01,
                  companion_kwargs={"weight_decay": 0.1, "betas": (0.8, 0.95)})
    W_ref = W.detach().clone().requires_grad_()
    twin = torch.optim.AdamW([W_ref], lr=0.01, weight_decay=0.1, betas=(0.8, 0.95), foreach=False)
    closure = companion_closure(opt, X, Yt, W, B, A, s)
    for _ in range(2):
        P = s * B.detach() @ A.detach()
        W_ref.grad = (W_ref.detach() @ X + P @ X - Yt) @ X.T
        twin.step()
        opt.step(closure)
        assert opt.last_step.accepted and opt.last_step.nfe == 4
    torch.testing.assert_close(W.detach(), W_ref.detach(), rtol=0, atol=1e-12)
    assert float((W_ref.detach() - companion_problem()[2].detach()).abs().max()) > 1e-3  # it moved


def test_a_closure_without_zero_grad_steps_the_companion_from_this_step_s_gradient():
    """Each closure call starts from no gradient, for the companion as for the pairs: a closure
    that never zeroes gradients steps as one that does (gradients would otherwise pile up in the
    head's ``.grad`` from step to step and from stage to stage)."""
    s = 1.5
    runs = []
    for zeroing in (True, False):
        X, Yt, W, B, A = companion_problem()
        opt = ODELoRA([(B, A, s)], lr=0.05, method="heun", companion=[W], companion_lr=0.01)

        def closure():
            if zeroing:
                opt.zero_grad()
            loss = 0.5 * ((W @ X + s * B @ A @ X - Yt) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        runs.append([t.detach() for t in (W, B, A)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_companion_skips_with_the_step_and_steps_once_per_accepted_step():
    """A step skipped for a NaN loss leaves W bit for bit (and the companion AdamW unstepped); an
    adaptive bs32 run with rejected tries steps the companion once per accepted step, not per try
    (its AdamW ``step`` count equals the accepted steps)."""
    X, Yt, W, B, A = companion_problem()
    s = 1.5
    opt = ODELoRA([(B, A, s)], lr=0.05, method="rk4", companion=[W], companion_lr=0.01)
    opt.step(companion_closure(opt, X, Yt, W, B, A, s))
    W_before = W.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped a step: the loss is nan"):
        opt.step(companion_closure(opt, X, Yt, W, B, A, s, k=float("nan")))
    assert torch.equal(W.detach(), W_before) and int(opt._companion.state[W]["step"]) == 1
    X, Yt, W, B, A = companion_problem()
    opt = ODELoRA([(B, A, s)], lr=2.0, method="bs32", rtol=1e-6, atol=1e-9, companion=[W], companion_lr=0.01)
    closure = companion_closure(opt, X, Yt, W, B, A, s)
    for _ in range(4):
        opt.step(closure)
    assert opt.stats.rejected >= 2 and opt.stats.accepted == 4 and opt.stats.skipped == 0, opt.stats
    assert int(opt._companion.state[W]["step"]) == 4


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_adam_step_from_factors_of_a_lower_rank_product(dtype, tol):
    """Adam normalizes each coordinate, so rounding noise along the factors' null directions
    (a product of rank 2 < r = 4) would become full-size steps: the step must be torch's AdamW
    fed the closed-form velocity, which vanishes there."""
    from torch.optim.adamw import adamw

    from test_flows import _closed_form_balanced

    rng = np.random.default_rng(1)
    m, n, r, s, lr = 12, 10, 4, 1.0, 1e-2
    U, V = (np.linalg.qr(rng.standard_normal((k, r)))[0] for k in (m, n))
    Q = np.linalg.qr(rng.standard_normal((r, r)))[0]
    root = np.sqrt([1.0, 0.5, 0.0, 0.0])
    B0, A0 = (U * root) @ Q, Q.T @ (root[:, None] * V.T)
    G = rng.standard_normal((m, n))
    B, A = (torch.tensor(x, dtype=dtype, requires_grad=True) for x in (B0, A0))
    opt = ODELoRA([(B, A, s)], lr=lr, preconditioner="adam")

    def closure():
        opt.zero_grad()
        loss = (torch.tensor(G, dtype=dtype) * (s * B @ A)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ref = [torch.tensor(B0), torch.tensor(A0)]
    zeros = lambda: [torch.zeros_like(t) for t in ref]
    adamw(ref, [-torch.tensor(v) for v in _closed_form_balanced(B0, A0, G, s)], zeros(), zeros(), [],
          [torch.tensor(0.0), torch.tensor(0.0)], foreach=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=lr,
          weight_decay=0.0, eps=1e-8, maximize=False)
    X0, X_ref = s * B0 @ A0, s * (ref[0] @ ref[1]).numpy()
    X = s * (B @ A).detach().double().numpy()
    assert np.linalg.norm(X - X_ref) <= tol * np.linalg.norm(X_ref - X0)


def test_pairs_with_both_factors_zero_are_named_at_construction():
    """B = 0 and A = 0: both factor gradients vanish and no flow leaves the pair; a warning says so
    and the pair indeed stays at zero, while PEFT's (0, A) start does not warn."""
    Y, B, A = problem(31)
    Z = [torch.zeros(12, 2, dtype=torch.float64, requires_grad=True), torch.zeros(2, 9, dtype=torch.float64, requires_grad=True)]
    with pytest.warns(UserWarning, match=r"1 LoRA pair\(s\) with B = 0 and A = 0 \(pair1\): no flow moves them"):
        opt = ODELoRA([(B, A), {"B": Z[0], "A": Z[1], "name": "pair1"}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B @ A - Y) ** 2).sum() + 0.5 * ((Z[0] @ Z[1] - Y) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert not Z[0].any() and not Z[1].any() and not torch.equal(B.detach(), problem(31)[1].detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ODELoRA([(torch.zeros(12, 2, requires_grad=True), torch.ones(2, 9, requires_grad=True))], lr=0.1)


def test_group_options_are_checked_like_the_constructors():
    """Adam options given per param group (at construction or later) are checked as the
    constructor's are, and a group added later raises rtol to its parameters' precision."""
    Y, B, A = problem(30)
    with pytest.raises(ValueError, match="weight_decay acts only with preconditioner='adam'"):
        ODELoRA([{"pairs": [(B, A)], "weight_decay": 0.1}])
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\)"):
        ODELoRA([{"pairs": [(B, A)], "betas": (1.0, 0.999)}], preconditioner="adam")
    with pytest.raises(ValueError, match="eps and weight_decay must be finite numbers >= 0"):
        ODELoRA([(B, A)], preconditioner="adam", eps=None)
    opt = ODELoRA([(B, A)], method="bs32")
    assert opt.controller.rtol == 1e-3
    Bh, Ah = (torch.randn(4, 2).bfloat16().requires_grad_(), torch.randn(2, 3).bfloat16().requires_grad_())
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"pairs": [(Bh, Ah)], "betas": (0.9, 2.0)})
    assert len(opt.param_groups) == 1  # a rejected group is not added
    opt.add_param_group({"pairs": [(Bh, Ah)]})
    assert opt.controller.rtol == torch.finfo(torch.bfloat16).eps


def test_pairs_keep_their_order_names_and_scales():
    g = torch.Generator().manual_seed(31)
    shapes = [(6, 2, 5), (4, 2, 3), (6, 2, 5)]
    pairs = [LoRAPair(torch.randn(m, r, generator=g, requires_grad=True), torch.randn(r, n, generator=g, requires_grad=True),
                      torch.tensor(2.0)) for m, r, n in shapes]
    assert all(type(p.scale) is float and p.scale == 2.0 for p in pairs)  # a one-element tensor scale, as a float
    opt = ODELoRA(pairs)
    assert [(p.name, tuple(p.B.shape)) for p in opt.pairs] == [("pair0", (6, 2)), ("pair1", (4, 2)), ("pair2", (6, 2))]
    assert all(p.B is q.B and p.A is q.A for p, q in zip(opt.pairs, pairs))
    with pytest.raises(TypeError, match=r"a list of such tuples, \[\(B, A\), ...\]"):
        ODELoRA((pairs[0].B, pairs[0].A))
    with pytest.raises(TypeError, match=r"tuple of 4 items: a tuple is \(B, A\) or \(B, A, scale\); to name a pair, pass LoRAPair"):
        ODELoRA([(pairs[0].B, pairs[0].A, 2.0, "q")])
    with pytest.raises(TypeError, match="tuple of float, Tensor: B and A must be tensors"):
        ODELoRA([(1.0, pairs[0].A)])


def test_warnings_point_at_the_callers_line():
    """Warnings from inside the optimizer (through torch's step wrappers) name the line that called it."""
    Y, B, A = problem(32)
    with pytest.warns(UserWarning, match="B = 0 and A = 0") as rec:
        ODELoRA([(torch.zeros(3, 2, requires_grad=True), torch.zeros(2, 4, requires_grad=True))])
    assert rec[0].filename == __file__
    opt = ODELoRA([(B, A)], lr=0.1)
    with pytest.warns(RuntimeWarning, match="skipped a step") as rec:
        opt.step(make_closure(opt, B, A, Y * float("nan")))
    assert rec[0].filename == __file__
    sd = opt.state_dict()
    with pytest.warns(UserWarning, match="other settings") as rec:
        ODELoRA([(B, A)], lr=0.1, method="heun").load_state_dict(sd)
    assert rec[0].filename == __file__


def test_a_skipped_adaptive_step_says_how_many_tries_it_made():
    """The step-size floor ends the tries early: the message counts those made, not max_rejects + 1."""
    Y, B, A = problem(33)
    B = torch.zeros_like(B, requires_grad=True)
    with pytest.warns(UserWarning, match=r"start at B = 0 \(pair0\), where this flow's adaptive factor-space steps"):
        opt = ODELoRA([(B, A)], lr=0.5, method="dopri5", flow="scaled", retraction="none", max_rejects=30)
    with pytest.warns(RuntimeWarning, match="skipped a step") as rec:
        opt.step(make_closure(opt, B, A, Y))
    tries = opt.last_step.rejected
    assert tries < 31 and f"in all {tries} tries" in str(rec[0].message), (tries, str(rec[0].message))


def test_a_companion_of_another_shape_is_refused_at_load():
    """The companion AdamW's moments are checked like the pairs': loading them into a head of another
    shape would let the fused AdamW write out of bounds at the next step."""
    Y, B, A = problem(34)
    h1, h2 = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    opt = ODELoRA([(B, A)], lr=0.1, companion=[h1])
    for p in (B, A, h1):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt._companion.state[h1]["exp_avg"].shape == (3, 4)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of companion parameter 0 has shape \(3, 4\), the parameter \(5, 4\)"):
        ODELoRA([(B, A)], lr=0.1, companion=[h2]).load_state_dict(opt.state_dict())


def with_head(method="rk4", preconditioner=None, dtype=torch.float64, seed=0):
    """The problem's pair plus a trained bias (the companion), and a closure over them."""
    Y, B, A = problem(seed, dtype=dtype)
    bias = torch.zeros(Y.shape[1], dtype=dtype, requires_grad=True)
    opt = ODELoRA([(B, A)], lr=0.05, method=method, preconditioner=preconditioner, companion=[bias], companion_lr=0.01)
    return opt, (B, A, bias), Y


def head_closure(opt, tensors, Y):
    B, A, bias = tensors

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((B.double() @ A.double() + bias.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("method,preconditioner", [("rk4", None), ("euler", "adam"), ("dopri5", None)])
def test_copies_and_pickles_step_as_the_original(method, preconditioner):
    """``copy.deepcopy`` and ``pickle`` of the tensors with their optimizer give one that steps
    exactly as the original goes on to."""
    import copy
    import pickle

    opt, tensors, Y = with_head(method, preconditioner)
    for _ in range(3):
        opt.step(head_closure(opt, tensors, Y))
    copies = [copy.deepcopy((opt, tensors)), pickle.loads(pickle.dumps((opt, tensors)))]
    for _ in range(3):
        opt.step(head_closure(opt, tensors, Y))
    for opt2, tensors2 in copies:
        for _ in range(3):
            opt2.step(head_closure(opt2, tensors2, Y))
        assert all(torch.equal(a, b) for a, b in zip(tensors, tensors2))
        assert opt2.stats == opt.stats and opt2.last_step == opt.last_step


def test_a_checkpoint_resumes_in_another_precision():
    """A float32 run's state dict loaded beside its factors cast to float64 steps as a new float64
    optimizer does from those factors (Euler keeps no state beyond them), and the other way round."""
    for src, dst, tol in ((torch.float32, torch.float64, 1e-13), (torch.float64, torch.float32, 1e-6)):
        Y, B, A = problem(dtype=src)
        opt = ODELoRA([(B, A)], lr=0.05)
        for _ in range(3):
            opt.step(make_closure(opt, B, A, Y))
        sd = opt.state_dict()
        results = []
        for load in (True, False):
            B2, A2 = (t.detach().to(dst).requires_grad_() for t in (B, A))
            opt2 = ODELoRA([(B2, A2)], lr=0.05)
            if load:
                opt2.load_state_dict(sd)
            for _ in range(2):
                opt2.step(make_closure(opt2, B2, A2, Y))
            results.append((B2 @ A2).detach().double())
        assert (results[0] - results[1]).abs().max() <= tol * results[1].abs().max()


@pytest.mark.parametrize("on_nonfinite", ["warn", "raise"])
def test_a_non_finite_companion_gradient_skips_the_step(on_nonfinite):
    opt, (B, A, bias), Y = with_head("euler")
    opt.on_nonfinite = on_nonfinite
    before = [t.detach().clone() for t in (B, A, bias)]
    closure = head_closure(opt, (B, A, bias), Y)
    closure()
    bias.grad[0] = float("inf")
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteError, match="companion parameter 0"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="non-finite gradient of companion parameter 0"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (B, A, bias)))
    assert opt.stats.skipped == 1 and opt.stats.accepted == 0
    opt.step(closure)
    assert opt.stats.accepted == 1 and bool(torch.isfinite(bias).all()) and not torch.equal(bias, before[2])


def test_a_named_companion_is_named_in_messages_and_steps_as_an_unnamed_one():
    """Companion tensors given as (name, tensor) pairs (``named_parameters()``, also inside param
    groups) step exactly as the bare tensors, and a non-finite gradient names its tensor."""
    runs = []
    for named in (False, True):
        opt, (B, A, bias), Y = with_head("euler")
        items = [("head.bias", bias)] if named else [bias]
        opt = ODELoRA([(B, A)], lr=0.05, companion=[{"params": items, "weight_decay": 0.0}], companion_lr=0.01)
        closure = head_closure(opt, (B, A, bias), Y)
        for _ in range(2):
            opt.step(closure)
        runs.append((opt, bias))
    assert torch.equal(runs[0][1], runs[1][1])
    opt, bias = runs[1]
    opt.zero_grad()
    head_closure(opt, (opt.pairs[0].B, opt.pairs[0].A, bias), with_head("euler")[2])()
    bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient of head.bias"):
        opt.step()
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs"):
        ODELoRA([(opt.pairs[0].B, opt.pairs[0].A)], companion=[("head.bias", bias, 1)])


def test_a_closure_must_return_the_loss_or_none():
    Y, B, A = problem()
    opt = ODELoRA([(B, A)], lr=0.05, method="heun")
    closure = make_closure(opt, B, A, Y)
    before = [t.detach().clone() for t in (B, A)]
    for value, what in (((1.0, 2.0), "a tuple"), (torch.ones(3), r"a float32 tensor of shape \(3,\)"), ({"loss": 1.0}, "a dict"),
                        (torch.tensor(1.0 + 0j), "a complex64 tensor"), (torch.tensor(True), "a bool tensor")):
        def bad(value=value):
            closure()
            return value

        with pytest.raises(TypeError, match=f"the closure returned {what}"):
            opt.step(bad)
        assert all(torch.equal(a, b) for a, b in zip(before, (B, A)))
    for value, number in ((np.float32(1.5), 1.5), (2, 2.0), (torch.tensor([3.0]), 3.0)):
        opt.step(lambda value=value: (closure(), value)[1])
        assert opt.last_step.loss == number and opt.last_step.accepted


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_a_tensor_lr_steps_and_records_numbers(preconditioner):
    Y, B, A = problem()
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner=preconditioner)
    opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=torch.float64)
    for _ in range(2):
        opt.step(make_closure(opt, B, A, Y))
    assert type(opt.last_step.h) is float and type(opt.last_step.t) is float and type(opt.param_groups[0]["t"]) is float
    assert opt.last_step.t == pytest.approx(0.1)


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_factors_moved_to_another_dtype_after_construction_are_followed(preconditioner):
    """``model.double()`` after building the optimizer: the next steps compute in float64 (as a
    new float64 optimizer does from there for Euler), not in the float32 of the construction."""
    Y, B, A = problem(dtype=torch.float32)
    opt = ODELoRA([(B, A)], lr=0.05, preconditioner=preconditioner)
    opt.step(make_closure(opt, B, A, Y))
    for p in (B, A):
        p.data = p.data.double()
    B2, A2 = (t.detach().clone().requires_grad_() for t in (B, A))
    fresh = ODELoRA([(B2, A2)], lr=0.05, preconditioner=preconditioner)
    opt.step(make_closure(opt, B, A, Y))
    fresh.step(make_closure(fresh, B2, A2, Y))
    assert B.dtype == torch.float64 and opt.store.buckets[0].dtype == torch.float64
    if preconditioner is None:
        assert ((B @ A - B2 @ A2).abs().max() <= 1e-13 * (B2 @ A2).abs().max())
    else:  # the moments follow the factors' dtype
        assert all(opt.state[p]["exp_avg"].dtype == torch.float64 for p in (B, A))


def test_misused_options_fail_saying_what_to_pass():
    Y, B, A = problem()
    for damping in (float("nan"), float("inf"), -1.0, "1e-6"):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            ODELoRA([(B, A)], lr=0.05, flow_options={"damping": damping})
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="companion_lr"):
        ODELoRA([(B, A)], lr=0.05, companion=[bias], companion_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="listed twice"):
        ODELoRA([(B, A)], lr=0.05, companion=[bias, bias])
    opt = ODELoRA([(B, A)], lr=0.05)
    with pytest.raises(ValueError, match="companion=\\[...\\] when building ODELoRA"):
        opt.add_param_group({"params": [bias], "companion": True})
    for scale in ("2", True, None, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            ODELoRA([(B, A, scale)], lr=0.05)
    sd = opt.state_dict()
    sd["param_groups"][0]["t"] = float("nan")
    with pytest.raises(ValueError, match="integration time t must be a finite number"):
        opt.load_state_dict(sd)


def test_a_checkpoint_taken_while_a_pair_had_another_dtype_loads_after_it_moved_back():
    """Pairs are bucketed by dtype too: a state saved with one pair in bfloat16 loads into the same
    pairs all in float32, and the next step equals a fresh optimizer's from those factors."""
    Y, B1, A1 = problem(0, dtype=torch.float32)
    _, B2, A2 = problem(1, dtype=torch.float32)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = 0.5 * ((B1.double() @ A1.double() + B2.double() @ A2.double() - Y) ** 2).sum()
            loss.backward()
            return loss
        return closure

    opt = ODELoRA([(B1, A1), (B2, A2)], lr=0.05)
    opt.step(closure_for(opt))
    for p in (B1, A1):
        p.data = p.data.bfloat16()
    opt.step(closure_for(opt))
    sd = opt.state_dict()
    for p in (B1, A1):
        p.data = p.data.float()
    opt.step(closure_for(opt))  # packs the pairs again: one bucket now
    start = [p.detach().clone() for p in (B1, A1, B2, A2)]
    opt.load_state_dict(sd)
    opt.step(closure_for(opt))
    loaded = [p.detach().clone() for p in (B1, A1, B2, A2)]
    with torch.no_grad():
        for p, s in zip((B1, A1, B2, A2), start):
            p.copy_(s)
    fresh = ODELoRA([(B1, A1), (B2, A2)], lr=0.05)
    fresh.step(closure_for(fresh))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(loaded, (B1, A1, B2, A2)))


def test_a_companion_moved_to_another_dtype_steps_and_a_failing_companion_undoes_the_step(monkeypatch):
    opt, (B, A, bias), Y = with_head("euler", dtype=torch.float32)
    opt.step(head_closure(opt, (B, A, bias), Y))
    for p in (B, A, bias):
        p.data = p.data.double()
    before = bias.detach().clone()
    opt.step(head_closure(opt, (B, A, bias), Y))  # torch's fused AdamW alone refuses float32 moments here
    assert opt.stats.accepted == 2 and not torch.equal(bias, before)
    assert all(v.dtype == torch.float64 for k, v in opt._companion.state[bias].items() if k != "step")

    def broken():
        raise RuntimeError("companion failed")

    monkeypatch.setattr(opt._companion, "step", broken)
    start, t0, stats = [p.detach().clone() for p in (B, A, bias)], opt.param_groups[0]["t"], copy.copy(opt.stats)
    with pytest.raises(RuntimeError, match="companion failed"):
        opt.step(head_closure(opt, (B, A, bias), Y))
    assert all(torch.equal(a, b) for a, b in zip(start, (B, A, bias)))
    assert opt.param_groups[0]["t"] == t0 and opt.stats == stats


@pytest.mark.parametrize("method,preconditioner,dtype", [
    ("euler", None, torch.float32), ("euler", "adam", torch.float32), ("euler", None, torch.bfloat16),
    ("euler", "adam", torch.bfloat16), ("rk4", None, torch.float32), ("dopri5", None, torch.float32)])
def test_pairs_frozen_after_construction_sit_out_untouched(method, preconditioner, dtype):
    """Two pairs of one bucket, both in one loss ``|B1 A1 + B2 A2 - Y|^2``; after two steps the
    second pair is frozen (both factors, then only A: LoRA-FA style, with a warning naming it). It
    must stay bit for bit as it was, its Adam moments too, also at the stages of multi-stage
    methods, where the closure sees it; the first pair trains as a pair alone does against the
    target less the frozen product (adaptive steps too: their error norm leaves the frozen pair
    out). Unfrozen, the second pair trains again."""
    Y, B1, A1 = problem(30, dtype=dtype)
    _, B2, A2 = problem(31, dtype=dtype)
    B3, A3 = (t.detach().clone().requires_grad_() for t in (B1, A1))
    opt = ODELoRA([LoRAPair(B1, A1, 1.0, "layer.q"), LoRAPair(B2, A2, 1.0, "layer.v")], lr=0.05, method=method,
                  preconditioner=preconditioner)
    alone = ODELoRA([(B3, A3)], lr=0.05, method=method, preconditioner=preconditioner)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(torch.cat([B2.detach().flatten(), A2.detach().flatten()]))
        loss = 0.5 * ((B1.double() @ A1.double() + B2.double() @ A2.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    for mine, theirs in ((B3, B1), (A3, A1)):  # the pair alone, where the first pair is now
        mine.data.copy_(theirs.detach())
        alone.state[mine] = {k: v.clone() for k, v in opt.state.get(theirs, {}).items()}
    alone._rho = opt._rho  # and its adaptive step
    for frozen in ((B2, A2), (A2,)):
        for p in (B2, A2):
            p.requires_grad_(not any(p is q for q in frozen))
        before = [B2.detach().clone(), A2.detach().clone()] + [opt.state[p][k].clone() for p in (B2, A2) for k in opt.state.get(p, {})]
        target = Y - B2.detach().double() @ A2.detach().double()
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(closure)
                alone.step(make_closure(alone, B3, A3, target))
        half = [str(w.message) for w in caught if "sit out" in str(w.message)]
        assert len(half) == (3 if len(frozen) == 1 else 0) and all("layer.v" in m and "layer.q" not in m for m in half)
        after = [B2.detach(), A2.detach()] + [opt.state[p][k] for p in (B2, A2) for k in opt.state.get(p, {})]
        assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
        assert len(seen) >= 3 and all(torch.equal(s, seen[0]) for s in seen)  # the closure never saw it move
        torch.testing.assert_close(B1.detach() @ A1.detach(), B3.detach() @ A3.detach(), rtol=0,
                                   atol=1e-5 if dtype == torch.float32 else 5e-2)
    for p in (B2, A2):
        p.requires_grad_(True)
    opt.step(closure)
    assert not torch.equal(A2.detach(), before[1])


def test_an_adapter_switched_after_construction_is_named_as_the_cause():
    peft = pytest.importorskip("peft")
    from odelora.integrations.peft import create_odelora_optimizer

    torch.manual_seed(0)
    m = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)),
                            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    m.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    opt = create_odelora_optimizer(m, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    m.set_adapter("other")
    with pytest.raises(RuntimeError, match="frozen or not in use: an adapter made active"):
        opt.step(closure)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_step_of_length_zero_evaluates_the_gradient_once(method):
    """A warm-up starting at lr 0, and lr 0 in mid-run: such a step moves nothing, so it takes one
    closure call (for the loss), not a whole step's; the factors (unbalanced ones too) and the
    adaptive step size stay."""
    Y, B, A = problem(32)
    with torch.no_grad():  # unbalanced: a step of length 0 must not balance them either
        B.mul_(2.0), A.div_(2.0)
    opt = ODELoRA([(B, A)], lr=0.5, method=method)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k in (0, 4) else 1.0)
    for k in range(5):
        calls = [0]
        X0, F0 = (B @ A).detach().clone(), (B.detach().clone(), A.detach().clone())
        rho = opt.state_dict()["odelora"]["rho"]
        loss = opt.step(make_closure(opt, B, A, Y, counter=calls))
        sched.step()
        if k in (0, 4):
            assert calls[0] == 1 and opt.last_step.nfe == 1 and opt.last_step.accepted and opt.last_step.h == 0.0
            assert float(loss) == pytest.approx(0.5 * float(((X0 - Y) ** 2).sum()))
            assert torch.equal(B.detach(), F0[0]) and torch.equal(A.detach(), F0[1])
            assert opt.state_dict()["odelora"]["rho"] == rho
        else:
            assert calls[0] > 1 and opt.last_step.h > 0


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_a_resume_with_a_frozen_pair_is_exact(method):
    """A bucket of two pairs, one of them frozen after the first step, next to a bucket of another
    shape, float32: a checkpoint taken then continues bit for bit (the mixed bucket's frame is
    computed anew on both sides; the other bucket keeps its saved frame)."""
    def make():
        pairs = [problem(40 + i, dtype=torch.float32)[1:] for i in range(2)] + [problem(42, m=10, dtype=torch.float32)[1:]]
        Ys = [problem(43)[0], problem(44)[0], problem(45, m=10)[0]]
        return pairs, Ys

    def build(pairs, Ys):
        opt = ODELoRA([(B, A) for B, A in pairs], lr=0.05, method=method)

        def closure():
            opt.zero_grad()
            loss = sum(0.5 * ((B.double() @ A.double() - Y) ** 2).sum() for (B, A), Y in zip(pairs, Ys))
            loss.backward()
            return loss

        return opt, closure

    pairs, Ys = make()
    opt, closure = build(pairs, Ys)
    opt.step(closure)
    for p in pairs[1]:
        p.requires_grad_(False)
    opt.step(closure)
    sd = torch.load(saved(opt.state_dict()), weights_only=True)
    assert sum(f is None for f in sd["odelora"]["frames"]) == 1  # the mixed bucket's
    mid = [t.detach().clone() for pair in pairs for t in pair]
    for _ in range(3):
        opt.step(closure)
    pairs2, _ = make()
    with torch.no_grad():
        for t, v in zip([t for pair in pairs2 for t in pair], mid):
            t.copy_(v)
    opt2, closure2 = build(pairs2, Ys)
    opt2.load_state_dict(sd)
    for p in pairs2[1]:
        p.requires_grad_(False)
    for _ in range(3):
        opt2.step(closure2)
    assert all(torch.equal(a.detach(), b.detach()) for pa, pb in zip(pairs, pairs2) for a, b in zip(pa, pb))


def test_adaptive_steps_decide_on_the_pairs_that_take_part():
    """Four pairs, two frozen after construction, bs32 at tolerances that limit the step: the
    step sizes and the two training pairs must be those of an optimizer built on those two
    alone (with the frozen pairs' zero errors in the norm, steps came out sqrt(2)^(1/3) longer)."""
    W = [torch.randn(6, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]

    def make():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_(),
                 torch.randn(2, 6, generator=g, dtype=torch.float64).requires_grad_()) for _ in range(4)]

    runs = []
    for train in ((0, 1, 2, 3), (0, 1)):
        ps = make()
        opt = ODELoRA([ps[i] for i in train], lr=0.05, method="bs32", rtol=1e-6, atol=1e-6)
        for B, A in ps[2:]:
            B.requires_grad_(False), A.requires_grad_(False)

        def closure():
            opt.zero_grad()
            loss = sum(((B @ A - w) ** 2).sum() for (B, A), w in zip(ps, W))
            loss.backward()
            return loss

        hs = []
        for _ in range(3):
            opt.step(closure)
            hs.append(opt.last_step.h)
        runs.append((hs, torch.cat([(B @ A).detach().flatten() for B, A in ps[:2]])))
    (h4, X4), (h2, X2) = runs
    assert h4 == pytest.approx(h2, rel=1e-9) and max(h4) < 0.05  # the tolerance limits the step
    torch.testing.assert_close(X4, X2, rtol=0, atol=1e-10)


def test_a_checkpoint_without_a_frozen_companion_tensor_says_how_to_resume_it():
    """Earlier versions left frozen companion tensors out of the optimizer: the error says so."""
    Y, B, A = problem(48)
    W, frozen = torch.zeros(3, requires_grad=True), torch.zeros(2)
    sd = ODELoRA([(B, A)], lr=0.1, companion=[W]).state_dict()
    with pytest.raises(ValueError, match="the state dict has 1 tensors, this optimizer 2.*earlier odelora.*required grad"):
        ODELoRA([(B, A)], lr=0.1, companion=[W, frozen]).load_state_dict(sd)


def test_tied_tensors_are_refused_naming_both():
    """A companion tensor over a factor's memory (PEFT's ensure_weight_tying makes the embedding's
    LoRA tensors views of lm_head's factors) would be stepped by AdamW and then overwritten by the
    pair's commit: its gradient was dropped without a word. The same for two pairs sharing a factor
    (also one added later by add_param_group, refused before it is added) and for a pair's own B
    and A; tensors side by side in one buffer pass."""
    torch.manual_seed(0)
    B, A = torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(2, 5))
    tied = torch.nn.Parameter(B.data.t())  # another Parameter on B's storage, transposed as an embedding's would be
    with pytest.raises(ValueError, match=r"companion tensor emb\.lora shares memory with pair head .*tied weights"):
        ODELoRA([LoRAPair(B, A, 1.0, "head")], lr=0.1, companion=[("emb.lora", tied)])
    B2 = torch.nn.Parameter(A.data[:, :2].t())  # a view of A's storage
    with pytest.raises(ValueError, match="pair (first|second) shares memory with pair (first|second)"):
        ODELoRA([LoRAPair(B, A, 1.0, "first"), LoRAPair(B2, torch.nn.Parameter(torch.randn(2, 3)), 1.0, "second")], lr=0.1)
    untied = torch.nn.Parameter(B.data.t().clone())
    ODELoRA([LoRAPair(B, A, 1.0, "head")], lr=0.1, companion=[untied])  # a copy is fine
    ODELoRA([LoRAPair(B, A, 1.0, "head")], lr=0.1, companion=[untied, torch.nn.Parameter(untied.data)])  # as torch's AdamW takes them
    opt = ODELoRA([LoRAPair(B, A, 1.0, "head")], lr=0.1)
    with pytest.raises(ValueError, match="pair (head|later) shares memory with pair (head|later)"):
        opt.add_param_group({"pairs": [LoRAPair(torch.nn.Parameter(B.data[:3]), torch.nn.Parameter(torch.randn(2, 4)), 1.0, "later")]})
    assert len(opt.param_groups) == 1  # refused before it was added
    with pytest.raises(ValueError, match="pair self shares memory with pair self"):  # B and A of one pair
        ODELoRA([LoRAPair(torch.nn.Parameter(A.data.t()), A, 1.0, "self")], lr=0.1)
    flat = torch.zeros(6 * 2 + 2 * 5 + 7)  # one buffer holding every tensor side by side, as some frameworks allocate them
    B3, A3 = (torch.nn.Parameter(flat[:12].view(6, 2)), torch.nn.Parameter(flat[12:22].view(2, 5)))
    ODELoRA([LoRAPair(B3, A3, 1.0, "flat")], lr=0.1, companion=[torch.nn.Parameter(flat[22:])])
    with pytest.raises(ValueError, match="companion tensor #0 shares memory with pair flat"):
        ODELoRA([LoRAPair(B3, A3, 1.0, "flat")], lr=0.1, companion=[torch.nn.Parameter(flat[20:])])  # A3's last two entries


def test_repr_shows_the_method_and_the_options_each_group_acts_on():
    """torch's repr listed Adam's betas, eps and weight_decay for plain steps, where they do
    nothing (and a weight decay is refused); now the method heads it and each group shows what
    it acts on."""
    B, A = torch.zeros(6, 2, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    plain = repr(ODELoRA([LoRAPair(B, A, 1.0, "fc")], lr=0.1, method="rk4"))
    assert plain.startswith("ODELoRA (method=rk4, flow=balanced, retraction=truncate") and "1 pair(s): fc" in plain
    assert "lr: 0.1" in plain and not any(k in plain for k in ("betas", "eps", "weight_decay"))
    adam = repr(ODELoRA([(B, A)], lr=0.1, preconditioner="adam", weight_decay=0.1, companion=[torch.randn(3, requires_grad=True)]))
    group0, group1 = adam.split("Parameter Group 1")
    assert "weight_decay: 0.1" in group0 and "betas: (0.9, 0.999)" in group0
    assert "companion AdamW" in group1 and "lr: 0.001" in group1
    head = repr(ODELoRA([(B, A)], lr=0.1, companion=[torch.randn(3, requires_grad=True)],
                        companion_kwargs=dict(weight_decay=0.5, betas=(0.8, 0.9)))).split("Parameter Group 1")[1]
    assert "weight_decay: 0.5" in head and "betas: (0.8, 0.9)" in head  # the companion's AdamW reads them


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_torchs_optimizer_state_dict_helpers_change_nothing_and_loading_theirs_says_what_to_use(method):
    """torch.distributed.checkpoint's get_optimizer_state_dict (what accelerate's FSDP checkpoints
    call) makes an optimizer with an empty ``state`` take a step at lr 0 on zero gradients: Euler
    counted it and stepped the companion's moments, RK4 raised for want of a closure and left every
    lr at 0. Such a step now does nothing. What that helper returns lacks ODELoRA's own entry, and
    loading it says where an exact resume comes from."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def run(call: bool):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict(dict(B=torch.nn.Linear(2, 6, bias=False), A=torch.nn.Linear(4, 2, bias=False), head=torch.nn.Linear(6, 3)))
        with torch.no_grad():
            model["B"].weight.mul_(0.1)
        opt = ODELoRA([(model["B"].weight, model["A"].weight)], lr=0.1, method=method, companion=model["head"].parameters(), companion_lr=0.01)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 8, 4, generator=g), torch.randn(4, 8, 3, generator=g)
        for k in range(4):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model["head"](model["B"](model["A"](x[k]))), y[k])
                loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad(set_to_none=True)
            if call and k == 1:
                before = (opt.stats.steps, [g["lr"] for g in opt.param_groups],
                          opt._companion.state[model["head"].weight]["exp_avg"].clone())
                saved = get_optimizer_state_dict(model, opt)
                assert (opt.stats.steps, [g["lr"] for g in opt.param_groups]) == before[:2]
                assert torch.equal(opt._companion.state[model["head"].weight]["exp_avg"], before[2])
                with pytest.raises(ValueError, match="get_optimizer_state_dict.*save_checkpoint / load_checkpoint"):
                    set_optimizer_state_dict(model, opt, saved)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(True), run(False))

    B, A = torch.zeros(5, 2, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    opt = ODELoRA([(B, A)], lr=0.0, method=method)
    with pytest.raises((RuntimeError, ValueError)):  # no gradient at all (a forgotten backward; rk4: no closure) still fails at lr 0
        opt.step()
    B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)
    opt.set_stage_closure(None, loss=123.0)
    assert opt.step() is None and opt.stats.steps == 0  # nothing to do: the pending loss is taken with it
    B.grad, A.grad = torch.ones_like(B), torch.ones_like(A)
    opt.param_groups[0]["lr"] = 0.1
    if method == "euler":
        opt.step()
        assert opt.last_step.loss is None and opt.stats.steps == 1

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from odelora import flows
from odelora.integrators import TABLEAUS, NonFiniteError, StepController, Tableau, get_tableau, integrate

M, N, R = 6, 5, 2


def mf_problem(seed=0, flow="gradient"):
    """Gradient flow of 1/2 ||B A - Y||^2 (a LoRA matrix-factorization flow) as numpy and torch."""
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((M, N))
    B0, A0 = rng.standard_normal((M, R)) * 0.5, rng.standard_normal((R, N)) * 0.5

    def torch_f(y):
        B, A = y
        G = B @ A - Y_t
        return list(flows.get_flow(flow)(B, A, G @ A.T, B.T @ G))

    def numpy_f(t, z):  # independent numpy implementation of the same gradient flow
        B, A = z[: M * R].reshape(M, R), z[M * R :].reshape(R, N)
        G = B @ A - Y
        return np.concatenate([(-G @ A.T).ravel(), (-B.T @ G).ravel()])

    Y_t = torch.from_numpy(Y)
    return torch_f, numpy_f, [torch.from_numpy(B0), torch.from_numpy(A0)], np.concatenate([B0.ravel(), A0.ravel()])


def flat(y):
    return np.concatenate([t.numpy().ravel() for t in y])


def test_tableaus_check_themselves_and_derive_fsal():
    assert {name for name, t in TABLEAUS.items() if t.fsal} == {"bs32", "dopri5"}
    for tab in TABLEAUS.values():
        if tab.adaptive:
            assert abs(sum(tab.b_err)) < 1e-14
    with pytest.raises(ValueError, match="row 1"):
        Tableau("bad", 2, (0.0, 0.5), ((), (1.0,)), (0.5, 0.5))
    with pytest.raises(ValueError, match="sum to"):
        Tableau("bad", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.6))
    with pytest.raises(ValueError, match="b_low"):
        Tableau("bad", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), b_low=(1.0, 0.0))


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "rk4"])
def test_fixed_step_convergence_order_against_scipy(method):
    torch_f, numpy_f, y0, z0 = mf_problem()
    T = 1.0
    ref = solve_ivp(numpy_f, (0, T), z0, method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
    order = get_tableau(method).order
    hs = [T / n for n in ((8, 16, 32, 64) if order == 4 else (32, 64, 128, 256))]
    errs = []
    for h in hs:
        res = integrate(torch_f, y0, (0, T), method=method, h=h)
        errs.append(np.linalg.norm(flat(res.y) - ref))
        assert res.stats.nfe == get_tableau(method).stages * round(T / h)
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.2, (method, slope, errs)


@pytest.mark.parametrize("method", ["bs32", "dopri5"])
def test_adaptive_meets_tolerance_against_scipy(method):
    torch_f, numpy_f, y0, z0 = mf_problem(seed=1)
    T, rtol, atol = 2.0, 1e-7, 1e-9
    ts = [0.5, 1.0, 2.0]
    ref = solve_ivp(numpy_f, (0, T), z0, method="DOP853", rtol=1e-13, atol=1e-13, t_eval=ts).y
    res = integrate(torch_f, y0, (0, T), method=method, rtol=rtol, atol=atol, t_eval=ts)
    assert res.ts == ts
    for i, y in enumerate(res.ys):
        err = np.abs(flat(y) - ref[:, i]) / (atol + rtol * np.abs(ref[:, i]))
        assert np.sqrt(np.mean(err**2)) < 50, (method, i)  # global error within a modest multiple
    assert res.stats.accepted > 0 and res.stats.nfe < 5000


def test_controller_rules():
    c = StepController(rtol=1e-3, atol=1e-6)
    assert c.next_step(1.0, 0.0, 2) == 5.0  # growth limit
    assert c.next_step(1.0, 1e9, 2) == pytest.approx(0.2)  # shrink limit
    assert c.next_step(1.0, 8.0, 2) == pytest.approx(0.9 * 8.0 ** (-1 / 3))
    assert StepController(h_max=0.5).next_step(1.0, 0.0, 4) == 0.5
    # after a rejection, the observed order: here the error fell like h (a jump in the velocity)
    assert c.next_step(0.2, 200.0, 2, previous=(1.0, 1000.0)) == pytest.approx(0.2 * 0.9 / 200.0)
    assert c.next_step(0.2, 200.0, 2, previous=(1.0, 1e9)) == pytest.approx(0.2 * 0.9 * 200.0 ** (-1 / 3))
    # an error that does not fall with h (a step off a zero product), or grows: cut by shrink**2
    assert c.next_step(0.9, 1.2, 4, previous=(1.0, 1.1)) == pytest.approx(0.9 * 0.2**2)
    assert c.next_step(0.9, 1.1, 4, previous=(1.0, 1.1)) == pytest.approx(0.9 * 0.2**2)
    assert c.next_step(0.9, 80.0, 4, previous=(1.0, 80.0)) == pytest.approx(0.9 * 0.2**2)
    assert c.next_step(0.9, 80.0, 4, previous=(1.0, 85.0)) == pytest.approx(0.9 * 0.2**4)  # q = 0.58: floor
    assert c.next_step(0.004, 114.0, 4, previous=(0.065, 36.0)) == pytest.approx(0.004 * 0.2**2)
    with pytest.raises(ValueError):
        StepController(rtol=0, atol=0)


def test_errors_are_clear():
    f = lambda y: y
    with pytest.raises(ValueError, match="unknown method"):
        integrate(f, [torch.ones(2)], (0, 1), method="rk45")
    with pytest.raises(ValueError, match="needs a positive step"):
        integrate(f, [torch.ones(2)], (0, 1), method="rk4")
    with pytest.raises(ValueError, match="t_eval"):
        integrate(f, [torch.ones(2)], (0, 1), method="rk4", h=0.1, t_eval=[2.0])
    with pytest.raises(TypeError, match=r"y0 must be a list of tensors.*pass \[y\]"):  # f was handed the rows of the tensor
        integrate(f, torch.ones(2, 3), (0, 1), method="rk4", h=0.1)
    with pytest.raises(ValueError, match=r"t_eval must be sorted in increasing order.*\[0.5, 0.2\]"):  # was reordered silently
        integrate(f, [torch.ones(2)], (0, 1), method="dopri5", t_eval=[0.5, 0.2])
    for method, h in [("rk4", float("nan")), ("rk4", math.inf), ("rk4", -0.1), ("dopri5", -0.1), ("dopri5", float("nan")), ("dopri5", 0.0)]:
        with pytest.raises(ValueError, match="h must be a positive finite number"):  # not a backward run, a NaN state or a spin to max_steps
            integrate(f, [torch.ones(2)], (0, 1), method=method, h=h)
    with pytest.raises(ValueError, match=r"unknown method \['rk4'\]"):
        integrate(f, [torch.ones(2)], (0, 1), method=["rk4"])


def test_late_or_infinite_time_spans_and_non_finite_flows():
    """dy/dt = -y over half a unit starting at t = 1e12: the end test scaled with |t1|, not the span,
    and returned y0 untouched (t1 = inf too); a NaN flow came back as a NaN state from fixed steps
    and as a tolerance failure from adaptive ones."""
    f = lambda y: [-y[0]]
    for t0 in (0.0, 1e9, 1e12, 1e14):  # time counted from t0: no rounding of t itself (1e-4 off at 1e12 when it was)
        for span in [(t0, t0 + 0.5), np.array([t0, t0 + 0.5]), torch.tensor([t0, t0 + 0.5], dtype=torch.float64)]:
            res = integrate(f, [torch.ones(1, dtype=torch.float64)], span, method="dopri5", rtol=1e-10, atol=1e-12)
            assert float(res.y[0]) == pytest.approx(math.exp(-0.5), rel=1e-9) and res.ts == [t0 + 0.5], (t0, span)
    for span in [(0.0, math.inf), (-math.inf, 0.0), (0.0, 1.0, 2.0)]:
        with pytest.raises(ValueError, match="t_span must be"):
            integrate(f, [torch.ones(1)], span, method="dopri5")
    for method, h in [("euler", 0.1), ("rk4", 0.1), ("dopri5", None)]:
        with pytest.raises(NonFiniteError, match="flow at the state at t=0 is not finite"):
            integrate(lambda y: [y[0] * math.nan], [torch.ones(1)], (0, 1), method=method, h=h)
    with pytest.raises(TypeError, match="y0 must be a list of tensors"):
        integrate(f, [np.ones(1)], (0, 1), method="dopri5")


def test_atol_zero_accepts_components_that_do_not_move():
    """With atol = 0 the tolerance of an entry that stays 0 is 0: its zero error meets it (0/0 is
    not a NaN that rejects every try). The moving entry still follows exp(-t) to rtol."""
    res = integrate(lambda y: [y[0] * torch.tensor([-1.0, 0.0], dtype=torch.float64)], [torch.tensor([1.0, 0.0], dtype=torch.float64)],
                    (0, 1), method="dopri5", rtol=1e-8, atol=0.0)
    assert res.y[0][1] == 0 and abs(float(res.y[0][0]) - math.exp(-1)) < 1e-6 and res.stats.rejected <= 2


@pytest.mark.parametrize("method, h", [("rk4", 0.1), ("dopri5", None)])
def test_runs_to_the_end_of_t_span_whatever_t_eval_says(method, h):
    """As ``solve_ivp``: states at the ``t_eval`` times only, and ``y`` the state at ``t_span[1]``,
    also where no ``t_eval`` time is the end (closed form ``exp(-t)``)."""
    res = integrate(lambda y: [-y[0]], [torch.ones(1, dtype=torch.float64)], (0.0, 2.0), method=method, h=h,
                    rtol=1e-10, atol=1e-12, t_eval=[0.5, 1.0])
    assert res.ts == [0.5, 1.0] and len(res.ys) == 2
    for t, y in zip(res.ts, res.ys):
        assert float(y[0]) == pytest.approx(math.exp(-t), rel=1e-5)
    assert float(res.y[0]) == pytest.approx(math.exp(-2.0), rel=1e-5)


def test_callback_max_steps_and_a_given_controller():
    """``callback(t, y)`` after every accepted step, with the state the closed form gives there;
    ``max_steps`` stops a run that needs more; a ``controller`` passed in sets the tolerances."""
    seen = []
    res = integrate(lambda y: [-y[0]], [torch.ones(2, dtype=torch.float64)], (0, 1), method="rk4", h=0.25,
                    callback=lambda t, y: seen.append((t, float(y[0][0]))))
    assert [t for t, _ in seen] == [0.25, 0.5, 0.75, 1.0] and res.stats.accepted == 4
    assert all(abs(v - math.exp(-t)) < 1e-4 for t, v in seen)
    with pytest.raises(RuntimeError, match="max_steps=3 reached at t=0.75"):
        integrate(lambda y: [-y[0]], [torch.ones(2)], (0, 1), method="rk4", h=0.25, max_steps=3)
    loose = integrate(lambda y: [-y[0]], [torch.ones(2, dtype=torch.float64)], (0, 1), controller=StepController(rtol=1e-3, atol=1e-3))
    tight = integrate(lambda y: [-y[0]], [torch.ones(2, dtype=torch.float64)], (0, 1), controller=StepController(rtol=1e-10, atol=1e-12))
    assert loose.stats.accepted < tight.stats.accepted
    assert abs(float(tight.y[0][0]) - math.exp(-1)) < 1e-9 < abs(float(loose.y[0][0]) - math.exp(-1))


def test_exponential_closed_form():
    res = integrate(lambda y: [-y[0]], [torch.ones(3, dtype=torch.float64)], (0, 1), method="dopri5", rtol=1e-10, atol=1e-12)
    assert abs(float(res.y[0][0]) - np.exp(-1)) < 1e-9


def test_a_failed_final_combination_is_a_rejected_attempt_with_a_smaller_step():
    """The step's own combination of the stages (a truncation, an SVD) can fail like a stage can
    (non-finite entries after an overflow): the attempt is rejected and retried with a smaller h,
    never a raw LinAlgError out of the optimizer."""
    from odelora.integrators import VectorSpace, attempt

    tab = get_tableau("rk4")

    class Fragile(VectorSpace):
        def combine(self, y0, h, coeffs, stages):
            if tuple(coeffs) == tuple(tab.b) and h[0] > 0.15:
                raise torch.linalg.LinAlgError("linalg.svd: the input matrix contained non-finite values")
            return super().combine(y0, h, coeffs, stages)

    y0 = [torch.ones(3, dtype=torch.float64)]
    res = attempt(lambda y: [-y[0]], y0, 0.2, tab, Fragile(), StepController(), unit=[1.0], max_tries=3)
    assert res.accepted and res.rejected == 1 and res.nonfinite == 1 and res.h < 0.15
    h = res.h
    expect = sum(h**k / math.factorial(k) * (-1) ** k for k in range(5))  # RK4 on y' = -y: the degree-4 Taylor factor
    torch.testing.assert_close(res.y[0], torch.full((3,), expect, dtype=torch.float64))


def test_integrate_says_which_limit_stopped_it():
    """Running out of ``max_steps`` while every try is rejected names ``max_steps``; a controller
    and tolerances together are refused (the controller's would win silently)."""
    stiff = lambda y: [-50 * y[0]]
    with pytest.raises(RuntimeError, match="max_steps=2 reached"):
        integrate(stiff, [torch.ones(3, dtype=torch.float64)], (0, 10), method="dopri5", h=5.0, max_steps=2)
    with pytest.raises(ValueError, match="pass rtol and atol to the StepController"):
        integrate(stiff, [torch.ones(3, dtype=torch.float64)], (0, 1), controller=StepController(rtol=1e-3, atol=1e-3), rtol=1e-9)

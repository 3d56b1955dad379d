"""One suite for the optimizer, parametrized over flows x methods."""

import io

import numpy as np
import pytest
import torch

from odelora import LoRAPair, NonFiniteError, ODELoRA, balance, imbalance
from odelora.integrators import TABLEAUS

from conftest import projection_reference

FLOWS = ["balanced", "scaled", "gradient"]
METHODS = list(TABLEAUS)


def problem(seed=0, m=12, n=9, r=2, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * 0.3
    B, A = balance(B, A)
    B = B.to(dtype).requires_grad_()
    A = A.to(dtype).requires_grad_()
    return Y, B, A


def make_closure(opt, B, A, Y, scale=1.0, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = 0.5 * ((scale * B.double() @ A.double() - Y) ** 2).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_common_suite(flow, method):
    Y, B, A = problem()
    opt = ODELoRA([LoRAPair(B, A, 1.0, "w")], lr=0.05, method=method, flow=flow, rtol=1e-4, atol=1e-7)
    calls = [0]
    closure = make_closure(opt, B, A, Y, counter=calls)
    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    tab = TABLEAUS[method]
    if tab.adaptive:
        assert calls[0] >= 5 * (tab.stages - 0) - 0 and opt.stats["nfe"] == calls[0]
    else:
        assert calls[0] == 5 * tab.stages  # one closure call per stage
    assert losses[-1] < losses[0]
    assert opt.last_step["nfe"] >= 1 and opt.last_step["accepted"]
    # resume: a fresh optimizer loaded from a (weights_only) checkpoint continues bit-identically
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "B": B.detach(), "A": A.detach()}, buf)
    for _ in range(3):
        opt.step(closure)
    expect_B, expect_A = B.detach().clone(), A.detach().clone()
    buf.seek(0)
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


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_nonfinite_step_leaves_everything_untouched(flow, method):
    Y, B, A = problem(1)
    opt = ODELoRA([(B, A)], lr=0.05, method=method, flow=flow, preconditioner=None)
    closure = make_closure(opt, B, A, Y)
    opt.step(closure)
    before = (B.detach().clone(), A.detach().clone(), opt.param_groups[0]["t"], opt.param_groups[0]["h"])
    sd = opt.state_dict()
    calls = [0]

    def bad():
        calls[0] += 1
        loss = closure()
        return loss * float("nan") if calls[0] == 2 or method == "euler" else loss

    with pytest.warns(RuntimeWarning, match="rejected"):
        opt.step(bad)
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])
    assert opt.param_groups[0]["t"] == before[2] and opt.param_groups[0]["h"] == before[3]
    assert opt.stats["nonfinite"] == 1 and not opt.last_step["accepted"]
    assert sd["state"] == opt.state_dict()["state"]
    strict = ODELoRA([(B, A)], lr=0.05, method=method, flow=flow, on_nonfinite="raise")
    with pytest.raises(NonFiniteError):
        strict.step(lambda: closure() * float("inf"))
    assert torch.equal(B.detach(), before[0]) and torch.equal(A.detach(), before[1])


def test_nan_gradient_without_closure_is_rejected():
    Y, B, A = problem(2)
    opt = ODELoRA([(B, A)], lr=0.1)
    B0 = B.detach().clone()
    B.grad = torch.full_like(B, float("nan"))
    A.grad = torch.zeros_like(A)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(B.detach(), B0)


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
    # one Euler step moves X by -h P(G) up to the O(h^2) factor cross term
    step = (B @ A).detach().numpy() - X0
    P = projection_reference(G, Bn, An)
    assert np.linalg.norm(step + 0.1 * P) < 0.1 * 0.1 * 10 * np.linalg.norm(P)
    with pytest.raises(ValueError, match="closure"):
        ODELoRA([(B, A)], lr=0.1, method="rk4").step()


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
        hs.append(opt.last_step["h"])
        sched.step()
    assert hs == [0.2, 0.1, 0.05]
    assert opt.param_groups[0]["t"] == pytest.approx(0.35)


def test_bf16_parameters():
    Y, B, A = problem(6, dtype=torch.bfloat16)
    opt = ODELoRA([(B, A)], lr=0.3, method="heun")
    closure = make_closure(opt, B, A, Y)
    first = float(opt.step(closure))
    for _ in range(30):
        last = float(opt.step(closure))
    assert B.dtype == torch.bfloat16 and A.dtype == torch.bfloat16
    assert last < 0.05 * first
    assert opt.last_step["imbalance"] < 0.05


def test_euler_h_half_reaches_machine_precision_and_is_factorization_invariant():
    Y, B, A = problem(7, m=15, n=11, r=3)
    traj = []
    for refactor in (False, True):
        B1, A1 = B.detach().clone(), A.detach().clone()
        if refactor:
            R = torch.tensor([[2.0, 0.3, -1.0], [0.0, 0.5, 0.7], [0.1, 0.0, 3.0]], dtype=torch.float64)
            B1, A1 = balance(B1 @ R, torch.linalg.solve(R, A1))
        B1.requires_grad_(), A1.requires_grad_()
        opt = ODELoRA([(B1, A1)], lr=0.5)
        closure = make_closure(opt, B1, A1, Y)
        xs = []
        for _ in range(150):
            opt.step(closure)
            xs.append((B1 @ A1).detach().clone())
        traj.append(torch.stack(xs))
    assert float(closure()) < 1e-12
    assert float((traj[0] - traj[1]).abs().max()) < 1e-10


def test_adaptive_rejects_and_shrinks_with_untouched_retries():
    Y, B, A = problem(8)
    opt = ODELoRA([(B, A)], lr=5.0, method="bs32", rtol=1e-8, atol=1e-10, max_rejects=30)
    opt.step(make_closure(opt, B, A, Y))
    assert opt.last_step["rejected"] > 0 and opt.last_step["accepted"]
    assert opt.last_step["h"] < 5.0 and opt.param_groups[0]["t"] == pytest.approx(opt.last_step["h"])
    # reusing the first stage: each retry costs stages - 1 evaluations
    assert opt.last_step["nfe"] == 4 + 3 * opt.last_step["rejected"]


def test_param_groups_and_input_forms():
    Y, B, A = problem(9)
    Y2, B2, A2 = problem(10)
    opt = ODELoRA([{"pairs": [(B, A)], "lr": 0.1}, {"pairs": [{"B": B2, "A": A2, "scale": 2.0}], "lr": 0.01}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [p.scale for p in opt.pairs] == [1.0, 2.0]
    with pytest.raises(ValueError, match="expected B"):
        ODELoRA([(A, B)])
    with pytest.raises(ValueError, match="lr"):
        ODELoRA([(B, A)], lr=-1)
    with pytest.raises(ValueError, match="unknown method"):
        ODELoRA([(B, A)], method="rk5")
    with pytest.raises(ValueError, match="more than one pair"):
        ODELoRA([(B, A), (B, A2)])
    with pytest.raises(ValueError, match="fixed-step"):
        ODELoRA([(B, A)], method="dopri5", preconditioner="adam")


def test_zero_B_start_escapes_and_then_balances():
    g = torch.Generator().manual_seed(11)
    Y = torch.randn(10, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 7, generator=g, dtype=torch.float64)
    B = torch.zeros(10, 2, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(2, 7, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    opt = ODELoRA([(B, A, 2.0)], lr=0.3)
    closure = make_closure(opt, B, A, Y, scale=2.0)
    l0 = float(opt.step(closure))
    assert float(B.abs().max()) > 0 and float(imbalance(B.detach(), A.detach())) < 1e-12  # rebalanced
    assert opt.last_step["imbalance"] > 0.5  # the drift before the retraction: B was 0
    for _ in range(100):
        l = float(opt.step(closure))
    assert l < 1e-10 * l0


def test_adam_preconditioner_trains_and_resumes():
    Y, B, A = problem(12)
    opt = ODELoRA([(B, A)], lr=0.05, method="heun", preconditioner="adam", weight_decay=1e-4)
    closure = make_closure(opt, B, A, Y)
    l0 = float(opt.step(closure))
    for _ in range(150):
        l = float(opt.step(closure))
    assert l < 0.01 * l0
    st = opt.state[B]
    assert st["step"] == 151 and st["exp_avg"].shape == B.shape
    sd = torch.load(io.BytesIO(_saved(opt.state_dict())), weights_only=True)
    B2, A2 = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    opt2 = ODELoRA([(B2, A2)], lr=0.05, method="heun", preconditioner="adam", weight_decay=1e-4)
    opt2.load_state_dict(sd)
    for _ in range(5):
        opt.step(closure)
        opt2.step(make_closure(opt2, B2, A2, Y))
    assert torch.equal(B2.detach(), B.detach()) and torch.equal(A2.detach(), A.detach())


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_retraction_qr_reuse_is_checked_after_loading_other_weights():
    """The QR factors saved with the state are reused only if they match the parameters."""
    Y, B, A = problem(13)
    opt = ODELoRA([(B, A)], lr=0.3)
    closure = make_closure(opt, B, A, Y)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    assert sd["odelora"]["qr_cache"][0] is not None
    Y2, B2, A2 = problem(14)  # different weights, same shapes
    opt2 = ODELoRA([(B2, A2)], lr=0.3)
    opt2.load_state_dict(sd)
    ref = ODELoRA([(B2.detach().clone().requires_grad_(), A2.detach().clone().requires_grad_())], lr=0.3)
    Bf, Af = ref.pairs[0].B, ref.pairs[0].A
    opt2.step(make_closure(opt2, B2, A2, Y2))
    ref.step(make_closure(ref, Bf, Af, Y2))
    assert torch.equal(B2.detach(), Bf.detach()) and torch.equal(A2.detach(), Af.detach())

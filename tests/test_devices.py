"""The step on every device this machine has (the CPU always, CUDA where a GPU is present), against
references computed in float64 numpy or torch on the CPU: exact Euler steps of both retractions,
the Adam path against torch's AdamW, PEFT's start in low precision, resume across devices.
"cpu-cholesky-qr" runs on the CPU with the QR that CUDA uses (Cholesky QR, Householder fallback)."""

import io

import numpy as np
import pytest
import torch

from odelora import balance
from odelora.integrators import get_tableau, rk_step
from odelora.retractions import Factors, get_retraction

from conftest import dense_split, dense_truncation, field_for, projection_reference

DEVICES = ["cpu", "cpu-cholesky-qr", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture
def device(request, monkeypatch):
    name = request.param
    if name == "cpu-cholesky-qr":
        from odelora import geometry

        monkeypatch.setattr(geometry, "CHOLESKY_QR_DEVICES", {"cpu", "cuda"})
        return "cpu"
    return name
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def on(device, dtype, *arrays):
    return [torch.as_tensor(a).to(device=device, dtype=dtype) for a in arrays]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_euler_steps_of_both_retractions_match_dense_references(device, dtype, rng):
    m, n, r, s, h = 40, 30, 4, 2.0, 0.2
    B, A = (t.numpy() for t in balance(torch.from_numpy(rng.standard_normal((m, r))), torch.from_numpy(rng.standard_normal((r, n)))))
    G = rng.standard_normal((m, n))
    Bt, At, Gt = on(device, dtype, B, A, G)
    y0 = [Factors(Bt[None], At[None], torch.tensor([s], dtype=dtype, device=device))]
    f = field_for(lambda X: Gt)
    y1, _ = rk_step(f, y0, [h], get_tableau("euler"), get_retraction("truncate"))
    X1 = s * (y1[0].B[0] @ y1[0].A[0]).double().cpu().numpy()
    expected = dense_truncation(s * B @ A - h * projection_reference(G, B, A), r)
    np.testing.assert_allclose(X1, expected, atol=TOL[dtype] * np.linalg.norm(expected))

    # PEFT's start (B = 0) with a rank-1 gradient, one-sided retraction: P_U1 (-h G P_V0)
    Bz, g1 = np.zeros((m, r)), np.outer(rng.standard_normal(m), rng.standard_normal(n))
    Bzt, G1t = on(device, dtype, Bz, g1)
    y0 = [Factors(Bzt[None], At[None], torch.tensor([s], dtype=dtype, device=device))]
    y1, _ = rk_step(field_for(lambda X: G1t), y0, [h], get_tableau("euler"), get_retraction("split"))
    X1 = s * (y1[0].B[0] @ y1[0].A[0]).double().cpu().numpy()
    expected = dense_split(-h * g1 @ np.linalg.pinv(A) @ A, A)
    np.testing.assert_allclose(X1, expected, atol=TOL[dtype] * np.linalg.norm(expected))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_adam_path_matches_torch_adamw_on_the_cpu(device):
    from test_optim import check_adam_path_against_torch_adamw

    check_adam_path_against_torch_adamw(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["euler", "dopri5"])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_peft_start_with_rank_one_gradients_trains_in_low_precision(device, method, dtype):
    from test_optim import check_rank_one_gradients_from_peft_start

    check_rank_one_gradients_from_peft_start(method, dtype, "truncate", device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_peft_model_trains_on_the_device_and_resumes_on_the_cpu(device):
    """A PEFT LoRA model with a trained head: 5 steps on ``device``, the optimizer state saved and
    loaded into a CPU copy; 5 more steps on each give the same factors (float64)."""
    peft = pytest.importorskip("peft")
    from odelora.integrations.peft import create_odelora_optimizer

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"])
        return peft.get_peft_model(net, cfg).double()

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)

    def steps(model, opt, k, dev):
        xd, yd = x.to(dev), y.to(dev)
        for _ in range(k):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xd), yd).backward()
            opt.step()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(xd), yd))

    model = build().to(device)
    opt = create_odelora_optimizer(model, lr=0.5, method="euler", companion_lr=1e-2)
    with torch.no_grad():
        l0 = float(torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)))
    assert steps(model, opt, 5, device) < l0
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu")
    cpu = build()
    cpu.load_state_dict(saved["model"])
    cpu_opt = create_odelora_optimizer(cpu, lr=0.5, method="euler", companion_lr=1e-2)
    cpu_opt.load_state_dict(saved["opt"])
    steps(model, opt, 5, device)
    steps(cpu, cpu_opt, 5, "cpu")
    for (name, p), q in zip(model.named_parameters(), cpu.parameters()):
        np.testing.assert_allclose(p.detach().cpu().numpy(), q.detach().numpy(), atol=1e-9, err_msg=name)

"""The real-network tasks of the lab against dense autograd, at a tiny scale (a ViT pretrained on
4,000 Fashion-MNIST images for four epochs, cached with the lab tests' other real runs)."""

import math

import pytest
import torch
import torch.nn.functional as F

from odelora.init import adapted_layers
from odelora.lab.tasks import TaskSpec, build_task, full_finetune, lora_updates, start_, train_lora
from test_lab import REAL

pytestmark = pytest.mark.fashion_mnist
SPEC = TaskSpec(**{k: v for k, v in REAL.items() if k != "tasks"})


@pytest.fixture(scope="module")
def task():
    return build_task("vision", SPEC)


def _dense_grads(task, idx):
    """dL/dW of every adapted weight by autograd on the weights themselves, LoRA branch at zero."""
    layers = adapted_layers(task.model)
    for x in layers:
        x.base.weight.requires_grad_(True)
    try:
        loss = F.cross_entropy(task.model(task.Xtr[idx]), task.ytr[idx])
        grads = torch.autograd.grad(loss, [x.base.weight for x in layers])
    finally:
        for x in layers:
            x.base.weight.requires_grad_(False)
    return {x.path: g.double() for x, g in zip(layers, grads)}


def test_pretrained_vit_transfers_and_splits_are_disjoint(task):
    assert task.info["pretrain_test_acc"] > 0.5  # well above chance (0.1) on Fashion-MNIST
    acc, _ = task.evaluate()
    assert acc > 0.3 and len(task.yte) == 1000 and len(task.ytr) == SPEC.digits_train
    tr = {bytes(x.numpy()) for x in (task.Xtr * 255).round().to(torch.uint8)}
    assert not any(bytes(x.numpy()) in tr for x in (task.Xte[:200] * 255).round().to(torch.uint8))


def test_spectral_start_is_the_top_singular_pairs_of_the_dense_gradient():
    t = build_task("vision", SPEC)
    with torch.no_grad():
        for x in adapted_layers(t.model):
            x.B.zero_()
    idx = t.order(3, 1, 64)[0]
    G = _dense_grads(t, idx)
    start_(t, "spectral", 0.1, seed=3, batch=64)
    for path, dW in lora_updates(t).items():
        U, S, Vh = torch.linalg.svd(-G[path])
        r = SPEC.rank
        torch.testing.assert_close(dW, 0.01 * U[:, :r] @ Vh[:r], atol=1e-6, rtol=1e-4)


def test_full_finetuning_step_is_sgd_on_the_dense_weights():
    t = build_task("vision", SPEC)
    with torch.no_grad():
        for x in adapted_layers(t.model):
            x.B.zero_()
    G = _dense_grads(t, t.order(0, 1, 32)[0])
    dW, rows = full_finetune(t, 0.05, seed=0, batch=32, steps=1)
    for path in G:
        torch.testing.assert_close(dW[path], -0.05 * G[path], atol=1e-7, rtol=1e-4)
    assert rows[-1]["step"] == 1


def test_budget_counts_gradient_evaluations(task):
    before = {k: v.detach().clone() for k, v in task.model.named_parameters() if v.requires_grad}
    rows, status = train_lora(task, "odelora-rk4", 1e-4, seed=0, batch=16, budget=8, evals=2)
    assert status == "done" and [r["nfe"] for r in rows] == [0, 4, 8] and rows[-1]["step"] == 2
    assert math.isnan(rows[0]["train_loss"]) and math.isfinite(rows[-1]["train_loss"])
    with torch.no_grad():
        for k, v in task.model.named_parameters():
            if k in before:
                v.copy_(before[k])


def test_quick_reproduction_leaves_the_real_networks_out(tmp_path, monkeypatch, capsys):
    from odelora.lab import registry
    from odelora.lab.cli import main as cli
    from test_lab import TINY

    monkeypatch.setattr(registry, "EXPERIMENTS", {n: registry.EXPERIMENTS[n] for n in ("trajectory-fidelity", "init-scale")})
    monkeypatch.setattr(registry.EXPERIMENTS["trajectory-fidelity"], "QUICK", TINY["trajectory-fidelity"])
    assert cli(["reproduce", "--quick", "--out", str(tmp_path), "--jobs", "1", "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "1 experiments" in first and "init-scale" not in first and not (tmp_path / "init-scale").exists()


def test_full_reproduction_runs_the_matrix_suite_and_names_what_it_leaves_out(tmp_path, monkeypatch, capsys):
    from odelora.lab import registry
    from odelora.lab.cli import main as cli
    from test_lab import TINY

    chosen = ("trajectory-fidelity", "pinn-poisson", "init-scale")
    monkeypatch.setattr(registry, "EXPERIMENTS", {n: registry.EXPERIMENTS[n] for n in chosen})
    from odelora.lab import runner

    full = runner.load_config  # the full preset of trajectory-fidelity made tiny, so that it runs in seconds
    monkeypatch.setattr(runner, "load_config", lambda exp, c, s, quick=False: exp.Config(**TINY[exp.name])
                        if exp.name == "trajectory-fidelity" else full(exp, c, s, quick=quick))
    assert cli(["reproduce", "--out", str(tmp_path), "--jobs", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1 experiments" in lines[0] and (tmp_path / "trajectory-fidelity" / "report.md").exists()
    assert "the pinn suite (pinn-poisson;" in lines[1] and "--suites matrix pinn or --all" in lines[1]
    assert "the real suite (init-scale;" in lines[2]
    assert not (tmp_path / "pinn-poisson").exists() and not (tmp_path / "init-scale").exists()

"""PINN fine-tuning: each family end to end at a tiny scale (pretrain a few steps, fine-tune a few
steps, the error drops, the report has both plots), gradient evaluations counted alike for every
method, unstable runs recorded rather than raised, and the window arithmetic."""

import os

os.environ.setdefault("DDE_BACKEND", "pytorch")

import math
import re

import numpy as np
import pandas as pd
import pytest

from odelora.lab.experiments.pinn import PINN_EXPERIMENTS, run_table, rate_table, window
from odelora.lab.pinn.problems import get_family
from odelora.lab.pinn.train import Net, finetune, load_or_pretrain
from odelora.lab.report import build_report
from odelora.lab.runner import run_experiment

pytestmark = pytest.mark.slow  # end-to-end: processes, trainings, reports

NET, POINTS = Net(16, 2), 80


def tiny(tmp_path, **kw):
    base = dict(width=16, depth=2, points=80, pretrain_steps=500, pretrain_lr=1e-2, lbfgs_steps=100, budget=40,
                eval_every=10, seeds=1, ranks=[2],
                methods=["odelora-rk4", "lora-adam"], grids={"odelora-rk4": [1e-3], "lora-adam": [1e-2, 3e-2]})
    return {**base, **kw}


# Burgers' sharper front needs more points and steps before fine-tuning pays off (the error first rises)
EXTRA = {"pinn-allen-cahn": dict(dim=2), "pinn-burgers": dict(points=200, budget=120, eval_every=20)}


@pytest.mark.parametrize("cls", PINN_EXPERIMENTS, ids=lambda c: c.name)
def test_family_pretrains_finetunes_and_reports(cls, tmp_path):
    exp = cls()
    cfg = exp.Config(**tiny(tmp_path, **EXTRA.get(cls.name, {})))
    df = run_experiment(exp, cfg, tmp_path / "out", jobs=1, progress=False)
    assert len(list((tmp_path / "out" / "pretrained").glob("*.pt"))) == 1  # one checkpoint under the output folder, shared
    runs = df[df["final"]]
    adam = runs[runs.method == "lora-adam"]
    start = float(df.start_error.iloc[0])
    assert adam.finite.all() and adam.error.min() < start, (cls.name, start, adam.error.tolist())
    assert (runs.nfe == cfg.budget).all()  # RK4: a quarter of the steps of Adam
    claims, report = build_report(tmp_path / "out")
    text = report.read_text()
    figs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {"window_r2.png", "error_vs_evals_r2.png"} <= set(figs), figs
    assert all((tmp_path / "out" / f).stat().st_size > 5000 for f in figs)
    verdicts = {c.claim.split(":")[0].split(" reaches")[0]: c.verdict for c in claims}
    assert verdicts and all(c.note for c in claims if c.verdict == "FAIL")
    assert not re.search(r"\b(nan|inf)\b", text.split("## Config")[0])


@pytest.fixture(scope="module")
def poisson(tmp_path_factory):
    fam = get_family("poisson")
    state, info = load_or_pretrain(tmp_path_factory.mktemp("ckpt"), fam, NET, POINTS, adam_steps=300, adam_lr=1e-2, lbfgs_steps=0)
    return fam, state, info


@pytest.mark.parametrize("method,steps", [("odelora-rk4", 6), ("odelora-euler", 24), ("lora-riemannian", 24), ("balora", 24),
                                          ("lora-plus", 24), ("full-adam", 24)])
def test_gradient_evaluations_are_counted_alike(poisson, method, steps):
    fam, state, _ = poisson
    run = finetune(fam, state, NET, POINTS, method=method, lr=1e-3, rank=2, seed=0, budget=24, eval_every=8)
    assert run.finite and (run.nfe, run.steps) == (24, steps), (run.nfe, run.steps, run.reason)
    assert [r["nfe"] for r in run.rows] == [0, 8, 16, 24]


def test_adaptive_run_counts_rejected_attempts(poisson):
    fam, state, _ = poisson
    run = finetune(fam, state, NET, POINTS, method="odelora-bs32", lr=10.0, rank=2, seed=0, budget=40, eval_every=10)
    assert run.finite and run.nfe >= 40 and run.rejected >= 1 and run.t < 10.0 * run.steps


@pytest.mark.parametrize("method", ["odelora-euler", "odelora-bs32", "lora-adam", "lora-riemannian"])
def test_unstable_runs_are_recorded_not_raised(poisson, method):
    """A NaN in a frozen weight makes every loss NaN: ODELoRA raises NonFiniteError at once (caught),
    the torch optimizers step on; both end as one recorded non-finite run."""
    fam, state, _ = poisson
    bad = {k: v.clone() for k, v in state.items()}
    bad[next(k for k in bad if k.endswith("bias"))][0] = float("nan")
    run = finetune(fam, bad, NET, POINTS, method=method, lr=1e-3, rank=2, seed=0, budget=40, eval_every=10)
    assert not run.finite and run.reason and math.isnan(run.final_error) and run.nfe <= 4, run


def test_checkpoint_is_reused(poisson, tmp_path):
    fam, state, info = poisson
    a = load_or_pretrain(tmp_path, fam, NET, POINTS, adam_steps=20, adam_lr=1e-3, lbfgs_steps=0)
    b = load_or_pretrain(tmp_path, fam, NET, POINTS, adam_steps=20, adam_lr=1e-3, lbfgs_steps=0)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and a[1] == b[1]
    assert all((a[0][k] == b[0][k]).all() for k in a[0])


def test_window_is_the_longest_stable_run_of_grid_rates():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    stable = [0.0, 1.0, 1.0, 0.8, 0.2, 1.0]
    rates = pd.DataFrame(dict(lr=lrs, stable=stable, median=[1.0, 0.3, 0.2, 0.25, 0.9, 0.1]))
    w = window(rates, 0.8)
    assert (w["lo"], w["hi"], w["best"], w["edge"]) == (3e-4, 3e-3, 1e-3, "")
    assert w["width"] == pytest.approx(1.0)
    w = window(rates.assign(stable=[1.0] * 6), 0.8)
    assert w["width"] == pytest.approx(np.log10(300)) and w["edge"] == "smallest, largest" and w["best"] == 3e-2
    assert not window(rates.assign(stable=0.0), 0.8)["stable"]


def test_run_and_rate_tables():
    rows = []
    histories = [([0.5, 0.2, 0.05], True), ([0.5, 0.4, 0.3], True), ([0.5, 9.0, np.nan], False),
                 ([0.5, 0.05, 0.3, 0.08], True)]  # the last one dips below the target, leaves it, and comes back
    for seed, (errs, finite) in enumerate(histories):
        for i, e in enumerate(errs):
            rows.append(dict(method="m", rank=2, seed=seed, lr=0.1, nfe=10 * i, error=e, final=i == len(errs) - 1, finite=finite,
                             reason="", spikes=seed, steps=20, rejected=0, t=np.nan))
    runs = run_table(pd.DataFrame(rows), target=0.1)
    assert runs.to_target.tolist() == [20, np.inf, np.inf, 30] and runs.error.tolist()[2] == np.inf
    r = rate_table(runs, threshold=0.25).iloc[0]
    assert r.stable == pytest.approx(1 / 2) and r["median"] == pytest.approx(0.19) and r.to_target == np.inf
    r = rate_table(runs[runs.seed != 1].assign(to_target=[20, 40, 30]), threshold=0.25).iloc[0]
    assert r.to_target == 30  # the median over seeds

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
from odelora.lab.cli import main
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
    assert verdicts and all(c.note for c in claims if c.verdict in ("FAIL", "INCONCLUSIVE"))
    assert not re.search(r"\b(nan|inf)\b", text.split("## Config")[0])


def test_a_sweep_grows_and_shrinks_by_running_only_its_new_cases(tmp_path, monkeypatch, capsys):
    """More rates and seeds reuse the saved cases (their files untouched); a smaller grid runs
    nothing and reports only its own cases; any other key is still another config."""
    exp = PINN_EXPERIMENTS[0]()
    out = tmp_path / exp.name
    small = dict(methods=["lora-adam"], grids={"lora-adam": [1e-2]}, budget=20, eval_every=10)
    run_experiment(exp, exp.Config(**tiny(tmp_path, **small)), out, jobs=1, progress=False)
    (saved,) = (out / "cases").glob("*.csv")
    before = saved.read_bytes()
    ran = []
    real = type(exp).run_case
    monkeypatch.setattr(type(exp), "run_case", lambda self, cfg, case: ran.append(case) or real(self, cfg, case))
    grown = exp.Config(**tiny(tmp_path, **{**small, "grids": {"lora-adam": [1e-3, 1e-2]}, "seeds": 2}))
    df = run_experiment(exp, grown, out, jobs=1, progress=False)
    assert sorted((c["seed"], c["lr"]) for c in ran) == [(0, 1e-3), (1, 1e-3), (1, 1e-2)]
    assert saved.read_bytes() == before
    assert sorted(set(zip(df.seed, df.lr))) == [(0, 1e-3), (0, 1e-2), (1, 1e-3), (1, 1e-2)]
    ran.clear()
    shrunk = exp.Config(**tiny(tmp_path, **{**small, "grids": {"lora-adam": [1e-3]}}))
    df = run_experiment(exp, shrunk, out, jobs=1, progress=False)
    assert "3 saved case(s)" in capsys.readouterr().err
    assert not ran and sorted(set(zip(df.seed, df.lr))) == [(0, 1e-3)]
    assert len(list((out / "cases").glob("*.csv"))) == 4  # the others stay saved
    _, report = build_report(out)
    assert "Rows: 3 from 1 cases" in report.read_text()
    for f in (out / "cases").glob("*.csv"):  # named otherwise, as an earlier version named its cases
        f.rename(f.with_name("old-" + f.name))
    with pytest.raises(SystemExit, match=r"none of its 4 case files is a case of its config.yaml: they belong to another sweep"):
        build_report(out)
    with pytest.raises(SystemExit, match="no experiment folder with a finished case"):  # the root's report leaves it out
        main(["report", str(tmp_path)])
    assert "no finished case yet, left out" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"another config \(differs in budget\).*differs only in grids, methods, ranks, seeds"):
        run_experiment(exp, exp.Config(**tiny(tmp_path, **{**small, "grids": {"lora-adam": [1e-3]}, "budget": 30})), out, jobs=1,
                       progress=False)


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


@pytest.mark.parametrize("method", ["odelora-bs32", "odelora-dopri5"])
def test_adaptive_run_counts_rejected_attempts_and_stays_within_the_budget(poisson, method):
    """A step that would evaluate past the budget is cut short and undone: the run ends at the
    budget with the state of its last whole step, the same as a run stopped right after that step."""
    fam, state, _ = poisson
    kw = dict(method=method, lr=10.0, rank=2, seed=0, eval_every=10)
    run = finetune(fam, state, NET, POINTS, budget=40, **kw)
    assert run.finite and run.nfe == 40 and max(r["nfe"] for r in run.rows) == 40, (run.nfe, run.rows)
    assert run.rejected >= 1 and run.t < 10.0 * run.steps
    for b in range(39, 0, -1):  # the largest budget at which one step fewer completes
        short = finetune(fam, state, NET, POINTS, budget=b, **kw)
        if short.steps < run.steps:
            break
    longest = finetune(fam, state, NET, POINTS, budget=b + 1, **kw)  # its last step ends exactly at b + 1 <= 40
    assert longest.steps == run.steps and longest.final_error == run.final_error and longest.t == run.t


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
    # against its grid: a rate not run yet breaks a window, and the ends are the grid's
    part = rates.assign(stable=[1.0] * 6).drop(index=2).assign(lr=lambda d: d.lr * (1 + 1e-12))  # as read back from CSV
    w = window(part, 0.8, grid=[1e-5] + lrs + [1e-1])
    assert (w["lo"], w["hi"], w["edge"]) == (3e-3, 3e-2, "")
    assert window(part, 0.8)["edge"] == "smallest, largest"  # without the grid: the rates there are


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


def _grid_runs(spec, budget=60, every=5):
    """Rows of hand-made runs, start error 1: ``spec[method][lr] = (evaluations from which the
    error is 0.1, or None; final error otherwise)``, logged every ``every`` evaluations (a number,
    or one per method: steps of several evaluations log off the grid of ``eval_every``)."""
    rows = []
    for m, rates in spec.items():
        step = every[m] if isinstance(every, dict) else every
        for lr, (reach, final) in rates.items():
            for nfe in sorted({*range(0, budget, step), budget}):
                e = 1.0 if nfe == 0 else 0.1 if reach is not None and nfe >= reach else final if reach is None else 0.5
                rows.append(dict(method=m, rank=4, seed=0, lr=lr, nfe=nfe, error=e, loss=e, final=nfe == budget, finite=True,
                                 reason="", spikes=0, steps=nfe, rejected=0, t=np.nan, start_error=1.0, pretrained_error=0.01,
                                 case=f"{m}-{lr}-0"))
    return pd.DataFrame(rows)


def test_window_and_evaluation_claims_that_measure_nothing_are_inconclusive(tmp_path):
    """Stable: final error < 0.5, target 0.2. odelora-euler's window [1e-4, 1e-3] is cut off by the
    bottom of its grid and narrower than lora-adam's [1e-3, 1e-1]: not a FAIL; odelora-rk4's
    [1e-2] is interior: a FAIL. Both reach the target at 10 evaluations (one logging interval):
    a tie; RK4 never does: a FAIL. Without any method reaching it: nothing tested."""
    exp = PINN_EXPERIMENTS[0]()
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    spec = {"odelora-euler": {1e-4: (10, None), 1e-3: (None, 0.3), 1e-2: (None, 0.8), 1e-1: (None, 2.0), 1.0: (None, 2.0)},
            "odelora-rk4": {1e-4: (None, 0.8), 1e-3: (None, 0.8), 1e-2: (None, 0.3), 1e-1: (None, 2.0), 1.0: (None, 2.0)},
            "lora-adam": {1e-4: (None, 2.0), 1e-3: (10, None), 1e-2: (None, 0.3), 1e-1: (None, 0.3), 1.0: (None, 2.0)}}
    cfg = exp.Config(methods=list(spec), grids={m: grid for m in spec}, ranks=[4], seeds=1, budget=60, eval_every=5)
    claims, _ = exp.report(_grid_runs(spec), cfg, tmp_path)
    v = {c.claim.split(":")[0].split(" reaches")[0] + (" evals" if " reaches" in c.claim else ""): c for c in claims}
    assert [v[k].verdict for k in ("odelora-euler", "odelora-rk4", "odelora-euler evals", "odelora-rk4 evals")] == \
        ["INCONCLUSIVE", "FAIL", "INCONCLUSIVE", "FAIL"]
    assert ("odelora-euler's window reaches the smallest rate of its grid (0.0001), so its 1.0 decades are a lower bound"
            in v["odelora-euler"].note and "rates below 0.0001 would decide it" in v["odelora-euler"].note)
    assert "less than one logging interval apart (10 and 10" in v["odelora-euler evals"].note
    # the no-divergence windows (final error below the start, 1): euler [1e-4, 1e-2], rk4 [1e-4, 1e-2], lora-adam [1e-3, 1e-1]
    for m in ("odelora-euler", "odelora-rk4"):
        assert (f"No-divergence windows (every loss finite, final error below the start): {m} 2.0 decades [0.0001, 0.01] "
                "(at the smallest grid rate); widest baseline lora-adam: 2.0 decades [0.001, 0.1].") in v[m].note
    spec["odelora-euler"][1e-4] = spec["lora-adam"][1e-3] = (None, 0.3)
    claims, _ = exp.report(_grid_runs(spec), cfg, tmp_path)
    c = next(c for c in claims if c.claim.startswith("odelora-euler reaches"))
    assert c.verdict == "INCONCLUSIVE" and "nothing was tested" in c.note


def test_evaluation_counts_less_than_one_logging_interval_apart_are_a_tie(tmp_path):
    """Errors logged every 10 evaluations, at whole steps: odelora-rk4 logs at multiples of 6,
    lora-adam at multiples of 7. 18 against 21 lie in different tens but 3 apart: a tie; 6 against
    21: a PASS; 42 against 21: a FAIL. The loser's fastest rate at an end of its grid is a bound
    (a rate beyond it might get there sooner): nothing is decided."""
    exp = PINN_EXPERIMENTS[0]()
    grid = [1e-4, 1e-3, 1e-2]
    spec = {"odelora-rk4": {1e-4: (None, 0.3), 1e-3: (18, None), 1e-2: (None, 0.3)},
            "lora-adam": {1e-4: (None, 0.3), 1e-3: (21, None), 1e-2: (None, 0.3)}}
    cfg = exp.Config(methods=list(spec), grids={m: grid for m in spec}, ranks=[4], seeds=1, budget=60, eval_every=10)
    evals = lambda: next(c for c in exp.report(_grid_runs(spec, every={"odelora-rk4": 6, "lora-adam": 7}), cfg, tmp_path)[0]
                         if c.claim.startswith("odelora-rk4 reaches"))
    c = evals()
    assert c.verdict == "INCONCLUSIVE" and "less than one logging interval apart (18 and 21" in c.note, c.note
    spec["odelora-rk4"][1e-3] = (6, None)
    assert evals().verdict == "PASS"
    spec["odelora-rk4"][1e-3] = (42, None)
    assert evals().verdict == "FAIL"
    spec["odelora-rk4"][1e-2] = (35, None)  # its fastest rate is now the largest of its grid
    c = evals()
    assert c.verdict == "INCONCLUSIVE" and "odelora-rk4's fastest rate, 0.01, is the largest rate of its grid" in c.note, c.note


def _rk4_window_claim(spec, tmp_path):
    """odelora-rk4's window claim from hand-made runs (``_grid_runs``) on the grid 1e-4 to 1."""
    exp = PINN_EXPERIMENTS[0]()
    cfg = exp.Config(methods=list(spec), grids={m: [1e-4, 1e-3, 1e-2, 1e-1, 1.0] for m in spec}, ranks=[4], seeds=1, budget=60,
                     eval_every=5)
    return next(c for c in exp.report(_grid_runs(spec), cfg, tmp_path)[0] if c.claim.startswith("odelora-rk4: stable"))


def test_a_window_pass_over_a_baseline_cut_off_by_its_grid_is_inconclusive(tmp_path):
    """odelora-rk4's interior window [1e-3, 1e-1] is wider than lora-adam's one stable rate; at the
    bottom of lora-adam's grid that one rate is a lower bound (not a PASS), inside it a PASS."""
    spec = {"odelora-rk4": {1e-4: (None, 0.8), 1e-3: (None, 0.3), 1e-2: (None, 0.3), 1e-1: (None, 0.3), 1.0: (None, 2.0)},
            "lora-adam": {1e-4: (None, 0.3), 1e-3: (None, 0.8), 1e-2: (None, 0.8), 1e-1: (None, 2.0), 1.0: (None, 2.0)}}
    window = lambda: _rk4_window_claim(spec, tmp_path)
    c = window()
    assert c.verdict == "INCONCLUSIVE" and "lora-adam's window reaches the smallest rate of its grid (0.0001)" in c.note, c.note
    spec["lora-adam"][1e-4], spec["lora-adam"][1e-3] = (None, 0.8), (None, 0.3)
    assert window().verdict == "PASS"


def test_a_shorter_stable_run_at_a_grid_end_leaves_a_window_fail_undecided(tmp_path):
    """odelora-rk4's window [1e-2, 1e-1] is narrower than lora-adam's [1e-3, 1e-1], but rk4 is also
    stable at 1e-4, the bottom of its grid: rates below could widen that run past lora-adam's, so
    the FAIL rests on a bound (it was given, the short run ignored); without it, a FAIL."""
    spec = {"odelora-rk4": {1e-4: (None, 0.3), 1e-3: (None, 0.8), 1e-2: (None, 0.3), 1e-1: (None, 0.3), 1.0: (None, 2.0)},
            "lora-adam": {1e-4: (None, 0.8), 1e-3: (None, 0.3), 1e-2: (None, 0.3), 1e-1: (None, 0.3), 1.0: (None, 2.0)}}
    window = lambda: _rk4_window_claim(spec, tmp_path)
    c = window()
    assert c.verdict == "INCONCLUSIVE" and "odelora-rk4 is also stable at the smallest rate of its grid (0.0001)" in c.note, c.note
    spec["odelora-rk4"][1e-4] = (None, 0.8)
    assert window().verdict == "FAIL"


def test_windows_of_equal_width_on_shifted_grids_are_a_tie(tmp_path):
    """[1e-6, 3e-3] and [1e-5, 3e-2] both span log10(3000) decades, though the two logarithms differ
    in the last bit: no PASS; the variant's window at its grid's end makes the tie a lower bound."""
    exp = PINN_EXPERIMENTS[0]()
    rk4, adam = [1e-6, 3e-6, 1e-5, 3e-3, 1e-2], [1e-5, 3e-5, 3e-2, 1e-1]
    spec = {"odelora-rk4": {lr: (None, 0.3 if lr <= 3e-3 else 2.0) for lr in rk4},
            "lora-adam": {lr: (None, 0.3 if lr <= 3e-2 else 2.0) for lr in adam}}
    cfg = exp.Config(methods=list(spec), grids={"odelora-rk4": rk4, "lora-adam": adam}, ranks=[4], seeds=1, budget=60, eval_every=5)
    c = next(c for c in exp.report(_grid_runs(spec), cfg, tmp_path)[0] if c.claim.startswith("odelora-rk4: stable"))
    assert c.verdict == "INCONCLUSIVE" and "odelora-rk4's window reaches the smallest rate of its grid" in c.note, c.note


def test_a_partial_run_decides_no_comparison_and_reports_a_method_whose_runs_all_diverged(tmp_path):
    """A report built before every case finished: grid rates without runs broke windows and
    methods without runs dropped out of the baselines, so comparisons came out PASS or FAIL on
    what happened to run; now they wait (inconclusive). A method whose only finished rate diverged
    crashed the report's table (its best rate was a grid rate that never ran)."""
    from odelora.lab.experiments.pinn import PINN_EXPERIMENTS

    exp = PINN_EXPERIMENTS[0]()
    cfg = exp.Config(**tiny(tmp_path, grids={"odelora-rk4": [1e-3, 1e3], "lora-adam": [1e-2, 3e-2]}))
    out = tmp_path / "out"
    run_experiment(exp, cfg, out, jobs=1, progress=False)
    for f in (out / "cases").glob("*.csv"):  # keep rk4's diverging rate and one lora-adam rate
        if "odelora-rk4" in f.name and "lr=0.001_" in f.name or "lora-adam" in f.name and "lr=0.03" in f.name:
            f.unlink()
    claims, report = build_report(out)
    decided = [c for c in claims if c.verdict in ("PASS", "FAIL")]
    assert not decided, [(c.claim, c.verdict) for c in decided]
    assert any(c.note.startswith("partial run (2 of 4 cases finished)") for c in claims), claims
    assert "**Partial run:**" in report.read_text()

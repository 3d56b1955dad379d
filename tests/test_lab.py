"""Each experiment at a tiny scale checks its own claims; the runner resumes; reports rebuild."""

import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from odelora.lab import registry
from odelora.lab.cli import main as cli
from odelora.lab.core import VERDICTS
from odelora.lab.registry import get_experiment
from odelora.lab.report import build_report
from odelora.lab.runner import case_id, damaged_cases, folder_lock, load_config, pending_cases, run_experiment

TINY = {
    "matrix-sensing": dict(
        m=10, n=10, rank=2, kappas=[1, 100], starts=["spectral"], seeds=1, max_iters=3000, log_every=20,  # LoRA GD runs 3000 > 10x Euler's
        methods=["odelora-euler", "scaled-gd", "lora-gd"],
        grids={"odelora-euler": [0.6, 0.8, 1.0], "scaled-gd": [0.4, 0.6, 0.8], "lora-gd": [0.3, 0.5, 0.7]},
    ),
    "strongly-convex": dict(m=5, n=5, seeds=1, methods=["odelora-euler", "odelora-rk4", "scaled-gd"], steps_times_L=[1.0, 2.0],
                            max_iters=1500),
    "trajectory-fidelity": dict(seeds=1, methods=["euler", "heun", "rk4", "dopri5"], steps=[10, 20, 40], adaptive_rtols=[1e-4, 1e-6]),
    "feature-learning": dict(widths=[64, 512, 4096], seeds=4, constants=[0.01, 0.1],
                             rules=["odelora", "sgd", "sgd-ratio-n", "sgd-ratio-n2", "adam", "adam-ratio-16", "lora-plus"]),
    "lora-mf": dict(seeds=3, alphas=[1e-3, 1e-4], settings=["dw>1"], inits=["random", "spectral"], points=100, rtol=1e-8),
    "lora-gd-rate": dict(problems=["logistic-bbc"], rules=["theory", "constant"], constants={"theory": [1, 64, 4096], "constant": [0.5]},
                         steps=120, bbc_docs=150, max_length=32),
}

# claims each tiny run must pass (a substring of the claim text)
MUST_PASS = {
    "matrix-sensing": ["at most 1.1x", "independent of kappa", "slows down like kappa"],
    "strongly-convex": ["converges linearly at h = 1/L"],
    "trajectory-fidelity": ["euler:", "heun:", "rk4:", "dopri5 (adaptive)"],
    "feature-learning": ["odelora: one rate", "LoRA GD (SGD) keeps", "Adam keeps"],
    "lora-mf": ["linear regime", "lasts T1", "alpha^(2(1-s))", "misalignment at T1", "far lower and vanishes faster"],
    "lora-gd-rate": ["theory step: J(V+)"],
}
REAL_CACHE = str(Path(tempfile.gettempdir()) / "odelora-test-real-cache")  # small pretrained ViT, shared by the real-network tests
REAL = dict(tasks=["vision"], pretrain_epochs=4.0, pretrain_limit=4000, digits_train=500, cache_dir=REAL_CACHE)
TINY["init-scale"] = dict(REAL, seeds=2, methods=["adamw"], alphas=[1.0, 1e-2, 1e-4], spectral_alpha=1e-2, steps=20, batch=32,
                          evals=1, spectral_batch=64)
TINY["sensitivity"] = dict(REAL, seeds=2, methods=["odelora-euler", "odelora-rk4", "adamw"], budget=16, batch=32, evals=2,
                           grids={"odelora-euler": [1e-4, 1e-3, 1e-2], "odelora-rk4": [1e-3], "adamw": [1e-4, 1e-3, 1e-2]})
TINY["step-rules"] = dict({k: v for k, v in REAL.items() if k != "tasks"}, steps=30, fit_rows=64, power_iters=5,
                         rules=["theory", "constant", "practical-grad"], constants={"theory": [1.0], "constant": [0.3, 30.0], "practical-grad": [0.3]})
TINY["finetune"] = dict(seeds=2, methods=["odelora-euler", "odelora-rk4", "adamw"], steps=2, eval_every=1, batch=4, train_docs=16,
                        eval_docs=16, max_length=16, cache_dir=REAL_CACHE,
                        grids={"odelora-euler": [0.05], "odelora-rk4": [0.05], "adamw": [1e-3, 2e-3]})
MUST_PASS["init-scale"] = MUST_PASS["sensitivity"] = MUST_PASS["step-rules"] = MUST_PASS["finetune"] = []  # empirical claims: a tiny run must report them, not pass them
BARE_NONFINITE = re.compile(r"\b(nan|inf|NaN|Inf)\b")


def test_registry_is_one_table_and_imports_run_one_way():
    import odelora.lab as lab

    from odelora.lab.experiments.pinn import PINN_EXPERIMENTS  # tested at a tiny scale in tests/test_pinn.py

    assert set(registry.EXPERIMENTS) == set(TINY) | {c.name for c in PINN_EXPERIMENTS}
    root = Path(lab.__file__).parent

    def imports(path):
        return set(re.findall(r"^\s*from (\.+[\w.]*) import", path.read_text(), re.M))

    assert not {i for i in imports(root / "core.py") if "experiments" in i or "registry" in i or "runner" in i}
    for f in (root / "experiments").glob("*.py"):
        bad = {i for i in imports(f) if any(x in i for x in ("registry", "runner", "report", "cli"))}
        assert not bad, (f.name, bad)
    assert not {i for i in imports(root / "runner.py") if "registry" in i or "experiments" in i}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.fashion_mnist) if TINY[n].get("cache_dir") == REAL_CACHE
                                  else n for n in TINY])
def test_experiment_claims_at_tiny_scale(name, tmp_path):
    exp = get_experiment(name)
    cfg = exp.Config(**TINY[name])
    run_experiment(exp, cfg, tmp_path, jobs=1, progress=False)
    claims, report = build_report(tmp_path)
    text = report.read_text()
    for key in MUST_PASS[name]:
        hits = [c for c in claims if key in c.claim]
        assert hits, (key, [c.claim for c in claims])
        assert all(c.verdict == "PASS" for c in hits), [(c.claim, c.measured, c.note) for c in hits]
    assert all(c.note for c in claims if c.verdict in ("FAIL", "INCONCLUSIVE", "FINDING"))
    assert "**Measured:**" in text and not BARE_NONFINITE.search(text.split("## Config")[0]), text
    figs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert figs and all((tmp_path / f).stat().st_size > 5000 for f in figs)


def _tiny_ms():
    exp = get_experiment("matrix-sensing")
    return exp, exp.Config(**TINY["matrix-sensing"])


def test_a_run_killed_outright_keeps_the_times_of_its_saved_cases(tmp_path, monkeypatch):
    """meta.json is written after every case: a run stopped with no chance to clean up (SIGKILL;
    here an exception no handler catches) leaves its cases' times on record, as an interrupted
    run, and the next run lists it among the earlier ones."""
    exp, cfg = _tiny_ms()
    cfg = cfg.model_copy(update=dict(kappas=[1, 10, 100]))
    original, calls = type(exp).run_case, {"n": 0}

    class Killed(BaseException):
        pass

    def killed(self, cfg, case):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return original(self, cfg, case)

    monkeypatch.setattr(type(exp), "run_case", killed)
    with pytest.raises(Killed):
        run_experiment(exp, cfg, tmp_path, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["interrupted"] and meta["ran"] == 2 and len(meta["case_times"]) == 2 and "earlier_runs" not in meta
    monkeypatch.setattr(type(exp), "run_case", original)
    run_experiment(exp, cfg, tmp_path, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert not meta["interrupted"] and len(meta["case_times"]) == len(exp.cases(cfg))
    assert [r["ran"] for r in meta["earlier_runs"]] == [2] and meta["earlier_runs"][0]["interrupted"]


def test_interrupted_sweep_resumes_without_lost_or_duplicated_rows(tmp_path, monkeypatch):
    exp, cfg = _tiny_ms()
    cfg = cfg.model_copy(update=dict(kappas=[1, 10, 100]))
    full = run_experiment(exp, cfg, tmp_path / "ref", progress=False)
    calls = {"n": 0}
    original = type(exp).run_case

    def flaky(self, cfg, case):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the sweep were killed mid-way
        return original(self, cfg, case)

    monkeypatch.setattr(type(exp), "run_case", flaky)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").write_text("a report of an earlier, partial run")
    with pytest.raises(KeyboardInterrupt, match="rerun the same command to resume"):
        run_experiment(exp, cfg, tmp_path / "run", progress=False)
    done = list((tmp_path / "run" / "cases").glob("*.csv"))
    assert len(done) == 2 and not list((tmp_path / "run" / "cases").glob(".*tmp"))
    assert not (tmp_path / "run" / "report.md").exists()  # no stale report beside the new cases
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["interrupted"] and len(meta["case_times"]) == 2
    monkeypatch.setattr(type(exp), "run_case", original)
    resumed = run_experiment(exp, cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 3  # the finished cases were not run again
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())  # every case's time, from whichever run saved it
    assert not meta["interrupted"] and len(meta["case_times"]) == len(exp.cases(cfg)) and meta["earlier_runs"][-1]["interrupted"]
    key = ["case", "run", "iter"]
    assert not resumed.duplicated(key).any()
    a = resumed.sort_values(key).reset_index(drop=True)
    b = full.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_csv(tmp_path / "run" / "results.csv")) == len(full)


def test_batched_runs_match_runs_made_one_at_a_time():
    """A batch is only a way to share the gradient evaluation: each run must follow the same
    trajectory as when it is trained alone."""
    import torch

    from odelora.lab.methods import Run, train
    from odelora.lab.problems import quadratic_fns, sensing_family, small_random_start

    Q, Xs = sensing_family(8, 8, 2, [1.0, 10.0], 5.0, 0)
    b, a = small_random_start(8, 8, 2, 0.1, 0)
    g, mf = quadratic_fns(Q, Xs)
    specs = [(0, 0.5), (1, 0.5), (1, 0.9), (0, 3.0)]  # the last one diverges
    for method in ("odelora-euler", "lora-gd", "adam"):
        lr_scale = 0.05 if method == "adam" else 1.0
        runs = [Run(b, a, lr * lr_scale) for _, lr in specs]
        which = torch.tensor([k for k, _ in specs])
        batch = train(method, runs, lambda B, A, i: g(B, A, which[i]), lambda B, A, i: mf(B, A, which[i]),
                      iters=300, target=1e-10, log_every=10)
        for j, (k, lr) in enumerate(specs):
            kk = torch.tensor([k])
            alone = train(method, [runs[j]], lambda B, A, i: g(B, A, kk[i]), lambda B, A, i: mf(B, A, kk[i]),
                          iters=300, target=1e-10, log_every=10)[0]
            assert (alone.status, alone.iters, alone.nfe) == (batch[j].status, batch[j].iters, batch[j].nfe), (method, j)
            m1 = [r["metric"] for r in alone.rows]
            m2 = [r["metric"] for r in batch[j].rows]
            assert m1 == pytest.approx(m2, rel=1e-6, nan_ok=True)


def test_claims_with_nothing_converged_are_inconclusive_not_fail_or_pass(tmp_path):
    """A matrix-sensing run capped before any method reaches the target decides none of the
    claims that compare iteration counts, nor the grid check (nothing to check)."""
    exp = get_experiment("matrix-sensing")
    cfg = exp.quick_config().model_copy(update=dict(max_iters=30, log_every=5, methods=["odelora-euler", "scaled-gd", "lora-gd"],
                                                    starts=["spectral"]))
    run_experiment(exp, cfg, tmp_path, progress=False)
    claims, _ = build_report(tmp_path)
    decided = {c.claim: c.verdict for c in claims if c.passed is not None}
    assert len(decided) == 4 and set(decided.values()) == {"INCONCLUSIVE"}, decided
    notes = " ".join(c.note for c in claims)
    assert "no count to compare" in notes and "neither method reached the target" in notes and "nothing to check" in notes


def test_lora_gd_stopped_short_of_10x_euler_leaves_the_kappa_claim_inconclusive(tmp_path):
    """LoRA GD stopped by the stall rule before 10x ODELoRA-Euler's count: only its projected count
    says >= 10x, and a verdict resting on an extrapolation is inconclusive (it was a PASS)."""
    exp, cfg = _tiny_ms()
    run_experiment(exp, cfg.model_copy(update=dict(max_iters=800)), tmp_path, progress=False)  # stalls at 200, projecting ~6000
    claims, _ = build_report(tmp_path)
    (c,) = [c for c in claims if "slows down like kappa" in c.claim]
    best = pd.read_csv(tmp_path / "best.csv")
    gd = best[(best.method == "lora-gd") & (best.kappa == 100)].iloc[0]
    euler = best[(best.method == "odelora-euler") & (best.kappa == 100)].iloc[0]
    assert gd.status == "stalled" and euler.converged and gd.stopped < 10 * euler.iters < gd.projected, (gd, euler)
    assert c.verdict == "INCONCLUSIVE" and "a verdict would rest on that projection" in c.note, c


def test_lora_gd_converged_at_a_rate_decides_the_kappa_claim_whatever_other_rates_did(tmp_path):
    """LoRA GD's best rate converged (4445 iterations, 78x Euler's) while its largest rate stalled
    at 400: the measured best decides (a PASS); bounds over every rate had left it undecided, as
    they did at full size (4748 against 69)."""
    exp, cfg = _tiny_ms()
    cfg = cfg.model_copy(update=dict(max_iters=6000, grids={**cfg.grids, "lora-gd": [0.5, 0.7, 0.9, 1.1]}))
    run_experiment(exp, cfg, tmp_path, progress=False)
    claims, _ = build_report(tmp_path)
    (c,) = [c for c in claims if "slows down like kappa" in c.claim]
    fin = pd.read_csv(tmp_path / "results.csv").sort_values("iter").groupby(["case", "run"]).tail(1)
    gd = fin[(fin.method == "lora-gd") & (fin.kappa == 100)]
    assert set(gd.status) >= {"converged", "stalled"} and gd[gd.status == "stalled"].iters.min() < 570, gd
    assert c.verdict == "PASS", c


def test_need_bounds_decide_from_what_was_run():
    """At least what each run ran (infinite where it diverged), at most what it took where it
    converged; medians over seeds per rate, the best rate's: two seeds converged at 60 and one at
    the cap decide < 10x (a FAIL the projection rule had called undecided); runs that all diverged
    bound nothing from below but infinity, which the claim reads as no rate to compare."""
    from odelora.lab.experiments.matrix_sensing import _need_bounds

    runs = pd.DataFrame(dict(lr=[0.5] * 3 + [0.9] * 3, status=["converged", "converged", "cap", "stalled", "stalled", "diverged"],
                             iters=[60, 60, 800, 200, 210, 3]))
    assert _need_bounds(runs) == (60.0, 60.0)
    assert _need_bounds(runs[runs.lr == 0.9]) == (210.0, float("inf"))
    assert _need_bounds(runs.assign(status="diverged")) == (float("inf"), float("inf"))


def test_a_partial_strongly_convex_report_says_not_run(tmp_path):
    """Methods without a saved case are "not run" in a partial report, not methods that did not converge."""
    exp = get_experiment("strongly-convex")
    run_experiment(exp, exp.Config(**TINY["strongly-convex"]), tmp_path, progress=False)
    for f in (tmp_path / "cases").glob("*odelora-rk4*"):
        f.unlink()
    claims, _ = build_report(tmp_path)
    text = " ".join(c.measured for c in claims if c.passed is None)
    assert "odelora-rk4: not run" in text and "odelora-rk4: none" not in text and "odelora-euler: 2" in text, text


def test_euler_rate_is_judged_only_where_every_seed_converged(tmp_path):
    """A seed of ODELoRA-Euler that diverged at h = 1/L (no rate fitted) does not leave the rate
    claim to the seeds that converged: it fails, saying why, as the convergence claim does."""
    exp = get_experiment("strongly-convex")
    run_experiment(exp, exp.Config(**dict(TINY["strongly-convex"], seeds=2)), tmp_path, progress=False)
    claims, _ = build_report(tmp_path)
    rate = next(c for c in claims if c.claim.startswith("ODELoRA-Euler's rate"))
    assert rate.passed, rate.measured
    (f,) = (tmp_path / "cases").glob("method=odelora-euler__seed=1-*.csv")
    df = pd.read_csv(f)
    df.loc[df.hL == 1.0, ["status", "rate"]] = ["diverged", float("nan")]
    f.write_text(df.to_csv(index=False))
    claims, _ = build_report(tmp_path)
    rate = next(c for c in claims if c.claim.startswith("ODELoRA-Euler's rate"))
    assert rate.passed is False and "(runs: converged,diverged)" in rate.measured
    assert rate.note.startswith("Euler did not reach the target at h = 1/L in every seed")


def test_runs_too_fast_or_too_short_to_fit_a_rate_leave_the_rate_claims_inconclusive(tmp_path):
    """kappa = 1 reaches 1e-10 in 5 steps (no rate to fit; it was a FAIL saying the target was
    not reached); a cap of 1 iteration decides nothing either (a FAIL too); a trajectory shorter
    than the reference's accuracy fits no order (a FAIL saying the error does not fall like h^p)."""
    exp = get_experiment("strongly-convex")
    for update, why in [(dict(cond=1.0, steps_times_L=[1.0]), "too few iterations to fit a rate"),
                        (dict(max_iters=1), "stopped at the iteration cap")]:
        out = tmp_path / str(len(why))
        run_experiment(exp, exp.Config(**{**TINY["strongly-convex"], **update}), out, progress=False)
        claims, _ = build_report(out)
        at1 = pd.read_csv(out / "summary.csv").query("hL == 1.0 and method.str.startswith('odelora')")
        assert len(at1) == 2 and (at1.status == ("converged" if "few" in why else "cap")).all(), at1
        rated = [c for c in claims if "ODELoRA" in c.claim and "h = 1/L" in c.claim]
        assert len(rated) == 2 and all(c.verdict == "INCONCLUSIVE" and why in c.note for c in rated), rated
    exp = get_experiment("trajectory-fidelity")
    run_experiment(exp, exp.Config(**{**TINY["trajectory-fidelity"], "T": 1e-7, "methods": ["euler"]}), tmp_path / "tf", progress=False)
    claims, _ = build_report(tmp_path / "tf")
    (c,) = [c for c in claims if c.claim.startswith("euler:")]
    assert pd.read_csv(tmp_path / "tf" / "results.csv").error.max() < 1e-11
    assert c.verdict == "INCONCLUSIVE" and "too few to fit a slope" in c.note, c


def test_a_run_whose_config_leaves_every_claim_out_says_so(tmp_path):
    """lora-mf's claims need the random start: without it the report's claims table was empty,
    unexplained (and its plot warned about a legend without entries)."""
    import warnings

    exp = get_experiment("lora-mf")
    cfg = exp.quick_config().model_copy(update=dict(settings=["misaligned"], inits=["spectral-one"]))
    run_experiment(exp, cfg, tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        claims, report = build_report(tmp_path)
    assert claims == [] and "No claim is judged from this run" in report.read_text()


def test_report_rebuilds_from_files_alone(tmp_path):
    exp, cfg = _tiny_ms()
    run_experiment(exp, cfg, tmp_path, progress=False)
    claims, report = build_report(tmp_path)
    before = json.loads((tmp_path / "claims.json").read_text())
    for f in list(tmp_path.glob("*.png")) + [report, tmp_path / "claims.json"]:
        f.unlink()
    assert cli(["report", str(tmp_path)]) == 0
    assert report.exists() and list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "claims.json").read_text()) == before
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {"torch", "numpy", "odelora", "git_revision"} <= set(meta)


def test_config_layers_and_lock(tmp_path, capsys):
    exp = get_experiment("matrix-sensing")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("m: 12\nn: 9\n")
    cfg = load_config(exp, str(cfg_file), ["rank=1", "grids={lora-gd: [0.1]}"], quick=True)
    assert (cfg.m, cfg.n, cfg.rank, cfg.seeds) == (12, 9, 1, 1)
    assert cfg.grids["lora-gd"] == [0.1] and cfg.grids["odelora-euler"] == exp.QUICK["grids"]["odelora-euler"]
    assert "learning rates given" not in capsys.readouterr().err
    load_config(exp, sets=["methods=[adam]", "grids={lora-gd: [0.5], adam: [0.01]}"])  # a grid of a method not run
    assert "learning rates given for lora-gd, which this run of matrix-sensing does not train (methods: adam)" in capsys.readouterr().err
    run_experiment(exp, exp.Config(**TINY["matrix-sensing"]), tmp_path / "o", progress=False)
    with pytest.raises(SystemExit, match=r"finished cases of another config \(differs in m\)"):
        run_experiment(exp, exp.Config(**{**TINY["matrix-sensing"], "m": 11}), tmp_path / "o", progress=False)


def test_reproduce_writes_one_readable_report(tmp_path, monkeypatch, capsys):
    names = ["trajectory-fidelity", "feature-learning"]
    for n in names:
        monkeypatch.setattr(registry.EXPERIMENTS[n], "QUICK", TINY[n])
    out = tmp_path / "root"
    assert cli(["reproduce", "--quick", "--only", *names, "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "expected about" in printed.splitlines()[0]
    text = (out / "report.md").read_text()
    for n in names:
        assert f"## [{n}]({n}/report.md)" in text
    assert text.count("**Measured:**") == len(names)
    figs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(figs) >= len(names) and all((out / f).exists() for f in figs)
    assert not BARE_NONFINITE.search(text)
    assert text.startswith("# odelora lab report (quick sizes)") and "Wall time" in text and "**Quick sizes:**" in text
    # a table of each experiment's verdicts opens the report, its counts those of the experiment's claims
    for n in names:
        claims = json.loads((out / n / "claims.json").read_text())
        row = "| " + " | ".join(str(sum(c["verdict"] == k for c in claims)) for k in VERDICTS) + " |"
        assert f"| [{n}]({n}/report.md) {row}" in text.split("## [")[0]
    (out / "report.md").unlink()
    assert cli(["report", str(out)]) == 0  # the overview rebuilds from the folders, the same
    assert (out / "report.md").read_text() == text
    capsys.readouterr()
    assert cli(["reproduce", "--quick", "--only", *names, "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "expected about 0 s" in again.splitlines()[0]  # every case saved: nothing to estimate
    assert again.count("every case was saved: reported from them (they took") == len(names)  # not as if run again
    assert "(this command: " in again and f"{len(names)} experiment(s) reported from saved cases)" in again
    assert "every case was saved" not in printed and "this command" not in printed


def test_a_run_that_gives_back_its_progress_is_told_apart():
    """The rule that keeps collapsed runs out of lora-gd-rate's rate fits, on hand-made losses:
    the mlp-digits run that fell from 2.34 to 1.23 and ended at ln 10, against runs that only
    wobble near their best or keep falling."""
    import pandas as pd

    from odelora.lab.experiments._common import gave_back_progress

    assert gave_back_progress(pd.Series([2.341, 1.9, 1.226, 3.29, 2.303]))
    assert not gave_back_progress(pd.Series([2.341, 1.9, 1.226, 1.3, 1.25]))
    assert not gave_back_progress(pd.Series([1.0, 0.5, 0.25, 0.125]))


def test_interrupted_and_damaged_folders_report_what_they_hold(tmp_path, capsys):
    """A report of an interrupted run says so and judges only the rules it has (a missing rule is
    not a diverged one); a reproduction root skips a folder claimed before any case finished; a
    damaged config.yaml is a one-line error."""
    from odelora.lab.runner import claim_folder

    root = tmp_path / "root"
    exp = get_experiment("feature-learning")
    cfg = exp.Config(**TINY["feature-learning"])
    run_experiment(exp, cfg, root / exp.name, jobs=1, progress=False)
    kept = [f for f in (root / exp.name / "cases").glob("*.csv") if f.name.startswith(("rule=adam", "rule=lora-plus"))]
    for f in (root / exp.name / "cases").glob("*.csv"):
        if f not in kept:
            f.unlink()
    claims, report = build_report(root / exp.name)
    assert set(pd.read_csv(root / exp.name / "results.csv").case) == {f.stem for f in kept}  # the rows reported on
    assert len(kept) == 3 and f"**Partial run:** 3 of {len(cfg.rules)} cases finished, and the claims below use only those" in report.read_text()
    assert [c.claim.split(" keeps")[0] for c in claims] == ["Adam"] and claims[0].passed  # no FAIL for rules never run
    other = get_experiment("trajectory-fidelity")
    (root / other.name).mkdir()
    claim_folder(root / other.name, other, other.Config(**TINY[other.name]))  # then interrupted
    capsys.readouterr()
    assert cli(["report", str(root)]) == 0
    assert "trajectory-fidelity: no finished case yet, left out" in capsys.readouterr().out
    done = len({f.name for f in (root / exp.name / "cases").glob("*.csv")})
    head = (root / "report.md").read_text().split("## [")[0]  # the overview's counts say what they leave out
    assert (f"**Partial:** {exp.name} ({done} of {len(exp.cases(cfg))} cases finished), {other.name} (no finished case, left out); "
            "the counts above cover only the finished cases") in head
    (root / exp.name / "config.yaml").write_text("experiment: feature-learning\nconfig: {bogus: 1}\n")
    with pytest.raises(SystemExit, match="config.yaml is damaged .*bogus"):
        cli(["report", str(root / exp.name)])


def test_a_damaged_case_file_is_computed_again_or_named(tmp_path, capsys):
    """Case files are written whole; one damaged afterwards (emptied, cut short) is an unfinished
    case, run again to the same rows. One that does not parse is a one-line error naming it."""
    exp, cfg = _tiny_ms()
    out = tmp_path / "ms"
    full = run_experiment(exp, cfg, out, progress=False)
    cut, emptied = sorted((out / "cases").glob("*.csv"))[:2]
    cut.write_bytes(cut.read_bytes()[:100])
    emptied.write_bytes(b"")
    assert {f.name for f in damaged_cases(out)} == {cut.name, emptied.name}
    assert sorted(case_id(c) + ".csv" for c in pending_cases(exp, cfg, out)) == sorted([cut.name, emptied.name])
    (out / "cases" / "not-of-this-grid.csv").write_bytes(b"")  # left by another config: not named
    again = run_experiment(exp, cfg, out, progress=False)
    err = capsys.readouterr().err
    assert "2 damaged case file(s) (empty or cut short) will be computed again" in err and "not-of-this-grid" not in err
    (out / "cases" / "not-of-this-grid.csv").unlink()
    key = ["case", "run", "iter"]
    pd.testing.assert_frame_equal(again.sort_values(key).reset_index(drop=True), full.sort_values(key).reset_index(drop=True))
    cut.write_bytes(b'a,b\n1,"2\n')  # ends with a newline, but an unclosed quote
    with pytest.raises(SystemExit, match=f"{cut.name} is damaged .*delete it and rerun"):
        cli(["report", str(out)])


def test_folders_in_use_or_of_the_other_kind_are_refused(tmp_path, monkeypatch):
    """A second command writing a folder in use is refused, as are an experiment's run into a
    reproduction root and a reproduction into an experiment's folder (their reports would overwrite
    each other)."""
    exp, cfg = _tiny_ms()
    out = tmp_path / "ms"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(SystemExit, match="is in use by another odelora command"):
            cli(["run", "matrix-sensing", "--quick", "--out", str(out), "--no-progress"])
    assert not (out / "config.yaml").exists()
    monkeypatch.setattr(registry.EXPERIMENTS["trajectory-fidelity"], "QUICK", TINY["trajectory-fidelity"])
    root = tmp_path / "root"
    assert cli(["reproduce", "--quick", "--only", "trajectory-fidelity", "--out", str(root), "--no-progress"]) == 0
    before = (root / "report.md").read_text()
    with pytest.raises(SystemExit, match="is a reproduction root .*trajectory-fidelity.*pass --out"):
        cli(["run", "matrix-sensing", "--quick", "--out", str(root), "--no-progress"])
    with pytest.raises(SystemExit, match="is the run folder of one experiment"):
        cli(["reproduce", "--quick", "--only", "trajectory-fidelity", "--out", str(root / "trajectory-fidelity")])
    assert (root / "report.md").read_text() == before


def test_report_of_a_root_holds_each_folder_it_rewrites_and_unlockable_filesystems_run(tmp_path, monkeypatch, capsys):
    import errno

    monkeypatch.setattr(registry.EXPERIMENTS["trajectory-fidelity"], "QUICK", TINY["trajectory-fidelity"])
    root = tmp_path / "root"
    assert cli(["reproduce", "--quick", "--only", "trajectory-fidelity", "--out", str(root), "--no-progress"]) == 0
    report = (root / "trajectory-fidelity" / "report.md").read_text()
    (root / "trajectory-fidelity" / "report.md").unlink()
    with folder_lock(root / "trajectory-fidelity"):
        with pytest.raises(SystemExit, match="trajectory-fidelity is in use"):
            cli(["report", str(root)])
    assert not (root / "trajectory-fidelity" / "report.md").exists()
    with pytest.raises(SystemExit, match="no experiment folder"):
        cli(["report", str(tmp_path)])
    assert not (tmp_path / ".lock").exists()  # nothing left in a folder that is neither kind

    import fcntl

    def no_locks(fh, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    capsys.readouterr()
    assert cli(["report", str(root)]) == 0
    assert "does not lock files (No locks available)" in capsys.readouterr().err
    assert (root / "trajectory-fidelity" / "report.md").read_text() == report


def test_signals_wait_while_workers_start(tmp_path):
    """Ctrl-C and SIGTERM sent while the workers start (the first pool of a fresh process) wait
    until they have started, then interrupt, also when the kernel hands the signal to another
    thread (torch and tqdm run threads that block no signal)."""
    import signal
    import subprocess
    import sys

    code = """
import os, signal, threading, time
from odelora.lab.runner import _workers_starting
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground run (a job a script starts with & ignores Ctrl-C)
for sig in (signal.SIGINT, signal.SIGTERM):
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with _workers_starting():
            signal.pthread_kill(threading.main_thread().ident, sig)  # delivered before it returns (os.kill may reach another thread later)
            got.append("held")
    except KeyboardInterrupt:
        got.append("interrupted")
    print(sig.name, got)
stop = threading.Event()
other = threading.Thread(target=stop.wait)
other.start()
got = []
try:
    with _workers_starting():
        signal.pthread_kill(other.ident, signal.SIGINT)
        time.sleep(1.0)  # that thread runs the C handler when it is scheduled
        got.append("held")
except KeyboardInterrupt:
    got.append("interrupted")
stop.set()
other.join()
print("other thread", got)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["SIGINT ['held', 'interrupted']", f"SIGTERM ['held', {int(signal.SIGTERM)}]",
                                          "other thread ['held', 'interrupted']"]


def test_workers_end_with_a_killed_run(tmp_path):
    """A run killed with SIGKILL (no cleanup runs) takes its workers with it within seconds,
    instead of leaving them to finish cases whose results nobody writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = """
import multiprocessing, os, time
from odelora.lab.runner import _worker_init
ctx = multiprocessing.get_context("forkserver")
pool = ctx.Pool(2, initializer=_worker_init, initargs=(1,))
pids = set()
while len(pids) < 2:
    pids |= set(pool.starmap(os.getpid, [()] * 8, chunksize=1))
print(*pids, flush=True)
pool.map_async(time.sleep, [120, 120], chunksize=1)
time.sleep(120)
"""
    err = open(tmp_path / "stderr", "w+")  # the killed run's resource tracker warns of its semaphores there
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        pids = [int(p) for p in run.stdout.readline().split()]
        assert len(pids) == 2, f"the pool did not start: {(tmp_path / 'stderr').read_text()}"
        time.sleep(1.0)  # both workers are asleep in their tasks
        run.send_signal(signal.SIGKILL)
        run.wait(30)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived the killed run"
    finally:
        run.kill()
        run.wait()
        run.stdout.close()
        err.close()


def test_interruptions_say_what_is_saved_and_kill_is_one(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any case finished does not point to a report of nothing; ``kill`` (SIGTERM)
    stops a run as Ctrl-C does: saved cases kept, meta.json written, a message, exit 143."""
    import os
    import signal

    exp, cfg = _tiny_ms()
    original = type(exp).run_case

    def interrupted(self, cfg, case):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(exp), "run_case", interrupted)
    with pytest.raises(KeyboardInterrupt) as err:
        run_experiment(exp, cfg, tmp_path / "a", progress=False)
    assert str(err.value).startswith("interrupted: 0 of") and str(err.value).endswith("rerun the same command to resume")
    calls = []

    def killed(self, cfg, case):
        calls.append(case)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, cfg, case)

    monkeypatch.setattr(type(exp), "run_case", killed)
    sets = [a for k, v in TINY["matrix-sensing"].items() for a in ("--set", f"{k}={v}")]
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert cli(["run", "matrix-sensing", *sets, "--out", str(tmp_path / "b"), "--no-progress"]) == 128 + signal.SIGTERM
    assert "odelora: terminated: 1 of" in capsys.readouterr().err
    assert len(list((tmp_path / "b" / "cases").glob("*.csv"))) == 1
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["interrupted"]
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's handler is gone after it


def test_matrix_sensing_reports_a_run_missing_methods(tmp_path):
    exp, cfg = _tiny_ms()
    run_experiment(exp, cfg, tmp_path, jobs=1, progress=False)
    for f in (tmp_path / "cases").glob("*.csv"):
        if "scaled-gd" in f.name or "lora-gd" in f.name:
            f.unlink()
    claims, report = build_report(tmp_path)
    assert "**Partial run:**" in report.read_text()
    assert not any("scaled GD" in c.claim or "LoRA GD" in c.claim for c in claims)  # not judged without their cases
    table = next(c for c in claims if c.claim.startswith("spectral start: iterations"))
    assert "scaled-gd not run, not run" in table.measured and "lora-gd not run, not run" in table.measured
    two = tmp_path / "two"  # a start none of whose cases ran: its log-scale panels are empty
    run_experiment(exp, cfg.model_copy(update=dict(starts=["spectral", "small-random"], methods=["odelora-euler"])), two,
                   jobs=1, progress=False)
    for f in (two / "cases").glob("*start=small-random*.csv"):
        f.unlink()
    claims, report = build_report(two)
    assert f"`odelora run matrix-sensing --config {two / 'config.yaml'} --out {two}` finishes it" in report.read_text()
    assert (two / "iterations_vs_kappa.png").stat().st_size > 0


def test_an_empty_panel_of_a_shared_grid_keeps_its_neighbours_log_axis(tmp_path):
    """A switched-off panel of a grid sharing y has no data; the shared log axis stays log (a
    figure with no positive data at all still turns linear)."""
    import matplotlib.pyplot as plt

    from odelora.lab.experiments._common import save_fig

    fig, axes = plt.subplots(1, 3, sharey=True)
    for ax in axes[:2]:
        ax.plot([1, 2], [1e-3, 1e-1])
        ax.set(xscale="log", yscale="log")
    axes[2].axis("off")
    save_fig(fig, tmp_path, "a.png")
    assert [ax.get_yscale() for ax in axes] == ["log"] * 3 and [ax.get_xscale() for ax in axes[:2]] == ["log"] * 2
    fig, axes = plt.subplots(1, 2, sharey=True)
    for ax in axes:
        ax.set(yscale="log")
    save_fig(fig, tmp_path, "b.png")
    assert [ax.get_yscale() for ax in axes] == ["linear"] * 2


def test_a_failed_floor_claim_says_which_test_failed():
    """The note under a failed floor claim is read from its numbers: floors above the random one,
    less than 100x below it, or an exponent not 0.25 above the random one's."""
    from odelora.lab.experiments.lora_mf import _floor_note

    a = [1e-5, 1e-4, 1e-3]
    note = _floor_note(pd.Series([0.05, 30.0, 1e4], index=a), 2.0, 1.5)
    assert "ends above the random start at a=1e-05;" in note and "less than 100x below it at a=0.0001;" in note
    assert "exponent in alpha, 1.50, is not 0.25 above the random one's, 2.00" in note
    note = _floor_note(pd.Series([1e4, 1e4, 1e4], index=a), 2.98, 3.0)  # far below everywhere, not faster
    assert note.startswith("its floor's exponent in alpha, 3.00, is not 0.25 above the random one's, 2.98.")
    assert "less than 100x" not in _floor_note(pd.Series([0.5, 0.5, 0.5], index=a), 2.0, 1.0)


def test_adapter_selection_with_no_window_to_fit_is_inconclusive_not_failed(tmp_path):
    """Where T1 leaves no window [2/min lambda, T1 - 1/lambda] for any alpha, no slope is
    measured: the claim is inconclusive (it was a FAIL saying the rates differ)."""
    exp = get_experiment("lora-mf")
    cfg = load_config(exp, quick=True, sets=["alphas=[0.01, 0.02]", "settings=[dw<1]", "inits=[random]"])
    run_experiment(exp, cfg, tmp_path, progress=False)
    claims, _ = build_report(tmp_path)
    (sel,) = [c for c in claims if "adapter selection" in c.claim]
    assert sel.verdict == "INCONCLUSIVE" and "empty for alpha = 0.01, 0.02" in sel.measured, sel
    assert "nothing was tested" in sel.note


def test_gd_rate_fits_and_plots_the_minimum_over_t_below_T(tmp_path, monkeypatch):
    """Hand-made runs logged at every step t: ||grad J_t||^2 = 1/(t + 1) makes min_(t<T) = 1/T
    (exponent -1 against T = t + 1, 1/T fits exactly); a constant gradient is flat, and its
    misfits are not compared. The plot shows min_(t<T) at T and the bound 4 J0 / sum_(t<T) eta."""
    import numpy as np

    from odelora.lab.experiments import lora_gd_rate

    t = np.arange(0, 301)
    rows = []
    for c, g2 in ((0.5, 1 / (t + 1.0)), (2.0, np.full(len(t), 0.3))):
        eta = np.full(len(t), c)
        sum_eta = np.concatenate([[0.0], np.cumsum(eta)[:-1]])  # over the steps before t
        rows += [dict(kind="t", problem="mlp-digits", rule="constant", c=c, t=int(i), loss=1.0 / (i + 1), gradJ2=g2[i],
                      min_g2=g2[:i + 1].min(), V2=1.0 + i, eta=eta[i], sum_eta=sum_eta[i]) for i in t]
        rows.append(dict(kind="run", problem="mlp-digits", rule="constant", c=c, violations=0, diverged_at=-1, steps=300))
    rows += [dict(r, rule="theory") for r in rows if r["c"] == 0.5]  # k = 1: the bound's dashed line
    rows = [dict(r, c=1.0) if r["rule"] == "theory" else r for r in rows]
    figs = []
    monkeypatch.setattr(lora_gd_rate, "save_fig", lambda fig, out, name: figs.append(fig) or name)
    exp = lora_gd_rate.LoraGDRate()
    cfg = exp.Config(problems=["mlp-digits"], rules=["constant", "theory"], constants={"constant": [0.5, 2.0], "theory": [1.0]})
    claims, _ = exp.report(pd.DataFrame(rows), cfg, tmp_path)
    text = next(c for c in claims if "the rate of" in c.claim).measured
    assert "constant c=0.5: T^-1.00, misfit 1/T 0.00 vs" in text
    assert "constant c=2: T^+0.00, flat (" in text and "constant c=2: T^+0.00, misfit" not in text
    ax = figs[0].axes[1]
    assert ax.get_xlabel().startswith("T") and {"theory k=1", "4 J0 / sum eta (theory, k=1)"} <= {x.get_label() for x in ax.get_lines()}
    for line in ax.get_lines():
        x, y = line.get_data()
        if line.get_label().startswith("4 J0"):
            assert np.allclose(y, 4 * 1.0 / (0.5 * x))  # J0 = 1, eta = 0.5 at each of the x steps t < T = x
        elif line.get_label() == "theory k=1":
            assert np.allclose(y, 1 / x)  # min over t < x of 1 / (t + 1)


def test_diverged_seeds_count_as_the_worst_in_init_scale_medians(tmp_path):
    """Two of three seeds diverge at the smallest alpha (their loss and cosine are NaN): the
    medians there are the worst outcome, so "smaller init, lower loss" fails, and the claims say
    how many runs diverged, instead of passing on the one seed left."""
    import math

    from odelora.lab.experiments.init_scale import Config, InitScale

    rows = []
    for seed in range(3):
        for a in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
            gone = a == 1e-4 and seed > 0
            rows.append(dict(task="vision", method="adamw", seed=seed, init="gaussian", alpha=a, status="diverged" if gone else "done",
                             train_loss=math.nan if gone else 0.5 + a / 10, eval_acc=0.8 + (1 - a) / 100,
                             cos=math.nan if gone else 0.5 - a / 10, ceiling=0.9))
        rows.append(dict(task="vision", method="adamw", seed=seed, init="full", alpha=0.0, status="done", train_loss=0.3,
                         eval_acc=0.85, cos=1.0, ceiling=0.9))
    df = pd.DataFrame(rows).assign(case=lambda d: range(len(d)))
    claims, _ = InitScale().report(df, Config(tasks=["vision"], methods=["adamw"], seeds=3), tmp_path)
    by = {c.claim.split(": ", 1)[1]: c for c in claims if ": " in c.claim}
    for claim in ("smaller init gives lower final training loss", "smaller init gives lower held-out error",
                  "the learned update aligns better with full fine-tuning's at smaller init"):
        assert by[claim].verdict == "FAIL", by[claim].measured
        assert "0.0001: diverged" in by[claim].measured and "2 at gaussian alpha 0.0001" in by[claim].measured
    assert "runs diverged" in by["smaller init gives lower final training loss"].note
    assert "| gaussian | 0.0001 | diverged | diverged | diverged | 2 |" in by["smaller init gives lower final training loss"].table
    healthy = df[df.status == "done"]  # the same runs without the diverged ones: the orderings hold
    claims, _ = InitScale().report(healthy, Config(tasks=["vision"], methods=["adamw"], seeds=3), tmp_path)
    assert all(c.verdict == "PASS" for c in claims if "smaller init" in c.claim or "aligns better" in c.claim)


def test_step_rules_draws_the_fits_it_reports(tmp_path, monkeypatch):
    """min_(t<T) ||grad J||^2 = 1/T exactly (logged at step t, T = t + 1): the drawn a/T fit is
    the curve itself, at the same T as the fit that the report quotes (misfit 0.00)."""
    import numpy as np

    from odelora.lab.experiments import step_rules

    t = np.arange(0, 301)
    rows = [dict(kind="t", rule="theory", c=1.0, t=int(i), loss=1.0 / (i + 1), gradJ2=1 / (i + 1.0), min_g2=1 / (i + 1.0),
                 V2=1.0, eta=0.5, sum_eta=0.5 * i) for i in t]
    rows.append(dict(kind="run", rule="theory", c=1.0, L=1.0, J0=1.0, steps=300, diverged_at=-1, increases=0, violations=0,
                     sum_eta=150.0, final_loss=1 / 301, eval_acc=0.5))
    figs = []
    monkeypatch.setattr(step_rules, "save_fig", lambda fig, out, name: figs.append(fig) or name)
    exp = step_rules.StepRules()
    claims, _ = exp.report(pd.DataFrame(rows), exp.Config(rules=["theory"], constants={"theory": [1.0]}), tmp_path)
    assert "theory k=1: T^-1.00, misfit 1/T 0.00 vs" in next(c for c in claims if "the rate of" in c.claim).measured
    (line,) = [x for x in figs[0].axes[1].get_lines() if x.get_label() == "a/T fit (theory k=1)"]
    T, y = line.get_data()
    assert T[0] == 11 and np.allclose(y, 1 / T)


def test_progress_in_a_log_is_timed_lines_not_a_disabled_bar(capsys):
    """Where stderr is not a terminal (nohup, CI, `> log 2>&1`) the bar was disabled, and hours of
    cases went by without a line: a line now comes at most every minute."""
    from odelora.lab.runner import _LogProgress, _progress

    bar = _progress("exp", 5, 1, True)
    assert isinstance(bar, _LogProgress)
    bar.every = 0.0
    bar.update()
    bar.update(3)  # the last case: the summary that follows says it
    assert capsys.readouterr().err.splitlines() == ["exp: 2 of 5 cases saved, 0 s"]
    assert not isinstance(_progress("exp", 5, 1, False), _LogProgress)

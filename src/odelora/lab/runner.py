"""Run an experiment's grid: parallel, atomic per case, resumable, with provenance beside it.

Layout of an output folder::

    config.yaml      experiment name and its full config
    meta.json        package versions, git revision, host, times
    cases/<id>.csv   one file per finished case, written atomically (temp file + rename)
    results.csv      all rows, rebuilt from cases/ at the end of every completed run and by every report
    .lock            held by the command writing the folder (:func:`folder_lock`)

A case either has its complete file or none, so an interrupted sweep reruns only unfinished cases:
no row is lost and none is duplicated; a case file damaged afterwards (emptied, or cut in the middle
of a line: every file a run writes ends with a newline) counts as unfinished and is run again. A folder is tied to
its config only once it holds a finished case; until then a run with another config may take it over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
import pandas as pd
import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

from .._io import DamagedFile, atomic_write
from .core import Experiment, ExperimentConfig

__all__ = [
    "load_config", "run_experiment", "read_results", "case_id", "provenance", "check_out_dir",
    "RunInterrupted", "config_error", "estimate_seconds", "folder_lock",
]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says what is saved and how to resume."""


def case_id(case: dict) -> str:
    """A stable, file-safe name for a case from its parameters."""
    parts = [f"{k}={case[k]}" for k in sorted(case)]
    digest = hashlib.sha1(json.dumps(case, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", "__".join(parts))[:150] + "-" + digest


def config_error(name: str, cls: type[ExperimentConfig], err: ValidationError) -> str:
    """A pydantic error as one line: every bad key with what was wrong and the value given."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif loc:
            hint = f"; a list is written [a, b]: --set {loc}=[{e.get('input')}]" if e["type"] == "list_type" and isinstance(e.get("input"), str) else ""
            parts.append(f"{loc}: {e['msg'].rstrip('.')} (got {e.get('input')!r}{hint})")
        else:  # a rule across keys: its message names them; the input is the whole config
            parts.append(f"config: {e['msg'].rstrip('.')}")
    return f"invalid config for {name}: {'; '.join(parts)}. Valid keys: {', '.join(cls.model_fields)} (see odelora run {name} --help)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _KeyTwice(ValueError):
    pass


def _unique_json_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise _KeyTwice(f"key {twice!r} given twice in one object")
    return dict(pairs)


def _read_config_file(config_file: str, name: str) -> dict:
    path = Path(config_file)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SystemExit(f"--config {config_file}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SystemExit(f"--config {config_file}: cannot read it ({type(exc).__name__})") from None
    try:
        loaded = json.loads(text, object_pairs_hook=_unique_json_keys) if path.suffix.lower() == ".json" else yaml.load(text, _UniqueKeyLoader)
    except _KeyTwice as exc:
        raise SystemExit(f"--config {config_file}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--config {config_file}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SystemExit(f"--config {config_file}: not valid YAML or JSON{where}: {getattr(exc, 'problem', exc)}") from None
    if loaded is None:  # empty, or comments only
        print(f"odelora: --config {config_file} holds no keys: {name} runs with its defaults", file=sys.stderr)
        loaded = {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"--config {config_file}: expected a mapping of config keys, got a {type(loaded).__name__}")
    if "experiment" in loaded and loaded["experiment"] != name:
        raise SystemExit(f"--config {config_file} is for experiment {loaded['experiment']!r}, not {name!r}")
    if "config" in loaded:  # a run folder's config.yaml: {experiment, config}
        extra = sorted(set(loaded) - {"experiment", "config"})
        if extra:
            raise SystemExit(f"--config {config_file}: keys {extra} sit beside 'config'; put config keys under 'config' "
                             "(the layout of a run folder's config.yaml) or use a flat mapping without 'config'")
    data = loaded.get("config", {k: v for k, v in loaded.items() if k != "experiment"})
    if not isinstance(data, dict):
        raise SystemExit(f"--config {config_file}: 'config' must be a mapping of config keys")
    return data


def load_config(exp: Experiment, config_file: str | None = None, sets: list[str] | None = None, quick: bool = False,
                values: dict | None = None) -> ExperimentConfig:
    """The experiment's config: defaults (or the quick preset), then a YAML/JSON file, then
    ``key=value`` overrides, then ``values`` (a dict of keys and typed values). Any error is one
    line naming the bad key."""
    data = (exp.quick_config() if quick else exp.Config()).model_dump()

    given_grids: set[str] = set()

    def put(key, value):  # a mapping (e.g. grids) updates the preset's mapping instead of replacing it
        if key == "grids" and isinstance(value, dict):
            given_grids.update(value)
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and isinstance(value, dict) else value

    if config_file:
        for k, v in _read_config_file(config_file, exp.name).items():
            put(k, v)
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            put(key.strip(), yaml.safe_load(value))
        except yaml.YAMLError:
            raise SystemExit(f"--set {item!r}: the value is not valid YAML") from None
    for k, v in (values or {}).items():
        put(k, v)
    try:
        cfg = exp.Config(**data)
    except ValidationError as err:
        raise SystemExit(config_error(exp.name, exp.Config, err)) from None
    unused = sorted(given_grids - set(getattr(cfg, "methods", given_grids)))
    if unused:  # a grid given for a method left out of the run (a slip of --methods or of the grid's name)
        print(f"odelora: learning rates given for {', '.join(unused)}, which this run of {exp.name} does not train "
              f"(methods: {', '.join(cfg.methods)}); add them to the methods to use them", file=sys.stderr)
    return cfg


def check_out_dir(out: Path) -> Path:
    """Create ``out`` if needed and make sure files can be written in it; one-line errors."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"output folder {out} is a file; pass --out with a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SystemExit(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    return out


@contextmanager
def folder_lock(out: Path):
    """Hold ``out/.lock`` while a command writes ``out``: a second command writing the same folder
    is refused instead of mixing its cases with this one's (the lock goes with the process). Where
    the system or filesystem has no ``flock`` (Windows; some cluster filesystems), nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(Path(out) / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{out} is in use by another odelora command; wait for it to finish or pass another --out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            print(f"odelora: {out}: this filesystem does not lock files ({exc.strerror}); run one command at a time there",
                  file=sys.stderr)
        yield


def provenance() -> dict:
    import numpy
    import torch

    from .. import __version__

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()) if rev else None
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    return dict(
        odelora=__version__, torch=torch.__version__, numpy=numpy.__version__, pandas=pd.__version__,
        python=sys.version.split()[0], platform=platform.platform(), cpus=os.cpu_count(), git_revision=rev, git_dirty=dirty,
    )


@contextmanager
def _workers_starting():
    """Hold Ctrl-C and SIGTERM back while the pool starts; one that came meanwhile interrupts
    when the block ends. A pool interrupted while it is built is never torn down (``Pool()``
    cleans up after an ``Exception`` only): its workers outlive the run, and one still starting
    prints a traceback when it finds the pool's semaphores gone. The signals are held by Python
    handlers, not by a signal mask: the kernel hands a signal to any thread that does not block
    it (torch's and tqdm's threads), and Python runs the handler in the main thread whichever
    thread received it. The server the workers fork from is started first, with Ctrl-C
    ignored, which it inherits (a handler it does not): it imports its preload before protecting
    itself. (So later forkserver children of this process ignore Ctrl-C too; the server is
    shared.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
    held: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: held.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in reversed(previous.items()):  # SIGINT last: a Ctrl-C meanwhile leaves SIGTERM restored
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def _worker_init(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="odelora-run-watch", daemon=True).start()
    import torch

    torch.set_num_threads(threads)


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """End this worker as soon as the run that started it is gone. A run killed with SIGKILL
    tears nothing down, and its workers would compute their current cases for nobody (only the
    run writes results). ``parent.join()`` returns when the run's end of the pipe the worker was
    started through closes, which the kernel does as the run dies (the workers' parent process
    is the fork server, so a parent-death signal would not fire)."""
    parent.join()
    os._exit(1)


def _run_one(task: tuple) -> tuple[str, dict, list[dict], tuple[float, float]]:
    exp, cfg_data, case = task
    cfg = exp.Config(**cfg_data)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = exp.run_case(cfg, case)
    return case_id(case), case, rows, (time.perf_counter() - t0, time.process_time() - c0)


def _write_case(out: Path, cid: str, case: dict, rows: list[dict]) -> None:
    df = pd.DataFrame(rows)
    for k, v in case.items():  # every row carries its case parameters
        if k not in df.columns:
            df[k] = v
    df["case"] = cid
    atomic_write(out / "cases" / f"{cid}.csv", df.to_csv(index=False))


def _whole(path: Path) -> bool:
    """Whether a case file ends as every file a run writes does, with a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except OSError:  # empty: no last byte
        return False


def damaged_cases(out: Path) -> list[Path]:
    """Case files that are empty or cut short (damaged after the run wrote them)."""
    return [f for f in sorted((Path(out) / "cases").glob("*.csv")) if not _whole(f)]


def finished_cases(out: Path, cases: list[dict] | None = None) -> list[Path]:
    """The whole case files in ``out/cases``; with ``cases``, only theirs."""
    bad = set(damaged_cases(out))
    ids = None if cases is None else {case_id(c) for c in cases}
    return [f for f in sorted((Path(out) / "cases").glob("*.csv")) if f not in bad and (ids is None or f.stem in ids)]


def _read_case(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path} is damaged ({type(exc).__name__}); delete it and rerun the command that made "
                         f"{path.parent.parent} to compute that case again") from None


def read_results(out: Path, cases: list[dict] | None = None) -> pd.DataFrame:
    """All rows of finished cases (from cases/, so a partial sweep reads fine); with ``cases``,
    only theirs (a folder may also hold cases of a larger sweep, see ``Experiment.SWEEP_KEYS``)."""
    files = finished_cases(out, cases)
    if not files and (every := finished_cases(out)):
        raise SystemExit(f"{out}: none of its {len(every)} case files is a case of its config.yaml: they belong to another "
                         "sweep of the experiment (other rates, seeds, methods or ranks), or an earlier odelora named its "
                         "cases otherwise; rerun the command that made the folder to compute its cases")
    if not files:
        raise SystemExit(f"{out}: no finished cases (run `odelora run` first)")
    return pd.concat([_read_case(f) for f in files], ignore_index=True)


def _config_text(name: str, cfg: ExperimentConfig) -> str:
    return yaml.safe_dump({"experiment": name, "config": cfg.model_dump()}, sort_keys=True)


def _changed_keys(path: Path, name: str, cfg: ExperimentConfig) -> tuple[str | None, list[str]]:
    """(the experiment ``path`` was written for, the config keys in which it differs from ``cfg``)."""
    try:
        old = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("config", {}), dict):
        raise SystemExit(f"{path} is damaged (not the YAML mapping a run writes) and {path.parent} holds finished cases: "
                         "restore the file, or use another --out")
    saved, new = old.get("config", {}), yaml.safe_load(_config_text(name, cfg))["config"]
    return old.get("experiment"), sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))


def check_folder(out: Path, exp: Experiment, cfg: ExperimentConfig) -> None:
    """Refuse a folder that holds finished cases of another experiment or config (writes nothing).
    A config that differs only in the experiment's ``SWEEP_KEYS`` is the same sweep, grown or cut."""
    path = Path(out) / "config.yaml"
    if not (path.exists() and path.read_text() != _config_text(exp.name, cfg) and finished_cases(out)):
        return
    experiment, keys = _changed_keys(path, exp.name, cfg)
    if experiment != exp.name:
        what = f"experiment {experiment!r}"
    elif set(keys) <= exp.SWEEP_KEYS:
        return
    else:
        what = f"another config (differs in {', '.join(keys)})"
        if exp.SWEEP_KEYS:
            what += f"; a config that differs only in {', '.join(sorted(exp.SWEEP_KEYS))} would grow its sweep"
    raise SystemExit(f"{out} holds {len(finished_cases(out))} finished cases of {what}; use another --out or delete the folder")


def claim_folder(out: Path, exp: Experiment, cfg: ExperimentConfig) -> None:
    """Write config.yaml, refusing only when finished cases of another config are there. A folder
    taken over from another config (no finished case) loses that config's meta.json too; one whose
    sweep grows or shrinks keeps it (its cases' times stay on record)."""
    check_folder(out, exp, cfg)
    path, text = out / "config.yaml", _config_text(exp.name, cfg)
    if path.exists() and path.read_text() != text and not finished_cases(out):
        (out / "meta.json").unlink(missing_ok=True)  # times of another config's (unfinished) runs
    atomic_write(path, text)


def grid_cases(exp: Experiment, cfg: ExperimentConfig) -> list[dict]:
    """The config's cases; a config that yields one case twice (a value listed twice) is refused."""
    cases = exp.cases(cfg)
    if not cases:
        raise SystemExit(f"{exp.name}: the config gives no case to run: its values leave every case out (see the keys' "
                         f"descriptions in odelora run {exp.name} --help)")
    ids = [case_id(c) for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise SystemExit(f"{exp.name}: the config gives case {twice[0]} more than once: a value is listed twice (in methods, "
                         "a rate grid, ...); list each value once")
    return cases


def pending_cases(exp: Experiment, cfg: ExperimentConfig, out: Path) -> list[dict]:
    """The cases of ``cfg`` that ``out`` holds no results of (all, for a new folder)."""
    done = {f.stem for f in finished_cases(out)}
    return [c for c in grid_cases(exp, cfg) if case_id(c) not in done]


def estimate_seconds(exp: Experiment, cfg: ExperimentConfig, cases: list[dict], jobs: int, speed: float = 1.0) -> float:
    """Expected wall time: the cost model's case seconds spread over ``jobs`` workers, at most one
    per core (longest first), plus the shared preparation, times the machine's speed factor."""
    costs = sorted((exp.case_cost(cfg, c) for c in cases), reverse=True)
    lanes = [0.0] * max(1, min(jobs, os.cpu_count() or 1))
    for c in costs:
        lanes[lanes.index(min(lanes))] += c
    return speed * (max(lanes) + (exp.prepare_cost(cfg) if cases else 0.0))


def _earlier(out: Path) -> dict:
    """What the folder's meta.json holds of the runs before this one: their summaries and every
    case's times (read once, as the run starts: this run's own saves must not count as earlier)."""
    try:
        before = json.loads((out / "meta.json").read_text())
        runs = before.pop("earlier_runs", []) + [
            {k: before.get(k) for k in ("started", "finished", "interrupted", "ran", "case_seconds", "case_cpu_seconds",
                                        "prepare_cpu_seconds", "wall_seconds", "jobs")}]
        return dict(earlier_runs=runs, case_times=before.get("case_times", {}), case_cpu_times=before.get("case_cpu_times", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _save_meta(out: Path, meta: dict, earlier: dict, *, interrupted: bool, cases: int, ran: int, timings: dict, cpu: dict,
               prepared: float, wall: float, jobs: int) -> None:
    """Write meta.json: this run's provenance and times, with the earlier (interrupted or partial)
    runs of the folder kept on record and every case's time, whichever run saved it. Written after
    every case too (as interrupted until the run ends): a run killed outright keeps its times."""
    meta = dict(meta, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), interrupted=interrupted, cases=cases, ran=ran,
                case_seconds=round(sum(timings.values()), 2), case_cpu_seconds=round(sum(cpu.values()), 2),
                prepare_cpu_seconds=round(prepared, 2), wall_seconds=round(wall, 2), jobs=jobs,
                case_times={cid: round(dt, 2) for cid, dt in sorted(timings.items())},
                case_cpu_times={cid: round(dc, 2) for cid, dc in sorted(cpu.items())})
    if earlier:
        meta["earlier_runs"] = earlier["earlier_runs"]
        for key in ("case_times", "case_cpu_times"):
            meta[key] = dict(sorted({**earlier[key], **meta[key]}.items()))
    atomic_write(out / "meta.json", json.dumps(meta, indent=2))


class _LogProgress:
    """Progress where stderr is not a terminal (a log file, nohup, CI): one line at most every
    ``every`` seconds, instead of a bar that would be disabled or fill the log with redraws."""

    def __init__(self, name: str, total: int, done: int, every: float = 60.0):
        self.name, self.total, self.done, self.every = name, total, done, every
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            print(f"{self.name}: {self.done} of {self.total} cases saved, {now - self.t0:.0f} s", file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        pass


def _progress(name: str, total: int, done: int, show: bool):
    """A progress bar on a terminal, timed lines in a log, nothing without ``show``."""
    if show and not sys.stderr.isatty():
        return _LogProgress(name, total, done)
    return tqdm(total=total, initial=done, desc=name, unit="case", disable=not show, leave=False, mininterval=2.0)


def _hold_stops() -> dict:
    """Ignore SIGINT and SIGTERM (in the main thread); returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}


def run_experiment(
    exp: Experiment, cfg: ExperimentConfig, out: Path, *, jobs: int = 1, progress: bool = True
) -> pd.DataFrame:
    cases = grid_cases(exp, cfg)
    out = check_out_dir(out)
    claim_folder(out, exp, cfg)
    exp.out = out
    meta = dict(experiment=exp.name, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance())
    earlier = _earlier(out)
    todo = pending_cases(exp, cfg, out)
    ids = {case_id(c) for c in cases}
    others = len(finished_cases(out)) - len(finished_cases(out, cases))
    if others:
        print(f"{exp.name}: {others} saved case(s) in {out} are not of this config (another sweep of it: other rates, "
              "seeds, methods or ranks); they stay saved and are left out of its results", file=sys.stderr, flush=True)
    bad = [f for f in damaged_cases(out) if f.stem in ids]
    if bad:
        print(f"{exp.name}: {len(bad)} damaged case file(s) (empty or cut short) will be computed again: "
              + ", ".join(f.name for f in bad[:3]) + (" ..." if len(bad) > 3 else ""), file=sys.stderr, flush=True)
    todo.sort(key=lambda c: -exp.case_cost(cfg, c))  # longest first: better packing on the workers
    t0, c0 = time.perf_counter(), time.process_time()
    import torch

    torch.set_num_threads(max(1, min(jobs, os.cpu_count() or 1)))  # the preparation too: no more threads than jobs
    if todo:
        for stale in ("report.md", "claims.json"):  # a report of fewer cases than the folder will hold
            (out / stale).unlink(missing_ok=True)
        try:
            exp.prepare(cfg)
        except DamagedFile as exc:
            raise SystemExit(str(exc)) from None
    prepared = time.process_time() - c0  # CPU seconds: this process prepares, the workers run the cases
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    bar = _progress(exp.name, len(cases), len(cases) - len(todo), progress)
    cfg_data = cfg.model_dump()
    tasks = [(exp, cfg_data, c) for c in todo]
    pool, held = None, {}
    try:
        if jobs <= 1 or len(todo) <= 1:
            results = map(_run_one, tasks)
        else:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["odelora.lab.registry"])
            with _workers_starting():
                pool = ctx.Pool(min(jobs, len(todo)), initializer=_worker_init, initargs=(1,))
            results = pool.imap_unordered(_run_one, tasks, chunksize=1)
        for cid, case, rows, (dt, dc) in results:
            _write_case(out, cid, case, rows)
            timings[cid], cpu[cid] = dt, dc
            _save_meta(out, meta, earlier, interrupted=True, cases=len(cases), ran=len(timings), timings=timings, cpu=cpu,
                       prepared=prepared, wall=time.perf_counter() - t0, jobs=jobs)
            bar.update()
    except DamagedFile as exc:  # raised in a worker: the pool hands it over and is stopped below
        _save_meta(out, meta, earlier, interrupted=True, cases=len(cases), ran=len(timings), timings=timings, cpu=cpu,
                   prepared=prepared, wall=time.perf_counter() - t0, jobs=jobs)
        raise SystemExit(str(exc)) from None
    except KeyboardInterrupt:
        held = _hold_stops()  # a second Ctrl-C would cut the saving and the workers' shutdown short
        done = len(cases) - len(todo) + len(timings)
        _save_meta(out, meta, earlier, interrupted=True, cases=len(cases), ran=len(timings), timings=timings, cpu=cpu,
                   prepared=prepared, wall=time.perf_counter() - t0, jobs=jobs)
        raise RunInterrupted(
            f"interrupted: {done} of {len(cases)} cases of {exp.name} are saved in {out}; rerun the same command to resume"
            + (f" (`odelora report {out}` reports on the saved ones)" if done else "")
        ) from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        for signum, handler in held.items():
            signal.signal(signum, handler)
    _save_meta(out, meta, earlier, interrupted=False, cases=len(cases), ran=len(todo), timings=timings, cpu=cpu,
               prepared=prepared, wall=time.perf_counter() - t0, jobs=jobs)
    df = read_results(out, cases)
    atomic_write(out / "results.csv", df.to_csv(index=False))
    return df


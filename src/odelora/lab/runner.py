"""Run an experiment's grid: parallel, atomic per case, resumable, with provenance beside it.

Layout of an output folder::

    config.yaml      experiment name and its full config
    meta.json        package versions, git revision, host, times
    cases/<id>.csv   one file per finished case, written atomically (temp file + rename)
    results.csv      all rows, rebuilt from cases/ after every run

A case either has its complete file or none, so an interrupted sweep reruns only unfinished cases:
no row is lost and none is duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

from .._io import atomic_write
from .core import Experiment, ExperimentConfig, get_experiment

__all__ = ["load_config", "run_experiment", "read_results", "atomic_write", "case_id", "provenance"]


def case_id(case: dict) -> str:
    """A stable, file-safe name for a case from its parameters."""
    parts = [f"{k}={case[k]}" for k in sorted(case)]
    digest = hashlib.sha1(json.dumps(case, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", "__".join(parts))[:150] + "-" + digest


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def load_config(exp: Experiment, config_file: str | None = None, sets: list[str] | None = None, quick: bool = False) -> ExperimentConfig:
    """The experiment's config: defaults (or the quick preset), then a YAML/JSON file, then
    ``key=value`` overrides. Errors name the bad key and list the valid ones."""
    data = exp.quick_config().model_dump() if quick else exp.Config().model_dump()
    if config_file:
        text = Path(config_file).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{config_file}: expected a mapping of config keys")
        loaded.pop("experiment", None)
        data.update(loaded.get("config", loaded))
    for item in sets or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        data[key.strip()] = _parse_value(value)
    try:
        return exp.Config(**data)
    except ValidationError as err:
        valid = ", ".join(sorted(exp.Config.model_fields))
        raise SystemExit(f"invalid config for {exp.name}:\n{err}\nvalid keys: {valid}") from None


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
        python=sys.version.split()[0], platform=platform.platform(), git_revision=rev, git_dirty=dirty,
    )


def _run_one(name: str, cfg_data: dict, case: dict, threads: int) -> tuple[str, list[dict], float]:
    import torch

    torch.set_num_threads(threads)
    exp = get_experiment(name)
    cfg = exp.Config(**cfg_data)
    t0 = time.perf_counter()
    rows = exp.run_case(cfg, case)
    return case_id(case), rows, time.perf_counter() - t0


def _write_case(out: Path, cid: str, case: dict, rows: list[dict]) -> None:
    df = pd.DataFrame(rows)
    for k, v in case.items():  # every row carries its case parameters
        if k not in df.columns:
            df[k] = v
    df["case"] = cid
    atomic_write(out / "cases" / f"{cid}.csv", df.to_csv(index=False))


def read_results(out: Path) -> pd.DataFrame:
    """All rows of finished cases (from cases/, so a partial sweep reads fine)."""
    files = sorted((Path(out) / "cases").glob("*.csv"))
    if not files:
        raise SystemExit(f"{out}: no finished cases (run `odelora run` first)")
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def run_experiment(
    name: str, cfg: ExperimentConfig, out: Path, *, jobs: int = 1, progress: bool = True
) -> pd.DataFrame:
    exp = get_experiment(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_text = yaml.safe_dump({"experiment": name, "config": cfg.model_dump()}, sort_keys=True)
    cfg_path = out / "config.yaml"
    if cfg_path.exists() and cfg_path.read_text() != cfg_text:
        raise SystemExit(
            f"{out} holds results of a different config; use another --out or delete it.\n"
            f"existing:\n{cfg_path.read_text()}"
        )
    atomic_write(cfg_path, cfg_text)
    meta = dict(experiment=name, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance())
    cases = exp.cases(cfg)
    ids = [case_id(c) for c in cases]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{name}: duplicate case ids")
    todo = [c for c, i in zip(cases, ids) if not (out / "cases" / f"{i}.csv").exists()]
    if todo:
        exp.prepare(cfg)
    timings: dict[str, float] = {}
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc=name, unit="case", disable=not progress, leave=False, mininterval=2.0)
    cfg_data = cfg.model_dump()
    try:
        if jobs <= 1 or len(todo) <= 1:
            for case in todo:
                cid, rows, dt = _run_one(name, cfg_data, case, max(1, os.cpu_count() or 1))
                _write_case(out, cid, case, rows)
                timings[cid] = dt
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(_run_one, name, cfg_data, c, 1): c for c in todo}
                for fut in as_completed(futures):
                    cid, rows, dt = fut.result()
                    _write_case(out, cid, futures[fut], rows)
                    timings[cid] = dt
                    bar.update()
    finally:
        bar.close()
    meta.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cases=len(cases), ran=len(todo),
                case_seconds=round(sum(timings.values()), 2))
    atomic_write(out / "meta.json", json.dumps(meta, indent=2))
    df = read_results(out)
    atomic_write(out / "results.csv", df.to_csv(index=False))
    return df

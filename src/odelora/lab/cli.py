"""The ``odelora`` command: run experiments, build reports, reproduce everything."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DDE_BACKEND", "pytorch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cmd_list(args) -> int:
    from .core import EXPERIMENTS, get_experiment

    get_experiment.__call__  # registry import happens in get_experiment
    from . import experiments  # noqa: F401

    for name, exp in sorted(EXPERIMENTS.items()):
        print(f"{name:22s} {exp.summary}")
    return 0


def _cmd_run(args) -> int:
    from .core import get_experiment
    from .report import build_report
    from .runner import load_config, run_experiment

    exp = get_experiment(args.experiment)
    cfg = load_config(exp, args.config, args.set, quick=args.quick)
    out = Path(args.out or Path("runs") / exp.name)
    t0 = time.time()
    run_experiment(exp.name, cfg, out, jobs=args.jobs, progress=not args.no_progress)
    claims, report = build_report(out)
    _print_claims(exp.name, claims)
    print(f"{exp.name}: {time.time() - t0:.0f}s, report {report}")
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    claims, report = build_report(Path(args.dir))
    _print_claims(Path(args.dir).name, claims)
    print(f"report: {report}")
    return 0


def _print_claims(name, claims) -> None:
    for c in claims:
        print(f"  [{c.verdict}] {c.claim}: {c.measured}")


def _cmd_reproduce(args) -> int:
    from . import experiments  # noqa: F401
    from .core import EXPERIMENTS
    from .report import build_report, claims_markdown
    from .runner import atomic_write, load_config, run_experiment

    root = Path(args.out or ("runs/quick" if args.quick else "runs/full"))
    names = args.only or sorted(EXPERIMENTS)
    sections, total = [], {"PASS": 0, "FAIL": 0, "REPORTED": 0}
    t_all = time.time()
    for name in names:
        exp = EXPERIMENTS.get(name)
        if exp is None:
            raise SystemExit(f"unknown experiment {name!r}; choose one of: {', '.join(sorted(EXPERIMENTS))}")
        cfg = load_config(exp, None, None, quick=args.quick)
        t0 = time.time()
        print(f"== {name}", flush=True)
        run_experiment(name, cfg, root / name, jobs=args.jobs, progress=not args.no_progress)
        claims, _ = build_report(root / name)
        _print_claims(name, claims)
        print(f"   {time.time() - t0:.0f}s", flush=True)
        for c in claims:
            total[c.verdict] += 1
        sections += [f"## [{name}]({name}/report.md): {exp.summary}", "", claims_markdown(claims), ""]
    head = [
        f"# odelora lab report ({'quick' if args.quick else 'full'})",
        "",
        f"{total['PASS']} PASS, {total['FAIL']} FAIL, {total['REPORTED']} reported without threshold; "
        f"{time.time() - t_all:.0f}s. Plots and configs are in each experiment's folder.",
        "",
    ]
    atomic_write(root / "report.md", "\n".join(head + sections) + "\n")
    print(f"\n{total['PASS']} PASS, {total['FAIL']} FAIL, {total['REPORTED']} reported; report: {root / 'report.md'}")
    return 0


def _cmd_finetune(args) -> int:
    from ..integrations.finetune import main as finetune_main

    return finetune_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odelora", description="LoRA training as solving an ODE: the lab.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list the experiments")
    s.set_defaults(func=_cmd_list)
    s = sub.add_parser("run", help="run one experiment and write its report")
    s.add_argument("experiment")
    s.add_argument("--config", help="YAML or JSON file with config keys")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML value)")
    s.add_argument("--out", help="output folder (default runs/EXPERIMENT)")
    s.add_argument("--jobs", type=int, default=1, help="parallel processes")
    s.add_argument("--quick", action="store_true", help="start from the quick preset")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_run)
    s = sub.add_parser("report", help="rebuild a report from an output folder")
    s.add_argument("dir")
    s.set_defaults(func=_cmd_report)
    s = sub.add_parser("reproduce", help="run every experiment and write one report")
    s.add_argument("--quick", action="store_true", help="reduced sizes (minutes on 2 cores)")
    s.add_argument("--out", help="output root (default runs/quick or runs/full)")
    s.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    s.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="a subset of experiments")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_reproduce)
    from ..integrations.finetune import add_arguments

    s = sub.add_parser("finetune", help="fine-tune all-MiniLM-L6-v2 with LoRA on BBC News topics")
    add_arguments(s)
    s.set_defaults(func=_cmd_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

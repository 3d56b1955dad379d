"""The ``odelora`` command: run experiments, build reports, reproduce everything.

Every error caused by the input is one line on stderr and a non-zero exit; Ctrl-C says what is
saved and that rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import sys
import threading
import time
import typing
from pathlib import Path

from .argtypes import OneLineParser, nonnegative_int, out_dir, positive_float, positive_int

os.environ.setdefault("DDE_BACKEND", "pytorch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# what `odelora reproduce` runs without --suites/--all/--only: the matrix theory at full sizes fits
# in 30 minutes on 2 cores; the PINN and real-network grids take hours and are asked for by name
DEFAULT_SUITES = {False: ("matrix",), True: ("matrix", "pinn")}

# seconds of a fixed workload on one core of the machine the cost models were measured on
REFERENCE_SPEED = 0.18


def _type_name(ann) -> str:
    """A short, readable form of a config field's type."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        bounds = []  # "> 0", "<= 108", "min length 1": from annotated-types metadata and pydantic Fields
        for meta in args[1:]:
            for m in [meta, *getattr(meta, "metadata", [])]:
                for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
                    v = getattr(m, attr, None)
                    if v is not None and f"{sym} {v}" not in bounds:
                        bounds.append(f"{sym} {v}")
        return ", ".join([_type_name(args[0]), *bounds])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list of ({_type_name(args[0])})" if args else "list"
    if origin is dict:
        key = "name" if typing.get_origin(args[0]) is typing.Literal else _type_name(args[0])
        return f"mapping {key} -> {_type_name(args[1])}"
    return getattr(ann, "__name__", str(ann))


def experiment_help(name: str) -> str:
    from .registry import get_experiment

    exp = get_experiment(name)
    cfg, quick = exp.Config(), exp.quick_config()
    lines = [f"odelora run {name}: {exp.summary}", "",
             "config keys (set with --set KEY=VALUE or a YAML/JSON --config file):", ""]
    for key, field in exp.Config.model_fields.items():
        default = getattr(cfg, key)
        q = getattr(quick, key)
        lines.append(f"  {key} ({_type_name(field.rebuild_annotation())}): default {default!r}"
                     + (f"; --quick {q!r}" if q != default else ""))
        if field.description:
            lines.append(f"      {field.description}")
    lines += ["", "options: --quick (start from the quick preset), --out DIR, --jobs N, --config FILE, --set KEY=VALUE,",
              "         --no-progress"]
    return "\n".join(lines)


class _RunHelp(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="show this help, or an experiment's config keys with defaults")

    def __call__(self, parser, namespace, values, option_string=None):
        from .registry import EXPERIMENTS

        name = getattr(namespace, "experiment", None)
        if name in EXPERIMENTS:
            print(experiment_help(name))
        else:
            parser.print_help()
            print("\nexperiments: " + ", ".join(EXPERIMENTS) + " (odelora run EXPERIMENT --help lists its config keys)")
        parser.exit(0)


def _print_claims(claims) -> None:
    for c in claims:
        print(f"  [{c.verdict}] {c.claim}: {c.measured}")


def _cmd_list(args) -> int:
    from .registry import EXPERIMENTS

    print(f"{'experiment':22s} {'suite':7s} what it measures")
    for name, cls in EXPERIMENTS.items():
        print(f"{name:22s} {cls.SUITE:7s} {cls.summary}")
    return 0


def machine_speed() -> float:
    """This machine's time for a fixed single-core workload over the reference machine's."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(400, 400, dtype=torch.float64)
        t0 = time.perf_counter()
        for _ in range(40):
            a = torch.tanh(a @ a * 1e-2)
        return max(0.25, (time.perf_counter() - t0) / REFERENCE_SPEED)
    finally:
        torch.set_num_threads(threads)


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _cmd_run(args) -> int:
    from .registry import get_experiment
    from .runner import load_config

    exp = get_experiment(args.experiment)
    return _run(exp, load_config(exp, args.config, args.set, quick=args.quick), args)


def _run(exp, cfg, args) -> int:
    """Run ``exp`` with ``cfg`` into ``args.out`` (default runs/NAME) and print its claims."""
    from .report import build_report
    from .runner import check_out_dir, claim_folder, estimate_seconds, folder_lock, grid_cases, pending_cases, run_experiment

    total = len(grid_cases(exp, cfg))  # a config that repeats a case is refused before anything is written
    out = check_out_dir(Path(args.out or Path("runs") / exp.name))
    _refuse_root(out, exp.name)
    with folder_lock(out):
        claim_folder(out, exp, cfg)  # refuses a folder of another config before any estimate
        t0 = time.time()
        todo = pending_cases(exp, cfg, out)
        est = estimate_seconds(exp, cfg, todo, args.jobs, machine_speed())
        saved = f" ({total - len(todo)} saved, {len(todo)} to run)" if len(todo) < total else ""
        cores = os.cpu_count() or 1
        over = f" (on {cores} CPU core(s): they share them, and the estimate counts {cores})" if args.jobs > cores else ""
        print(f"{exp.name}: {total} cases{saved}, expected about {_minutes(est)} with {args.jobs} job(s){over}", flush=True)
        run_experiment(exp, cfg, out, jobs=args.jobs, progress=not args.no_progress)
        claims, report = build_report(out)
    _print_claims(claims)
    print(f"{exp.name}: {time.time() - t0:.0f} s, report {report}")
    return 0


def _refuse_root(out: Path, name: str) -> None:
    """An experiment's run folder must not be a reproduction root (their reports would overwrite
    each other)."""
    from .registry import EXPERIMENTS

    inside = [n for n in EXPERIMENTS if (out / n / "config.yaml").exists()]
    if inside:
        raise SystemExit(f"{out} is a reproduction root (it holds the run folders of {', '.join(inside[:3])}"
                         f"{', ...' if len(inside) > 3 else ''}); pass --out {out / name} or another folder")


def _cmd_report(args) -> int:
    from .runner import check_out_dir, folder_lock

    folder = Path(args.dir)
    if not folder.is_dir():
        raise SystemExit(f"{folder}: " + ("a file; give the folder a run wrote (runs/NAME) or a reproduction root"
                                          if folder.exists() else "no such folder"))
    check_out_dir(folder)  # reports are written there: a one-line error where they cannot be
    from .report import build_overview, build_report

    if (folder / "config.yaml").exists():
        with folder_lock(folder):
            claims, report = build_report(folder)
        _print_claims(claims)
    else:  # a reproduction root: rebuild each experiment's report, then the overview
        from .registry import EXPERIMENTS
        from .report import has_cases

        names = [n for n in EXPERIMENTS if (folder / n / "config.yaml").exists()]
        for n in [n for n in names if not has_cases(folder / n)]:  # claimed, then interrupted before a case finished
            print(f"{n}: no finished case yet, left out of the report (rerun the command that made {folder} to finish it)")
            names.remove(n)
        if not names:
            raise SystemExit(f"{folder}: no experiment folder with a finished case (runs/NAME folders hold config.yaml and cases/)")
        with contextlib.ExitStack() as held:  # the root and every folder whose report is rewritten
            for f in (folder, *(folder / n for n in names)):
                held.enter_context(folder_lock(f))
            for n in names:
                build_report(folder / n)
            _, report = build_overview(folder, names)
    print(f"report: {report}")
    return 0


def _cmd_reproduce(args) -> int:
    from .core import SUITES
    from .registry import EXPERIMENTS
    from .runner import check_out_dir, folder_lock

    suites = SUITES if args.all else tuple(args.suites or DEFAULT_SUITES[args.quick])
    names = list(dict.fromkeys(args.only)) if args.only else [n for n, cls in EXPERIMENTS.items() if cls.SUITE in suites]
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise SystemExit(f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from: {', '.join(EXPERIMENTS)}")
    root = check_out_dir(Path(args.out or ("runs/quick" if args.quick else "runs/full")))
    if (root / "config.yaml").exists():
        raise SystemExit(f"{root} is the run folder of one experiment (it holds config.yaml); reproduce writes a folder per "
                         "experiment under --out: pass another folder")
    with folder_lock(root):
        return _reproduce(root, names, suites, args)


def _reproduce(root: Path, names: list[str], suites, args) -> int:
    from .core import SUITES
    from .registry import EXPERIMENTS, get_experiment
    from .report import build_overview, build_report, counts_text, run_seconds
    from .runner import check_folder, check_out_dir, estimate_seconds, folder_lock, load_config, pending_cases, run_experiment

    speed = machine_speed()

    def planned(name):
        exp = get_experiment(name)
        cfg = load_config(exp, None, None, quick=args.quick)
        check_folder(root / name, exp, cfg)  # before anything runs, and before its saved cases count
        return exp, cfg, estimate_seconds(exp, cfg, pending_cases(exp, cfg, root / name), args.jobs, speed)

    plan = [planned(n) for n in names]
    total = sum(e for *_, e in plan)
    print(f"odelora reproduce{' --quick' if args.quick else ''}: {len(plan)} experiments into {root}, {args.jobs} job(s); "
          f"expected about {_minutes(total)} (" + ", ".join(f"{e.name} {_minutes(s)}" for e, _, s in plan)
          + "; saved cases are not rerun)", flush=True)
    left = [] if args.only else [s for s in SUITES if s not in suites]
    for suite in left:
        rest = [planned(n) for n, cls in EXPERIMENTS.items() if cls.SUITE == suite]
        print(f"  left out: the {suite} suite ({', '.join(e.name for e, *_ in rest)}; about "
              f"{_minutes(sum(s for *_, s in rest))} more); add --suites {' '.join((*suites, suite))} or --all", flush=True)
    wall = cpu = 0.0
    start, reused = time.perf_counter(), 0
    for exp, cfg, est in plan:
        print(f"== {exp.name} (expected {_minutes(est)})", flush=True)
        with folder_lock(check_out_dir(root / exp.name)):
            ran = bool(pending_cases(exp, cfg, root / exp.name))
            run_experiment(exp, cfg, root / exp.name, jobs=args.jobs, progress=not args.no_progress)
            claims, _ = build_report(root / exp.name)
        _print_claims(claims)
        w, c = run_seconds(root / exp.name)  # every run that made its saved cases
        wall, cpu, reused = wall + w, cpu + c, reused + (not ran)
        print(f"   {w:.0f} s ({c:.0f} s of CPU time)" if ran else
              f"   every case was saved: reported from them (they took {w:.0f} s, {c:.0f} s of CPU time)", flush=True)
    counts, report = build_overview(root, [e.name for e, *_ in plan])
    took = f" (this command: {time.perf_counter() - start:.0f} s; {reused} experiment(s) reported from saved cases)" if reused else ""
    print(f"\n{counts_text(counts)}; "
          f"{wall:.0f} s wall, {cpu:.0f} s of CPU time{took}; report: {report}")
    return 0


# `odelora finetune`: the `finetune` experiment with its config keys as flags (flag dest -> config key)
FINETUNE_FLAGS = {
    "methods": "methods", "steps": "steps", "batch_size": "batch", "max_length": "max_length", "eval_every": "eval_every",
    "rank": "rank", "alpha": "alpha", "layers": "layers", "head_lr": "head_lr", "train_docs": "train_docs",
    "eval_docs": "eval_docs", "seeds": "seeds", "cache_dir": "cache_dir",
}


def _model_methods() -> list[str]:
    from .methods import ModelMethodName

    return list(typing.get_args(ModelMethodName))


def _renamed(name: str) -> str:
    from .experiments.finetune import RENAMED

    return f"{name!r} is called {RENAMED[name]!r} in the lab; use {RENAMED[name]}" if name in RENAMED else ""


def _lab_method(name: str) -> str:
    if _renamed(name):
        raise argparse.ArgumentTypeError(_renamed(name))
    if name not in _model_methods():
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {', '.join(_model_methods())}")
    return name


def _lr_grids(items: list[str]) -> dict[str, list[float]]:
    """``--lr METHOD=LR[,LR...]`` items as the config's ``grids``; one-line errors."""
    grids = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--lr expects METHOD=LR[,LR...], got {item!r}")
        m, vals = item.split("=", 1)
        if _renamed(m):
            raise SystemExit(f"--lr {item}: {_renamed(m)}=...")
        if m not in _model_methods():
            raise SystemExit(f"--lr: unknown method {m!r}; choose from {', '.join(_model_methods())}")
        try:
            grids[m] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise SystemExit(f"--lr {item}: learning rates must be numbers, e.g. {m}=1e-3,2e-3") from None
        if not all(0 < v < float("inf") for v in grids[m]):
            raise SystemExit(f"--lr {item}: learning rates must be positive")
    return grids


def _finetune_arguments(p) -> None:
    from .experiments.finetune import Config

    def key(k, extra=""):
        f = Config.model_fields[k]
        return f"{f.description}{extra} (default {f.default!r})"

    p.add_argument("--methods", nargs="+", type=_lab_method, metavar="METHOD", help=key("methods", ": " + ", ".join(_model_methods())))
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="learning-rate grid of a method (repeat for several methods; the others keep their default grids)")
    for flag, kind in (("steps", positive_int), ("batch-size", positive_int), ("max-length", positive_int),
                       ("eval-every", positive_int), ("rank", positive_int), ("alpha", positive_float), ("layers", positive_int),
                       ("head-lr", positive_float), ("train-docs", nonnegative_int), ("eval-docs", positive_int), ("seeds", positive_int)):
        p.add_argument(f"--{flag}", type=kind, help=key(FINETUNE_FLAGS[flag.replace("-", "_")]))
    p.add_argument("--cache-dir", help=key("cache_dir"))
    p.add_argument("--quick", action="store_true", help="start from the quick preset (minutes on 2 cores)")
    p.add_argument("--out", type=out_dir, help="output folder (default runs/finetune)")
    p.add_argument("--jobs", type=positive_int, default=1, help="parallel processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_finetune(args) -> int:
    """``odelora run finetune`` with the flags given as config keys (the others: defaults, or the quick preset)."""
    from .registry import get_experiment
    from .runner import load_config

    exp = get_experiment("finetune")
    values = {key: getattr(args, dest) for dest, key in FINETUNE_FLAGS.items() if getattr(args, dest) is not None}
    grids = _lr_grids(args.lr)
    if grids:
        values["grids"] = grids
    return _run(exp, load_config(exp, quick=args.quick, values=values), args)


def build_parser() -> argparse.ArgumentParser:
    from .core import SUITES
    from .registry import EXPERIMENTS

    from .. import __version__

    p = OneLineParser(prog="odelora", description="LoRA training as solving an ODE: the lab.")
    p.add_argument("--version", action="version", version=f"odelora {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("list", help="list the experiments")
    s.set_defaults(func=_cmd_list, parser=s)
    s = sub.add_parser("run", help="run one experiment and write its report", add_help=False,
                       description="Run one experiment; `odelora run EXPERIMENT --help` lists its config keys.")
    s.add_argument("-h", "--help", action=_RunHelp)
    s.add_argument("experiment", choices=list(EXPERIMENTS), metavar="EXPERIMENT", help=", ".join(EXPERIMENTS))
    s.add_argument("--config", help="YAML or JSON file with config keys")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML value)")
    s.add_argument("--out", type=out_dir, help="output folder (default runs/EXPERIMENT)")
    s.add_argument("--jobs", type=positive_int, default=1, help="parallel processes (default 1)")
    s.add_argument("--quick", action="store_true", help="start from the quick preset")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_run, parser=s)
    s = sub.add_parser("report", help="rebuild reports from saved files (an experiment folder or a reproduction root)",
                       description="Rebuild report.md and the plots from the results a run saved, without rerunning anything.")
    s.add_argument("dir", help="an experiment's output folder (runs/<name>) or a reproduction root (runs/quick)")
    s.set_defaults(func=_cmd_report, parser=s)
    s = sub.add_parser("reproduce", help="run the lab's experiments and write one report")
    s.add_argument("--quick", action="store_true", help="reduced sizes (minutes on 2 cores)")
    s.add_argument("--out", type=out_dir, help="output root (default runs/quick or runs/full)")
    s.add_argument("--jobs", type=positive_int, default=max(1, min(2, os.cpu_count() or 1)), help="parallel processes (default: up to 2)")
    pick = s.add_mutually_exclusive_group()
    pick.add_argument("--suites", nargs="+", choices=SUITES, metavar="SUITE",
                      help="which parts of the lab: matrix (the theory on matrix problems), pinn (PINN fine-tuning "
                           "grids), real (pretrained networks); default: matrix, plus pinn with --quick")
    pick.add_argument("--all", action="store_true", help="every suite (the full PINN and real-network grids take hours)")
    pick.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="a subset of experiments")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_reproduce, parser=s)
    s = sub.add_parser("finetune", help="fine-tune all-MiniLM-L6-v2 with LoRA on BBC News topics (odelora run finetune)",
                       description="Fine-tune all-MiniLM-L6-v2 with LoRA on BBC News topics: the lab experiment `finetune` "
                                   "(odelora run finetune --help) with its config keys as flags; the report is report.md in --out (default runs/finetune).")
    _finetune_arguments(s)
    s.set_defaults(func=_cmd_finetune, parser=s)
    return p


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (poll reports an error on its end), not
    another pipe; if so, stdout is pointed at /dev/null, so that Python's last flush raises no
    second error."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or no stdout file
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def main(argv: list[str] | None = None) -> int:
    got = []

    def terminated(signum, frame):  # `kill` or a job scheduler's stop: saved and reported as Ctrl-C is
        got.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        args, extra = build_parser().parse_known_args(argv)  # imports every experiment: a Ctrl-C may come here
        if extra:  # reported by the command's parser, whose --help lists its options
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except KeyboardInterrupt as exc:
        msg = str(exc) or "rerun the same command to resume (cases already saved are kept)"
        print(f"\nodelora: {'terminated' if got else 'interrupted'}: {msg.removeprefix('interrupted: ')}", file=sys.stderr)
        return 128 + (got[0] if got else signal.SIGINT)
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return 141  # `odelora ... | head` after the reader left: 128 + SIGPIPE, as a shell reports it
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"odelora: cannot write {exc.filename or 'a result file'}: {exc.strerror}; free some space and rerun the same "
              "command to resume (files are written whole or not at all: cases already saved are kept)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

"""Reports rebuilt from saved files alone: claims (prediction, measurement, verdict), notes that
explain every FAIL and finding, and plots; plus the overview of a whole reproduction."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .._io import atomic_write
from .core import VERDICTS, Claim
from .registry import EXPERIMENTS, get_experiment
from .runner import finished_cases, read_results

__all__ = ["build_report", "build_overview", "claims_markdown", "notes_markdown", "count_verdicts", "counts_text"]


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def claims_markdown(claims: list[Claim]) -> str:
    if not claims:
        return ("No claim is judged from this run: each needs cases that its config leaves out (an init, a setting "
                "or a method; `odelora run EXPERIMENT --help` describes the keys).")
    lines = ["| # | verdict | claim | prediction | measured |", "|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | **{c.verdict}** | {_cell(c.claim)} | {_cell(c.prediction)} | {_cell(c.measured)} |")
    return "\n".join(lines)


def notes_markdown(claims: list[Claim]) -> str:
    """One line per claim that has a note (every FAIL and inconclusive claim has one), then the claims' tables."""
    lines = []
    for i, c in enumerate(claims, 1):
        note = c.note or ("the measurement is outside the predicted range shown in the table" if c.verdict == "FAIL" else "")
        if note:
            lines.append(f"- **#{i} {c.verdict}**: {note}")
    for i, c in enumerate(claims, 1):
        if c.table:
            lines += ["", f"**#{i}**: {c.claim}", "", c.table]
    return "\n".join(lines)


def count_verdicts(claims: list[Claim]) -> dict[str, int]:
    out = dict.fromkeys(VERDICTS, 0)
    for c in claims:
        out[c.verdict] += 1
    return out


def _load(out: Path):
    cfg_path = out / "config.yaml"
    if not cfg_path.exists():
        raise SystemExit(f"{out}: no config.yaml; is this an `odelora run` output folder?")
    try:
        saved = yaml.safe_load(cfg_path.read_text())
        exp = get_experiment(saved["experiment"])
        return exp, exp.Config(**saved["config"]), saved
    except SystemExit as exc:  # an unknown experiment
        raise SystemExit(f"{cfg_path}: {exc}") from None
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as exc:  # ValueError: pydantic's ValidationError too
        what = "; ".join(line.strip() for line in str(exc).splitlines()[:3]) or type(exc).__name__
        raise SystemExit(f"{cfg_path} is damaged ({what}): it must hold 'experiment' and 'config' as `odelora run` "
                         "wrote them; restore it or rerun into a new folder") from None


def has_cases(out: Path) -> bool:
    """Whether ``out`` holds a finished case of its config (a damaged config.yaml: of any config,
    so that building the report names the damage)."""
    try:
        exp, cfg, _ = _load(Path(out))
    except SystemExit:
        return bool(finished_cases(out))
    return bool(finished_cases(out, exp.cases(cfg)))


def _done(exp, cfg, df) -> tuple[int, int]:
    """(finished cases, cases of the grid)."""
    return df["case"].nunique(), len(exp.cases(cfg))


def _partial(exp, cfg, df, out: Path) -> list[str]:
    """A line for a report built before every case finished (an interrupted run)."""
    done, total = _done(exp, cfg, df)
    if done >= total:
        return []
    return [f"**Partial run:** {done} of {total} cases finished, and the claims below use only those. "
            f"`odelora run {exp.name} --config {out / 'config.yaml'} --out {out}` finishes it.", ""]


def build_report(out: Path) -> tuple[list[Claim], Path]:
    """Read ``out/config.yaml`` and the case files, draw the plots, write ``report.md``,
    ``claims.json`` and ``results.csv`` (the rows reported on). Needs nothing but the files."""
    out = Path(out)
    exp, cfg, saved = _load(out)
    df = read_results(out, exp.cases(cfg))
    claims, figures = exp.report(df, cfg, out)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):  # none yet, or damaged: the report needs only the cases
        meta = {}
    notes = notes_markdown(claims)
    parts = [
        f"# {exp.name}: {exp.summary}",
        "",
        f"**Measured:** {exp.describe(df, cfg)}",
        "",
        *_partial(exp, cfg, df, out),
        claims_markdown(claims),
        "",
        *(["**Notes**", "", notes, ""] if notes else []),
        *[f"![{Path(f).stem}]({f})" for f in figures],
        "",
        "## Config",
        "```yaml",
        yaml.safe_dump(saved["config"], sort_keys=True).rstrip(),
        "```",
        "",
        f"Rows: {len(df)} from {df['case'].nunique()} cases. "
        f"odelora {meta.get('odelora', '?')}, torch {meta.get('torch', '?')}, git {str(meta.get('git_revision'))[:10]}"
        f"{' (dirty)' if meta.get('git_dirty') else ''}.",
    ]
    report = out / "report.md"
    atomic_write(out / "results.csv", df.to_csv(index=False))
    atomic_write(report, "\n".join(parts) + "\n")
    atomic_write(out / "claims.json", json.dumps([c.as_dict() for c in claims], indent=2, default=str))
    atomic_write(out / "figures.json", json.dumps(figures))
    return claims, report


def count(n: int, word: str) -> str:
    """``1 finding``, ``2 findings``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def counts_text(total: dict[str, int]) -> str:
    """``48 PASS, 40 FAIL, 6 inconclusive, 1 finding, 25 reported``."""
    return (f"{total['PASS']} PASS, {total['FAIL']} FAIL, {total['INCONCLUSIVE']} inconclusive, "
            f"{count(total['FINDING'], 'finding')}, {total['REPORTED']} reported")


def run_seconds(folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds an experiment folder's runs took (from its meta.json): every session,
    so a resumed sweep counts its earlier, interrupted or partial, sessions too."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return 0.0, 0.0
    runs = [*meta.get("earlier_runs", []), meta]
    wall = sum(r.get("wall_seconds") or 0.0 for r in runs)
    cpu = sum((r.get("case_cpu_seconds") or 0.0) + (r.get("prepare_cpu_seconds") or 0.0) for r in runs)
    return wall, cpu


def _sizes(configs: list[tuple]) -> str:
    """"quick" or "full" when every experiment ran its quick preset or its defaults, else ""."""
    dumps = [cfg.model_dump() for _, cfg in configs]
    for label, preset in (("quick", lambda e: e.quick_config()), ("full", lambda e: e.Config())):
        if all(d == preset(e).model_dump() for (e, _), d in zip(configs, dumps)):
            return label
    return ""


def build_overview(root: Path, names: list[str] | None = None) -> tuple[dict[str, int], Path]:
    """``root/report.md`` from the experiment folders under ``root`` (their claims.json, figures
    and meta.json, written by a run and ``build_report``): the verdict counts, the time taken, and
    one section per experiment with what it measured, its claims, the notes and the plots."""
    root = Path(root)
    names = names or [n for n in EXPERIMENTS if (root / n / "claims.json").exists()]
    if not names:
        raise SystemExit(f"{root}: no experiment folders with a report (run `odelora reproduce`)")
    total = dict.fromkeys(VERDICTS, 0)
    sections, configs, timing, cpu, partial, rows = [], [], {}, {}, [], []
    for name in names:
        folder = root / name
        claims = [Claim(**{k: v for k, v in c.items() if k != "verdict"}) for c in json.loads((folder / "claims.json").read_text())]
        exp, cfg, _ = _load(folder)
        configs.append((exp, cfg))
        timing[name], cpu[name] = run_seconds(folder)
        df = read_results(folder, exp.cases(cfg))
        figs = json.loads((folder / "figures.json").read_text()) if (folder / "figures.json").exists() else []
        verdicts = count_verdicts(claims)
        for k, v in verdicts.items():
            total[k] += v
        rows.append(f"| [{name}]({name}/report.md) | " + " | ".join(str(verdicts[k]) for k in VERDICTS) + " |")
        done, cases = _done(exp, cfg, df)
        if done < cases:
            partial.append(f"{name} ({done} of {cases} cases finished)")
        notes = notes_markdown(claims)
        sections += [f"## [{name}]({name}/report.md) ({timing[name]:.0f} s)", "", f"**Measured:** {exp.describe(df, cfg)}", "",
                     *_partial(exp, cfg, df, folder), claims_markdown(claims), ""]
        if notes:
            sections += ["**Notes**", "", notes, ""]
        sections += [f"![{name}: {Path(f).stem}]({name}/{f})" for f in figs] + [""]
    sizes = _sizes(configs)
    partial += [f"{n} (no finished case, left out)" for n in EXPERIMENTS  # claimed, then interrupted before a case finished
                if n not in names and (root / n / "config.yaml").exists() and not has_cases(root / n)]
    head = [
        "# odelora lab report" + (f" ({sizes} sizes)" if sizes else ""),
        "",
        f"{counts_text(total)} without a threshold. A FAIL is a claim whose measurement fell outside its prediction; an "
        "INCONCLUSIVE claim is one the measurements cannot decide (nothing was tested, or the verdict would rest on a bound); "
        "a FINDING is a statement from the sources checked against the measurements, with what it would take to hold. "
        "Every FAIL, inconclusive claim and finding has a note.",
        "",
        "| experiment | " + " | ".join(VERDICTS) + " |",
        "|---|" + "---:|" * len(VERDICTS),
        *rows,
        "",
    ]
    if sizes == "quick":
        head += ["**Quick sizes:** fewer seeds, steps and grid rates than the full presets (each experiment's report "
                 "shows its config), so a verdict here is indicative; `odelora reproduce` (`--all` for every suite) "
                 "runs the full ones.", ""]
    if partial:
        head += [f"**Partial:** {', '.join(partial)}; the counts above cover only the finished cases. Rerunning the "
                 "command that made this folder finishes them.", ""]
    head += [f"Wall time {sum(timing.values()):.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()) + "."
             f" CPU time in the cases (and shared preparation) {sum(cpu.values()):.0f} s: it does not grow when other "
             "programs share the cores, the wall time does.", ""]
    report = root / "report.md"
    atomic_write(report, "\n".join(head + sections) + "\n")
    return total, report

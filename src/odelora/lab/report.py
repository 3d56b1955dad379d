"""Reports rebuilt from saved files alone: claims (prediction, measurement, verdict) and plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import yaml

from .core import Claim, get_experiment
from .runner import atomic_write, read_results

__all__ = ["build_report", "claims_markdown"]


def claims_markdown(claims: list[Claim]) -> str:
    lines = ["| verdict | claim | prediction | measured |", "|---|---|---|---|"]
    for c in claims:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| **{c.verdict}** | {cell(c.claim)} | {cell(c.prediction)} | {cell(c.measured)} |")
    return "\n".join(lines)


def build_report(out: Path) -> tuple[list[Claim], Path]:
    """Read ``out/config.yaml`` and the case files, draw the plots, write ``report.md`` and
    ``claims.json``. Needs nothing but the files."""
    out = Path(out)
    cfg_path = out / "config.yaml"
    if not cfg_path.exists():
        raise SystemExit(f"{out}: no config.yaml; is this an `odelora run` output folder?")
    saved = yaml.safe_load(cfg_path.read_text())
    exp = get_experiment(saved["experiment"])
    cfg = exp.Config(**saved["config"])
    df = read_results(out)
    claims, figures = exp.report(df, cfg, out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    parts = [
        f"# {exp.name}: {exp.summary}",
        "",
        claims_markdown(claims),
        "",
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
    atomic_write(report, "\n".join(parts) + "\n")
    atomic_write(out / "claims.json", json.dumps([c.as_dict() for c in claims], indent=2, default=str))
    return claims, report

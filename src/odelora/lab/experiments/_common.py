"""Helpers shared by the experiments' reports: figures, final rows, best rates, grid edges."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..._io import atomic_write  # noqa: E402

plt.rcParams.update({
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8, "legend.framealpha": 0.85, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110,
})

STATUS_WORDS = {
    "converged": "converged",
    "diverged": "diverged (stopped when the error blew up)",
    "stalled": "stalled (stopped early: too slow, oscillating, or no longer moving; see lab.methods.train)",
    "cap": "ran to the iteration cap without reaching the target",
}


def save_fig(fig, out: Path, name: str) -> str:
    """Save a figure atomically as PNG; returns its file name. A log axis with nothing positive to
    show (a panel whose cases have not run yet, in a report of an interrupted run) turns linear:
    matplotlib cannot draw it otherwise. Axes that share an axis are judged by their data together
    (an empty panel of a shared grid leaves its neighbours' log axis as it is)."""
    for ax in fig.axes:
        for k in "xy":
            group = getattr(ax, f"get_shared_{k}_axes")().get_siblings(ax)
            lims = np.array([getattr(a.dataLim, f"interval{k}") for a in group])
            if getattr(ax, f"get_{k}scale")() == "log" and not (np.isfinite(lims).all(1) & (lims[:, 1] > 0)).any():
                getattr(ax, f"set_{k}scale")("linear")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(Path(out) / name, buf.getvalue())
    return name


def save_csv(df: pd.DataFrame, out: Path, name: str) -> None:
    """Write a table of a report atomically as CSV (no index)."""
    atomic_write(Path(out) / name, df.to_csv(index=False))


def method_styles(names: list[str]) -> dict[str, dict]:
    """A colour, marker shape and marker size per method, the same in every panel of a figure:
    methods whose points coincide (equal orders, runs ending at a cap) stay visible."""
    return {m: dict(color=f"C{i % 10}", marker="osD^vP*Xh"[i % 9], ms=10 - 1.5 * (i % 5)) for i, m in enumerate(names)}


def curve_styles(n: int) -> list[dict]:
    """n curves told apart: the ten colours of tab10, then again with another line style (tab20's
    pairs of one hue, sampled evenly, gave neighbouring curves near-equal colours)."""
    return [dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[(i // 10) % 4]) for i in range(n)]


def gave_back_progress(loss: pd.Series) -> bool:
    """Whether a run ended having given back more than half of its best decrease of the loss
    (a blow-up, then a flat region): a convergence rate would describe the collapse."""
    j0, best, last = loss.iloc[0], loss.min(), loss.iloc[-1]
    return bool(last - best > 0.5 * (j0 - best))


def final_rows(df: pd.DataFrame, run_keys: list[str] | None = None) -> pd.DataFrame:
    """The last logged row of each run (a case may hold several runs, told apart by ``run``)."""
    keys = ["case"] + (["run"] if "run" in df.columns else []) if run_keys is None else run_keys
    return df.sort_values("iter").groupby(keys, as_index=False).tail(1)


def estimate(fin: pd.DataFrame) -> pd.Series:
    """Iterations each run needs: measured where it converged, the projection where it stalled for
    being too slow, at least the cap where it ran to the cap, infinite where it diverged,
    oscillated or stopped moving."""
    est = pd.Series(np.inf, index=fin.index)
    est[fin.status == "converged"] = fin.iters
    slow = (fin.status == "stalled") & np.isfinite(fin.projected)
    est[slow] = fin.projected
    est[fin.status == "cap"] = fin.iters
    return est


def best_by_method(fin: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: the learning rate with the fewest median iterations to the target over seeds
    (a rate counts only if every seed converged). Where no rate converged, the row keeps the rate
    with the smallest median estimate (see ``estimate``), with NaN iterations, ``converged`` False
    and that estimate in ``projected``."""
    per_lr = fin.assign(est=estimate(fin)).groupby(keys + ["lr"]).agg(
        converged=("status", lambda s: bool((s == "converged").all())),
        iters=("iters", "median"), nfe=("nfe", "median"), final=("metric", "median"),
        stopped=("iters", "max"), seeds=("seed", "nunique"), est=("est", "median"),
        status=("status", lambda s: ",".join(sorted(set(s)))),
    ).reset_index()
    rows = []
    for _, grp in per_lr.groupby(keys):
        conv = grp[grp.converged]
        if len(conv):
            row = conv.sort_values(["iters", "lr"]).iloc[0].copy()
            row["projected"] = row["iters"]
        else:
            row = grp.assign(final=grp.final.fillna(np.inf)).sort_values(["est", "final"]).iloc[0].copy()
            row["iters"], row["nfe"], row["projected"] = np.nan, np.nan, row["est"]
        row["grid_min"], row["grid_max"] = grp.lr.min(), grp.lr.max()
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def edge_note(best: pd.DataFrame, label) -> tuple[list[str], list[str]]:
    """Where a converged best rate sits at the end of its grid: (edges, groups with no
    converged rate). ``label(row)`` names a group."""
    edges, none = [], []
    for _, r in best.iterrows():
        if not r.converged:
            none.append(label(r))
        elif r.grid_min == r.grid_max or r.lr in (r.grid_min, r.grid_max):
            side = "only rate" if r.grid_min == r.grid_max else ("smallest" if r.lr == r.grid_min else "largest")
            edges.append(f"{label(r)} (lr {r.lr:g}, the {side} of its grid)")
    return edges, none


def status_text(fin: pd.DataFrame) -> str:
    counts = fin.status.value_counts()
    return ", ".join(f"{int(counts[s])} {s}" for s in STATUS_WORDS if s in counts)


def stall_text(fin: pd.DataFrame) -> str:
    """How many stalled runs were stopped by which test."""
    if "reason" not in fin.columns:
        return ""
    r = fin[fin.status == "stalled"].reason.value_counts()
    return "; ".join(f"{int(v)} {k}" for k, v in r.items())


def fmt_count(v, cap) -> str:
    return f">{cap}" if v is None or not np.isfinite(v) else f"{int(v)}"

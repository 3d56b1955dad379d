"""Helpers shared by the experiments' reports."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..runner import atomic_write


def save_fig(fig, out: Path, name: str) -> str:
    """Save a figure atomically as PNG; returns its file name."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(Path(out) / name, buf.getvalue())
    return name


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last logged row of each case."""
    return df.sort_values("iter").groupby("case", as_index=False).tail(1)


def best_by_method(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: the learning rate with the fewest median iterations to tolerance over seeds
    (a rate counts only if every seed converged). Unconverged groups get NaN iterations and the
    rate with the lowest final metric."""
    fin = final_rows(df)
    per_lr = fin.groupby(keys + ["lr"]).agg(
        all_conv=("converged", "all"),
        iters=("iters_to_tol", "median"),
        nfe=("nfe_to_tol", "median"),
        final=("metric", "median"),
        seeds=("seed", "nunique"),
    ).reset_index()
    out = []
    for key, grp in per_lr.groupby(keys):
        conv = grp[grp.all_conv]
        if len(conv):
            row = conv.sort_values(["iters", "lr"]).iloc[0]
        else:
            row = grp.sort_values("final").iloc[0].copy()
            row["iters"], row["nfe"] = np.nan, np.nan
        out.append(row)
    return pd.DataFrame(out).reset_index(drop=True)


def fmt_count(v, cap) -> str:
    return f">{cap}" if v is None or not np.isfinite(v) else f"{int(v)}"

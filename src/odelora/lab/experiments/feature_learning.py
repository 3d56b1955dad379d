"""Stable feature learning across widths: both first-order feature terms stay Theta(1)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ... import flows
from ...geometry import balance
from ..core import Claim, Experiment, ExperimentConfig, register
from ._common import save_fig

# method -> (flow, rebalance, lr exponent p in lr = c * n^-p, ratio of B's lr to A's)
RULES = {
    "odelora-euler": ("balanced", True, 1.0, 1.0),
    "lora-gd": ("gradient", False, 1.0, 1.0),
    "lora-gd-const": ("gradient", False, 0.0, 1.0),
    "lora-plus": ("gradient", False, 1.0, 16.0),
}


class Config(ExperimentConfig):
    widths: list[int] = [64, 128, 256, 512, 1024, 2048, 4096]
    rank: int = 4
    batch: int = 8
    steps: int = 10
    methods: list[str] = list(RULES)
    lr_constants: dict[str, float] = {"odelora-euler": 0.5, "lora-gd": 0.5, "lora-gd-const": 0.01, "lora-plus": 0.05}
    seeds: int = 3


@register
class FeatureLearning(Experiment):
    name = "feature-learning"
    summary = "RMS of the feature increments dB A x and B dA x across widths (one lr rule per method)"
    Config = Config
    QUICK = dict(widths=[64, 256, 1024, 4096], seeds=2)

    def cases(self, cfg):
        bad = [m for m in cfg.methods if m not in RULES or m not in cfg.lr_constants]
        if bad:
            raise SystemExit(f"feature-learning: unknown methods {bad}; choose from {sorted(RULES)}")
        return [dict(method=m, width=int(w), seed=s) for s in range(cfg.seeds) for m in cfg.methods for w in cfg.widths]

    def run_case(self, cfg, case):
        n, r, k = case["width"], cfg.rank, cfg.batch
        flow_name, rebalance, p, ratio = RULES[case["method"]]
        flow = flows.get_flow(flow_name)
        lr_A = cfg.lr_constants[case["method"]] * n ** (-p)
        lr_B = ratio * lr_A
        gen = torch.Generator().manual_seed(case["seed"])
        X = torch.randn(n, k, generator=gen, dtype=torch.float64)  # inputs with Theta(1) entries
        U = torch.randn(n, r, generator=gen, dtype=torch.float64)
        V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
        Y = U @ (V.T @ X)  # rank-r target change with Theta(1) entries
        B = torch.zeros(n, r, dtype=torch.float64)  # PEFT default: B = 0, A Kaiming-like
        A = torch.randn(r, n, generator=gen, dtype=torch.float64) / np.sqrt(n)
        x = X[:, 0]
        rows = []
        for t in range(cfg.steps):
            E = B @ (A @ X) - Y  # dL/dZ for L = 1/(2k) ||Z - Y||^2
            gB = E @ (A @ X).T / k
            gA = B.T @ E @ X.T / k
            loss = 0.5 * float((E**2).sum()) / k
            vB, vA = flow(B, A, gB, gA)
            dB, dA = lr_B * vB, lr_A * vA
            d1, d2 = dB @ (A @ x), B @ (dA @ x)
            rows.append(dict(step=t, loss=loss, rms_dBAx=float(d1.norm()) / np.sqrt(n), rms_BdAx=float(d2.norm()) / np.sqrt(n),
                             rms_z=float((B @ (A @ x)).norm()) / np.sqrt(n), lr_A=lr_A, lr_B=lr_B))
            B, A = B + dB, A + dA
            if rebalance:
                B, A = balance(B, A)
        return rows

    def report(self, df, cfg, out: Path):
        d = df[df.step >= 2].copy()
        for col in ("rms_dBAx", "rms_BdAx"):  # a diverged run counts as an infinite feature change
            d[col] = d[col].fillna(np.inf)  # B = 0 at step 0 makes the second term vanish there by construction
        g = d.groupby(["method", "width"]).agg(t1=("rms_dBAx", lambda s: np.exp(np.log(s).mean())),
                                               t2=("rms_BdAx", lambda s: np.exp(np.log(s).mean()))).reset_index()
        slopes = {}
        for m, grp in g.groupby("method"):
            lw = np.log(grp.width)
            fit = lambda y: float(np.polyfit(lw, np.log(y), 1)[0]) if np.isfinite(y).all() and (y > 0).all() else np.inf
            slopes[m] = (fit(grp.t1.to_numpy()), fit(grp.t2.to_numpy()))  # inf: diverged at some width
        claims = []
        if "odelora-euler" in slopes:
            s1, s2 = slopes["odelora-euler"]
            claims.append(Claim(
                "ODELoRA (one lr rule h = c/n, no ratio between factors): both feature terms are Theta(1) in width",
                "log-log slopes of RMS(dB A x) and RMS(B dA x) vs width within +-0.15 of 0",
                f"slopes {s1:+.3f}, {s2:+.3f}", bool(abs(s1) <= 0.15 and abs(s2) <= 0.15), "Gao & Tan 2026; Hayou et al. 2024"))
        base = [m for m in slopes if m.startswith("lora")]
        if base:
            worst = {m: max(abs(s) for s in slopes[m]) for m in base}
            claims.append(Claim(
                "LoRA with a width-independent lr ratio cannot keep both terms Theta(1)",
                "each baseline has a term whose |slope| > 0.3",
                ", ".join(f"{m}: {slopes[m][0]:+.2f}, {slopes[m][1]:+.2f}" for m in base),
                bool(all(v > 0.3 for v in worst.values())), "Hayou et al. 2024 (LoRA+)"))
        fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for m, grp in g.groupby("method"):
            grp = grp[np.isfinite(grp.t1) & np.isfinite(grp.t2)]
            ax[0].loglog(grp.width, grp.t1, "o-", label=f"{m} ({slopes[m][0]:+.2f})")
            ax[1].loglog(grp.width, grp.t2, "o-", label=f"{m} ({slopes[m][1]:+.2f})")
        ax[0].set(xlabel="width n", ylabel="RMS per coordinate", title="dB A x")
        ax[1].set(xlabel="width n", title="B dA x")
        for a in ax:
            a.legend(fontsize=7)
        return claims, [save_fig(fig, out, "feature_terms.png")]

"""ODELoRA iterates against the exact ODELoRA flow: global error vs h for every tableau."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ... import flows
from ...integrators import TABLEAUS, integrate
from ...geometry import balance
from ...optim import ODELoRA
from ..core import Claim, Experiment, ExperimentConfig, register
from ..problems import matrix_sensing, small_random_start
from ._common import save_fig


class Config(ExperimentConfig):
    m: int = 8
    n: int = 6
    rank: int = 2
    T: float = 2.0
    steps: list[int] = [10, 20, 40, 80, 160]
    methods: list[str] = ["euler", "heun", "midpoint", "rk4", "bs32", "dopri5"]
    adaptive_rtols: list[float] = [1e-3, 1e-4, 1e-5, 1e-6]
    seeds: int = 2


def _problem(cfg, seed):
    q, _ = matrix_sensing(cfg.m, cfg.n, cfg.rank, 10.0, 6.0, seed)
    B0, A0 = small_random_start(cfg.m, cfg.n, cfg.rank, 0.5, seed)
    return q, balance(B0, A0)


def _vector_field(q):
    def f(y):
        B, A = y
        G = q.grad(B @ A)
        return list(flows.balanced(B, A, G @ A.T, B.T @ G))

    return f


def exact_flow(q, B0, A0, T):
    return integrate(_vector_field(q), [B0, A0], (0.0, T), method="dopri5", rtol=1e-12, atol=1e-14).y


@register
class TrajectoryFidelity(Experiment):
    name = "trajectory-fidelity"
    summary = "ODELoRA iterates track the exact ODELoRA flow with each tableau's order"
    Config = Config
    QUICK = dict(seeds=1, steps=[10, 20, 40, 80])

    def cases(self, cfg):
        bad = [m for m in cfg.methods if m not in TABLEAUS]
        if bad:
            raise SystemExit(f"trajectory-fidelity: unknown methods {bad}; choose from {list(TABLEAUS)}")
        return [dict(method=m, seed=s) for s in range(cfg.seeds) for m in cfg.methods]

    def run_case(self, cfg, case):
        q, (B0, A0) = _problem(cfg, case["seed"])
        ref = exact_flow(q, B0, A0, cfg.T)
        Xref = ref[0] @ ref[1]
        tab = TABLEAUS[case["method"]]
        rows = []
        if tab.adaptive:  # the integrator lands exactly on T; the optimizer path is tested in tests/
            for rtol in cfg.adaptive_rtols:
                res = integrate(_vector_field(q), [B0, A0], (0.0, cfg.T), method=tab.name, rtol=rtol, atol=1e-12)
                err = float(torch.linalg.norm(res.y[0] @ res.y[1] - Xref) / torch.linalg.norm(Xref))
                rows.append(dict(h=float("nan"), rtol=rtol, error=err, nfe=res.stats.nfe, steps=res.stats.accepted, order=tab.order))
            return rows
        for k in cfg.steps:
            B, A = B0.clone().requires_grad_(), A0.clone().requires_grad_()
            opt = ODELoRA([(B, A)], lr=cfg.T / k, method=tab.name)

            def closure():
                opt.zero_grad()
                loss = q.loss(B @ A)
                loss.backward()
                return loss

            for _ in range(k):
                opt.step(closure)
            err = float(torch.linalg.norm(B.detach() @ A.detach() - Xref) / torch.linalg.norm(Xref))
            rows.append(dict(h=cfg.T / k, rtol=float("nan"), error=err, nfe=opt.stats["nfe"], steps=k, order=tab.order))
        return rows

    def report(self, df, cfg, out: Path):
        claims, figs = [], []
        fixed = df[df.h.notna()]
        slopes = {}
        for m, grp in fixed.groupby("method"):
            g = grp.groupby("h").error.median().reset_index()
            g = g[g.error > 1e-12]  # above the reference's accuracy
            slopes[m] = float(np.polyfit(np.log(g.h), np.log(g.error), 1)[0]) if len(g) >= 2 else float("nan")
        for m, s in slopes.items():
            order = TABLEAUS[m].order
            claims.append(Claim(f"{m}: global error against the exact ODELoRA flow scales like h^{order}",
                                f"log-log slope {order} +- 0.3", f"slope {s:.2f}", bool(abs(s - order) <= 0.3), "Runge-Kutta theory"))
        ad = df[df.h.isna()]
        for m, grp in ad.groupby("method"):
            g = grp.groupby("rtol").agg(error=("error", "median"), nfe=("nfe", "median")).reset_index()
            ok = bool((g.error <= 100 * g.rtol).all())
            claims.append(Claim(f"{m} (adaptive): error follows the tolerance", "error <= 100 x rtol at every rtol",
                                ", ".join(f"rtol {r.rtol:g}: err {r.error:.1e} ({int(r.nfe)} evals)" for r in g.itertuples()), ok))
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for m, grp in fixed.groupby("method"):
            g = grp.groupby("h").error.median()
            ax[0].loglog(g.index, g.values, "o-", label=f"{m} (slope {slopes[m]:.2f})")
        ax[0].set(xlabel="h", ylabel="relative error of X at T", title="fixed-step tableaus")
        ax[0].legend(fontsize=7)
        for m, grp in df.groupby("method"):
            g = grp.groupby(["h", "rtol"], dropna=False).agg(error=("error", "median"), nfe=("nfe", "median"))
            ax[1].loglog(g.nfe, g.error, "o-", label=m)
        ax[1].set(xlabel="gradient evaluations", ylabel="relative error of X at T", title="work vs precision")
        ax[1].legend(fontsize=7)
        figs.append(save_fig(fig, out, "error_vs_h.png"))
        return claims, figs

"""ODELoRA iterates against the exact ODELoRA flow: global error vs h for every tableau.

The exact flow is an independent numpy implementation of the balanced flow's formula, solved by
scipy's DOP853 at rtol 1e-12 (``lab/reference.py``); the iterates come from the ODELoRA
optimizer (fixed-step tableaus) or from ``odelora.integrators.integrate`` (adaptive pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from ... import flows
from ...geometry import balance
from ...integrators import TABLEAUS, integrate
from ...optim import ODELoRA
from ..core import Claim, Experiment, ExperimentConfig, NonEmpty, fmt
from ..problems import matrix_sensing, small_random_start
from ..reference import exact_balanced_flow
from ._common import method_styles, save_fig

Method = Literal["euler", "heun", "midpoint", "rk4", "bs32", "dopri5"]
FLOOR = 1e-11  # errors below this are at the reference's accuracy and are left out of the order fits


class Config(ExperimentConfig):
    m: PositiveInt = Field(8, description="rows of X")
    n: PositiveInt = Field(6, description="columns of X")
    rank: PositiveInt = Field(2, description="rank of the factors")
    T: PositiveFloat = Field(2.0, description="integration time")
    steps: NonEmpty(PositiveInt) = Field([10, 20, 40, 80, 160], description="numbers of fixed steps to T (h = T / steps)")
    methods: NonEmpty(Method) = Field(["euler", "heun", "midpoint", "rk4", "bs32", "dopri5"], description="tableaus")
    adaptive_rtols: NonEmpty(PositiveFloat) = Field([1e-3, 1e-4, 1e-5, 1e-6], description="tolerances of the adaptive pairs")
    seeds: PositiveInt = 2

    @model_validator(mode="after")
    def _check(self):
        if self.rank >= min(self.m, self.n):
            raise ValueError(f"rank {self.rank} must be below min(m, n) = {min(self.m, self.n)}: at full rank the product "
                             "can pass through singular matrices, where the exact factor flow (inverses of B^T B and A A^T) "
                             "has no solution")
        if len(self.steps) < 2:
            raise ValueError("steps needs at least two values (orders are fitted)")
        return self


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


class TrajectoryFidelity(Experiment):
    name = "trajectory-fidelity"
    summary = "ODELoRA iterates track the exact ODELoRA flow (scipy, independent numpy flow) with each tableau's order"
    Config = Config
    QUICK = dict(seeds=1, steps=[10, 20, 40, 80])

    def cases(self, cfg):
        return [dict(method=m, seed=s) for s in range(cfg.seeds) for m in cfg.methods]

    def case_cost(self, cfg, case):
        tab = TABLEAUS[case["method"]]
        if tab.adaptive:
            return 0.3 + 0.2 * len(cfg.adaptive_rtols)
        return 0.3 + 0.0015 * tab.stages * sum(cfg.steps) * (2 if tab.stages >= 4 else 1)

    def run_case(self, cfg, case):
        q, (B0, A0) = _problem(cfg, case["seed"])
        Qn, Xs = q.Q.numpy(), q.Xstar.numpy()
        grad = lambda W: (Qn @ (W - Xs).ravel()).reshape(W.shape)
        Br, Ar = exact_balanced_flow(grad, B0.numpy(), A0.numpy(), cfg.T)
        Xref = torch.from_numpy(Br @ Ar)
        tab = TABLEAUS[case["method"]]
        rows = []
        if tab.adaptive:  # the integrator lands exactly on T; the optimizer's adaptive path is tested in tests/
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
            rows.append(dict(h=cfg.T / k, rtol=float("nan"), error=err, nfe=k * tab.stages, steps=k, order=tab.order))
        return rows

    def describe(self, df, cfg):
        return (f"Relative error at T = {cfg.T:g} of the product X = B A against the exact balanced flow (scipy DOP853, "
                f"rtol 1e-12, on an independent numpy implementation of the flow) on {cfg.m}x{cfg.n} rank-{cfg.rank} matrix "
                f"sensing, for {len(cfg.methods)} tableaus at h = T/k, k in {list(cfg.steps)}, and the adaptive pairs at "
                f"{len(cfg.adaptive_rtols)} tolerances ({cfg.seeds} seed(s)).")

    def report(self, df, cfg, out: Path):
        claims, figs = [], []
        fixed = df[df.h.notna()]
        slopes = {}
        for m, grp in fixed.groupby("method"):
            g = grp.groupby("h").error.median().reset_index()
            g = g[g.error > FLOOR]
            slopes[m] = (float(np.polyfit(np.log(g.h), np.log(g.error), 1)[0]) if len(g) >= 2 else float("nan"), len(g))
        for m in [x for x in cfg.methods if x in slopes]:
            s, npts = slopes[m]
            order = TABLEAUS[m].order
            ok = bool(np.isfinite(s) and abs(s - order) <= 0.3)
            undecided = "" if npts >= 2 else (f"the error of {m} is above the reference's accuracy ({FLOOR:g}) at {npts} step "
                                              "size(s), too few to fit a slope: take a longer T or fewer steps")
            claims.append(Claim(
                f"{m}: global error against the exact ODELoRA flow scales like h^{order}",
                f"log-log slope {order} +- 0.3", f"slope {fmt(s, '.2f', f'not fitted (fewer than two errors above {FLOOR:g})')} from {npts} step sizes",
                ok, "Runge-Kutta theory", note=undecided or ("" if ok else f"the error of {m} does not fall like h^{order}"),
                inconclusive=bool(undecided)))
        ad = df[df.h.isna()]
        for m in [x for x in cfg.methods if x in set(ad.method)]:
            g = ad[ad.method == m].groupby("rtol").agg(error=("error", "median"), nfe=("nfe", "median")).reset_index()
            ok = bool((g.error <= 100 * g.rtol).all())
            claims.append(Claim(f"{m} (adaptive): the error follows the tolerance", "error <= 100 x rtol at every rtol",
                                ", ".join(f"rtol {r.rtol:g}: err {fmt(r.error, '.1e')} ({int(r.nfe)} evals)" for r in g.itertuples()), ok,
                                "error control", note="" if ok else "the global error exceeds 100 x rtol"))
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.4))
        look = method_styles(list(dict.fromkeys([*cfg.methods, *df.method.unique()])))
        for m, grp in fixed.groupby("method"):
            g = grp.groupby("h").error.median()
            ax[0].loglog(g.index, g.values, "-", **look[m], alpha=0.8, label=f"{m} (slope {fmt(slopes[m][0], '.2f', 'n/a')})")
        ax[0].axhline(FLOOR, color="gray", ls=":", lw=1, label="reference accuracy")
        ax[0].set(xlabel="h", ylabel="relative error of X at T", title="fixed-step tableaus")
        ax[0].legend()
        for m, grp in df.groupby("method"):
            g = grp.groupby(["h", "rtol"], dropna=False).agg(error=("error", "median"), nfe=("nfe", "median")).sort_values("nfe")
            ax[1].loglog(g.nfe, g.error, "-", **look[m], alpha=0.8, label=m)
        ax[1].set(xlabel="gradient evaluations", ylabel="relative error of X at T", title="work vs precision")
        ax[1].legend()
        figs.append(save_fig(fig, out, "error_vs_h.png"))
        return claims, figs

"""Strongly convex quadratic with a rank-r minimizer: linear rates and largest stable steps.

One case is one (method, seed); all step sizes of the grid run as one batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from ..core import Claim, Experiment, ExperimentConfig, NonEmpty, fmt
from ..methods import MethodName, Run, train
from ..problems import quadratic_fns, small_random_start, strongly_convex
from ._common import final_rows, save_csv, save_fig, status_text


def fitted_rate(iters: np.ndarray, metric: np.ndarray, lo: float = 1e-9, hi: float = 1e-3) -> float:
    """Per-iteration contraction factor from a log-linear fit of the error in [lo, hi]."""
    sel = (metric > lo) & (metric < hi) & np.isfinite(metric)
    if sel.sum() < 3:
        return float("nan")
    slope = np.polyfit(iters[sel], np.log(metric[sel]), 1)[0]
    return float(np.exp(slope))


_FIT_WINDOW = "fewer than 3 logged errors between 1e-9 and 1e-3"


def _only_capped(statuses: str) -> bool:
    """Whether runs (their statuses joined by commas) that did not all converge only ran out of
    iterations: neither diverged nor stalled."""
    return set(statuses.split(",")) <= {"converged", "cap"}


def _linear_convergence(ode) -> tuple[str, str]:
    """Why the runs at h = 1/L (one row per method) fail linear convergence, or else why they
    cannot decide it ('' where they do): every run at the cap decides nothing, a run that
    converged too fast to fit a rate shows convergence but no rate."""
    capped = ode[~ode.conv & ode.status.map(_only_capped)]
    bad = ode[~ode.conv & ~ode.status.map(_only_capped)]
    if len(bad):
        return f"{', '.join(bad.method)} did not reach the target at h = 1/L ({', '.join(bad.status)})", ""
    slow = ode[ode.conv & (ode.rate >= 1)]
    if len(slow):
        return f"{', '.join(slow.method)} converged, but its fitted contraction per step is not below 1", ""
    if len(capped):
        return "", f"{', '.join(capped.method)} stopped at the iteration cap before the target: raise max_iters"
    fast = ode[~np.isfinite(ode.rate)]
    if len(fast):
        return "", f"{', '.join(fast.method)} reached the target in too few iterations to fit a rate ({_FIT_WINDOW})"
    return "", ""


class Config(ExperimentConfig):
    m: PositiveInt = Field(10, description="rows of X")
    n: PositiveInt = Field(10, description="columns of X")
    rank: PositiveInt = Field(2, description="rank of the minimizer and of the factors")
    cond: float = Field(10.0, ge=1, description="condition number kappa_H of the quadratic's Hessian")
    init_std: PositiveFloat = Field(0.3, description="std of the random start")
    methods: NonEmpty(MethodName) = Field(["odelora-euler", "odelora-heun", "odelora-rk4", "odelora-adaptive", "lora-gd", "scaled-gd"],
                                          description="methods to compare")
    steps_times_L: NonEmpty(PositiveFloat) = Field([0.25, 0.5, 1.0, 1.5, 1.9, 2.5, 3.0, 4.0, 6.0, 8.0],
                                                   description="step sizes h in units of 1/L")
    max_iters: PositiveInt = Field(4000, description="iteration cap")
    tol: PositiveFloat = Field(1e-10, description="target relative error")
    seeds: PositiveInt = 3

    @model_validator(mode="after")
    def _check(self):
        if self.rank > min(self.m, self.n):
            raise ValueError(f"rank {self.rank} exceeds min(m, n) = {min(self.m, self.n)}")
        if 1.0 not in self.steps_times_L:
            raise ValueError("steps_times_L must contain 1.0 (the claims are made at h = 1/L)")
        return self


class StronglyConvex(Experiment):
    name = "strongly-convex"
    summary = "linear convergence of ODELoRA on f(X) = 1/2 <X - Y, H(X - Y)>, rank(Y) <= r"
    Config = Config
    QUICK = dict(m=8, n=8, seeds=1, max_iters=2000, steps_times_L=[0.5, 1.0, 1.9, 2.5, 4.0, 6.0, 8.0])

    def cases(self, cfg):
        return [dict(method=m, seed=s) for s in range(cfg.seeds) for m in cfg.methods]

    def case_cost(self, cfg, case):
        # seconds per case on one core of the reference machine (full preset: 10 steps, cap 4000)
        base = {"odelora-adaptive": 38.0, "odelora-rk4": 29.0, "odelora-heun": 4.4}.get(case["method"], 3.2)
        return base * len(cfg.steps_times_L) / 10 * (0.5 + 0.5 * cfg.max_iters / 4000)

    def run_case(self, cfg, case):
        q = strongly_convex(cfg.m, cfg.n, cfg.rank, cfg.cond, case["seed"])
        L = q.smoothness()
        B0, A0 = small_random_start(cfg.m, cfg.n, cfg.rank, cfg.init_std, case["seed"])
        grad_fn, metric_fn = quadratic_fns(q.Q, q.Xstar[None])
        zero = lambda idx: torch.zeros_like(idx)
        runs = [Run(B0, A0, h / L) for h in cfg.steps_times_L]
        outs = train(case["method"], runs, lambda B, A, idx: grad_fn(B, A, zero(idx)), lambda B, A, idx: metric_fn(B, A, zero(idx)),
                     iters=cfg.max_iters, target=cfg.tol)
        rows = []
        for j, (h, o) in enumerate(zip(cfg.steps_times_L, outs)):
            it = np.array([r["iter"] for r in o.rows], float)
            met = np.array([r["metric"] for r in o.rows], float)
            rate = fitted_rate(it, met)
            for r in o.rows:
                rows.append(dict(r, run=j, hL=h, lr=h / L, L=L, status=o.status, iters=o.iters, rate=rate))
        return rows

    def describe(self, df, cfg):
        fin = final_rows(df)
        return (f"Relative error against iterations for {len(cfg.methods)} methods at {len(cfg.steps_times_L)} step sizes h L on "
                f"f(X) = 1/2 <X - Y, H(X - Y)> ({cfg.m}x{cfg.n}, rank {cfg.rank}, kappa_H = {cfg.cond:g}, {cfg.seeds} seed(s)): "
                f"fitted linear rates and the largest step that still converges ({len(fin)} runs: {status_text(fin)}).")

    def report(self, df, cfg, out: Path):
        fin = final_rows(df)
        g = fin.groupby(["method", "hL"]).agg(conv=("status", lambda s: bool((s == "converged").all())), iters=("iters", "median"),
                                              rate=("rate", "median"), status=("status", lambda s: ",".join(sorted(set(s))))).reset_index()
        save_csv(g, out, "summary.csv")
        claims = []
        kappa = cfg.cond
        at1 = g[g.hL == 1.0]
        ode = at1[at1.method.str.startswith("odelora")]
        if len(ode):
            failed, undecided = _linear_convergence(ode)
            claims.append(Claim(
                "ODELoRA converges linearly at h = 1/L (every integrator)",
                "linear convergence below a step-size bound (rate < 1, error 1e-10 reached)",
                ", ".join(f"{r.method}: rate {fmt(r.rate, '.4f', 'not fitted')}, " + (f"{int(r.iters)} it" if r.conv else r.status) for r in ode.itertuples()),
                not failed, "Gao & Tan 2026", note=failed or undecided, inconclusive=bool(undecided and not failed)))
            eul = ode[ode.method == "odelora-euler"]
            if len(eul):
                e = eul.iloc[0]
                rate, bound = float(e.rate), 1 - 1 / kappa
                ok = bool(e.conv and rate <= bound + 1e-3)  # the median rate of seeds that all converged
                undecided = ""
                if not e.conv and _only_capped(e.status):
                    undecided = f"Euler at h = 1/L stopped at the iteration cap ({cfg.max_iters}) before the target: raise max_iters"
                elif e.conv and not math.isfinite(rate):
                    undecided = f"Euler reached the target at h = 1/L in too few iterations to fit a rate ({int(e.iters)}: {_FIT_WINDOW})"
                if not e.conv:
                    why = f"Euler did not reach the target at h = 1/L in every seed ({e.status}): its rate is not that of a converging run"
                else:
                    why = "the fitted contraction per step is slower than 1 - 1/kappa_H"
                claims.append(Claim(
                    "ODELoRA-Euler's rate at h = 1/L is at least that of gradient descent on the manifold",
                    f"rate <= 1 - mu h = 1 - 1/kappa_H = {bound:.4f} (local rate of Riemannian GD)",
                    fmt(rate, ".4f", "not fitted") + ("" if e.conv else f" (runs: {e.status})"), ok,
                    "Gao & Tan 2026 (linear rate); local analysis", note=undecided or ("" if ok else why), inconclusive=bool(undecided)))
        stable, edges = [], []
        hs = sorted(cfg.steps_times_L)
        ran = set(g.method)  # a partial run may lack methods
        for m in cfg.methods:
            conv = g[(g.method == m) & g.conv].hL
            if m not in ran:
                stable.append(f"{m}: not run")
                continue
            if conv.empty:
                stable.append(f"{m}: none of the grid converged within {cfg.max_iters} iterations")
                continue
            top = float(conv.max())
            nxt = [h for h in hs if h > top]
            why = "" if not nxt else g[(g.method == m) & (g.hL == nxt[0])].status.iloc[0]
            stable.append(f"{m}: {top:g}" + (f" (next {nxt[0]:g}: {why})" if nxt else " (the largest of the grid)"))
            if not nxt:
                edges.append(m)
        claims.append(Claim("largest step h L that converges, per method", "reported", "; ".join(stable), None,
                            note=(f"At the top of the grid for {', '.join(edges)}: a larger step might converge too." if edges else "")))
        claims.append(Claim("fitted linear rates (per iteration) per step size", "reported",
                            "; ".join(f"{m}: " + ((", ".join(f"{r.hL:g}: {r.rate:.4f}" for r in g[g.method == m].itertuples()
                                                             if np.isfinite(r.rate)) or "none fitted") if m in ran else "not run")
                                      for m in cfg.methods),
                            None, note="Rates are fitted where the error is between 1e-9 and 1e-3; steps that never got there have none."))
        figs = []
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.4))
        for i, m in enumerate(cfg.methods):
            cur = df[(df.method == m) & (df.hL == 1.0) & (df.seed == 0)].sort_values("iter")
            ax[0].semilogy(cur["iter"], cur["metric"], color=f"C{i}", label=m)
            gm = g[(g.method == m) & np.isfinite(g.rate)]
            ax[1].plot(gm.hL, gm.rate, "o-", color=f"C{i}", label=m)
        ax[0].set(xlabel="iteration", ylabel="||X - X*|| / ||X*||", title="h = 1/L, seed 0")
        ax[1].set(xlabel="h L", ylabel="fitted rate per iteration", title=f"kappa_H = {kappa:g} (missing: no fit)")
        ax[0].legend()
        ax[1].legend()
        figs.append(save_fig(fig, out, "convergence.png"))
        return claims, figs

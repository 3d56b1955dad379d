"""LoRA gradient descent as GD on stacked factors (Mu & Klabjan): the descent lemma at the
theory step size, how much larger a step still descends, and the measured rate of
``min_{t<T} ||grad J||^2``.

Problems: (i) a LoRA logistic-regression classifier (rank 4 on a frozen random base) over frozen
all-MiniLM-L6-v2 embeddings of BBC News; (ii) a two-layer LoRA MLP on scikit-learn's digits.
Full-batch steps, so the descent lemma applies as stated. Norms are Frobenius norms (they bound
the spectral ones, so the theory step is only more conservative) and L* = 0 (cross-entropy >= 0).
All step sizes of one case run as one batch (independent runs, one forward pass).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from ..core import Claim, Experiment, ExperimentConfig, NonEmpty, merged_with
from ._common import curve_styles, gave_back_progress, save_csv, save_fig

RULES = {
    "theory": "k / (4 sqrt(2) L (||V||^2 + ||grad_W L||)), k a multiple of the theory step (capped at 1 before k; logistic-bbc only, where L is known)",
    "constant": "c",
    "practical-gradW": "min(c / (||V||^2 + ||grad_W L||), 1)",
    "practical-loss": "min(c / (||V||^2 + sqrt(loss)), 1)",
    "practical-grad": "min(c / ||grad J||^(1/2), 1)",
}
Rule = Literal["theory", "constant", "practical-gradW", "practical-loss", "practical-grad"]
Problem = Literal["logistic-bbc", "mlp-digits"]
DEFAULT_CONSTANTS = {
    "theory": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    "constant": [0.5, 2.0], "practical-gradW": [0.5, 2.0], "practical-loss": [0.5, 2.0], "practical-grad": [0.1, 0.5],
}


class Config(ExperimentConfig):
    problems: NonEmpty(Problem) = Field(["logistic-bbc", "mlp-digits"], description="logistic-bbc: LoRA logistic regression on MiniLM embeddings of BBC News; mlp-digits: two-layer LoRA MLP on digits")
    rules: NonEmpty(Rule) = Field(list(RULES), description="; ".join(f"{k}: {v}" for k, v in RULES.items()))
    constants: dict[Rule, NonEmpty(PositiveFloat)] = Field(DEFAULT_CONSTANTS, description="constants c per rule (theory: multiples k; merged into the defaults)")
    rank: PositiveInt = Field(4, description="LoRA rank")
    steps: PositiveInt = Field(3000, description="full-batch steps per run")
    bbc_docs: PositiveInt = Field(1000, le=2225, description="BBC News articles used (a fixed random subset)")
    max_length: PositiveInt = Field(128, description="tokens per article for the embeddings")
    hidden: PositiveInt = Field(64, description="hidden width of the MLP")
    seeds: PositiveInt = 1

    _merge = merged_with("constants", DEFAULT_CONSTANTS)


def _ce(logits, Y):
    """Mean cross-entropy per run for logits (K, N, C)."""
    K, N, C = logits.shape
    return F.cross_entropy(logits.reshape(K * N, C), Y.repeat(K), reduction="none").reshape(K, N).mean(1)


def _logistic(cfg, seed):
    from ..data import bbc_news, embed_texts

    texts, y = bbc_news()
    idx = np.sort(np.random.default_rng(0).permutation(len(texts))[: cfg.bbc_docs])
    X = torch.from_numpy(embed_texts([texts[i] for i in idx], cfg.max_length)).double()
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    Y = torch.from_numpy(y[idx])
    d, K = X.shape[1], 5
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(K, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    # Smoothness of mean cross-entropy in W: Hessian <= 1/2 lambda_max(X^T X / N) (softmax curvature <= 1/2).
    L = 0.5 * float(torch.linalg.eigvalsh(X.T @ X / len(X))[-1])
    layers = [(W0, torch.zeros(K, cfg.rank, dtype=torch.float64), torch.randn(cfg.rank, d, generator=g, dtype=torch.float64) / math.sqrt(d))]
    return layers, lambda Ws: _ce(X @ Ws[0].mT, Y), L


def _mlp(cfg, seed):
    from sklearn.datasets import load_digits

    Xn, y = load_digits(return_X_y=True)
    X = torch.from_numpy(Xn / 16.0)
    Y = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    d, h, K = X.shape[1], cfg.hidden, 10
    W1 = torch.randn(h, d, generator=g, dtype=torch.float64) * math.sqrt(2 / d)
    W2 = torch.randn(K, h, generator=g, dtype=torch.float64) * math.sqrt(1 / h)
    mk = lambda m, n: (torch.zeros(m, cfg.rank, dtype=torch.float64), torch.randn(cfg.rank, n, generator=g, dtype=torch.float64) / math.sqrt(n))
    layers = [(W1, *mk(h, d)), (W2, *mk(K, h))]
    return layers, lambda Ws: _ce(torch.relu(X @ Ws[0].mT) @ Ws[1].mT, Y), None


PROBLEMS = {"logistic-bbc": _logistic, "mlp-digits": _mlp}


def _step_sizes(rule, c, L, V2, gW, loss, gJ2):
    if rule == "theory":
        return c * torch.clamp(1.0 / (4 * math.sqrt(2) * L * (V2 + gW)), max=1.0)
    if rule == "constant":
        return c * torch.ones_like(V2)
    if rule == "practical-gradW":
        return torch.clamp(c / (V2 + gW), max=1.0)
    if rule == "practical-loss":
        return torch.clamp(c / (V2 + loss.clamp_min(0).sqrt()), max=1.0)
    if rule == "practical-grad":
        return torch.clamp(c / gJ2.clamp_min(1e-300) ** 0.25, max=1.0)  # c / ||grad J||^(1/2)
    raise ValueError(rule)


def _log_times(steps: int) -> set[int]:
    return set(np.unique(np.round(np.logspace(0, np.log10(steps), 160)).astype(int)).tolist()) | {0, steps}


FLAT = 0.05  # |power-law exponent| below which min ||grad J||^2 counts as flat (no decay measured)


def fit_rate(T: np.ndarray, y: np.ndarray) -> dict:
    """min ||grad J||^2 against T: one-constant fits a/log T and a/T (RMS misfit in decades), the
    free power-law exponent, and whether the curve is flat (then a/log T, the flatter of the two
    forms, fits it better whatever the rate: no evidence either way)."""
    out = {}
    for name, f in (("logT", 1 / np.log(T)), ("T", 1 / T)):
        r = np.log10(y) - np.log10(f)
        out[name] = float(np.sqrt(np.mean((r - r.mean()) ** 2)))
    out["exponent"] = float(np.polyfit(np.log(T), np.log(y), 1)[0])
    out["flat"] = abs(out["exponent"]) < FLAT
    return out


def fit_text(r) -> str:
    """A fitted run's rule, exponent and misfits, the misfits compared only where the curve decays."""
    fit = (f"flat (|exponent| < {FLAT:g}: no decay, so neither rate is tested)" if r.flat
           else f"misfit 1/T {r['T']:.2f} vs 1/log T {r.logT:.2f} decades")
    return f"{r.rule} {'k' if r.rule == 'theory' else 'c'}={r.c:g}: T^{r.exponent:+.2f}, {fit}"


def rate_text(r) -> str:
    """One fitted run for the report, with the growth of ||V_t||^2."""
    return f"{fit_text(r)}; ||V||^2 {r.v0:.3g} -> {r.v1:.3g} (~t^{r.vexp:.2f} late)"


class LoraGDRate(Experiment):
    name = "lora-gd-rate"
    summary = "LoRA GD step sizes (Mu & Klabjan): descent at the theory step, its margin, and the measured rate"
    Config = Config
    QUICK = dict(steps=800, bbc_docs=600, max_length=64, constants={"theory": [1, 4, 16, 64, 256, 1024, 4096]})

    def prepare(self, cfg):
        if "logistic-bbc" in cfg.problems:  # embed once in the parent, workers read the cache
            from ..data import bbc_news, embed_texts

            texts, _ = bbc_news()
            idx = np.sort(np.random.default_rng(0).permutation(len(texts))[: cfg.bbc_docs])
            embed_texts([texts[i] for i in idx], cfg.max_length)

    def prepare_cost(self, cfg):
        return 60.0 * cfg.bbc_docs / 2225 * cfg.max_length / 128 if "logistic-bbc" in cfg.problems else 0.0

    CHUNK = 5  # constants per case: the long list of theory multiples is split over cases

    def cases(self, cfg):
        out = []
        for s in range(cfg.seeds):
            for p in cfg.problems:
                for r in cfg.rules:
                    if r == "theory" and p != "logistic-bbc":  # the theory rule needs the smoothness constant
                        continue
                    n = len(cfg.constants[r])
                    out += [dict(problem=p, rule=r, seed=s, part=i) for i in range((n + self.CHUNK - 1) // self.CHUNK)]
        return out

    def _constants(self, cfg, case):
        return [float(c) for c in cfg.constants[case["rule"]]][case["part"] * self.CHUNK:(case["part"] + 1) * self.CHUNK]

    def case_cost(self, cfg, case):
        # seconds per run and step on one core of the reference machine (measured; mostly fixed overhead)
        per_step = 4e-3 if case["problem"] == "logistic-bbc" else 8e-3
        return 0.5 + per_step * cfg.steps * len(self._constants(cfg, case))

    def run_case(self, cfg, case):
        layers, forward, L = PROBLEMS[case["problem"]](cfg, case["seed"])
        cs = self._constants(cfg, case)
        K = len(cs)
        W0s = [w for w, _, _ in layers]
        params = [t.expand(K, *t.shape).clone().requires_grad_() for _, B, A in layers for t in (B, A)]
        cvec = torch.tensor(cs, dtype=torch.float64)

        def evaluate():
            Ws = [W0 + params[2 * i] @ params[2 * i + 1] for i, W0 in enumerate(W0s)]
            loss = forward(Ws)
            grads = torch.autograd.grad(loss.sum(), params + Ws)
            gJ2 = sum((g**2).sum((-2, -1)) for g in grads[: len(params)])
            gW = sum((g**2).sum((-2, -1)) for g in grads[len(params):]).sqrt()
            return loss.detach(), grads[: len(params)], gJ2, gW

        loss, grads, gJ2, gW = evaluate()
        J0 = loss.clone()
        alive = torch.ones(K, dtype=torch.bool)
        zeros = lambda: torch.zeros(K, dtype=torch.int64)
        viol, incr, first, died = zeros(), zeros(), zeros() - 1, zeros() - 1
        sum_eta = torch.zeros(K, dtype=torch.float64)
        min_g2 = gJ2.clone()
        log_at = _log_times(cfg.steps)
        rows = []
        for t in range(cfg.steps + 1):
            V2 = sum((p.detach() ** 2).sum((-2, -1)) for p in params)
            eta = torch.where(alive, _step_sizes(case["rule"], cvec, L, V2, gW, loss, gJ2), 0.0)
            min_g2 = torch.minimum(min_g2, gJ2)
            if t in log_at:
                for k in torch.nonzero(alive | (died == t)).flatten().tolist():
                    rows.append(dict(kind="t", run=k, c=cs[k], t=t, loss=float(loss[k]), gradJ2=float(gJ2[k]),
                                     min_g2=float(min_g2[k]), V2=float(V2[k]), eta=float(eta[k]), sum_eta=float(sum_eta[k])))
            if t == cfg.steps or not bool(alive.any()):
                break
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(eta[:, None, None] * torch.nan_to_num(g))
            new, grads, new_g2, gW = evaluate()
            sum_eta += eta
            blew = alive & (~torch.isfinite(new) | (new > 1e3 * J0))
            died[blew] = t + 1
            alive &= ~blew
            bad = alive & (new > loss - eta / 4 * gJ2 + 1e-12 * loss.abs())
            viol += bad
            first[bad & (first < 0)] = t
            incr += alive & (new > loss)
            loss, gJ2 = new, new_g2
        for k in range(K):
            rows.append(dict(kind="run", run=k, c=cs[k], L=L if L else math.nan, J0=float(J0[k]), steps=cfg.steps,
                             violations=int(viol[k]), increases=int(incr[k]), first_violation=int(first[k]),
                             diverged_at=int(died[k]), sum_eta=float(sum_eta[k])))
        return rows

    def describe(self, df, cfg):
        runs = df[df.kind == "run"]
        return (f"Full-batch LoRA gradient descent for {cfg.steps} steps on {len(cfg.problems)} problem(s), {len(runs)} runs: "
                f"the sufficient-descent inequality at every step for the theory step and multiples of it up to "
                f"{max(cfg.constants['theory']):g}, and min_(t<T) ||grad J||^2 and ||V_t||^2 against T for every step rule.")

    def report(self, df, cfg, out: Path):
        claims, figs = [], []
        runs = df[df.kind == "run"]
        ts = df[df.kind == "t"].sort_values("t")
        th = runs[(runs.rule == "theory") & (runs.problem == "logistic-bbc")]
        if len(th):
            one = th[th.c == 1.0]
            if len(one):
                v = int(one.violations.sum())
                ok = v == 0 and (one.diverged_at < 0).all()
                claims.append(Claim(
                    "logistic-bbc, theory step: J(V+) <= J(V) - eta/4 ||grad J||^2 at every step",
                    "0 violations (the descent lemma at eta = 1/(4 sqrt(2) L (||V||^2 + ||grad_W L||)))",
                    f"{v} violations in {int(one.steps.sum())} steps",
                    bool(ok), "Mu & Klabjan (arXiv 2512.18248)",
                    note=("Implied, not tested on its own: telescoping the inequality gives min_(t<T) ||grad J||^2 <= "
                          "4 (J0 - L*) / sum_(t<T) eta_t at every T (the dashed line in the plot).")
                    + ("" if ok else f" The inequality failed at {v} steps (first at step {int(one.first_violation.min())}).")))
            ks = th.groupby("c").agg(viol=("violations", "sum"), inc=("increases", "sum"), div=("diverged_at", "max")).reset_index().sort_values("c")
            good_suff = ks[(ks.viol == 0) & (ks["div"] < 0)].c
            good_plain = ks[(ks.inc == 0) & (ks["div"] < 0)].c

            def largest(good):
                if good.empty:
                    return "none"
                k = float(good.max())
                nxt = ks[ks.c > k].c
                edge = " (the largest multiple of the grid: the margin may be larger)" if nxt.empty else f" (next multiple {nxt.min():g} fails)"
                return f"{k:g}x{edge}"

            claims.append(Claim(
                "logistic-bbc: margin of the theory step (multiples k x eta_theory)",
                "reported: the largest k with descent at every step",
                f"sufficient descent (J+ <= J - eta/4 ||grad J||^2) up to {largest(good_suff)}; plain descent (J+ <= J) up to "
                f"{largest(good_plain)}; violations per k: " + ", ".join(f"{r.c:g}: {int(r.viol)}" + (f" (diverged at {int(r['div'])})" if r['div'] >= 0 else "")
                                                                       for _, r in ks.iterrows()),
                None, "Mu & Klabjan"))
        # the measured rate, per run that did not diverge
        fits, stuck = [], []
        for (p, rule, c), g in ts.groupby(["problem", "rule", "c"]):
            run = runs[(runs.problem == p) & (runs.rule == rule) & (runs.c == c)]
            if (run.diverged_at >= 0).any():
                continue
            if gave_back_progress(g.loss):
                stuck.append(f"{p} {rule} c={c:g} (lost most of its progress: loss {g.loss.iloc[0]:.4g} -> best {g.loss.min():.4g} "
                             f"at step {int(g.t[g.loss.idxmin()])} -> {g.loss.iloc[-1]:.4g} at the end)")
                continue
            g = g[g.t >= 10]
            if (g.min_g2 <= 0).any():  # an exactly stationary point: no rate to fit
                stuck.append(f"{p} {rule} c={c:g} (gradient exactly zero from step {int(g[g.min_g2 <= 0].t.min())}, "
                             f"loss {g.loss.iloc[-1]:.4g})")
                continue
            if len(g) < 5:
                continue
            f = fit_rate(g.t.to_numpy(float) + 1, g.min_g2.to_numpy())  # min_g2 at step t is the min over steps < T = t + 1
            v = g.V2.to_numpy()
            tt = g.t.to_numpy(float)
            vexp = float(np.polyfit(np.log(tt[len(tt) // 2:]), np.log(v[len(v) // 2:]), 1)[0])
            fits.append(dict(problem=p, rule=rule, c=c, **f, v0=v[0], v1=v[-1], vexp=vexp))
        fits = pd.DataFrame(fits)
        if len(fits):
            save_csv(fits, out, "rate_fits.csv")
            for p, g in fits.groupby("problem"):
                sel = g[(g.rule != "theory") | g.c.isin([1.0, g[g.rule == "theory"].c.max()])]
                claims.append(Claim(
                    f"{p}: the rate of min_(t<T) ||grad J||^2, with the growth of ||V_t||^2",
                    "reported: the bound gives O(1/log T) when ||V_t||^2 grows like t and O(1/T) when ||V_t|| stays bounded",
                    "; ".join(rate_text(r) for _, r in sel.iterrows()),
                    None, "Mu & Klabjan",
                    note="Fits over T >= 10: one constant each for a/T and a/log T (misfit = RMS of the log10 residual) and a "
                         f"free power law T^b. A flat curve (|b| < {FLAT:g}) fits a/log T better than a/T only because 1/log T is "
                         "the flatter of the two, so its misfits are not compared. Diverged runs are left out."
                         + (" Left out as well, runs that reached an exactly zero gradient or gave back most of their decrease of the loss: " + "; ".join(
                             x for x in stuck if x.startswith(p)) + "." if any(x.startswith(p) for x in stuck) else "")))
        div = runs[runs.diverged_at >= 0]
        if len(div):
            claims.append(Claim("runs that diverged (stopped when the loss exceeded 1000 J0 or was not finite)", "reported",
                                ", ".join(f"{r.problem} {r.rule} c={r.c:g} at step {int(r.diverged_at)}" for r in div.itertuples()), None))
        for p in ts.problem.unique():
            fig, ax = plt.subplots(1, 3, figsize=(17, 4.4))
            sub = ts[ts.problem == p]
            groups = [(key, g) for key, g in sub.groupby(["rule", "c"])
                      if key[0] != "theory" or key[1] in (1.0, 16.0, 256.0, sub[sub.rule == "theory"].c.max())]
            styles = curve_styles(len(groups))
            for i, ((rule, c), g) in enumerate(groups):
                lab = f"{rule} {'k' if rule == 'theory' else 'c'}={c:g}"
                ax[0].loglog(g.t + 1, g.loss, label=lab, **styles[i])
                ax[1].loglog(g.t + 1, g.min_g2, label=lab, **styles[i])
                ax[2].loglog(g.t + 1, g.V2, label=lab, **styles[i])
                if rule == "theory" and c == 1.0:
                    J0 = g.loss.iloc[0]
                    ok = g.sum_eta > 0
                    ax[1].loglog(g.t[ok], 4 * J0 / g.sum_eta[ok], "k--", label="4 J0 / sum eta (theory, k=1)")  # sum over t < T = t
            ax[0].set(xlabel="t + 1", ylabel="loss J(V_t)", title=p)
            ax[1].set(xlabel="T (the minimum is over steps t < T)", ylabel="min_(t<T) ||grad J||^2")
            ax[2].set(xlabel="t + 1", ylabel="||V_t||^2")
            ax[0].legend(fontsize=6, ncol=2)
            ax[1].legend(fontsize=6)
            figs.append(save_fig(fig, out, f"rate_{p}.png"))
        return claims, figs

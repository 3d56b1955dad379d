"""Learning-rate sensitivity on pretrained networks: ODELoRA's integrators against the usual LoRA
optimizers, at one budget of gradient evaluations.

Every run starts from PEFT's default LoRA start (B = 0, A Kaiming-uniform, the same in every run)
on a task of ``lab/tasks.py`` and trains until ``budget`` gradient evaluations (one forward and
backward pass on a batch; an RK4 step costs 4) are spent, on the same batches for every method
and rate of a seed. Per run: held-out accuracy at points along the budget. The report gives, per
method, the median (and min-max over seeds) final accuracy for every rate of its grid, the curve
of the best rate against gradient evaluations, and how wide a range of rates stays close to the
best.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from ..core import Claim, Experiment, NonEmpty, fmt, merged_with
from ..methods import ModelMethodName
from ..tasks import TaskName, TaskSpec, build_task, train_lora
from ._common import save_fig

_ODE = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
_ADAM = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
DEFAULT_GRIDS = {
    "odelora-euler": _ODE, "odelora-rk4": _ODE, "odelora-adaptive": _ODE, "odelora-adam": _ADAM,
    "adamw": _ADAM, "lora-plus": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "scaled-adamw": _ADAM, "balora": _ADAM,
}
CLOSE = 0.01  # "close to the best": within one accuracy point


class Config(TaskSpec):
    tasks: NonEmpty(TaskName) = Field(["vision", "bbc"], description="vision: ViT Fashion-MNIST -> MNIST digits; bbc: MiniLM on BBC News")
    methods: NonEmpty(ModelMethodName) = Field(list(DEFAULT_GRIDS), description="methods compared")
    grids: dict[ModelMethodName, NonEmpty(PositiveFloat)] = Field(DEFAULT_GRIDS, description="learning rates per method (merged into the defaults)")
    budget: PositiveInt = Field(400, description="gradient evaluations per run")
    batch: PositiveInt = Field(32, description="batch size")
    evals: PositiveInt = Field(8, description="held-out evaluations per run")

    _merge = merged_with("grids", DEFAULT_GRIDS)


class Sensitivity(Experiment):
    name = "sensitivity"
    summary = "real networks: held-out accuracy vs gradient evaluations and vs the learning rate, ODELoRA against AdamW, LoRA+, scaled AdamW, BaLoRA"
    Config = Config
    SUITE = "real"
    QUICK = dict(seeds=3, budget=80, batch=32, evals=2, pretrain_epochs=2.0, digits_train=2000, bbc_train=600, bbc_eval=300,
                 tasks=["vision", "bbc"], methods=["odelora-euler", "odelora-rk4", "odelora-adam", "adamw", "lora-plus", "balora"],
                 grids={m: v[::2] for m, v in DEFAULT_GRIDS.items()})

    def prepare(self, cfg):
        for t in cfg.tasks:
            build_task(t, cfg)

    def prepare_cost(self, cfg):
        return 60.0

    def cases(self, cfg):
        return [dict(task=t, method=m, seed=s) for t in cfg.tasks for m in cfg.methods for s in range(cfg.seeds)]

    def case_cost(self, cfg, case):
        return len(cfg.grids[case["method"]]) * cfg.budget * {"vision": 0.02, "bbc": 0.08}[case["task"]] * cfg.batch / 32

    def run_case(self, cfg, case):
        task = build_task(case["task"], cfg)
        start = {k: v.detach().clone() for k, v in task.model.named_parameters() if v.requires_grad}
        rows = []
        for lr in cfg.grids[case["method"]]:
            with torch.no_grad():
                for k, v in task.model.named_parameters():
                    if k in start:
                        v.copy_(start[k])
            out, status = train_lora(task, case["method"], lr, seed=case["seed"], batch=cfg.batch, budget=cfg.budget, evals=cfg.evals)
            rows += [dict(r, lr=lr, status=status) for r in out]
        return rows

    def describe(self, df, cfg):
        runs = df.groupby(["task", "method", "seed", "lr"]).ngroups
        return (f"{runs} runs of LoRA rank {cfg.rank} on {', '.join(cfg.tasks)}: {len(cfg.methods)} methods, "
                f"{min(len(cfg.grids[m]) for m in cfg.methods)}+ learning rates each, {cfg.seeds} seeds, "
                f"{cfg.budget} gradient evaluations of batch {cfg.batch} per run.")

    def report(self, df, cfg, out: Path):
        claims, figs = [], []
        fin = df.sort_values("nfe").groupby(["task", "method", "seed", "lr"], as_index=False).tail(1)
        agg = fin.groupby(["task", "method", "lr"]).agg(acc=("eval_acc", "median"), lo=("eval_acc", "min"), hi=("eval_acc", "max"),
                                                         div=("status", lambda s: int((s != "done").sum()))).reset_index()
        start_acc = df[df.nfe == 0].groupby("task").eval_acc.median()
        tasks = list(agg.task.unique())
        for t in tasks:
            sub = agg[agg.task == t]
            best = sub.loc[sub.groupby("method").acc.idxmax()].set_index("method")
            rows, summary = ["| method | best lr | median acc (min-max) | rates within 1 point of best | range over grid | diverged runs |",
                             "|---|---|---|---|---|---|"], {}
            edge = []
            for m in [m for m in cfg.methods if m in best.index]:
                g = sub[sub.method == m].sort_values("lr")
                b = best.loc[m]
                close = int((g.acc >= b.acc - CLOSE).sum())
                spread = float(g.acc.max() - g.acc.min())
                summary[m] = dict(acc=float(b.acc), close=close, n=len(g), spread=spread)
                rows.append(f"| {m} | {b.lr:g} | {b.acc:.4f} ({b.lo:.4f}-{b.hi:.4f}) | {close} of {len(g)} | {spread:.4f} | {int(g['div'].sum())} |")
                if len(g) >= 3 and b.lr in (g.lr.min(), g.lr.max()):
                    edge.append(f"{m} ({b.lr:g})")
            table = "\n".join(rows)
            claims.append(Claim(
                f"{t}: best held-out accuracy per method at {cfg.budget} gradient evaluations",
                f"reported (start: {fmt(start_acc.get(t, math.nan), '.4f')} held-out accuracy before fine-tuning)",
                "; ".join(f"{m} {v['acc']:.4f}" for m, v in summary.items()), None, table=table,
                note="" if not edge else "best rate at an end of the grid (the best may lie outside it): " + ", ".join(edge)))
            ode = {m: v for m, v in summary.items() if m.startswith("odelora")}
            if ode and "adamw" in summary:
                bo = max(ode, key=lambda m: ode[m]["acc"])
                ok = ode[bo]["acc"] >= summary["adamw"]["acc"]
                claims.append(Claim(
                    f"{t}: ODELoRA (best integrator) reaches AdamW's held-out accuracy at the same gradient evaluations",
                    "best median accuracy of an ODELoRA method >= AdamW's", f"{bo} {ode[bo]['acc']:.4f} vs AdamW {summary['adamw']['acc']:.4f}",
                    bool(ok), "Gao & Tan (ODELoRA)",
                    note="" if ok else f"AdamW's best rate ends {summary['adamw']['acc'] - ode[bo]['acc']:.4f} higher in held-out accuracy"))
                for m in ode:
                    a, w = ode[m], summary["adamw"]
                    ok = a["close"] / a["n"] >= w["close"] / w["n"] and a["spread"] <= w["spread"]
                    claims.append(Claim(
                        f"{t}: {m} is less sensitive to the learning rate than AdamW",
                        "a share of grid rates within 1 point of the best at least AdamW's, and a range over the grid at most AdamW's",
                        f"{m}: {a['close']} of {a['n']} rates close, range {a['spread']:.4f}; AdamW: {w['close']} of {w['n']}, range {w['spread']:.4f}",
                        bool(ok), "Gao & Tan (ODELoRA)",
                        note="" if ok else "by the measured counts and ranges above, AdamW's accuracy depends less on its rate "
                                           "(each grid spans two decades around the method's usual rates)"))
        # figures: accuracy vs rate; accuracy vs gradient evaluations at the best rate
        fig, ax = plt.subplots(len(tasks), 2, figsize=(13, 4.2 * len(tasks)), squeeze=False)
        colors = {m: f"C{i}" for i, m in enumerate(cfg.methods)}
        for i, t in enumerate(tasks):
            sub = agg[agg.task == t]
            for m, g in sub.groupby("method"):
                g = g.sort_values("lr")
                ls = "-" if m.startswith("odelora") else "--"
                ax[i, 0].errorbar(g.lr, g.acc, yerr=[g.acc - g.lo, g.hi - g.acc], fmt="o" + ls, color=colors.get(m), capsize=2, label=m)
                blr = g.loc[g.acc.idxmax(), "lr"]
                cur = df[(df.task == t) & (df.method == m) & (df.lr == blr)].groupby("nfe").eval_acc.agg(["median", "min", "max"]).reset_index()
                ax[i, 1].plot(cur.nfe, cur["median"], ls, color=colors.get(m), label=f"{m} (lr {blr:g})")
                ax[i, 1].fill_between(cur.nfe, cur["min"], cur["max"], color=colors.get(m), alpha=0.12)
            ax[i, 0].set_xscale("log")
            ax[i, 0].set(xlabel="learning rate", ylabel=f"held-out accuracy after {cfg.budget} grad evals", title=f"{t}: median, min-max over seeds")
            ax[i, 1].set(xlabel="gradient evaluations", ylabel="held-out accuracy", title=f"{t}: best rate of each method")
            ax[i, 0].legend(fontsize=7)
            ax[i, 1].legend(fontsize=7)
        figs.append(save_fig(fig, out, "sensitivity.png"))
        return claims, figs

"""Fine-tune all-MiniLM-L6-v2 on BBC News topics with LoRA: the methods of the lab's table side by
side, the way a user would fine-tune (``odelora finetune`` is a shortcut for this experiment).

The ``bbc`` task of ``lab/tasks.py`` with every layer adapted by default: PEFT LoRA (r = 8,
``lora_alpha`` 16) on query, key, value and attention output of the top ``layers`` layers (6: all,
24 pairs) and a new linear head on mean-pooled tokens, trained with the factors (``head="train"``:
ODELoRA's methods move it with their AdamW companion at ``head_lr``, the other methods with their
own optimizer at their own rate). 400 articles held out (the fixed split), training on the others;
no dropout, so every stage of an RK step evaluates the same function on the step's batch. The
start (factors and head) is the same in every run; a seed sets the order of the batches, the same
for every method and rate. Each case is one method, one rate, one seed, trained for ``steps``
optimizer steps: held-out accuracy and loss against steps and gradient evaluations (one forward
and backward pass on a batch; an RK4 step costs 4). The report takes each method's best rate
(median over seeds), compares ODELoRA's best integrator with AdamW after the same steps and, where
some integrator takes several stages per step, with AdamW's gradient evaluations, and plots
held-out accuracy against gradient evaluations at each method's best rate.

``sensitivity`` asks a different question on the same data (a frozen probe head, a budget of
gradient evaluations, how accuracy depends on the rate); this experiment is the user-facing run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from ..core import Claim, Experiment, ExperimentConfig, Folder, NonEmpty, fmt, merged_with
from ..methods import ModelMethodName
from ..tasks import TaskSpec, build_task, train_lora
from ._common import save_fig

# the names ``odelora finetune`` used before it became a lab experiment, and the lab's names for them
RENAMED = {"loraplus": "lora-plus", "riemannian": "scaled-adamw"}
DEFAULT_METHODS = ["odelora-euler", "odelora-rk4", "odelora-adam", "adamw", "lora-plus", "scaled-adamw"]
DEFAULT_GRIDS = {
    "odelora-euler": [0.02, 0.05, 0.1], "odelora-heun": [0.05], "odelora-rk4": [0.05], "odelora-adaptive": [0.05],
    "odelora-adam": [5e-4, 1e-3, 2e-3, 4e-3], "lora-gd": [0.02, 0.05, 0.1], "adamw": [5e-4, 1e-3, 2e-3],
    "lora-plus": [1e-4, 2e-4, 4e-4], "scaled-adamw": [5e-4, 1e-3, 2e-3], "balora": [5e-4, 1e-3, 2e-3],
}
STAGES = {"odelora-heun": 2, "odelora-rk4": 4, "odelora-adaptive": 4}  # gradient evaluations per step (adaptive: about)
CLOSE = 0.01  # "reached": within one accuracy point of the best final accuracy


def _old_name(name) -> str | None:
    return RENAMED.get(name) if isinstance(name, str) else None


class Config(ExperimentConfig):
    seeds: PositiveInt = Field(3, description="number of seeds (0, 1, ...); a seed sets the order of the batches, the start is the same")
    methods: NonEmpty(ModelMethodName) = Field(DEFAULT_METHODS, description="methods compared (lab names, see lab/methods.py)")
    grids: dict[ModelMethodName, NonEmpty(PositiveFloat)] = Field(DEFAULT_GRIDS, description="learning rates per method (merged into the defaults)")
    steps: PositiveInt = Field(200, description="optimizer steps per run (an RK4 step costs 4 gradient evaluations)")
    batch: PositiveInt = Field(16, description="batch size")
    max_length: PositiveInt = Field(64, le=108, description="tokens per article (title and first lines; every article has more)")
    eval_every: PositiveInt = Field(25, description="steps between held-out evaluations (and one at the end)")
    rank: PositiveInt = Field(8, description="LoRA rank")
    alpha: PositiveFloat = Field(16.0, description="PEFT lora_alpha (scaling alpha / rank)")
    layers: PositiveInt = Field(6, le=6, description="top MiniLM layers with LoRA (6: all; the layers below are cached)")
    head_lr: PositiveFloat = Field(2e-3, description="AdamW rate of the head for the ODELoRA methods (the others use their own rate)")
    train_docs: NonNegativeInt = Field(0, description="use only this many training articles (0: all not held out)")
    eval_docs: PositiveInt = Field(400, le=1000, description="held-out articles (the fixed split)")
    cache_dir: Folder = Field("runs/cache", description="cached MiniLM states below the adapted layers")

    _merge = merged_with("grids", DEFAULT_GRIDS)

    @field_validator("methods", "grids", mode="before")
    @classmethod
    def _lab_names(cls, v):
        for m in v if isinstance(v, (list, dict)) else []:
            if _old_name(m):
                raise ValueError(f"{m!r} is called {_old_name(m)!r} in the lab")
        return v

    def task_spec(self) -> TaskSpec:
        return TaskSpec(rank=self.rank, lora_alpha=self.alpha, bbc_layers=self.layers, bbc_max_length=self.max_length,
                        bbc_train=self.train_docs, bbc_eval=self.eval_docs, cache_dir=self.cache_dir)


class Finetune(Experiment):
    name = "finetune"
    summary = ("fine-tune all-MiniLM-L6-v2 with LoRA on BBC News topics: held-out accuracy vs steps and gradient "
               "evaluations, best rate per method, ODELoRA against AdamW")
    Config = Config
    SUITE = "real"
    QUICK = dict(seeds=2, steps=40, eval_every=10, max_length=32, eval_docs=200,
                 methods=["odelora-euler", "odelora-rk4", "odelora-adam", "adamw", "lora-plus"],
                 grids={"odelora-euler": [0.05, 0.1], "odelora-rk4": [0.05], "odelora-adam": [1e-3, 2e-3],
                        "adamw": [1e-3, 2e-3], "lora-plus": [2e-4]})

    def prepare(self, cfg):  # the cached states below the adapted layers, once before the workers start
        build_task("bbc", cfg.task_spec(), head="train")

    def prepare_cost(self, cfg):
        return 10.0 + 37.0 * cfg.max_length / 64

    def cases(self, cfg):
        return [dict(method=m, lr=lr, seed=s) for m in cfg.methods for lr in cfg.grids[m] for s in range(cfg.seeds)]

    def case_cost(self, cfg, case):
        # one thread, seconds of the reference machine: a gradient evaluation on 16 articles of 64 tokens
        # through 6 adapted layers 0.69 s, a held-out evaluation of 400 articles 9.2 s (measured at 32 and 64
        # tokens: both grow about linearly)
        size = cfg.max_length / 64 * cfg.layers / 6
        grad = 0.69 * size * cfg.batch / 16 * cfg.steps * STAGES.get(case["method"], 1)
        evals = 1 + len(set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) | {cfg.steps})
        return 1.5 + grad + 9.2 * size * cfg.eval_docs / 400 * evals

    def run_case(self, cfg, case):
        task = build_task("bbc", cfg.task_spec(), head="train")
        rows, status = train_lora(task, case["method"], case["lr"], seed=case["seed"], batch=cfg.batch, steps=cfg.steps,
                                  eval_every=cfg.eval_every, companion_lr=cfg.head_lr)
        return [dict(r, status=status) for r in rows]

    def describe(self, df, cfg):
        runs = df.groupby(["method", "lr", "seed"]).ngroups
        train = f"{cfg.train_docs} training articles" if cfg.train_docs else "every article not held out for training"
        return (f"{runs} runs of LoRA rank {cfg.rank} (alpha {cfg.alpha:g}) on query, key, value and attention output of "
                f"{'all 6' if cfg.layers == 6 else f'the top {cfg.layers}'} MiniLM layers plus a new linear head, on BBC News "
                f"({train}, {cfg.eval_docs} held out, {cfg.max_length} tokens each): {len(cfg.methods)} methods, "
                f"{min(len(cfg.grids[m]) for m in cfg.methods)}+ learning rates each, {cfg.seeds} seed(s), "
                f"{cfg.steps} optimizer steps of batch {cfg.batch}.")

    def report(self, df, cfg, out: Path):
        claims = []
        methods = [m for m in cfg.methods if m in set(df.method)]
        fin = df.sort_values("step").groupby(["method", "lr", "seed"], as_index=False).tail(1)
        agg = fin.groupby(["method", "lr"]).agg(
            acc=("eval_acc", "median"), lo=("eval_acc", "min"), hi=("eval_acc", "max"), loss=("eval_loss", "median"),
            nfe=("nfe", "median"), seeds=("seed", "nunique"), div=("status", lambda s: int((s != "done").sum()))).reset_index()
        best = (agg.assign(_loss=agg.loss.fillna(np.inf)).sort_values(["acc", "_loss"], ascending=[False, True])
                .groupby("method").head(1).set_index("method"))
        start = df[df.step == 0].eval_acc.median()
        seeds = int(agg.seeds.max())
        article = 1 / cfg.eval_docs

        # 1. each method at its best rate
        rows = ["| method | best lr | held-out accuracy, median (min-max) | held-out loss | gradient evaluations | accuracy at each rate |",
                "|---|---|---|---|---|---|"]
        edge, single = [], []
        for m in methods:
            b, g = best.loc[m], agg[agg.method == m].sort_values("lr")
            grid = ", ".join(f"{r.lr:g}: {r.acc:.4f}" for r in g.itertuples())
            rows.append(f"| {m} | {b.lr:g} | {b.acc:.4f} ({b.lo:.4f}-{b.hi:.4f}) | {fmt(b.loss, '.4f')} | {int(b.nfe)} | {grid} |")
            if len(g) == 1:
                single.append(m)
            elif b.lr in (g.lr.min(), g.lr.max()):
                edge.append(f"{m} ({b.lr:g})")
        notes = []
        if edge:
            notes.append("best rate at an end of its grid (a better one may lie outside it): " + ", ".join(edge))
        if single:
            notes.append("one rate only, not tuned: " + ", ".join(single))
        claims.append(Claim(
            f"held-out accuracy after {cfg.steps} optimizer steps at each method's best rate (median over {seeds} seed(s))",
            f"reported (before fine-tuning, with the new head: {fmt(start, '.4f')})",
            "; ".join(f"{m} {best.loc[m].acc:.4f} (lr {best.loc[m].lr:g}, {int(best.loc[m].nfe)} gradient evaluations)" for m in methods),
            None, table="\n".join(rows), note="; ".join(notes)))

        # 2-3. ODELoRA's best integrator against AdamW
        ode = [m for m in methods if m.startswith("odelora")]
        noise = (f"one held-out article is {article:.4f} of accuracy" + ("; these are single runs, so a gap of a point or "
                 "less is within run-to-run noise" if seeds == 1 else ""))
        if not ode or "adamw" not in methods:
            missing = "AdamW is not" if "adamw" not in methods else "no ODELoRA method is"
            claims.append(Claim("ODELoRA against AdamW", "reported", f"not compared: {missing} among the methods run", None))
        else:
            w = best.loc["adamw"]
            bo = max(ode, key=lambda m: (best.loc[m].acc, -best.loc[m].nfe))
            o = best.loc[bo]
            ok = bool(o.acc >= w.acc)
            more = (f"; {bo} spends {o.nfe / w.nfe:.3g} times AdamW's gradient evaluations for it" if o.nfe > w.nfe else "")
            claims.append(Claim(
                f"after the same {cfg.steps} optimizer steps on the same batches, ODELoRA's best integrator is at least as "
                "accurate on held-out articles as AdamW",
                "the best median held-out accuracy of an ODELoRA method >= AdamW's (each at its best rate)",
                f"{bo} {o.acc:.4f} (lr {o.lr:g}, {int(o.nfe)} gradient evaluations) vs AdamW {w.acc:.4f} (lr {w.lr:g}, "
                f"{int(w.nfe)})", ok, "Gao & Tan (ODELoRA)",
                note=(f"{bo} ends {o.acc - w.acc:+.4f} against AdamW" if ok else
                      f"AdamW ends {w.acc - o.acc:.4f} higher ({round((w.acc - o.acc) * cfg.eval_docs)} held-out articles)")
                + more + "; " + noise))
            if any(best.loc[m].nfe > w.nfe for m in ode):
                budget = w.nfe
                at = {}
                for m in ode:
                    cur = df[(df.method == m) & (df.lr == best.loc[m].lr) & (df.nfe <= budget)]
                    last = cur.sort_values("nfe").groupby("seed").tail(1)
                    at[m] = (float(last.eval_acc.median()), float(last.nfe.median()))
                bm = max(at, key=lambda m: at[m][0])
                ok = bool(at[bm][0] >= w.acc)
                claims.append(Claim(
                    f"given only AdamW's {int(budget)} gradient evaluations, ODELoRA's best integrator is at least as accurate "
                    "on held-out articles as AdamW",
                    "the best median held-out accuracy of an ODELoRA method at its last evaluation within AdamW's gradient "
                    "evaluations (each at its best rate after all steps) >= AdamW's",
                    "; ".join(f"{m} {a:.4f} (evaluated at {int(n)})" for m, (a, n) in at.items())
                    + f"; AdamW {w.acc:.4f} (at {int(budget)})",
                    ok, "Gao & Tan (ODELoRA)",
                    note=(f"{bm} is {at[bm][0] - w.acc:+.4f} against AdamW there" if ok else
                          f"within the same gradient evaluations AdamW is {w.acc - at[bm][0]:.4f} ahead of {bm}")
                    + "; a multi-stage integrator has taken a fraction of its steps at that point; " + noise))

        # 4. how soon each method gets close to the best final accuracy
        target = float(best.acc.max()) - CLOSE
        reach = {}
        for m in methods:
            cur = df[(df.method == m) & (df.lr == best.loc[m].lr)].groupby("nfe").eval_acc.median()
            hit = cur[cur >= target]
            reach[m] = int(hit.index.min()) if len(hit) else None
        claims.append(Claim(
            f"gradient evaluations until the median held-out accuracy first reaches {target:.4f} (one point below the best "
            "final median), at each method's best rate",
            f"reported (held-out accuracy is evaluated every {cfg.eval_every} steps)",
            "; ".join(f"{m} {v}" if v is not None else f"{m} not within {cfg.steps} steps" for m, v in reach.items()), None))
        falls = []
        for m in methods:
            cur = df[(df.method == m) & (df.lr == best.loc[m].lr)].groupby("step").eval_acc.median().sort_index()
            fall = (cur.shift(1) - cur).iloc[1:]
            if len(fall) and fall.max() > 0:
                k = cur.index.get_loc(fall.idxmax())
                falls.append(f"{m} {fall.max():.4f} ({cur.iloc[k - 1]:.4f} at step {cur.index[k - 1]} to {cur.iloc[k]:.4f} at "
                             f"step {cur.index[k]})")
            else:
                falls.append(f"{m} none")
        claims.append(Claim(
            "largest fall of the median held-out accuracy from one evaluation to the next, at each method's best rate",
            "reported (the comparisons above are at the last step; a curve can dip on the way)", "; ".join(falls), None))
        div = fin[fin.status != "done"]
        if len(div):
            claims.append(Claim("runs that diverged (a non-finite loss, or a failed ODELoRA step)", "reported",
                                ", ".join(f"{r.method} lr={r.lr:g} seed {r.seed} at step {r.step}" for r in div.itertuples()), None))

        # figure: accuracy against steps and gradient evaluations at the best rate; final accuracy against the rate
        fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
        for i, m in enumerate(methods):
            c, ls = f"C{i}", "-" if m.startswith("odelora") else "--"
            cur = df[(df.method == m) & (df.lr == best.loc[m].lr)]
            for j, x in enumerate(("step", "nfe")):
                s = cur.groupby(x).eval_acc.agg(["median", "min", "max"]).reset_index()
                ax[j].plot(s[x], s["median"], "o" + ls, ms=3, color=c, label=f"{m} (lr {best.loc[m].lr:g})")
                ax[j].fill_between(s[x], s["min"], s["max"], color=c, alpha=0.12)
            g = agg[agg.method == m].sort_values("lr")
            ax[2].errorbar(g.lr, g.acc, yerr=[g.acc - g.lo, g.hi - g.acc], fmt="o" + ls, color=c, capsize=2, label=m)
        title = f"MiniLM + LoRA r={cfg.rank}, BBC News ({cfg.eval_docs} held out)"
        ax[0].set(xlabel="optimizer steps", ylabel="held-out accuracy", title=f"{title}: best rate, median and min-max")
        ax[1].set(xlabel="gradient evaluations (forward + backward on a batch)", ylabel="held-out accuracy",
                  title="the same runs against gradient evaluations")
        ax[2].set_xscale("log")
        ax[2].set(xlabel="learning rate", ylabel=f"held-out accuracy after {cfg.steps} steps", title="every rate of the grids")
        for a in ax:
            a.legend(fontsize=7)
        return claims, [save_fig(fig, out, "finetune.png")]

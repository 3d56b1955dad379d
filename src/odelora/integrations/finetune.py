"""`odelora finetune`: LoRA fine-tuning of all-MiniLM-L6-v2 on BBC News topics (5 classes).

A fixed held-out split of 400 articles; LoRA (PEFT, r = 8) on query, key, value and the attention
output of all 6 layers (24 pairs) plus a trainable linear head on mean-pooled tokens. Dropout is
off so that every RK stage evaluates the same function on the step's batch. Every method sees the
same batches in the same order. Per run: held-out accuracy and loss against steps and gradient
evaluations (``runs.csv``), a summary with the best learning rate per method, and a plot.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write

METHODS = ["odelora-euler", "odelora-rk4", "odelora-adam", "adamw", "loraplus", "riemannian"]
DEFAULT_LRS = {
    "odelora-euler": [0.02, 0.05, 0.1],
    "odelora-rk4": [0.05],
    "odelora-adam": [5e-4, 1e-3, 2e-3],
    "adamw": [5e-4, 1e-3, 2e-3],
    "loraplus": [1e-4, 2e-4],
    "riemannian": [1e-3],
}
TARGETS = r".*\.(query|key|value|attention\.output\.dense)$"


def add_arguments(p) -> None:
    from ..lab.argtypes import nonnegative_int, out_dir, positive_float, positive_int

    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD",
                   help=f"methods to compare (default all: {', '.join(METHODS)})")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]", help="learning-rate grid for a method")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=64, help="tokens per article (title and first lines)")
    p.add_argument("--eval-every", type=positive_int, default=25)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--head-lr", type=positive_float, default=2e-3, help="AdamW rate of the head for the ODELoRA methods")
    p.add_argument("--train-docs", type=positive_int, default=None, help="use only this many training articles")
    p.add_argument("--eval-docs", type=positive_int, default=400, help="size of the fixed held-out split")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", type=out_dir, default="runs/finetune")
    p.add_argument("--no-progress", action="store_true")


class Classifier(torch.nn.Module):
    def __init__(self, encoder, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return loss, logits


def build_model(rank: int, alpha: float, seed: int, targets: str = TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from ..data import minilm_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    enc = AutoModel.from_pretrained(minilm_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Classifier(enc, 5)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, modules_to_save=["head"])
    return get_peft_model(model, cfg)


def make_optimizer(method: str, model, lr: float, head_lr: float):
    from .peft import create_odelora_optimizer

    if method == "odelora-euler":
        return create_odelora_optimizer(model, lr=lr, method="euler", companion_lr=head_lr)
    if method == "odelora-rk4":
        return create_odelora_optimizer(model, lr=lr, method="rk4", companion_lr=head_lr)
    if method == "odelora-adam":
        return create_odelora_optimizer(model, lr=lr, method="euler", preconditioner="adam", companion_lr=head_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0)
    if method == "riemannian":
        try:
            from peft.optimizers import create_riemannian_optimizer
        except ImportError:  # older PEFT: the scaled flow is the same preconditioning
            return create_odelora_optimizer(model, lr=lr, method="euler", flow="scaled", companion_lr=head_lr)
        return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def split(n_eval: int, n_train: int | None):
    from ..data import bbc_news

    texts, labels = bbc_news()
    perm = np.random.default_rng(1234).permutation(len(texts))  # the fixed held-out split
    ev, tr = perm[:n_eval], perm[n_eval:]
    if n_train is not None:
        tr = tr[:n_train]
    return texts, labels, tr, ev


@torch.no_grad()
def evaluate(model, enc, labels, idx, bs=64):
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(idx), bs):
        j = idx[i : i + bs]
        loss, logits = model(enc["input_ids"][j], enc["attention_mask"][j], labels[j])
        total_loss += float(loss) * len(j)
        correct += int((logits.argmax(-1) == labels[j]).sum())
    model.train()
    return correct / len(idx), total_loss / len(idx)


def run_one(method, lr, args, enc, labels, tr, ev, progress=None) -> list[dict]:
    from ..optim import ODELoRA

    model = build_model(args.rank, args.alpha, args.seed)
    model.train()
    opt = make_optimizer(method, model, lr, args.head_lr)
    order = np.random.default_rng(args.seed).permutation(np.concatenate([tr] * math.ceil(args.steps * args.batch_size / len(tr) + 1)))
    rows, nfe, t0 = [], 0, time.perf_counter()
    acc, eloss = evaluate(model, enc, labels, ev)
    rows.append(dict(method=method, lr=lr, step=0, nfe=0, train_loss=float("nan"), eval_acc=acc, eval_loss=eloss, seconds=0.0))
    for step in range(1, args.steps + 1):
        j = order[(step - 1) * args.batch_size : step * args.batch_size]
        ids, mask, y = enc["input_ids"][j], enc["attention_mask"][j], labels[j]

        def closure():
            opt.zero_grad()
            loss = model(ids, mask, y)[0]
            loss.backward()
            return loss

        if isinstance(opt, ODELoRA):
            loss = opt.step(closure)
            nfe += opt.last_step.nfe
        else:
            loss = closure()
            opt.step()
            nfe += 1
        if progress is not None:
            progress.update()
        if step % args.eval_every == 0 or step == args.steps:
            acc, eloss = evaluate(model, enc, labels, ev)
            rows.append(dict(method=method, lr=lr, step=step, nfe=nfe, train_loss=float(loss.detach()), eval_acc=acc,
                             eval_loss=eloss, seconds=time.perf_counter() - t0))
            if progress is not None:
                progress.set_postfix(acc=f"{acc:.3f}")
    return rows


def _grid(args) -> dict[str, list[float]]:
    grid = {m: list(DEFAULT_LRS[m]) for m in args.methods}
    for item in args.lr:
        if "=" not in item:
            raise SystemExit(f"--lr expects METHOD=LR[,LR...], got {item!r}")
        m, vals = item.split("=", 1)
        if m not in METHODS:
            raise SystemExit(f"--lr: unknown method {m!r}; choose from {', '.join(METHODS)}")
        try:
            grid[m] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise SystemExit(f"--lr {item}: learning rates must be numbers, e.g. {m}=1e-3,2e-3") from None
        if not all(0 < v < float("inf") for v in grid[m]):
            raise SystemExit(f"--lr {item}: learning rates must be positive")
    return {m: grid[m] for m in args.methods}


def summarize(rows: list[dict], out: Path) -> dict:
    import pandas as pd

    df = pd.DataFrame(rows)
    last = df.sort_values("step").groupby(["method", "lr"]).tail(1)
    best = last.sort_values(["eval_acc", "eval_loss"], ascending=[False, True]).groupby("method").head(1)
    summary = {r.method: dict(lr=r.lr, eval_acc=r.eval_acc, eval_loss=r.eval_loss, steps=int(r.step), nfe=int(r.nfe),
                              seconds=round(r.seconds, 1)) for r in best.itertuples()}
    grid = {m: {f"{r.lr:g}": r.eval_acc for r in g.itertuples()} for m, g in last.groupby("method")}
    atomic_write(out / "summary.json", json.dumps(dict(best=summary, final_accuracy_by_lr=grid), indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for m, s in summary.items():
        cur = df[(df.method == m) & (df.lr == s["lr"])].sort_values("step")
        ax[0].plot(cur.step, cur.eval_acc, "o-", ms=3, label=f"{m} (lr {s['lr']:g})")
        ax[1].plot(cur.nfe, cur.eval_acc, "o-", ms=3, label=m)
    ax[0].set(xlabel="optimizer steps", ylabel="held-out accuracy (400 articles)", title="MiniLM + LoRA r=8, BBC News")
    ax[1].set(xlabel="gradient evaluations (forward + backward)")
    ax[0].legend(fontsize=7)
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out / "accuracy.png", buf.getvalue())
    return summary


def main(args) -> int:
    grid = _grid(args)  # bad input fails here, before anything heavy is imported or loaded
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..data import minilm_path

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    texts, labels, tr, ev = split(args.eval_docs, args.train_docs)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    labels = torch.as_tensor(labels)
    runs_dir = out / "runs"
    rows: list[dict] = []
    total = sum(len(v) for v in grid.values()) * args.steps
    with tqdm(total=total, desc="finetune", unit="step", disable=args.no_progress, mininterval=2.0) as bar:
        for method, lrs in grid.items():
            for lr in lrs:
                f = runs_dir / f"{method}_lr{lr:g}_s{args.steps}_b{args.batch_size}_L{args.max_length}.json"
                if f.exists():  # finished earlier: resume without rerunning
                    rows += json.loads(f.read_text())
                    bar.update(args.steps)
                    continue
                bar.set_description(f"{method} lr={lr:g}")
                run = run_one(method, lr, args, enc, labels, tr, ev, progress=bar)
                atomic_write(f, json.dumps(run))
                rows += run
    import pandas as pd

    atomic_write(out / "runs.csv", pd.DataFrame(rows).to_csv(index=False))
    summary = summarize(rows, out)
    for m, s in summary.items():
        print(f"{m:14s} lr {s['lr']:<8g} held-out acc {s['eval_acc']:.4f} loss {s['eval_loss']:.4f} "
              f"({s['steps']} steps, {s['nfe']} gradient evaluations, {s['seconds']}s)")
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.json'}, {out / 'accuracy.png'}")
    return 0

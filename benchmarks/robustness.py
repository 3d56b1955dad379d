"""Where real training starts: ODELoRA from B = 0, with rank-1 gradients, in half precision, on wide
PINNs and on a transformer, for each retraction (how factors move).

    python benchmarks/robustness.py [--scenarios zero-start rank-one pinn minilm] [--retractions truncate split balance none]

Scenarios (each prints a table; --json FILE saves the rows):
  zero-start  the README problem (B = 0, rank-3 target), every method, float32 and float16:
              final / initial loss after 60 steps, accepted and skipped steps
  rank-one    a batch of one (rank-1 gradients) from PEFT's start, float64 to float16: the largest
              product move per step in units of h * max_j |G_j| (truncation guarantees <= 2), and
              the final / initial full-batch loss
  pinn        DeepXDE Poisson PINN pretrained with Adam, LoRA (r = 4) fine-tuning to a new source
              at the README's rate 2e-3, hidden widths 20 to 256: L2 error before and after,
              non-finite stages, skipped steps, factor growth
  minilm      all-MiniLM-L6-v2 with PEFT LoRA (24 pairs) on BBC News, the first 20 steps at
              lr 0.05: largest factor norm relative to the start, largest imbalance, loss
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

os.environ.setdefault("DDE_BACKEND", "pytorch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from odelora import ODELoRA
from odelora.integrations.peft import lora_pairs
from odelora.integrators import TABLEAUS
from odelora.retractions import RETRACTIONS

warnings.simplefilter("ignore")


def make(pairs, retraction, **kw):
    if retraction is not None:
        kw["retraction"] = retraction
    return ODELoRA(pairs, **kw)


def safe(fn):
    """Run a scenario case; an exception is a result too (reported as its type)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return {"error": type(exc).__name__}


def zero_start(retraction):
    rows = []
    for dtype in (torch.float32, torch.float16):
        for method in TABLEAUS:

            def case():
                torch.manual_seed(0)
                Y = torch.randn(30, 3) @ torch.randn(3, 20)
                B = torch.zeros(30, 3, dtype=dtype, requires_grad=True)
                A = (0.1 * torch.randn(3, 20)).to(dtype).requires_grad_()
                opt = make([(B, A)], retraction, lr=0.5, method=method)

                def closure():
                    opt.zero_grad()
                    loss = 0.5 * ((B.float() @ A.float() - Y) ** 2).sum()
                    loss.backward()
                    return loss

                l0 = float(closure().detach())
                for _ in range(60):
                    opt.step(closure)
                return dict(loss_ratio=float(closure().detach()) / l0, accepted=opt.stats.accepted, skipped=opt.stats.skipped, nfe=opt.stats.nfe)

            rows.append(dict(dtype=str(dtype).split(".")[1], method=method, **safe(case)))
    return rows


def rank_one(retraction):
    rows = []
    m, n, r, s, lr = 48, 32, 8, 2.0, 0.01
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for method in ("euler", "rk4", "bs32", "dopri5"):

            def case():
                g = torch.Generator().manual_seed(0)
                W0 = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
                dW = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64) / n**0.5
                X = torch.randn(64, n, generator=g, dtype=torch.float64)
                Yt = X @ (W0 + dW).T
                B = torch.zeros(m, r, dtype=dtype, requires_grad=True)
                A = (torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5).to(dtype).requires_grad_()
                opt = make([(B, A, s)], retraction, lr=lr, method=method)
                tab = TABLEAUS[method]

                def full():
                    return float(0.5 * ((X @ (W0 + s * B.detach().double() @ A.detach().double()).T - Yt) ** 2).mean(0).sum())

                l0, worst = full(), 0.0
                for i in range(120):
                    x, y = X[i % 64 : i % 64 + 1], Yt[i % 64 : i % 64 + 1]
                    gn = []

                    def closure():
                        opt.zero_grad()
                        res = x @ (W0 + s * B.double() @ A.double()).T - y
                        gn.append(float((res.T @ x).norm()))
                        loss = 0.5 * (res**2).sum()
                        loss.backward()
                        return loss

                    X0 = s * B.detach().double() @ A.detach().double()
                    opt.step(closure)
                    moved = float((s * B.detach().double() @ A.detach().double() - X0).norm())
                    ratio = moved / (lr * sum(abs(b) for b in tab.b) * max(gn))
                    worst = max(worst, ratio) if math.isfinite(ratio) else math.inf
                return dict(worst_move=worst, loss_ratio=full() / l0, skipped=opt.stats.skipped, nonfinite=opt.stats.nonfinite)

            rows.append(dict(dtype=str(dtype).split(".")[1], method=method, **safe(case)))
    return rows


def pinn(retraction, widths=(20, 64, 128, 256), iterations=200):
    import deepxde as dde

    from odelora.integrations.deepxde import add_lora

    def problem(a):
        geom = dde.geometry.Interval(-1, 1)

        def pde(x, u):
            return -dde.grad.hessian(u, x) - a * np.pi**2 * torch.sin(np.pi * x)

        bc = dde.icbc.DirichletBC(geom, lambda x: 0 * x, lambda x, on: on)
        return dde.data.PDE(geom, pde, bc, num_domain=64, num_boundary=2, solution=lambda x: a * np.sin(np.pi * x), num_test=100)

    def l2(model, a):
        x = np.linspace(-1, 1, 201)[:, None]
        return float(np.linalg.norm(model.predict(x) - a * np.sin(np.pi * x)) / np.linalg.norm(a * np.sin(np.pi * x)))

    rows = []
    for width in widths:
        dde.config.set_random_seed(0)
        net = dde.nn.FNN([1, width, width, width, 1], "tanh", "Glorot normal")
        pre = dde.Model(problem(1.0), net)
        pre.compile("adam", lr=1e-3)
        pre.train(iterations=2000, display_every=10**6, verbose=0)
        base = {k: v.clone() for k, v in net.state_dict().items()}
        for method in ("euler", "rk4", "bs32", "dopri5"):

            def case():
                dde.config.set_random_seed(0)
                n2 = dde.nn.FNN([1, width, width, width, 1], "tanh", "Glorot normal")
                n2.load_state_dict(base)
                add_lora(n2, r=4)
                model = dde.Model(problem(1.5), n2)
                pairs = lora_pairs(n2)
                a0 = max(float(p.A.norm()) for p in pairs)
                opt = make(pairs, retraction, lr=2e-3, method=method)
                model.compile(opt)
                err0 = l2(model, 1.5)
                t0 = time.perf_counter()
                model.train(iterations=iterations, display_every=10**6, verbose=0)
                growth = max(max(float(p.B.norm()), float(p.A.norm())) for p in pairs) / a0
                return dict(err0=err0, err1=l2(model, 1.5), nonfinite=opt.stats.nonfinite, skipped=opt.stats.skipped,
                            nfe=opt.stats.nfe, factor_growth=growth, seconds=time.perf_counter() - t0)

            rows.append(dict(width=width, method=method, **safe(case)))
    return rows


def minilm(retraction, steps=20):
    from odelora.lab.data import minilm_path  # fails early with a clear message
    from odelora.lab.tasks import bbc_split, minilm_classifier
    from odelora.integrations.peft import partition
    from transformers import AutoTokenizer

    texts, labels, tr, _ = bbc_split(400)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    idx = tr[: steps * 16]
    enc = tok([texts[i] for i in idx], truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    y = torch.as_tensor(labels[idx])
    rows = []
    for method in ("euler", "rk4", "bs32"):

        def case():
            model = minilm_classifier(8, 16.0, 0)
            model.train()
            part = partition(model)
            opt = make(part.pairs, retraction, lr=0.05, method=method, companion=[p for _, p, _ in part.others], companion_lr=2e-3)
            start = [max(float(p.B.norm()), float(p.A.norm())) for p in part.pairs]
            growth, imb, losses = 0.0, 0.0, []
            for t in range(steps):
                j = slice(16 * t, 16 * t + 16)

                def closure():
                    opt.zero_grad()
                    loss = model(enc["input_ids"][j], enc["attention_mask"][j], y[j])[0]
                    loss.backward()
                    return loss

                losses.append(float(opt.step(closure)))
                for p, s0 in zip(part.pairs, start):
                    B, A = p.B.detach().double(), p.A.detach().double()
                    growth = max(growth, max(float(B.norm()), float(A.norm())) / s0)
                    MB, MA = B.T @ B, A @ A.T
                    imb = max(imb, float((MB - MA).norm() / ((MB.norm() + MA.norm()) or 1.0)))
            return dict(factor_growth=growth, max_imbalance_after_step1=imb, loss_first=losses[0], loss_last=np.mean(losses[-5:]),
                        nonfinite=opt.stats.nonfinite, skipped=opt.stats.skipped)

        rows.append(dict(method=method, **safe(case)))
    return rows


SCENARIOS = {"zero-start": zero_start, "rank-one": rank_one, "pinn": pinn, "minilm": minilm}


def table(rows) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--retractions", nargs="+", default=[None], choices=sorted(RETRACTIONS), help="retractions to compare (default: each flow's own)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="write all rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for name in args.scenarios:
        for ret in args.retractions:
            t0 = time.perf_counter()
            rows = [dict(retraction=ret or "default", **r) for r in SCENARIOS[name](ret)]
            print(f"\n## {name}, retraction {ret or 'default'} ({time.perf_counter() - t0:.0f} s)\n\n{table(rows)}", flush=True)
            out += [dict(scenario=name, **r) for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

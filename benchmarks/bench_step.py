"""ODELoRA-Euler vs torch AdamW (foreach) on the PEFT MiniLM model (24 LoRA pairs, r = 8).

Side by side in one run, alternating the two optimizers so that both see the same machine state:
the time of ``optimizer.step()`` alone and of a whole training step (forward, backward, step).

    python benchmarks/bench_step.py [--repeats 30] [--batch-size 16] [--max-length 64]

Prints medians and the ratios ODELoRA / AdamW; targets: step <= 2x, whole step <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from odelora.integrations.peft import create_odelora_optimizer
from odelora.integrations.finetune import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models, opts = {}, {}
    for name in ("odelora", "adamw"):
        m = build_model(8, 16.0, 0)
        m.train()
        models[name] = m
        if name == "odelora":
            opts[name] = create_odelora_optimizer(m, lr=0.05, method="euler", companion_lr=1e-3, companion_kwargs={"foreach": True})
        else:
            opts[name] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, foreach=True)
    n_pairs = len(opts["odelora"].pairs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch_size, args.max_length), generator=g)
    mask = torch.ones_like(ids)
    y = torch.randint(0, 5, (args.batch_size,), generator=g)
    step_t = {k: [] for k in models}
    whole_t = {k: [] for k in models}
    for rep in range(args.repeats + 3):
        for name in ("odelora", "adamw") if rep % 2 == 0 else ("adamw", "odelora"):
            m, opt = models[name], opts[name]
            t0 = time.perf_counter()
            opt.zero_grad()
            m(ids, mask, y)[0].backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if rep >= 3:  # warm-up
                step_t[name].append(t2 - t1)
                whole_t[name].append(t2 - t0)
    med = {k: {"step_ms": 1e3 * statistics.median(step_t[k]), "whole_ms": 1e3 * statistics.median(whole_t[k])} for k in models}
    res = dict(
        pairs=n_pairs, batch=args.batch_size, max_length=args.max_length, threads=args.threads, repeats=args.repeats,
        odelora=med["odelora"], adamw=med["adamw"],
        step_ratio=med["odelora"]["step_ms"] / med["adamw"]["step_ms"],
        whole_ratio=med["odelora"]["whole_ms"] / med["adamw"]["whole_ms"],
    )
    print(json.dumps(res, indent=2))
    print(f"optimizer.step(): ODELoRA-Euler {med['odelora']['step_ms']:.2f} ms vs AdamW {med['adamw']['step_ms']:.2f} ms "
          f"-> {res['step_ratio']:.2f}x (target <= 2x)")
    print(f"whole training step: {med['odelora']['whole_ms']:.1f} ms vs {med['adamw']['whole_ms']:.1f} ms "
          f"-> {res['whole_ratio']:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()

"""ODELoRA under DDP and under FSDP2 (``fully_shard``) with 2 processes: step time, whole training
step time and peak memory per rank, and the bytes the optimizer's gathers move per step.

    python benchmarks/bench_distributed.py [--layers 8] [--width 1024] [--rank 8] [--steps 30]

Launches ``torchrun --standalone --nproc_per_node=2`` (gloo on CPU, nccl on CUDA) once per set-up.
The model: a stack of Linear layers with PEFT LoRA on every layer and a trainable head; batches of
32 per rank. Under FSDP2 each LoRA factor is gathered whole for the step (and each gradient at
each stage) and written back to the rank's own shard; no base weight is gathered by the optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(mode: str, layers: int, width: int, rank: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from odelora.integrations.peft import create_odelora_optimizer

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    r, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{r}" if cuda else "cpu")
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*mods, torch.nn.Linear(width, 10)).to(device)
    targets = [str(2 * i) for i in range(layers)]
    model = get_peft_model(net, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=[str(2 * layers)]))
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for i in range(layers):
            fully_shard(model.base_model.model[2 * i])
        fully_shard(model)
        forward = model
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    opt = create_odelora_optimizer(model, lr=0.05, method="euler", companion_lr=1e-3)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(32, width, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)
    step_t, whole_t = [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for k in range(steps + 3):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(forward(x), y).backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if k >= 3:
            step_t.append(t2 - t1)
            whole_t.append(t2 - t0)
    pairs = opt.pairs
    elems = sum(p.B.numel() + p.A.numel() for p in pairs)
    size = pairs[0].B.element_size()
    gathered = 0 if mode == "ddp" else 2 * elems * size * (world - 1) // world  # factors once + gradients per stage
    row = dict(mode=mode, rank=r, step_ms=1e3 * statistics.median(step_t), whole_ms=1e3 * statistics.median(whole_t),
               peak_MB=(torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
               lora_MB=elems * size / 2**20, optimizer_gather_MB_per_step=gathered / 2**20, pairs=len(pairs))
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if r == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.layers, args.width, args.rank, args.steps, args.worker[1])
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp2"):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                   "--layers", str(args.layers), "--width", str(args.width), "--rank", str(args.rank), "--steps", str(args.steps),
                   "--worker", mode, str(out)]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
            rows += json.loads(out.read_text())
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    print(f"{args.layers} layers of width {args.width}, LoRA r = {args.rank}, 2 processes, Euler\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()

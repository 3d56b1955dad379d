"""Worker for the DDP equivalence test: `torchrun --standalone --nproc_per_node=2 ddp_worker.py OUT METHOD STEPS [nowrap]`
(``nowrap``: the model left unwrapped, as a user who forgot DDP would).

Also importable: ``build`` and ``batches`` give the single-process reference the same model and data."""

import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from odelora.integrations.peft import create_odelora_optimizer


def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 2))
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], modules_to_save=["4"]))
    return model.double()  # initialized in float32 in every process, then promoted


def batches(steps, size=16):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(steps, size, 12, generator=g, dtype=torch.float64)
    return X, torch.sin(X[..., :2] * 2)


def train(model, forward, X, Y, method, lo=0, hi=None):
    opt = create_odelora_optimizer(model, lr=0.2, method=method, companion_lr=1e-2)
    for k in range(len(X)):
        xb, yb = X[k, lo:hi], Y[k, lo:hi]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(out, method, steps, wrap=True):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
    X, Y = batches(steps)
    half = X.shape[1] // world
    params = train(model, ddp, X, Y, method, rank * half, (rank + 1) * half)
    if rank == 0:
        torch.save(params, out)
    dist.barrier()
    # Leave without tearing down DDP's reducer and the gloo group: that teardown can deadlock on
    # the GIL at interpreter exit (the worker thread of the group waits for it while it is held).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), wrap=sys.argv[4:] != ["nowrap"])

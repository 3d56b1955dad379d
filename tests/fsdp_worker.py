"""Worker for the FSDP2 tests: ``torchrun --nproc_per_node=N fsdp_worker.py OUT MODE METHOD [CKPT]``.

MODE ``train``: a PEFT model sharded with ``fully_shard`` (``default`` placements, dim 0, which
splits A along r; or ``custom``: B along m, A along n) trains 6 steps on the ranks' halves of a
global batch; rank 0 saves the full parameters. MODE ``narrow``: as ``train``, with no
nonlinearity between the second LoRA layer and the 2-output head, so that layer's gradients have
rank 2 < r. MODE ``resume``: train 3 steps, save a distributed checkpoint, train 3 more, then
rebuild model and optimizer from scratch, load the checkpoint and train the last 3 steps again:
both endings are saved. MODE ``load``: load CKPT
(written with any number of ranks) and train 3 steps. MODE ``nanrank``: as ``train``, with a NaN
in one sample of rank 1's part of step 2. MODE ``fsdp1``: what building the optimizer
on FSDP1-wrapped copies of the model says (rank 0; FSDP1 is not supported).

Also importable: ``build``, ``batches`` and ``train`` give the single-process reference."""

import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from odelora.integrations.peft import create_odelora_optimizer

STEPS = 6


def build(narrow=False):
    torch.manual_seed(0)
    act = torch.nn.Identity() if narrow else torch.nn.Tanh()
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 20), act, torch.nn.Linear(20, 2))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"]))
    return model.double()


def batches(steps=STEPS, size=16):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(steps, size, 12, generator=g, dtype=torch.float64)
    return X, torch.sin(X[..., :2] * 2)


def optimizer(model, method):
    kw = dict(preconditioner="adam") if method == "adam" else dict(method=method)
    lr = 0.02 if method == "adam" else 0.2
    return create_odelora_optimizer(model, lr=lr, companion_lr=1e-2, **kw)


def train(model, opt, X, Y, steps, lo=0, hi=None):
    for k in steps:
        xb, yb = X[k, lo:hi], Y[k, lo:hi]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def sharded(placement, narrow=False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = build(narrow)
    if placement == "custom":  # B along its rows m, A along its columns n (r stays whole)
        fn = lambda p: Shard(1) if p.ndim == 2 and p.shape[0] < p.shape[1] else Shard(0)
        fully_shard(model, shard_placement_fn=fn)
    else:
        fully_shard(model)
    return model


def fsdp1_error():
    """What building the optimizer on an FSDP1-wrapped model says (``use_orig_params=True``: the
    only mode in which FSDP1 wraps a model with frozen base weights)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        create_odelora_optimizer(FullyShardedDataParallel(build(), device_id=torch.device("cpu"), use_orig_params=True), lr=0.1)
    except (NotImplementedError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


def main(out, mode, method, ckpt=None):
    from odelora.integrations.distributed import load_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "fsdp1":
        if rank == 0:
            torch.save({"error": fsdp1_error()}, out)
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    X, Y = batches()
    lo, hi = rank * (X.shape[1] // world), (rank + 1) * (X.shape[1] // world)
    result = {}
    placement = "custom" if mode == "custom" else "default"
    model = sharded(placement, narrow=mode == "narrow")
    opt = optimizer(model, method)
    if mode in ("train", "custom", "narrow"):
        train(model, opt, X, Y, range(STEPS), lo, hi)
        result["params"] = full_params(model)
    elif mode == "resume":
        train(model, opt, X, Y, range(3), lo, hi)
        save_checkpoint(ckpt, model, opt)
        train(model, opt, X, Y, range(3, STEPS), lo, hi)
        result["continued"] = full_params(model)
        model2 = sharded(placement)
        opt2 = optimizer(model2, method)
        load_checkpoint(ckpt, model2, opt2)
        train(model2, opt2, X, Y, range(3, STEPS), lo, hi)
        result["resumed"] = full_params(model2)
    elif mode == "nanrank":  # a NaN in one sample of rank 1's half of step 2's batch: every rank skips that step
        if rank == 1:
            X[2, lo, 0] = float("nan")
        train(model, opt, X, Y, range(STEPS), lo, hi)
        result.update(params=full_params(model), skipped=opt.stats.skipped)
    elif mode == "load":
        load_checkpoint(ckpt, model, opt)
        train(model, opt, X, Y, range(3, STEPS), lo, hi)
        result["params"] = full_params(model)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip process-group teardown, which can deadlock on the GIL at exit


if __name__ == "__main__":
    main(*sys.argv[1:])

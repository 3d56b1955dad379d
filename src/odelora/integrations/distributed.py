"""Checkpoints of distributed ODELoRA training (FSDP2 or DDP) with ``torch.distributed.checkpoint``.

    save_checkpoint("ckpt/step100", model, optimizer)    # every rank calls it
    load_checkpoint("ckpt/step100", model, optimizer)    # also with another number of ranks

The trainable parameters are saved as they are held: FSDP2's DTensor shards stay sharded, and
loading reshards them to the current ranks. The optimizer's state (the same on every rank: the
step is computed on gathered factors) is saved once. Frozen base weights are not part of the
checkpoint: reload them from where they came from.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from ..optim import ODELoRA

__all__ = ["save_checkpoint", "load_checkpoint"]


def _trainable(model: torch.nn.Module) -> dict:
    """Trainable parameters by name, without DDP's ``module.`` prefix: a checkpoint written from a
    DDP-wrapped model loads into the bare model (one process) and back."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _flat_optimizer(sd: dict) -> tuple[dict, str]:
    """Tensors under string keys, everything else (and the structure) as one JSON string."""
    leaves, spec = tree_flatten(sd)
    tensors = {str(i): t for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
    values = [None if isinstance(t, torch.Tensor) else t for t in leaves]
    return tensors, json.dumps({"spec": treespec_dumps(spec), "values": values})


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call without a process group that it assumes one process: here that is
    the intent, so that warning (only) is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: ODELoRA) -> None:
    """Write the trainable parameters and the optimizer state to ``path`` (a directory)."""
    tensors, meta = _flat_optimizer(optimizer.state_dict())
    with _single_process_ok():
        dcp.save({"model": _trainable(model), "optim": tensors, "optim_meta": meta}, checkpoint_id=str(path))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: ODELoRA) -> None:
    """Load what :func:`save_checkpoint` wrote into ``model`` (in place) and ``optimizer``.

    The model must have the same trainable parameters, of the same shapes (any sharding, any
    number of ranks); the optimizer must be built over the same pairs and groups (its
    ``load_state_dict`` says what differs otherwise). A checkpoint that does not fit raises a
    ``ValueError`` and leaves both as they were: the values are read into copies, and written into
    the parameters only once the optimizer has taken its state."""
    path = str(path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected a directory written by save_checkpoint")
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k[len("model."):] for k in md if k.startswith("model.")}
    mine = _trainable(model)
    if saved == {f"module.{n}" for n in mine}:  # written by an earlier version from a DDP-wrapped model
        mine = {f"module.{n}": p for n, p in mine.items()}
    if saved != set(mine):
        missing, extra = sorted(set(mine) - saved), sorted(saved - set(mine))
        raise ValueError(f"checkpoint {path!r} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    shapes = [f"{n} {tuple(md['model.' + n].size)} saved, {tuple(p.shape)} here" for n, p in mine.items()
              if tuple(md["model." + n].size) != tuple(p.shape)]
    if shapes:
        raise ValueError(f"checkpoint {path!r} does not fit this model: {'; '.join(shapes[:5])}. Build the model with the "
                         "adapters and LoRA ranks it was saved with")
    first = next(iter(mine.values()))
    device = (first.to_local() if hasattr(first, "to_local") else first).device
    optim = {
        k[len("optim."):]: torch.empty(m.size, dtype=m.properties.dtype, device=device)
        for k, m in md.items()
        if k.startswith("optim.") and hasattr(m, "size")
    }
    staged = {n: torch.empty_like(p.detach()) for n, p in mine.items()}  # sharded as the parameters are
    state = {"model": staged, "optim": optim, "optim_meta": ""}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path)
    except CheckpointException as exc:  # a BaseException: `except Exception` would not see it
        raise RuntimeError(f"could not read checkpoint {path!r}: {exc}") from None
    meta = json.loads(state["optim_meta"])
    leaves = [optim[str(i)] if v is None and str(i) in optim else v for i, v in enumerate(meta["values"])]
    optimizer.load_state_dict(tree_unflatten(leaves, treespec_loads(meta["spec"])))
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(staged[n])

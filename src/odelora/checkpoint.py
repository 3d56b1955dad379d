"""ODELoRA's checkpoints: what its state dict holds beyond torch's optimizer state, and the
checks that a loaded one fits the optimizer.

The ``"odelora"`` entry of ``ODELoRA.state_dict()`` holds the adaptive step fraction ``rho``, the
count of skipped steps in a row and the last rejected try, the statistics and the last step's
record (``last_step``), the configuration (method, flow, retraction,
preconditioner), the pairs' layout, the companion AdamW's state, and the frames of the last
committed state with their memory layouts: frames are derived from the factors, but a resumed run
must compute exactly what the saved one would have.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._warnings import warn
from .geometry import Frame
from .options import check_lr
from .retractions import Factors
from .store import PairStore, is_sharded

__all__ = ["frames_entry", "saved_frames", "restored", "check_state_dict", "like_params"]


_TENSORS = Frame._fields[:6]  # UB, sB, PB, UA, sA, PA; then ``balanced``


def frames_entry(y: list[Factors]) -> dict:
    """The ``frames`` and ``frame_layouts`` entries of a committed state: per bucket, copies of its
    frame's fields by name (None for a bucket without one), and each tensor's memory layout."""
    return dict(
        frames=[None if x.frame is None else {**{k: t.clone() for k, t in zip(_TENSORS, x.frame)}, "balanced": x.frame.balanced}
                for x in y],
        frame_layouts=[None if x.frame is None else {k: _dim_order(t) for k, t in zip(_TENSORS, x.frame)} for x in y],
    )


def saved_frames(extra: dict, store: PairStore) -> list[Factors] | None:
    """The saved frames over the parameters' present values, in their saved layouts, on the
    factors' device (None for a bucket that had none, or whose compute dtype changed: its frame is
    then computed anew, as the saved run would have; None for all if the layout changed);
    :func:`restored` checks at the next step that they still describe the parameters."""
    frames = extra.get("frames")
    if frames is None or len(frames) != len(store.buckets):
        return None
    layouts = extra.get("frame_layouts") or [None] * len(frames)
    out = []
    for f, o, b in zip(frames, layouts, store.buckets):
        frame = None
        if f is not None:
            f, o = _by_name(f), None if o is None else _by_name(o)
            if all(f[k].dtype == b.dtype for k in _TENSORS):
                ts = [f[k].to(b.scale.device) for k in _TENSORS]
                ts = ts if o is None else [_laid_out(t, o[k]) for t, k in zip(ts, _TENSORS)]
                frame = Frame(*ts, bool(f.get("balanced", False)))
        out.append(Factors(*store.stacked(b), b.scale, frame))
    return out


def _by_name(entry: dict | list) -> dict:
    """A saved frame (or its layouts) by field name; older checkpoints kept them as lists in field order."""
    return entry if isinstance(entry, dict) else dict(zip(Frame._fields, entry))


def restored(y: list[Factors], store: PairStore) -> list[Factors] | None:
    """The parameters with a loaded state's frames, if those frames describe them (else None);
    a bucket without a frame gets none."""
    if len(y) != len(store.buckets):
        return None
    out = []
    for x, b in zip(y, store.buckets):
        B, A = store.stacked(b)
        tol = 100 * torch.finfo(b.dtype).eps
        fr = x.frame
        if fr is None:
            out.append(Factors(B, A, x.scale))
            continue
        k, j = fr.sB.shape[-1], fr.sA.shape[-1]  # a frame of other pairs' shapes (pairs listed in another order) is not theirs
        if (fr.UB.shape, fr.PB.shape, fr.UA.shape, fr.PA.shape) != ((*B.shape[:-1], k), (*B.shape[:-2], B.shape[-1], k),
                                                                    (*A.shape[:-2], A.shape[-1], j), (*A.shape[:-1], j)):
            return None
        rB = (fr.UB * fr.sB.unsqueeze(-2)) @ fr.PB.mT
        rA = (fr.UA * fr.sA.unsqueeze(-2)) @ fr.PA.mT
        if not (torch.allclose(rB, B, rtol=tol, atol=tol * float(B.abs().max())) and torch.allclose(rA, A.mT, rtol=tol, atol=tol * float(A.abs().max()))):
            return None
        out.append(Factors(B, A, x.scale, fr))
    return out


def like_params(sd: dict, params: list[Tensor]) -> dict:
    """A torch optimizer state dict whose per-parameter tensors are laid out like their (possibly
    sharded) parameters: whole tensors from a checkpoint become this rank's DTensor shards."""
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        state[pid] = {
            k: torch.distributed.tensor.distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
            if is_sharded(p) and isinstance(v, Tensor) and not is_sharded(v) and v.shape == p.shape
            else v
            for k, v in st.items()
        }
    return {**sd, "state": state}


def check_state_dict(sd: dict, groups: list[dict], layout: list[list[int]], config: dict[str, str]) -> None:
    """Clear errors for a state dict that does not fit an optimizer with these param groups, pair
    layout (:meth:`PairStore.layout`) and configuration; a warning where only the method, flow or
    retraction differ."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("not an optimizer state dict: expected the keys 'state' and 'param_groups' (from ODELoRA.state_dict())")
    if "odelora" not in sd:
        raise ValueError("not an ODELoRA state dict (no 'odelora' entry): another optimizer's, or one that passed through "
                         "torch.distributed.checkpoint.state_dict's get_optimizer_state_dict, which keeps only 'state' and "
                         "'param_groups' (accelerate's FSDP checkpoints use it). ODELoRA resumes from ODELoRA.state_dict(), and "
                         "distributed runs from odelora.integrations.distributed.save_checkpoint / load_checkpoint; otherwise "
                         "start the new optimizer from scratch")
    extra = sd["odelora"]
    _check_layout(extra, layout)  # first: other shapes or ranks explain most other mismatches
    mine, theirs = groups, sd["param_groups"]
    # Earlier versions left out companion tensors frozen when the optimizer was built.
    older = (" (a checkpoint of an earlier odelora holds only the companion tensors that required grad when its "
             "optimizer was built: pass those as companion to resume it)")
    if len(mine) != len(theirs):
        ours, saved = sum(bool(g.get("companion")) for g in mine), sum(bool(h.get("companion")) for h in theirs)
        hint = (f" (companion groups: {saved} saved, {ours} here; earlier odelora versions kept the companion in one group, "
                "where create_odelora_optimizer(..., decay=names) and ODELoRATrainer now make two, with and without weight "
                "decay: pass decay=None, in ODELoRATrainer odelora_kwargs=dict(decay=None), to resume such a checkpoint)"
                if saved == 1 and ours == 2 else
                f" (companion groups: {saved} saved, {ours} here; the checkpoint's companion is split by weight decay, as "
                "ODELoRATrainer and create_odelora_optimizer(..., decay=names) split it: pass decay=names, with a Trainer's "
                "names trainer.get_decay_parameter_names(model))"
                if saved == 2 and ours == 1 else older if ours and not saved else "")
        raise ValueError(f"the state dict has {len(theirs)} param groups, this optimizer {len(mine)}: build the optimizer with "
                         f"the same pairs and groups{hint}")
    for i, (g, h) in enumerate(zip(mine, theirs)):
        if len(g["params"]) != len(h.get("params", [])):
            raise ValueError(f"param group {i}: the state dict has {len(h.get('params', []))} tensors, this optimizer "
                             f"{len(g['params'])}: build the optimizer on the same model, adapters and companion parameters"
                             f"{older if g.get('companion') else ''}")
        if not g.get("companion"):
            try:
                check_lr(h.get("lr"))
            except ValueError as err:
                raise ValueError(f"param group {i} of the state dict: {err}") from None
            if not (isinstance(h.get("t", 0.0), (int, float)) and math.isfinite(h.get("t", 0.0))):
                raise ValueError(f"param group {i} of the state dict: the integration time t must be a finite number, got {h.get('t')!r}")
            if list(h.get("scales", [])) != list(g["scales"]):
                raise ValueError(f"param group {i}: LoRA scales differ ({h.get('scales')} saved, {g['scales']} here): "
                                 "build it on a model with the same lora_alpha and r (and use_rslora)")
        for p, pid in zip(g["params"], h["params"]):
            _check_shapes(sd["state"].get(pid, {}), p, f"parameter {pid}")
    companion = [p for g in groups if g.get("companion") for p in g["params"]]
    for pid, st in ((extra.get("companion") or {}).get("state") or {}).items():
        if not 0 <= int(pid) < len(companion):
            raise ValueError(f"the state dict has companion state for parameter {pid}, this optimizer {len(companion)} "
                             "companion parameters: build it with the same head and other trainable parameters")
        _check_shapes(st, companion[int(pid)], f"companion parameter {pid}")
    _check_config(extra, config)
    rho = extra.get("rho")
    if not isinstance(rho, (int, float)) or not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"the state dict's adaptive step fraction must be positive and finite, got {rho!r}")


def _check_shapes(state: dict, p: Tensor, who: str) -> None:
    """Per-parameter state tensors (Adam moments) must have the parameter's shape."""
    for key, val in state.items():
        if isinstance(val, Tensor) and val.ndim and val.shape != p.shape:
            raise ValueError(f"state '{key}' of {who} has shape {tuple(val.shape)}, the parameter {tuple(p.shape)}: build the "
                             "optimizer on the same model, adapters, LoRA rank and companion parameters")


def _check_layout(extra: dict, mine: list[list[int]]) -> None:
    """The pairs' shapes and ranks must be those saved."""
    saved = extra.get("layout")
    frames = extra.get("frames") or []
    if saved is None and frames and all(f is not None for f in frames):  # saved before the layout was kept
        saved = [[f["UB"].shape[0], f["UB"].shape[-2], f["PB"].shape[-2], f["UA"].shape[-2]] for f in map(_by_name, frames)]
    # Pairs are bucketed by shape, dtype and device: compare the shapes each bucket holds, not the
    # bucketing, which a pair saved in another dtype changes.
    shapes = lambda layout: sorted((int(m), int(r), int(n)) for k, m, r, n in layout for _ in range(int(k)))
    if saved is not None and shapes(saved) != shapes(mine):
        show = lambda layout: "; ".join(f"{k} of {m} x {r} x {n}" for k, m, r, n in layout)
        raise ValueError(f"the state dict was saved for pairs {show(saved)} (count of m x r x n), this optimizer has "
                         f"{show(mine)}: build it on the same model, adapters and LoRA rank")


def _check_config(extra: dict, here: dict[str, str]) -> None:
    """Another preconditioner is an error (its state would be dropped or left unused); another
    method, flow or retraction a warning."""
    config = extra.get("config") or {}
    if config.get("preconditioner", here["preconditioner"]) != here["preconditioner"]:
        raise ValueError(f"the state dict was saved with preconditioner={config['preconditioner']!r}, this optimizer has "
                         f"{here['preconditioner']!r}: build it with the saved preconditioner to resume, or start a new optimizer")
    changed = {k: (v, here[k]) for k, v in config.items() if k in here and v != here[k]}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        warn(f"loading a state dict saved with other settings ({what}); the steps go on with this optimizer's")


def _dim_order(t: Tensor) -> list[int]:
    """``t``'s dimensions from the outermost in memory to the innermost: its layout."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _laid_out(t: Tensor, order: list[int]) -> Tensor:
    """``t`` with the layout ``order`` (same values). Checkpoint readers (DCP) hand tensors back
    contiguous, and a matrix product's rounding depends on its operands' layout: cached frames
    keep the layout they were saved with, so that a resumed run computes what the saved one would."""
    return t.permute(order).contiguous().permute(sorted(range(len(order)), key=order.__getitem__))

"""The pairs an optimizer moves, packed into buckets of equal shape: stacked factors out of the
parameters, and back.

Sharded factors (FSDP2's ``fully_shard``: DTensor parameters and gradients, any placement) are
gathered whole on every rank, so each rank computes the same step on the same full factors (a LoRA
factor is small); the new values are written back to each rank's own shard. Only LoRA factors and
their gradients are gathered, never a base weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import compute_dtype
from .pairs import LoRAPair
from .retractions import Factors

try:  # torch built with distributed support
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = distribute_tensor = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def whole(t: Tensor) -> Tensor:
    """The full tensor on every rank (an all-gather for a sharded one)."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's part of a sharded tensor; any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


def _own_part(value: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of a full ``value`` laid out like the DTensor ``like`` (no communication)."""
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()

__all__ = ["Bucket", "PairStore", "is_sharded", "local", "whole"]


@dataclass
class Bucket:
    """Pairs of one param group with equal shapes, dtype and device, moved in one batched call."""

    group: int  # index into the optimizer's param_groups
    Bs: list[Tensor]
    As: list[Tensor]
    names: list[str]
    scale: Tensor  # (k,) LoRA scales in the compute dtype
    dtype: torch.dtype  # compute dtype
    where: tuple  # the factors' (dtype, device) when packed

    @property
    def params(self) -> list[Tensor]:
        return self.Bs + self.As

    @property
    def sharded(self) -> bool:
        return is_sharded(self.Bs[0])

    @property
    def exact(self) -> bool:
        """Whether the parameters hold the compute dtype (values written are read back unchanged)."""
        return self.Bs[0].dtype == self.dtype


class PairStore:
    """Buckets of the pairs in a list of param groups. A group lists its pairs' factors as
    ``params = [B_0, A_0, B_1, A_1, ...]`` with ``scales`` and ``names`` (as the optimizer's
    ``options.pair_groups`` writes them); this is the only place that reads the factors from that layout."""

    def __init__(self, groups: list[dict]):
        self.buckets: list[Bucket] = []
        for gi, g in enumerate(groups):
            if g.get("companion"):
                continue
            by_key: dict[tuple, list[int]] = {}
            pairs = list(zip(g["params"][0::2], g["params"][1::2]))
            for i, (B, A) in enumerate(pairs):
                by_key.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, B.device), []).append(i)
            for idx in by_key.values():
                device = local(pairs[idx[0]][0]).device
                dt = compute_dtype(pairs[idx[0]][0])
                scale = torch.tensor([g["scales"][i] for i in idx], dtype=dt, device=device)
                self.buckets.append(
                    Bucket(gi, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], [g["names"][i] for i in idx], scale, dt,
                           (pairs[idx[0]][0].dtype, pairs[idx[0]][0].device))
                )

    @staticmethod
    def pairs(groups: list[dict]) -> list[LoRAPair]:
        """The pairs of the groups, in their order."""
        return [
            LoRAPair(B, A, s, n)
            for g in groups if not g.get("companion")
            for B, A, s, n in zip(g["params"][0::2], g["params"][1::2], g["scales"], g["names"])
        ]

    @staticmethod
    def stacked(b: Bucket) -> tuple[Tensor, Tensor]:
        """A bucket's factors, whole and stacked, in the compute dtype."""
        return tuple(torch.stack([whole(p.detach()) for p in ts]).to(b.dtype) for ts in (b.Bs, b.As))

    def pack(self) -> list[Factors]:
        return [Factors(*self.stacked(b), b.scale) for b in self.buckets]

    def unpack(self, y: list[Factors]) -> None:
        params, values = [], []
        for b, x in zip(self.buckets, y):
            vals = list(x.B.unbind(0)) + list(x.A.unbind(0))
            if b.sharded:
                vals = [_own_part(v, p) for v, p in zip(vals, b.params)]
            params += [local(p.detach()) for p in b.params] if b.sharded else b.params
            values += vals
        with torch.no_grad():
            torch._foreach_copy_(params, values)

    def grads(self) -> list[tuple[Tensor, Tensor]]:
        def stacked(ts, dt):
            return torch.stack([whole(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=local(p).device) for p in ts]).to(dt)

        return [(stacked(b.Bs, b.dtype), stacked(b.As, b.dtype)) for b in self.buckets]

    def idle(self) -> tuple[list[Tensor | None], list[str]]:
        """The pairs that sit out this step, as torch optimizers leave a parameter without a
        gradient: per bucket None where every pair trains, else a flag per pair (k,) marking those
        with a frozen factor (``requires_grad=False``) or no gradient on either factor (an adapter
        not in use). Also the names of pairs with one factor frozen or without gradient, which
        therefore sit out too. Attribute reads only: no tensor work where every pair trains."""
        out, half = [], []
        for b in self.buckets:
            flags = None
            for i, (B, A) in enumerate(zip(b.Bs, b.As)):
                off = [not p.requires_grad or p.grad is None for p in (B, A)]
                if any(off):
                    flags = flags if flags is not None else [False] * len(b.Bs)
                    flags[i] = True
                    if not all(off):
                        half.append(b.names[i])
            out.append(None if flags is None else torch.tensor(flags, device=b.scale.device))
        return out, half

    def has_grads(self) -> bool:
        return any(p.grad is not None for b in self.buckets for p in b.params)

    def clear_grads(self) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    def versions(self) -> tuple[tuple[int, int], ...]:
        """Version counter and storage address of every factor: a write under ``torch.no_grad()``
        bumps the first, ``p.data = t`` changes the second. (In-place writes through ``.data``
        change neither: PyTorch does not count them.)"""
        out = []
        for b in self.buckets:
            out += [(p._version, p.data_ptr()) for p in ([local(p) for p in b.params] if b.sharded else b.params)]
        return tuple(out)

    def moved(self) -> bool:
        """Whether a factor's dtype or device changed since the pairs were packed (``model.to(...)``)."""
        return any((p.dtype, p.device) != b.where for b in self.buckets for p in b.params)

    def layout(self) -> list[list[int]]:
        """Per bucket: ``[pairs, m, r, n]``."""
        return [[len(b.Bs), *b.Bs[0].shape, b.As[0].shape[-1]] for b in self.buckets]

    def names_where(self, bad: list[Tensor]) -> list[str]:
        """Names of the pairs flagged by per-bucket boolean tensors (k,)."""
        return [n for b, flags in zip(self.buckets, bad) for n, f in zip(b.names, flags.tolist()) if f]

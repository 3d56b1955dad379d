"""The pairs an optimizer moves, packed into buckets of equal shape: stacked factors out of the
parameters, and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import compute_dtype
from .retractions import Factors

__all__ = ["Bucket", "PairStore"]


@dataclass
class Bucket:
    """Pairs of one param group with equal shapes, dtype and device, moved in one batched call."""

    group: int  # index into the optimizer's param_groups
    Bs: list[Tensor]
    As: list[Tensor]
    names: list[str]
    scale: Tensor  # (k,) LoRA scales in the compute dtype
    dtype: torch.dtype  # compute dtype

    @property
    def params(self) -> list[Tensor]:
        return self.Bs + self.As

    @property
    def exact(self) -> bool:
        """Whether the parameters hold the compute dtype (values written are read back unchanged)."""
        return self.Bs[0].dtype == self.dtype


class PairStore:
    """Buckets of the pairs in a list of param groups. A group lists its pairs' factors as
    ``params = [B_0, A_0, B_1, A_1, ...]`` with ``scales`` and ``names``; this is the only place
    that reads that layout."""

    def __init__(self, groups: list[dict]):
        self.buckets: list[Bucket] = []
        for gi, g in enumerate(groups):
            if g.get("companion"):
                continue
            by_key: dict[tuple, list[int]] = {}
            pairs = list(zip(g["params"][0::2], g["params"][1::2]))
            for i, (B, A) in enumerate(pairs):
                by_key.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, B.device), []).append(i)
            for (_, _, _, device), idx in by_key.items():
                dt = compute_dtype(pairs[idx[0]][0])
                scale = torch.tensor([g["scales"][i] for i in idx], dtype=dt, device=device)
                self.buckets.append(
                    Bucket(gi, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], [g["names"][i] for i in idx], scale, dt)
                )

    def pack(self) -> list[Factors]:
        return [Factors(torch.stack(b.Bs).to(b.dtype), torch.stack(b.As).to(b.dtype), b.scale) for b in self.buckets]

    def unpack(self, y: list[Factors]) -> None:
        params, values = [], []
        for b, x in zip(self.buckets, y):
            params += b.params
            values += list(x.B.unbind(0)) + list(x.A.unbind(0))
        torch._foreach_copy_(params, values)

    def grads(self) -> list[tuple[Tensor, Tensor]]:
        def stacked(ts, dt):
            return torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in ts]).to(dt)

        return [(stacked(b.Bs, b.dtype), stacked(b.As, b.dtype)) for b in self.buckets]

    def has_grads(self) -> bool:
        return any(p.grad is not None for b in self.buckets for p in b.params)

    def clear_grads(self) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    def versions(self) -> tuple[int, ...]:
        return tuple(p._version for b in self.buckets for p in b.params)

    def names_where(self, bad: list[Tensor]) -> list[str]:
        """Names of the pairs flagged by per-bucket boolean tensors (k,)."""
        return [n for b, flags in zip(self.buckets, bad) for n, f in zip(b.names, flags.tolist()) if f]

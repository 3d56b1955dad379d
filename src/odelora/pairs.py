"""LoRA pairs: the (B, A, scale) triples an optimizer moves, from plain tensors or PEFT models."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import Tensor

__all__ = ["LoRAPair", "as_pair", "as_pairs"]


# FSDP1 (FullyShardedDataParallel) flattens the parameters of a wrapped module into one vector.
FSDP1_ADVICE = ("whose flattening mixes the factors of different layers. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
                "which ODELoRA supports, or DDP")


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """One adapted weight ``W = W0 + scale * B @ A`` with ``B`` (m, r) and ``A`` (r, n)."""

    B: Tensor
    A: Tensor
    scale: float = 1.0
    name: str = ""

    def __repr__(self) -> str:  # shapes, not the tensors' values
        (m, r), n = self.B.shape, self.A.shape[1]
        return f"LoRAPair({self.name or '?'}: {m} x {r} x {n}, scale {self.scale:g}, {str(self.B.dtype).replace('torch.', '')})"

    def __post_init__(self):
        B, A = self.B, self.A
        who = f"pair {self.name}" if self.name else "LoRAPair"
        for t in (B, A):
            if type(t).__name__ == "FlatParameter" or getattr(t, "_is_flat_param", False):
                raise NotImplementedError(f"{who}: this LoRA factor is a slice of an FSDP1 FlatParameter, {FSDP1_ADVICE}")
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{who}: expected B (m, r) and A (r, n), got B {tuple(B.shape)} "
                f"and A {tuple(A.shape)}. PEFT's lora_B.weight is B and lora_A.weight is A"
            )
        if 0 in (*B.shape, A.shape[1]):
            raise ValueError(f"{who}: empty factor, B {tuple(B.shape)} and A {tuple(A.shape)}: a pair needs m, r, n >= 1; "
                             "leave pairs of rank 0 out")
        if B.dtype != A.dtype or B.device != A.device:
            raise ValueError(f"{who}: B and A must share dtype and device, got B {B.dtype} on {B.device} and "
                             f"A {A.dtype} on {A.device}")
        if not B.is_floating_point():
            raise TypeError(f"{who}: factors must be floating point, got {B.dtype}")
        if not (B.requires_grad and A.requires_grad):
            frozen = [n for n, t in (("B", B), ("A", A)) if not t.requires_grad]
            raise ValueError(
                f"{who}: {' and '.join(frozen)} {'does' if len(frozen) == 1 else 'do'} not require grad, so it would get no gradient while the optimizer rewrites "
                "both factors. Train both factors (requires_grad_()) or leave the pair out"
            )
        try:  # a Python, NumPy or one-element tensor number, kept as a float
            scale = float(self.scale) if not isinstance(self.scale, (bool, str, bytes)) else math.nan
        except (TypeError, ValueError, RuntimeError):
            scale = math.nan
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{who}: scale must be a positive finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def as_pair(item: Any, index: int = 0) -> LoRAPair:
    """Accept a :class:`LoRAPair`, a ``(B, A)`` or ``(B, A, scale)`` tuple, or a mapping with keys
    ``B``, ``A`` and optionally ``scale``, ``name``."""
    if isinstance(item, LoRAPair):
        return item if item.name else dataclasses.replace(item, name=f"pair{index}")
    if isinstance(item, Mapping):
        missing = {"B", "A"} - set(item)
        if missing:
            raise ValueError(f"pair #{index}: mapping lacks keys {sorted(missing)}")
        return LoRAPair(item["B"], item["A"], item.get("scale", 1.0), str(item.get("name", f"pair{index}")))
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and all(isinstance(t, Tensor) for t in item[:2]):
        return LoRAPair(item[0], item[1], item[2] if len(item) == 3 else 1.0, f"pair{index}")
    hint = ""
    if isinstance(item, Tensor):
        hint = (": the pairs are a list of such tuples, [(B, A), ...], not the tensors themselves (for a PEFT model: "
                "odelora.integrations.peft.lora_pairs(model) or create_odelora_optimizer(model, lr))")
    elif isinstance(item, (tuple, list)) and len(item) not in (2, 3):
        hint = (f" of {len(item)} items: a tuple is (B, A) or (B, A, scale); to name a pair, pass "
                "LoRAPair(B, A, scale, name) or {'B': B, 'A': A, 'scale': scale, 'name': name}")
    elif isinstance(item, (tuple, list)):
        hint = f" of {', '.join(type(t).__name__ for t in item)}: B and A must be tensors"
    raise TypeError(
        f"pair #{index}: expected a LoRAPair, a (B, A[, scale]) tuple or a dict with B and A, "
        f"got {type(item).__name__}{hint}"
    )


def as_pairs(items: Iterable[Any], start: int = 0) -> list[LoRAPair]:
    """:func:`as_pair` of each item; unnamed pairs are called ``pair{start + i}``."""
    pairs = [as_pair(x, start + i) for i, x in enumerate(items)]
    seen: set[int] = set()
    for p in pairs:
        for t in (p.B, p.A):
            if id(t) in seen:
                raise ValueError(f"pair {p.name}: a tensor appears in more than one pair")
            seen.add(id(t))
    return pairs

"""What turns a step's velocity into a move: nothing (plain ODE steps) or Adam moments.

A preconditioner gets the start state, the accepted RK attempt and the retraction, and returns a
:class:`Move`: the new state and the per-parameter optimizer state to store (in the optimizer's
``state``, saved with ``state_dict``) if the step is committed; a step skipped afterwards (an
overflow) leaves that state as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from .integrators import Attempt, Tableau, axpy
from .retractions import Factors, Retraction, keep_where
from .store import Bucket, local

__all__ = ["Move", "Plain", "Adam", "PRECONDITIONERS", "get_preconditioner"]


@dataclass
class Move:
    """The new state, and per-parameter state entries to write when the step is committed."""

    y: list[Factors]
    state: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def without(self, idle: list[Tensor | None], y0: list[Factors], buckets: list[Bucket]) -> "Move":
        """The move with the pairs flagged in ``idle`` (per bucket, or None) left at ``y0``, their
        state entries unchanged."""
        if all(flags is None for flags in idle):
            return self
        y = [x1 if flags is None else keep_where(flags, x0, x1) for flags, x0, x1 in zip(idle, y0, self.y)]
        still = {id(p) for flags, b in zip(idle, buckets) if flags is not None
                 for i in flags.nonzero().flatten().tolist() for p in (b.Bs[i], b.As[i])}
        return Move(y, {p: st for p, st in self.state.items() if id(p) not in still})

    def holding(self, held: list[bool], y0: list[Factors]) -> "Move":
        """The move with the buckets flagged in ``held`` (a group at lr 0) left at ``y0`` bit for
        bit, not refactored; their state entries are kept, as torch's optimizers update moments at
        lr 0."""
        if not any(held):
            return self
        return Move([x0 if h else x1 for h, x0, x1 in zip(held, y0, self.y)], self.state)


class Plain:
    """The RK step itself (SGD-like: with the balanced flow the product moves by ``-lr P(G)`` per
    unit step)."""

    name = "none"
    per_coordinate = False  # only the product of the velocity matters
    uses_step = True  # the attempt's new state is the move
    options = ()  # optimizer options it reads from the param groups

    def __call__(self, y0, res: Attempt, tableau: Tableau, retraction: Retraction, buckets, groups, state) -> Move:
        return Move(res.y)


class Adam:
    """Adam moments of the step's mean velocity ``sum_j b_j k_j`` (the raw flow velocity for
    Euler), fed to torch's functional AdamW as the negative gradient on the factors, then the
    retraction. Because retracted factors are the balanced ones closest to the factors they
    replace, the moments stay attached to the same coordinates from step to step."""

    name = "adam"
    per_coordinate = True  # the factor velocity itself, gauge included, is the input
    uses_step = False  # only the attempt's stages: the RK step itself is not formed
    options = ("betas", "eps", "weight_decay")

    def __call__(self, y0, res: Attempt, tableau: Tableau, retraction: Retraction, buckets: list[Bucket], groups, state) -> Move:
        ks = [st.k for st in res.stages]
        out, new_state = [], {}
        for b, (x0, bucket) in enumerate(zip(y0, buckets)):
            g = groups[bucket.group]
            vB, vA = axpy([torch.zeros_like(x0.B), torch.zeros_like(x0.A)], [1.0, 1.0], tableau.b, [k[b] for k in ks])
            B, A = x0.B.clone(), x0.A.clone()
            params = list(B.unbind(0)) + list(A.unbind(0))  # views: updated in place
            grads = list(vB.neg_().unbind(0)) + list(vA.neg_().unbind(0))
            sts = [self._state(state, p, bucket.dtype) for p in bucket.params]  # copies, stored on commit
            beta1, beta2 = g["betas"]
            adamw(
                params, grads, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts], [], [s["step"] for s in sts],
                foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=float(g["lr"]),
                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
            )
            new_state.update(zip(bucket.params, sts))
            out.append(Factors(B, A, x0.scale))
        return Move(retraction.retract(out), new_state)

    @staticmethod
    def _state(state, p, dtype) -> dict[str, Any]:
        """Copies of the moments of the whole factor (a sharded one too: the step runs on gathered
        factors), zeros before the first step."""
        st = state.get(p, {})
        device = local(p).device
        if "exp_avg" in st:  # in the compute dtype, on the factor's device (they follow a model.to(...))
            return dict(step=st["step"].clone(), **{k: st[k].to(device=device, dtype=dtype, copy=True) for k in ("exp_avg", "exp_avg_sq")})
        zeros = lambda: torch.zeros(p.shape, dtype=dtype, device=device)
        return dict(step=torch.zeros((), dtype=torch.float32), exp_avg=zeros(), exp_avg_sq=zeros())


PRECONDITIONERS = {"none": Plain, "adam": Adam}


def get_preconditioner(name: str | None):
    try:
        return PRECONDITIONERS[name or "none"]()
    except (KeyError, TypeError):  # an unknown or unhashable name
        raise ValueError(f"preconditioner must be None or one of {sorted(PRECONDITIONERS)}, got {name!r}") from None

"""What turns a step's velocity into a move: nothing (plain ODE steps) or Adam moments.

A preconditioner gets the start state, the accepted RK attempt and the retraction, and returns the
new state. Its per-parameter state lives in the optimizer's ``state`` (saved with
``state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

from .integrators import Attempt, Tableau, axpy
from .retractions import Factors, Retraction
from .store import Bucket

__all__ = ["Plain", "Adam", "PRECONDITIONERS", "get_preconditioner"]


class Plain:
    """The RK step itself (SGD-like: the product moves by ``-lr P(G)`` per unit step)."""

    name = "none"
    per_coordinate = False  # only the product of the velocity matters

    def __call__(self, y0, res: Attempt, tableau: Tableau, retraction: Retraction, buckets, groups, state) -> list[Factors]:
        return res.y


class Adam:
    """Adam moments of the step's mean velocity ``sum_j b_j k_j`` (the raw flow velocity for
    Euler), fed to torch's functional AdamW as the negative gradient on the factors, then the
    retraction. Because retracted factors are the balanced ones closest to the factors they
    replace, the moments stay attached to the same coordinates from step to step."""

    name = "adam"
    per_coordinate = True  # the factor velocity itself, gauge included, is the input

    def __call__(self, y0, res: Attempt, tableau: Tableau, retraction: Retraction, buckets: list[Bucket], groups, state) -> list[Factors]:
        ks = [st.k for st in res.stages]
        out = []
        for b, (x0, bucket) in enumerate(zip(y0, buckets)):
            g = groups[bucket.group]
            vB, vA = axpy([torch.zeros_like(x0.B), torch.zeros_like(x0.A)], [1.0, 1.0], tableau.b, [k[b] for k in ks])
            B, A = x0.B.clone(), x0.A.clone()
            params = list(B.unbind(0)) + list(A.unbind(0))  # views: updated in place
            grads = list(vB.neg_().unbind(0)) + list(vA.neg_().unbind(0))
            sts = [self._state(state, p, bucket.dtype) for p in bucket.params]
            beta1, beta2 = g["betas"]
            adamw(
                params, grads, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts], [], [s["step"] for s in sts],
                foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"],
                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
            )
            out.append(Factors(B, A, x0.scale))
        return retraction.retract(out)

    @staticmethod
    def _state(state, p, dtype) -> dict[str, Any]:
        """Moments of the whole factor (a sharded one too: the step runs on gathered factors)."""
        st = state[p]
        if "exp_avg" not in st:
            device = (p.to_local() if hasattr(p, "to_local") else p).device
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=device)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=device)
        return st


PRECONDITIONERS = {"none": Plain, "adam": Adam}


def get_preconditioner(name: str | None):
    try:
        return PRECONDITIONERS[name or "none"]()
    except KeyError:
        raise ValueError(f"preconditioner must be None or one of {sorted(PRECONDITIONERS)}, got {name!r}") from None

"""The arguments of the ODELoRA optimizer: param groups of LoRA pairs, learning rates, Adam and
flow options, the companion AdamW's options. Each check raises a ValueError that says what to pass."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

from torch import Tensor

from .flows import Flow, check_damping
from .pairs import LoRAPair, as_pairs
from .store import is_sharded

__all__ = ["pair_groups", "check_lr", "check_count", "check_adam_options", "check_flow_options", "companion_groups", "companion_options"]


_FOREIGN = ("maximize", "momentum", "nesterov", "dampening", "amsgrad")  # set (truthy) in a group: refused, not ignored


def pair_groups(params: Any, start: int = 0) -> list[dict]:
    """Param groups of pairs; unnamed pairs are numbered from ``start`` across the groups."""
    items = list(params) if not isinstance(params, (LoRAPair, dict)) else [params]
    if not items:
        raise ValueError("ODELoRA got no LoRA pairs to optimize: pass pairs [(B, A, scale), ...]; for a PEFT model, "
                         "odelora.integrations.peft.create_odelora_optimizer(model, lr) finds them (a model without "
                         "LoRA layers: wrap it with peft.get_peft_model first)")
    if any(isinstance(x, dict) and "params" in x and "pairs" not in x for x in items):
        raise ValueError("ODELoRA param groups take 'pairs', not 'params': [{'pairs': [(B, A, scale), ...], 'lr': ...}]")
    if all(isinstance(x, dict) and "pairs" in x for x in items):
        groups = items
    elif any(isinstance(x, dict) and "pairs" in x for x in items):
        raise ValueError("mix of param groups ({'pairs': ...}) and bare pairs; use one form")
    else:
        groups = [{"pairs": items}]
    out = []
    for g in groups:
        own = sorted(set(g) & {"scales", "names", "t"})
        if own:
            raise ValueError(f"a param group sets {own}, which ODELoRA keeps itself: give each pair's scale and name with the "
                             "pair, (B, A, scale) or LoRAPair(B, A, scale, name), and leave the time t to the optimizer")
        foreign = sorted(k for k in _FOREIGN if g.get(k))
        if foreign:
            raise ValueError(f"a param group sets {foreign}, options of other torch optimizers that ODELoRA does not have "
                             "(it would ignore them): ODELoRA descends along the flow (negate the loss to ascend); for "
                             "Adam-like steps use preconditioner='adam'")
        pairs = as_pairs([g["pairs"]] if isinstance(g["pairs"], LoRAPair) else g["pairs"], start)
        if not pairs:
            raise ValueError("a param group has no pairs")
        start += len(pairs)
        rest = {k: v for k, v in g.items() if k != "pairs"}
        if "params" in rest:
            raise ValueError("ODELoRA param groups take 'pairs', not 'params'")
        if "lr" in rest:
            rest["lr"] = check_lr(rest["lr"])
        out.append(dict(params=[t for p in pairs for t in (p.B, p.A)], scales=[float(p.scale) for p in pairs], names=[p.name for p in pairs], **rest))
    return out


def check_adam_options(preconditioner, betas, eps, weight_decay) -> dict:
    """Valid Adam options, as plain floats (torch's foreach AdamW refuses tensor betas);
    ``weight_decay`` only for a preconditioner that reads it."""
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    try:
        ok = all(float(x) >= 0 and math.isfinite(float(x)) for x in (eps, weight_decay))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"eps and weight_decay must be finite numbers >= 0, got eps={eps!r}, weight_decay={weight_decay!r}")
    if weight_decay and "weight_decay" not in preconditioner.options:
        raise ValueError("weight_decay acts only with preconditioner='adam' (decoupled, as in AdamW); plain ODE steps have none")
    return dict(betas=(b1, b2), eps=float(eps), weight_decay=float(weight_decay))


def check_flow_options(flow: Flow, options: dict) -> None:
    """Unknown keyword arguments for the flow, reported now rather than at the first step."""
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = set()
    for fn in (flow.fn, flow.tangent):
        try:
            params = inspect.signature(fn).parameters.values() if fn is not None else []
        except (TypeError, ValueError):  # no signature to read
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return
        accepted |= {p.name for p in params if p.kind in named}
    accepted -= {"B", "A", "gB", "gA", "scale", "frame"}  # the optimizer passes these
    bad = sorted(set(options) - accepted)
    if bad:
        raise ValueError(f"flow_options {bad} are not options of the {flow.name!r} flow; it takes {sorted(accepted)}")
    check_damping(options.get("damping"))


def companion_groups(companion) -> tuple[list[dict], list[str | None]]:
    """The companion's param groups, from tensors (one group) or torch-style groups
    ``{"params": [...], **AdamW options}``, empty ones kept as torch keeps them (so that per-group
    LR scheduler lists line up with the groups passed); and a name per tensor, in the groups'
    order, where they came as ``(name, tensor)`` pairs as ``named_parameters()`` gives them (else
    None): messages name the tensor."""
    if isinstance(companion, Tensor):
        raise TypeError("companion must be an iterable of tensors or param groups, got a single tensor: pass [tensor]")
    items = [] if companion is None else list(companion)
    named = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], Tensor)  # noqa: E731
    if all(isinstance(x, Tensor) or named(x) for x in items):
        groups = [{"params": items}] if items else []
    elif all(isinstance(x, dict) and "params" in x for x in items):
        groups = [{**g, "params": [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])} for g in items]
    else:
        raise TypeError("companion must be tensors, (name, tensor) pairs, or param groups {'params': [...], ...} as torch's "
                        "optimizers take")
    names: list[str | None] = []
    for g in groups:
        if not all(isinstance(x, Tensor) or named(x) for x in g["params"]):
            raise TypeError("a companion group's params must be tensors or (name, tensor) pairs")
        names += [x[0] if named(x) else None for x in g["params"]]
        g["params"] = [x[1] if named(x) else x for x in g["params"]]
    return groups, names


def companion_options(params: list[Tensor], kwargs: dict | None) -> dict:
    """The companion AdamW's options: the caller's, with torch's fused kernel where nothing says
    otherwise and the parameters allow it (plain floating-point tensors on CPU or CUDA). On a
    head and its bias it takes a quarter of the time of the per-tensor or foreach loops."""
    kwargs = dict(kwargs or {})
    if "lr" in kwargs or "params" in kwargs:
        raise ValueError(f"companion_kwargs must not set {'lr' if 'lr' in kwargs else 'params'}: pass the companion's rate as "
                         "companion_lr and its parameters as companion")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a companion parameter is listed twice: list each tensor once")
    if "foreach" not in kwargs and "fused" not in kwargs and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and not is_sharded(p) for p in params
    ):
        kwargs["fused"] = True
    return kwargs


def check_count(name: str, value, minimum: int) -> int:
    """``value`` as an int: a whole number (Python, NumPy) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_lr(lr, name: str = "lr") -> float:
    """``lr`` as a float: a finite number >= 0 (a Python or NumPy number, or a one-element tensor);
    0, as in torch's optimizers, holds the parameters where they are (an LR warm-up's first step)."""
    try:
        value = math.nan if isinstance(lr, (bool, str, bytes)) else float(lr)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative finite number (a float or a one-element tensor), got {lr!r}")
    return value
